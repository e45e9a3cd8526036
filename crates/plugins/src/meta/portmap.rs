//! tern-portmap: host ports (capability `portMappings`) with nftables DNAT.
//!
//! # Layout (table `inet tern_portmap`)
//!
//! ```text
//! chain prerouting  nat/prerouting dstnat : fib daddr type local jump hostports
//! chain output      nat/output -100       : fib daddr type local jump hostports
//! chain hostports   one `jump n<hash>` per network
//! chain n<hash>     per network, four rules, each one map lookup:
//!     meta nfproto ipv4 <conditionsV4> ip daddr . l4proto . dport @n<hash>_h4  [mark] dnat ip to … map @n<hash>_h4
//!     meta nfproto ipv4 <conditionsV4> [ip daddr != 127/8] l4proto . dport @n<hash>_a4 [mark] dnat ip to … map @n<hash>_a4
//!     (the same for IPv6 with _h6 / _a6, never for ::1)
//! map n<hash>_a4    proto . hostPort          : podIPv4 . containerPort   (no hostIP)
//! map n<hash>_h4    hostIP . proto . hostPort : podIPv4 . containerPort   (hostIP given)
//! map n<hash>_a6 / n<hash>_h6                 (IPv6)
//! chain postrouting nat/postrouting srcnat : per network `meta mark & M == M goto masq`
//! chain masq        ip saddr . ip daddr @hairpin4 masquerade
//!                   ip6 saddr . ip6 daddr @hairpin6 masquerade
//!                   ip saddr 127.0.0.0/8 masquerade
//! set hairpin4/6    pod subnet . pod address (interval)
//! set localnet      interface . pod IPv4, for pods with localhost host ports
//! chain martian     filter/prerouting -150, only while `localnet` is not empty
//! ```
//!
//! A lookup costs one hash probe per network whatever the number of
//! mappings. Every element carries the owner tag in its comment, so DEL works
//! without `portMappings` (and without prevResult) and GC finds stale ones.
//! A network's chain, maps and rules go with its last element, the table with
//! the last element of all.
//!
//! # Hairpin
//!
//! A pod reaching a host port on the node's address may be DNATed back to a
//! pod on its own L2 segment (or to itself). The reply would then go straight
//! to the client pod without crossing the node's conntrack and would not be
//! un-NATed, so such connections are masqueraded: the entry rule sets the
//! mark bit `markMasqBit` (default 13, as the reference) on the connections it
//! DNATs, and postrouting masquerades marked packets whose source is in the
//! destination pod's subnet (`hairpin4/6`: pod subnet . pod address; a routed
//! pod's /32 makes that the pod itself). Other sources keep their address.
//! The match is on addresses, not interfaces, because with br_netfilter
//! (`bridge-nf-call-iptables=1`) the kernel bridges a DNATed packet straight
//! back ("bridged DNAT") and runs postrouting without an input interface. A
//! pod reaching *itself* then also needs hairpin mode on its bridge port
//! (`hairpinMode: true` on `tern` or the reference bridge), as with the
//! reference portmap.
//!
//! # Localhost
//!
//! Only with `"localhost": true` (and `snat`), IPv4 only (the kernel never
//! routes ::1).
//!
//! Reaching `127.0.0.1:<hostPort>` from the node means sending a packet with
//! a loopback source out of a real interface, which the kernel refuses unless
//! `net.ipv4.conf.<if>.route_localnet=1`. That sysctl also makes the kernel
//! accept packets *to* 127.0.0.0/8 arriving on that interface, which would
//! let a pod (or anything on the bridge's segment) reach services bound to
//! the node's loopback (kubernetes#90259, CVE-2020-8558). So:
//!
//! * route_localnet is set only on the one interface that routes to the pod
//!   (the bridge, or a routed pod's host veth), never on `all`/`default`, and
//!   reset to 0 when the last localhost-enabled pod behind it goes;
//! * while any such pod exists, the `martian` chain (filter prerouting,
//!   priority -150: before conntrack reverses NAT at -100, so it sees packets
//!   as they were on the wire) drops every packet from an interface other
//!   than `lo` whose source or destination is in 127.0.0.0/8. Replies of
//!   masqueraded localhost connections carry the bridge address on the wire
//!   and only become 127.0.0.1 at the NAT hook, after this check.
use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use ipnet::IpNet;
use serde::Deserialize;
use tern_cni::{CniError, CniResult, Code, PortMapping};
use tern_sys::sysctl;

use super::common::{self, Groups, Listing};
use crate::skel::{Plugin, Request};

pub const TABLE: &str = "tern_portmap";
const FAMILY: &str = "inet";
const DEFAULT_MARK_BIT: u32 = 13;
const HAIRPIN4: &str = "hairpin4";
const HAIRPIN6: &str = "hairpin6";
const LOCALNET: &str = "localnet";
const MARTIAN: &str = "martian";

