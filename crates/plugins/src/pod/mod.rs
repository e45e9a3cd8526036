//! The `tern` plugin: a veth per pod, on a bridge (`mode: bridge`, the
//! default) or routed at L3 with no bridge (`mode: routed`).
//!
//! ADD records nothing on disk: every kernel object it makes is named or
//! tagged from (network, container id, ifname), so DEL, CHECK and GC work from
//! the kernel state alone, even after a crash.
//!
//! # `dataplane`: `"kernel"` (default) or `"ebpf"`
//!
//! With `"ebpf"`, ADD also attaches tern's eBPF fast path (crates/bpf,
//! `bpf/tern_fastpath.c`) at tc ingress of the host veth and registers the
//! pod's addresses in the node's endpoint map: a packet from one local `ebpf`
//! pod to another goes by `bpf_redirect_peer` straight into the destination
//! pod (routed: as a router would send it, TTL/hop limit decremented; bridge:
//! as the bridge would, between pods of the same bridge), skipping the second
//! veth crossing, the node's forwarding and **the node's netfilter** (forward
//! chain, and the bridge's br_netfilter). A routed pod's traffic with pods
//! of other nodes takes the eBPF path too when the node's agent runs with
//! `--dataplane ebpf` (host routing, see `tern_agent::routing`). Everything
//! else keeps the kernel path: traffic to and from the node, other nodes and
//! the outside (masquerade, host ports), ARP and neighbour discovery, a pod reaching
//! itself, packets whose source address or MAC is not the sending pod's.
//!
//! The default stays `"kernel"` because the fast path is invisible to rules
//! an operator or another component puts in the node's forward chain. tern's
//! own rules keep working: tern-firewall takes the pods it is chained for off
//! the fast path (both directions, see `meta::firewall`); tern-portmap's host
//! ports are DNAT on the node, so they never look like pod-to-pod traffic,
//! and their hairpin replies come back masqueraded to the node.
//! tern-bandwidth takes the pods it shapes off the fast path too, so its
//! qdiscs see their traffic (its egress redirect goes under the fast path's
//! `clsact`, ahead of the BPF filter). A kernel without the needed BPF
//! support (cls_bpf, `bpf_redirect_peer`) fails the ADD with an error that
//! says so; use `"kernel"` there.
mod config;
pub mod fastpath;
pub mod nft;
pub mod reap;

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tern_cni::{CniError, CniResult, Code, Interface, IpConfig, Route};
use tern_sys::netlink::{format_mac, parse_mac, LinkInfo, Mac, Netlink, RouteSpec};
use tern_sys::netns::NetNs;
use tern_sys::{sysctl, SysError};

pub use config::{Dataplane, Mode, PodConf};

use crate::delegate;
use crate::fault;
use crate::names;
use crate::skel::{Plugin, Request};

/// Link-local gateway of routed pods. The pod holds a permanent neighbour
/// entry for it (the host veth's MAC), so it needs no ARP/NDP answer; the
/// host veth also answers by proxy ARP for pods that flush their cache.
pub const ROUTED_GW4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const ROUTED_GW6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Prefix of the alias tern puts on each host veth: `tern:<owner tag>`.
pub const ALIAS_PREFIX: &str = "tern:";

pub struct PodPlugin;

fn sys(op: &str) -> impl Fn(SysError) -> CniError + '_ {
    move |e| CniError::internal(format!("{op}: {e}"))
}

/// Who this invocation is about.
struct Target<'a> {
    network: &'a str,
    container_id: &'a str,
    ifname: &'a str,
    host_veth: String,
    owner: String,
}

