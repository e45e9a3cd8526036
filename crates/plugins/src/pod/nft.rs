//! nftables state of the `tern` plugin: masquerade (`ipMasq`) and MAC spoof
//! checking (`macspoofchk`).
//!
//! Per-pod state is one map or set element tagged with the owner tag in its
//! comment, so ADD costs O(1) rules, lookups are hash lookups, and DEL/GC find
//! what to remove from the kernel alone. Changes are serialised per network
//! namespace by a flock on the namespace itself, because "delete the table when its last element
//! goes" must not race an ADD.
use std::fmt::Write as _;
use std::fs::File;

use ipnet::IpNet;
use nix::fcntl::{Flock, FlockArg};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tern_cni::CniError;
use tern_sys::nft;

pub const MASQ_TABLE: &str = "tern_masq";
pub const SPOOF_TABLE: &str = "tern_spoof";
/// Exclusive lock on nftables changes in the current network namespace.
///
/// The lock is taken on the namespace's own nsfs file: every open of it is
/// the same inode, so processes exclude each other, the lock lives exactly as
/// long as the namespace, and no lock file is left on disk.
pub(crate) fn lock() -> Result<Flock<File>, CniError> {
    const NETNS: &str = "/proc/thread-self/ns/net";
    let f = File::open(NETNS).map_err(|e| CniError::internal(format!("failed to open {NETNS}: {e}")))?;
    Flock::lock(f, FlockArg::LockExclusive).map_err(|(_, e)| CniError::internal(format!("failed to lock {NETNS}: {e}")))
}

fn apply(script: &str) -> Result<(), CniError> {
    nft::run(script).map_err(|e| CniError::internal(format!("nftables: {e}")))
}

/// Name of the masquerade chain for one network subnet.
fn masq_chain(network: &str, subnet: &IpNet) -> String {
    let mut h = Sha256::new();
    h.update(network.as_bytes());
    h.update([0]);
    h.update(subnet.to_string().as_bytes());
    let hex: String = h.finalize().iter().take(5).map(|b| format!("{b:02x}")).collect();
    format!("m-{hex}")
}

/// The script that masquerades traffic from `addrs` leaving their subnet
/// (multicast excluded, as the reference plugin does).
pub fn masq_add_script(network: &str, owner: &str, addrs: &[IpNet]) -> String {
    let t = MASQ_TABLE;
    let mut s = format!(
        "add table inet {t}\n\
         add chain inet {t} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         add map inet {t} pods4 {{ type ipv4_addr : verdict; }}\n\
         add map inet {t} pods6 {{ type ipv6_addr : verdict; }}\n\
         flush chain inet {t} postrouting\n\
         add rule inet {t} postrouting ip saddr vmap @pods4\n\
         add rule inet {t} postrouting ip6 saddr vmap @pods6\n"
    );
    // Comments are limited to 128 bytes; long network names are hashed.
    let tag = crate::names::network_tag(network);
    for addr in addrs {
        let subnet = addr.trunc();
        let chain = masq_chain(network, &subnet);
        let (fam, multicast, map) = match addr {
            IpNet::V4(_) => ("ip", "224.0.0.0/4", "pods4"),
            IpNet::V6(_) => ("ip6", "ff00::/8", "pods6"),
        };
        let _ = write!(
            s,
            "add chain inet {t} {chain}\n\
             flush chain inet {t} {chain}\n\
             add rule inet {t} {chain} {fam} daddr {subnet} return comment \"{tag}\"\n\
             add rule inet {t} {chain} {fam} daddr {multicast} return\n\
             add rule inet {t} {chain} masquerade\n\
             add element inet {t} {map} {{ {} comment \"{owner}\" : jump {chain} }}\n",
            addr.addr()
        );
    }
    s
}

pub fn masq_add(network: &str, owner: &str, addrs: &[IpNet]) -> Result<(), CniError> {
    if addrs.is_empty() {
        return Ok(());
    }
    let _guard = lock()?;
    apply(&masq_add_script(network, owner, addrs))
}

/// The script that adds an allowed (port, MAC) pair to the spoof check.
pub fn spoof_add_script(port: &str, mac: &str, owner: &str) -> String {
    let t = SPOOF_TABLE;
    format!(
        "add table bridge {t}\n\
         add chain bridge {t} prerouting {{ type filter hook prerouting priority -300; policy accept; }}\n\
         add set bridge {t} ports {{ type ifname; }}\n\
         add set bridge {t} allowed {{ type ifname . ether_addr; }}\n\
         flush chain bridge {t} prerouting\n\
         add rule bridge {t} prerouting iifname @ports iifname . ether saddr != @allowed drop\n\
         add element bridge {t} ports {{ \"{port}\" comment \"{owner}\" }}\n\
         add element bridge {t} allowed {{ \"{port}\" . {mac} comment \"{owner}\" }}\n"
    )
}

pub fn spoof_add(port: &str, mac: &str, owner: &str) -> Result<(), CniError> {
    let _guard = lock()?;
    apply(&spoof_add_script(port, mac, owner))
}