pub struct PortmapPlugin;

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PortmapConf {
    #[serde(default = "yes")]
    snat: bool,
    #[serde(default)]
    localhost: bool,
    #[serde(default)]
    mark_masq_bit: Option<u32>,
    #[serde(default)]
    external_set_mark_chain: Option<String>,
    #[serde(default)]
    masq_all: bool,
    #[serde(default)]
    backend: Option<String>,
    #[serde(default, rename = "conditionsV4")]
    conditions_v4: Option<Vec<String>>,
    #[serde(default, rename = "conditionsV6")]
    conditions_v6: Option<Vec<String>>,
}

impl PortmapConf {
    fn load(req: &Request) -> Result<PortmapConf, CniError> {
        let conf: PortmapConf = req.conf.options()?;
        if let Some(bit) = conf.mark_masq_bit {
            if bit > 31 {
                return Err(field_error("markMasqBit", format!("must be between 0 and 31, got {bit}")));
            }
        }
        if let Some(chain) = conf.external_set_mark_chain.as_deref().filter(|c| !c.is_empty()) {
            return Err(CniError::unsupported_field("externalSetMarkChain", &serde_json::json!(chain))
                .with_details("tern-portmap marks with markMasqBit in its own nftables table"));
        }
        if conf.masq_all {
            return Err(CniError::unsupported_field("masqAll", &serde_json::json!(true)));
        }
        match conf.backend.as_deref() {
            None | Some("") | Some("nftables") => {}
            Some(other) => {
                return Err(CniError::unsupported_field("backend", &serde_json::json!(other))
                    .with_details("tern-portmap always uses nftables"))
            }
        }
        if conf.localhost && !conf.snat {
            return Err(field_error("localhost", "localhost host ports need snat (it is false)".into()));
        }
        for (field, conds) in [("conditionsV4", &conf.conditions_v4), ("conditionsV6", &conf.conditions_v6)] {
            for (i, c) in conds.iter().flatten().enumerate() {
                validate_condition(c).map_err(|why| field_error(&format!("{field}[{i}]"), why))?;
            }
        }
        Ok(conf)
    }

    fn mark(&self) -> u32 {
        1u32 << self.mark_masq_bit.unwrap_or(DEFAULT_MARK_BIT)
    }

    fn conditions(&self, fam: Fam) -> String {
        let list = match fam {
            Fam::V4 => &self.conditions_v4,
            Fam::V6 => &self.conditions_v6,
        };
        list.iter().flatten().map(|c| format!(" {}", c.trim())).collect()
    }
}

fn field_error(field: &str, why: String) -> CniError {
    CniError::invalid_config(format!("invalid {field}: {why}")).with_details(format!("field: {field}"))
}

/// A condition is one nftables match expression (`ip saddr 10.0.0.0/8`,
/// `iifname != "eth1"`). iptables syntax (`-s 10.0.0.0/8`, `! -i eth1`) is
/// refused, and so is anything that could end the rule or the command.
fn validate_condition(c: &str) -> Result<(), String> {
    let t = c.trim();
    let Some(first) = t.split_whitespace().next() else { return Err("empty condition".into()) };
    if first.starts_with('-') || first.starts_with('!') {
        return Err(format!(
            "{c:?} looks like iptables syntax; tern-portmap takes nftables match expressions, \
             e.g. \"ip saddr 10.0.0.0/8\" or \"iifname != \\\"eth1\\\"\""
        ));
    }
    if let Some(bad) = t.chars().find(|ch| matches!(ch, ';' | '\n' | '\r' | '#')) {
        return Err(format!("{c:?} must be a single nftables match expression ({bad:?} is not allowed)"));
    }
    let stmt = ["accept", "drop", "reject", "jump", "goto", "return", "queue", "continue"];
    if let Some(word) = t.split_whitespace().find(|w| stmt.contains(w)) {
        return Err(format!("{c:?} must only match packets, not decide their fate ({word:?})"));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fam {
    V4,
    V6,
}

impl Fam {
    fn of(ip: &IpAddr) -> Fam {
        if ip.is_ipv4() {
            Fam::V4
        } else {
            Fam::V6
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Fam::V4 => "4",
            Fam::V6 => "6",
        }
    }
    fn nfproto(self) -> &'static str {
        match self {
            Fam::V4 => "ipv4",
            Fam::V6 => "ipv6",
        }
    }
}

/// A validated port mapping.
#[derive(Debug, Clone, PartialEq)]
struct Mapping {
    index: usize,
    proto: &'static str,
    host_port: u16,
    container_port: u16,
    /// `None`: every local address of both families. `Some(0.0.0.0)` /
    /// `Some(::)`: every local address of that family.
    host_ip: Option<IpAddr>,
}

impl Mapping {
    fn field(&self, key: &str) -> String {
        format!("runtimeConfig.portMappings[{}]{key}", self.index)
    }
    fn families(&self) -> Vec<Fam> {
        match self.host_ip {
            None => vec![Fam::V4, Fam::V6],
            Some(ip) => vec![Fam::of(&ip)],
        }
    }
    /// The specific host address, if any (unspecified counts as none).
    fn specific_ip(&self) -> Option<IpAddr> {
        self.host_ip.filter(|ip| !ip.is_unspecified())
    }
    /// Both would catch the same packets.
    fn overlaps(&self, other: &Mapping) -> bool {
        self.proto == other.proto
            && self.host_port == other.host_port
            && self.families().iter().any(|f| other.families().contains(f))
            && match (self.specific_ip(), other.specific_ip()) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            }
    }
}