impl<'a> Target<'a> {
    fn of(req: &'a Request) -> Target<'a> {
        let (network, container_id, ifname) = (req.conf.name.as_str(), req.env.container_id(), req.env.ifname());
        Target {
            network,
            container_id,
            ifname,
            host_veth: names::host_veth(container_id, ifname),
            owner: names::owner_tag(network, container_id, ifname),
        }
    }
}

fn load_conf(req: &Request) -> Result<PodConf, CniError> {
    req.conf.options::<PodConf>()?.validate()
}

fn open_netns(path: &str) -> Result<NetNs, CniError> {
    NetNs::open(path)
        .map_err(|e| CniError::new(Code::InvalidEnv, format!("failed to open netns {path:?} (CNI_NETNS): {e}")))
}

/// The MAC requested for the pod interface: CNI_ARGS MAC < args.cni.mac <
/// runtimeConfig.mac, as in the reference bridge.
fn requested_mac(req: &Request) -> Result<Option<Mac>, CniError> {
    let from_args =
        req.conf.raw.get("args").and_then(|a| a.get("cni")).and_then(|c| c.get("mac")).and_then(|m| m.as_str());
    let chosen = req
        .conf
        .runtime_config
        .mac
        .as_deref()
        .map(|m| (m, "runtimeConfig.mac"))
        .or(from_args.map(|m| (m, "args.cni.mac")))
        .or(req.env.args.get("MAC").map(|m| (m, "CNI_ARGS MAC")));
    match chosen {
        None => Ok(None),
        Some((m, field)) => parse_mac(m)
            .map(Some)
            .ok_or_else(|| CniError::invalid_config(format!("invalid MAC address {m:?} ({field})"))),
    }
}

/// An attachment that already exists (same container and ifname), or an
/// interface of that name in the pod, is an error (spec: ADD must not reuse
/// an existing interface).
fn refuse_existing(target: &Target, pod_ns: &NetNs) -> Result<(), CniError> {
    let host = Netlink::new().map_err(sys("netlink"))?;
    if host.link(&target.host_veth).map_err(sys("host veth"))?.is_some() {
        return Err(CniError::internal(format!(
            "attachment {}/{}/{} already exists (host veth {}): DEL it first",
            target.network, target.container_id, target.ifname, target.host_veth
        )));
    }
    let pod = Netlink::in_netns(pod_ns).map_err(sys("netlink in the pod netns"))?;
    if pod.link(target.ifname).map_err(sys("pod interface"))?.is_some() {
        return Err(CniError::internal(format!(
            "interface {} already exists in {} (CNI_IFNAME)",
            target.ifname,
            pod_ns.path().display()
        )));
    }
    Ok(())
}

/// What this ADD has made so far, so a failure undoes exactly that.
#[derive(Default)]
struct Made {
    ipam: bool,
    veth: bool,
    masq: bool,
    spoof: bool,
    fastpath: bool,
}

impl Plugin for PodPlugin {
    fn name(&self) -> &'static str {
        "tern"
    }

    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let conf = load_conf(req)?;
        req.env.args.check_known(&["IP", "MAC", "GATEWAY"])?;
        let mac = requested_mac(req)?;
        let target = Target::of(req);
        let pod_ns = open_netns(req.env.netns.as_deref().unwrap_or_default())?;

        // Refuse a duplicate before IPAM runs, so a failed second ADD can
        // never release the first attachment's addresses.
        refuse_existing(&target, &pod_ns)?;

