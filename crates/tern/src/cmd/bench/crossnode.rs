//! Cross-node dataplanes: a two-node lab (tern-lab: real etcd, real agents,
//! pods attached by `tern cni`) per routing mode, the client pod on node 1
//! and the server pod on node 2; and `underlay`, the two nodes themselves
//! over the lab's underlay segment: the limit the others are compared with.
use anyhow::{anyhow, Context, Result};
use tern_lab::spec::LabSpec;
use tern_lab::state::LabState;
use tern_routing::{Dataplane as Forwarding, Mode};
use tern_sys::netns::NetNs;

use super::dataplanes::{Dataplane, Pair};
use super::Workspace;

/// The dataplanes built here: their ratios are taken against the underlay.
pub fn is_cross_node(name: &str) -> bool {
    matches!(name, super::dataplanes::UNDERLAY | "direct" | "vxlan" | "direct-ebpf" | "vxlan-ebpf")
}

fn open(st: &LabState, netns: &str) -> Result<NetNs> {
    NetNs::open(format!("/run/netns/{netns}")).with_context(|| format!("lab {}: netns {netns}", st.lab.name))
}

/// A two-node lab with one pod per node, named after the dataplane.
fn lab(dp: &Dataplane, ws: &Workspace, routing: Mode, dataplane: Forwarding) -> Result<LabState> {
    // Lab names are short (every namespace name derives from one).
    let mut label: String = dp.name.chars().filter(|c| c.is_ascii_alphanumeric()).take(4).collect();
    if dataplane == Forwarding::Ebpf {
        label.push('e');
    }
    ws.lab(&label, LabSpec { nodes: 2, subnets: 1, pods_per_node: 1, routing, dataplane, ipv6: false })
}

fn pod_pair(dp: &Dataplane, ws: &Workspace, routing: Mode, dataplane: Forwarding) -> Result<Pair> {
    let st = lab(dp, ws, routing, dataplane)?;
    let pod = |node: &str| {
        st.pods.iter().find(|p| p.node == node).ok_or_else(|| anyhow!("lab {}: no pod on {node}", st.lab.name))
    };
    let (c, s) = (pod("n1")?, pod("n2")?);
    let server_ip = *s.ips.iter().find(|ip| ip.is_ipv4()).ok_or_else(|| anyhow!("pod {} has no IPv4", s.name))?;
    Ok(Pair { client: open(&st, &c.netns)?, server: open(&st, &s.netns)?, server_ip })
}

/// `vxlan`: pod on node 1 to pod on node 2 through tern's VXLAN overlay.
pub fn vxlan_pair(dp: &Dataplane, ws: &Workspace) -> Result<Pair> {
    pod_pair(dp, ws, Mode::Vxlan, Forwarding::Kernel)
}

/// `direct`: the same over direct routes (host-gw).
pub fn direct_pair(dp: &Dataplane, ws: &Workspace) -> Result<Pair> {
    pod_pair(dp, ws, Mode::Direct, Forwarding::Kernel)
}

/// `vxlan-ebpf`: `vxlan` with pods on the eBPF fast path and eBPF host routing.
pub fn vxlan_ebpf_pair(dp: &Dataplane, ws: &Workspace) -> Result<Pair> {
    pod_pair(dp, ws, Mode::Vxlan, Forwarding::Ebpf)
}

/// `direct-ebpf`: `direct` with pods on the eBPF fast path and eBPF host routing.
pub fn direct_ebpf_pair(dp: &Dataplane, ws: &Workspace) -> Result<Pair> {
    pod_pair(dp, ws, Mode::Direct, Forwarding::Ebpf)
}

/// `underlay`: node 1 to node 2 over their shared segment (no pods).
pub fn underlay_pair(dp: &Dataplane, ws: &Workspace) -> Result<Pair> {
    let st = lab(dp, ws, Mode::Direct, Forwarding::Kernel)?;
    let node = |i: usize| st.nodes.get(i).ok_or_else(|| anyhow!("lab {}: missing node", st.lab.name));
    let (c, s) = (node(0)?, node(1)?);
    Ok(Pair { client: open(&st, &c.netns)?, server: open(&st, &s.netns)?, server_ip: s.ip.into() })
}
