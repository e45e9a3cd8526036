//! Cross-node routing, as pure logic.
//!
//! Every node's agent sees the other nodes in the datastore (their underlay
//! address, their VXLAN tunnel endpoint, their pod blocks) and must make the
//! kernel route each remote block to its node. This crate decides *what*
//! the kernel should hold ([`plan`] → [`Desired`]) and *what to change*
//! ([`diff`] → [`Changes`]); the agent reads the kernel and applies the
//! changes through tern-sys.
//!
//! Per remote node, by [`Mode`]:
//! - **direct** (Flannel host-gw): `block via <peer underlay> dev <underlay>`.
//!   Only valid when the peer is on this node's layer-2 segment (its
//!   underlay address is inside this node's underlay subnet); otherwise the
//!   peer is reported as a [`PlanError`], never silently routed into a
//!   black hole.
//! - **vxlan** (Flannel vxlan): `block via <peer vtep ip> dev <vxlan> onlink`,
//!   a permanent neighbour `<peer vtep ip> lladdr <peer vtep mac> dev <vxlan>`,
//!   and an FDB entry `<peer vtep mac> dst <peer underlay> dev <vxlan>`:
//!   exactly what is needed with learning off, nothing flooded.
//! - **auto** (Calico CrossSubnet, Flannel DirectRouting): direct to peers
//!   on the same subnet, vxlan to the rest.
//!
//! Routes are owned by tern through their protocol number
//! ([`ROUTE_PROTOCOL`]); [`diff`] only removes entries of that protocol on
//! the devices tern manages, so the reconciler "adds what is missing,
//! removes what is stale, touches nothing else".
use std::collections::BTreeSet;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The `RTPROT_*` value of routes tern installs for remote blocks
/// (`ip route show proto 84`). Values above 4 are free for routing daemons;
/// 84 is unused by iproute2's table (BIRD is 12, Calico 80).
pub const ROUTE_PROTOCOL: u8 = 84;

/// Flannel's VXLAN UDP port (the Linux kernel's historic default), the
/// default here too.
pub const DEFAULT_VXLAN_PORT: u16 = 8472;
pub const DEFAULT_VNI: u32 = 1;

/// VXLAN's own overhead on an IPv4 underlay: outer IPv4 (20) + UDP (8) +
/// VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD_V4: u32 = 50;
/// The same over IPv6 (outer header 40).
pub const VXLAN_OVERHEAD_V6: u32 = 70;

/// How a cluster's nodes reach each other's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Vxlan,
    Direct,
    Auto,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Mode, String> {
        match s {
            "vxlan" => Ok(Mode::Vxlan),
            "direct" => Ok(Mode::Direct),
            "auto" => Ok(Mode::Auto),
            other => Err(format!("routing {other:?}: expected one of vxlan, direct, auto")),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Vxlan => "vxlan",
            Mode::Direct => "direct",
            Mode::Auto => "auto",
        })
    }
}

/// How pod packets between nodes cross a node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dataplane {
    /// The node's IP forwarding, netfilter and conntrack.
    #[default]
    Kernel,
    /// tern's eBPF host routing, for pods attached with `"dataplane": "ebpf"`.
    Ebpf,
}

impl std::str::FromStr for Dataplane {
    type Err = String;
    fn from_str(s: &str) -> Result<Dataplane, String> {
        match s {
            "kernel" => Ok(Dataplane::Kernel),
            "ebpf" => Ok(Dataplane::Ebpf),
            other => Err(format!("dataplane {other:?}: expected kernel or ebpf")),
        }
    }
}

impl std::fmt::Display for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dataplane::Kernel => "kernel",
            Dataplane::Ebpf => "ebpf",
        })
    }
}