        let mut made = Made::default();
        fault::point("ipam");
        let ipam = delegate::ipam_add(req)?;
        made.ipam = ipam.is_some();
        let result = setup(&conf, &target, &pod_ns, ipam.unwrap_or_default(), mac, &mut made);
        if result.is_err() {
            undo(req, &target, &made);
        }
        let result = result?;
        fault::point("result");
        Ok(result)
    }

    fn del(&self, req: &Request) -> Result<(), CniError> {
        let conf = load_conf(req)?;
        let target = Target::of(req);
        let mut errors: Vec<CniError> = Vec::new();

        // Whatever the dataplane now: the config may have changed since ADD.
        if let Err(e) = fastpath::remove_for_veth(&target.host_veth) {
            errors.push(e);
        }
        if let Err(e) = remove_veth(req, &target) {
            errors.push(e);
        }
        if let Err(e) = delegate::ipam_del(req) {
            errors.push(e);
        }
        if conf.ip_masq {
            if let Err(e) = nft::remove_owned("inet", nft::MASQ_TABLE, &|c| c == target.owner) {
                errors.push(e);
            }
        }
        if conf.macspoofchk {
            if let Err(e) = nft::remove_owned("bridge", nft::SPOOF_TABLE, &|c| c == target.owner) {
                errors.push(e);
            }
        }
        join_errors(errors)
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let conf = load_conf(req)?;
        let target = Target::of(req);
        let prev = req.conf.prev_result.as_ref().expect("skel checks prevResult");
        check(&conf, &target, req.env.netns.as_deref().unwrap_or_default(), prev)?;
        delegate::ipam_check(req)
    }

    fn status(&self, req: &Request) -> Result<(), CniError> {
        load_conf(req)?;
        delegate::ipam_status(req)
    }

    fn gc(&self, req: &Request) -> Result<(), CniError> {
        load_conf(req)?;
        let valid = req.conf.valid_attachments.as_ref().ok_or_else(|| {
            CniError::invalid_config("GC needs the list of valid attachments (cni.dev/valid-attachments)")
        })?;
        let net_tag = names::network_tag(&req.conf.name);
        let keep: HashSet<String> = valid.iter().map(|a| names::attachment_tag(&a.container_id, &a.ifname)).collect();
        // An owner tag of this network whose attachment is not listed.
        let stale = |tag: &str| match names::split_owner_tag(tag) {
            Some((n, a)) => n == net_tag && !keep.contains(a),
            None => false,
        };
        let mut errors = Vec::new();
        match gc_links(&stale) {
            Ok(()) => {}
            Err(e) => errors.push(e),
        }
        // After gc_links: the entries of the veths it just deleted go too.
        if let Err(e) = fastpath::remove_stale() {
            errors.push(e);
        }
        if let Err(e) = delegate::ipam_gc(req) {
            errors.push(e);
        }
        for (family, table) in [("inet", nft::MASQ_TABLE), ("bridge", nft::SPOOF_TABLE)] {
            if let Err(e) = nft::remove_owned(family, table, &stale) {
                errors.push(e);
            }
        }
        join_errors(errors)
    }
}

/// Remove the attachment's veth pair, if it is still there. The pod end is
/// touched only when it is the peer of our host end: an `eth0` that tern did
/// not make (a failed ADD's DEL) is left alone.
fn remove_veth(req: &Request, target: &Target) -> Result<(), CniError> {
    let host = Netlink::new().map_err(sys("netlink"))?;
    let Some(hv) = host.link(&target.host_veth).map_err(sys("host veth"))? else { return Ok(()) };
    // The netns may be gone (the veth went with it) or CNI_NETNS empty.
    let pod_ns = req.env.netns.as_deref().and_then(|p| NetNs::open(p).ok());
    let pod_nl = pod_ns.as_ref().and_then(|ns| Netlink::in_netns(ns).ok());
    let pod_link = pod_nl
        .as_ref()
        .and_then(|nl| nl.link(target.ifname).ok().flatten())
        .filter(|l| l.peer_index == Some(hv.index) || hv.peer_index == Some(l.index));
    let pod = pod_nl.as_ref().zip(pod_link.as_ref());
    match reap::detach_and_delete(&host, &hv, pod) {
        // The kernel tears a pair down asynchronously when its netns goes:
        // vanishing under our feet is success.
        Ok(()) | Err(SysError::NotFound(_)) => Ok(()),
        Err(e) => Err(CniError::internal(format!("failed to delete veth {}: {e}", target.host_veth))),
    }
}

fn join_errors(mut errors: Vec<CniError>) -> Result<(), CniError> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(CniError::internal(errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))),
    }
}

