//! tern-bandwidth: traffic shaping of one attachment, chained after a main
//! plugin that made a veth pair (tern in bridge or routed mode, the
//! reference bridge or ptp).
//!
//! * **ingress** (traffic *to* the pod): a token bucket (`tbf`) as the root
//!   qdisc of the host-side veth, whose egress is the pod's ingress;
//! * **egress** (traffic *from* the pod): the host veth's `ingress` qdisc
//!   with a match-all `u32` filter redirecting (`mirred`) every packet to an
//!   ifb device, whose root qdisc is the token bucket. When the host veth
//!   has a `clsact` qdisc already (tern's eBPF fast path, `"dataplane":
//!   "ebpf"`, attaches its program under one), the filter goes under the
//!   clsact's ingress hook at priority [`REDIRECT_PRIORITY`], ahead of the
//!   direct-action BPF filter, and the clsact stays its owner's: DEL removes
//!   the filter, not the qdisc.
//!
//! A shaped pod is taken off the eBPF fast path (as tern-firewall does):
//! packets the fast path hands straight to a pod would skip the host veth's
//! root tbf, so both directions take the kernel path. DEL does not put it
//! back; the pod's entry goes with the pod.
//!
//! Rates are bits per second and bursts bits, as in the reference plugin;
//! the bucket's queue holds 25 ms at the rate plus the burst.
//!
//! The ifb's name is a hash of the owner tag and it carries the alias
//! `tern:<owner tag>`, so DEL finds it without prevResult or netns, and GC
//! finds the ifbs of attachments that are gone. Nothing is written to disk.
use std::collections::HashSet;
use std::net::IpAddr;

use serde::Deserialize;
use sha2::{Digest, Sha256};
use tern_cni::{Bandwidth, CniError, CniResult, Code, Interface, Version};
use tern_sys::netlink::{
    format_mac, IngressFilter, INGRESS_HANDLE, TBF_HANDLE, TC_H_CLSACT_INGRESS, TC_H_INGRESS, TC_H_ROOT,
};
use tern_sys::{LinkInfo, NetNs, Netlink, QdiscInfo, SysError, Tbf};

use crate::meta::common;
use crate::names;
use crate::pod::ALIAS_PREFIX;
use crate::skel::{Plugin, Request};

pub struct BandwidthPlugin;

/// Prefix of the ifb devices tern-bandwidth creates.
pub const IFB_PREFIX: &str = "tb";
/// How long a packet may wait in the bucket's queue, as in the reference.
const LATENCY_MS: u64 = 25;
/// The redirect's priority under someone else's `clsact` qdisc: explicit and
/// small, so it runs before their filters (the fast path's BPF filter gets
/// the kernel's first automatic priority, 49152, and as a direct-action
/// filter decides every packet it sees).
pub const REDIRECT_PRIORITY: u16 = 1;

/// The ifb of the attachment with this owner tag: `tb` + 12 hex characters
/// of sha256(owner tag); 14 bytes, under the kernel's 15.
pub fn ifb_name(owner: &str) -> String {
    let digest = Sha256::digest(owner.as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{IFB_PREFIX}{hex}")
}

const VERSIONS: [Version; 5] = [Version::V0_3_0, Version::V0_3_1, Version::V0_4_0, Version::V1_0_0, Version::V1_1_0];

fn sys(op: &str) -> impl Fn(SysError) -> CniError + '_ {
    move |e| CniError::internal(format!("{op}: {e}"))
}

/// The four top-level keys; when any is present, they are the whole setting
/// and `runtimeConfig.bandwidth` is ignored (as in the reference plugin).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct TopLevel {
    #[serde(default)]
    ingress_rate: Option<u64>,
    #[serde(default)]
    ingress_burst: Option<u64>,
    #[serde(default)]
    egress_rate: Option<u64>,
    #[serde(default)]
    egress_burst: Option<u64>,
}

/// The shaping one invocation asks for, validated. `None` for a direction
/// that is not shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shaping {
    ingress: Option<Tbf>,
    egress: Option<Tbf>,
}

impl Shaping {
    fn is_zero(&self) -> bool {
        self.ingress.is_none() && self.egress.is_none()
    }
}

fn invalid(field: &str, msg: String) -> CniError {
    CniError::invalid_config(format!("{msg} ({field})")).with_details(format!("field: {field}"))
}

