/* A tail-call chain through a prog_array, in tc's convention: sections named "ID/KEY" are
 * inserted at KEY of the prog_array whose bpf_elf_map id is ID once loaded. The entry program
 * marks the packet and jumps to stage 0, which jumps to stage 1; stage 1 returns the
 * number of stages seen, kept in skb->cb[0]. */
#include "bpf_helpers.h"

#define JMP_MAP_ID 1

struct bpf_elf_map SEC("maps") jmp_table = {
	.type = BPF_MAP_TYPE_PROG_ARRAY,
	.size_key = sizeof(__u32),
	.size_value = sizeof(__u32),
	.max_elem = 4,
	.id = JMP_MAP_ID,
	.pinning = PIN_GLOBAL_NS,
};

SEC("1/0")
int stage0(struct __sk_buff *skb)
{
	skb->cb[0] += 1;
	bpf_tail_call(skb, &jmp_table, 1);
	return TC_ACT_SHOT; /* stage 1 missing */
}

SEC("1/1")
int stage1(struct __sk_buff *skb)
{
	skb->cb[0] += 1;
	return skb->cb[0];
}

SEC("classifier")
int entry(struct __sk_buff *skb)
{
	skb->cb[0] = 1;
	bpf_tail_call(skb, &jmp_table, 0);
	return TC_ACT_SHOT; /* stage 0 missing */
}

char __license[] SEC("license") = "GPL";