fn parse_mappings(pms: &[PortMapping], localhost: bool) -> Result<Vec<Mapping>, CniError> {
    let mut out: Vec<Mapping> = Vec::new();
    for (index, pm) in pms.iter().enumerate() {
        let field = |k: &str| format!("runtimeConfig.portMappings[{index}]{k}");
        let proto = match pm.protocol.to_ascii_lowercase().as_str() {
            "tcp" => "tcp",
            "udp" => "udp",
            "sctp" => "sctp",
            other => {
                return Err(field_error(&field(".protocol"), format!("{other:?} is not one of tcp, udp, sctp")));
            }
        };
        let host_ip = match pm.host_ip.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(s) => Some(
                s.parse::<IpAddr>()
                    .map_err(|_| field_error(&field(".hostIP"), format!("{s:?} is not an IP address")))?
                    .to_canonical(),
            ),
        };
        if let Some(ip) = host_ip {
            if ip.is_ipv6() && ip.is_loopback() {
                return Err(field_error(
                    &field(".hostIP"),
                    "the kernel never forwards traffic to ::1; use 127.0.0.1 with \"localhost\": true".into(),
                ));
            }
            if ip.is_loopback() && !localhost {
                return Err(field_error(
                    &field(".hostIP"),
                    format!("{ip} is a loopback address: localhost host ports need \"localhost\": true"),
                ));
            }
            if ip.is_multicast() || ip == IpAddr::from([255, 255, 255, 255]) {
                return Err(field_error(&field(".hostIP"), format!("{ip} is not a unicast address")));
            }
        }
        let m = Mapping { index, proto, host_port: pm.host_port, container_port: pm.container_port, host_ip };
        if let Some(prev) = out.iter().find(|o| o.overlaps(&m)) {
            return Err(field_error(
                &field(""),
                format!("host port {proto}/{} is already mapped by portMappings[{}]", m.host_port, prev.index),
            ));
        }
        out.push(m);
    }
    Ok(out)
}

/// One map element this attachment needs.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    mapping: usize,
    fam: Fam,
    proto: &'static str,
    host_port: u16,
    host_ip: Option<IpAddr>,
    pod_ip: IpAddr,
    container_port: u16,
}

impl Entry {
    fn map(&self, net: &str) -> String {
        let kind = if self.host_ip.is_some() { "h" } else { "a" };
        format!("{net}_{kind}{}", self.fam.suffix())
    }
    fn key_parts(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(ip) = self.host_ip {
            v.push(ip.to_string());
        }
        v.push(self.proto.to_string());
        v.push(self.host_port.to_string());
        v
    }
    fn value_parts(&self) -> Vec<String> {
        vec![self.pod_ip.to_string(), self.container_port.to_string()]
    }
    fn describe(&self) -> String {
        let at = self.host_ip.map(|ip| format!(" on {ip}")).unwrap_or_default();
        let pod = match self.pod_ip {
            IpAddr::V4(a) => format!("{a}:{}", self.container_port),
            IpAddr::V6(a) => format!("[{a}]:{}", self.container_port),
        };
        format!(
            "host port {}/{}{at} -> {pod} (runtimeConfig.portMappings[{}])",
            self.proto, self.host_port, self.mapping
        )
    }
}

/// The elements for `mappings` towards the pod addresses `v4`/`v6`.
fn entries(mappings: &[Mapping], v4: Option<IpAddr>, v6: Option<IpAddr>) -> Result<Vec<Entry>, CniError> {
    let mut out = Vec::new();
    for m in mappings {
        let mut made = false;
        for fam in m.families() {
            let pod_ip = match fam {
                Fam::V4 => v4,
                Fam::V6 => v6,
            };
            let Some(pod_ip) = pod_ip else {
                if m.host_ip.is_some() {
                    return Err(field_error(
                        &m.field(".hostIP"),
                        format!(
                            "the container has no IP{} address to map to",
                            if fam == Fam::V4 { "v4" } else { "v6" }
                        ),
                    ));
                }
                continue;
            };
            made = true;
            out.push(Entry {
                mapping: m.index,
                fam,
                proto: m.proto,
                host_port: m.host_port,
                host_ip: m.specific_ip(),
                pod_ip,
                container_port: m.container_port,
            });
        }
        if !made {
            return Err(CniError::invalid_config(
                "prevResult has no address on the container interface (CNI_IFNAME) to map host ports to (prevResult)",
            ));
        }
    }
    Ok(out)
}

