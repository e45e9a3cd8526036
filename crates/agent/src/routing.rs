//! Cross-node routing on this node's kernel: the VXLAN device, and the
//! routes, neighbours and FDB entries that [`tern_routing::plan`] asks for.
//!
//! [`Router::reconcile`] reads what tern owns in the kernel (routes of
//! protocol [`ROUTE_PROTOCOL`] in the main table, permanent neighbours and
//! FDB entries on tern's VXLAN device), diffs it with the plan and applies
//! only the difference: entries that are right are never touched, so a
//! restarted agent changes nothing while the cluster is unchanged and pod
//! traffic does not notice it. Nothing outside tern's protocol and device is
//! read for removal.
//!
//! The VXLAN device's MAC is derived from the node name, so it is the same
//! across agent restarts and re-creations and peers' FDB entries stay valid.
//!
//! With `dataplane: ebpf` the router also keeps tern's eBPF host routing
//! ([`tern_bpf`]) in step: the cluster's pools, the uplinks (the underlay
//! device and the VXLAN device) and the uplink program on their ingress.
//! Pods of the eBPF dataplane then reach other nodes' pods without the
//! node's forwarding and conntrack; the routes above still decide where
//! each packet goes (the program asks the node's FIB).
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
pub use tern_routing::Dataplane;
use tern_routing::{
    diff, plan, Actual, Changes, Dev, Fdb, Mode, Neighbour, NodeView, PeerPath, PlanError, Route, Vtep,
};
use tern_routing::{DEFAULT_VNI, DEFAULT_VXLAN_PORT, ROUTE_PROTOCOL};
use tern_store::Datastore;
use tern_sys::netlink::{Family, VxlanSpec};
use tern_sys::{LinkInfo, Mac, Netlink, RouteSpec, SysError};

/// tern's VXLAN device name.
pub const VXLAN_DEVICE: &str = "tern.vxlan";

/// Cross-node routing settings (the agent config file's `routing` section).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RoutingConfig {
    pub mode: Mode,
    /// The interface the node's underlay address is on.
    pub underlay_interface: String,
    #[serde(default = "default_vni")]
    pub vni: u32,
    #[serde(default = "default_port")]
    pub port: u16,
    /// MTU of the VXLAN device; default: the underlay's minus the
    /// encapsulation overhead.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Full resync with the kernel at least this often, whatever the watch says.
    #[serde(default = "default_resync", with = "seconds")]
    pub resync: Duration,
    /// `ebpf`: host routing for pods of the eBPF dataplane (see the module
    /// docs); `kernel` (default): the node's forwarding only.
    #[serde(default)]
    pub dataplane: Dataplane,
}

fn default_vni() -> u32 {
    DEFAULT_VNI
}
fn default_port() -> u16 {
    DEFAULT_VXLAN_PORT
}
fn default_resync() -> Duration {
    Duration::from_secs(30)
}