/// Delete host veths whose alias marks them as stale attachments.
fn gc_links(stale: &dyn Fn(&str) -> bool) -> Result<(), CniError> {
    let nl = Netlink::new().map_err(sys("netlink"))?;
    for link in nl.links().map_err(sys("failed to list links"))? {
        let Some(tag) = link.alias.as_deref().and_then(|a| a.strip_prefix(ALIAS_PREFIX)) else { continue };
        let orphaned_trash = link.name.starts_with(reap::TRASH_PREFIX);
        if orphaned_trash || (link.name.starts_with(names::HOST_VETH_PREFIX) && stale(tag)) {
            nl.delete_link_index(link.index).map_err(sys("failed to delete stale veth"))?;
        }
    }
    Ok(())
}

/// Undo a failed ADD: only what this invocation made, in reverse order.
fn undo(req: &Request, target: &Target, made: &Made) {
    if made.spoof {
        let _ = nft::remove_owned("bridge", nft::SPOOF_TABLE, &|c| c == target.owner);
    }
    if made.masq {
        let _ = nft::remove_owned("inet", nft::MASQ_TABLE, &|c| c == target.owner);
    }
    if made.fastpath {
        let _ = fastpath::remove_for_veth(&target.host_veth);
    }
    if made.veth {
        let _ = Netlink::new().and_then(|nl| nl.delete_link(&target.host_veth));
    }
    if made.ipam {
        let _ = delegate::ipam_del(req);
    }
}