/// The MTU of the VXLAN device (and of pods behind it) for an underlay MTU.
pub fn vxlan_mtu(underlay_mtu: u32, underlay_is_v6: bool) -> u32 {
    let overhead = if underlay_is_v6 { VXLAN_OVERHEAD_V6 } else { VXLAN_OVERHEAD_V4 };
    underlay_mtu.saturating_sub(overhead)
}

/// A node's tunnel endpoint: the VXLAN device's MAC and the addresses on it
/// (at most one per IP family) that remote nodes use as next hops. The
/// outer packets use the underlay's family whatever the inner one is, so
/// an IPv4 underlay carries IPv6 pods as long as the VTEP has an IPv6
/// address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vtep {
    pub mac: [u8; 6],
    pub ips: Vec<IpAddr>,
}

impl Vtep {
    fn ip_for(&self, dst: &IpNet) -> Option<IpAddr> {
        self.ips.iter().copied().find(|ip| ip.is_ipv4() == dst.addr().is_ipv4())
    }
}

/// What the planner needs to know of a node (this one or a peer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeView {
    pub name: String,
    /// The node's underlay address with its subnet's prefix (`192.168.1.11/24`).
    pub underlay: IpNet,
    /// `None` while the node has no VXLAN device (direct-only clusters).
    pub vtep: Option<Vtep>,
    /// Pod blocks the node owns.
    pub blocks: Vec<IpNet>,
}

impl NodeView {
    fn same_segment(&self, other: &NodeView) -> bool {
        self.underlay.trunc().contains(&other.underlay.addr())
    }
}

/// Which device a route leaves by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dev {
    /// The node's underlay interface.
    Underlay,
    /// tern's VXLAN device.
    Vxlan,
}

/// A route to a remote block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Route {
    pub dst: IpNet,
    pub via: IpAddr,
    pub dev: Dev,
    /// Set for VXLAN routes: the next hop is not on any subnet of the device.
    pub onlink: bool,
}

/// A permanent neighbour on the VXLAN device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Neighbour {
    pub ip: IpAddr,
    pub mac: [u8; 6],
}

/// An FDB entry on the VXLAN device: frames for `mac` go to `dst` over UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fdb {
    pub mac: [u8; 6],
    pub dst: IpAddr,
}

/// Kernel state tern owns for cross-node routing: what should be there
/// ([`plan`]) or what is there (read by the agent, only tern's entries).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    pub routes: BTreeSet<Route>,
    pub neighbours: BTreeSet<Neighbour>,
    pub fdb: BTreeSet<Fdb>,
}

pub type Actual = Desired;

impl Desired {
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty() && self.neighbours.is_empty() && self.fdb.is_empty()
    }

    /// Whether any entry uses the VXLAN device (so the node needs one).
    pub fn uses_vxlan(&self) -> bool {
        !self.neighbours.is_empty() || !self.fdb.is_empty() || self.routes.iter().any(|r| r.dev == Dev::Vxlan)
    }
}

/// How one peer is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerPath {
    Direct,
    Vxlan,
}

/// A peer the plan could not route, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(
        "node {peer} ({underlay}) is not on this node's subnet {subnet}: direct routing needs one layer-2 segment; use routing auto or vxlan"
    )]
    NotOnSegment { peer: String, underlay: IpAddr, subnet: IpNet },
    #[error("node {peer} has no VXLAN tunnel endpoint yet (its agent has not published one)")]
    NoVtep { peer: String },
    #[error("this node has no VXLAN tunnel endpoint, needed to reach node {peer}")]
    NoLocalVtep { peer: String },
    #[error("node {peer} owns block {block}, which overlaps this node's block {ours}")]
    Overlap { peer: String, block: IpNet, ours: IpNet },
    #[error("node {peer}'s underlay address {underlay} is of another IP family than this node's")]
    FamilyMismatch { peer: String, underlay: IpAddr },
    #[error("node {peer}'s block {block} cannot be routed {how}")]
    BlockFamily { peer: String, block: IpNet, how: &'static str },
}

