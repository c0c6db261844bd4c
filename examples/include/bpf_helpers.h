/* A minimal, self-contained header for the bpffsd examples: the Linux 4.4 helper ids
 * (include/uapi/linux/bpf.h), struct __sk_buff of 4.4, the TC_ACT_* verdicts, and the three
 * map-definition conventions bpffs's ELF loader understands:
 *   - iproute2 tc:   struct bpf_elf_map in SEC("maps") (with pinning)
 *   - samples/bpf:   struct bpf_map_def in SEC("maps")
 *   - libbpf BTF:    anonymous structs of __uint/__type members in SEC(".maps")
 * Built with `clang -O2 -target bpf -c`. No libbpf headers needed. */
#ifndef BPFFS_EXAMPLES_BPF_HELPERS_H
#define BPFFS_EXAMPLES_BPF_HELPERS_H

typedef unsigned char __u8;
typedef unsigned short __u16;
typedef unsigned int __u32;
typedef unsigned long long __u64;
typedef int __s32;

#define SEC(name) __attribute__((section(name), used))
#define __inline inline __attribute__((always_inline))

/* map types and update flags (4.4) */
#define BPF_MAP_TYPE_HASH 1
#define BPF_MAP_TYPE_ARRAY 2
#define BPF_MAP_TYPE_PROG_ARRAY 3
#define BPF_MAP_TYPE_PERF_EVENT_ARRAY 4
#define BPF_ANY 0
#define BPF_NOEXIST 1
#define BPF_EXIST 2
#define BPF_F_INGRESS 1
#define BPF_F_CURRENT_CPU 0xffffffffULL

/* TC verdicts (pkt_cls.h) */
#define TC_ACT_UNSPEC (-1)
#define TC_ACT_OK 0
#define TC_ACT_RECLASSIFY 1
#define TC_ACT_SHOT 2
#define TC_ACT_PIPE 3
#define TC_ACT_STOLEN 4
#define TC_ACT_QUEUED 5
#define TC_ACT_REPEAT 6
#define TC_ACT_REDIRECT 7

/* struct __sk_buff as of Linux 4.4 */
struct __sk_buff {
	__u32 len;
	__u32 pkt_type;
	__u32 mark;
	__u32 queue_mapping;
	__u32 protocol;
	__u32 vlan_present;
	__u32 vlan_tci;
	__u32 vlan_proto;
	__u32 priority;
	__u32 ingress_ifindex;
	__u32 ifindex;
	__u32 tc_index;
	__u32 cb[5];
	__u32 hash;
	__u32 tc_classid;
};

struct bpf_tunnel_key {
	__u32 tunnel_id;
	__u32 remote_ipv4;
};

/* tc's map definition (iproute2 include/bpf_elf.h) */
#define PIN_NONE 0
#define PIN_OBJECT_NS 1
#define PIN_GLOBAL_NS 2
struct bpf_elf_map {
	__u32 type;
	__u32 size_key;
	__u32 size_value;
	__u32 max_elem;
	__u32 flags;
	__u32 id;
	__u32 pinning;
	__u32 inner_id;
	__u32 inner_idx;
};

/* samples/bpf's map definition */
struct bpf_map_def {
	unsigned int type;
	unsigned int key_size;
	unsigned int value_size;
	unsigned int max_entries;
	unsigned int map_flags;
};

/* libbpf's BTF-defined maps */
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name
#define LIBBPF_PIN_NONE 0
#define LIBBPF_PIN_BY_NAME 1

/* helpers: the 4.4 ids */
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)1;
static int (*bpf_map_update_elem)(void *map, const void *key, const void *value,
				  __u64 flags) = (void *)2;
static int (*bpf_map_delete_elem)(void *map, const void *key) = (void *)3;
static int (*bpf_probe_read)(void *dst, __u32 size, const void *src) = (void *)4;
static __u64 (*bpf_ktime_get_ns)(void) = (void *)5;
static int (*bpf_trace_printk)(const char *fmt, __u32 fmt_size, ...) = (void *)6;
static __u32 (*bpf_get_prandom_u32)(void) = (void *)7;
static __u32 (*bpf_get_smp_processor_id)(void) = (void *)8;
static int (*bpf_skb_store_bytes)(void *ctx, __u32 off, const void *from, __u32 len,
				  __u64 flags) = (void *)9;
static int (*bpf_l3_csum_replace)(void *ctx, __u32 off, __u64 from, __u64 to,
				  __u64 flags) = (void *)10;
static int (*bpf_l4_csum_replace)(void *ctx, __u32 off, __u64 from, __u64 to,
				  __u64 flags) = (void *)11;
static void (*bpf_tail_call)(void *ctx, void *map, __u32 index) = (void *)12;
static int (*bpf_clone_redirect)(void *ctx, __u32 ifindex, __u64 flags) = (void *)13;
static __u64 (*bpf_get_current_pid_tgid)(void) = (void *)14;
static __u64 (*bpf_get_current_uid_gid)(void) = (void *)15;
static int (*bpf_get_current_comm)(void *buf, __u32 size) = (void *)16;
static __u32 (*bpf_get_cgroup_classid)(void *ctx) = (void *)17;
static int (*bpf_skb_vlan_push)(void *ctx, __u16 proto, __u16 tci) = (void *)18;
static int (*bpf_skb_vlan_pop)(void *ctx) = (void *)19;
static int (*bpf_skb_get_tunnel_key)(void *ctx, struct bpf_tunnel_key *key, __u32 size,
				     __u64 flags) = (void *)20;
static int (*bpf_skb_set_tunnel_key)(void *ctx, struct bpf_tunnel_key *key, __u32 size,
				     __u64 flags) = (void *)21;
static __u64 (*bpf_perf_event_read)(void *map, __u64 flags) = (void *)22;
static int (*bpf_redirect)(__u32 ifindex, __u64 flags) = (void *)23;
static __u32 (*bpf_get_route_realm)(void *ctx) = (void *)24;
static int (*bpf_perf_event_output)(void *ctx, void *map, __u64 flags, void *data,
				    __u64 size) = (void *)25;

/* LD_ABS/LD_IND packet loads (network byte order converted to host by the instruction) */
unsigned long long load_byte(void *skb, unsigned long long off) asm("llvm.bpf.load.byte");
unsigned long long load_half(void *skb, unsigned long long off) asm("llvm.bpf.load.half");
unsigned long long load_word(void *skb, unsigned long long off) asm("llvm.bpf.load.word");

#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ETH_P_8021Q 0x8100
#define ETH_P_IPV6 0x86DD

#endif