/// Everything ADD does after IPAM.
fn setup(
    conf: &PodConf,
    target: &Target,
    pod_ns: &NetNs,
    ipam: CniResult,
    mac: Option<Mac>,
    made: &mut Made,
) -> Result<CniResult, CniError> {
    let host = Netlink::new().map_err(sys("netlink"))?;
    let pod = Netlink::in_netns(pod_ns).map_err(sys("netlink in the pod netns"))?;

    let mut result = CniResult { dns: ipam.dns.clone(), ..Default::default() };
    let bridge = match conf.mode {
        Mode::Bridge => {
            fault::point("bridge");
            let br = ensure_bridge(&host, conf, &ipam)?;
            result.interfaces.push(Interface {
                name: br.name.clone(),
                mac: br.mac.as_ref().map(format_mac).unwrap_or_default(),
                ..Default::default()
            });
            Some(br)
        }
        Mode::Routed => None,
    };

    fault::point("veth");
    host.create_veth(
        &target.host_veth,
        target.ifname,
        pod_ns,
        conf.mtu,
        mac,
        Some(&format!("{ALIAS_PREFIX}{}", target.owner)),
    )
    .map_err(|e| match e {
        SysError::Exists(what) => CniError::internal(format!("cannot create the pod interface: {what} already exists")),
        e => CniError::internal(format!("failed to create veth {}/{}: {e}", target.host_veth, target.ifname)),
    })?;
    made.veth = true;

    fault::point("host-link");
    let hv = host
        .link(&target.host_veth)
        .map_err(sys("host veth"))?
        .ok_or_else(|| CniError::internal("host veth vanished"))?;
    if let Some(br) = &bridge {
        host.set_master(hv.index, br.index).map_err(sys("failed to attach the host veth to the bridge"))?;
        if conf.hairpin_mode {
            host.set_hairpin(hv.index, true).map_err(sys("failed to set hairpin mode"))?;
        }
    }
    host.set_up(hv.index).map_err(sys("failed to bring the host veth up"))?;
    if let Some(br) = &bridge {
        // The bridge takes the lowest MAC of its ports: report it as it is now.
        if let Some(now) = host.link_by_index(br.index).map_err(sys("bridge"))? {
            result.interfaces[0].mac = now.mac.as_ref().map(format_mac).unwrap_or_default();
        }
    }
    result.interfaces.push(Interface {
        name: hv.name.clone(),
        mac: hv.mac.as_ref().map(format_mac).unwrap_or_default(),
        mtu: Some(hv.mtu),
        ..Default::default()
    });

    fault::point("pod-link");
    let has_v6 = ipam.ips.iter().any(|ip| ip.address.addr().is_ipv6());
    pod_ns
        .enter(|| -> Result<(), SysError> {
            if has_v6 && !conf.enabledad {
                // Addresses are added with NODAD too; this covers the link-local one.
                let _ = sysctl::write(&format!("net/ipv6/conf/{}/accept_dad", target.ifname), "0");
            }
            if conf.mode == Mode::Bridge {
                sysctl::write(&format!("net/ipv4/conf/{}/arp_notify", target.ifname), "1")?;
            }
            Ok(())
        })
        .map_err(sys("pod netns"))?
        .map_err(sys("pod sysctl"))?;
    if let Some(lo) = pod.link("lo").map_err(sys("pod lo"))? {
        if !lo.up {
            pod.set_up(lo.index).map_err(sys("failed to bring lo up"))?;
        }
    }
    let pv = pod
        .link(target.ifname)
        .map_err(sys("pod interface"))?
        .ok_or_else(|| CniError::internal("pod interface vanished"))?;
    let pod_index = result.interfaces.len();
    result.interfaces.push(Interface {
        name: pv.name.clone(),
        mac: pv.mac.as_ref().map(format_mac).unwrap_or_default(),
        mtu: Some(pv.mtu),
        sandbox: pod_ns.path().display().to_string(),
        ..Default::default()
    });

    fault::point("pod-addr");
    for ip in &ipam.ips {
        let (addr, gateway) = match conf.mode {
            Mode::Bridge => (ip.address, Some(gateway_of(ip))),
            Mode::Routed => (host_prefix(ip.address.addr()), Some(routed_gateway(ip.address.addr()))),
        };
        pod.add_address(pv.index, addr, !conf.enabledad)
            .map_err(sys(&format!("failed to add {addr} to {}", target.ifname)))?;
        result.ips.push(IpConfig { address: addr, gateway, interface: Some(pod_index) });
    }
    pod.set_up(pv.index).map_err(sys("failed to bring the pod interface up"))?;

    fault::point("pod-routes");
    result.routes = match conf.mode {
        Mode::Bridge => bridge_pod_routes(conf, &pod, pv.index, &ipam)?,
        Mode::Routed => routed_pod_routes(&pod, pv.index, &hv, &ipam)?,
    };

    fault::point("host-routes");
    if conf.mode == Mode::Routed {
        routed_host_side(&host, &hv, pv.mac, &ipam)?;
    }
    if conf.is_gateway || conf.mode == Mode::Routed {
        enable_forwarding(&ipam)?;
    }

    fault::point("masq");
    if conf.ip_masq {
        made.masq = true;
        let addrs: Vec<IpNet> = ipam.ips.iter().map(|ip| ip.address).collect();
        nft::masq_add(target.network, &target.owner, &addrs)?;
    }
    fault::point("spoof");
    if conf.macspoofchk && conf.mode == Mode::Bridge {
        made.spoof = true;
        let pod_mac = pv.mac.as_ref().map(format_mac).unwrap_or_default();
        nft::spoof_add(&target.host_veth, &pod_mac, &target.owner)?;
    }
    match conf.dataplane {
        Dataplane::Ebpf => {
            made.fastpath = true;
            fastpath::register(&hv, pv.mac, bridge.as_ref().map(|b| b.index), &ipam.ips)?;
        }
        // Best effort: the default dataplane must not fail on the node's
        // BPF state; GC sweeps what this misses.
        Dataplane::Kernel => {
            let _ = fastpath::forget_addresses(&ipam.ips);
        }
    }
    Ok(result)
}

/// The gateway of an IPAM address: as given, else the subnet's first host
/// (the reference bridge's default).
fn gateway_of(ip: &IpConfig) -> IpAddr {
    ip.gateway.unwrap_or_else(|| first_host(&ip.address))
}

fn first_host(net: &IpNet) -> IpAddr {
    match net.trunc() {
        IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) + 1)),
        IpNet::V6(n) => IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) + 1)),
    }
}

fn host_prefix(ip: IpAddr) -> IpNet {
    match ip {
        IpAddr::V4(a) => IpNet::V4(Ipv4Net::new(a, 32).expect("valid prefix")),
        IpAddr::V6(a) => IpNet::V6(Ipv6Net::new(a, 128).expect("valid prefix")),
    }
}

