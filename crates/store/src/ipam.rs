//! Cluster IPAM records and block ownership, on any [`Datastore`].
//!
//! The block key (`/tern/v1/ipam/blocks/<cidr>`) is the single authority for
//! a block: its [`BlockRecord`] names the owning node and holds the
//! allocation bitmap plus the handle of every used address. It is only ever
//! created with [`Datastore::create`] (so two nodes can never both claim it)
//! and changed or deleted with a compare-and-swap on the revision that was
//! read. The affinity keys are an index ("blocks of node N") written after
//! a claim and removed after a release; a crash between the two leaves the
//! index stale, never the ownership, and [`reconcile_affinities`] repairs it.
//!
//! An address may be allocated in another node's block when a node's pool
//! is exhausted (borrowing): the block keeps its owner and the record names
//! the borrower of that address ([`BlockRecord::borrowed`]), so the borrower
//! finds and frees it and the owner does not count it as its own pod.
//!
//! A pool's block size is pinned in the store on first use
//! ([`ensure_pool`]): a node configured with another block size for the same
//! CIDR, or with a CIDR overlapping another pool, is refused, because blocks
//! of different sizes would overlap under different keys.
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tern_ipam::block::{Block, BlockError, Pool};

use crate::error::StoreError;
use crate::keys;
use crate::{Datastore, Revision};

/// A record and the revision it was read at (what a compare-and-swap needs).
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned<T> {
    pub value: T,
    pub revision: Revision,
}

/// `/tern/v1/ipam/pools/<cidr>`: pins the block size of a pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolRecord {
    pub cidr: IpNet,
    pub block_prefix: u8,
}

/// `/tern/v1/ipam/blocks/<cidr>`:
/// `{"cidr":"10.0.0.0/26","used":"<hex bitmap>","node":"n1","claimedAt":1700000000,"handles":{"0":"h1"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockRecord {
    #[serde(flatten)]
    pub block: Block,
    /// The owning node.
    pub node: String,
    /// Unix seconds of the claim.
    #[serde(default)]
    pub claimed_at: u64,
    /// Ordinal -> handle of every used address (kept in step with the
    /// bitmap by the methods below).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub handles: BTreeMap<u32, String>,
    /// Ordinal -> node, for addresses another node borrowed (allocated here
    /// because its own pool was exhausted); the block keeps its owner.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub borrowed: BTreeMap<u32, String>,
}

impl BlockRecord {
    pub fn new(block: Block, node: &str) -> BlockRecord {
        BlockRecord {
            block,
            node: node.to_string(),
            claimed_at: unix_now(),
            handles: BTreeMap::new(),
            borrowed: BTreeMap::new(),
        }
    }

    pub fn cidr(&self) -> IpNet {
        self.block.cidr()
    }

    /// Takes the lowest free address for `handle`.
    pub fn allocate(&mut self, handle: &str) -> Option<IpAddr> {
        let ip = self.block.allocate()?;
        let ord = self.block.ordinal(ip).expect("allocated inside");
        self.handles.insert(ord, handle.to_string());
        Some(ip)
    }

    /// Takes `ip` for `handle`.
    pub fn allocate_ip(&mut self, ip: IpAddr, handle: &str) -> Result<(), BlockError> {
        self.block.allocate_ip(ip)?;
        let ord = self.block.ordinal(ip).expect("allocated inside");
        self.handles.insert(ord, handle.to_string());
        Ok(())
    }

    /// Takes the lowest free address for `handle` on behalf of `borrower`,
    /// a node that does not own the block.
    pub fn allocate_borrowed(&mut self, handle: &str, borrower: &str) -> Option<IpAddr> {
        let ip = self.allocate(handle)?;
        let ord = self.block.ordinal(ip).expect("allocated inside");
        self.borrowed.insert(ord, borrower.to_string());
        Some(ip)
    }

    /// Takes the lowest free address, naming it by `handle_for(address)`.
    pub fn allocate_with(&mut self, handle_for: impl FnOnce(IpAddr) -> String) -> Option<IpAddr> {
        let ip = self.block.allocate()?;
        let ord = self.block.ordinal(ip).expect("allocated inside");
        self.handles.insert(ord, handle_for(ip));
        Some(ip)
    }

