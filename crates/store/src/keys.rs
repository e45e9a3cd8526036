//! The key layout, version 1. Every key tern writes is built here.
//!
//! ```text
//! /tern/schema                                 {"version":1}: the layout in use (see "Migration")
//! /tern/v1/nodes/<node>                        node record (agent-defined JSON), put under the node's lease
//! /tern/v1/ipam/pools/<cidr>                   PoolRecord {"cidr","blockPrefix"}: pins one block size per pool
//! /tern/v1/ipam/blocks/<cidr>                  BlockRecord {"cidr","used","node","claimedAt","handles","borrowed"}:
//!                                              who owns the block (the authority) and which addresses are used
//! /tern/v1/ipam/affinity/<node>/<cidr>         AffinityRecord {"node","cidr"}: index "blocks of a node";
//!                                              rebuilt from the blocks by `ipam::reconcile_affinities`
//! /tern/v1/ipam/handles/<handle>               addresses held by one attachment (agent-defined JSON)
//! /tern/v1/ipam/idle/<cidr>                    idle mark {"cidr","node","reason","firstSeenMs","blockRevision"}:
//!                                              since when the block has been empty (or its node gone); the
//!                                              collector (agent `gc`) releases it a grace period later
//! /tern/v1/ipam/leaks/<address>                leak mark {"address","block","handle","node","reason","firstSeenMs"}:
//!                                              since when an address has looked leaked; freed a grace period later
//! /tern/v1/attachments/<handle-id>             endpoint record of one attachment (agent `endpoints`), written on
//!                                              every allocate, deleted on release: find an endpoint by handle
//! /tern/v1/endpoints/<namespace>/<pod>/<ifname> the same record for pods with K8S_POD_NAMESPACE/K8S_POD_NAME:
//!                                              find an endpoint by pod
//! ```
//!
//! An endpoint is found by address through the blocks: the address's block
//! (its pool's block size gives the CIDR) maps the address to its handle,
//! and [`attachment`] maps the handle to the record. The idle and leak marks
//! live in the store, not in one process, so `tern ipam gc` on any machine
//! and every agent's collector count the same grace periods. `<handle-id>` is
//! the handle as one component ([`handle_id`]): `/`, `%`, `~` and control
//! characters escaped as `%XX`, a leading `.` too, and a handle whose escaped
//! form exceeds 253 bytes cut and suffixed with `~` and a 64-bit FNV-1a hash
//! of the whole handle (the record itself holds the full handle).
//!
//! `<cidr>` is written `<address>-<prefix>` (`10.244.3.64-26`, `fd00::40-122`),
//! as Calico does, so a CIDR is one path component. `<node>`, `<handle>`,
//! `<namespace>`, `<pod>` and `<ifname>` are single components: non-empty, at
//! most 253 bytes, no `/`, no control characters, not `.` or `..`
//! ([`component`]). Values are JSON (UTF-8) unless noted.
//!
//! Rules for every writer: the block key is the only authority on who owns
//! a block and which of its addresses are used; every change to it is a
//! compare-and-swap on the revision read. Everything else is an index or a
//! record that can be rebuilt from the blocks and the nodes.
//!
//! # Migration
//!
//! The layout version is part of every key (`/tern/v1/`), and the key
//! [`SCHEMA_KEY`] (outside any version) names the layout the cluster uses.
//! Binaries call [`ensure_schema`] at start: it creates `{"version":1}` on an
//! empty store, accepts 1, and refuses a higher version with
//! [`StoreError::Schema`] ("upgrade tern") rather than writing old-layout
//! keys next to new ones. A future layout 2 is migrated by a one-shot command
//! of the new binary: copy and convert `/tern/v1/...` to `/tern/v2/...`, then
//! compare-and-swap [`SCHEMA_KEY`] from 1 to 2 (old agents watching it stop
//! writing), then delete `/tern/v1/`. New fields inside a version's JSON
//! values need no migration: readers ignore unknown fields and default missing
//! ones.
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::{Result, StoreError};
use crate::Datastore;