/// The token bucket for `rate` bit/s and `burst` bits; both zero means "not
/// shaped". The reference's checks, with the field named.
fn bucket(prefix: &str, dir: &str, rate: u64, burst: u64) -> Result<Option<Tbf>, CniError> {
    let rate_key = format!("{prefix}{dir}Rate");
    let burst_key = format!("{prefix}{dir}Burst");
    match (rate, burst) {
        (0, 0) => return Ok(None),
        (_, 0) => return Err(invalid(&burst_key, format!("if {rate_key} is set, {burst_key} must also be set"))),
        (0, _) => return Err(invalid(&rate_key, format!("if {burst_key} is set, {rate_key} must also be set"))),
        _ => {}
    }
    if burst / 8 >= u32::MAX as u64 {
        return Err(invalid(&burst_key, format!("{burst_key} cannot be more than 4GB")));
    }
    if rate < 8 {
        return Err(invalid(&rate_key, format!("{rate_key} must be at least 8 bits per second, got {rate}")));
    }
    if burst < 8 {
        return Err(invalid(&burst_key, format!("{burst_key} must be at least 8 bits, got {burst}")));
    }
    let rate = rate / 8;
    let burst = (burst / 8) as u32;
    let queued = (rate as u128 * LATENCY_MS as u128 / 1000).min(u32::MAX as u128) as u32;
    Ok(Some(Tbf { rate, burst, limit: queued.saturating_add(burst) }))
}

fn load_shaping(req: &Request) -> Result<Shaping, CniError> {
    let top: TopLevel = req.conf.options()?;
    let any_top = top.ingress_rate.is_some()
        || top.ingress_burst.is_some()
        || top.egress_rate.is_some()
        || top.egress_burst.is_some();
    let (bw, prefix) = if any_top {
        let bw = Bandwidth {
            ingress_rate: top.ingress_rate.unwrap_or(0),
            ingress_burst: top.ingress_burst.unwrap_or(0),
            egress_rate: top.egress_rate.unwrap_or(0),
            egress_burst: top.egress_burst.unwrap_or(0),
        };
        (bw, "")
    } else {
        (req.conf.runtime_config.bandwidth.clone().unwrap_or_default(), "runtimeConfig.bandwidth.")
    };
    Ok(Shaping {
        ingress: bucket(prefix, "ingress", bw.ingress_rate, bw.ingress_burst)?,
        egress: bucket(prefix, "egress", bw.egress_rate, bw.egress_burst)?,
    })
}

/// Who this invocation is about.
struct Target {
    owner: String,
    ifb: String,
}

impl Target {
    fn of(req: &Request) -> Target {
        let owner = names::owner_tag(&req.conf.name, req.env.container_id(), req.env.ifname());
        Target { ifb: ifb_name(&owner), owner }
    }
}

fn prev_result(req: &Request) -> Result<&CniResult, CniError> {
    req.conf.prev_result.as_ref().ok_or_else(|| {
        CniError::invalid_config("must be called as a chained plugin: required prevResult missing (prevResult)")
    })
}

/// The host end of the pod's veth: the peer of CNI_IFNAME, which prevResult
/// must list as a host interface (empty sandbox).
fn host_veth(req: &Request, prev: &CniResult) -> Result<LinkInfo, CniError> {
    let ifname = req.env.ifname();
    let path = req.env.netns.as_deref().unwrap_or_default();
    let ns = NetNs::open(path)
        .map_err(|e| CniError::new(Code::InvalidEnv, format!("failed to open netns {path:?} (CNI_NETNS): {e}")))?;
    let (host, pod_link) = peer_of(&ns, ifname)?;
    let not_veth = || CniError::internal(format!("container interface {ifname} has no veth peer in this namespace"));
    let pod_link = pod_link.ok_or_else(|| CniError::internal(format!("interface {ifname} not found in {path}")))?;
    if pod_link.kind.as_deref() != Some("veth") {
        return Err(not_veth());
    }
    let peer = pod_link.peer_index.ok_or_else(not_veth)?;
    let hv = host
        .link_by_index(peer)
        .map_err(sys("host veth"))?
        .filter(|h| h.kind.as_deref() == Some("veth") && h.peer_index == Some(pod_link.index))
        .ok_or_else(not_veth)?;
    if !prev.interfaces.iter().any(|i| i.sandbox.is_empty() && i.name == hv.name) {
        return Err(CniError::internal(format!(
            "host veth {} (the peer of {ifname}) is not a host interface in prevResult",
            hv.name
        )));
    }
    Ok(hv)
}