/// An element of a shared set: `hairpin4/6` (pod subnet . pod address) or
/// `localnet` (interface . pod IPv4).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shared {
    set: &'static str,
    /// The key's parts as nft lists them (interface names unquoted).
    parts: Vec<String>,
    /// The key in nft syntax.
    key: String,
}

impl Shared {
    fn hairpin(addr: IpNet) -> Shared {
        let subnet = addr.trunc();
        let subnet =
            if subnet.prefix_len() == subnet.max_prefix_len() { addr.addr().to_string() } else { subnet.to_string() };
        let parts = vec![subnet, addr.addr().to_string()];
        Shared { set: if addr.addr().is_ipv4() { HAIRPIN4 } else { HAIRPIN6 }, key: parts.join(" . "), parts }
    }
    fn localnet(ifname: &str, ip: IpAddr) -> Shared {
        Shared {
            set: LOCALNET,
            parts: vec![ifname.to_string(), ip.to_string()],
            key: format!("{} . {ip}", common::quote(ifname)),
        }
    }
}

/// Everything one attachment owns in the table.
#[derive(Debug, Default)]
struct Desired {
    entries: Vec<Entry>,
    shared: Vec<Shared>,
}

impl Desired {
    fn localnet_ifaces(&self) -> BTreeSet<&str> {
        self.shared.iter().filter(|s| s.set == LOCALNET).map(|s| s.parts[0].as_str()).collect()
    }
}

/// The node interface towards a pod address: the route's, else the host side
/// of prevResult (a bridge if there is one).
fn host_interface(ip: IpAddr, prev: &CniResult) -> Result<Option<String>, CniError> {
    if let Some(i) = common::route_interface(ip)? {
        return Ok(Some(i));
    }
    let host: Vec<&str> = prev
        .interfaces
        .iter()
        .filter(|i| i.sandbox.is_empty() && !i.name.is_empty())
        .map(|i| i.name.as_str())
        .collect();
    Ok(host.iter().find(|n| common::is_bridge(n)).or(host.first()).map(|s| s.to_string()))
}

fn desired(req: &Request, conf: &PortmapConf, mappings: &[Mapping], prev: &CniResult) -> Result<Desired, CniError> {
    let (net4, net6) = common::first_ips(prev, req.env.ifname());
    let entries = entries(mappings, net4.map(|n| n.addr()), net6.map(|n| n.addr()))?;
    let mut shared = Vec::new();
    if conf.snat {
        let fams: BTreeSet<Fam> = entries.iter().map(|e| e.fam).collect();
        for fam in fams {
            let net = if fam == Fam::V4 { net4 } else { net6 }.expect("entries exist only for present families");
            shared.push(Shared::hairpin(net));
        }
        let loopback_reachable = entries.iter().any(|e| e.fam == Fam::V4 && e.host_ip.is_none_or(|h| h.is_loopback()));
        if let (true, true, Some(net)) = (conf.localhost, loopback_reachable, net4) {
            let Some(ifname) = host_interface(net.addr(), prev)? else {
                return Err(CniError::internal(format!(
                    "localhost host ports: no node interface routes to the container address {}",
                    net.addr()
                )));
            };
            shared.push(Shared::localnet(&ifname, net.addr()));
        }
    }
    Ok(Desired { entries, shared })
}

/// Objects of one network are named after a hash of its name.
fn net_chain(network: &str) -> String {
    common::network_object("n", network)
}

fn is_net_chain(name: &str) -> bool {
    name.len() == 11 && name.starts_with('n') && name[1..].bytes().all(|b| b.is_ascii_hexdigit())
}

struct PortmapGroups;

impl Groups for PortmapGroups {
    fn of_set(&self, name: &str) -> Option<String> {
        if name == LOCALNET {
            return Some(MARTIAN.into());
        }
        let (chain, _) = name.split_once('_')?;
        is_net_chain(chain).then(|| chain.to_string())
    }
    fn of_chain(&self, name: &str) -> Option<String> {
        if name == MARTIAN || is_net_chain(name) {
            Some(name.to_string())
        } else {
            None
        }
    }
}

