//! Helpers shared by the chained plugins that keep per-attachment state as
//! tagged nftables set/map elements (tern-portmap, tern-firewall).
//!
//! The model is the one of `pod::nft`: every per-attachment object is one
//! element whose comment is the owner tag (`names::owner_tag`), so DEL and GC
//! find what to remove from the kernel alone. Per-network objects (a chain and
//! its sets/maps) form a *group*: they are removed with the last element that
//! belongs to the group, and the table goes with the last element of all.
//! Every change runs under the per-netns nftables lock of `pod::nft`.
use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::net::IpAddr;

use ipnet::IpNet;
use nix::fcntl::Flock;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tern_cni::{CniError, CniResult};
use tern_sys::netlink::{Family, Netlink};
use tern_sys::nft;

use crate::names;
use crate::skel::Request;

/// Exclusive lock on nftables changes in the current network namespace
/// (shared with the `tern` plugin).
pub fn lock() -> Result<Flock<File>, CniError> {
    crate::pod::nft::lock()
}

/// Run an nft script as one transaction.
pub fn apply(script: &str) -> Result<(), CniError> {
    nft::run(script).map_err(|e| CniError::internal(format!("nftables: {e}")))
}

/// `prefix` + 10 hex characters of sha256(network): a per-network object name
/// that fits nftables' limits whatever the network name is.
pub fn network_object(prefix: &str, network: &str) -> String {
    let digest = Sha256::digest(network.as_bytes());
    let hex: String = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

/// The owner tag of the attachment a request is about.
pub fn owner(req: &Request) -> String {
    names::owner_tag(&req.conf.name, req.env.container_id(), req.env.ifname())
}

/// GC: a predicate true for owner tags of this network whose attachment is
/// not in `cni.dev/valid-attachments`.
pub fn stale_predicate(req: &Request) -> Result<impl Fn(&str) -> bool, CniError> {
    let valid = req.conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::invalid_config("GC needs the list of valid attachments (cni.dev/valid-attachments)")
    })?;
    let net_tag = names::network_tag(&req.conf.name);
    let keep: HashSet<String> = valid.iter().map(|a| names::attachment_tag(&a.container_id, &a.ifname)).collect();
    Ok(move |tag: &str| match names::split_owner_tag(tag) {
        Some((n, a)) => n == net_tag && !keep.contains(a),
        None => false,
    })
}

/// The addresses of the sandbox interface `ifname` in a previous result: the
/// `ips` whose `interface` is that interface, or that name no interface.
pub fn sandbox_ips(prev: &CniResult, ifname: &str) -> Vec<IpNet> {
    let idx = prev.sandbox_interface(ifname);
    prev.ips
        .iter()
        .filter(|ip| match ip.interface {
            None => true,
            Some(i) => Some(i) == idx,
        })
        .map(|ip| ip.address)
        .collect()
}

/// The first IPv4 and the first IPv6 address of [`sandbox_ips`].
pub fn first_ips(prev: &CniResult, ifname: &str) -> (Option<IpNet>, Option<IpNet>) {
    let ips = sandbox_ips(prev, ifname);
    (ips.iter().copied().find(|a| a.addr().is_ipv4()), ips.iter().copied().find(|a| a.addr().is_ipv6()))
}

/// The node interface that routes to `ip`: the longest-prefix match among the
/// main table's routes that have an output interface (policy routing is not
/// considered). For a bridge network it is the bridge, for a routed pod its
/// host veth.
pub fn route_interface(ip: IpAddr) -> Result<Option<String>, CniError> {
    let nl = Netlink::new().map_err(|e| CniError::internal(format!("netlink: {e}")))?;
    let routes = nl.routes(Family::of(&ip)).map_err(|e| CniError::internal(format!("failed to list routes: {e}")))?;
    let best = routes.iter().filter(|r| r.oif.is_some() && r.dst.contains(&ip)).max_by_key(|r| r.dst.prefix_len());
    let Some(oif) = best.and_then(|r| r.oif) else { return Ok(None) };
    let link = nl.link_by_index(oif).map_err(|e| CniError::internal(format!("netlink: {e}")))?;
    Ok(link.map(|l| l.name))
}

