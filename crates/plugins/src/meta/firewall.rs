//! tern-firewall: isolation between networks on one node, with nftables.
//!
//! # Layout (table `inet tern_firewall`)
//!
//! ```text
//! chain forward   filter/forward priority filter, policy accept:
//!                   ct state established,related accept
//!                   ct status dnat accept            (published host ports)
//!                   ip daddr vmap @to4               (destination pod -> its network's chain)
//!                   ip6 daddr vmap @to6
//! map to4/to6     pod address : jump i<hash>          (one element per pod address)
//! set pods4/pods6 every pod address                   (one element per pod address)
//! set i<hash>_4/6 the pod addresses of one network    (one element per pod address)
//! chain i<hash>   per network (its ingressPolicy):
//!                   ip saddr @i<hash>_4 accept        (same network)
//!                   ip6 saddr @i<hash>_6 accept
//!     open:         ip saddr @pods4 drop              (a pod of another network)
//!                   ip6 saddr @pods6 drop
//!     same-bridge:  iifname "<bridge>" accept         (when the pod sits on a bridge)
//!                   drop
//! ```
//!
//! The rule count does not grow with pods: a packet costs one verdict-map
//! lookup on its destination and one or two set lookups on its source. Pods of
//! networks without tern-firewall are not known and so not isolated. (`pods4`
//! duplicates the keys of `to4` because a chain that `to4` jumps to may not
//! look `to4` up: the kernel counts that as a loop.)
//!
//! `ingressPolicy`:
//! * `open` (default): a pod accepts new connections from anything but the
//!   pods of other networks (that have tern-firewall);
//! * `same-bridge`: a pod accepts new connections only from pods of its own
//!   network and from its own bridge.
//!
//! In both, replies (established/related) pass, and so do connections a
//! host port (tern-portmap or any DNAT on the node) forwards to the pod:
//! publishing a port is an explicit decision to expose it.
//!
//! Pods of tern's eBPF dataplane (`"dataplane": "ebpf"`) skip the node's
//! forward chain when both ends are local fast-path pods; ADD therefore
//! takes the pod off the fast path (its endpoint entry loses the fast flag),
//! so its traffic in both directions meets this table, and CHECK fails if it
//! is back on it.
//!
//! Every element carries the owner tag, so DEL needs neither prevResult nor
//! the netns, and GC finds stale attachments. A network's chain and sets go
//! with its last pod, the table with the last pod of all.
use std::collections::HashSet;
use std::fmt::Write as _;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use tern_cni::{CniError, CniResult, Code};

use super::common::{self, Groups, Listing};
use crate::names;
use crate::skel::{Plugin, Request};

pub const TABLE: &str = "tern_firewall";
const FAMILY: &str = "inet";
const TO4: &str = "to4";
const TO6: &str = "to6";
const PODS4: &str = "pods4";
const PODS6: &str = "pods6";

pub struct FirewallPlugin;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Open,
    SameBridge,
}

/// Keys of the reference firewall (`backend`, `iptablesAdminChainName`,
/// `firewalldZone`) are accepted and ignored: tern-firewall always uses its
/// own nftables table.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FirewallConf {
    #[serde(default)]
    ingress_policy: Option<String>,
}

impl FirewallConf {
    fn policy(req: &Request) -> Result<Policy, CniError> {
        let conf: FirewallConf = req.conf.options()?;
        match conf.ingress_policy.as_deref() {
            None | Some("") | Some("open") => Ok(Policy::Open),
            Some("same-bridge") => Ok(Policy::SameBridge),
            Some("isolated") => Err(CniError::unsupported_field("ingressPolicy", &serde_json::json!("isolated"))),
            Some(other) => Err(CniError::invalid_config(format!(
                "invalid ingressPolicy: {other:?} is not one of \"open\", \"same-bridge\""
            ))
            .with_details("field: ingressPolicy")),
        }
    }
}

fn group_chain(network: &str) -> String {
    common::network_object("i", network)
}

fn is_group_chain(name: &str) -> bool {
    name.len() == 11 && name.starts_with('i') && name[1..].bytes().all(|b| b.is_ascii_hexdigit())
}

struct FirewallGroups;

impl Groups for FirewallGroups {
    fn of_set(&self, name: &str) -> Option<String> {
        let (chain, _) = name.split_once('_')?;
        is_group_chain(chain).then(|| chain.to_string())
    }
    fn of_chain(&self, name: &str) -> Option<String> {
        is_group_chain(name).then(|| name.to_string())
    }
}

fn to_map(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        TO4
    } else {
        TO6
    }
}

fn pods_set(ip: &IpAddr) -> &'static str {
    if ip.is_ipv4() {
        PODS4
    } else {
        PODS6
    }
}