/// The layout this binary reads and writes.
pub const SCHEMA_VERSION: u32 = 1;
/// Holds `{"version":N}`: the layout the cluster's data uses.
pub const SCHEMA_KEY: &str = "/tern/schema";
/// Everything of layout 1 lives below this.
pub const ROOT: &str = "/tern/v1/";
pub const NODES: &str = "/tern/v1/nodes/";
pub const IPAM_POOLS: &str = "/tern/v1/ipam/pools/";
pub const IPAM_BLOCKS: &str = "/tern/v1/ipam/blocks/";
pub const IPAM_AFFINITY: &str = "/tern/v1/ipam/affinity/";
pub const IPAM_HANDLES: &str = "/tern/v1/ipam/handles/";
pub const ENDPOINTS: &str = "/tern/v1/endpoints/";
pub const IPAM_IDLE: &str = "/tern/v1/ipam/idle/";
pub const IPAM_LEAKS: &str = "/tern/v1/ipam/leaks/";
pub const ATTACHMENTS: &str = "/tern/v1/attachments/";

/// Longest single component (a Kubernetes object name is at most 253).
pub const MAX_COMPONENT: usize = 253;

/// Checks that `s` can be one key component; `what` names it in the error.
pub fn component<'a>(what: &str, s: &'a str) -> Result<&'a str> {
    let bad = |why: &str| Err(StoreError::Invalid(format!("{what} {s:?}: {why}")));
    if s.is_empty() {
        return bad("empty");
    }
    if s.len() > MAX_COMPONENT {
        return bad("longer than 253 bytes");
    }
    if s == "." || s == ".." {
        return bad("not a name");
    }
    if s.contains('/') {
        return bad("contains '/'");
    }
    if s.chars().any(|c| c.is_control()) {
        return bad("contains a control character");
    }
    Ok(s)
}

/// A full key as every backend accepts it: starts with `/`, no control
/// characters, at most 4096 bytes.
pub fn check_key(key: &str) -> Result<()> {
    if !key.starts_with('/') {
        return Err(StoreError::Invalid(format!("key {key:?} does not start with '/'")));
    }
    check_prefix(key)
}

/// A prefix for `list`/`watch`: like a key, but `""` means everything.
pub fn check_prefix(prefix: &str) -> Result<()> {
    if !prefix.is_empty() && !prefix.starts_with('/') {
        return Err(StoreError::Invalid(format!("prefix {prefix:?} does not start with '/'")));
    }
    if prefix.len() > 4096 {
        return Err(StoreError::Invalid("key longer than 4096 bytes".into()));
    }
    if prefix.chars().any(|c| c.is_control()) {
        return Err(StoreError::Invalid(format!("key {prefix:?} contains a control character")));
    }
    Ok(())
}

/// `10.244.3.64/26` -> `10.244.3.64-26`.
pub fn cidr_id(cidr: &IpNet) -> String {
    format!("{}-{}", cidr.addr(), cidr.prefix_len())
}

/// `10.244.3.64-26` -> `10.244.3.64/26` (only canonical network CIDRs).
pub fn parse_cidr_id(id: &str) -> Option<IpNet> {
    let (addr, len) = id.rsplit_once('-')?;
    let net: IpNet = format!("{addr}/{len}").parse().ok()?;
    (net.addr() == net.network() && cidr_id(&net) == id).then_some(net)
}

pub fn node(name: &str) -> Result<String> {
    Ok(format!("{NODES}{}", component("node name", name)?))
}

pub fn pool(cidr: &IpNet) -> String {
    format!("{IPAM_POOLS}{}", cidr_id(cidr))
}

pub fn block(cidr: &IpNet) -> String {
    format!("{IPAM_BLOCKS}{}", cidr_id(cidr))
}

pub fn affinity(node: &str, cidr: &IpNet) -> Result<String> {
    Ok(format!("{}{}", affinity_prefix(node)?, cidr_id(cidr)))
}

/// `/tern/v1/ipam/affinity/<node>/`: list it for the node's blocks.
pub fn affinity_prefix(node: &str) -> Result<String> {
    Ok(format!("{IPAM_AFFINITY}{}/", component("node name", node)?))
}

pub fn handle(handle: &str) -> Result<String> {
    Ok(format!("{IPAM_HANDLES}{}", component("handle", handle)?))
}

