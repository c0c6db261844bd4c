/* VLAN tag push and pop (bpf_skb_vlan_push / bpf_skb_vlan_pop, Linux 4.3+). `vlan_push` tags
 * untagged frames with VLAN 42; `vlan_pop` strips the tag. */
#include "bpf_helpers.h"

#define VLAN_ID 42

SEC("action/vlan_push")
int push(struct __sk_buff *skb)
{
	if (skb->vlan_present)
		return TC_ACT_OK;
	if (bpf_skb_vlan_push(skb, __builtin_bswap16(ETH_P_8021Q), VLAN_ID))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

SEC("action/vlan_pop")
int pop(struct __sk_buff *skb)
{
	if (!skb->vlan_present)
		return TC_ACT_OK;
	if (bpf_skb_vlan_pop(skb))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

char __license[] SEC("license") = "GPL";