/// A host netlink socket and CNI_IFNAME in the pod netns.
fn peer_of(ns: &NetNs, ifname: &str) -> Result<(Netlink, Option<LinkInfo>), CniError> {
    let pod = Netlink::in_netns(ns).map_err(sys("netlink in the pod netns"))?;
    let link = pod.link(ifname).map_err(sys("pod interface"))?;
    Ok((Netlink::new().map_err(sys("netlink"))?, link))
}

/// What this ADD has made so far.
#[derive(Default)]
struct Made {
    root_tbf: bool,
    /// The ifb's index.
    ifb: Option<u32>,
    ingress_qdisc: bool,
    /// The redirect under a `clsact` qdisc that was there before.
    clsact_redirect: bool,
}

fn undo(host: &Netlink, hv: &LinkInfo, target: &Target, made: &Made) {
    if made.ingress_qdisc {
        let _ = host.delete_qdisc(hv.index, TC_H_INGRESS, INGRESS_HANDLE);
    }
    // Before the ifb: a redirect to a deleted link drops every packet.
    if let (true, Some(ifb)) = (made.clsact_redirect, made.ifb) {
        let _ = remove_redirects(host, hv, |f| f.redirect_to == Some(ifb), IngressQdisc::Keep);
    }
    if made.ifb.is_some() {
        let _ = host.delete_link(&target.ifb);
    }
    if made.root_tbf {
        let _ = host.delete_qdisc(hv.index, TC_H_ROOT, TBF_HANDLE);
    }
}

fn setup(
    host: &Netlink,
    hv: &LinkInfo,
    target: &Target,
    shaping: &Shaping,
    made: &mut Made,
) -> Result<Option<LinkInfo>, CniError> {
    if let Some(tbf) = &shaping.ingress {
        host.add_root_tbf(hv.index, tbf).map_err(|e| match e {
            SysError::Exists(_) => {
                CniError::internal(format!("{} already has a root qdisc: DEL the attachment first", hv.name))
            }
            e => CniError::internal(format!("failed to shape traffic to the pod on {}: {e}", hv.name)),
        })?;
        made.root_tbf = true;
    }
    let Some(tbf) = &shaping.egress else { return Ok(None) };
    let ifb =
        host.create_ifb(&target.ifb, Some(hv.mtu), Some(&format!("{ALIAS_PREFIX}{}", target.owner))).map_err(|e| {
            match e {
                SysError::Exists(_) => {
                    CniError::internal(format!("ifb {} already exists: DEL the attachment first", target.ifb))
                }
                e => CniError::internal(format!("failed to create ifb {}: {e}", target.ifb)),
            }
        })?;
    made.ifb = Some(ifb.index);
    host.set_up(ifb.index).map_err(sys(&format!("failed to bring ifb {} up", target.ifb)))?;
    host.add_root_tbf(ifb.index, tbf).map_err(sys(&format!("failed to shape traffic on ifb {}", target.ifb)))?;
    let qdiscs = host.qdiscs(hv.index).map_err(sys(&format!("qdiscs of {}", hv.name)))?;
    if qdiscs.iter().any(|q| q.is_ingress() && q.kind == "clsact") {
        // Someone else's (the eBPF fast path's): share it, ahead of its filters.
        host.add_ingress_redirect_at(hv.index, ifb.index, TC_H_CLSACT_INGRESS, REDIRECT_PRIORITY).map_err(sys(
            &format!("failed to redirect traffic from {} to {} under its clsact qdisc", hv.name, target.ifb),
        ))?;
        made.clsact_redirect = true;
    } else {
        host.add_ingress_qdisc(hv.index).map_err(|e| match e {
            SysError::Exists(_) => CniError::internal(format!("{} already has an ingress qdisc", hv.name)),
            e => CniError::internal(format!("failed to add the ingress qdisc to {}: {e}", hv.name)),
        })?;
        made.ingress_qdisc = true;
        host.add_ingress_redirect(hv.index, ifb.index)
            .map_err(sys(&format!("failed to redirect traffic from {} to {}", hv.name, target.ifb)))?;
    }
    Ok(Some(host.link_by_index(ifb.index).map_err(sys("ifb"))?.unwrap_or(ifb)))
}