/// Is the link named `name` a bridge?
pub fn is_bridge(name: &str) -> bool {
    Netlink::new().ok().and_then(|nl| nl.link(name).ok().flatten()).is_some_and(|l| l.kind.as_deref() == Some("bridge"))
}

pub fn join_errors(mut errors: Vec<CniError>) -> Result<(), CniError> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(CniError::internal(errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))),
    }
}

/// Quote a string for an nft script (names and comments never contain `"`
/// or a newline: owner tags are made of CNI identifiers, which exclude them).
pub fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace(['"', '\n', '\r'], ""))
}

// ---------------------------------------------------------------------------
// Listings
// ---------------------------------------------------------------------------

/// One element of a set or map, as listed.
#[derive(Debug, Clone, PartialEq)]
pub struct Element {
    /// The key's parts (one for a plain key, several for a concatenation).
    pub key: Vec<Value>,
    /// A map's value as listed (a concatenation, an address, a verdict...).
    pub value: Option<Value>,
    pub comment: String,
}

impl Element {
    /// The key in nft syntax, for `delete element`. `types` are the key
    /// types of its set (`ifname` parts are strings and must be quoted).
    pub fn key_nft(&self, types: &[String]) -> String {
        self.key
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let quoted = types.get(i).is_some_and(|t| t == "ifname" || t == "string");
                match v {
                    Value::String(s) if quoted => quote(s),
                    other => plain(other),
                }
            })
            .collect::<Vec<_>>()
            .join(" . ")
    }

    /// The key's parts rendered as plain strings (`["tcp", "8080"]`).
    pub fn key_strings(&self) -> Vec<String> {
        self.key.iter().map(plain).collect()
    }

    /// A map value's parts rendered as plain strings.
    pub fn value_strings(&self) -> Vec<String> {
        match &self.value {
            None => Vec::new(),
            Some(v) => match v.get("concat").and_then(Value::as_array) {
                Some(parts) => parts.iter().map(plain).collect(),
                None => vec![plain(v)],
            },
        }
    }

    /// The chain a verdict-map element jumps (or goes) to.
    pub fn jump_target(&self) -> Option<&str> {
        let v = self.value.as_ref()?;
        v.get("jump").or_else(|| v.get("goto")).and_then(|j| j.get("target")).and_then(Value::as_str)
    }
}

/// A listed value as nft writes it: strings bare, numbers, prefixes as
/// `addr/len`, ranges as `a-b`.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(o) if o.contains_key("prefix") => {
            let p = &o["prefix"];
            format!("{}/{}", plain(p.get("addr").unwrap_or(&Value::Null)), plain(p.get("len").unwrap_or(&Value::Null)))
        }
        Value::Object(o) if o.contains_key("range") => {
            let r = o["range"].as_array().cloned().unwrap_or_default();
            r.iter().map(plain).collect::<Vec<_>>().join("-")
        }
        other => other.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SetInfo {
    pub name: String,
    pub is_map: bool,
    /// Key types, one per concatenated part.
    pub types: Vec<String>,
    pub elements: Vec<Element>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuleInfo {
    pub chain: String,
    pub handle: u64,
    pub comment: String,
    /// Chains this rule jumps or goes to.
    pub targets: Vec<String>,
}

/// A table as `nft -j list table` shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Listing {
    pub sets: Vec<SetInfo>,
    pub chains: Vec<String>,
    pub rules: Vec<RuleInfo>,
}

impl Listing {
    /// `nft -j list table <family> <table>`; `None` when there is no table.
    pub fn load(family: &str, table: &str) -> Result<Option<Listing>, CniError> {
        let v = nft::list_json(&["list", "table", family, table])
            .map_err(|e| CniError::internal(format!("nftables: {e}")))?;
        Ok(v.map(|v| Listing::parse(&v)))
    }