fn routed_gateway(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(ROUTED_GW4),
        IpAddr::V6(_) => IpAddr::V6(ROUTED_GW6),
    }
}

fn is_default(dst: &IpNet) -> bool {
    dst.prefix_len() == 0
}

/// Create the bridge if missing, and give it the gateway addresses when it is
/// the gateway. Concurrent ADDs race to create it; losing the race is fine.
fn ensure_bridge(host: &Netlink, conf: &PodConf, ipam: &CniResult) -> Result<LinkInfo, CniError> {
    let br = match host.link(&conf.bridge).map_err(sys("bridge"))? {
        Some(l) => l,
        None => match host.create_bridge(&conf.bridge, conf.mtu) {
            Ok(l) => {
                let _ = sysctl::write(&format!("net/ipv6/conf/{}/accept_ra", conf.bridge), "0");
                l
            }
            Err(SysError::Exists(_)) => {
                host.link(&conf.bridge).map_err(sys("bridge"))?.ok_or_else(|| CniError::internal("bridge vanished"))?
            }
            Err(e) => return Err(CniError::internal(format!("failed to create bridge {:?}: {e}", conf.bridge))),
        },
    };
    if br.kind.as_deref() != Some("bridge") {
        return Err(CniError::internal(format!("{:?} already exists but is not a bridge (bridge)", conf.bridge)));
    }
    if conf.promisc_mode && !br.promisc {
        host.set_promisc(br.index, true).map_err(sys("failed to set the bridge promiscuous"))?;
    }
    if !br.up {
        host.set_up(br.index).map_err(sys("failed to bring the bridge up"))?;
    }
    if conf.is_gateway {
        let existing: Vec<IpNet> =
            host.addresses(Some(br.index)).map_err(sys("bridge addresses"))?.into_iter().map(|(_, a)| a).collect();
        for ip in &ipam.ips {
            let gw = IpNet::new(gateway_of(ip), ip.address.prefix_len()).expect("prefix from a valid address");
            if existing.contains(&gw) {
                continue;
            }
            // IPv4: one address per bridge; IPv6: only overlapping ones conflict.
            let conflicting: Vec<IpNet> = existing
                .iter()
                .copied()
                .filter(|e| match (e, &gw) {
                    (IpNet::V4(_), IpNet::V4(_)) => true,
                    (IpNet::V6(a), IpNet::V6(b)) => {
                        !a.addr().is_unicast_link_local() && (a.contains(&b.addr()) || b.contains(&a.addr()))
                    }
                    _ => false,
                })
                .collect();
            if !conflicting.is_empty() {
                if !conf.force_address {
                    return Err(CniError::internal(format!(
                        "{:?} already has an IP address different from {gw} (set forceAddress to replace it)",
                        conf.bridge
                    )));
                }
                for old in conflicting {
                    host.del_address(br.index, old).map_err(sys("failed to remove the old bridge address"))?;
                }
            }
            match host.add_address(br.index, gw, true) {
                Ok(()) | Err(SysError::Exists(_)) => {}
                Err(e) => return Err(CniError::internal(format!("failed to set bridge address {gw}: {e}"))),
            }
        }
    }
    Ok(br)
}

fn add_pod_route(pod: &Netlink, spec: RouteSpec) -> Result<(), CniError> {
    match pod.add_route(&spec) {
        Ok(()) | Err(SysError::Exists(_)) => Ok(()),
        Err(e) => Err(CniError::internal(format!("failed to add route {} in the pod: {e}", spec.dst))),
    }
}

