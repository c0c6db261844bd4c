/* The Linux 4.4 cls_bpf direct-action protocol classifier: ARP, IPv4 and IPv6 frames get a
 * class id (skb->tc_classid, major 1), everything else is dropped. The `ingress` and `egress`
 * programs also count packets per protocol in `proto_stats`, a tc map pinned in the global
 * namespace (MOUNT/tc/globals/proto_stats), so every program of every object that declares it
 * shares one map.
 *
 *   tc filter add dev eth0 ingress bpf da obj tc_classifier.o sec ingress */
#include "bpf_helpers.h"

#define CLASS_ARP 0x10001
#define CLASS_IPV4 0x10002
#define CLASS_IPV6 0x10003

/* index: direction * 4 + slot (slot 0 ARP, 1 IPv4, 2 IPv6, 3 dropped) */
struct bpf_elf_map SEC("maps") proto_stats = {
	.type = BPF_MAP_TYPE_ARRAY,
	.size_key = sizeof(__u32),
	.size_value = sizeof(__u64),
	.max_elem = 8,
	.pinning = PIN_GLOBAL_NS,
};

static __inline int classify(struct __sk_buff *skb, __u32 *slot)
{
	__u32 proto = load_half(skb, 12);

	if (proto == ETH_P_ARP) {
		*slot = 0;
		skb->tc_classid = CLASS_ARP;
		return TC_ACT_OK;
	}
	if (proto == ETH_P_IP) {
		*slot = 1;
		skb->tc_classid = CLASS_IPV4;
		return TC_ACT_OK;
	}
	if (proto == ETH_P_IPV6) {
		*slot = 2;
		skb->tc_classid = CLASS_IPV6;
		return TC_ACT_OK;
	}
	*slot = 3;
	return TC_ACT_SHOT;
}

static __inline int count(struct __sk_buff *skb, __u32 direction)
{
	__u32 slot;
	int verdict = classify(skb, &slot);
	__u32 key = direction * 4 + slot;
	__u64 *packets = bpf_map_lookup_elem(&proto_stats, &key);

	if (packets)
		__sync_fetch_and_add(packets, 1);
	return verdict;
}

SEC("classifier")
int cls_main(struct __sk_buff *skb)
{
	__u32 slot;

	return classify(skb, &slot);
}

SEC("ingress")
int cls_ingress(struct __sk_buff *skb)
{
	return count(skb, 0);
}

SEC("egress")
int cls_egress(struct __sk_buff *skb)
{
	return count(skb, 1);
}

char __license[] SEC("license") = "GPL";