    pub fn parse(listing: &Value) -> Listing {
        let mut out = Listing::default();
        for item in listing.get("nftables").and_then(Value::as_array).into_iter().flatten() {
            if let Some(c) = item.get("chain") {
                if let Some(name) = c.get("name").and_then(Value::as_str) {
                    out.chains.push(name.to_string());
                }
            } else if let Some(r) = item.get("rule") {
                let mut targets = Vec::new();
                collect_targets(r.get("expr").unwrap_or(&Value::Null), &mut targets);
                out.rules.push(RuleInfo {
                    chain: r.get("chain").and_then(Value::as_str).unwrap_or_default().to_string(),
                    handle: r.get("handle").and_then(Value::as_u64).unwrap_or_default(),
                    comment: r.get("comment").and_then(Value::as_str).unwrap_or_default().to_string(),
                    targets,
                });
            } else if let Some((is_map, s)) =
                item.get("set").map(|s| (false, s)).or_else(|| item.get("map").map(|m| (true, m)))
            {
                let types = match s.get("type") {
                    Some(Value::String(t)) => vec![t.clone()],
                    Some(Value::Array(ts)) => ts.iter().map(plain).collect(),
                    _ => Vec::new(),
                };
                let elements = s.get("elem").and_then(Value::as_array).into_iter().flatten().map(parse_elem).collect();
                out.sets.push(SetInfo {
                    name: s.get("name").and_then(Value::as_str).unwrap_or_default().to_string(),
                    is_map,
                    types,
                    elements,
                });
            }
        }
        out
    }

    pub fn set(&self, name: &str) -> Option<&SetInfo> {
        self.sets.iter().find(|s| s.name == name)
    }

    pub fn has_chain(&self, name: &str) -> bool {
        self.chains.iter().any(|c| c == name)
    }

    /// Rules of `chain`.
    pub fn rules_of<'a>(&'a self, chain: &'a str) -> impl Iterator<Item = &'a RuleInfo> + 'a {
        self.rules.iter().filter(move |r| r.chain == chain)
    }

    /// Every element, with the set it is in.
    pub fn elements(&self) -> impl Iterator<Item = (&SetInfo, &Element)> {
        self.sets.iter().flat_map(|s| s.elements.iter().map(move |e| (s, e)))
    }
}

fn parse_elem(elem: &Value) -> Element {
    // Map elements are [key, value]; set elements are the key alone. A key
    // with a comment is {"elem": {"val": key, "comment": ...}}.
    let (key, value) = match elem.as_array() {
        Some(pair) if pair.len() == 2 => (&pair[0], Some(pair[1].clone())),
        _ => (elem, None),
    };
    let inner = key.get("elem").unwrap_or(key);
    let comment = inner.get("comment").and_then(Value::as_str).unwrap_or_default().to_string();
    let val = inner.get("val").unwrap_or(inner);
    let key = match val.get("concat").and_then(Value::as_array) {
        Some(parts) => parts.clone(),
        None => vec![val.clone()],
    };
    Element { key, value, comment }
}