fn bridge_pod_routes(conf: &PodConf, pod: &Netlink, index: u32, ipam: &CniResult) -> Result<Vec<Route>, CniError> {
    let family_gw = |v4: bool| ipam.ips.iter().find(|ip| ip.address.addr().is_ipv4() == v4).map(gateway_of);
    let mut routes = Vec::new();
    for r in &ipam.routes {
        let gw = r.gw.or_else(|| family_gw(r.dst.addr().is_ipv4()));
        let mut spec = RouteSpec::new(r.dst);
        spec.gw = gw;
        spec.oif = Some(index);
        spec.mtu = r.mtu;
        spec.advmss = r.advmss;
        spec.metric = r.priority;
        add_pod_route(pod, spec)?;
        routes.push(r.clone());
    }
    if conf.is_default_gateway {
        for v4 in [true, false] {
            let Some(gw) = family_gw(v4) else { continue };
            let has_default =
                ipam.routes.iter().any(|r| is_default(&r.dst) && r.dst.addr().is_ipv4() == v4 && r.gw.is_some());
            if has_default {
                continue;
            }
            let dst: IpNet = if v4 { "0.0.0.0/0".parse().expect("cidr") } else { "::/0".parse().expect("cidr") };
            let mut spec = RouteSpec::new(dst);
            spec.gw = Some(gw);
            spec.oif = Some(index);
            add_pod_route(pod, spec)?;
            routes.push(Route::new(dst, Some(gw)));
        }
    }
    Ok(routes)
}

/// Routed pods send everything to the link-local gateway, pinned to the host
/// veth's MAC by a permanent neighbour entry.
fn routed_pod_routes(pod: &Netlink, index: u32, hv: &LinkInfo, ipam: &CniResult) -> Result<Vec<Route>, CniError> {
    let host_mac = hv.mac.ok_or_else(|| CniError::internal("host veth has no MAC"))?;
    let mut routes = Vec::new();
    for v4 in [true, false] {
        if !ipam.ips.iter().any(|ip| ip.address.addr().is_ipv4() == v4) {
            continue;
        }
        let gw = if v4 { IpAddr::V4(ROUTED_GW4) } else { IpAddr::V6(ROUTED_GW6) };
        pod.add_neighbour(index, gw, host_mac).map_err(sys("failed to pin the gateway neighbour"))?;
        if v4 {
            let mut link_route = RouteSpec::new(host_prefix(gw));
            link_route.oif = Some(index);
            link_route.scope_link = true;
            add_pod_route(pod, link_route)?;
        }
        let mut wanted: Vec<Route> = ipam.routes.iter().filter(|r| r.dst.addr().is_ipv4() == v4).cloned().collect();
        if !wanted.iter().any(|r| is_default(&r.dst)) {
            let dst: IpNet = if v4 { "0.0.0.0/0".parse().expect("cidr") } else { "::/0".parse().expect("cidr") };
            wanted.insert(0, Route::new(dst, None));
        }
        for mut r in wanted {
            r.gw = Some(gw);
            let mut spec = RouteSpec::new(r.dst);
            spec.gw = Some(gw);
            spec.oif = Some(index);
            spec.onlink = v4;
            spec.mtu = r.mtu;
            spec.advmss = r.advmss;
            spec.metric = r.priority;
            add_pod_route(pod, spec)?;
            routes.push(r);
        }
    }
    Ok(routes)
}

/// The node side of a routed pod: a host route and a permanent neighbour
/// entry per pod address, and proxy ARP on the veth. The neighbour entry
/// spares the first packet an ARP round and keeps node→pod traffic working
/// on a node without an IPv4 address of its own (its ARP requests would
/// carry no usable source).
fn routed_host_side(host: &Netlink, hv: &LinkInfo, pod_mac: Option<Mac>, ipam: &CniResult) -> Result<(), CniError> {
    if ipam.ips.iter().any(|ip| ip.address.addr().is_ipv4()) {
        sysctl::write(&format!("net/ipv4/conf/{}/proxy_arp", hv.name), "1").map_err(sys("proxy_arp"))?;
        let _ = sysctl::write(&format!("net/ipv4/neigh/{}/proxy_delay", hv.name), "0");
    }
    for ip in &ipam.ips {
        let mut spec = RouteSpec::new(host_prefix(ip.address.addr()));
        spec.oif = Some(hv.index);
        spec.scope_link = true;
        host.replace_route(&spec).map_err(sys(&format!("failed to route {} to {}", ip.address.addr(), hv.name)))?;
        if let Some(mac) = pod_mac {
            host.add_neighbour(hv.index, ip.address.addr(), mac).map_err(sys("failed to pin the pod neighbour"))?;
        }
    }
    Ok(())
}