    /// Gives the used address `ip` to `handle` (it keeps its borrower, if
    /// any); false if `ip` is not in use.
    pub fn reassign(&mut self, ip: IpAddr, handle: &str) -> bool {
        match self.block.ordinal(ip) {
            Some(ord) if self.block.is_allocated(ip) => {
                self.handles.insert(ord, handle.to_string());
                true
            }
            _ => false,
        }
    }

    /// The node that borrowed `ip`, if another node did.
    pub fn borrower_of(&self, ip: IpAddr) -> Option<&str> {
        self.borrowed.get(&self.block.ordinal(ip)?).map(|s| s.as_str())
    }

    /// Frees `ip`; its handle, if it was used.
    pub fn release(&mut self, ip: IpAddr) -> Option<String> {
        let ord = self.block.ordinal(ip)?;
        self.block.release(ip).ok()?;
        self.borrowed.remove(&ord);
        self.handles.remove(&ord)
    }

    /// Frees every address of `handle`; the addresses freed.
    pub fn release_handle(&mut self, handle: &str) -> Vec<IpAddr> {
        let ords: Vec<u32> = self.handles.iter().filter(|(_, h)| *h == handle).map(|(o, _)| *o).collect();
        let mut out = Vec::new();
        for o in ords {
            let ip = self.block.addr(o);
            self.handles.remove(&o);
            self.borrowed.remove(&o);
            let _ = self.block.release(ip);
            out.push(ip);
        }
        out
    }

    pub fn handle_of(&self, ip: IpAddr) -> Option<&str> {
        self.handles.get(&self.block.ordinal(ip)?).map(|s| s.as_str())
    }

    /// No address used and no handle recorded.
    pub fn is_empty(&self) -> bool {
        self.block.is_empty() && self.handles.is_empty() && self.borrowed.is_empty()
    }
}

/// `/tern/v1/ipam/affinity/<node>/<cidr>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffinityRecord {
    pub node: String,
    pub cidr: IpNet,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The pool disagrees with what the cluster already uses.
    #[error("pool {pool} conflicts with the cluster's {existing}")]
    PoolConflict { pool: String, existing: String },
}

impl IpamError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, IpamError::Store(e) if e.is_unavailable())
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::corrupt(key, e))
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialise")
}

/// Records `pool` (its block size) on first use; afterwards checks that
/// the stored record matches and that no other pool overlaps it.
pub fn ensure_pool(store: &dyn Datastore, pool: &Pool) -> Result<(), IpamError> {
    let want = PoolRecord { cidr: pool.cidr(), block_prefix: pool.block_prefix() };
    let pools = store.list(keys::IPAM_POOLS)?;
    let mut found = false;
    for kv in &pools.kvs {
        let rec: PoolRecord = decode(&kv.key, &kv.value)?;
        if rec == want {
            found = true;
        } else if rec.cidr == want.cidr {
            return Err(IpamError::PoolConflict {
                pool: pool.to_string(),
                existing: format!("{} (blocks /{})", rec.cidr, rec.block_prefix),
            });
        } else if rec.cidr.contains(&want.cidr) || want.cidr.contains(&rec.cidr) {
            return Err(IpamError::PoolConflict {
                pool: pool.to_string(),
                existing: format!("overlapping pool {} (blocks /{})", rec.cidr, rec.block_prefix),
            });
        }
    }
    if found {
        return Ok(());
    }
    match store.create(&keys::pool(&pool.cidr()), &encode(&want), None) {
        Ok(_) => Ok(()),
        // Another node recorded it first: check theirs.
        Err(StoreError::Conflict { .. }) => ensure_pool(store, pool),
        Err(e) => Err(e.into()),
    }
}

/// The pools recorded in the store.
pub fn list_pools(store: &dyn Datastore) -> Result<Vec<PoolRecord>, StoreError> {
    store.list(keys::IPAM_POOLS)?.kvs.iter().map(|kv| decode(&kv.key, &kv.value)).collect()
}

/// One block's record, if claimed.
pub fn get_block(store: &dyn Datastore, cidr: &IpNet) -> Result<Option<Versioned<BlockRecord>>, StoreError> {
    let key = keys::block(cidr);
    store.get(&key)?.map(|kv| Ok(Versioned { value: decode(&key, &kv.value)?, revision: kv.revision })).transpose()
}