/// The base of the table: chains and shared sets, idempotent.
fn base_script(s: &mut String) {
    let t = format!("{FAMILY} {TABLE}");
    let _ = write!(
        s,
        "add table {t}\n\
         add chain {t} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
         add chain {t} output {{ type nat hook output priority -100; policy accept; }}\n\
         add chain {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         add chain {t} hostports\n\
         add chain {t} masq\n\
         add set {t} {HAIRPIN4} {{ type ipv4_addr . ipv4_addr; flags interval; }}\n\
         add set {t} {HAIRPIN6} {{ type ipv6_addr . ipv6_addr; flags interval; }}\n\
         flush chain {t} prerouting\n\
         add rule {t} prerouting fib daddr type local jump hostports\n\
         flush chain {t} output\n\
         add rule {t} output fib daddr type local jump hostports\n\
         flush chain {t} masq\n\
         add rule {t} masq ip saddr . ip daddr @{HAIRPIN4} masquerade\n\
         add rule {t} masq ip6 saddr . ip6 daddr @{HAIRPIN6} masquerade\n\
         add rule {t} masq ip saddr 127.0.0.0/8 masquerade\n"
    );
}

/// The network's chain and maps (rebuilt on every ADD: the last
/// configuration wins) and its rules in `hostports` and `postrouting`.
fn network_script(s: &mut String, conf: &PortmapConf, net: &str, listing: Option<&Listing>) {
    let t = format!("{FAMILY} {TABLE}");
    let mark = if conf.snat { format!(" meta mark set meta mark | 0x{:08x}", conf.mark()) } else { String::new() };
    let _ = writeln!(s, "add chain {t} {net}");
    for fam in [Fam::V4, Fam::V6] {
        let addr = match fam {
            Fam::V4 => "ipv4_addr",
            Fam::V6 => "ipv6_addr",
        };
        let sfx = fam.suffix();
        let _ = writeln!(s, "add map {t} {net}_a{sfx} {{ type inet_proto . inet_service : {addr} . inet_service; }}");
        let _ = writeln!(
            s,
            "add map {t} {net}_h{sfx} {{ type {addr} . inet_proto . inet_service : {addr} . inet_service; }}"
        );
    }
    let _ = writeln!(s, "flush chain {t} {net}");
    for fam in [Fam::V4, Fam::V6] {
        let (ip, sfx, nf) = (if fam == Fam::V4 { "ip" } else { "ip6" }, fam.suffix(), fam.nfproto());
        let cond = conf.conditions(fam);
        let _ = writeln!(
            s,
            "add rule {t} {net} meta nfproto {nf}{cond} {ip} daddr . meta l4proto . th dport @{net}_h{sfx}{mark} \
             dnat {ip} to {ip} daddr . meta l4proto . th dport map @{net}_h{sfx}"
        );
        // Loopback destinations: never for IPv6, for IPv4 only when enabled.
        let no_loopback = match fam {
            Fam::V4 if conf.localhost => String::new(),
            Fam::V4 => " ip daddr != 127.0.0.0/8".to_string(),
            Fam::V6 => " ip6 daddr != ::1".to_string(),
        };
        let _ = writeln!(
            s,
            "add rule {t} {net} meta nfproto {nf}{cond}{no_loopback} meta l4proto . th dport @{net}_a{sfx}{mark} \
             dnat {ip} to meta l4proto . th dport map @{net}_a{sfx}"
        );
    }
    let jumped = listing.is_some_and(|l| l.rules_of("hostports").any(|r| r.targets.iter().any(|x| x == net)));
    if !jumped {
        let _ = writeln!(s, "add rule {t} hostports jump {net}");
    }
    let masq_rule = format!("meta mark & 0x{m:08x} == 0x{m:08x} goto masq comment \"{net}\"", m = conf.mark());
    let existing = listing.and_then(|l| l.rules_of("postrouting").find(|r| r.comment == net).map(|r| r.handle));
    match (existing, conf.snat) {
        (Some(h), true) => {
            let _ = writeln!(s, "replace rule {t} postrouting handle {h} {masq_rule}");
        }
        (Some(h), false) => {
            let _ = writeln!(s, "delete rule {t} postrouting handle {h}");
        }
        (None, true) => {
            let _ = writeln!(s, "add rule {t} postrouting {masq_rule}");
        }
        (None, false) => {}
    }
}

fn martian_script(s: &mut String) {
    let t = format!("{FAMILY} {TABLE}");
    let _ = write!(
        s,
        "add set {t} {LOCALNET} {{ type ifname . ipv4_addr; }}\n\
         add chain {t} {MARTIAN} {{ type filter hook prerouting priority -150; policy accept; }}\n\
         flush chain {t} {MARTIAN}\n\
         add rule {t} {MARTIAN} iifname != \"lo\" ip daddr 127.0.0.0/8 drop\n\
         add rule {t} {MARTIAN} iifname != \"lo\" ip saddr 127.0.0.0/8 drop\n"
    );
}

/// A mapping of another attachment that catches the same packets as `e`.
fn conflict<'a>(listing: &'a Listing, e: &Entry, owner: &str) -> Option<&'a str> {
    for set in &listing.sets {
        let Some((chain, kind)) = set.name.split_once('_') else { continue };
        if !is_net_chain(chain) || kind.len() != 2 || !kind.ends_with(e.fam.suffix()) {
            continue;
        }
        let specific = kind.starts_with('h');
        for el in &set.elements {
            if el.comment == owner {
                continue;
            }
            let parts = el.key_strings();
            let (ip, rest) =
                if specific { (parts.first().cloned(), &parts[1.min(parts.len())..]) } else { (None, &parts[..]) };
            if rest != [e.proto.to_string(), e.host_port.to_string()] {
                continue;
            }
            let same_ip = match (ip.and_then(|s| s.parse::<IpAddr>().ok()), e.host_ip) {
                (Some(a), Some(b)) => a == b,
                _ => true,
            };
            if same_ip {
                return Some(el.comment.as_str());
            }
        }
    }
    None
}

