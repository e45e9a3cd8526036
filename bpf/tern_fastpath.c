// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * tern's eBPF fast path: pod-to-pod traffic on one node, and between pods of
 * different nodes (host routing).
 *
 * tern_fastpath is attached at tc ingress of every fast-path pod's host-side
 * veth: the packets the pod sends. When both ends of a packet are local tern
 * pods that are registered in the endpoint map with the FAST flag, the
 * program rewrites the Ethernet header as the node would have (routed: as
 * a router, TTL/hop limit decremented; bridge: as a switch, the frame
 * unchanged) and hands it with bpf_redirect_peer() straight to the
 * destination pod's interface, in the destination pod's network namespace. The packet then skips the second veth
 * crossing, the node's routing or bridging, and netfilter in the node.
 *
 * Host routing (enabled by the agent, which fills tern_cluster and
 * tern_uplinks): a routed pod's packet for a pod of another node (the
 * destination is in the cluster's pools, tern_cluster) is routed with
 * bpf_fib_lookup() and, when the route leaves by an uplink the agent
 * registered (the underlay device, tern's VXLAN device), sent straight out
 * of it with bpf_redirect_neigh(): no forwarding, conntrack or netfilter
 * in the node. tern_uplink, attached at tc ingress of those uplinks, does the
 * other half: a packet from a pod of another node for a local fast-path
 * pod goes straight into that pod with bpf_redirect_peer(). Traffic between
 * pods of the cluster needs no masquerade, so nothing the node's netfilter
 * does for it is lost; traffic to or from anything outside the pools keeps
 * the kernel path (and its masquerade).
 *
 * Everything else returns TC_ACT_OK and takes the kernel path unchanged:
 * ARP, IPv6 neighbour discovery, broadcast/multicast, traffic to or from the
 * node or outside the cluster, a route the kernel cannot resolve yet (no
 * neighbour entry: the kernel path resolves it for the next packet), a
 * packet larger than the uplink's MTU, pods without the FAST flag
 * (tern-firewall and tern-bandwidth clear it),
 * a pod talking to itself, and every packet whose source does not match the
 * endpoint registered for the device it came in on (anti-spoofing: the
 * source address must belong to this very veth, and the source MAC must be
 * the pod's).
 *
 * Flow cache: a local pod-to-pod decision (both endpoint lookups and every
 * check) is remembered per CPU in tern_flows, keyed by ingress device,
 * source and destination address, with the generation of tern_generation
 * it was made under. Userspace bumps the generation after every change to
 * tern_endpoints, so a remembered decision is only ever the one the map
 * would give now. A hit still checks both MAC addresses and the TTL; it
 * saves the two hash lookups, most of the program's cost (BENCHMARKS.md).
 *
 * One instance (program and maps) per node network namespace, pinned under
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
/* AF_INET / AF_INET6 for bpf_fib_lookup (linux/socket.h is not for BPF). */
#define TERN_AF_INET 2
#define TERN_AF_INET6 10
#define TERN_IPV6_FLOWINFO_MASK bpf_htonl(0x0FFFFFFF)

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

/* A prefix of the cluster's pools: the family byte and its 3 padding
 * bytes are always part of the prefix (prefixlen = 32 + the address's). */
struct tern_prefix_key {
	__u32 prefixlen;
	__u8 family;
	__u8 pad[3];
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 1024);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct tern_prefix_key);
	__type(value, __u32);
} tern_cluster SEC(".maps");

struct tern_uplink {
	__u32 flags;      /* reserved */
	__u32 pad;
	__u64 redirected; /* pod packets host routing sent out of this uplink (approx.) */
};

/* The node's uplinks by ifindex: the only devices host routing sends to
 * and whose ingress tern_uplink serves. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, struct tern_uplink);
} tern_uplinks SEC(".maps");

/* Bumped by userspace after every change to tern_endpoints. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} tern_generation SEC(".maps");

/* A remembered local redirect (see the flow cache above). */
struct tern_flow {
	__u64 generation; /* of tern_generation; a zeroed slot (ifindex 0) never matches */
	__u64 hits;       /* packets redirected by this entry, not yet in dst's counter */
	__u32 ifindex;    /* the source pod's host veth */
	__u32 target;     /* the destination pod's host veth */
	struct tern_endpoint_key src, dst;
	__u8 in_src[6];   /* expected Ethernet source and destination */
	__u8 in_dst[6];
	__u8 out_src[6];  /* rewritten to (routed), else unchanged */
	__u8 out_dst[6];
	__u8 routed;
	__u8 pad[7];
};