/// Every claimed block (all pools, all nodes), by key.
pub fn list_blocks(store: &dyn Datastore) -> Result<Vec<Versioned<BlockRecord>>, StoreError> {
    let listing = store.list(keys::IPAM_BLOCKS)?;
    let mut out = Vec::with_capacity(listing.kvs.len());
    for kv in listing.kvs {
        let rec: BlockRecord = decode(&kv.key, &kv.value)?;
        if keys::block_of_key(&kv.key) != Some(rec.cidr()) {
            return Err(StoreError::corrupt(&kv.key, format!("holds block {}", rec.cidr())));
        }
        out.push(Versioned { value: rec, revision: kv.revision });
    }
    Ok(out)
}

/// The blocks `node` owns, from the block records (the authority).
pub fn node_blocks(store: &dyn Datastore, node: &str) -> Result<Vec<Versioned<BlockRecord>>, StoreError> {
    Ok(list_blocks(store)?.into_iter().filter(|b| b.value.node == node).collect())
}

/// Writes a changed block record if nobody changed it since `revision`
/// (Conflict/NotFound otherwise: re-read and redo). Returns the new revision.
pub fn write_block(store: &dyn Datastore, revision: Revision, record: &BlockRecord) -> Result<Revision, StoreError> {
    store.compare_and_swap(&keys::block(&record.cidr()), revision, &encode(record), None)
}

/// Limits for [`claim_block`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ClaimOptions {
    /// At most this many blocks of the pool per node (`None`: no limit).
    pub max_blocks: Option<usize>,
}

/// What [`claim_block`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// A new, empty block now owned by the node.
    Claimed(Versioned<BlockRecord>),
    /// Every block of the pool is owned (by anyone).
    Exhausted,
    /// The node already owns `max_blocks` blocks of this pool.
    LimitReached { have: usize, max: usize },
}