pub fn endpoint(namespace: &str, pod: &str, ifname: &str) -> Result<String> {
    Ok(format!("{}{}", endpoints_of_pod(namespace, pod)?, component("interface name", ifname)?))
}

/// `/tern/v1/endpoints/<ns>/<pod>/`: every interface of one pod.
pub fn endpoints_of_pod(namespace: &str, pod: &str) -> Result<String> {
    Ok(format!("{ENDPOINTS}{}/{}/", component("namespace", namespace)?, component("pod name", pod)?))
}

/// `/tern/v1/ipam/idle/<cidr>`: the block collector's mark of an idle block.
pub fn idle_block(cidr: &IpNet) -> String {
    format!("{IPAM_IDLE}{}", cidr_id(cidr))
}

/// `/tern/v1/ipam/leaks/<address>` (`10.244.3.7`, `fd00::47`).
pub fn leak(address: &IpAddr) -> String {
    format!("{IPAM_LEAKS}{address}")
}

/// The address of a `/tern/v1/ipam/leaks/<address>` key.
pub fn leak_address(key: &str) -> Option<IpAddr> {
    name_under(IPAM_LEAKS, key)?.parse().ok()
}

/// `/tern/v1/attachments/<handle-id>`: the endpoint record of `handle`.
pub fn attachment(handle: &str) -> Result<String> {
    if handle.is_empty() {
        return Err(StoreError::Invalid("handle \"\": empty".into()));
    }
    Ok(format!("{ATTACHMENTS}{}", handle_id(handle)))
}

/// Longest escaped handle kept whole; longer ones are cut to this and hashed.
const HANDLE_ID_CUT: usize = 200;

