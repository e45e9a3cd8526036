//! The node's share of cluster IPAM: the blocks it owns, cached in memory,
//! allocation/release from them with compare-and-swap writes, the warm pool,
//! the journal of answered-but-unwritten changes, and borrowing.
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
//! **Warm pool** ([`crate::warm`]): with `warmIPTarget`/`minimumIPTarget`
//! set, free addresses of the node's own blocks are reserved in the store
//! under handles `@warm/<node>/<address>` (never a CNI handle). An ADD takes
//! one without touching the store: the assignment is written to the
//! node-local [`Journal`] (fsync, rename) and answered; the reconciler then
//! renames the address's handle in the store and refills the pool. With both
//! targets 0 (the default) an ADD is a synchronous compare-and-swap.
//!
//! **Store down**: an ADD the warm pool cannot serve fails with `unavailable`
//! (CNI 11), naming the store. A release is journaled and answered; the
//! address stays reserved in the store (under the pod's handle) until the
//! reconciler frees it, and frees only what still names that handle, so a
//! retried ADD of the handle (which gets another address) is not undone.
//! The journal is replayed over the block records at start.
//!
//! **Borrowing**: when the node cannot claim another block (pool exhausted
//! or its block limit reached) and `strictAffinity` is off, an address is
//! allocated in another node's block (the record names the borrower); the
//! handle index keeps (block, address), so a release frees it there.
//!
//! Locking: `io` serialises the node's store writers (allocation, release,
//! reconciler), which touch the node's own blocks that no other node
//! writes, so parallelism would only buy conflicts with ourselves. `state`
//! (cache, index, warm pool, journal) is held only briefly and never across
//! a store call, so warm ADDs and releases while the store is down never
//! wait for the store. Order: `io` before `state`.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tern_ipam::block::Pool;
use tern_store::ipam::IpamError;
use tern_store::ipam::{claim_block, get_block, list_blocks, write_block, BlockRecord, Claim, ClaimOptions, Versioned};
use tern_store::{Datastore, StoreError};

use crate::journal::{Held, Journal, Op};
use crate::proto::{Address, BlockStatus, ErrorKind, Status};
use crate::warm::{WarmConfig, WARM_HANDLE_PREFIX};

/// A pool the node allocates from.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub pool: Pool,
    /// At most this many blocks of the pool per node (`None`: no limit).
    pub max_blocks: Option<usize>,
}

/// Node-level IPAM settings beyond the pools.
#[derive(Debug, Clone, Default)]
pub struct IpamOptions {
    pub warm: WarmConfig,
    /// Never allocate in another node's block.
    pub strict_affinity: bool,
    /// Where the journal lives (`None`: memory only, lost with the process).
    pub state_dir: Option<PathBuf>,
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
/// While the store is believed down, how long an ADD the warm pool cannot
/// serve waits for another store writer before answering `unavailable`.
const DOWN_WAIT: Duration = Duration::from_millis(500);

struct State {
    /// The node's own blocks as last read or written.
    blocks: BTreeMap<IpNet, Versioned<BlockRecord>>,
    /// handle -> (block, address) of every address it holds, as the pods see
    /// it: the store's records with the journal applied on top.
    handles: HashMap<String, Vec<(IpNet, IpAddr)>>,
    /// Warm addresses not handed out: address -> block.
    warm_free: BTreeMap<IpAddr, IpNet>,
    journal: Journal,
    /// The last `Unavailable` error, while the store is believed down.
    store_down: Option<String>,
}

impl State {
    fn unindex_block(&mut self, cidr: &IpNet) {
        self.handles.retain(|_, v| {
            v.retain(|(b, _)| b != cidr);
            !v.is_empty()
        });
        self.warm_free.retain(|_, b| b != cidr);
    }

    /// Indexes what `rec` says is ours (own block: every address not
    /// borrowed by another node; foreign block: what we borrowed), then lays
    /// the journal over it.
    fn index_block(&mut self, node: &str, rec: &BlockRecord) {
        let cidr = rec.cidr();
        let own = rec.node == node;
        let warm_prefix = warm_prefix(node);
        for (ord, h) in &rec.handles {
            let ip = rec.block.addr(*ord);
            let borrower = rec.borrowed.get(ord).map(|s| s.as_str());
            let ours = if own { borrower.is_none() || borrower == Some(node) } else { borrower == Some(node) };
            if !ours {
                continue;
            }
            if h.starts_with(&warm_prefix) {
                if own && !self.journal.mentions(ip) {
                    self.warm_free.insert(ip, cidr);
                }
                continue;
            }
            if h.starts_with(WARM_HANDLE_PREFIX) {
                continue; // another node's warm address in our block: not a pod
            }
            if self.journal_released(h, ip) {
                continue;
            }
            let v = self.handles.entry(h.clone()).or_default();
            if !v.contains(&(cidr, ip)) {
                v.push((cidr, ip));
            }
        }
        let assigned: Vec<(String, IpAddr)> = self
            .journal
            .ops()
            .iter()
            .filter_map(|op| match op {
                Op::Assign { handle, block, address, .. } if *block == cidr => Some((handle.clone(), *address)),
                _ => None,
            })
            .collect();
        for (h, ip) in assigned {
            self.warm_free.remove(&ip);
            if self.journal_released(&h, ip) {
                continue; // assigned, then released: both still pending
            }
            let v = self.handles.entry(h).or_default();
            if !v.contains(&(cidr, ip)) {
                v.push((cidr, ip));
            }
        }
    }