/// The whole ADD transaction.
fn add_script(conf: &PortmapConf, net: &str, owner: &str, want: &Desired, listing: Option<&Listing>) -> String {
    let t = format!("{FAMILY} {TABLE}");
    let mut s = String::new();
    base_script(&mut s);
    network_script(&mut s, conf, net, listing);
    if want.shared.iter().any(|x| x.set == LOCALNET) {
        martian_script(&mut s);
    }
    // A repeated ADD of the same attachment replaces its elements; a shared
    // element left by a dead attachment (same interface and pod address, so
    // that address was given to us since) is taken over.
    if let Some(l) = listing {
        let wanted: HashSet<(&str, Vec<String>)> = want.shared.iter().map(|x| (x.set, x.parts.clone())).collect();
        for (set, el) in l.elements() {
            let taken_over = wanted.contains(&(set.name.as_str(), el.key_strings()));
            if el.comment == owner || taken_over {
                let _ = writeln!(s, "delete element {t} {} {{ {} }}", set.name, el.key_nft(&set.types));
            }
        }
    }
    for e in &want.entries {
        let key = e.key_parts().join(" . ");
        let val = e.value_parts().join(" . ");
        let _ = writeln!(s, "add element {t} {} {{ {key} comment \"{owner}\" : {val} }}", e.map(net));
    }
    for x in &want.shared {
        let _ = writeln!(s, "add element {t} {} {{ {} comment \"{owner}\" }}", x.set, x.key);
    }
    s
}

/// When the transaction failed and conditions are set, find out whether a
/// condition is the cause (each one tried alone in a throwaway table that
/// one transaction creates and deletes) so the error names its field.
fn blame_condition(conf: &PortmapConf) -> Option<CniError> {
    let tmp = format!("tern_pmcheck_{}", std::process::id());
    for (fam, field, list) in
        [(Fam::V4, "conditionsV4", &conf.conditions_v4), (Fam::V6, "conditionsV6", &conf.conditions_v6)]
    {
        for (i, c) in list.iter().flatten().enumerate() {
            let script = format!(
                "add table inet {tmp}\n\
                 add chain inet {tmp} pre {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
                 add chain inet {tmp} c\n\
                 add rule inet {tmp} pre jump c\n\
                 add rule inet {tmp} c meta nfproto {} {} counter\n\
                 delete table inet {tmp}\n",
                fam.nfproto(),
                c.trim()
            );
            if let Err(e) = common::apply(&script) {
                return Some(field_error(&format!("{field}[{i}]"), format!("nftables rejects {c:?}: {}", e.msg)));
            }
        }
    }
    None
}

fn set_route_localnet(ifname: &str, on: bool) -> Result<(), CniError> {
    sysctl::write(&format!("net/ipv4/conf/{ifname}/route_localnet"), if on { "1" } else { "0" })
        .map_err(|e| CniError::internal(format!("route_localnet on {ifname}: {e}")))
}

/// After elements went: route_localnet back to 0 on interfaces no
/// localhost-enabled pod is behind any more (best effort: the interface may
/// be gone).
fn reset_route_localnet(plan: &common::RemovalPlan) {
    let still: HashSet<String> = plan
        .remaining
        .iter()
        .filter(|(set, _)| set == LOCALNET)
        .filter_map(|(_, e)| e.key_strings().first().cloned())
        .collect();
    let gone: BTreeSet<String> = plan
        .removed
        .iter()
        .filter(|(set, _)| set == LOCALNET)
        .filter_map(|(_, e)| e.key_strings().first().cloned())
        .filter(|i| !still.contains(i))
        .collect();
    for ifname in gone {
        let _ = set_route_localnet(&ifname, false);
    }
}

fn remove(doomed: &dyn Fn(&str) -> bool) -> Result<(), CniError> {
    if let Some(plan) = common::remove_owned(FAMILY, TABLE, doomed, &PortmapGroups)? {
        reset_route_localnet(&plan);
    }
    Ok(())
}