#define TERN_FLOW_SLOTS 256
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TERN_FLOW_SLOTS);
	__type(key, __u32);
	__type(value, struct tern_flow);
} tern_flows SEC(".maps");

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

/* The IPv4 or IPv6 header after the Ethernet header, and the endpoint keys
 * of its source and destination; 0 for anything the fast path leaves to
 * the kernel (other protocols, IPv6 neighbour discovery). */
static __always_inline int parse(struct __sk_buff *skb, struct iphdr **ip4, struct ipv6hdr **ip6,
				 struct tern_endpoint_key *src_key, struct tern_endpoint_key *dst_key)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return 0;
	__builtin_memset(src_key, 0, sizeof(*src_key));
	__builtin_memset(dst_key, 0, sizeof(*dst_key));
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *h = (void *)(eth + 1);
		if ((void *)(h + 1) > data_end)
			return 0;
		src_key->family = TERN_FAMILY_V4;
		dst_key->family = TERN_FAMILY_V4;
		__builtin_memcpy(src_key->addr, &h->saddr, 4);
		__builtin_memcpy(dst_key->addr, &h->daddr, 4);
		*ip4 = h;
		return 1;
	}
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *h = (void *)(eth + 1);
		if ((void *)(h + 1) > data_end)
			return 0;
		/* Neighbour discovery stays with the kernel (hop limit 255). */
		if (h->nexthdr == IPPROTO_ICMPV6) {
			struct icmp6hdr *icmp = (void *)(h + 1);
			if ((void *)(icmp + 1) > data_end)
				return 0;
			if (icmp->icmp6_type >= 133 && icmp->icmp6_type <= 137)
				return 0;
		}
		src_key->family = TERN_FAMILY_V6;
		dst_key->family = TERN_FAMILY_V6;
		__builtin_memcpy(src_key->addr, &h->saddr, 16);
		__builtin_memcpy(dst_key->addr, &h->daddr, 16);
		*ip6 = h;
		return 1;
	}
	return 0;
}

/* Act as a router: 0 when the TTL / hop limit would expire (the kernel
 * sends the ICMP error), else decrement it. */
static __always_inline int decrement_ttl(struct iphdr *ip4, struct ipv6hdr *ip6)
{
	if (ip4) {
		if (ip4->ttl <= 1)
			return 0;
		/* Incremental checksum update, as ip_decrease_ttl(). */
		__u32 check = (__u32)ip4->check + (__u32)bpf_htons(0x0100);
		ip4->check = (__u16)(check + (check >= 0xFFFF));
		ip4->ttl--;
	} else if (ip6) {
		if (ip6->hop_limit <= 1)
			return 0;
		ip6->hop_limit--;
	}
	return 1;
}

static __always_inline int in_cluster(const struct tern_endpoint_key *k)
{
	struct tern_prefix_key pk;

	__builtin_memset(&pk, 0, sizeof(pk));
	pk.prefixlen = 32 + (k->family == TERN_FAMILY_V4 ? 32 : 128);
	pk.family = k->family;
	__builtin_memcpy(pk.addr, k->addr, 16);
	return bpf_map_lookup_elem(&tern_cluster, &pk) != 0;
}

/* Host routing, egress half: a routed pod's packet for a pod of another
 * node, routed by the node's FIB and sent out of the uplink it names. */
