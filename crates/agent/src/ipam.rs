//! The node's share of cluster IPAM: the blocks it owns, cached in memory,
//! and allocation/release from them with compare-and-swap writes.
//!
//! The block records in the store are the authority. The cache holds each
//! owned block with the revision it was read at; every change is a
//! [`write_block`] compare-and-swap on that revision. A lost swap
//! (Conflict/NotFound) re-reads the block, re-indexes it and tries again. An
//! `Unavailable` write (outcome unknown) leaves the cache as it was: if the
//! write did land, the next swap on that block loses, the re-read picks up
//! the landed allocation and the handle index learns it, so a retried ADD
//! for the same handle gets that address back instead of leaking it.
//!
//! One mutex serialises the node's allocations: they touch the node's own
//! blocks, which no other node writes, so parallelism would only buy
//! conflicts with ourselves.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::IpNet;
use tern_ipam::block::Pool;
use tern_store::ipam::IpamError;
use tern_store::ipam::{claim_block, get_block, node_blocks, write_block, BlockRecord, Claim, ClaimOptions, Versioned};
use tern_store::{Datastore, StoreError};

use crate::proto::{Address, BlockStatus, ErrorKind, Status};

/// A pool the node allocates from.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub pool: Pool,
    /// At most this many blocks of the pool per node (`None`: no limit).
    pub max_blocks: Option<usize>,
}

/// An allocation or release that failed; `kind` is what the plugin maps to a
/// CNI code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    pub kind: ErrorKind,
    pub message: String,
}

impl OpError {
    fn new(kind: ErrorKind, message: impl Into<String>) -> OpError {
        OpError { kind, message: message.into() }
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> OpError {
        let kind = if e.is_unavailable() { ErrorKind::Unavailable } else { ErrorKind::Internal };
        OpError::new(kind, e.to_string())
    }
}

impl From<IpamError> for OpError {
    fn from(e: IpamError) -> OpError {
        match e {
            IpamError::Store(s) => s.into(),
            other => OpError::new(ErrorKind::Invalid, other.to_string()),
        }
    }
}

/// Attempts at one block operation before giving up (each lost swap means
/// someone else wrote the block, which for a node's own block is rare).
const ATTEMPTS: usize = 32;

#[derive(Default)]
struct State {
    blocks: BTreeMap<IpNet, Versioned<BlockRecord>>,
    /// handle -> (block, address) of every address it holds.
    handles: HashMap<String, Vec<(IpNet, IpAddr)>>,
}

impl State {
    fn unindex_block(&mut self, cidr: &IpNet) {
        self.handles.retain(|_, v| {
            v.retain(|(b, _)| b != cidr);
            !v.is_empty()
        });
    }

    fn index_block(&mut self, rec: &BlockRecord) {
        let cidr = rec.cidr();
        for (ord, h) in &rec.handles {
            let ip = rec.block.addr(*ord);
            let v = self.handles.entry(h.clone()).or_default();
            if !v.contains(&(cidr, ip)) {
                v.push((cidr, ip));
            }
        }
    }