    /// Whether a pending release takes `ip` from `handle`.
    fn journal_released(&self, handle: &str, ip: IpAddr) -> bool {
        self.journal.ops().iter().any(|op| {
            matches!(op, Op::Release { handle: h, addresses } if h == handle && addresses.iter().any(|a| a.address == ip))
        })
    }

    fn set_block(&mut self, node: &str, cidr: IpNet, rec: Option<Versioned<BlockRecord>>) {
        self.unindex_block(&cidr);
        if let Some(r) = rec {
            self.index_block(node, &r.value);
            if r.value.node == node {
                self.blocks.insert(cidr, r);
                return;
            }
        }
        self.blocks.remove(&cidr);
    }

    fn forget(&mut self, handle: &str, held: &[(IpNet, IpAddr)]) {
        if let Some(v) = self.handles.get_mut(handle) {
            v.retain(|x| !held.contains(x));
            if v.is_empty() {
                self.handles.remove(handle);
            }
        }
    }

    /// (addresses pods hold, free warm addresses) in `pool`.
    fn counts(&self, pool: &IpNet) -> (u32, u32) {
        let used = self.handles.values().flatten().filter(|(_, ip)| pool.contains(ip)).count() as u32;
        let free = self.warm_free.keys().filter(|ip| pool.contains(*ip)).count() as u32;
        (used, free)
    }
}

fn warm_prefix(node: &str) -> String {
    format!("{WARM_HANDLE_PREFIX}{node}/")
}

fn warm_handle(node: &str, ip: IpAddr) -> String {
    format!("{WARM_HANDLE_PREFIX}{node}/{ip}")
}

#[derive(Default)]
struct Kick {
    kicked: bool,
    stopped: bool,
}

pub struct NodeIpam {
    store: Arc<dyn Datastore>,
    node: String,
    pools: Vec<PoolConfig>,
    opts: IpamOptions,
    io: Mutex<()>,
    state: Mutex<State>,
    kick: Mutex<Kick>,
    kick_cv: Condvar,
}

impl NodeIpam {
    /// Reads the node's blocks from the store and indexes their handles
    /// (no warm pool, journal in memory).
    pub fn load(store: Arc<dyn Datastore>, node: &str, pools: Vec<PoolConfig>) -> Result<NodeIpam, OpError> {
        NodeIpam::open(store, node, pools, IpamOptions::default())
    }

