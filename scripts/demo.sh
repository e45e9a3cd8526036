#!/usr/bin/env bash
# tern demo (make demo): a virtual three-node cluster on this machine.
#
#   1. `tern lab up`: a fabric namespace with two underlay subnets and a
#      router, Debian's etcd, three node namespaces each running `tern agent`
#      (cluster IPAM in etcd, cross-node routing in `auto` mode: direct routes
#      inside a subnet, VXLAN across the router), two pods per node attached
#      with `tern cni`, and an "external" host; the eBPF dataplane: pods on
#      the fast path, agents with eBPF host routing between nodes;
#   2. the routes the agents made, from the kernel, and the uplink program;
#   3. `tern lab test`: every pod and node to every pod, node and the
#      external host over TCP, a verdict per cell;
#   4. a short `tern bench datapath` of the cross-node dataplanes (kernel
#      and eBPF) against the underlay between two nodes;
#   5. `tern lab down`: nothing is left.
#
# Nothing touches the host's own network: everything lives in namespaces the
# lab creates, and traffic only flows between them. Run as root.
#
#   TERN=path   the tern executable (default target/release/tern)
#   TERN_DEMO_BENCH=0   skip the benchmark
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TERN="${TERN:-$ROOT/target/release/tern}"
LAB=tern-demo

say() { printf '\n== %s\n' "$*"; }
die() { printf 'demo FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it creates network namespaces)"
[ -x "$TERN" ] || die "$TERN not found: build it first (make build)"

lab() { "$TERN" lab --name "$LAB" "$@"; }
cleanup() { lab down >/dev/null 2>&1 || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM

say "tern lab up: 3 nodes on 2 subnets, routing auto, 2 pods per node, eBPF dataplane"
lab up --nodes 3 --subnets 2 --routing auto --pods-per-node 2 --dataplane ebpf

say "routes the agents made on n1 (proto 84): n2 is on n1's subnet (direct), n3 is behind the router (vxlan)"
lab exec n1 -- ip route show proto 84
lab exec n1 -- bridge fdb show dev tern.vxlan
say "the agent's eBPF host routing on n1: the uplink program at tc ingress of eth0 and tern.vxlan"
lab exec n1 -- tc filter show dev eth0 ingress
lab exec n1 -- tc filter show dev tern.vxlan ingress

say "tern lab test: the connectivity matrix"
lab test || die "the connectivity matrix has failures"

if [ "${TERN_DEMO_BENCH:-1}" != 0 ]; then
  say "tern bench datapath --quick: cross-node dataplanes against the underlay"
  "$TERN" bench datapath --quick --dataplanes underlay,direct,vxlan,direct-ebpf,vxlan-ebpf
fi

say "tern lab down"
lab down
left=$(ip netns list | awk '{print $1}' | grep -c "^$LAB" || true)
[ "$left" = 0 ] || die "$left namespaces of the lab are left"
printf '\ndemo OK\n'