/// The addresses of the pod's interface in prevResult.
fn pod_addrs(req: &Request, prev: &CniResult) -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = common::sandbox_ips(prev, req.env.ifname()).iter().map(|a| a.addr()).collect();
    addrs.dedup();
    addrs
}

impl Plugin for BandwidthPlugin {
    fn name(&self) -> &'static str {
        "tern-bandwidth"
    }

    fn supported_versions(&self) -> &'static [Version] {
        &VERSIONS
    }

    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let shaping = load_shaping(req)?;
        let prev = prev_result(req)?;
        if shaping.is_zero() {
            return Ok(prev.clone());
        }
        let hv = host_veth(req, prev)?;
        let target = Target::of(req);
        let host = Netlink::new().map_err(sys("netlink"))?;
        let mut made = Made::default();
        // The fast path would carry the pod's packets past the qdiscs.
        let shaped = setup(&host, &hv, &target, &shaping, &mut made)
            .and_then(|ifb| crate::pod::fastpath::bypass_off(&pod_addrs(req, prev)).map(|_| ifb));
        let ifb = match shaped {
            Ok(ifb) => ifb,
            Err(e) => {
                undo(&host, &hv, &target, &made);
                return Err(e);
            }
        };
        let mut result = prev.clone();
        if let Some(ifb) = ifb {
            result.interfaces.push(Interface {
                name: ifb.name.clone(),
                mac: ifb.mac.as_ref().map(format_mac).unwrap_or_default(),
                mtu: Some(ifb.mtu),
                ..Default::default()
            });
        }
        Ok(result)
    }

    /// Removes the ifb (by name) and, if the host veth is still there, its
    /// root tbf and the redirect (with the ingress qdisc, when tern-bandwidth
    /// made that; a clsact is left to its owner). Reads neither the shaping
    /// settings nor prevResult, so a DEL after a failed ADD, after a crash,
    /// with the netns gone or without prevResult removes the same things.
    fn del(&self, req: &Request) -> Result<(), CniError> {
        let target = Target::of(req);
        let host = Netlink::new().map_err(sys("netlink"))?;
        let mut errors = Vec::new();
        let ifb = match host.link(&target.ifb) {
            Ok(l) => l.filter(|l| l.kind.as_deref() == Some("ifb")),
            Err(e) => {
                errors.push(CniError::internal(format!("ifb {}: {e}", target.ifb)));
                None
            }
        };
        if let Some(hv) = del_host_veth(req, &host) {
            if let Err(e) = unshape_host_veth(&host, &hv, ifb.as_ref()) {
                errors.push(e);
            }
        }
        if let Some(ifb) = ifb {
            match host.delete_link_index(ifb.index) {
                Ok(_) | Err(SysError::NotFound(_)) => {}
                Err(e) => errors.push(CniError::internal(format!("failed to delete ifb {}: {e}", target.ifb))),
            }
        }
        join_errors(errors)
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let shaping = load_shaping(req)?;
        let prev = prev_result(req)?;
        if shaping.is_zero() {
            return Ok(());
        }
        let hv = host_veth(req, prev)?;
        let target = Target::of(req);
        let host = Netlink::new().map_err(sys("netlink"))?;
        let qdiscs = host.qdiscs(hv.index).map_err(sys("qdiscs of the host veth"))?;
        if let Some(want) = &shaping.ingress {
            let root = qdiscs.iter().find(|q| q.is_root());
            check_tbf(&format!("host veth {}", hv.name), "ingress", root.and_then(reported), want)?;
        }
        if let Some(want) = &shaping.egress {
            let fail = |m: String| Err(CniError::internal(m));
            let Some(ifb) = host.link(&target.ifb).map_err(sys("ifb"))?.filter(|l| l.kind.as_deref() == Some("ifb"))
            else {
                return fail(format!("ifb {} is missing (egress shaping)", target.ifb));
            };
            if !qdiscs.iter().any(|q| q.is_ingress()) {
                return fail(format!("host veth {} has no ingress or clsact qdisc (egress shaping)", hv.name));
            }
            let filters = host.ingress_filters(hv.index).map_err(sys("filters of the host veth"))?;
            let Some(redirect) = filters.iter().find(|f| f.redirect_to == Some(ifb.index)) else {
                return fail(format!("host veth {} does not redirect to ifb {} (egress shaping)", hv.name, ifb.name));
            };
            // A filter of higher precedence (the fast path's BPF filter)
            // could take packets before they reach the redirect.
            if let Some(first) = filters.iter().find(|f| f.priority < redirect.priority) {
                return fail(format!(
                    "host veth {}: a {} filter (priority {}) runs before the redirect to ifb {} (priority {}) \
                     (egress shaping)",
                    hv.name, first.kind, first.priority, ifb.name, redirect.priority
                ));
            }
            let ifb_q = host.qdiscs(ifb.index).map_err(sys("qdiscs of the ifb"))?;
            let root = ifb_q.iter().find(|q| q.is_root());
            check_tbf(&format!("ifb {}", ifb.name), "egress", root.and_then(reported), want)?;
        }
        let fast = crate::pod::fastpath::still_fast(&pod_addrs(req, prev))?;
        if !fast.is_empty() {
            return Err(CniError::internal(format!(
                "{fast:?} on the eBPF fast path: its traffic bypasses tern-bandwidth's qdiscs"
            )));
        }
        Ok(())
    }

    fn status(&self, req: &Request) -> Result<(), CniError> {
        load_shaping(req).map(drop)
    }

    /// Deletes the ifbs of this network whose attachment is not listed, and
    /// first the redirects to them that host veths still have.
    fn gc(&self, req: &Request) -> Result<(), CniError> {
        let valid = req.conf.valid_attachments.as_ref().ok_or_else(|| {
            CniError::invalid_config("GC needs the list of valid attachments (cni.dev/valid-attachments)")
        })?;
        let net_tag = names::network_tag(&req.conf.name);
        let keep: HashSet<String> = valid.iter().map(|a| names::attachment_tag(&a.container_id, &a.ifname)).collect();
        let host = Netlink::new().map_err(sys("netlink"))?;
        let mut errors = Vec::new();
        let links = host.links().map_err(sys("failed to list links"))?;
        let stale: Vec<&LinkInfo> = links
            .iter()
            .filter(|l| l.kind.as_deref() == Some("ifb") && l.name.starts_with(IFB_PREFIX))
            .filter(|l| {
                let Some(tag) = l.alias.as_deref().and_then(|a| a.strip_prefix(ALIAS_PREFIX)) else { return false };
                let Some((n, a)) = names::split_owner_tag(tag) else { return false };
                n == net_tag && !keep.contains(a) && ifb_name(tag) == l.name
            })
            .collect();
        if !stale.is_empty() {
            // A redirect to a deleted ifb drops everything its veth receives.
            let doomed: HashSet<u32> = stale.iter().map(|l| l.index).collect();
            for veth in links.iter().filter(|l| l.kind.as_deref() == Some("veth")) {
                let ours = |f: &IngressFilter| f.redirect_to.is_some_and(|to| doomed.contains(&to));
                if let Err(e) = remove_redirects(&host, veth, ours, IngressQdisc::DeleteIfOnlyOurs) {
                    errors.push(e);
                }
            }
        }
        for link in stale {
            match host.delete_link_index(link.index) {
                Ok(_) | Err(SysError::NotFound(_)) => {}
                Err(e) => errors.push(CniError::internal(format!("failed to delete stale ifb {}: {e}", link.name))),
            }
        }
        join_errors(errors)
    }
}

