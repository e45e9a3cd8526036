// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * tern's eBPF fast path for pod-to-pod traffic on one node.
 *
 * Attached at tc ingress of every fast-path pod's host-side veth (the packets
 * the pod sends). When both ends of a packet are local tern pods that are
 * registered in the endpoint map with the FAST flag, the program rewrites the
 * Ethernet header as the node would have (routed: as a router, TTL/hop limit
 * decremented; bridge: as a switch, the frame unchanged) and hands it with
 * bpf_redirect_peer() straight to the destination pod's interface, in the
 * destination pod's network namespace. The packet then skips the second veth
 * crossing, the node's routing or bridging, and netfilter in the node.
 *
 * Everything else returns TC_ACT_OK and takes the kernel path unchanged:
 * ARP, IPv6 neighbour discovery, broadcast/multicast, traffic to or from the
 * node or other nodes, pods without the FAST flag (tern-firewall clears it),
 * a pod talking to itself, and every packet whose source does not match the
 * endpoint registered for the device it came in on (anti-spoofing: the
 * source address must belong to this very veth, and the source MAC must be
 * the pod's).
 *
 * One instance (program and map) per node network namespace, pinned under
 * /run/tern/bpf/ by the namespace's cookie (see crates/bpf): a map keyed
 * by address alone cannot serve two namespaces, and the program cannot
 * tell which namespace it runs in (bpf_get_netns_cookie(skb) answers with
 * the namespace of the *sending socket*, i.e. the pod's, or init_net).
 *
 * Build: clang -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu -c
 * tern_fastpath.c (crates/bpf/build.rs does it; headers from libbpf-dev).
 * The layouts below are mirrored by crates/bpf/src/lib.rs.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/icmpv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define TERN_FAMILY_V4 4
#define TERN_FAMILY_V6 6

/* The endpoint may be the source or destination of fast-path packets. */
#define TERN_EP_FAST 1u
/* The pod is routed (gateway = its host veth); else it sits on a bridge. */
#define TERN_EP_ROUTED 2u

struct tern_endpoint_key {
	__u8 family;   /* TERN_FAMILY_V4 or _V6 */
	__u8 pad[3];
	__u8 addr[16]; /* network order; IPv4 in the first 4 bytes */
};

struct tern_endpoint {
	__u32 host_ifindex; /* the pod's host-side veth, in the node netns */
	__u32 flags;        /* TERN_EP_* */
	__u32 segment;      /* bridge ifindex (bridge mode), 0 when routed */
	__u8 pod_mac[6];    /* the pod interface's MAC */
	__u8 host_mac[6];   /* the host veth's MAC (the routed pod's gateway) */
	__u64 redirected;   /* packets delivered to this pod by the fast path (approx.) */
};

/* An address missing from the map means "kernel path", always safe. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct tern_endpoint_key);
	__type(value, struct tern_endpoint);
} tern_endpoints SEC(".maps");

static __always_inline int mac_eq(const __u8 *a, const __u8 *b)
{
	return ((const __u32 *)a)[0] == ((const __u32 *)b)[0] &&
	       ((const __u16 *)a)[2] == ((const __u16 *)b)[2];
}

static __always_inline void mac_copy(__u8 *dst, const __u8 *src)
{
	((__u32 *)dst)[0] = ((const __u32 *)src)[0];
	((__u16 *)dst)[2] = ((const __u16 *)src)[2];
}

SEC("classifier")
int tern_fastpath(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct tern_endpoint_key src_key, dst_key;
	struct tern_endpoint *src, *dst;
	struct iphdr *ip4 = 0;
	struct ipv6hdr *ip6 = 0;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;

	__builtin_memset(&src_key, 0, sizeof(src_key));
	__builtin_memset(&dst_key, 0, sizeof(dst_key));

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		ip4 = (void *)(eth + 1);
		if ((void *)(ip4 + 1) > data_end)
			return TC_ACT_OK;
		src_key.family = TERN_FAMILY_V4;
		dst_key.family = TERN_FAMILY_V4;
		__builtin_memcpy(src_key.addr, &ip4->saddr, 4);
		__builtin_memcpy(dst_key.addr, &ip4->daddr, 4);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		ip6 = (void *)(eth + 1);
		if ((void *)(ip6 + 1) > data_end)
			return TC_ACT_OK;
		/* Neighbour discovery stays with the kernel (hop limit 255). */
		if (ip6->nexthdr == IPPROTO_ICMPV6) {
			struct icmp6hdr *icmp = (void *)(ip6 + 1);
			if ((void *)(icmp + 1) > data_end)
				return TC_ACT_OK;
			if (icmp->icmp6_type >= 133 && icmp->icmp6_type <= 137)
				return TC_ACT_OK;
		}
		src_key.family = TERN_FAMILY_V6;
		dst_key.family = TERN_FAMILY_V6;
		__builtin_memcpy(src_key.addr, &ip6->saddr, 16);
		__builtin_memcpy(dst_key.addr, &ip6->daddr, 16);
	} else {
		return TC_ACT_OK;
	}

	dst = bpf_map_lookup_elem(&tern_endpoints, &dst_key);
	if (!dst || !(dst->flags & TERN_EP_FAST))
		return TC_ACT_OK;

	/* Anti-spoofing: the source address is this device's own pod's. */
	src = bpf_map_lookup_elem(&tern_endpoints, &src_key);
	if (!src || !(src->flags & TERN_EP_FAST) || src->host_ifindex != skb->ifindex)
		return TC_ACT_OK;
	if (!mac_eq(eth->h_source, src->pod_mac))
		return TC_ACT_OK;
	/* A pod reaching itself (hairpin) stays with the kernel. */
	if (dst->host_ifindex == skb->ifindex)
		return TC_ACT_OK;

	if (src->flags & TERN_EP_ROUTED) {
		/* Routed: act as the router the pod sent the packet to. */
		if (!(dst->flags & TERN_EP_ROUTED) || !mac_eq(eth->h_dest, src->host_mac))
			return TC_ACT_OK;
		if (ip4) {
			/* TTL 1 needs an ICMP time exceeded: the kernel sends it. */
			if (ip4->ttl <= 1)
				return TC_ACT_OK;
			/* Incremental checksum update, as ip_decrease_ttl(). */
			__u32 check = (__u32)ip4->check + (__u32)bpf_htons(0x0100);
			ip4->check = (__u16)(check + (check >= 0xFFFF));
			ip4->ttl--;
		} else if (ip6) {
			if (ip6->hop_limit <= 1)
				return TC_ACT_OK;
			ip6->hop_limit--;
		}
		mac_copy(eth->h_source, dst->host_mac);
		mac_copy(eth->h_dest, dst->pod_mac);
	} else {
		/* Bridged: switch frames addressed to a pod of the same bridge. */
		if ((dst->flags & TERN_EP_ROUTED) || dst->segment != src->segment ||
		    !mac_eq(eth->h_dest, dst->pod_mac))
			return TC_ACT_OK;
	}

	/* A statistic, not an account: a plain increment (no locked
	 * instruction on the hot path); concurrent CPUs may lose a count. */
	dst->redirected++;
	return bpf_redirect_peer(dst->host_ifindex, 0);
}

char _license[] SEC("license") = "Dual BSD/GPL";
