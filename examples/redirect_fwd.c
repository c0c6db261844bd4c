/* A bpf_redirect forwarder: every packet goes out of the interface stored at key 0 of
 * `fwd_target`, a libbpf BTF-defined map pinned by name (build with -g for BTF). With no
 * target configured the packet is dropped. */
#include "bpf_helpers.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fwd_target SEC(".maps");

SEC("tc")
int forward(struct __sk_buff *skb)
{
	__u32 key = 0;
	__u32 *ifindex = bpf_map_lookup_elem(&fwd_target, &key);

	if (!ifindex || !*ifindex)
		return TC_ACT_SHOT;
	return bpf_redirect(*ifindex, 0);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