/// A handle (`<network>/<containerID>/<ifname>`, any string really) as one
/// key component; see the module docs. Distinct handles give distinct ids
/// (the cut-and-hash form up to a 64-bit hash collision).
pub fn handle_id(handle: &str) -> String {
    let mut out = String::with_capacity(handle.len() + 8);
    for (i, c) in handle.char_indices() {
        let escape = matches!(c, '/' | '%' | '~') || c.is_control() || (i == 0 && c == '.');
        if escape {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{b:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    if out.len() <= MAX_COMPONENT {
        return out;
    }
    let mut cut = HANDLE_ID_CUT;
    while !out.is_char_boundary(cut) {
        cut -= 1;
    }
    // FNV-1a: stable across builds and versions, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in handle.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{}~{h:016x}", &out[..cut])
}

/// The rest of `key` after `prefix`, if it is exactly one component
/// (`name_under("/tern/v1/nodes/", "/tern/v1/nodes/n1") == Some("n1")`).
pub fn name_under<'a>(prefix: &str, key: &'a str) -> Option<&'a str> {
    let rest = key.strip_prefix(prefix)?;
    (!rest.is_empty() && !rest.contains('/')).then_some(rest)
}

/// The block CIDR of a `/tern/v1/ipam/blocks/<cidr>` or
/// `/tern/v1/ipam/affinity/<node>/<cidr>` key.
pub fn block_of_key(key: &str) -> Option<IpNet> {
    let id = key.strip_prefix(IPAM_BLOCKS).or_else(|| key.strip_prefix(IPAM_AFFINITY)?.split_once('/').map(|x| x.1))?;
    parse_cidr_id(id)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Schema {
    version: u32,
}

/// Creates [`SCHEMA_KEY`] on an empty store and checks the version otherwise.
/// Returns the version (always [`SCHEMA_VERSION`] on success).
pub fn ensure_schema(store: &dyn Datastore) -> Result<u32> {
    let ours = serde_json::to_vec(&Schema { version: SCHEMA_VERSION }).expect("serialise");
    loop {
        match store.get(SCHEMA_KEY)? {
            Some(kv) => {
                let s: Schema = serde_json::from_slice(&kv.value).map_err(|e| StoreError::corrupt(SCHEMA_KEY, e))?;
                if s.version != SCHEMA_VERSION {
                    return Err(StoreError::Schema { found: s.version, supported: SCHEMA_VERSION });
                }
                return Ok(s.version);
            }
            None => match store.create(SCHEMA_KEY, &ours, None) {
                Ok(_) => return Ok(SCHEMA_VERSION),
                // Someone else created it first: read theirs.
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let b: IpNet = "10.244.3.64/26".parse().unwrap();
        let b6: IpNet = "fd00::40/122".parse().unwrap();
        assert_eq!(block(&b), "/tern/v1/ipam/blocks/10.244.3.64-26");
        assert_eq!(block(&b6), "/tern/v1/ipam/blocks/fd00::40-122");
        assert_eq!(pool(&"10.244.0.0/16".parse().unwrap()), "/tern/v1/ipam/pools/10.244.0.0-16");
        assert_eq!(affinity("n1", &b).unwrap(), "/tern/v1/ipam/affinity/n1/10.244.3.64-26");
        assert_eq!(node("n1").unwrap(), "/tern/v1/nodes/n1");
        assert_eq!(handle("tern.abc.eth0").unwrap(), "/tern/v1/ipam/handles/tern.abc.eth0");
        assert_eq!(endpoint("default", "web-0", "eth0").unwrap(), "/tern/v1/endpoints/default/web-0/eth0");
        assert_eq!(block_of_key(&block(&b6)), Some(b6));
        assert_eq!(block_of_key(&affinity("n1", &b).unwrap()), Some(b));
        assert_eq!(block_of_key("/tern/v1/ipam/blocks/10.0.0.1-26"), None);
        assert_eq!(parse_cidr_id("fd00::40-122"), Some(b6));
        assert_eq!(parse_cidr_id("10.0.0.0-33"), None);
        assert_eq!(parse_cidr_id("10.0.0.0/26"), None);
        assert_eq!(name_under(NODES, "/tern/v1/nodes/n1"), Some("n1"));
        assert_eq!(name_under(NODES, "/tern/v1/nodes/n1/x"), None);
        assert_eq!(name_under(NODES, "/tern/v1/nodes/"), None);
        assert_eq!(idle_block(&b), "/tern/v1/ipam/idle/10.244.3.64-26");
        let ip6: IpAddr = "fd00::47".parse().unwrap();
        assert_eq!(leak(&ip6), "/tern/v1/ipam/leaks/fd00::47");
        assert_eq!(leak_address(&leak(&ip6)), Some(ip6));
        assert_eq!(leak_address("/tern/v1/ipam/leaks/x"), None);
        assert_eq!(attachment("cnet/abc/eth0").unwrap(), "/tern/v1/attachments/cnet%2Fabc%2Feth0");
        assert!(attachment("").is_err());
    }

    #[test]
    fn handle_ids_are_components_and_distinct() {
        assert_eq!(handle_id("@warm/n1/3"), "@warm%2Fn1%2F3");
        assert_eq!(handle_id("a%2Fb"), "a%252Fb");
        assert_ne!(handle_id("a/b"), handle_id("a%2Fb"));
        assert_eq!(handle_id(".."), "%2E.");
        assert_eq!(handle_id("x\ny~"), "x%0Ay%7E");
        for h in ["a/b/c", ".", "..", "%", "~", "é/ü", "x\u{7f}"] {
            component("id", &handle_id(h)).unwrap();
        }
        let long_a = format!("net/{}/eth0", "a".repeat(300));
        let long_b = format!("net/{}/eth1", "a".repeat(300));
        let (ia, ib) = (handle_id(&long_a), handle_id(&long_b));
        assert!(ia.len() <= MAX_COMPONENT && ib.len() <= MAX_COMPONENT, "{ia}");
        assert_ne!(ia, ib);
        assert_eq!(ia, handle_id(&long_a));
        component("id", &ia).unwrap();
        // Multi-byte characters at the cut stay whole.
        let wide = "é".repeat(200);
        component("id", &handle_id(&wide)).unwrap();
    }

    #[test]
    fn components_are_checked() {
        assert!(node("").is_err());
        assert!(node("a/b").is_err());
        assert!(node("..").is_err());
        assert!(node("a\nb").is_err());
        assert!(node(&"x".repeat(254)).is_err());
        assert!(node(&"x".repeat(253)).is_ok());
        assert!(endpoint("ns", "pod", "").is_err());
        assert!(check_key("tern").is_err());
        assert!(check_key("/a\0b").is_err());
        assert!(check_key("/tern/v1/x").is_ok());
        assert!(check_prefix("").is_ok());
    }
}