static __always_inline int route_to_uplink(struct __sk_buff *skb, struct iphdr *ip4, struct ipv6hdr *ip6,
					   const struct tern_endpoint_key *dst_key)
{
	struct bpf_fib_lookup fib;
	struct bpf_redir_neigh nh;
	struct tern_uplink *up;
	long rc;

	if (!in_cluster(dst_key))
		return TC_ACT_OK;
	__builtin_memset(&fib, 0, sizeof(fib));
	fib.ifindex = skb->ifindex;
	if (ip4) {
		fib.family = TERN_AF_INET;
		fib.tos = ip4->tos;
		fib.l4_protocol = ip4->protocol;
		fib.ipv4_src = ip4->saddr;
		fib.ipv4_dst = ip4->daddr;
	} else if (ip6) {
		fib.family = TERN_AF_INET6;
		fib.flowinfo = *(__be32 *)ip6 & TERN_IPV6_FLOWINFO_MASK;
		fib.l4_protocol = ip6->nexthdr;
		__builtin_memcpy(fib.ipv6_src, &ip6->saddr, 16);
		__builtin_memcpy(fib.ipv6_dst, &ip6->daddr, 16);
	} else {
		return TC_ACT_OK;
	}
	/* tot_len 0: the kernel checks the skb (GSO-aware) against the
	 * egress MTU and answers FRAG_NEEDED, which the kernel path handles. */
	rc = bpf_fib_lookup(skb, &fib, sizeof(fib), 0);
	/* NO_NEIGH: the kernel path resolves the next hop for the next packet. */
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return TC_ACT_OK;
	up = bpf_map_lookup_elem(&tern_uplinks, &fib.ifindex);
	if (!up || !decrement_ttl(ip4, ip6))
		return TC_ACT_OK;
	/* bpf_redirect_neigh, not bpf_redirect with fib's MACs: the packet
	 * goes through the kernel's neighbour output, which confirms a stale
	 * entry (a peer whose MAC changed) instead of trusting it forever. */
	__builtin_memset(&nh, 0, sizeof(nh));
	nh.nh_family = fib.family;
	if (ip4)
		nh.ipv4_nh = fib.ipv4_dst; /* the next hop, after the lookup */
	else
		__builtin_memcpy(nh.ipv6_nh, fib.ipv6_dst, 16);
	up->redirected++;
	return bpf_redirect_neigh(fib.ifindex, &nh, sizeof(nh), 0);
}

static __always_inline int key_eq(const struct tern_endpoint_key *a, const struct tern_endpoint_key *b)
{
	const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4];
}

/* Spread flows of one device to several destinations over the slots. */
static __always_inline __u32 flow_slot(__u32 ifindex, const struct tern_endpoint_key *dst)
{
	__u32 word = ((const __u32 *)dst)[4] ^ ((const __u32 *)dst)[1];

	return ((ifindex ^ word) * 2654435761u) >> 24; /* < TERN_FLOW_SLOTS */
}

/* Remember a redirect; first hand the hits of the entry it replaces, if
 * still current, to that entry's destination. */
