/* A perf_event_output event stream (Linux 4.4): on each hit of the kprobe, send an event
 * {pid, tgid, sequence} to the perf event of the current CPU in `events`. */
#include "bpf_helpers.h"

struct event {
	__u32 pid;
	__u32 tgid;
	__u64 seq;
};

struct bpf_map_def SEC("maps") events = {
	.type = BPF_MAP_TYPE_PERF_EVENT_ARRAY,
	.key_size = sizeof(int),
	.value_size = sizeof(__u32),
	.max_entries = 2,
};

struct bpf_map_def SEC("maps") seq = {
	.type = BPF_MAP_TYPE_ARRAY,
	.key_size = sizeof(__u32),
	.value_size = sizeof(__u64),
	.max_entries = 1,
};

SEC("kprobe/sys_write")
int on_write(void *ctx)
{
	__u32 zero = 0;
	__u64 *counter = bpf_map_lookup_elem(&seq, &zero);
	__u64 id = bpf_get_current_pid_tgid();
	struct event ev = {};

	if (!counter)
		return 0;
	ev.pid = (__u32)id;
	ev.tgid = id >> 32;
	ev.seq = __sync_fetch_and_add(counter, 1);
	bpf_perf_event_output(ctx, &events, BPF_F_CURRENT_CPU, &ev, sizeof(ev));
	return 0;
}

char __license[] SEC("license") = "GPL";
__u32 __version SEC("version") = 0x040400;