    fn set_block(&mut self, node: &str, cidr: IpNet, rec: Option<Versioned<BlockRecord>>) {
        self.unindex_block(&cidr);
        match rec {
            Some(r) if r.value.node == node => {
                self.index_block(&r.value);
                self.blocks.insert(cidr, r);
            }
            _ => {
                self.blocks.remove(&cidr);
            }
        }
    }
}

pub struct NodeIpam {
    store: Arc<dyn Datastore>,
    node: String,
    pools: Vec<PoolConfig>,
    state: Mutex<State>,
}

impl NodeIpam {
    /// Reads the node's blocks from the store and indexes their handles.
    pub fn load(store: Arc<dyn Datastore>, node: &str, pools: Vec<PoolConfig>) -> Result<NodeIpam, OpError> {
        let ipam = NodeIpam { store, node: node.to_string(), pools, state: Mutex::new(State::default()) };
        {
            let mut st = ipam.lock();
            ipam.resync(&mut st)?;
        }
        Ok(ipam)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn resync(&self, st: &mut State) -> Result<(), OpError> {
        let blocks = node_blocks(&*self.store, &self.node)?;
        *st = State::default();
        for b in blocks {
            st.index_block(&b.value);
            st.blocks.insert(b.value.cidr(), b);
        }
        Ok(())
    }

    fn refresh(&self, st: &mut State, cidr: IpNet) -> Result<(), OpError> {
        let rec = get_block(&*self.store, &cidr)?;
        st.set_block(&self.node, cidr, rec);
        Ok(())
    }

    fn pool_of(&self, ip: IpAddr) -> Option<IpNet> {
        self.pools.iter().map(|p| p.pool.cidr()).find(|c| c.contains(&ip))
    }

    fn addresses(&self, held: &[(IpNet, IpAddr)]) -> Vec<Address> {
        held.iter()
            .map(|(block, ip)| Address { address: *ip, pool: self.pool_of(*ip).unwrap_or(*block), block: *block })
            .collect()
    }

    /// One address per selected pool for `handle` (every pool when `pools`
    /// is empty). Idempotent per handle.
    pub fn allocate(&self, handle: &str, pools: &[IpNet]) -> Result<Vec<Address>, OpError> {
        if handle.is_empty() {
            return Err(OpError::new(ErrorKind::Invalid, "allocate: empty handle"));
        }
        let selected: Vec<&PoolConfig> = if pools.is_empty() {
            self.pools.iter().collect()
        } else {
            let mut out = Vec::new();
            for want in pools {
                match self.pools.iter().find(|p| p.pool.cidr() == *want) {
                    Some(p) => out.push(p),
                    None => {
                        let have: Vec<String> = self.pools.iter().map(|p| p.pool.cidr().to_string()).collect();
                        return Err(OpError::new(
                            ErrorKind::Invalid,
                            format!(
                                "pool {want} is not served by the agent of node {} (it serves {})",
                                self.node,
                                have.join(", ")
                            ),
                        ));
                    }
                }
            }
            out
        };
        let mut st = self.lock();
        if let Some(held) = st.handles.get(handle) {
            if !held.is_empty() {
                return Ok(self.addresses(&held.clone()));
            }
        }
        let mut got: Vec<(IpNet, IpAddr)> = Vec::new();
        for p in selected {
            match self.allocate_in(&mut st, p, handle) {
                Ok(a) => got.push(a),
                Err(e) => {
                    // Give back what this request took, best effort: a
                    // failure here leaves the addresses with the handle,
                    // and the runtime's DEL (or a retried ADD) sorts it out.
                    let _ = self.release_locked(&mut st, handle);
                    return Err(e);
                }
            }
        }
        Ok(self.addresses(&got))
    }

    fn allocate_in(&self, st: &mut State, p: &PoolConfig, handle: &str) -> Result<(IpNet, IpAddr), OpError> {
        for _ in 0..ATTEMPTS {
            // A re-read block may show that an earlier write for this handle
            // did land (its answer was lost): use that address.
            if let Some(held) = st.handles.get(handle).and_then(|v| v.iter().find(|(b, _)| p.pool.has_block(b))) {
                return Ok(*held);
            }
            let free = st
                .blocks
                .iter()
                .find(|(cidr, b)| p.pool.has_block(cidr) && b.value.block.free() > 0)
                .map(|(cidr, _)| *cidr);
            let Some(cidr) = free else {
                let opts = ClaimOptions { max_blocks: p.max_blocks };
                match claim_block(&*self.store, &self.node, &p.pool, &opts)? {
                    Claim::Claimed(b) => {
                        st.set_block(&self.node, b.value.cidr(), Some(b));
                        continue;
                    }
                    Claim::LimitReached { have, max } => {
                        let cached = st.blocks.keys().filter(|c| p.pool.has_block(c)).count();
                        if have > cached {
                            // We own blocks we did not know of (a claim whose
                            // answer was lost): learn them and look again.
                            self.resync(st)?;
                            continue;
                        }
                        return Err(OpError::new(
                            ErrorKind::Exhausted,
                            format!(
                                "node {} has all its {have} blocks of pool {} full (block limit {max})",
                                self.node,
                                p.pool.cidr()
                            ),
                        ));
                    }
                    Claim::Exhausted => {
                        return Err(OpError::new(
                            ErrorKind::Exhausted,
                            format!("pool {} has no free block left for node {}", p.pool.cidr(), self.node),
                        ))
                    }
                }
            };
            let mut rec = st.blocks[&cidr].clone();
            let ip = rec.value.allocate(handle).expect("block has a free address");
            match write_block(&*self.store, rec.revision, &rec.value) {
                Ok(rev) => {
                    rec.revision = rev;
                    st.blocks.insert(cidr, rec);
                    st.handles.entry(handle.to_string()).or_default().push((cidr, ip));
                    return Ok((cidr, ip));
                }
                Err(e) if e.is_conflict() => self.refresh(st, cidr)?,
                Err(e) => return Err(e.into()),
            }
        }
        Err(OpError::new(ErrorKind::Internal, format!("allocate {handle}: too many conflicting writes")))
    }

    /// Frees every address of `handle`; `None` if the agent knew no such handle.
    pub fn release(&self, handle: &str) -> Result<Option<Vec<Address>>, OpError> {
        let mut st = self.lock();
        self.release_locked(&mut st, handle)
    }

    fn release_locked(&self, st: &mut State, handle: &str) -> Result<Option<Vec<Address>>, OpError> {
        let Some(held) = st.handles.get(handle).cloned() else { return Ok(None) };
        let mut blocks: Vec<IpNet> = held.iter().map(|(b, _)| *b).collect();
        blocks.sort();
        blocks.dedup();
        for cidr in blocks {
            let mut done = false;
            for _ in 0..ATTEMPTS {
                let Some(cur) = st.blocks.get(&cidr) else {
                    done = true; // not ours (any more): nothing to free
                    break;
                };
                let mut rec = cur.clone();
                if rec.value.release_handle(handle).is_empty() {
                    done = true;
                    break;
                }
                match write_block(&*self.store, rec.revision, &rec.value) {
                    Ok(rev) => {
                        rec.revision = rev;
                        st.blocks.insert(cidr, rec);
                        done = true;
                        break;
                    }
                    Err(e) if e.is_conflict() => self.refresh(st, cidr)?,
                    Err(e) => return Err(e.into()),
                }
            }
            if !done {
                return Err(OpError::new(
                    ErrorKind::Internal,
                    format!("release {handle}: too many conflicting writes"),
                ));
            }
            if let Some(v) = st.handles.get_mut(handle) {
                v.retain(|(b, _)| *b != cidr);
            }
        }
        st.handles.remove(handle);
        Ok(Some(self.addresses(&held)))
    }

    /// The addresses `handle` holds (`None`: no such handle).
    pub fn get(&self, handle: &str) -> Option<Vec<Address>> {
        let st = self.lock();
        st.handles.get(handle).map(|held| self.addresses(held))
    }

    pub fn status(&self) -> Status {
        let (store_reachable, store_error) = match self.store.get(tern_store::keys::SCHEMA_KEY) {
            Ok(_) => (true, None),
            Err(e) => (false, Some(e.to_string())),
        };
        let st = self.lock();
        Status {
            node: self.node.clone(),
            store: self.store.describe(),
            store_reachable,
            store_error,
            pools: self.pools.iter().map(|p| p.pool.cidr()).collect(),
            blocks: st
                .blocks
                .values()
                .map(|b| BlockStatus { cidr: b.value.cidr(), used: b.value.block.used(), size: b.value.block.size() })
                .collect(),
            handles: st.handles.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_store::LocalStore;
    use tern_testkit::TempDir;

    fn pool(cidr: &str, bp: u8, max: Option<usize>) -> PoolConfig {
        PoolConfig { pool: Pool::new(cidr.parse().unwrap(), Some(bp)).unwrap(), max_blocks: max }
    }

    #[test]
    fn allocate_release_claims_and_limits() {
        let dir = TempDir::new();
        let store: Arc<dyn Datastore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let ipam = NodeIpam::load(store.clone(), "n1", vec![pool("10.50.0.0/24", 29, Some(2))]).unwrap();
        let mut seen = std::collections::HashSet::new();
        let mut n = 0;
        loop {
            match ipam.allocate(&format!("net/c{n}/eth0"), &[]) {
                Ok(a) => {
                    assert_eq!(a.len(), 1);
                    assert!(seen.insert(a[0].address));
                    assert_eq!(a[0].pool, "10.50.0.0/24".parse::<IpNet>().unwrap());
                    n += 1;
                }
                Err(e) => {
                    assert_eq!(e.kind, ErrorKind::Exhausted, "{e}");
                    break;
                }
            }
        }
        assert_eq!(n, 16, "two /29 blocks of 8 addresses");
        // Idempotent.
        assert_eq!(ipam.allocate("net/c0/eth0", &[]).unwrap(), ipam.get("net/c0/eth0").unwrap());
        // A fresh agent for the node sees the same handles.
        let again = NodeIpam::load(store.clone(), "n1", vec![pool("10.50.0.0/24", 29, Some(2))]).unwrap();
        assert_eq!(again.get("net/c3/eth0"), ipam.get("net/c3/eth0"));
        assert_eq!(again.release("net/c3/eth0").unwrap().unwrap().len(), 1);
        assert_eq!(again.release("net/c3/eth0").unwrap(), None);
        // The first agent's cache is stale: its swap loses, it re-reads and still frees.
        assert_eq!(ipam.release("net/c4/eth0").unwrap().unwrap().len(), 1);
        ipam.allocate("net/new/eth0", &[]).unwrap();
        let e = ipam.allocate("x", &["10.99.0.0/24".parse().unwrap()]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        let st = ipam.status();
        assert!(st.store_reachable);
        assert_eq!(st.blocks.len(), 2);
    }
}