fn member_set(group: &str, ip: &IpAddr) -> String {
    format!("{group}_{}", if ip.is_ipv4() { "4" } else { "6" })
}

fn add_script(
    group: &str,
    policy: Policy,
    bridge: Option<&str>,
    owner: &str,
    ips: &[IpAddr],
    listing: Option<&Listing>,
) -> String {
    let t = format!("{FAMILY} {TABLE}");
    let mut s = format!(
        "add table {t}\n\
         add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}\n\
         add map {t} {TO4} {{ type ipv4_addr : verdict; }}\n\
         add map {t} {TO6} {{ type ipv6_addr : verdict; }}\n\
         add set {t} {PODS4} {{ type ipv4_addr; }}\n\
         add set {t} {PODS6} {{ type ipv6_addr; }}\n\
         flush chain {t} forward\n\
         add rule {t} forward ct state established,related accept\n\
         add rule {t} forward ct status dnat accept\n\
         add rule {t} forward ip daddr vmap @{TO4}\n\
         add rule {t} forward ip6 daddr vmap @{TO6}\n\
         add set {t} {group}_4 {{ type ipv4_addr; }}\n\
         add set {t} {group}_6 {{ type ipv6_addr; }}\n\
         add chain {t} {group}\n\
         flush chain {t} {group}\n\
         add rule {t} {group} ip saddr @{group}_4 accept\n\
         add rule {t} {group} ip6 saddr @{group}_6 accept\n"
    );
    match policy {
        Policy::Open => {
            let _ = write!(
                s,
                "add rule {t} {group} ip saddr @{PODS4} drop\nadd rule {t} {group} ip6 saddr @{PODS6} drop\n"
            );
        }
        Policy::SameBridge => {
            if let Some(br) = bridge {
                let _ = writeln!(s, "add rule {t} {group} iifname {} accept", common::quote(br));
            }
            let _ = writeln!(s, "add rule {t} {group} drop");
        }
    }
    // Replace this attachment's elements (a repeated ADD), and take over an
    // address left by a dead attachment of the same network (IPAM gave it to
    // us, so its former owner is gone); other networks were refused before.
    if let Some(l) = listing {
        let ours: HashSet<String> = ips.iter().map(|ip| ip.to_string()).collect();
        for (set, el) in l.elements() {
            let same_key = el.key_strings().len() == 1 && ours.contains(&el.key_strings()[0]);
            if el.comment == owner || same_key {
                let _ = writeln!(s, "delete element {t} {} {{ {} }}", set.name, el.key_nft(&set.types));
            }
        }
    }
    for ip in ips {
        let _ = writeln!(s, "add element {t} {} {{ {ip} comment \"{owner}\" : jump {group} }}", to_map(ip));
        let _ = writeln!(s, "add element {t} {} {{ {ip} comment \"{owner}\" }}", pods_set(ip));
        let _ = writeln!(s, "add element {t} {} {{ {ip} comment \"{owner}\" }}", member_set(group, ip));
    }
    s
}

/// An address of ours already registered by a pod of another network: the
/// firewall could not tell the two apart.
fn foreign_owner<'a>(l: &'a Listing, ip: &IpAddr, owner: &str) -> Option<&'a str> {
    let net = names::split_owner_tag(owner).map(|(n, _)| n);
    let el = l.set(to_map(ip))?.elements.iter().find(|e| e.key_strings() == [ip.to_string()])?;
    let other_net = names::split_owner_tag(&el.comment).map(|(n, _)| n);
    (el.comment != owner && other_net != net).then_some(el.comment.as_str())
}

fn pod_ips(req: &Request) -> Result<(&CniResult, Vec<IpAddr>), CniError> {
    let prev = req.conf.prev_result.as_ref().ok_or_else(|| {
        CniError::invalid_config("tern-firewall must be called as a chained plugin: prevResult is missing (prevResult)")
    })?;
    let mut ips: Vec<IpAddr> = common::sandbox_ips(prev, req.env.ifname()).iter().map(IpNet::addr).collect();
    ips.dedup();
    Ok((prev, ips))
}