fn enable_forwarding(ipam: &CniResult) -> Result<(), CniError> {
    let mut keys = Vec::new();
    if ipam.ips.iter().any(|ip| ip.address.addr().is_ipv4()) {
        keys.push("net/ipv4/ip_forward");
    }
    if ipam.ips.iter().any(|ip| ip.address.addr().is_ipv6()) {
        keys.push("net/ipv6/conf/all/forwarding");
    }
    for key in keys {
        if sysctl::read(key).map(|v| v != "1").unwrap_or(true) {
            sysctl::write(key, "1").map_err(sys(key))?;
        }
    }
    Ok(())
}

/// CHECK: the pod interface, its MAC, addresses and routes as prevResult
/// says, and the host side still wired.
fn check(conf: &PodConf, target: &Target, netns: &str, prev: &CniResult) -> Result<(), CniError> {
    let fail = |msg: String| Err(CniError::internal(msg));
    let Some(idx) = prev.sandbox_interface(target.ifname) else {
        return fail(format!("prevResult has no interface {:?} in a sandbox", target.ifname));
    };
    let pod_ns = open_netns(netns)?;
    let pod = Netlink::in_netns(&pod_ns).map_err(sys("netlink in the pod netns"))?;
    let Some(pv) = pod.link(target.ifname).map_err(sys("pod interface"))? else {
        return fail(format!("interface {} is missing from {netns}", target.ifname));
    };
    if pv.kind.as_deref() != Some("veth") {
        return fail(format!("interface {} is a {:?}, expected a veth", target.ifname, pv.kind));
    }
    let want_mac = &prev.interfaces[idx].mac;
    let have_mac = pv.mac.as_ref().map(format_mac).unwrap_or_default();
    if !want_mac.is_empty() && !want_mac.eq_ignore_ascii_case(&have_mac) {
        return fail(format!("interface {} has MAC {have_mac}, prevResult says {want_mac}", target.ifname));
    }
    let have: Vec<IpNet> =
        pod.addresses(Some(pv.index)).map_err(sys("pod addresses"))?.into_iter().map(|(_, a)| a).collect();
    for ip in prev.ips.iter().filter(|ip| ip.interface.is_none_or(|i| i == idx)) {
        if !have.contains(&ip.address) {
            return fail(format!("address {} is missing from {}", ip.address, target.ifname));
        }
    }
    let mut routes = pod.routes(tern_sys::netlink::Family::V4).map_err(sys("pod routes"))?;
    routes.extend(pod.routes(tern_sys::netlink::Family::V6).map_err(sys("pod routes"))?);
    for r in &prev.routes {
        let found = routes.iter().any(|have| have.dst == r.dst && (r.gw.is_none() || have.gw == r.gw));
        if !found {
            return fail(format!(
                "route {}{} is missing from the pod",
                r.dst,
                r.gw.map(|g| format!(" via {g}")).unwrap_or_default()
            ));
        }
    }
    let host = Netlink::new().map_err(sys("netlink"))?;
    let Some(hv) = host.link(&target.host_veth).map_err(sys("host veth"))? else {
        return fail(format!("host veth {} is missing", target.host_veth));
    };
    if let Some(peer) = pv.peer_index {
        if peer != hv.index {
            return fail(format!("interface {} is not paired with {}", target.ifname, target.host_veth));
        }
    }
    if conf.mode == Mode::Bridge {
        let br = host.link(&conf.bridge).map_err(sys("bridge"))?;
        match br {
            Some(br) if hv.master == Some(br.index) => {}
            Some(_) => return fail(format!("{} is not attached to bridge {}", target.host_veth, conf.bridge)),
            None => return fail(format!("bridge {} is missing", conf.bridge)),
        }
    }
    Ok(())
}