    /// Reads the journal and the node's blocks (and the addresses it
    /// borrowed), and indexes the handles with the journal applied on top.
    /// Pending ops are written to the store by [`crate::warm::spawn`]'s
    /// thread (or [`NodeIpam::reconcile`]).
    pub fn open(
        store: Arc<dyn Datastore>,
        node: &str,
        pools: Vec<PoolConfig>,
        opts: IpamOptions,
    ) -> Result<NodeIpam, OpError> {
        let journal = match &opts.state_dir {
            Some(dir) => Journal::open(dir, node).map_err(|e| OpError::new(ErrorKind::Internal, e.to_string()))?,
            None => Journal::in_memory(node),
        };
        let ipam = NodeIpam {
            store,
            node: node.to_string(),
            pools,
            opts,
            io: Mutex::new(()),
            state: Mutex::new(State {
                blocks: BTreeMap::new(),
                handles: HashMap::new(),
                warm_free: BTreeMap::new(),
                journal,
                store_down: None,
            }),
            kick: Mutex::new(Kick::default()),
            kick_cv: Condvar::new(),
        };
        {
            let _io = ipam.io();
            ipam.resync()?;
        }
        Ok(ipam)
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn options(&self) -> &IpamOptions {
        &self.opts
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn io(&self) -> MutexGuard<'_, ()> {
        self.io.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn io_within(&self, wait: Duration) -> Option<MutexGuard<'_, ()>> {
        let deadline = Instant::now() + wait;
        loop {
            match self.io.try_lock() {
                Ok(g) => return Some(g),
                Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
                Err(TryLockError::WouldBlock) if Instant::now() >= deadline => return None,
                Err(TryLockError::WouldBlock) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    /// Remembers that the store is down (for fast answers) when `e` says so.
    fn note<T>(&self, r: Result<T, OpError>) -> Result<T, OpError> {
        if let Err(e) = &r {
            if e.kind == ErrorKind::Unavailable {
                self.lock().store_down = Some(e.message.clone());
            }
        }
        r
    }

    /// Re-reads every block the node owns or borrowed from; caller holds `io`.
    fn resync(&self) -> Result<(), OpError> {
        let blocks = list_blocks(&*self.store)?;
        let mut st = self.lock();
        st.blocks.clear();
        st.handles.clear();
        st.warm_free.clear();
        for b in blocks {
            let own = b.value.node == self.node;
            if own || b.value.borrowed.values().any(|n| *n == self.node) {
                st.index_block(&self.node, &b.value);
            }
            if own {
                st.blocks.insert(b.value.cidr(), b);
            }
        }
        Ok(())
    }

    /// Re-reads one block; caller holds `io`.
    fn refresh(&self, cidr: IpNet) -> Result<Option<Versioned<BlockRecord>>, OpError> {
        let rec = get_block(&*self.store, &cidr)?;
        self.lock().set_block(&self.node, cidr, rec.clone());
        Ok(rec)
    }

    fn pool_of(&self, ip: IpAddr) -> Option<IpNet> {
        self.pools.iter().map(|p| p.pool.cidr()).find(|c| c.contains(&ip))
    }

    fn addresses(&self, held: &[(IpNet, IpAddr)]) -> Vec<Address> {
        held.iter()
            .map(|(block, ip)| Address { address: *ip, pool: self.pool_of(*ip).unwrap_or(*block), block: *block })
            .collect()
    }

    fn check_handle(handle: &str, what: &str) -> Result<(), OpError> {
        if handle.is_empty() {
            return Err(OpError::new(ErrorKind::Invalid, format!("{what}: empty handle")));
        }
        if handle.starts_with(WARM_HANDLE_PREFIX) {
            return Err(OpError::new(
                ErrorKind::Invalid,
                format!("{what}: handle {handle:?} is reserved for the warm pool ({WARM_HANDLE_PREFIX}...)"),
            ));
        }
        Ok(())
    }

    /// One address per selected pool for `handle` (every pool when `pools`
    /// is empty). Idempotent per handle. Served from the warm pool when it
    /// has an address for every selected pool; otherwise from the store.
    pub fn allocate(&self, handle: &str, pools: &[IpNet]) -> Result<Vec<Address>, OpError> {
        Self::check_handle(handle, "allocate")?;
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
        let store_down = {
            let mut st = self.lock();
            if let Some(held) = st.handles.get(handle) {
                if !held.is_empty() {
                    return Ok(self.addresses(&held.clone()));
                }
            }
            if let Some(got) = self.take_warm(&mut st, handle, &selected)? {
                drop(st);
                self.wake();
                return Ok(self.addresses(&got));
            }
            st.store_down.clone()
        };
        // Not servable from the warm pool: the store decides. While the store
        // is believed down, wait only briefly for a writer that may be stuck
        // on it; then answer "try again later" rather than hang the runtime.
        let _io = match store_down {
            None => self.io(),
            Some(why) => match self.io_within(DOWN_WAIT) {
                Some(g) => g,
                None => {
                    return Err(OpError::new(
                        ErrorKind::Unavailable,
                        format!("{why} (the warm pool of node {} has no free address for this pod)", self.node),
                    ))
                }
            },
        };
        if let Some(held) = self.lock().handles.get(handle).filter(|v| !v.is_empty()) {
            return Ok(self.addresses(&held.clone()));
        }
        let mut got: Vec<(IpNet, IpAddr)> = Vec::new();
        for p in selected {
            match self.note(self.allocate_in(p, handle)) {
                Ok(a) => got.push(a),
                Err(e) => {
                    // Give back what this request took, best effort: a
                    // failure here leaves the addresses with the handle,
                    // and the runtime's DEL (or a retried ADD) sorts it out.
                    let _ = self.release_sync(handle, &got);
                    let e = match e.kind {
                        ErrorKind::Unavailable => OpError::new(
                            e.kind,
                            format!(
                                "{} (the warm pool of node {} has no free address for this pod)",
                                e.message, self.node
                            ),
                        ),
                        _ => e,
                    };
                    return Err(e);
                }
            }
        }
        self.lock().store_down = None;
        self.wake(); // the minimum target counts used addresses
        Ok(self.addresses(&got))
    }

    /// Takes a warm address of every selected pool for `handle` and journals
    /// the assignment; `None` if some pool has none.
    fn take_warm(
        &self,
        st: &mut State,
        handle: &str,
        selected: &[&PoolConfig],
    ) -> Result<Option<Vec<(IpNet, IpAddr)>>, OpError> {
        let mut picks = Vec::new();
        for p in selected {
            let cidr = p.pool.cidr();
            match st.warm_free.iter().find(|(ip, _)| cidr.contains(*ip)) {
                Some((ip, block)) => picks.push((*block, *ip)),
                None => return Ok(None),
            }
        }
        let ops: Vec<Op> = picks
            .iter()
            .map(|(block, ip)| Op::Assign {
                handle: handle.to_string(),
                warm: warm_handle(&self.node, *ip),
                block: *block,
                address: *ip,
            })
            .collect();
        st.journal.push(ops).map_err(|e| OpError::new(ErrorKind::Internal, e.to_string()))?;
        for (_, ip) in &picks {
            st.warm_free.remove(ip);
        }
        st.handles.insert(handle.to_string(), picks.clone());
        Ok(Some(picks))
    }

    /// One address of `p` for `handle` from the store; caller holds `io`.
    fn allocate_in(&self, p: &PoolConfig, handle: &str) -> Result<(IpNet, IpAddr), OpError> {
        for _ in 0..ATTEMPTS {
            let (held, free) = {
                let st = self.lock();
                // A re-read block may show that an earlier write for this
                // handle did land (its answer was lost): use that address.
                let held =
                    st.handles.get(handle).and_then(|v| v.iter().find(|(_, ip)| p.pool.cidr().contains(ip))).copied();
                let free = st
                    .blocks
                    .iter()
                    .find(|(cidr, b)| p.pool.has_block(cidr) && b.value.block.free() > 0)
                    .map(|(_, b)| b.clone());
                (held, free)
            };
            if let Some(held) = held {
                return Ok(held);
            }
            let Some(mut rec) = free else {
                let opts = ClaimOptions { max_blocks: p.max_blocks };
                match claim_block(&*self.store, &self.node, &p.pool, &opts)? {
                    Claim::Claimed(b) => {
                        self.lock().set_block(&self.node, b.value.cidr(), Some(b));
                        continue;
                    }
                    Claim::LimitReached { have, max } => {
                        let cached = self.lock().blocks.keys().filter(|c| p.pool.has_block(c)).count();
                        if have > cached {
                            // We own blocks we did not know of (a claim whose
                            // answer was lost): learn them and look again.
                            self.resync()?;
                            continue;
                        }
                        return self.borrow(p, handle, || {
                            format!(
                                "node {} has all its {have} blocks of pool {} full (block limit {max})",
                                self.node,
                                p.pool.cidr()
                            )
                        });
                    }
                    Claim::Exhausted => {
                        return self.borrow(p, handle, || {
                            format!("pool {} has no free block left for node {}", p.pool.cidr(), self.node)
                        })
                    }
                }
            };
            let cidr = rec.value.cidr();
            let ip = rec.value.allocate(handle).expect("block has a free address");
            match write_block(&*self.store, rec.revision, &rec.value) {
                Ok(rev) => {
                    rec.revision = rev;
                    let mut st = self.lock();
                    st.blocks.insert(cidr, rec);
                    st.handles.entry(handle.to_string()).or_default().push((cidr, ip));
                    return Ok((cidr, ip));
                }
                Err(e) if e.is_conflict() => {
                    self.refresh(cidr)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(OpError::new(ErrorKind::Internal, format!("allocate {handle}: too many conflicting writes")))
    }

    /// An address for `handle` in another node's block of `p` (unless
    /// strictAffinity); `why` says why the node's own blocks could not serve.
    fn borrow(&self, p: &PoolConfig, handle: &str, why: impl Fn() -> String) -> Result<(IpNet, IpAddr), OpError> {
        if self.opts.strict_affinity {
            return Err(OpError::new(ErrorKind::Exhausted, format!("{} (strictAffinity: no borrowing)", why())));
        }
        for _ in 0..ATTEMPTS {
            let blocks = list_blocks(&*self.store)?;
            let Some(mut rec) = blocks
                .into_iter()
                .filter(|b| b.value.node != self.node && p.pool.has_block(&b.value.cidr()) && b.value.block.free() > 0)
                .max_by_key(|b| b.value.block.free())
            else {
                return Err(OpError::new(
                    ErrorKind::Exhausted,
                    format!("{}, and no other node's block has a free address to borrow", why()),
                ));
            };
            let cidr = rec.value.cidr();
            let ip = rec.value.allocate_borrowed(handle, &self.node).expect("block has a free address");
            match write_block(&*self.store, rec.revision, &rec.value) {
                Ok(_) => {
                    self.lock().handles.entry(handle.to_string()).or_default().push((cidr, ip));
                    return Ok((cidr, ip));
                }
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(OpError::new(ErrorKind::Internal, format!("borrow for {handle}: too many conflicting writes")))
    }

    /// Frees every address of `handle`; `None` if the agent knew no such
    /// handle. While the store is down (or an earlier op on these addresses
    /// is still pending) the release is journaled and applied later; the
    /// answer is the same.
    pub fn release(&self, handle: &str) -> Result<Option<Vec<Address>>, OpError> {
        Self::check_handle(handle, "release")?;
        let held = {
            let mut st = self.lock();
            let Some(held) = st.handles.get(handle).cloned() else { return Ok(None) };
            let pending = held.iter().any(|(_, ip)| st.journal.mentions(*ip));
            if st.store_down.is_some() || pending {
                self.journal_release(&mut st, handle, &held)?;
                drop(st);
                self.wake();
                return Ok(Some(self.addresses(&held)));
            }
            held
        };
        let _io = self.io();
        match self.note(self.release_sync(handle, &held)) {
            Ok(()) => {}
            Err(e) if e.kind == ErrorKind::Unavailable => {
                let mut st = self.lock();
                self.journal_release(&mut st, handle, &held)?;
            }
            Err(e) => return Err(e),
        }
        self.wake();
        Ok(Some(self.addresses(&held)))
    }

    fn journal_release(&self, st: &mut State, handle: &str, held: &[(IpNet, IpAddr)]) -> Result<(), OpError> {
        let addresses = held.iter().map(|(block, address)| Held { block: *block, address: *address }).collect();
        st.journal
            .push(vec![Op::Release { handle: handle.to_string(), addresses }])
            .map_err(|e| OpError::new(ErrorKind::Internal, format!("release {handle}: {e}")))?;
        st.forget(handle, held);
        Ok(())
    }

    /// Frees `held` where the store still names `handle`; caller holds `io`.
    fn release_sync(&self, handle: &str, held: &[(IpNet, IpAddr)]) -> Result<(), OpError> {
        let mut blocks: Vec<IpNet> = held.iter().map(|(b, _)| *b).collect();
        blocks.sort();
        blocks.dedup();
        for cidr in blocks {
            let ips: Vec<IpAddr> = held.iter().filter(|(b, _)| *b == cidr).map(|(_, ip)| *ip).collect();
            self.change_block(cidr, |rec| {
                let mut changed = false;
                for ip in &ips {
                    if rec.handle_of(*ip) == Some(handle) {
                        rec.release(*ip);
                        changed = true;
                    }
                }
                changed
            })?;
            self.lock().forget(handle, &held.iter().filter(|(b, _)| *b == cidr).copied().collect::<Vec<_>>());
        }
        Ok(())
    }

    /// Applies `change` to block `cidr` (own or foreign) with a
    /// compare-and-swap, re-reading on a lost swap; `change` returns whether
    /// it changed anything. Caller holds `io`.
    fn change_block(&self, cidr: IpNet, mut change: impl FnMut(&mut BlockRecord) -> bool) -> Result<(), OpError> {
        let mut cur = self.lock().blocks.get(&cidr).cloned();
        if cur.is_none() {
            cur = get_block(&*self.store, &cidr)?;
        }
        for _ in 0..ATTEMPTS {
            let Some(mut rec) = cur.take() else { return Ok(()) }; // block gone: nothing to change
            if !change(&mut rec.value) {
                return Ok(());
            }
            match write_block(&*self.store, rec.revision, &rec.value) {
                Ok(rev) => {
                    if rec.value.node == self.node {
                        rec.revision = rev;
                        self.lock().blocks.insert(cidr, rec);
                    }
                    return Ok(());
                }
                Err(e) if e.is_conflict() => {
                    cur = get_block(&*self.store, &cidr)?;
                    if cur.as_ref().is_some_and(|r| r.value.node == self.node) {
                        // Own block: keep the cache (and index) in step.
                        self.lock().set_block(&self.node, cidr, cur.clone());
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(OpError::new(ErrorKind::Internal, format!("block {cidr}: too many conflicting writes")))
    }

    /// The addresses `handle` holds (`None`: no such handle).
    pub fn get(&self, handle: &str) -> Option<Vec<Address>> {
        let st = self.lock();
        st.handles.get(handle).map(|held| self.addresses(held))
    }

    /// Handles with a journaled change not yet in the store (the store's
    /// records are behind for them: a collector should leave them alone).
    pub fn pending_handles(&self) -> std::collections::HashSet<String> {
        self.lock()
            .journal
            .ops()
            .iter()
            .map(|op| match op {
                Op::Assign { handle, .. } | Op::Release { handle, .. } => handle.clone(),
            })
            .collect()
    }

    /// Pending journal ops.
    pub fn pending(&self) -> usize {
        self.lock().journal.len()
    }

    /// Free warm addresses, all pools.
    pub fn warm_free(&self) -> usize {
        self.lock().warm_free.len()
    }

    /// Asks the reconciler for a round now.
    pub fn wake(&self) {
        let mut k = self.kick.lock().unwrap_or_else(|e| e.into_inner());
        k.kicked = true;
        self.kick_cv.notify_all();
    }

    /// Stops the reconciler thread (at its next wait).
    pub fn stop_background(&self) {
        let mut k = self.kick.lock().unwrap_or_else(|e| e.into_inner());
        k.stopped = true;
        self.kick_cv.notify_all();
    }

    /// Waits for a kick or `timeout`; false once stopped.
    pub(crate) fn wait_kick(&self, timeout: Duration) -> bool {
        let k = self.kick.lock().unwrap_or_else(|e| e.into_inner());
        let (mut k, _) =
            self.kick_cv.wait_timeout_while(k, timeout, |k| !k.kicked && !k.stopped).unwrap_or_else(|e| e.into_inner());
        k.kicked = false;
        !k.stopped
    }

    /// One reconciler round: learns whether the store is back (and then
    /// re-reads the node's blocks), applies the journal in order, and
    /// refills or trims the warm pool. Ok(true) when everything is done (no
    /// pending op, warm pool at its target or as close as the pool allows).
    pub fn reconcile(&self) -> Result<bool, OpError> {
        let was_down = self.lock().store_down.is_some();
        if was_down {
            // Probed without `io`: ADDs may still try the store meanwhile.
            self.note(self.store.get(tern_store::keys::SCHEMA_KEY).map_err(OpError::from))?;
        }
        let _io = self.io();
        if was_down {
            // Back: outcomes of writes that timed out are in the records now.
            self.note(self.resync())?;
            self.lock().store_down = None;
            eprintln!("tern agent: node {}: datastore reachable again, reconciling", self.node);
        }
        loop {
            let op = self.lock().journal.ops().first().cloned();
            let Some(op) = op else { break };
            self.note(self.apply(&op))?;
            let mut st = self.lock();
            if let Err(e) = st.journal.complete(&op) {
                eprintln!("tern agent: node {}: {e} (the op is applied again after a restart, harmlessly)", self.node);
            }
        }
        self.note(self.fill_warm())
    }

    /// Writes one journaled op to the store; caller holds `io`.
    fn apply(&self, op: &Op) -> Result<(), OpError> {
        match op {
            Op::Assign { handle, warm, block, address } => {
                let ip = *address;
                self.change_block(*block, |rec| match rec.handle_of(ip) {
                    Some(h) if h == handle => false,
                    Some(h) if h == warm => rec.reassign(ip, handle),
                    Some(other) => {
                        eprintln!(
                            "tern agent: node {}: warm address {ip} given to {handle} is held by {other} in the store; \
                             leaving it to {other}",
                            self.node
                        );
                        false
                    }
                    // The reservation is gone (freed behind our back): take the address again.
                    None => rec.allocate_ip(ip, handle).is_ok(),
                })
            }
            Op::Release { handle, addresses } => {
                let held: Vec<(IpNet, IpAddr)> = addresses.iter().map(|h| (h.block, h.address)).collect();
                self.release_sync(handle, &held)?;
                // A retried ADD may have been given these addresses meanwhile only
                // if they were free, which they were not: nothing else to undo.
                Ok(())
            }
        }
    }

    /// Brings each pool's free warm addresses to its target; caller holds `io`.
    fn fill_warm(&self) -> Result<bool, OpError> {
        let mut settled = true;
        for p in &self.pools {
            let cidr = p.pool.cidr();
            let (used, free) = self.lock().counts(&cidr);
            let want = self.opts.warm.free_wanted(used);
            if free > want {
                self.trim_warm(p, free - want)?;
            } else if free < want && !self.add_warm(p, want - free)? {
                settled = false;
            }
        }
        Ok(settled)
    }

    /// Reserves up to `n` warm addresses in the node's own blocks of `p`,
    /// claiming blocks as needed. True when done or when the pool (or the
    /// node's block limit) allows no more (a release kicks the next try);
    /// false after too many lost swaps.
    fn add_warm(&self, p: &PoolConfig, mut n: u32) -> Result<bool, OpError> {
        let mut attempts = 0;
        while n > 0 {
            attempts += 1;
            if attempts > ATTEMPTS {
                return Ok(false);
            }
            let free = self
                .lock()
                .blocks
                .iter()
                .find(|(cidr, b)| p.pool.has_block(cidr) && b.value.block.free() > 0)
                .map(|(_, b)| b.clone());
            let Some(mut rec) = free else {
                let opts = ClaimOptions { max_blocks: p.max_blocks };
                match claim_block(&*self.store, &self.node, &p.pool, &opts)? {
                    Claim::Claimed(b) => {
                        self.lock().set_block(&self.node, b.value.cidr(), Some(b));
                        continue;
                    }
                    // Warm addresses never borrow: the pool is as full as it gets.
                    Claim::LimitReached { .. } | Claim::Exhausted => return Ok(true),
                }
            };
            let cidr = rec.value.cidr();
            let mut taken = Vec::new();
            while (taken.len() as u32) < n {
                match rec.value.allocate_with(|ip| warm_handle(&self.node, ip)) {
                    Some(ip) => taken.push(ip),
                    None => break,
                }
            }
            match write_block(&*self.store, rec.revision, &rec.value) {
                Ok(rev) => {
                    rec.revision = rev;
                    let mut st = self.lock();
                    st.blocks.insert(cidr, rec);
                    for ip in &taken {
                        st.warm_free.insert(*ip, cidr);
                    }
                    n -= taken.len() as u32;
                }
                Err(e) if e.is_conflict() => {
                    self.refresh(cidr)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }

    /// Frees `n` warm addresses of `p` (the highest first, so the low ends of
    /// blocks stay dense); caller holds `io`.
    fn trim_warm(&self, p: &PoolConfig, n: u32) -> Result<(), OpError> {
        let cidr = p.pool.cidr();
        // Out of the free list first, so no ADD takes them meanwhile.
        let picked: Vec<(IpAddr, IpNet)> = {
            let mut st = self.lock();
            let picked: Vec<(IpAddr, IpNet)> = st
                .warm_free
                .iter()
                .rev()
                .filter(|(ip, _)| cidr.contains(*ip))
                .take(n as usize)
                .map(|(i, b)| (*i, *b))
                .collect();
            for (ip, _) in &picked {
                st.warm_free.remove(ip);
            }
            picked
        };
        let mut blocks: Vec<IpNet> = picked.iter().map(|(_, b)| *b).collect();
        blocks.sort();
        blocks.dedup();
        let mut result = Ok(());
        for block in blocks {
            let ips: Vec<IpAddr> = picked.iter().filter(|(_, b)| *b == block).map(|(ip, _)| *ip).collect();
            let r = self.change_block(block, |rec| {
                let mut changed = false;
                for ip in &ips {
                    if rec.handle_of(*ip) == Some(warm_handle(&self.node, *ip).as_str()) {
                        rec.release(*ip);
                        changed = true;
                    }
                }
                changed
            });
            if let Err(e) = r {
                // Not freed (or unknown): still reserved, so back into the pool.
                let mut st = self.lock();
                for ip in &ips {
                    if st.blocks.get(&block).is_some_and(|b| {
                        b.value.handle_of(*ip).is_some_and(|h| h.starts_with(&warm_prefix(&self.node)))
                    }) {
                        st.warm_free.insert(*ip, block);
                    }
                }
                result = Err(e);
            }
        }
        result
    }

    pub fn status(&self) -> Status {
        let (store_reachable, store_error) = match self.store.get(tern_store::keys::SCHEMA_KEY) {
            Ok(_) => (true, None),
            Err(e) => (false, Some(e.to_string())),
        };
        let st = self.lock();
        let borrowed = st.handles.values().flatten().filter(|(b, _)| !st.blocks.contains_key(b)).count();
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
            warm_free: st.warm_free.len(),
            warm_ip_target: self.opts.warm.warm_ip_target,
            minimum_ip_target: self.opts.warm.minimum_ip_target,
            pending_ops: st.journal.len(),
            borrowed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_store::{LocalOptions, LocalStore};
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
        let e = ipam.allocate("@warm/n1/10.50.0.1", &[]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Invalid);
        let st = ipam.status();
        assert!(st.store_reachable);
        assert_eq!(st.blocks.len(), 2);
    }

    fn warm_opts(state: &std::path::Path, warm: u32, minimum: u32) -> IpamOptions {
        IpamOptions {
            warm: WarmConfig { warm_ip_target: warm, minimum_ip_target: minimum },
            strict_affinity: false,
            state_dir: Some(state.to_path_buf()),
        }
    }

    /// (handle -> addresses) as the store's block records say, warm handles included.
    fn owners(store: &dyn Datastore) -> BTreeMap<IpAddr, String> {
        let mut out = BTreeMap::new();
        for b in list_blocks(store).unwrap() {
            for (ord, h) in &b.value.handles {
                let ip = b.value.block.addr(*ord);
                assert!(b.value.block.is_allocated(ip), "{ip} named {h} but free");
                assert!(out.insert(ip, h.clone()).is_none());
            }
            assert_eq!(b.value.block.used() as usize, b.value.handles.len(), "{:?}", b.value);
        }
        out
    }

    fn warm_count(owners: &BTreeMap<IpAddr, String>, node: &str) -> usize {
        owners.values().filter(|h| h.starts_with(&warm_prefix(node))).count()
    }

    #[test]
    fn warm_pool_refills_to_targets_and_trims() {
        let dir = TempDir::new();
        let store: Arc<dyn Datastore> = Arc::new(LocalStore::open(dir.join("store")).unwrap());
        let pools = vec![pool("10.51.0.0/24", 28, None)];
        let ipam = NodeIpam::open(store.clone(), "n1", pools.clone(), warm_opts(&dir.join("state"), 3, 5)).unwrap();
        // minimumIPTarget 5 with nothing used: 5 free.
        assert!(ipam.reconcile().unwrap());
        assert_eq!(ipam.warm_free(), 5);
        assert_eq!(warm_count(&owners(&*store), "n1"), 5);
        // Served from the pool: journaled, then written by the reconciler.
        let a = ipam.allocate("net/a/eth0", &[]).unwrap();
        assert_eq!(ipam.pending(), 1);
        assert_eq!(owners(&*store)[&a[0].address], warm_handle("n1", a[0].address));
        assert_eq!(ipam.allocate("net/a/eth0", &[]).unwrap(), a, "idempotent");
        assert!(ipam.reconcile().unwrap());
        assert_eq!(ipam.pending(), 0);
        assert_eq!(owners(&*store)[&a[0].address], "net/a/eth0");
        // 1 used: max(3, 5-1) = 4 free.
        assert_eq!(ipam.warm_free(), 4);
        for i in 0..4 {
            ipam.allocate(&format!("net/b{i}/eth0"), &[]).unwrap();
        }
        assert_eq!(ipam.warm_free(), 0);
        assert!(ipam.reconcile().unwrap());
        // 5 used: 3 free.
        assert_eq!(ipam.warm_free(), 3);
        let o = owners(&*store);
        assert_eq!(warm_count(&o, "n1"), 3);
        assert_eq!(o.len(), 8);
        // Releases: used 1 -> 4 free wanted (the released addresses are free again).
        for i in 0..4 {
            ipam.release(&format!("net/b{i}/eth0")).unwrap().unwrap();
        }
        assert!(ipam.reconcile().unwrap());
        assert_eq!(ipam.warm_free(), 4);
        let o = owners(&*store);
        assert_eq!(o.len(), 5, "{o:?}");
        assert_eq!(ipam.status().warm_free, 4);
        // A restarted agent finds the warm addresses again.
        drop(ipam);
        let again = NodeIpam::open(store.clone(), "n1", pools.clone(), warm_opts(&dir.join("state"), 3, 5)).unwrap();
        assert_eq!(again.warm_free(), 4);
        assert_eq!(again.get("net/a/eth0").unwrap(), a);
        // Targets 0: the pool is given back.
        let plain = NodeIpam::open(store.clone(), "n1", pools, warm_opts(&dir.join("state"), 0, 0)).unwrap();
        assert!(plain.reconcile().unwrap());
        assert_eq!(plain.warm_free(), 0);
        assert_eq!(owners(&*store).len(), 1);
    }

    /// Holds the local store's directory lock, which makes it unavailable
    /// to a client with a short lock timeout (a hung neighbour process).
    struct Outage {
        _lock: std::fs::File,
    }

    impl Outage {
        fn begin(store_dir: &std::path::Path) -> Outage {
            let f = std::fs::OpenOptions::new().read(true).write(true).open(store_dir.join("lock")).unwrap();
            f.lock().unwrap();
            Outage { _lock: f }
        }
    }

    #[test]
    fn outage_journal_replays_after_restart_without_double_allocation() {
        let dir = TempDir::new();
        let store_dir = dir.join("store");
        let state = dir.join("state");
        let opts = LocalOptions { lock_timeout: Duration::from_millis(200), ..Default::default() };
        let store: Arc<dyn Datastore> = Arc::new(LocalStore::open_with(&store_dir, opts).unwrap());
        let pools = vec![pool("10.52.0.0/24", 28, None)];
        let ipam = NodeIpam::open(store.clone(), "n1", pools.clone(), warm_opts(&state, 2, 0)).unwrap();
        assert!(ipam.reconcile().unwrap());
        let old = ipam.allocate("net/old/eth0", &[]).unwrap();
        assert!(ipam.reconcile().unwrap());
        assert_eq!(ipam.warm_free(), 2);

        let outage = Outage::begin(&store_dir);
        // Two ADDs from the warm pool, the third fails naming the store.
        let w1 = ipam.allocate("net/w1/eth0", &[]).unwrap();
        let w2 = ipam.allocate("net/w2/eth0", &[]).unwrap();
        let e = ipam.allocate("net/w3/eth0", &[]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Unavailable);
        assert!(e.message.contains(&store.describe()) && e.message.contains("warm pool"), "{e}");
        // DEL while down: answered, journaled; the address stays reserved.
        assert_eq!(ipam.release("net/old/eth0").unwrap().unwrap(), old);
        assert_eq!(ipam.get("net/old/eth0"), None);
        // DEL of a warm-assigned pod, and a retried ADD of the released handle:
        // nothing free, so 11; it must not get the released address back.
        ipam.release("net/w2/eth0").unwrap().unwrap();
        assert_eq!(ipam.allocate("net/old/eth0", &[]).unwrap_err().kind, ErrorKind::Unavailable);
        assert_eq!(ipam.pending(), 4);
        assert_eq!(ipam.status().pending_ops, 4);

        // The agent dies during the outage; a new one starts after it.
        drop(ipam);
        drop(outage);
        let ipam = NodeIpam::open(store.clone(), "n1", pools.clone(), warm_opts(&state, 2, 0)).unwrap();
        assert_eq!(ipam.pending(), 4);
        assert_eq!(ipam.get("net/w1/eth0").unwrap(), w1, "the journal's assignment is known before it is applied");
        assert_eq!(ipam.get("net/old/eth0"), None, "the journal's release too");
        assert_eq!(ipam.get("net/w2/eth0"), None);
        // A retried ADD of the released handle before the release is applied
        // gets another address, and the release does not take it away.
        let retried = ipam.allocate("net/old/eth0", &[]).unwrap();
        assert_ne!(retried, old);
        assert!(ipam.reconcile().unwrap());
        assert_eq!(ipam.pending(), 0);
        assert_eq!(ipam.get("net/old/eth0").unwrap(), retried);
        let o = owners(&*store);
        assert_eq!(o[&w1[0].address], "net/w1/eth0");
        assert_eq!(o[&retried[0].address], "net/old/eth0");
        assert!(!o.contains_key(&w2[0].address) || o[&w2[0].address].starts_with("@warm/"), "{o:?}");
        assert!(!o.values().any(|h| h == "net/w2/eth0"));
        assert_eq!(o.values().filter(|h| *h == "net/old/eth0").count(), 1);
        assert_eq!(warm_count(&o, "n1"), 2);
        assert_eq!(o.len(), 4, "{o:?}");
        // Applying again (a journal whose removal was lost) changes nothing.
        ipam.reconcile().unwrap();
        assert_eq!(owners(&*store), o);
        assert!(!state.join("ipam-n1.journal.tmp").exists());
    }

    #[test]
    fn borrowing_unless_strict_affinity() {
        let dir = TempDir::new();
        let store: Arc<dyn Datastore> = Arc::new(LocalStore::open(dir.path()).unwrap());
        // Two /29 blocks in the pool: each node gets one.
        let pools = vec![pool("10.53.0.0/28", 29, None)];
        let n1 = NodeIpam::load(store.clone(), "n1", pools.clone()).unwrap();
        let n2 = NodeIpam::load(store.clone(), "n2", pools.clone()).unwrap();
        n1.allocate("net/a/eth0", &[]).unwrap();
        let b0 = n2.allocate("net/b0/eth0", &[]).unwrap();
        for i in 1..8 {
            n1.allocate(&format!("net/a{i}/eth0"), &[]).unwrap();
        }
        // n1's block is full and the pool has no free block: n1 borrows from n2's.
        let borrowed = n1.allocate("net/x/eth0", &[]).unwrap();
        assert_eq!(borrowed[0].block, b0[0].block);
        assert_eq!(n1.status().borrowed, 1);
        let rec = get_block(&*store, &b0[0].block).unwrap().unwrap().value;
        assert_eq!(rec.node, "n2", "the block keeps its owner");
        assert_eq!(rec.borrower_of(borrowed[0].address), Some("n1"));
        // n2 does not count it as its pod; a restarted n1 finds it.
        assert_eq!(n2.get("net/x/eth0"), None);
        let n1again = NodeIpam::load(store.clone(), "n1", pools.clone()).unwrap();
        assert_eq!(n1again.get("net/x/eth0").unwrap(), borrowed);
        // strictAffinity: exhausted instead.
        let strict = IpamOptions { strict_affinity: true, ..Default::default() };
        let n1s = NodeIpam::open(store.clone(), "n1", pools.clone(), strict).unwrap();
        let e = n1s.allocate("net/y/eth0", &[]).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Exhausted);
        assert!(e.message.contains("strictAffinity"), "{e}");
        // Release frees the borrowed address in the foreign block.
        assert_eq!(n1again.release("net/x/eth0").unwrap().unwrap(), borrowed);
        let rec = get_block(&*store, &b0[0].block).unwrap().unwrap().value;
        assert!(!rec.block.is_allocated(borrowed[0].address));
        assert!(rec.borrowed.is_empty());
    }
}
