//! The one table of dataplanes both benches compare.
//!
//! A dataplane is a way to connect pods. Each entry says how to build a pair
//! of pods on it (for `tern bench datapath`) and, when a CNI plugin does the
//! connecting, which plugin and config (for `tern bench cni`, which times
//! that plugin's ADD and DEL). The harnesses only iterate over
//! [`registry`]: a later dataplane (cross-node VXLAN or direct routing once
//! the lab exists, policy with N rules once policy exists) is one more entry
//! here, with its own `pair` function if a plugin config is not enough, and
//! appears in every table, JSON and chart without changes elsewhere.
use std::net::IpAddr;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
use tern_sys::netns::NetNs;
use tern_sys::Netlink;

use super::{Invocation, Workspace};

/// The physical limit every `datapath` ratio is taken against.
pub const NATIVE: &str = "native";
/// The peer every ratio is also taken against.
pub const REFERENCE: &str = "ref-bridge";
/// The limit of the cross-node dataplanes (node to node, no pods).
pub const UNDERLAY: &str = "underlay";

pub struct Dataplane {
    pub name: &'static str,
    /// What is configured, for the legends.
    pub summary: &'static str,
    /// Set when a CNI plugin connects the pods: `bench cni` times it, and
    /// [`cni_pair`] uses it to attach a pair.
    pub cni: Option<CniPlugin>,
    /// Builds a client pod and a server pod that can reach each other.
    /// Everything it creates must live in the workspace (namespaces from
    /// [`Workspace::netns`], files under [`Workspace::data`]), which removes
    /// it at the end.
    pub pair: fn(&Dataplane, &Workspace) -> Result<Pair>,
}

pub struct CniPlugin {
    /// The executable's name: in the tern plugin directory, or in
    /// [`super::REFERENCE_DIR`] when `reference`.
    pub plugin: &'static str,
    pub reference: bool,
    /// The network configuration, given a private IPAM data directory.
    pub conf: fn(&Path) -> Value,
}

/// Two pods of one dataplane: the client connects to `server_ip`.
pub struct Pair {
    pub client: NetNs,
    pub server: NetNs,
    pub server_ip: IpAddr,
}