/// [`plan`]'s answer: the entries, each peer's path, and the peers that
/// could not be routed (their blocks get no route rather than a wrong one).
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub desired: Desired,
    pub paths: Vec<(String, PeerPath)>,
    pub errors: Vec<PlanError>,
}

/// The entries `local` needs to reach every block of `peers` in `mode`.
///
/// Peers with the local node's name are skipped (a node never routes to
/// itself), and so are blocks that overlap one of the local node's: that is
/// a datastore inconsistency the IPAM must fix, and a route would steal the
/// node's own pods' traffic.
pub fn plan(local: &NodeView, peers: &[NodeView], mode: Mode) -> Plan {
    let mut out = Plan::default();
    let mut peers: Vec<&NodeView> = peers.iter().filter(|p| p.name != local.name).collect();
    peers.sort_by(|a, b| a.name.cmp(&b.name));
    for peer in peers {
        if peer.underlay.addr().is_ipv4() != local.underlay.addr().is_ipv4() {
            out.errors.push(PlanError::FamilyMismatch { peer: peer.name.clone(), underlay: peer.underlay.addr() });
            continue;
        }
        let same = local.same_segment(peer);
        let path = match mode {
            Mode::Direct if !same => {
                out.errors.push(PlanError::NotOnSegment {
                    peer: peer.name.clone(),
                    underlay: peer.underlay.addr(),
                    subnet: local.underlay.trunc(),
                });
                continue;
            }
            Mode::Direct => PeerPath::Direct,
            Mode::Auto if same => PeerPath::Direct,
            Mode::Auto | Mode::Vxlan => PeerPath::Vxlan,
        };
        let vtep = match path {
            PeerPath::Direct => None,
            PeerPath::Vxlan => {
                if local.vtep.is_none() {
                    out.errors.push(PlanError::NoLocalVtep { peer: peer.name.clone() });
                    continue;
                }
                let Some(v) = &peer.vtep else {
                    out.errors.push(PlanError::NoVtep { peer: peer.name.clone() });
                    continue;
                };
                Some(v)
            }
        };
        for block in &peer.blocks {
            if let Some(ours) = local.blocks.iter().find(|b| overlaps(b, block)) {
                out.errors.push(PlanError::Overlap { peer: peer.name.clone(), block: *block, ours: *ours });
                continue;
            }
            let route = match vtep {
                None if block.addr().is_ipv4() != peer.underlay.addr().is_ipv4() => {
                    out.errors.push(PlanError::BlockFamily {
                        peer: peer.name.clone(),
                        block: *block,
                        how: "directly: the underlay is of the other IP family (use vxlan for it)",
                    });
                    continue;
                }
                None => Route { dst: block.trunc(), via: peer.underlay.addr(), dev: Dev::Underlay, onlink: false },
                Some(v) => match v.ip_for(block) {
                    Some(via) => Route { dst: block.trunc(), via, dev: Dev::Vxlan, onlink: true },
                    None => {
                        out.errors.push(PlanError::BlockFamily {
                            peer: peer.name.clone(),
                            block: *block,
                            how: "over VXLAN: the node's tunnel endpoint has no address of its family",
                        });
                        continue;
                    }
                },
            };
            out.desired.routes.insert(route);
        }
        if let Some(v) = vtep {
            // The neighbours and the FDB entry are needed even before the
            // peer owns a block: its VTEP addresses answer node probes.
            for ip in &v.ips {
                out.desired.neighbours.insert(Neighbour { ip: *ip, mac: v.mac });
            }
            out.desired.fdb.insert(Fdb { mac: v.mac, dst: peer.underlay.addr() });
        }
        out.paths.push((peer.name.clone(), path));
    }
    out
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// What to add and what to remove to turn `actual` into `desired`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    pub add: Desired,
    pub remove: Desired,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

/// The changes that make `actual` equal `desired`. A route whose
/// destination is wanted with another next hop is removed and added (the
/// agent may apply that as one replace). Apply removals of routes before
/// neighbours and FDB entries, and additions in the opposite order, so no
/// route ever points at a next hop the kernel cannot resolve.
pub fn diff(desired: &Desired, actual: &Actual) -> Changes {
    Changes {
        add: Desired {
            routes: desired.routes.difference(&actual.routes).copied().collect(),
            neighbours: desired.neighbours.difference(&actual.neighbours).copied().collect(),
            fdb: desired.fdb.difference(&actual.fdb).copied().collect(),
        },
        remove: Desired {
            routes: actual.routes.difference(&desired.routes).copied().collect(),
            neighbours: actual.neighbours.difference(&desired.neighbours).copied().collect(),
            fdb: actual.fdb.difference(&desired.fdb).copied().collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn node(name: &str, underlay: &str, n: u8, blocks: &[&str]) -> NodeView {
        NodeView {
            name: name.into(),
            underlay: net(underlay),
            vtep: Some(Vtep {
                mac: [0x02, 0x74, 0x6e, 0, 0, n],
                ips: vec![ip(&format!("10.244.{n}.0")), ip(&format!("fd00:244:{n}::"))],
            }),
            blocks: blocks.iter().map(|b| net(b)).collect(),
        }
    }

    fn cluster() -> (NodeView, Vec<NodeView>) {
        let local = node("a", "192.168.1.11/24", 1, &["10.244.1.0/26"]);
        let peers = vec![
            local.clone(),
            node("b", "192.168.1.12/24", 2, &["10.244.2.0/26", "10.244.2.64/26"]),
            node("c", "192.168.2.13/24", 3, &["10.244.3.0/26"]),
        ];
        (local, peers)
    }

    #[test]
    fn vxlan_gives_route_neighbour_and_fdb_per_peer() {
        let (local, peers) = cluster();
        let p = plan(&local, &peers, Mode::Vxlan);
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert_eq!(p.desired.routes.len(), 3);
        assert!(p.desired.routes.contains(&Route {
            dst: net("10.244.2.64/26"),
            via: ip("10.244.2.0"),
            dev: Dev::Vxlan,
            onlink: true
        }));
        assert_eq!(
            p.desired.fdb.iter().map(|f| f.dst).collect::<Vec<_>>(),
            vec![ip("192.168.1.12"), ip("192.168.2.13")]
        );
        assert_eq!(p.desired.neighbours.len(), 4);
        assert_eq!(p.paths, vec![("b".into(), PeerPath::Vxlan), ("c".into(), PeerPath::Vxlan)]);
    }

    #[test]
    fn direct_refuses_peers_off_the_segment() {
        let (local, peers) = cluster();
        let p = plan(&local, &peers, Mode::Direct);
        assert_eq!(p.desired.routes.len(), 2, "b's two blocks only");
        assert!(p.desired.routes.iter().all(|r| r.dev == Dev::Underlay && r.via == ip("192.168.1.12") && !r.onlink));
        assert!(!p.desired.uses_vxlan());
        assert_eq!(p.errors.len(), 1);
        let msg = p.errors[0].to_string();
        assert!(msg.contains("node c") && msg.contains("192.168.1.0/24") && msg.contains("auto"), "{msg}");
    }

    #[test]
    fn auto_is_direct_on_the_segment_and_vxlan_across() {
        let (local, peers) = cluster();
        let p = plan(&local, &peers, Mode::Auto);
        assert!(p.errors.is_empty());
        assert_eq!(p.paths, vec![("b".into(), PeerPath::Direct), ("c".into(), PeerPath::Vxlan)]);
        let vx: Vec<_> = p.desired.routes.iter().filter(|r| r.dev == Dev::Vxlan).collect();
        assert_eq!(vx.len(), 1);
        assert_eq!(vx[0].dst, net("10.244.3.0/26"));
        assert_eq!(p.desired.fdb.len(), 1, "no FDB entry for a direct peer");
    }

    #[test]
    fn missing_vtep_and_overlap_are_reported_not_routed() {
        let (local, mut peers) = cluster();
        peers[2].vtep = None;
        peers[1].blocks.push(net("10.244.1.0/27"));
        let p = plan(&local, &peers, Mode::Vxlan);
        assert_eq!(p.errors.len(), 2, "{:?}", p.errors);
        assert!(p.desired.routes.iter().all(|r| r.dst != net("10.244.1.0/27") && r.dst != net("10.244.3.0/26")));
        let mut no_local = local.clone();
        no_local.vtep = None;
        let p = plan(&no_local, &peers, Mode::Auto);
        assert!(p.errors.iter().any(|e| matches!(e, PlanError::NoLocalVtep { .. })));
        assert!(p.desired.routes.iter().any(|r| r.dev == Dev::Underlay), "direct peers still routed");
    }

    #[test]
    fn diff_adds_missing_removes_stale_and_is_empty_when_converged() {
        let (local, peers) = cluster();
        let want = plan(&local, &peers, Mode::Vxlan).desired;
        let ch = diff(&want, &Desired::default());
        assert_eq!(ch.add, want);
        assert!(ch.remove.is_empty());
        assert!(diff(&want, &want).is_empty());
        // Node c leaves: exactly its route, neighbour and FDB entry go.
        let gone = plan(&local, &peers[..2], Mode::Vxlan).desired;
        let ch = diff(&gone, &want);
        assert!(ch.add.is_empty());
        assert_eq!(ch.remove.routes.len(), 1);
        assert_eq!(ch.remove.neighbours.len(), 2);
        assert_eq!(ch.remove.fdb.len(), 1);
        // Switching b from vxlan to direct replaces its routes.
        let auto = plan(&local, &peers, Mode::Auto).desired;
        let ch = diff(&auto, &want);
        assert_eq!(ch.add.routes.len(), 2);
        assert_eq!(ch.remove.routes.len(), 2);
    }

    #[test]
    fn mtu_and_mode_parsing() {
        assert_eq!(vxlan_mtu(1500, false), 1450);
        assert_eq!(vxlan_mtu(9000, true), 8930);
        assert_eq!(vxlan_mtu(20, false), 0);
        assert_eq!("auto".parse::<Mode>(), Ok(Mode::Auto));
        assert!("host-gw".parse::<Mode>().unwrap_err().contains("vxlan, direct, auto"));
        let m: Mode = serde_json::from_str("\"direct\"").unwrap();
        assert_eq!(m.to_string(), "direct");
    }

    #[test]
    fn ipv6_blocks_over_an_ipv4_underlay() {
        let (local, mut peers) = cluster();
        peers[1].blocks.push(net("fd00:244:2::/122"));
        let p = plan(&local, &peers, Mode::Vxlan);
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        assert!(p.desired.routes.contains(&Route {
            dst: net("fd00:244:2::/122"),
            via: ip("fd00:244:2::"),
            dev: Dev::Vxlan,
            onlink: true
        }));
        assert_eq!(p.desired.neighbours.len(), 4, "two addresses per peer VTEP");
        // Directly, an IPv6 block cannot go via an IPv4 next hop.
        let p = plan(&local, &peers, Mode::Auto);
        assert!(p.errors.iter().any(|e| matches!(e, PlanError::BlockFamily { .. })), "{:?}", p.errors);
        assert!(p.desired.routes.iter().all(|r| r.dst != net("fd00:244:2::/122")));
        // A VTEP without an IPv6 address cannot carry it either.
        peers[1].vtep.as_mut().unwrap().ips.truncate(1);
        let p = plan(&local, &peers, Mode::Vxlan);
        assert!(p.errors.iter().any(|e| e.to_string().contains("tunnel endpoint has no address")));
    }
}