/// Remove from `table` every element whose owner tag satisfies `doomed`;
/// remove the table when nothing is left in it, and masquerade chains no
/// element jumps to any more. Returns how many elements went.
pub fn remove_owned(family: &str, table: &str, doomed: &dyn Fn(&str) -> bool) -> Result<usize, CniError> {
    let _guard = lock()?;
    let listing =
        nft::list_json(&["list", "table", family, table]).map_err(|e| CniError::internal(format!("nftables: {e}")))?;
    let Some(listing) = listing else { return Ok(0) };
    let plan = removal_plan(family, table, &listing, doomed);
    if plan.script.is_empty() {
        return Ok(0);
    }
    apply(&plan.script)?;
    Ok(plan.removed)
}

pub struct RemovalPlan {
    pub script: String,
    pub removed: usize,
}

/// Pure: from a `nft -j list table` listing, the script that removes the
/// doomed elements (and the table or chains left without purpose).
pub fn removal_plan(family: &str, table: &str, listing: &Value, doomed: &dyn Fn(&str) -> bool) -> RemovalPlan {
    let items = listing.get("nftables").and_then(Value::as_array).cloned().unwrap_or_default();
    let mut script = String::new();
    let mut removed = 0;
    let mut remaining = 0;
    let mut jump_targets_left = std::collections::HashSet::new();
    let mut chains = Vec::new();
    for item in &items {
        if let Some(c) = item.get("chain") {
            if let Some(name) = c.get("name").and_then(Value::as_str) {
                chains.push(name.to_string());
            }
        }
        let Some((kind, set)) = item.get("set").map(|s| ("set", s)).or_else(|| item.get("map").map(|m| ("map", m)))
        else {
            continue;
        };
        let name = set.get("name").and_then(Value::as_str).unwrap_or_default();
        for elem in set.get("elem").and_then(Value::as_array).into_iter().flatten() {
            // Map elements are [key, value]; set elements are the key alone.
            let (key, value) = match elem.as_array() {
                Some(pair) if pair.len() == 2 => (&pair[0], Some(&pair[1])),
                _ => (elem, None),
            };
            let inner = key.get("elem").unwrap_or(key);
            let comment = inner.get("comment").and_then(Value::as_str).unwrap_or_default();
            let val = inner.get("val").unwrap_or(inner);
            if doomed(comment) {
                let _ = writeln!(script, "delete element {family} {table} {name} {{ {} }}", nft_key(val));
                removed += 1;
                let _ = kind;
            } else {
                remaining += 1;
                if let Some(target) =
                    value.and_then(|v| v.get("jump")).and_then(|j| j.get("target")).and_then(Value::as_str)
                {
                    jump_targets_left.insert(target.to_string());
                }
            }
        }
    }
    if removed == 0 {
        return RemovalPlan { script: String::new(), removed: 0 };
    }
    if remaining == 0 {
        let _ = writeln!(script, "delete table {family} {table}");
    } else {
        for c in chains.iter().filter(|c| c.starts_with("m-") && !jump_targets_left.contains(*c)) {
            let _ = writeln!(script, "delete chain {family} {table} {c}");
        }
    }
    RemovalPlan { script, removed }
}

/// Render a JSON element key back into nft syntax.
fn nft_key(val: &Value) -> String {
    match val {
        Value::String(s) if s.contains(':') && s.len() == 17 && !s.contains("::") => s.clone(),
        Value::String(s) if s.parse::<std::net::IpAddr>().is_ok() => s.clone(),
        Value::String(s) => format!("\"{s}\""),
        Value::Number(n) => n.to_string(),
        Value::Object(o) => match o.get("concat").and_then(Value::as_array) {
            Some(parts) => parts.iter().map(nft_key).collect::<Vec<_>>().join(" . "),
            None => val.to_string(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn removal_deletes_table_when_last_element_goes() {
        let listing = json!({"nftables": [
            {"map": {"name": "pods4", "elem": [[{"elem": {"val": "10.0.0.2", "comment": "n/a/eth0"}}, {"jump": {"target": "m-1"}}]]}},
            {"chain": {"name": "m-1"}}
        ]});
        let plan = removal_plan("inet", "t", &listing, &|c| c == "n/a/eth0");
        assert_eq!(plan.removed, 1);
        assert!(plan.script.contains("delete element inet t pods4 { 10.0.0.2 }"));
        assert!(plan.script.contains("delete table inet t"));
    }

    #[test]
    fn removal_keeps_chains_still_in_use() {
        let listing = json!({"nftables": [
            {"map": {"name": "pods4", "elem": [
                [{"elem": {"val": "10.0.0.2", "comment": "n/a/eth0"}}, {"jump": {"target": "m-1"}}],
                [{"elem": {"val": "10.0.0.3", "comment": "n/b/eth0"}}, {"jump": {"target": "m-1"}}]]}},
            {"set": {"name": "allowed", "elem": [{"elem": {"val": {"concat": ["tn1", "aa:bb:cc:dd:ee:ff"]}, "comment": "n/a/eth0"}}]}},
            {"chain": {"name": "m-1"}}, {"chain": {"name": "m-2"}}
        ]});
        let plan = removal_plan("inet", "t", &listing, &|c| c == "n/a/eth0");
        assert_eq!(plan.removed, 2);
        assert!(plan.script.contains("{ \"tn1\" . aa:bb:cc:dd:ee:ff }"), "{}", plan.script);
        assert!(!plan.script.contains("delete table"));
        assert!(plan.script.contains("delete chain inet t m-2"));
        assert!(!plan.script.contains("delete chain inet t m-1"));
    }
}