/// UDP has no connection setup: a conntrack entry made before the mapping
/// existed (e.g. a client already sending to the port) would keep bypassing
/// DNAT. Drop such entries when the `conntrack` tool is there; skip quietly
/// otherwise.
fn flush_udp_conntrack(entries: &[Entry]) {
    let ports: BTreeSet<u16> = entries.iter().filter(|e| e.proto == "udp").map(|e| e.host_port).collect();
    if ports.is_empty() {
        return;
    }
    let Some(bin) = ["/usr/sbin", "/sbin", "/usr/bin", "/bin", "/usr/local/sbin"]
        .iter()
        .map(|d| PathBuf::from(d).join("conntrack"))
        .find(|p| p.is_file())
    else {
        return;
    };
    for port in ports {
        let _ = Command::new(&bin)
            .args(["-D", "-p", "udp", "--orig-port-dst", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn prev_result(req: &Request) -> Result<&CniResult, CniError> {
    req.conf.prev_result.as_ref().ok_or_else(|| {
        CniError::invalid_config("tern-portmap must be called as a chained plugin: prevResult is missing (prevResult)")
    })
}

impl Plugin for PortmapPlugin {
    fn name(&self) -> &'static str {
        "tern-portmap"
    }

    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let conf = PortmapConf::load(req)?;
        let mappings = parse_mappings(&req.conf.runtime_config.port_mappings, conf.localhost)?;
        let prev = prev_result(req)?;
        if mappings.is_empty() {
            // Nothing to map: no lock, no nft call (reference portmap issue #510).
            return Ok(prev.clone());
        }
        let want = desired(req, &conf, &mappings, prev)?;
        let owner = common::owner(req);
        let net = net_chain(&req.conf.name);
        {
            let _guard = common::lock()?;
            let listing = Listing::load(FAMILY, TABLE)?;
            if let Some(l) = &listing {
                for e in &want.entries {
                    if let Some(other) = conflict(l, e, &owner) {
                        return Err(CniError::internal(format!(
                            "{} conflicts with a mapping of attachment {other}: that host port is taken",
                            e.describe()
                        )));
                    }
                }
            }
            if let Err(e) = common::apply(&add_script(&conf, &net, &owner, &want, listing.as_ref())) {
                return Err(blame_condition(&conf).unwrap_or(e));
            }
        }
        // The nft transaction was atomic; from here a failure undoes it.
        for ifname in want.localnet_ifaces() {
            if let Err(e) = set_route_localnet(ifname, true) {
                let _ = remove(&|c| c == owner);
                return Err(e);
            }
        }
        flush_udp_conntrack(&want.entries);
        Ok(prev.clone())
    }

    /// Needs nothing but the attachment's identity: no prevResult, no
    /// portMappings, not even a config this version would accept on ADD.
    fn del(&self, req: &Request) -> Result<(), CniError> {
        let owner = common::owner(req);
        remove(&|c| c == owner)
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let conf = PortmapConf::load(req)?;
        let mappings = parse_mappings(&req.conf.runtime_config.port_mappings, conf.localhost)?;
        let prev = prev_result(req)?;
        if mappings.is_empty() {
            return Ok(());
        }
        let want = desired(req, &conf, &mappings, prev)?;
        check(&conf, &net_chain(&req.conf.name), &common::owner(req), &want)
    }

    fn status(&self, req: &Request) -> Result<(), CniError> {
        PortmapConf::load(req)?;
        if !tern_sys::nft::binary().is_file() {
            return Err(CniError::new(Code::NotAvailable, "tern-portmap needs the nft binary, which was not found"));
        }
        Ok(())
    }

    fn gc(&self, req: &Request) -> Result<(), CniError> {
        let stale = common::stale_predicate(req)?;
        remove(&stale)
    }
}

fn check(conf: &PortmapConf, net: &str, owner: &str, want: &Desired) -> Result<(), CniError> {
    let fail = |msg: String| Err(CniError::internal(msg));
    let Some(l) = Listing::load(FAMILY, TABLE)? else {
        return fail(format!("table {FAMILY} {TABLE} is missing"));
    };
    for chain in ["prerouting", "output", "hostports", net] {
        if !l.has_chain(chain) {
            return fail(format!("chain {chain} of table {FAMILY} {TABLE} is missing"));
        }
    }
    for base in ["prerouting", "output"] {
        if !l.rules_of(base).any(|r| r.targets.iter().any(|x| x == "hostports")) {
            return fail(format!("the jump to hostports in chain {base} is missing"));
        }
    }
    if !l.rules_of("hostports").any(|r| r.targets.iter().any(|x| x == net)) {
        return fail(format!("the jump to the network chain {net} is missing"));
    }
    if l.rules_of(net).count() != 4 {
        return fail(format!("the rules of the network chain {net} were changed"));
    }
    for e in &want.entries {
        let found = l.set(&e.map(net)).and_then(|s| s.elements.iter().find(|el| el.key_strings() == e.key_parts()));
        match found {
            None => return fail(format!("{} is missing", e.describe())),
            Some(el) if el.comment != owner => {
                return fail(format!("{} belongs to attachment {:?}", e.describe(), el.comment));
            }
            Some(el) if el.value_strings() != e.value_parts() => {
                return fail(format!("{} points to {}", e.describe(), el.value_strings().join(":")));
            }
            Some(_) => {}
        }
    }
    for x in &want.shared {
        let ok = l.set(x.set).is_some_and(|s| s.elements.iter().any(|el| el.key_strings() == x.parts));
        if !ok {
            return fail(format!("element {} of set {} is missing", x.key, x.set));
        }
    }
    if conf.snat && !l.rules_of("postrouting").any(|r| r.comment == net) {
        return fail(format!("the masquerade rule of network chain {net} in postrouting is missing"));
    }
    let localnet = want.localnet_ifaces();
    if !localnet.is_empty() && !l.has_chain(MARTIAN) {
        return fail(format!("chain {MARTIAN} (drops 127.0.0.0/8 from other interfaces than lo) is missing"));
    }
    for ifname in localnet {
        let key = format!("net/ipv4/conf/{ifname}/route_localnet");
        if sysctl::read(&key).ok().as_deref() != Some("1") {
            return fail(format!("{key} is not 1: localhost host ports cannot work"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(host: u16, cont: u16, proto: &str, ip: Option<&str>) -> PortMapping {
        PortMapping { host_port: host, container_port: cont, protocol: proto.into(), host_ip: ip.map(str::to_string) }
    }

    #[test]
    fn validates_mappings_naming_the_field() {
        let e = parse_mappings(&[pm(80, 80, "icmp", None)], false).unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("runtimeConfig.portMappings[0].protocol"), "{}", e.msg);
        let e = parse_mappings(&[pm(80, 80, "tcp", Some("nope"))], false).unwrap_err();
        assert!(e.msg.contains("runtimeConfig.portMappings[0].hostIP"), "{}", e.msg);
        let e = parse_mappings(&[pm(80, 80, "tcp", Some("127.0.0.1"))], false).unwrap_err();
        assert!(e.msg.contains("localhost"), "{}", e.msg);
        assert!(parse_mappings(&[pm(80, 80, "tcp", Some("127.0.0.1"))], true).is_ok());
        assert!(parse_mappings(&[pm(80, 80, "tcp", Some("::1"))], true).is_err());
        let e = parse_mappings(&[pm(80, 80, "TCP", None), pm(80, 81, "tcp", Some("10.0.0.1"))], false).unwrap_err();
        assert!(e.msg.contains("runtimeConfig.portMappings[1]"), "{}", e.msg);
        // Different families or protocols do not overlap.
        assert!(parse_mappings(&[pm(80, 80, "tcp", Some("0.0.0.0")), pm(80, 80, "tcp", Some("::"))], false).is_ok());
        assert!(parse_mappings(&[pm(80, 80, "tcp", None), pm(80, 80, "udp", None)], false).is_ok());
    }

    #[test]
    fn conditions_must_be_nft_expressions() {
        assert!(validate_condition("ip saddr != 10.0.0.0/8").is_ok());
        assert!(validate_condition("iifname \"eth1\"").is_ok());
        assert!(validate_condition("-s 10.0.0.0/8").unwrap_err().contains("iptables"));
        assert!(validate_condition("! -i eth0").unwrap_err().contains("iptables"));
        assert!(validate_condition("ip saddr 1.2.3.4; flush ruleset").is_err());
        assert!(validate_condition("ip saddr 1.2.3.4\nflush ruleset").is_err());
        assert!(validate_condition("ip saddr 1.2.3.4 accept").is_err());
        assert!(validate_condition("  ").is_err());
    }

    #[test]
    fn entries_follow_the_families() {
        let m = parse_mappings(&[pm(8080, 80, "tcp", None), pm(53, 53, "udp", Some("192.168.1.1"))], false).unwrap();
        let v4: IpAddr = "10.0.0.2".parse().unwrap();
        let v6: IpAddr = "fd00::2".parse().unwrap();
        let e = entries(&m, Some(v4), Some(v6)).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e[0].map("nX"), "nX_a4");
        assert_eq!(e[1].map("nX"), "nX_a6");
        assert_eq!(e[2].map("nX"), "nX_h4");
        assert_eq!(e[2].key_parts(), vec!["192.168.1.1", "udp", "53"]);
        assert_eq!(e[1].value_parts(), vec!["fd00::2", "80"]);
        // Only IPv6 in the pod: an IPv4 hostIP cannot be honoured.
        let err = entries(&m, None, Some(v6)).unwrap_err();
        assert!(err.msg.contains("portMappings[1].hostIP"), "{}", err.msg);
    }
}