/// Claims one free block of `pool` for `node`.
///
/// Tries the pool's blocks in the node's own order
/// ([`Pool::candidates`]), skipping blocks already claimed, and creates the
/// first free one with create-if-absent: if another node wins the race for
/// it, the next candidate is tried. Two nodes can therefore never own one
/// block. The affinity index is written afterwards, best effort (see the
/// module docs). The node's existing blocks are not looked at for space:
/// claim only when they are full.
///
/// An `Unavailable` error may hide a claim that landed (the create timed
/// out but was applied): such a block is empty and owned by the node, and
/// shows up in [`node_blocks`] once the store answers again.
pub fn claim_block(store: &dyn Datastore, node: &str, pool: &Pool, opts: &ClaimOptions) -> Result<Claim, IpamError> {
    keys::component("node name", node)?;
    ensure_pool(store, pool)?;
    let blocks = list_blocks(store)?;
    let mut taken: HashSet<IpNet> = HashSet::new();
    let mut mine = 0usize;
    for b in &blocks {
        let cidr = b.value.cidr();
        if pool.has_block(&cidr) {
            taken.insert(cidr);
            if b.value.node == node {
                mine += 1;
            }
        } else if pool.cidr().contains(&cidr) || cidr.contains(&pool.cidr()) {
            // A block of another size inside the pool: refuse rather than overlap it.
            return Err(IpamError::PoolConflict {
                pool: pool.to_string(),
                existing: format!("block {cidr} of node {}", b.value.node),
            });
        }
    }
    if let Some(max) = opts.max_blocks {
        if mine >= max {
            return Ok(Claim::LimitReached { have: mine, max });
        }
    }
    if taken.len() as u128 >= pool.block_count() {
        return Ok(Claim::Exhausted);
    }
    for cidr in pool.candidates(node) {
        if taken.contains(&cidr) {
            continue;
        }
        let record = BlockRecord::new(Block::new(cidr).expect("pool blocks are valid"), node);
        match store.create(&keys::block(&cidr), &encode(&record), None) {
            Ok(revision) => {
                let aff = AffinityRecord { node: node.to_string(), cidr };
                let _ = store.put(&keys::affinity(node, &cidr)?, &encode(&aff), None);
                return Ok(Claim::Claimed(Versioned { value: record, revision }));
            }
            Err(StoreError::Conflict { .. }) => {
                taken.insert(cidr);
                if taken.len() as u128 >= pool.block_count() {
                    break;
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Claim::Exhausted)
}

/// What [`release_block_if_empty`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release {
    /// The block was empty and is free again.
    Released,
    /// Some address is in use: nothing changed.
    NotEmpty,
    /// Another node owns the block: nothing changed.
    NotOwner { owner: String },
    /// Nobody owns the block (a stale affinity of `node` is removed).
    Absent,
}

/// Gives `cidr` back to the pool if `node` owns it and it is empty, with a
/// delete guarded by the revision that was checked (an allocation racing
/// with the release makes the delete lose, and the block is re-checked).
/// Grace periods are the caller's policy.
pub fn release_block_if_empty(store: &dyn Datastore, node: &str, cidr: &IpNet) -> Result<Release, IpamError> {
    let aff = keys::affinity(node, cidr)?;
    let key = keys::block(cidr);
    for _ in 0..16 {
        let Some(cur) = get_block(store, cidr)? else {
            store.delete(&aff)?;
            return Ok(Release::Absent);
        };
        if cur.value.node != node {
            return Ok(Release::NotOwner { owner: cur.value.node });
        }
        if !cur.value.is_empty() {
            return Ok(Release::NotEmpty);
        }
        match store.delete_if_revision(&key, cur.revision) {
            Ok(()) => {
                let _ = store.delete(&aff);
                return Ok(Release::Released);
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::Conflict { key, current: 0 }.into())
}

/// Makes `node`'s affinity index match the blocks it owns: adds missing
/// entries, removes entries for blocks it does not own. Returns (added,
/// removed). Run at agent start.
pub fn reconcile_affinities(store: &dyn Datastore, node: &str) -> Result<(usize, usize), IpamError> {
    let owned: BTreeMap<IpNet, ()> = node_blocks(store, node)?.into_iter().map(|b| (b.value.cidr(), ())).collect();
    let listing = store.list(&keys::affinity_prefix(node)?)?;
    let mut indexed = HashSet::new();
    let mut removed = 0;
    for kv in &listing.kvs {
        match keys::block_of_key(&kv.key) {
            Some(cidr) if owned.contains_key(&cidr) => {
                indexed.insert(cidr);
            }
            _ => match store.delete_if_revision(&kv.key, kv.revision) {
                Ok(()) => removed += 1,
                Err(e) if e.is_conflict() => {}
                Err(e) => return Err(e.into()),
            },
        }
    }
    let mut added = 0;
    for cidr in owned.keys().filter(|c| !indexed.contains(*c)) {
        let aff = AffinityRecord { node: node.to_string(), cidr: *cidr };
        store.put(&keys::affinity(node, cidr)?, &encode(&aff), None)?;
        added += 1;
    }
    Ok((added, removed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_record_json() {
        let mut r = BlockRecord::new(Block::new("10.0.0.0/26".parse().unwrap()).unwrap(), "n1");
        r.claimed_at = 5;
        let a = r.allocate("h1").unwrap();
        r.allocate_ip("10.0.0.9".parse().unwrap(), "h2").unwrap();
        let s = String::from_utf8(encode(&r)).unwrap();
        assert_eq!(
            s,
            r#"{"cidr":"10.0.0.0/26","used":"0102000000000000","node":"n1","claimedAt":5,"handles":{"0":"h1","9":"h2"}}"#
        );
        let back: BlockRecord = decode("/k", s.as_bytes()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.handle_of(a), Some("h1"));
        let mut r2 = back.clone();
        assert_eq!(r2.release_handle("h2"), vec!["10.0.0.9".parse::<IpAddr>().unwrap()]);
        assert_eq!(r2.release(a).as_deref(), Some("h1"));
        assert!(r2.is_empty());
        // Borrowed addresses name their borrower; freeing forgets it.
        let b = r2.allocate_borrowed("h3", "n2").unwrap();
        let w = r2.allocate_with(|ip| format!("@warm/n1/{ip}")).unwrap();
        let s = String::from_utf8(encode(&r2)).unwrap();
        assert!(s.ends_with(r#""handles":{"0":"h3","1":"@warm/n1/10.0.0.1"},"borrowed":{"0":"n2"}}"#), "{s}");
        assert_eq!(r2.borrower_of(b), Some("n2"));
        assert!(r2.reassign(w, "h4"));
        assert!(!r2.reassign("10.0.0.7".parse().unwrap(), "h5"));
        assert_eq!(r2.handle_of(w), Some("h4"));
        assert_eq!(r2.release(b).as_deref(), Some("h3"));
        assert_eq!(r2.borrower_of(b), None);
        assert_eq!(r2.release_handle("h4"), vec![w]);
        assert!(r2.is_empty());
        let e = decode::<BlockRecord>("/tern/v1/ipam/blocks/x", br#"{"cidr":"10.0.0.0/26","used":"00","node":"n"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("/tern/v1/ipam/blocks/x"), "{e}");
    }
}