mod seconds {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

impl RoutingConfig {
    pub fn new(mode: Mode, underlay_interface: impl Into<String>) -> RoutingConfig {
        RoutingConfig {
            mode,
            underlay_interface: underlay_interface.into(),
            vni: DEFAULT_VNI,
            port: DEFAULT_VXLAN_PORT,
            mtu: None,
            resync: default_resync(),
            dataplane: Dataplane::Kernel,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RoutingError {
    #[error("{0}")]
    Sys(#[from] SysError),
    #[error("{0}")]
    Bpf(#[from] tern_bpf::Error),
    #[error("underlay interface {0:?} does not exist")]
    NoUnderlay(String),
    #[error("underlay interface {0:?} has no global address")]
    NoUnderlayAddress(String),
    #[error(
        "link {VXLAN_DEVICE:?} exists with other settings (vni {vni:?}, port {port:?}, local {local:?}); expected vni {want_vni}, port {want_port}, local {want_local}"
    )]
    VxlanMismatch {
        vni: Option<u32>,
        port: Option<u16>,
        local: Option<IpAddr>,
        want_vni: u32,
        want_port: u16,
        want_local: IpAddr,
    },
}

/// What one reconcile did.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReconcileReport {
    pub added: usize,
    pub removed: usize,
    /// Peers the plan could not route, and why.
    pub unroutable: Vec<String>,
    /// Entries the kernel refused (the next reconcile tries again).
    pub failed: Vec<String>,
    pub paths: Vec<(String, PeerPath)>,
}

/// The node's kernel side of cross-node routing.
pub struct Router {
    nl: Netlink,
    config: RoutingConfig,
    node: String,
    underlay: LinkInfo,
    underlay_addr: IpNet,
    vxlan: Option<LinkInfo>,
    /// The pools host routing serves (`dataplane: ebpf`), as (address,
    /// prefix length); empty until [`Router::enable_host_routing`].
    host_routing: Vec<(IpAddr, u8)>,
}

/// A locally administered unicast MAC from the node name (stable across
/// restarts, distinct per node with overwhelming probability).
pub fn vtep_mac(node: &str) -> Mac {
    // FNV-1a: stable across Rust versions, unlike DefaultHasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in node.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    [0x02, b[1], b[2], b[3], b[4], b[5]]
}

impl Router {
    /// Finds the underlay interface and its address (IPv4 preferred) in the
    /// current network namespace. Creates nothing yet.
    pub fn new(node: &str, config: RoutingConfig) -> Result<Router, RoutingError> {
        let nl = Netlink::new()?;
        let underlay = nl
            .link(&config.underlay_interface)?
            .ok_or_else(|| RoutingError::NoUnderlay(config.underlay_interface.clone()))?;
        let addrs = nl.addresses(Some(underlay.index))?;
        let global = |a: &IpNet| match a.addr() {
            IpAddr::V4(v) => !v.is_loopback() && !v.is_link_local(),
            IpAddr::V6(v) => !v.is_loopback() && (v.segments()[0] & 0xffc0) != 0xfe80,
        };
        let underlay_addr = addrs
            .iter()
            .map(|(_, a)| *a)
            .filter(global)
            .min_by_key(|a| a.addr().is_ipv6())
            .ok_or_else(|| RoutingError::NoUnderlayAddress(config.underlay_interface.clone()))?;
        let vxlan = nl.link(VXLAN_DEVICE)?;
        Ok(Router { nl, config, node: node.to_string(), underlay, underlay_addr, vxlan, host_routing: Vec::new() })
    }

    /// The node's underlay address with its subnet prefix.
    pub fn underlay(&self) -> IpNet {
        self.underlay_addr
    }

    pub fn mode(&self) -> Mode {
        self.config.mode
    }

    /// Whether this node needs a VXLAN device at all.
    pub fn wants_vxlan(&self) -> bool {
        self.config.mode != Mode::Direct
    }

    /// Creates the VXLAN device if missing (an existing one with the same
    /// settings is kept as it is), puts `tunnel_ips` on it as host
    /// addresses, brings it up, and returns the node's VTEP.
    pub fn ensure_vtep(&mut self, tunnel_ips: &[IpAddr]) -> Result<Vtep, RoutingError> {
        let mac = vtep_mac(&self.node);
        let want_local = self.underlay_addr.addr();
        let link = match self.nl.link(VXLAN_DEVICE)? {
            Some(l) => {
                let v = l.vxlan.clone();
                let ok = v.as_ref().is_some_and(|v| {
                    v.vni == Some(self.config.vni) && v.port == Some(self.config.port) && v.local == Some(want_local)
                });
                if !ok {
                    return Err(RoutingError::VxlanMismatch {
                        vni: v.as_ref().and_then(|v| v.vni),
                        port: v.as_ref().and_then(|v| v.port),
                        local: v.as_ref().and_then(|v| v.local),
                        want_vni: self.config.vni,
                        want_port: self.config.port,
                        want_local,
                    });
                }
                if l.mac != Some(mac) {
                    self.nl.set_mac(l.index, mac)?;
                }
                l
            }
            None => {
                let mtu =
                    self.config.mtu.unwrap_or_else(|| tern_routing::vxlan_mtu(self.underlay.mtu, want_local.is_ipv6()));
                self.nl.create_vxlan(&VxlanSpec {
                    name: VXLAN_DEVICE.into(),
                    vni: self.config.vni,
                    port: self.config.port,
                    local: want_local,
                    underlay_index: Some(self.underlay.index),
                    mtu: Some(mtu),
                    mac: Some(mac),
                })?
            }
        };
        let have: BTreeSet<IpNet> = self.nl.addresses(Some(link.index))?.into_iter().map(|(_, a)| a).collect();
        for ip in tunnel_ips {
            let host = IpNet::new(*ip, if ip.is_ipv4() { 32 } else { 128 }).expect("host prefix");
            if !have.contains(&host) {
                self.nl.add_address(link.index, host, true)?;
            }
        }
        if !link.up {
            self.nl.set_up(link.index)?;
        }
        self.vxlan = self.nl.link(VXLAN_DEVICE)?;
        Ok(Vtep { mac, ips: tunnel_ips.to_vec() })
    }

    fn dev_of(&self, oif: Option<u32>) -> Option<Dev> {
        match oif {
            Some(i) if i == self.underlay.index => Some(Dev::Underlay),
            Some(i) if self.vxlan.as_ref().is_some_and(|v| v.index == i) => Some(Dev::Vxlan),
            _ => None,
        }
    }

    /// tern's entries in the kernel, and tern-protocol routes on devices
    /// tern no longer uses (always stale).
    fn actual(&self) -> Result<(Actual, Vec<RouteSpec>), RoutingError> {
        let mut actual = Actual::default();
        let mut strays = Vec::new();
        for fam in [Family::V4, Family::V6] {
            for r in self.nl.routes(fam)? {
                if r.proto != ROUTE_PROTOCOL {
                    continue;
                }
                match (self.dev_of(r.oif), r.gw) {
                    (Some(dev), Some(via)) => {
                        actual.routes.insert(Route { dst: r.dst, via, dev, onlink: dev == Dev::Vxlan });
                    }
                    _ => {
                        let mut s = RouteSpec::new(r.dst).with_protocol(ROUTE_PROTOCOL);
                        if let Some(gw) = r.gw {
                            s = s.via(gw);
                        }
                        if let Some(oif) = r.oif {
                            s = s.dev(oif);
                        }
                        strays.push(s);
                    }
                }
            }
        }
        if let Some(vx) = &self.vxlan {
            for n in self.nl.neighbours(Some(vx.index))? {
                if let (true, Some(mac)) = (n.permanent, n.mac) {
                    actual.neighbours.insert(Neighbour { ip: n.ip, mac });
                }
            }
            for f in self.nl.fdb(vx.index)? {
                if let (true, Some(dst)) = (f.permanent, f.dst) {
                    actual.fdb.insert(Fdb { mac: f.mac, dst });
                }
            }
        }
        Ok((actual, strays))
    }

    fn route_spec(&self, r: &Route) -> Option<RouteSpec> {
        let oif = match r.dev {
            Dev::Underlay => self.underlay.index,
            Dev::Vxlan => self.vxlan.as_ref()?.index,
        };
        let mut s = RouteSpec::new(r.dst).via(r.via).dev(oif).with_protocol(ROUTE_PROTOCOL);
        if r.onlink {
            s = s.with_onlink();
        }
        Some(s)
    }

    fn apply(&self, ch: &Changes, strays: &[RouteSpec], report: &mut ReconcileReport) {
        let mut fail = |what: String, e: SysError| report.failed.push(format!("{what}: {e}"));
        // Removals: routes first, so none points at a vanishing next hop.
        let mut removed = 0;
        for s in strays {
            match self.nl.del_route(s) {
                Ok(_) => removed += 1,
                Err(e) => fail(format!("remove stale route {s}"), e),
            }
        }
        for r in &ch.remove.routes {
            if let Some(s) = self.route_spec(r) {
                match self.nl.del_route(&s) {
                    Ok(_) => removed += 1,
                    Err(e) => fail(format!("remove route {s}"), e),
                }
            }
        }
        if let Some(vx) = &self.vxlan {
            for n in &ch.remove.neighbours {
                match self.nl.del_neighbour(vx.index, n.ip) {
                    Ok(_) => removed += 1,
                    Err(e) => fail(format!("remove neighbour {}", n.ip), e),
                }
            }
            for f in &ch.remove.fdb {
                match self.nl.del_fdb(vx.index, f.mac, f.dst) {
                    Ok(_) => removed += 1,
                    Err(e) => fail(format!("remove fdb entry for {}", f.dst), e),
                }
            }
        }
        // Additions: the FDB and neighbours before the routes that use them.
        let mut added = 0;
        if let Some(vx) = &self.vxlan {
            for f in &ch.add.fdb {
                match self.nl.add_fdb(vx.index, f.mac, f.dst) {
                    Ok(()) => added += 1,
                    Err(e) => fail(format!("add fdb entry for {}", f.dst), e),
                }
            }
            for n in &ch.add.neighbours {
                match self.nl.add_neighbour(vx.index, n.ip, n.mac) {
                    Ok(()) => added += 1,
                    Err(e) => fail(format!("add neighbour {}", n.ip), e),
                }
            }
        }
        for r in &ch.add.routes {
            match self.route_spec(r) {
                Some(s) => match self.nl.replace_route(&s) {
                    Ok(()) => added += 1,
                    Err(e) => fail(format!("add route {s}"), e),
                },
                None => fail(format!("add route {}", r.dst), SysError::NotFound(format!("link {VXLAN_DEVICE:?}"))),
            }
        }
        report.added += added;
        report.removed += removed;
    }

    /// Turns eBPF host routing on for `pools` (when the config asks for
    /// it): loads the node's fast-path instance if no pod has yet, and
    /// programs it ([`Router::sync_host_routing`]).
    pub fn enable_host_routing(&mut self, pools: &[IpNet]) -> Result<(), RoutingError> {
        if self.config.dataplane != Dataplane::Ebpf {
            // An agent that ran with ebpf before may have left it on.
            return self.remove_host_routing();
        }
        self.host_routing = pools.iter().map(|p| (p.network(), p.prefix_len())).collect();
        self.sync_host_routing()
    }

    /// The uplinks host routing sends out of and serves: the underlay
    /// device, and the VXLAN device when there is one.
    fn uplinks(&self) -> Vec<(&str, u32)> {
        let mut out = vec![(self.underlay.name.as_str(), self.underlay.index)];
        if let Some(vx) = &self.vxlan {
            out.push((vx.name.as_str(), vx.index));
        }
        out
    }

    /// Makes the fast-path instance's host-routing state match: pools,
    /// uplinks, and the uplink program attached to each uplink (replaced
    /// in place, so this is safe to repeat: every reconcile does, which
    /// also repairs an instance that was re-created).
    pub fn sync_host_routing(&mut self) -> Result<(), RoutingError> {
        if self.host_routing.is_empty() {
            return Ok(());
        }
        let mut fp = tern_bpf::FastPath::open_or_load()?;
        fp.set_cluster_prefixes(&self.host_routing)?;
        let uplinks = self.uplinks();
        fp.set_uplinks(&uplinks.iter().map(|u| u.1).collect::<Vec<_>>())?;
        for (name, _) in uplinks {
            fp.attach_uplink(name)?;
        }
        Ok(())
    }

    /// Turns eBPF host routing off, whoever turned it on: the uplink
    /// program off the uplinks, the maps emptied. Pods keep their same-node
    /// fast path.
    fn remove_host_routing(&mut self) -> Result<(), RoutingError> {
        let was_on = !self.host_routing.is_empty();
        self.host_routing.clear();
        // The uplink filter by its fixed priority and handle, through the
        // router's own netlink socket (the namespace the router serves).
        let mut found = false;
        for (_, index) in self.uplinks() {
            for f in self.nl.ingress_filters(index)? {
                if f.kind == "bpf" && f.priority == tern_bpf::UPLINK_PRIORITY && f.handle == tern_bpf::UPLINK_HANDLE {
                    self.nl.delete_ingress_filter(&f)?;
                    found = true;
                }
            }
        }
        // The maps are the calling thread's namespace's, which is the
        // router's in the agent: touched only when host routing was there.
        if was_on || found {
            if let Some(mut fp) = tern_bpf::FastPath::open_existing()? {
                fp.set_uplinks(&[])?;
                fp.set_cluster_prefixes(&[])?;
            }
        }
        Ok(())
    }

    /// The uplinks host routing uses, with the pod packets sent out of each
    /// (empty without host routing).
    pub fn host_routing_uplinks(&self) -> Result<Vec<(String, u64)>, RoutingError> {
        if self.host_routing.is_empty() {
            return Ok(Vec::new());
        }
        let Some(fp) = tern_bpf::FastPath::open_existing()? else { return Ok(Vec::new()) };
        let names = self.uplinks();
        Ok(fp
            .uplinks()?
            .into_iter()
            .map(|(i, n)| (names.iter().find(|u| u.1 == i).map_or(format!("#{i}"), |u| u.0.to_string()), n))
            .collect())
    }

    /// Makes the kernel match the plan for `local` and `peers`.
    pub fn reconcile(&mut self, local: &NodeView, peers: &[NodeView]) -> Result<ReconcileReport, RoutingError> {
        // The device may have been deleted behind our back.
        self.vxlan = self.nl.link(VXLAN_DEVICE)?;
        let mut host_routing_failed = None;
        if let Err(e) = self.sync_host_routing() {
            // Pods keep the kernel path; the next reconcile tries again.
            host_routing_failed = Some(format!("eBPF host routing: {e}"));
        }
        let p = plan(local, peers, self.config.mode);
        let (actual, strays) = self.actual()?;
        let changes = diff(&p.desired, &actual);
        let mut report = ReconcileReport {
            unroutable: p.errors.iter().map(PlanError::to_string).collect(),
            paths: p.paths.clone(),
            ..Default::default()
        };
        if !changes.is_empty() || !strays.is_empty() {
            self.apply(&changes, &strays, &mut report);
        }
        report.failed.extend(host_routing_failed);
        Ok(report)
    }

    /// Removes everything tern owns for cross-node routing (the VXLAN device
    /// with its neighbours and FDB, and every tern-protocol route).
    pub fn teardown(&mut self) -> Result<(), RoutingError> {
        self.vxlan = self.nl.link(VXLAN_DEVICE)?;
        let (actual, strays) = self.actual()?;
        let mut report = ReconcileReport::default();
        self.apply(&diff(&Actual::default(), &actual), &strays, &mut report);
        self.remove_host_routing()?;
        if let Some(vx) = self.vxlan.take() {
            self.nl.delete_link_index(vx.index)?;
        }
        Ok(())
    }
}

/// Where nodes publish how to reach them: `/tern/v1/routing/<node>`.
///
/// Separate from the node's lease-bound record on purpose: an agent that
/// restarts (or dies) does not take its node's pods off the network. Peers
/// keep routing to a node's blocks as long as its routing record exists; it
/// is withdrawn when the node leaves the cluster for good
/// ([`withdraw`], `tern agent --leave`), or by IPAM GC once every block of a
/// dead node has been reclaimed.
pub const ROUTING_PREFIX: &str = "/tern/v1/routing/";

/// `/tern/v1/routing/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoutingRecord {
    pub name: String,
    pub underlay: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep: Option<Vtep>,
    pub mode: Mode,
}

fn routing_key(node: &str) -> Result<String, tern_store::StoreError> {
    Ok(format!("{ROUTING_PREFIX}{}", tern_store::keys::component("node name", node)?))
}

/// Writes (or refreshes) the node's routing record.
pub fn publish(store: &dyn Datastore, rec: &RoutingRecord) -> Result<(), tern_store::StoreError> {
    let key = routing_key(&rec.name)?;
    let value = serde_json::to_vec(rec).expect("routing record serialises");
    if store.get(&key)?.is_some_and(|kv| kv.value == value) {
        return Ok(()); // unchanged: no event for every peer
    }
    store.put(&key, &value, None)?;
    Ok(())
}

/// Removes the node's routing record: every peer drops its routes to it.
pub fn withdraw(store: &dyn Datastore, node: &str) -> Result<bool, tern_store::StoreError> {
    store.delete(&routing_key(node)?)
}

/// Every node that publishes a routing record, with the blocks it owns.
pub fn cluster_views(store: &dyn Datastore) -> Result<Vec<NodeView>, tern_store::StoreError> {
    let mut views: Vec<NodeView> = Vec::new();
    for kv in store.list(ROUTING_PREFIX)?.kvs {
        // A record that does not parse is skipped, not fatal: one bad
        // record must not take routing down for the whole cluster.
        let Ok(rec) = serde_json::from_slice::<RoutingRecord>(&kv.value) else {
            continue;
        };
        views.push(NodeView { name: rec.name, underlay: rec.underlay, vtep: rec.vtep, blocks: Vec::new() });
    }
    for b in tern_store::ipam::list_blocks(store)? {
        if let Some(v) = views.iter_mut().find(|v| v.name == b.value.node) {
            v.blocks.push(b.value.cidr());
        }
    }
    Ok(views)
}

/// The routing loop of a node: reconciles the kernel with the datastore at
/// start, on every change to routing records or block affinities (within
/// tens of milliseconds), and every `resync` regardless. While the store is
/// unreachable the kernel is left exactly as it is.
pub fn run(store: &dyn Datastore, node: &str, router: &mut Router, stopping: &dyn Fn() -> bool) {
    let resync = router.config.resync;
    let mut watches: Option<(tern_store::Watch, tern_store::Watch)> = None;
    let mut last_problem: Option<String> = None;
    let mut last_unroutable: Vec<String> = Vec::new();
    while !stopping() {
        if watches.is_none() {
            watches = store
                .watch(ROUTING_PREFIX, None)
                .and_then(|a| Ok((a, store.watch(tern_store::keys::IPAM_AFFINITY, None)?)))
                .ok();
        }
        let outcome = cluster_views(store).map_err(|e| e.to_string()).and_then(|views| {
            let local = views
                .iter()
                .find(|v| v.name == node)
                .cloned()
                .ok_or_else(|| format!("node {node} has no routing record in the datastore yet"))?;
            router.reconcile(&local, &views).map_err(|e| e.to_string())
        });
        match outcome {
            Ok(rep) => {
                if last_problem.take().is_some() {
                    eprintln!("tern agent: node {node}: routing reconciled again");
                }
                if rep.unroutable != last_unroutable {
                    for u in &rep.unroutable {
                        eprintln!("tern agent: node {node}: routing: {u}");
                    }
                    last_unroutable = rep.unroutable.clone();
                }
                for f in &rep.failed {
                    eprintln!("tern agent: node {node}: routing: {f}");
                }
            }
            Err(e) => {
                if last_problem.as_deref() != Some(&e) {
                    eprintln!("tern agent: node {node}: routing not reconciled: {e}");
                }
                last_problem = Some(e);
            }
        }
        // Wait for a change, the resync period, or the stop.
        let deadline = std::time::Instant::now() + resync;
        let mut changed = false;
        while !changed && !stopping() && std::time::Instant::now() < deadline {
            let mut ended = false;
            match &watches {
                Some((a, b)) => {
                    for w in [a, b] {
                        match w.recv_timeout(Duration::from_millis(25)) {
                            Some(Ok(_)) => changed = true,
                            Some(Err(_)) => ended = true,
                            None => {}
                        }
                    }
                }
                None => ended = true,
            }
            if ended {
                // No watch (store away, or it ended): poll until it is back.
                watches = None;
                changed = true;
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        if let Some((a, b)) = &watches {
            // Coalesce a burst (a node joining writes several keys).
            std::thread::sleep(Duration::from_millis(10));
            let _ = (a.drain(), b.drain());
        }
    }
}

/// The nftables table in which the agent masquerades pod traffic that
/// leaves the cluster.
pub const MASQ_TABLE: &str = "tern_agent";

/// The nft script that masquerades traffic from the cluster's pools to
/// anything outside them, on whichever interface it leaves the node by.
/// Replacing the table is one atomic transaction (create if missing, flush,
/// define), so re-applying it at every agent start never opens a gap.
pub fn masquerade_script(pools: &[IpNet]) -> String {
    let (v4, v6): (Vec<&IpNet>, Vec<&IpNet>) = pools.iter().partition(|p| p.addr().is_ipv4());
    let elems = |v: &[&IpNet]| v.iter().map(|p| p.trunc().to_string()).collect::<Vec<_>>().join(", ");
    let mut s = format!("table inet {MASQ_TABLE} {{}}\nflush table inet {MASQ_TABLE}\ntable inet {MASQ_TABLE} {{\n");
    if !v4.is_empty() {
        s += &format!("  set cluster4 {{ type ipv4_addr; flags interval; elements = {{ {} }} }}\n", elems(&v4));
    }
    if !v6.is_empty() {
        s += &format!("  set cluster6 {{ type ipv6_addr; flags interval; elements = {{ {} }} }}\n", elems(&v6));
    }
    s += "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n";
    if !v4.is_empty() {
        s += "    ip saddr @cluster4 ip daddr != @cluster4 ip daddr != 224.0.0.0/4 masquerade\n";
    }
    if !v6.is_empty() {
        s += "    ip6 saddr @cluster6 ip6 daddr != @cluster6 ip6 daddr != ff00::/8 masquerade\n";
    }
    s += "  }\n}\n";
    s
}

/// Handle under which the node's VXLAN tunnel addresses are allocated from
/// its own blocks (a name no CNI handle can have: they start with the
/// network name, which cannot start with `@`).
pub fn tunnel_handle(node: &str) -> String {
    format!("@tunnel/{node}")
}

/// Everything cross-node routing needs at agent start, done in order: the
/// underlay found, the masquerade table in place, the VTEP (device and
/// tunnel addresses from `tunnel_ips`) made, the routing record published.
/// Returns the router for [`run`].
pub fn setup(
    store: &dyn Datastore,
    node: &str,
    config: RoutingConfig,
    pools: &[IpNet],
    tunnel_ips: impl FnOnce() -> Result<Vec<IpAddr>, String>,
) -> Result<Router, String> {
    let mut router = Router::new(node, config).map_err(|e| e.to_string())?;
    tern_sys::nft::run(&masquerade_script(pools)).map_err(|e| format!("masquerade table: {e}"))?;
    let vtep = if router.wants_vxlan() {
        let ips = tunnel_ips()?;
        Some(router.ensure_vtep(&ips).map_err(|e| e.to_string())?)
    } else {
        None
    };
    router.enable_host_routing(pools).map_err(|e| format!("eBPF host routing: {e}"))?;
    let rec = RoutingRecord { name: node.to_string(), underlay: router.underlay(), vtep, mode: router.mode() };
    publish(store, &rec).map_err(|e| format!("publishing the routing record: {e}"))?;
    Ok(router)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masquerade_script_covers_each_family_present() {
        let s = masquerade_script(&["10.244.0.0/16".parse().unwrap()]);
        assert!(s.contains("elements = { 10.244.0.0/16 }"));
        assert!(s.contains("ip saddr @cluster4 ip daddr != @cluster4"));
        assert!(!s.contains("cluster6"));
        let s = masquerade_script(&["10.244.0.0/16".parse().unwrap(), "fd00:244::/56".parse().unwrap()]);
        assert!(s.contains("ip6 saddr @cluster6"));
        assert!(s.starts_with("table inet tern_agent {}\nflush table inet tern_agent\n"));
    }

    #[test]
    fn vtep_mac_is_stable_local_unicast() {
        let m = vtep_mac("n1");
        assert_eq!(m, vtep_mac("n1"));
        assert_ne!(m, vtep_mac("n2"));
        assert_eq!(m[0] & 0x03, 0x02, "locally administered, unicast");
        assert_eq!(tunnel_handle("n1"), "@tunnel/n1");
    }

    #[test]
    fn routing_config_from_json() {
        let c: RoutingConfig = serde_json::from_str(r#"{"mode":"auto","underlayInterface":"eth0"}"#).unwrap();
        assert_eq!((c.vni, c.port, c.resync), (1, 8472, Duration::from_secs(30)));
        let e = serde_json::from_str::<RoutingConfig>(r#"{"mode":"auto","underlayInterface":"eth0","vnid":2}"#)
            .unwrap_err();
        assert!(e.to_string().contains("vnid"), "{e}");
        assert_eq!(c.dataplane, Dataplane::Kernel);
        let c: RoutingConfig =
            serde_json::from_str(r#"{"mode":"direct","underlayInterface":"eth0","dataplane":"ebpf"}"#).unwrap();
        assert_eq!(c.dataplane, Dataplane::Ebpf);
        assert!(serde_json::from_str::<RoutingConfig>(
            r#"{"mode":"direct","underlayInterface":"eth0","dataplane":"xdp"}"#
        )
        .is_err());
    }
}