/// A tbf qdisc's parameters and raw bucket ticks.
fn reported(q: &QdiscInfo) -> Option<(Tbf, u32)> {
    q.tbf.zip(q.tbf_buffer)
}

/// Compare a token bucket with the configured one.
fn check_tbf(on: &str, dir: &str, have: Option<(Tbf, u32)>, want: &Tbf) -> Result<(), CniError> {
    let Some((have, buffer)) = have else {
        return Err(CniError::internal(format!("{on} has no tbf root qdisc ({dir} shaping)")));
    };
    if want.matches(&have, buffer) {
        return Ok(());
    }
    let (what, h, w) = if have.rate != want.rate {
        ("rate", have.rate, want.rate)
    } else if have.limit != want.limit {
        ("limit", have.limit as u64, want.limit as u64)
    } else {
        ("burst", have.burst as u64, want.burst as u64)
    };
    Err(CniError::internal(format!("{on}: tbf {what} is {h} bytes, configured {w} ({dir} shaping)")))
}

/// The host veth for DEL, best effort: the peer of CNI_IFNAME when the netns
/// is there, else tern's own host veth of this attachment, else the one veth
/// prevResult lists on the host.
fn del_host_veth(req: &Request, host: &Netlink) -> Option<LinkInfo> {
    let ifname = req.env.ifname();
    let from_netns = req.env.netns.as_deref().and_then(|p| NetNs::open(p).ok()).and_then(|ns| {
        let pod = Netlink::in_netns(&ns).ok()?;
        let pl = pod.link(ifname).ok()??;
        let peer = pl.peer_index.filter(|_| pl.kind.as_deref() == Some("veth"))?;
        host.link_by_index(peer).ok()?.filter(|h| h.kind.as_deref() == Some("veth") && h.peer_index == Some(pl.index))
    });
    if from_netns.is_some() {
        return from_netns;
    }
    let owner = names::owner_tag(&req.conf.name, req.env.container_id(), ifname);
    let tern_veth = host
        .link(&names::host_veth(req.env.container_id(), ifname))
        .ok()
        .flatten()
        .filter(|l| l.alias.as_deref() == Some(&format!("{ALIAS_PREFIX}{owner}")));
    if tern_veth.is_some() {
        return tern_veth;
    }
    let prev = req.conf.prev_result.as_ref()?;
    let mut veths = prev
        .interfaces
        .iter()
        .filter(|i| i.sandbox.is_empty())
        .filter_map(|i| host.link(&i.name).ok().flatten())
        .filter(|l| l.kind.as_deref() == Some("veth"));
    let first = veths.next()?;
    veths.next().is_none().then_some(first)
}