fn collect_targets(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, inner) in o {
                if k == "jump" || k == "goto" {
                    if let Some(t) = inner.get("target").and_then(Value::as_str) {
                        out.push(t.to_string());
                    }
                }
                collect_targets(inner, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_targets(x, out)),
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// Removal
// ---------------------------------------------------------------------------

/// Which per-network group a set/map or chain belongs to (`None`: shared).
pub trait Groups {
    fn of_set(&self, name: &str) -> Option<String>;
    fn of_chain(&self, name: &str) -> Option<String>;
}

pub struct RemovalPlan {
    pub script: String,
    /// The elements that go, with the name of their set.
    pub removed: Vec<(String, Element)>,
    /// The elements that stay, with the name of their set.
    pub remaining: Vec<(String, Element)>,
}

/// Pure: the script that removes the doomed elements of `listing`, then every
/// group left without elements (the rules that jump to or are commented with
/// the group's chains, the chains, the sets), or the whole table when no
/// element is left at all.
pub fn removal_plan(
    family: &str,
    table: &str,
    listing: &Listing,
    doomed: &dyn Fn(&str) -> bool,
    groups: &dyn Groups,
) -> RemovalPlan {
    let mut script = String::new();
    let mut removed = Vec::new();
    let mut remaining = Vec::new();
    for (set, e) in listing.elements() {
        if doomed(&e.comment) {
            removed.push((set.name.clone(), e.clone()));
        } else {
            remaining.push((set.name.clone(), e.clone()));
        }
    }
    if remaining.is_empty() {
        if !listing.sets.is_empty() || !listing.chains.is_empty() {
            let _ = writeln!(script, "delete table {family} {table}");
        }
        return RemovalPlan { script, removed, remaining };
    }
    for (set_name, e) in &removed {
        let types = listing.set(set_name).map(|s| s.types.clone()).unwrap_or_default();
        let _ = writeln!(script, "delete element {family} {table} {set_name} {{ {} }}", e.key_nft(&types));
    }
    // Groups still in use: one of their sets holds an element, or a verdict
    // map element jumps to one of their chains.
    let mut live: BTreeSet<String> = BTreeSet::new();
    for (set_name, e) in &remaining {
        if let Some(g) = groups.of_set(set_name) {
            live.insert(g);
        }
        if let Some(g) = e.jump_target().and_then(|t| groups.of_chain(t)) {
            live.insert(g);
        }
    }
    let mut all: BTreeSet<String> = BTreeSet::new();
    all.extend(listing.sets.iter().filter_map(|s| groups.of_set(&s.name)));
    all.extend(listing.chains.iter().filter_map(|c| groups.of_chain(c)));
    for dead in all.difference(&live) {
        let chains: Vec<&String> =
            listing.chains.iter().filter(|c| groups.of_chain(c).as_ref() == Some(dead)).collect();
        for r in &listing.rules {
            let refers = r.comment == *dead || r.targets.iter().any(|t| groups.of_chain(t).as_ref() == Some(dead));
            let inside = groups.of_chain(&r.chain).as_ref() == Some(dead);
            if refers && !inside {
                let _ = writeln!(script, "delete rule {family} {table} {} handle {}", r.chain, r.handle);
            }
        }
        for c in &chains {
            let _ = writeln!(script, "delete chain {family} {table} {c}");
        }
        for s in listing.sets.iter().filter(|s| groups.of_set(&s.name).as_ref() == Some(dead)) {
            let _ = writeln!(script, "delete {} {family} {table} {}", if s.is_map { "map" } else { "set" }, s.name);
        }
    }
    RemovalPlan { script, removed, remaining }
}

/// Under the lock: remove from `table` the elements whose owner tag satisfies
/// `doomed`, and whatever is left without purpose. Returns the plan applied
/// (so callers can undo side effects of what went).
pub fn remove_owned(
    family: &str,
    table: &str,
    doomed: &dyn Fn(&str) -> bool,
    groups: &dyn Groups,
) -> Result<Option<RemovalPlan>, CniError> {
    let _guard = lock()?;
    let Some(listing) = Listing::load(family, table)? else { return Ok(None) };
    let plan = removal_plan(family, table, &listing, doomed, groups);
    if !plan.script.is_empty() {
        apply(&plan.script)?;
    }
    Ok(Some(plan))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    struct ByPrefix;
    impl Groups for ByPrefix {
        fn of_set(&self, name: &str) -> Option<String> {
            name.strip_prefix('n').map(|rest| format!("n{}", rest.split('_').next().unwrap_or_default()))
        }
        fn of_chain(&self, name: &str) -> Option<String> {
            name.starts_with('n').then(|| name.to_string())
        }
    }

    fn listing() -> Listing {
        Listing::parse(&json!({"nftables": [
            {"table": {"name": "t"}},
            {"map": {"name": "n1_a4", "type": ["inet_proto", "inet_service"], "map": "ipv4_addr . inet_service",
                "elem": [[{"elem": {"val": {"concat": ["tcp", 80]}, "comment": "net/a/eth0"}}, {"concat": ["10.0.0.2", 8080]}]]}},
            {"map": {"name": "n2_a4", "type": ["inet_proto", "inet_service"], "map": "ipv4_addr . inet_service",
                "elem": [[{"elem": {"val": {"concat": ["udp", 53]}, "comment": "other/b/eth0"}}, {"concat": ["10.1.0.2", 53]}]]}},
            {"set": {"name": "hairpin4", "type": ["ipv4_addr", "ipv4_addr"], "flags": ["interval"],
                "elem": [{"elem": {"val": {"concat": [{"prefix": {"addr": "10.0.0.0", "len": 24}}, "10.0.0.2"]}, "comment": "net/a/eth0"}}]}},
            {"set": {"name": "localnet", "type": ["ifname", "ipv4_addr"],
                "elem": [{"elem": {"val": {"concat": ["br0", "10.1.0.2"]}, "comment": "other/b/eth0"}}]}},
            {"chain": {"name": "hostports"}}, {"chain": {"name": "n1"}}, {"chain": {"name": "n2"}},
            {"rule": {"chain": "hostports", "handle": 7, "expr": [{"jump": {"target": "n1"}}]}},
            {"rule": {"chain": "hostports", "handle": 8, "expr": [{"jump": {"target": "n2"}}]}},
            {"rule": {"chain": "postrouting", "handle": 9, "comment": "n1", "expr": [{"goto": {"target": "masq"}}]}}
        ]}))
    }

    #[test]
    fn parses_elements_and_rules() {
        let l = listing();
        assert_eq!(l.sets.len(), 4);
        assert_eq!(
            l.set("localnet").unwrap().elements[0].key_nft(&l.set("localnet").unwrap().types),
            "\"br0\" . 10.1.0.2"
        );
        let e = &l.set("n1_a4").unwrap().elements[0];
        assert_eq!(e.key_strings(), vec!["tcp", "80"]);
        assert_eq!(e.value_strings(), vec!["10.0.0.2", "8080"]);
        assert_eq!(e.comment, "net/a/eth0");
        assert_eq!(l.rules[0].targets, vec!["n1"]);
        assert_eq!(l.rules[2].comment, "n1");
    }

    #[test]
    fn removes_elements_and_the_dead_group() {
        let plan = removal_plan("inet", "t", &listing(), &|c| c == "net/a/eth0", &ByPrefix);
        assert_eq!(plan.removed.len(), 2);
        let s = &plan.script;
        assert!(s.contains("delete element inet t n1_a4 { tcp . 80 }"), "{s}");
        assert!(s.contains("delete element inet t hairpin4 { 10.0.0.0/24 . 10.0.0.2 }"), "{s}");
        assert!(s.contains("delete rule inet t hostports handle 7"), "{s}");
        assert!(s.contains("delete rule inet t postrouting handle 9"), "{s}");
        assert!(s.contains("delete chain inet t n1\n"), "{s}");
        assert!(s.contains("delete map inet t n1_a4"), "{s}");
        assert!(!s.contains("handle 8") && !s.contains("n2"), "{s}");
        assert!(!s.contains("delete table"), "{s}");
    }

    #[test]
    fn removes_the_table_with_the_last_element() {
        let plan = removal_plan("inet", "t", &listing(), &|_| true, &ByPrefix);
        assert_eq!(plan.script, "delete table inet t\n");
        assert_eq!(plan.removed.len(), 4);
    }

    #[test]
    fn nothing_doomed_nothing_done() {
        let plan = removal_plan("inet", "t", &listing(), &|_| false, &ByPrefix);
        assert!(plan.script.is_empty(), "{}", plan.script);
    }
}
