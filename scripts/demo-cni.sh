#!/usr/bin/env bash
# tern single-node demo (make demo-cni): three pods on one bridge network, inside a throwaway "node"
# network namespace; ADD, addresses, pod-to-pod and pod-to-node TCP, DEL, and
# proof that nothing is left. Run by `make demo` (which builds first), as root.
#
# The pods are attached the way a container runtime does it, through
# `tern cni add|del` (tern's libcni equivalent) with a private config dir,
# result cache and CNI path.
#
# Nothing here touches the host's own network: the plugin runs inside the node
# namespace, and all traffic stays between namespaces this script creates.
#
# Knobs (for development):
#   TERN=path                  the tern executable (default target/release/tern)
#   TERN_DEMO_REFERENCE=1      run the same demo with Debian's reference
#                              bridge + host-local plugins instead of tern
#                              (still driven by `tern cni`)
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TERN="${TERN:-$ROOT/target/release/tern}"
REFERENCE="${TERN_DEMO_REFERENCE:-0}"

say() { printf '%s\n' "$*"; }
die() { printf 'demo FAILED: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it creates network namespaces)"

NODE="tern-demo-node-$$"
PODS=("tern-demo-pod1-$$" "tern-demo-pod2-$$" "tern-demo-pod3-$$")
WORK="$(mktemp -d /tmp/tern-demo.XXXXXX)"
BIN="$WORK/bin"
DATA="$WORK/ipam"
CONF_DIR="$WORK/net.d"
CACHE="$WORK/cache"
SERVER_PIDS=()

cleanup() {
  local pid ns
  for pid in "${SERVER_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for ns in "${PODS[@]}" "$NODE"; do
    if [ -e "/run/netns/$ns" ]; then ip netns del "$ns" 2>/dev/null || true; fi
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- the plugins -------------------------------------------------------------
[ -x "$TERN" ] || die "$TERN not found: build it first (make build)"
if [ "$REFERENCE" = 1 ]; then
  BIN=/usr/lib/cni PLUGIN=bridge IPAM=host-local
  say "using the reference plugins from $BIN (TERN_DEMO_REFERENCE=1)"
else
  PLUGIN=tern IPAM=tern-ipam
  "$TERN" install --cni-bin-dir "$BIN" >/dev/null
  say "installed tern into a private CNI bin dir: $(cd "$BIN" && echo *)"
fi

mkdir -p "$CONF_DIR"
cat >"$CONF_DIR/10-demo.conflist" <<EOF
{
  "cniVersion": "1.0.0",
  "name": "demo",
  "plugins": [
    {
      "type": "$PLUGIN",
      "mode": "bridge",
      "bridge": "tern0",
      "isGateway": true,
      "ipMasq": false,
      "ipam": {
        "type": "$IPAM",
        "ranges": [[{"subnet": "10.88.0.0/24"}], [{"subnet": "fd88::/64"}]],
        "dataDir": "$DATA"
      }
    }
  ]
}
EOF

# Runs `tern cni` the way a container runtime runs its CNI library, inside
# the node namespace (where the plugins then run): network "demo" from the
# private config dir, plugins from $BIN, results cached under $CACHE.
#   tern_cni add|del POD
tern_cni() {
  local command=$1 pod=$2
  local args=(--net demo --conf-dir "$CONF_DIR" --cache-dir "$CACHE" --cni-path "$BIN" --id "$pod")
  if [ "$command" = add ]; then args+=(--netns "$pod"); fi
  ip netns exec "$NODE" "$TERN" cni "$command" "${args[@]}"
}

# Global addresses of eth0 in a pod, e.g. "10.88.0.2/24 fd88::2/64".
pod_addrs() {
  ip -n "$1" -o addr show dev eth0 scope global | awk '{printf "%s%s", sep, $4; sep=" "}'
}

# Waits (up to 5 s) until no IPv6 address in namespace $1 is tentative (DAD).
wait_dad() {
  local _
  for _ in $(seq 50); do
    [ -z "$(ip -n "$1" -6 addr show tentative)" ] && return 0
    sleep 0.1
  done
  return 1
}

# TCP from namespace $1 to $3:$4 served in namespace $2: busybox nc listens
# there, a client sends a token, and the server must have received it.
tcp_check() {
  local cns=$1 sns=$2 ip=$3 port=$4 token="tern-demo-$$-$RANDOM" got="$WORK/recv.$4" spid _
  ip netns exec "$sns" timeout 10 busybox nc -l -p "$port" >"$got" 2>/dev/null &
  spid=$!
  SERVER_PIDS+=("$spid")
  for _ in $(seq 50); do
    ip netns exec "$sns" ss -Hltn "sport = :$port" | grep -q LISTEN && break
    sleep 0.1
  done
  echo "$token" | ip netns exec "$cns" timeout 5 busybox nc -w 3 "$ip" "$port" >/dev/null 2>&1 || true
  wait "$spid" 2>/dev/null || true
  SERVER_PIDS=() # reaped: never signal that pid again
  grep -qx "$token" "$got"
}

# --- namespaces ----------------------------------------------------------------
ip netns add "$NODE"
ip -n "$NODE" link set lo up
for pod in "${PODS[@]}"; do
  ip netns add "$pod"
done
say "node netns $NODE, pod netns ${PODS[*]}"
say "network demo: bridge tern0, 10.88.0.0/24 + fd88::/64"

# --- ADD ----------------------------------------------------------------------
for pod in "${PODS[@]}"; do
  if ! out=$(tern_cni add "$pod"); then
    printf '%s\n' "$out" >&2
    die "tern cni add $pod"
  fi
  say "tern cni add $pod: eth0 $(pod_addrs "$pod")"
done
say "tern cni list:"
"$TERN" cni list --cache-dir "$CACHE" | sed 's/^/  /'

ip4() { pod_addrs "$1" | tr ' ' '\n' | grep -m1 '\.' | cut -d/ -f1; }
ip6() { pod_addrs "$1" | tr ' ' '\n' | grep -m1 ':' | cut -d/ -f1; }
NODE_IP4=$(ip -n "$NODE" -o -4 addr show dev tern0 scope global | awk '{print $4; exit}' | cut -d/ -f1)
[ -n "$NODE_IP4" ] || die "no gateway address on tern0 in the node netns"
for ns in "${PODS[@]}" "$NODE"; do wait_dad "$ns" || die "IPv6 addresses in $ns stay tentative"; done

# --- traffic -------------------------------------------------------------------
P1=${PODS[0]} P2=${PODS[1]} P3=${PODS[2]}
check() { # label client server ip port
  if tcp_check "$2" "$3" "$4" "$5"; then say "TCP $1 ok"; else die "TCP $1"; fi
}
check "pod1 -> pod2 $(ip4 "$P2"):7001" "$P1" "$P2" "$(ip4 "$P2")" 7001
check "pod1 -> pod2 [$(ip6 "$P2")]:7002" "$P1" "$P2" "$(ip6 "$P2")" 7002
check "pod3 -> node $NODE_IP4:7003" "$P3" "$NODE" "$NODE_IP4" 7003

# --- DEL ----------------------------------------------------------------------
for pod in "${PODS[@]}"; do
  if ! out=$(tern_cni del "$pod"); then
    printf '%s\n' "$out" >&2
    die "tern cni del $pod"
  fi
done
say "tern cni del: ${#PODS[@]} pods"

# --- nothing left --------------------------------------------------------------
veths=$(ip -n "$NODE" -o link show type veth | awk -F': ' '{print $2}' | cut -d@ -f1 | xargs)
tables=$(ip netns exec "$NODE" nft list tables | xargs)
reserved=$( (find "$DATA" -type f ! -name lock ! -name 'last_reserved_ip*' 2>/dev/null || true) | xargs)
cached=$( (find "$CACHE/results" -type f 2>/dev/null || true) | xargs)
say "left in the node netns: veth links: ${veths:-none}; nft tables: ${tables:-none}; IPAM reservations: ${reserved:-none}; cached results: ${cached:-none}"
[ -z "$veths$tables$reserved$cached" ] || die "DEL left something behind"

for ns in "${PODS[@]}" "$NODE"; do
  ip netns del "$ns"
done
[ -z "$(ip netns list | grep "tern-demo-.*-$$" || true)" ] || die "namespaces left behind"
say "namespaces deleted"

# --- a short benchmark -----------------------------------------------------------
if [ "$REFERENCE" = 1 ]; then
  say "benchmark: skipped (reference plugins)"
elif "$TERN" bench --help >/dev/null 2>&1; then
  say "benchmark (tern bench cni --quick):"
  "$TERN" bench cni --quick
else
  say "benchmark: skipped (this build has no \`tern bench\`)"
fi

say "demo OK"