fn gone(e: &SysError) -> bool {
    e.is_not_found() || e.errno() == Some(nix::libc::ENODEV)
}

/// Remove the root tbf and this attachment's redirect from the host veth:
/// with the `ingress` qdisc when that redirects nowhere else, else (under a
/// `clsact`, or someone else's `ingress`) only the filter. A redirect to a
/// link that is gone counts as this attachment's when tern-bandwidth could
/// have made it (an ifb deleted before its filter); it would drop every
/// packet the pod sends.
fn unshape_host_veth(host: &Netlink, hv: &LinkInfo, ifb: Option<&LinkInfo>) -> Result<(), CniError> {
    let qdiscs = match host.qdiscs(hv.index) {
        Ok(q) => q,
        Err(e) if gone(&e) => return Ok(()),
        Err(e) => return Err(CniError::internal(format!("qdiscs of {}: {e}", hv.name))),
    };
    let mut errors = Vec::new();
    for q in qdiscs.iter().filter(|q| q.is_root() && q.kind == "tbf") {
        if let Err(e) = host.delete_qdisc(hv.index, TC_H_ROOT, q.handle) {
            if !gone(&e) {
                errors.push(CniError::internal(format!("failed to delete the tbf of {}: {e}", hv.name)));
            }
        }
    }
    let plain_ingress = qdiscs.iter().any(|q| q.is_ingress() && q.kind == "ingress");
    let ours = |f: &IngressFilter| {
        let Some(to) = f.redirect_to else { return false };
        let could_be_ours = plain_ingress || (f.kind == "u32" && f.priority == REDIRECT_PRIORITY);
        ifb.is_some_and(|l| l.index == to) || (could_be_ours && !link_exists(host, to))
    };
    // An `ingress` qdisc is tern-bandwidth's unless it redirects somewhere
    // else; an empty one is a crashed ADD's.
    if let Err(e) = remove_redirects(host, hv, ours, IngressQdisc::DeleteUnlessForeign) {
        errors.push(e);
    }
    join_errors(errors)
}