impl Plugin for FirewallPlugin {
    fn name(&self) -> &'static str {
        "tern-firewall"
    }

    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let policy = FirewallConf::policy(req)?;
        let (prev, ips) = pod_ips(req)?;
        if ips.is_empty() {
            return Ok(prev.clone());
        }
        let owner = common::owner(req);
        let group = group_chain(&req.conf.name);
        let bridge = match policy {
            Policy::SameBridge => common::route_interface(ips[0])?.filter(|i| common::is_bridge(i)),
            Policy::Open => None,
        };
        let _guard = common::lock()?;
        let listing = Listing::load(FAMILY, TABLE)?;
        if let Some(l) = &listing {
            for ip in &ips {
                if let Some(other) = foreign_owner(l, ip, &owner) {
                    return Err(CniError::internal(format!(
                        "address {ip} is already registered by attachment {other} of another network: \
                         tern-firewall isolates networks by address, so they must not overlap"
                    )));
                }
            }
        }
        common::apply(&add_script(&group, policy, bridge.as_deref(), &owner, &ips, listing.as_ref()))?;
        // The eBPF fast path (tern's `"dataplane": "ebpf"`) would carry this
        // pod's traffic past the forward chain: take the pod off it.
        crate::pod::fastpath::bypass_off(&ips)?;
        Ok(prev.clone())
    }

    /// Needs nothing but the attachment's identity (no prevResult, any
    /// config), so a runtime can always clean up.
    fn del(&self, req: &Request) -> Result<(), CniError> {
        let owner = common::owner(req);
        common::remove_owned(FAMILY, TABLE, &|c| c == owner, &FirewallGroups).map(drop)
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        FirewallConf::policy(req)?;
        let (_, ips) = pod_ips(req)?;
        if ips.is_empty() {
            return Ok(());
        }
        check(&group_chain(&req.conf.name), &common::owner(req), &ips)?;
        let fast = crate::pod::fastpath::still_fast(&ips)?;
        if !fast.is_empty() {
            return Err(CniError::internal(format!(
                "{fast:?} on the eBPF fast path: their traffic bypasses tern-firewall"
            )));
        }
        Ok(())
    }

    fn status(&self, req: &Request) -> Result<(), CniError> {
        FirewallConf::policy(req)?;
        if !tern_sys::nft::binary().is_file() {
            return Err(CniError::new(Code::NotAvailable, "tern-firewall needs the nft binary, which was not found"));
        }
        Ok(())
    }

    fn gc(&self, req: &Request) -> Result<(), CniError> {
        let stale = common::stale_predicate(req)?;
        common::remove_owned(FAMILY, TABLE, &stale, &FirewallGroups).map(drop)
    }
}

fn check(group: &str, owner: &str, ips: &[IpAddr]) -> Result<(), CniError> {
    let fail = |msg: String| Err(CniError::internal(msg));
    let Some(l) = Listing::load(FAMILY, TABLE)? else {
        return fail(format!("table {FAMILY} {TABLE} is missing"));
    };
    for chain in ["forward", group] {
        if !l.has_chain(chain) {
            return fail(format!("chain {chain} of table {FAMILY} {TABLE} is missing"));
        }
    }
    if l.rules_of("forward").count() != 4 {
        return fail(format!("the rules of chain forward of table {FAMILY} {TABLE} were changed"));
    }
    if l.rules_of(group).count() < 3 {
        return fail(format!("the rules of chain {group} of table {FAMILY} {TABLE} were changed"));
    }
    for ip in ips {
        let key = [ip.to_string()];
        let map = to_map(ip);
        match l.set(map).and_then(|s| s.elements.iter().find(|e| e.key_strings() == key)) {
            None => return fail(format!("{ip} is missing from map {map}")),
            Some(e) if e.comment != owner => return fail(format!("{ip} in map {map} belongs to {:?}", e.comment)),
            Some(e) if e.jump_target() != Some(group) => {
                return fail(format!("{ip} in map {map} does not lead to chain {group}"));
            }
            Some(_) => {}
        }
        for set in [member_set(group, ip), pods_set(ip).to_string()] {
            let found =
                l.set(&set).is_some_and(|s| s.elements.iter().any(|e| e.key_strings() == key && e.comment == owner));
            if !found {
                return fail(format!("{ip} is missing from set {set}"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_is_constant_in_rules_and_tagged() {
        let ips: Vec<IpAddr> = vec!["10.0.0.2".parse().unwrap(), "fd00::2".parse().unwrap()];
        let s = add_script("i0123456789", Policy::Open, None, "net/c/eth0", &ips, None);
        assert!(s.contains("add element inet tern_firewall to4 { 10.0.0.2 comment \"net/c/eth0\" : jump i0123456789 }"));
        assert!(s.contains("add element inet tern_firewall i0123456789_6 { fd00::2 comment \"net/c/eth0\" }"));
        assert!(s.contains("ip saddr @pods4 drop"));
        assert!(s.contains("add element inet tern_firewall pods4 { 10.0.0.2 comment \"net/c/eth0\" }"));
        let s = add_script("i0123456789", Policy::SameBridge, Some("cni0"), "net/c/eth0", &ips, None);
        assert!(s.contains("iifname \"cni0\" accept\n"));
        assert!(s.contains("add rule inet tern_firewall i0123456789 drop\n"));
        assert!(is_group_chain("i0123456789") && !is_group_chain("forward"));
    }
}
