/* A skb->hash demultiplexer: each packet is cloned to one of four output interfaces chosen by
 * its flow hash (bpf_clone_redirect), and the original continues (TC_ACT_OK). The ifindexes
 * come from `demux_ports`, a samples/bpf-style map (struct bpf_map_def); slots left at 0 are
 * skipped. */
#include "bpf_helpers.h"

struct bpf_map_def SEC("maps") demux_ports = {
	.type = BPF_MAP_TYPE_ARRAY,
	.key_size = sizeof(__u32),
	.value_size = sizeof(__u32),
	.max_entries = 4,
};

SEC("classifier")
int demux(struct __sk_buff *skb)
{
	__u32 slot = skb->hash & 3;
	__u32 *ifindex = bpf_map_lookup_elem(&demux_ports, &slot);

	if (ifindex && *ifindex)
		bpf_clone_redirect(skb, *ifindex, 0);
	return TC_ACT_OK;
}

char __license[] SEC("license") = "GPL";
