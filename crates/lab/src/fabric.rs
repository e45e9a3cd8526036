//! The lab's namespaces and links, made with tern-sys (netlink, no `ip`
//! processes). Every link is created directly inside a lab namespace (a
//! veth's peer is born in its target namespace), so the machine's root
//! namespace never holds a lab link, route or address, not even for an
//! instant.
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use anyhow::{Context, Result};
use ipnet::{IpNet, Ipv4Net};
use tern_sys::{netns, Family, NetNs, Netlink, RouteSpec};

use crate::spec::{self, LabSpec};

pub fn netns_path(name: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(name)
}

/// Creates `/run/netns/<name>` (as `ip netns add` does) with loopback up.
pub fn create_netns(name: &str) -> Result<NetNs> {
    let ns = netns::create(netns_path(name)).with_context(|| format!("creating netns {name}"))?;
    let nl = Netlink::in_netns(&ns)?;
    if let Some(lo) = nl.link("lo")? {
        nl.set_up(lo.index)?;
    }
    Ok(ns)
}

/// Every namespace of `lab` present on the machine (by name).
pub fn lab_namespaces(lab: &spec::Lab) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| lab.owns_netns(n))
                .collect()
        })
        .unwrap_or_default();
    // Pods before their nodes, nodes before the fabric (cosmetic: deleting
    // a namespace deletes its links whatever the order).
    out.sort_by_key(|n| std::cmp::Reverse(n.len()));
    out
}

pub fn remove_netns(name: &str) -> Result<()> {
    // A node of the eBPF dataplane has a fast-path instance pinned for its
    // namespace; unpin it while the namespace can still be named.
    if let Ok(ns) = NetNs::open(netns_path(name)) {
        let _ = ns.enter(tern_bpf::unpin_current_netns);
    }
    netns::remove(netns_path(name)).with_context(|| format!("removing netns {name}"))
}

fn write_sysctl(ns: &NetNs, key: &str, value: &str) -> Result<()> {
    ns.enter(|| tern_sys::sysctl::write(key, value))?.with_context(|| format!("sysctl {key}={value}"))
}

fn host(ip: Ipv4Addr, prefix: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new(ip, prefix).expect("prefix"))
}

/// The fabric: one bridge per subnet with the router's address on it, the
/// external segment, forwarding on.
pub fn build_fabric(names: &spec::Lab, lab: &LabSpec) -> Result<NetNs> {
    let ns = create_netns(&names.fabric())?;
    let nl = Netlink::in_netns(&ns)?;
    write_sysctl(&ns, "net.ipv4.ip_forward", "1")?;
    for s in 1..=lab.subnets {
        ensure_segment(&nl, s)?;
    }
    // The external host hangs off the router on its own segment.
    let ext = create_netns(&names.external())?;
    nl.create_veth("ext0", "eth0", &ext, None, None, None)?;
    let ext0 = nl.link("ext0")?.context("ext0 after creating it")?;
    nl.add_address(ext0.index, host(spec::EXTERNAL_GW, 24), true)?;
    nl.set_up(ext0.index)?;
    let enl = Netlink::in_netns(&ext)?;
    let eth0 = enl.link("eth0")?.context("external eth0")?;
    enl.add_address(eth0.index, host(spec::EXTERNAL_IP, 24), true)?;
    enl.set_up(eth0.index)?;
    enl.add_route(&RouteSpec::default_route(Family::V4).via(IpAddr::V4(spec::EXTERNAL_GW)))?;
    Ok(ns)
}

fn ensure_segment(nl: &Netlink, s: u8) -> Result<u32> {
    let name = format!("seg{s}");
    if let Some(l) = nl.link(&name)? {
        return Ok(l.index);
    }
    let br = nl.create_bridge(&name, None)?;
    nl.add_address(br.index, host(spec::gateway(s), 24), true)?;
    nl.set_up(br.index)?;
    Ok(br.index)
}

/// Node `i`: its namespace, its underlay leg on its subnet's segment, a
/// default route via the router, forwarding on.
pub fn build_node(names: &spec::Lab, lab: &LabSpec, fabric: &NetNs, i: u8) -> Result<NetNs> {
    let s = spec::subnet_of(lab, i);
    let name = names.node_netns(i);
    let ns = create_netns(&name)?;
    let fnl = Netlink::in_netns(fabric)?;
    let seg = ensure_segment(&fnl, s)?;
    let leg = spec::node_name(i);
    fnl.create_veth(&leg, "eth0", &ns, None, None, None).with_context(|| format!("underlay link of node {leg}"))?;
    let l = fnl.link(&leg)?.context("node leg after creating it")?;
    fnl.set_master(l.index, seg)?;
    fnl.set_up(l.index)?;
    let nl = Netlink::in_netns(&ns)?;
    let eth0 = nl.link("eth0")?.context("node eth0")?;
    nl.add_address(eth0.index, host(spec::node_ip(lab, i), 24), true)?;
    nl.set_up(eth0.index)?;
    nl.add_route(&RouteSpec::default_route(Family::V4).via(IpAddr::V4(spec::gateway(s))))?;
    write_sysctl(&ns, "net.ipv4.ip_forward", "1")?;
    Ok(ns)
}
