/* Tunnel metadata (Linux 4.3+ collect_md): `tunnel_set` gives each packet the tunnel key
 * {id = skb->mark, remote 10.0.0.2}; `tunnel_get` reads the key of a received packet and
 * records the tunnel id in skb->cb[0] and in `tunnel_ids` (tunnel id -> packets). */
#include "bpf_helpers.h"

struct bpf_elf_map SEC("maps") tunnel_ids = {
	.type = BPF_MAP_TYPE_HASH,
	.size_key = sizeof(__u32),
	.size_value = sizeof(__u64),
	.max_elem = 1024,
	.pinning = PIN_OBJECT_NS,
};

SEC("classifier/tunnel_set")
int tunnel_set(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};

	key.tunnel_id = skb->mark;
	key.remote_ipv4 = 0x0a000002; /* 10.0.0.2, host order */
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

SEC("classifier/tunnel_get")
int tunnel_get(struct __sk_buff *skb)
{
	struct bpf_tunnel_key key = {};
	__u64 one = 1, *packets;

	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return TC_ACT_SHOT;
	skb->cb[0] = key.tunnel_id;
	packets = bpf_map_lookup_elem(&tunnel_ids, &key.tunnel_id);
	if (packets)
		__sync_fetch_and_add(packets, 1);
	else
		bpf_map_update_elem(&tunnel_ids, &key.tunnel_id, &one, BPF_NOEXIST);
	return TC_ACT_OK;
}

char __license[] SEC("license") = "GPL";