/// What [`remove_redirects`] may do with an `ingress` qdisc (a `clsact` is
/// never deleted).
#[derive(Clone, Copy, PartialEq, Eq)]
enum IngressQdisc {
    /// Only remove filters (an ADD's undo: the qdisc was there before).
    Keep,
    /// Delete it when it has redirects and all are ours (GC: it touches
    /// every veth of the node).
    DeleteIfOnlyOurs,
    /// Delete it when no redirect of it is someone else's, even without any
    /// (DEL of this attachment's veth).
    DeleteUnlessForeign,
}

/// Remove the redirects that `ours` selects from the ingress hook of `hv`:
/// with the `ingress` qdisc as a whole when `ingress` allows it, else
/// filter by filter.
fn remove_redirects(
    host: &Netlink,
    hv: &LinkInfo,
    ours: impl Fn(&IngressFilter) -> bool,
    ingress: IngressQdisc,
) -> Result<(), CniError> {
    let failed = |what: &str, e: SysError| CniError::internal(format!("{what} of {}: {e}", hv.name));
    let filters = match host.ingress_filters(hv.index) {
        Ok(f) => f,
        Err(e) if gone(&e) => return Ok(()),
        Err(e) => return Err(failed("filters", e)),
    };
    let redirects: Vec<&IngressFilter> = filters.iter().filter(|f| f.redirect_to.is_some()).collect();
    let all_ours = redirects.iter().all(|f| ours(f));
    let delete_qdisc = match ingress {
        IngressQdisc::Keep => false,
        IngressQdisc::DeleteIfOnlyOurs => all_ours && !redirects.is_empty(),
        IngressQdisc::DeleteUnlessForeign => all_ours,
    };
    if delete_qdisc {
        let qdiscs = match host.qdiscs(hv.index) {
            Ok(q) => q,
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(failed("qdiscs", e)),
        };
        if let Some(q) = qdiscs.iter().find(|q| q.is_ingress() && q.kind == "ingress") {
            return match host.delete_qdisc(hv.index, TC_H_INGRESS, q.handle) {
                Ok(_) => Ok(()),
                Err(e) if gone(&e) => Ok(()),
                Err(e) => Err(failed("failed to delete the ingress qdisc", e)),
            };
        }
    }
    let mut errors = Vec::new();
    for f in redirects.into_iter().filter(|f| ours(f)) {
        match host.delete_ingress_filter(f) {
            Ok(_) => {}
            Err(e) if gone(&e) => {}
            Err(e) => errors.push(failed(
                &format!("failed to delete the redirect to link index {}", f.redirect_to.unwrap_or_default()),
                e,
            )),
        }
    }
    join_errors(errors)
}

fn link_exists(host: &Netlink, index: u32) -> bool {
    !matches!(host.link_by_index(index), Ok(None))
}

fn join_errors(mut errors: Vec<CniError>) -> Result<(), CniError> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(CniError::internal(errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifb_names_are_short_and_distinct() {
        let a = ifb_name("net/ctr/eth0");
        assert_eq!(a.len(), 14);
        assert!(a.starts_with(IFB_PREFIX));
        assert_eq!(a, ifb_name("net/ctr/eth0"));
        assert_ne!(a, ifb_name("net/ctr/eth1"));
        assert_ne!(a, ifb_name("net2/ctr/eth0"));
    }

    #[test]
    fn buckets_follow_the_reference_rules() {
        assert_eq!(bucket("", "ingress", 0, 0).unwrap(), None);
        let t = bucket("", "ingress", 8_000_000, 80_000).unwrap().unwrap();
        assert_eq!(t, Tbf { rate: 1_000_000, burst: 10_000, limit: 25_000 + 10_000 });
        let e = bucket("", "ingress", 1000, 0).unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("ingressBurst must also be set"), "{}", e.msg);
        let e = bucket("runtimeConfig.bandwidth.", "egress", 0, 1000).unwrap_err();
        assert!(e.msg.contains("(runtimeConfig.bandwidth.egressRate)"), "{}", e.msg);
        let e = bucket("", "egress", 1000, 8 * u32::MAX as u64).unwrap_err();
        assert!(e.msg.contains("cannot be more than 4GB"), "{}", e.msg);
        assert!(bucket("", "egress", 1000, 8 * (u32::MAX as u64 - 1)).is_ok());
        assert!(bucket("", "egress", u64::MAX, 8000).unwrap().unwrap().limit == u32::MAX);
    }
}