/// Every dataplane, in table order.
pub fn registry() -> Vec<Dataplane> {
    vec![
        Dataplane {
            name: NATIVE,
            summary: "a bare veth pair between the two pods' namespaces, addresses on both ends: the limit",
            cni: None,
            pair: veth_pair,
        },
        Dataplane {
            name: "tern-bridge",
            summary: "type tern, mode bridge, isGateway, tern-ipam (host-local range)",
            cni: Some(CniPlugin {
                plugin: "tern",
                reference: false,
                conf: |data| {
                    json!({
                        "cniVersion": "1.0.0",
                        "name": "bench-tern-bridge",
                        "type": "tern",
                        "mode": "bridge",
                        "bridge": "tbench0",
                        "isGateway": true,
                        "ipMasq": false,
                        "ipam": {"type": "tern-ipam", "ranges": [[{"subnet": "10.251.1.0/24"}]], "dataDir": data},
                    })
                },
            }),
            pair: cni_pair,
        },
        Dataplane {
            name: "tern-routed",
            summary: "type tern, mode routed, tern-ipam (host-local range)",
            cni: Some(CniPlugin {
                plugin: "tern",
                reference: false,
                conf: |data| {
                    json!({
                        "cniVersion": "1.0.0",
                        "name": "bench-tern-routed",
                        "type": "tern",
                        "mode": "routed",
                        "ipMasq": false,
                        "ipam": {"type": "tern-ipam", "ranges": [[{"subnet": "10.251.2.0/24"}]], "dataDir": data},
                    })
                },
            }),
            pair: cni_pair,
        },
        Dataplane {
            name: "tern-bridge-ebpf",
            summary: "tern-bridge with dataplane ebpf: tc fast path, bpf_redirect_peer between local pods",
            cni: Some(CniPlugin {
                plugin: "tern",
                reference: false,
                conf: |data| {
                    json!({
                        "cniVersion": "1.0.0",
                        "name": "bench-tern-bridge-ebpf",
                        "type": "tern",
                        "mode": "bridge",
                        "bridge": "ebench0",
                        "isGateway": true,
                        "ipMasq": false,
                        "dataplane": "ebpf",
                        "ipam": {"type": "tern-ipam", "ranges": [[{"subnet": "10.251.4.0/24"}]], "dataDir": data},
                    })
                },
            }),
            pair: ebpf_pair,
        },
        Dataplane {
            name: "tern-routed-ebpf",
            summary: "tern-routed with dataplane ebpf: tc fast path, bpf_redirect_peer between local pods",
            cni: Some(CniPlugin {
                plugin: "tern",
                reference: false,
                conf: |data| {
                    json!({
                        "cniVersion": "1.0.0",
                        "name": "bench-tern-routed-ebpf",
                        "type": "tern",
                        "mode": "routed",
                        "ipMasq": false,
                        "dataplane": "ebpf",
                        "ipam": {"type": "tern-ipam", "ranges": [[{"subnet": "10.251.5.0/24"}]], "dataDir": data},
                    })
                },
            }),
            pair: ebpf_pair,
        },
        Dataplane {
            name: REFERENCE,
            summary: "reference bridge + host-local (/usr/lib/cni), isGateway",
            cni: Some(CniPlugin {
                plugin: "bridge",
                reference: true,
                conf: |data| {
                    json!({
                        "cniVersion": "1.0.0",
                        "name": "bench-ref-bridge",
                        "type": "bridge",
                        "bridge": "rbench0",
                        "isGateway": true,
                        "ipMasq": false,
                        "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.251.3.0/24"}]], "dataDir": data},
                    })
                },
            }),
            pair: cni_pair,
        },
        // Cross-node: two-node labs (tern-lab); compare these with `underlay`.
        Dataplane {
            name: UNDERLAY,
            summary: "node to node over the lab's underlay segment (no pods): the limit of the cross-node dataplanes",
            cni: None,
            pair: super::crossnode::underlay_pair,
        },
        Dataplane {
            name: "direct",
            summary: "pod to pod on two lab nodes, tern agent routing direct (host-gw), routed pods, cluster IPAM",
            cni: None,
            pair: super::crossnode::direct_pair,
        },
        Dataplane {
            name: "vxlan",
            summary: "pod to pod on two lab nodes, tern agent routing vxlan (port 8472, learning off), routed pods",
            cni: None,
            pair: super::crossnode::vxlan_pair,
        },
        Dataplane {
            name: "direct-ebpf",
            summary: "direct with dataplane ebpf: pods on the fast path, eBPF host routing (bpf_fib_lookup + \
                      bpf_redirect out, bpf_redirect_peer in)",
            cni: None,
            pair: super::crossnode::direct_ebpf_pair,
        },
        Dataplane {
            name: "vxlan-ebpf",
            summary: "vxlan with dataplane ebpf: pods on the fast path, eBPF host routing through tern.vxlan",
            cni: None,
            pair: super::crossnode::vxlan_ebpf_pair,
        },
    ]
}

/// `native`: two namespaces joined by one veth pair, 10.251.0.1/24 and
/// 10.251.0.2/24, default MTU and offloads. No node, no bridge, no routing:
/// the shortest path two namespaces can have.
fn veth_pair(dp: &Dataplane, ws: &Workspace) -> Result<Pair> {
    let client = ws.netns(&format!("{}-client", dp.name))?;
    let server = ws.netns(&format!("{}-server", dp.name))?;
    let cnl = Netlink::in_netns(&client).context("netlink in the client netns")?;
    cnl.create_veth("eth0", "eth0", &server, None, None, None).context("creating the native veth pair")?;
    let addr = |nl: &Netlink, a: &str| -> Result<()> {
        for name in ["lo", "eth0"] {
            let link = nl.link(name)?.ok_or_else(|| anyhow!("{name} vanished"))?;
            nl.set_up(link.index)?;
            if name == "eth0" {
                nl.add_address(link.index, a.parse().expect("cidr"), true)?;
            }
        }
        Ok(())
    };
    addr(&cnl, "10.251.0.1/24").context("configuring the native client end")?;
    let snl = Netlink::in_netns(&server).context("netlink in the server netns")?;
    addr(&snl, "10.251.0.2/24").context("configuring the native server end")?;
    Ok(Pair { client, server, server_ip: "10.251.0.2".parse().expect("ip") })
}