static __always_inline void flow_remember(struct tern_flow *f, __u64 generation, __u32 ifindex,
					  const struct tern_endpoint_key *src_key,
					  const struct tern_endpoint_key *dst_key, const struct ethhdr *eth,
					  const struct tern_endpoint *dst, int routed)
{
	if (f->generation == generation && f->hits) {
		struct tern_endpoint *old = bpf_map_lookup_elem(&tern_endpoints, &f->dst);
		if (old)
			old->redirected += f->hits;
	}
	f->generation = generation;
	f->hits = 0;
	f->ifindex = ifindex;
	f->target = dst->host_ifindex;
	f->src = *src_key;
	f->dst = *dst_key;
	mac_copy(f->in_src, eth->h_source);
	mac_copy(f->in_dst, eth->h_dest);
	f->routed = routed;
	if (routed) {
		mac_copy(f->out_src, dst->host_mac);
		mac_copy(f->out_dst, dst->pod_mac);
	}
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
	struct tern_flow *flow;
	__u64 *generation;
	__u32 slot, zero = 0;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	if (!parse(skb, &ip4, &ip6, &src_key, &dst_key))
		return TC_ACT_OK;

	slot = flow_slot(skb->ifindex, &dst_key);
	generation = bpf_map_lookup_elem(&tern_generation, &zero);
	flow = bpf_map_lookup_elem(&tern_flows, &slot);
	if (generation && flow && flow->generation == *generation && flow->ifindex == skb->ifindex &&
	    key_eq(&flow->dst, &dst_key) && key_eq(&flow->src, &src_key) && mac_eq(eth->h_source, flow->in_src) &&
	    mac_eq(eth->h_dest, flow->in_dst)) {
		if (flow->routed) {
			if (!decrement_ttl(ip4, ip6))
				return TC_ACT_OK;
			mac_copy(eth->h_source, flow->out_src);
			mac_copy(eth->h_dest, flow->out_dst);
		}
		flow->hits++;
		return bpf_redirect_peer(flow->target, 0);
	}

	/* Anti-spoofing: the source address is this device's own pod's. */
	src = bpf_map_lookup_elem(&tern_endpoints, &src_key);
	if (!src || !(src->flags & TERN_EP_FAST) || src->host_ifindex != skb->ifindex)
		return TC_ACT_OK;
	if (!mac_eq(eth->h_source, src->pod_mac))
		return TC_ACT_OK;

	dst = bpf_map_lookup_elem(&tern_endpoints, &dst_key);
	if (!dst) {
		/* Not a local pod: maybe a pod of another node. */
		if (!(src->flags & TERN_EP_ROUTED) || !mac_eq(eth->h_dest, src->host_mac))
			return TC_ACT_OK;
		return route_to_uplink(skb, ip4, ip6, &dst_key);
	}
	if (!(dst->flags & TERN_EP_FAST))
		return TC_ACT_OK;
	/* A pod reaching itself (hairpin) stays with the kernel. */
	if (dst->host_ifindex == skb->ifindex)
		return TC_ACT_OK;

	if (src->flags & TERN_EP_ROUTED) {
		/* Routed: act as the router the pod sent the packet to. */
		if (!(dst->flags & TERN_EP_ROUTED) || !mac_eq(eth->h_dest, src->host_mac))
			return TC_ACT_OK;
		if (!decrement_ttl(ip4, ip6))
			return TC_ACT_OK;
		if (generation && flow)
			flow_remember(flow, *generation, skb->ifindex, &src_key, &dst_key, eth, dst, 1);
		mac_copy(eth->h_source, dst->host_mac);
		mac_copy(eth->h_dest, dst->pod_mac);
	} else {
		/* Bridged: switch frames addressed to a pod of the same bridge. */
		if ((dst->flags & TERN_EP_ROUTED) || dst->segment != src->segment ||
		    !mac_eq(eth->h_dest, dst->pod_mac))
			return TC_ACT_OK;
		if (generation && flow)
			flow_remember(flow, *generation, skb->ifindex, &src_key, &dst_key, eth, dst, 0);
	}

	/* A statistic, not an account: a plain increment (no locked
	 * instruction on the hot path); concurrent CPUs may lose a count. */
	dst->redirected++;
	return bpf_redirect_peer(dst->host_ifindex, 0);
}

/*
 * Host routing, ingress half: attached at tc ingress of the node's uplinks
 * (the underlay device, tern's VXLAN device). A packet addressed to this
 * node's MAC, from a pod of the cluster that is not local, for a local
 * routed fast-path pod, is routed into that pod with bpf_redirect_peer().
 * Node-to-pod traffic and everything else keeps the kernel path.
 */
SEC("classifier")
int tern_uplink(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct tern_endpoint_key src_key, dst_key;
	struct tern_endpoint *dst;
	struct iphdr *ip4 = 0;
	struct ipv6hdr *ip6 = 0;
	__u32 ifindex = skb->ifindex;

	if ((void *)(eth + 1) > data_end)
		return TC_ACT_OK;
	/* Only frames for this node (not flooded ones for others). */
	if (skb->pkt_type != 0 /* PACKET_HOST */)
		return TC_ACT_OK;
	if (!parse(skb, &ip4, &ip6, &src_key, &dst_key))
		return TC_ACT_OK;
	dst = bpf_map_lookup_elem(&tern_endpoints, &dst_key);
	if (!dst || (dst->flags & (TERN_EP_FAST | TERN_EP_ROUTED)) != (TERN_EP_FAST | TERN_EP_ROUTED))
		return TC_ACT_OK;
	if (!bpf_map_lookup_elem(&tern_uplinks, &ifindex))
		return TC_ACT_OK;
	/* From another node's pod: in the pools, and not one of ours. */
	if (!in_cluster(&src_key) || bpf_map_lookup_elem(&tern_endpoints, &src_key))
		return TC_ACT_OK;
	if (!decrement_ttl(ip4, ip6))
		return TC_ACT_OK;
	mac_copy(eth->h_source, dst->host_mac);
	mac_copy(eth->h_dest, dst->pod_mac);
	dst->redirected++;
	return bpf_redirect_peer(dst->host_ifindex, 0);
}

char _license[] SEC("license") = "Dual BSD/GPL";
