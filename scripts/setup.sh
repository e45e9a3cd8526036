#!/usr/bin/env bash
# Installs what tern's build, demo and tests need on Debian 12, idempotently.
# Fast no-op when everything is present: `apt-get update` runs only when a
# package is missing, and then once.
set -euo pipefail

# Debian packages, and what needs them.
PACKAGES=(
  iproute2                     # ip: namespaces, links, addresses (tests, demo)
  nftables                     # nft: the plugins' masquerade/spoof rules, leak checks
  containernetworking-plugins  # /usr/lib/cni: reference bridge/host-local (compat tests, bench)
  iputils-ping                 # ping in tests
  busybox-static               # busybox nc: the demo's TCP checks
  procps                       # ps/sysctl
  podman                       # a real CNI runtime in the tests (CNI backend)
  runc                         # podman's OCI runtime here (crun refuses mixed cgroups)
  iperf3                       # throughput in tern bench datapath (latency and connection rate are tern's own client/server)
  etcd-server                  # /usr/bin/etcd: the cluster datastore in the store/IPAM tests (started per test, loopback)
  protobuf-compiler            # protoc: etcd-client's build script compiles etcd's protobufs
  libprotobuf-dev              # google/protobuf/*.proto, which etcd's protobufs import (a Recommends we skip)
  clang                        # compiles the eBPF fast path (bpf/tern_fastpath.c) in crates/bpf's build script
  libbpf-dev                   # bpf/bpf_helpers.h and friends for that C program (headers only; nothing links libbpf)
)
# A C linker for cargo.
command -v cc >/dev/null 2>&1 || PACKAGES+=(gcc libc6-dev)

installed() {
  [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

missing=()
for p in "${PACKAGES[@]}"; do
  installed "$p" || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing Debian packages: ${missing[*]}; run as root (sudo make setup)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Rust: the toolchain comes from rustup (Debian's cargo is too old for this workspace).
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null 2>&1; then
  cat >&2 <<'MSG'
setup: cargo not found. Install the Rust toolchain with rustup
(https://rustup.rs), e.g.:
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y
then open a new shell (or `. "$HOME/.cargo/env"`) and re-run.
MSG
  exit 1
fi