/// The node's own address, on its `lo` (a real node has one; see [`node`]).
const NODE_IP: &str = "10.250.255.1/32";

/// A throwaway node namespace: `lo` up with the node's own IPv4 address,
/// as a real node has. Without any IPv4 address a namespace has no local
/// routing table, so the kernel takes every neighbour for a broadcast
/// address (`NOARP`, `ff:ff:ff:ff:ff:ff`); a node then sends routed pods
/// broadcast frames, which their TCP drops.
pub fn node(dp: &Dataplane, ws: &Workspace) -> Result<NetNs> {
    let node = ws.netns(&format!("{}-node", dp.name))?;
    let nl = Netlink::in_netns(&node).context("netlink in the node netns")?;
    let lo = nl.link("lo")?.ok_or_else(|| anyhow!("the node netns has no lo"))?;
    nl.set_up(lo.index).context("bringing the node's lo up")?;
    nl.add_address(lo.index, NODE_IP.parse().expect("cidr"), true).context("adding the node's address")?;
    Ok(node)
}

/// Two pods attached by the dataplane's CNI plugin, run (as a runtime
/// would) in a throwaway [`node`] namespace: ADD for a client pod, then for
/// a server pod. Never deleted: removing the namespaces at the end takes
/// everything with them.
pub fn cni_pair(dp: &Dataplane, ws: &Workspace) -> Result<Pair> {
    let node = node(dp, ws)?;
    cni_pair_in(dp, ws, &node)
}

/// [`cni_pair`] in a given node namespace.
fn cni_pair_in(dp: &Dataplane, ws: &Workspace, node: &NetNs) -> Result<Pair> {
    let cni = dp.cni.as_ref().ok_or_else(|| anyhow!("{} has no CNI plugin", dp.name))?;
    let conf = (cni.conf)(&ws.data(dp.name)).to_string();
    let mut pods = Vec::new();
    for role in ["client", "server"] {
        let pod = ws.netns(&format!("{}-{role}", dp.name))?;
        let container_id = format!("tern-bench-{}-{role}", dp.name);
        let out = ws.invoke(&Invocation {
            dataplane: dp.name,
            plugin: cni,
            command: "ADD",
            container_id: &container_id,
            node,
            pod: &pod,
            conf: &conf,
        })?;
        let result: Value = serde_json::from_str(&out.stdout)
            .with_context(|| format!("{}: ADD {container_id} printed no JSON:\n{}", dp.name, out.stdout))?;
        let ip = result["ips"]
            .as_array()
            .and_then(|ips| ips.first())
            .and_then(|ip| ip["address"].as_str())
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse::<IpAddr>().ok())
            .ok_or_else(|| anyhow!("{}: ADD {container_id} gave no address:\n{}", dp.name, out.stdout))?;
        pods.push((pod, ip));
    }
    let (server, server_ip) = pods.pop().expect("two pods");
    let (client, _) = pods.pop().expect("two pods");
    Ok(Pair { client, server, server_ip })
}

/// [`cni_pair`] for the eBPF dataplanes, then the node's bpffs pins are
/// removed: the pods' tc filters hold the program and its map from now on,
/// and go with the namespaces the workspace removes, so a bench run leaves
/// nothing in /sys/fs/bpf (its pods are never deleted, see [`cni_pair`]).
pub fn ebpf_pair(dp: &Dataplane, ws: &Workspace) -> Result<Pair> {
    let node = node(dp, ws)?;
    let pair = cni_pair_in(dp, ws, &node)?;
    node.enter(tern_bpf::unpin_current_netns)?.context("removing the node's eBPF fast path pins")?;
    Ok(pair)
}
