//! The collector: gives back what nobody uses, after a grace period, and
//! only after re-checking.
//!
//! [`run_once`] looks at the whole cluster (every block, node and endpoint
//! record) and does three things:
//!
//! 1. **Leaks.** Every used address is judged ([`LeakReason`]):
//!    * `nodeDead`: the node holding it (the endpoint record's node, else the
//!      address's borrower, else the block's owner) has no node record, i.e.
//!      its lease ran out. Warm-pool addresses (`@warm/...`) too.
//!    * `noEndpoint`: its handle has no endpoint record ([`crate::endpoints`]).
//!      Not for warm-pool addresses, nor (in the agent) for handles whose
//!      record write is still queued.
//!    * `netnsGone`: its endpoint record names a netns path that no longer
//!      exists. Only the agent of the record's node can see that path, so
//!      only a run with `this_node` equal to it decides this; other runs
//!      keep such a mark as they find it. A path counts as gone when it is
//!      missing and its directory exists (a `/proc/<pid>/...` path: when
//!      `/proc/<pid>` is missing), so a filesystem the agent cannot see is
//!      never taken for a deleted netns.
//!
//!    An address is **in use** otherwise (its block marks it used and none
//!    of the above holds). The first time an address looks leaked, a leak
//!    mark (`/tern/v1/ipam/leaks/<address>`) records when; a mark for an
//!    address that is in use again, free, or held by another handle is
//!    deleted. Once `leak_grace` has passed since the mark, the address is
//!    freed: the block is re-read, the endpoint record and the node list
//!    are read again, the verdict re-made, and the block written with a
//!    compare-and-swap on the revision re-read (a racing allocate or release
//!    makes it lose, and the next run decides again). A freed attachment's
//!    endpoint records are deleted with it.
//! 2. **Blocks.** A block is idle when it is empty (`empty`) or its owner
//!    node is gone (`nodeDead`); an idle mark (`/tern/v1/ipam/idle/<cidr>`)
//!    records since when. An empty block of a live node is released once it
//!    has stayed empty and **unchanged** for `block_grace` (the mark holds
//!    the block's revision: any allocation since restarts the period, and
//!    the release is a delete guarded by that very revision). A dead node's
//!    block is reclaimed once `block_grace` has passed since its node was
//!    first seen gone **and** none of its addresses is in use: the leak
//!    collector frees a dead node's addresses after `leak_grace`, but never
//!    one that a live node's pod holds (a borrowed address whose endpoint
//!    names a live node), and the block waits for those. Releasing also
//!    removes the block's affinity key and mark.
//! 3. **Stale endpoint records**: an attachment (or pod) record whose handle
//!    holds none of its addresses, older than `leak_grace`, is deleted (a
//!    release whose record delete was lost). Records of pods served from the
//!    warm pool whose address is still under its `@warm/` handle are kept.
//!
//! Marks live in the store, so `tern ipam gc` (from any machine, `this_node`
//! `None`) and every agent's periodic run count the same grace periods;
//! concurrent runs are safe (marks are created with create-if-absent and
//! changed with compare-and-swap, every release is revision-guarded). Times
//! are wall-clock milliseconds of the machine that first saw the state, so
//! large clock skew between machines shortens or lengthens a grace period.
//! A node whose agent is stopped for longer than the grace periods counts
//! as dead: its pods' addresses are freed.
//!
//! In the agent, a thread ([`run_loop`]) writes missing endpoint records
//! once at start ([`Endpoints::recover`]) and calls the collector every
//! [`GcConfig::interval`] with `this_node` set and the handles whose
//! endpoint writes are still queued counted as in use.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::path::{Component, Path};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tern_store::ipam::{get_block, list_blocks, write_block, BlockRecord, Versioned};
use tern_store::{keys, Datastore, Revision, StoreError};

use crate::endpoints::{self, unix_ms, EndpointRecord, Endpoints};
use crate::warm::WARM_HANDLE_PREFIX;
use crate::AgentError;

/// The collector's timing. In config files (seconds):
/// `{"intervalSeconds": 30, "blockGraceSeconds": 300, "leakGraceSeconds": 300}`;
/// absent keys keep their default, unknown keys are an error naming them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "GcSeconds", into = "GcSeconds")]
pub struct GcConfig {
    /// How often the agent collects (default 30 s; zero: the agent never
    /// does, `tern ipam gc` still can).
    pub interval: Duration,
    /// How long a block stays idle before it is released (default 5 min).
    pub block_grace: Duration,
    /// How long an address looks leaked before it is freed (default 5 min).
    pub leak_grace: Duration,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            interval: Duration::from_secs(30),
            block_grace: Duration::from_secs(300),
            leak_grace: Duration::from_secs(300),
        }
    }
}

/// [`GcConfig`] as written in config files.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
struct GcSeconds {
    interval_seconds: u64,
    block_grace_seconds: u64,
    leak_grace_seconds: u64,
}

impl Default for GcSeconds {
    fn default() -> Self {
        GcConfig::default().into()
    }
}

impl From<GcSeconds> for GcConfig {
    fn from(s: GcSeconds) -> Self {
        GcConfig {
            interval: Duration::from_secs(s.interval_seconds),
            block_grace: Duration::from_secs(s.block_grace_seconds),
            leak_grace: Duration::from_secs(s.leak_grace_seconds),
        }
    }
}

impl From<GcConfig> for GcSeconds {
    fn from(c: GcConfig) -> Self {
        GcSeconds {
            interval_seconds: c.interval.as_secs(),
            block_grace_seconds: c.block_grace.as_secs(),
            leak_grace_seconds: c.leak_grace.as_secs(),
        }
    }
}

/// Why a block is idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum IdleReason {
    /// No address used, owner alive.
    Empty,
    /// The owner node has no node record.
    NodeDead,
}

/// Why an address looks leaked (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum LeakReason {
    NoEndpoint,
    NetnsGone,
    NodeDead,
}

/// `/tern/v1/ipam/idle/<cidr>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdleMark {
    pub cidr: IpNet,
    /// The block's owner when the mark was made.
    pub node: String,
    pub reason: IdleReason,
    pub first_seen_ms: u64,
    /// The block's revision when first seen idle: an `empty` block must
    /// still be at it to be released.
    pub block_revision: Revision,
}

/// `/tern/v1/ipam/leaks/<address>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeakMark {
    pub address: IpAddr,
    pub block: IpNet,
    pub handle: String,
    /// The node the address's attachment was on.
    pub node: String,
    pub reason: LeakReason,
    pub first_seen_ms: u64,
}

/// A block the collector released, or waits to release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockCandidate {
    pub cidr: IpNet,
    pub node: String,
    pub reason: IdleReason,
    pub first_seen_ms: u64,
    pub due_at_ms: u64,
    /// Addresses still in use (a dead node's block waits for them).
    pub in_use: u32,
}

/// An address the collector freed, or may free.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LeakCandidate {
    pub address: IpAddr,
    pub block: IpNet,
    pub handle: String,
    /// The node the attachment was on.
    pub node: String,
    pub reason: LeakReason,
    pub first_seen_ms: u64,
    pub due_at_ms: u64,
    /// Why this run cannot decide it (a netns only its node can check).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl LeakCandidate {
    fn of(m: &LeakMark, grace_ms: u64) -> LeakCandidate {
        LeakCandidate {
            address: m.address,
            block: m.block,
            handle: m.handle.clone(),
            node: m.node.clone(),
            reason: m.reason,
            first_seen_ms: m.first_seen_ms,
            due_at_ms: m.first_seen_ms.saturating_add(grace_ms),
            note: None,
        }
    }
}

/// What one [`run_once`] did. With `dry_run`, the released, reclaimed,
/// freed and removed lists say what it would have done, and nothing was
/// written (not even marks: first-seen times of new candidates are "now").
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GcReport {
    pub dry_run: bool,
    /// The node whose agent ran it (`None`: `tern ipam gc`).
    pub node: Option<String>,
    pub now_ms: u64,
    pub live_nodes: Vec<String>,
    /// Empty blocks of live nodes given back to the pool.
    pub empty_blocks_released: Vec<BlockCandidate>,
    /// Blocks of dead nodes given back to the pool.
    pub dead_node_blocks_reclaimed: Vec<BlockCandidate>,
    /// Idle blocks not released yet: grace not over, or addresses in use.
    pub blocks_waiting: Vec<BlockCandidate>,
    /// Addresses that look leaked, not freed yet.
    pub leak_candidates: Vec<LeakCandidate>,
    pub leaks_freed: Vec<LeakCandidate>,
    /// Handles whose endpoint records were deleted (freed or stale).
    pub endpoint_records_removed: Vec<String>,
    /// Dead nodes whose last block was reclaimed: their routing records
    /// were withdrawn.
    pub routing_records_withdrawn: Vec<String>,
    /// Records that could not be read (skipped, never freed because of them).
    pub warnings: Vec<String>,
}

impl GcReport {
    /// Whether the run released, freed or removed anything.
    pub fn changed(&self) -> bool {
        !(self.empty_blocks_released.is_empty()
            && self.dead_node_blocks_reclaimed.is_empty()
            && self.leaks_freed.is_empty()
            && self.endpoint_records_removed.is_empty()
            && self.routing_records_withdrawn.is_empty())
    }

    /// One line for logs.
    pub fn summary(&self) -> String {
        let blocks = |v: &[BlockCandidate]| v.iter().map(|b| b.cidr.to_string()).collect::<Vec<_>>().join(" ");
        let mut parts = Vec::new();
        if !self.empty_blocks_released.is_empty() {
            parts.push(format!("released empty blocks {}", blocks(&self.empty_blocks_released)));
        }
        if !self.dead_node_blocks_reclaimed.is_empty() {
            parts.push(format!("reclaimed dead nodes' blocks {}", blocks(&self.dead_node_blocks_reclaimed)));
        }
        if !self.leaks_freed.is_empty() {
            let v: Vec<String> =
                self.leaks_freed.iter().map(|l| format!("{} ({}, {:?})", l.address, l.handle, l.reason)).collect();
            parts.push(format!("freed leaked addresses {}", v.join(", ")));
        }
        if !self.endpoint_records_removed.is_empty() {
            parts.push(format!("removed {} endpoint records", self.endpoint_records_removed.len()));
        }
        if !self.routing_records_withdrawn.is_empty() {
            parts.push(format!("withdrew the routing records of {}", self.routing_records_withdrawn.join(" ")));
        }
        parts.push(format!(
            "{} leak candidates, {} blocks waiting",
            self.leak_candidates.len(),
            self.blocks_waiting.len()
        ));
        parts.join("; ")
    }
}

/// One collection over the whole cluster; see the module docs.
/// `this_node`: the node whose agent runs it (it alone checks that node's
/// netns paths, and counts itself alive); `None` from `tern ipam gc`.
/// `dry_run`: report only, write nothing.
pub fn run_once(
    store: &dyn Datastore,
    this_node: Option<&str>,
    cfg: &GcConfig,
    dry_run: bool,
) -> Result<GcReport, AgentError> {
    collect(store, &Context { this_node, pending: &HashSet::new() }, cfg, dry_run)
}

/// The leak and idle marks as stored (for `tern ipam show`).
pub fn leak_marks(store: &dyn Datastore) -> Result<Vec<LeakMark>, StoreError> {
    Ok(read_marks::<LeakMark>(store, keys::IPAM_LEAKS)?.into_iter().filter_map(|(_, m, _)| m).collect())
}

pub fn idle_marks(store: &dyn Datastore) -> Result<Vec<IdleMark>, StoreError> {
    Ok(read_marks::<IdleMark>(store, keys::IPAM_IDLE)?.into_iter().filter_map(|(_, m, _)| m).collect())
}

/// Every mark under `prefix`: (key, the mark or `None` if unreadable, revision).
fn read_marks<T: serde::de::DeserializeOwned>(
    store: &dyn Datastore,
    prefix: &str,
) -> Result<Vec<(String, Option<T>, Revision)>, StoreError> {
    Ok(store
        .list(prefix)?
        .kvs
        .into_iter()
        .map(|kv| (serde_json::from_slice(&kv.value).ok(), kv))
        .map(|(m, kv)| (kv.key, m, kv.revision))
        .collect())
}

/// What the agent adds to a run: itself, and the handles whose endpoint
/// records are still queued.
pub(crate) struct Context<'a> {
    pub this_node: Option<&'a str>,
    pub pending: &'a HashSet<String>,
}

/// An address's endpoint record, as far as the run could read it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Record<'a> {
    Missing,
    Unreadable,
    Present(&'a EndpointRecord),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    InUse,
    Leak {
        reason: LeakReason,
        node: String,
    },
    /// Only `node`'s agent can tell (its netns path).
    Undecided {
        node: String,
    },
}

/// The pure decision about one used address.
pub(crate) struct Judge<'a> {
    pub live: &'a dyn Fn(&str) -> bool,
    pub this_node: Option<&'a str>,
    pub pending: &'a HashSet<String>,
    pub netns_gone: &'a dyn Fn(&str) -> bool,
}

impl Judge<'_> {
    fn is_live(&self, node: &str) -> bool {
        self.this_node == Some(node) || (self.live)(node)
    }

    /// `holder`: the address's borrower, else its block's owner.
    pub(crate) fn address(&self, holder: &str, handle: &str, record: Record<'_>) -> Verdict {
        let node = match record {
            Record::Present(r) => r.node.as_str(),
            _ => holder,
        };
        // Dead only if every node it could be on is gone.
        if !self.is_live(node) && !self.is_live(holder) {
            return Verdict::Leak { reason: LeakReason::NodeDead, node: node.to_string() };
        }
        if crate::is_node_internal(handle) || self.pending.contains(handle) {
            return Verdict::InUse;
        }
        match record {
            Record::Unreadable => Verdict::InUse,
            Record::Missing => Verdict::Leak { reason: LeakReason::NoEndpoint, node: node.to_string() },
            Record::Present(r) => match &r.netns {
                None => Verdict::InUse,
                Some(path) if self.this_node == Some(node) => {
                    if (self.netns_gone)(path) {
                        Verdict::Leak { reason: LeakReason::NetnsGone, node: node.to_string() }
                    } else {
                        Verdict::InUse
                    }
                }
                Some(_) => Verdict::Undecided { node: node.to_string() },
            },
        }
    }
}

/// When an address was first seen leaked: the mark's time if the mark is
/// about the same use (block and handle) of the address, else `now`.
pub(crate) fn leak_first_seen(mark: Option<&LeakMark>, block: IpNet, handle: &str, now: u64) -> u64 {
    match mark {
        Some(m) if m.block == block && m.handle == handle => m.first_seen_ms,
        _ => now,
    }
}

/// The idle mark a block should carry now, given the stored one.
pub(crate) fn idle_mark_now(
    stored: Option<&IdleMark>,
    cidr: IpNet,
    node: &str,
    reason: IdleReason,
    revision: Revision,
    now: u64,
) -> IdleMark {
    match stored {
        // A dead node's block may change (its leaks being freed): the
        // period runs from the node's death. An empty block must not have
        // changed at all.
        Some(m)
            if m.cidr == cidr
                && m.node == node
                && m.reason == reason
                && (reason == IdleReason::NodeDead || m.block_revision == revision) =>
        {
            m.clone()
        }
        _ => IdleMark { cidr, node: node.to_string(), reason, first_seen_ms: now, block_revision: revision },
    }
}

/// Whether a netns path is certainly gone (see the module docs).
pub(crate) fn netns_gone(path: &Path) -> bool {
    if !path.is_absolute() {
        return false;
    }
    match std::fs::symlink_metadata(path) {
        Ok(_) => return false,
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return false,
        Err(_) => {}
    }
    if let Ok(rest) = path.strip_prefix("/proc") {
        if let Some(Component::Normal(first)) = rest.components().next() {
            if first.to_str().is_some_and(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())) {
                return Path::new("/proc/self/ns/net").exists() && !Path::new("/proc").join(first).exists();
            }
        }
    }
    path.parent().is_some_and(|p| p.is_dir())
}

/// Attempts at one block's compare-and-swap before leaving it to the next run.
const ATTEMPTS: usize = 8;

struct Run<'a> {
    store: &'a dyn Datastore,
    dry_run: bool,
    block_grace: u64,
    leak_grace: u64,
    report: GcReport,
}

fn live_nodes(store: &dyn Datastore) -> Result<BTreeSet<String>, StoreError> {
    Ok(store
        .list(keys::NODES)?
        .kvs
        .iter()
        .filter_map(|kv| keys::name_under(keys::NODES, &kv.key))
        .map(String::from)
        .collect())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl Run<'_> {
    /// Creates or replaces a mark (conflicts: another run wrote it; ours is
    /// redone next time).
    fn write_mark<T: Serialize>(&self, key: &str, stored: Option<Revision>, mark: &T) -> Result<(), StoreError> {
        if self.dry_run {
            return Ok(());
        }
        let value = serde_json::to_vec(mark).expect("marks serialise");
        let res = match stored {
            Some(rev) => self.store.compare_and_swap(key, rev, &value, None),
            None => self.store.create(key, &value, None),
        };
        match res {
            Ok(_) => Ok(()),
            Err(e) if e.is_conflict() => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn drop_mark(&self, key: &str, stored: Revision) -> Result<(), StoreError> {
        if self.dry_run {
            return Ok(());
        }
        match self.store.delete_if_revision(key, stored) {
            Ok(()) => Ok(()),
            Err(e) if e.is_conflict() => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn warn(&mut self, w: String) {
        self.report.warnings.push(w);
    }
}

pub(crate) fn collect(
    store: &dyn Datastore,
    ctx: &Context<'_>,
    cfg: &GcConfig,
    dry_run: bool,
) -> Result<GcReport, AgentError> {
    let now = unix_ms();
    let mut run = Run {
        store,
        dry_run,
        block_grace: millis(cfg.block_grace),
        leak_grace: millis(cfg.leak_grace),
        report: GcReport { dry_run, node: ctx.this_node.map(String::from), now_ms: now, ..Default::default() },
    };

    let live = live_nodes(store)?;
    run.report.live_nodes = live.iter().cloned().collect();
    let mut blocks: BTreeMap<IpNet, Versioned<BlockRecord>> =
        list_blocks(store)?.into_iter().map(|b| (b.value.cidr(), b)).collect();
    let (records, unreadable) = endpoints::list(store)?;
    for key in &unreadable {
        run.warn(format!("endpoint record {key} is unreadable: its handle counts as in use"));
    }
    let records: HashMap<&str, &Versioned<EndpointRecord>> =
        records.iter().map(|r| (r.value.handle.as_str(), r)).collect();
    let unreadable: HashSet<String> = unreadable.into_iter().collect();
    let record_of = |handle: &str| -> Record<'_> {
        if let Some(r) = records.get(handle) {
            return Record::Present(&r.value);
        }
        match keys::attachment(handle) {
            Ok(key) if unreadable.contains(&key) => Record::Unreadable,
            _ => Record::Missing,
        }
    };
    let mut leak_marks: BTreeMap<IpAddr, (Option<LeakMark>, Revision)> = BTreeMap::new();
    for (key, mark, rev) in read_marks::<LeakMark>(store, keys::IPAM_LEAKS)? {
        match keys::leak_address(&key) {
            Some(ip) => {
                leak_marks.insert(ip, (mark.filter(|m| m.address == ip), rev));
            }
            None => run.warn(format!("{key}: not a leak mark key")),
        }
    }
    let mut idle_marks: BTreeMap<IpNet, (Option<IdleMark>, Revision)> = BTreeMap::new();
    for (key, mark, rev) in read_marks::<IdleMark>(store, keys::IPAM_IDLE)? {
        match keys::name_under(keys::IPAM_IDLE, &key).and_then(keys::parse_cidr_id) {
            Some(cidr) => {
                idle_marks.insert(cidr, (mark.filter(|m| m.cidr == cidr), rev));
            }
            None => run.warn(format!("{key}: not an idle mark key")),
        }
    }

    let live_now = |n: &str| live.contains(n);
    let gone = |p: &str| netns_gone(Path::new(p));
    let judge = Judge { live: &live_now, this_node: ctx.this_node, pending: ctx.pending, netns_gone: &gone };

    // Leaks: judge every used address, keep the marks in step.
    let mut due: BTreeMap<IpNet, Vec<LeakCandidate>> = BTreeMap::new();
    let mut used: HashSet<IpAddr> = HashSet::new();
    for (cidr, b) in &blocks {
        for (ord, handle) in &b.value.handles {
            let ip = b.value.block.addr(*ord);
            used.insert(ip);
            let holder = b.value.borrower_of(ip).unwrap_or(b.value.node.as_str());
            let stored = leak_marks.get(&ip);
            let mark = stored.and_then(|(m, _)| m.as_ref());
            let key = keys::leak(&ip);
            match judge.address(holder, handle, record_of(handle)) {
                Verdict::InUse => {
                    if let Some((_, rev)) = stored {
                        run.drop_mark(&key, *rev)?;
                    }
                }
                Verdict::Undecided { node } => match mark {
                    Some(m) if m.block == *cidr && m.handle == *handle && m.reason == LeakReason::NetnsGone => {
                        let mut c = LeakCandidate::of(m, run.leak_grace);
                        c.note = Some(format!("only the agent of node {node} can check its netns"));
                        run.report.leak_candidates.push(c);
                    }
                    _ => {
                        if let Some((_, rev)) = stored {
                            run.drop_mark(&key, *rev)?;
                        }
                    }
                },
                Verdict::Leak { reason, node } => {
                    let first_seen_ms = leak_first_seen(mark, *cidr, handle, now);
                    let want =
                        LeakMark { address: ip, block: *cidr, handle: handle.clone(), node, reason, first_seen_ms };
                    if mark != Some(&want) {
                        run.write_mark(&key, stored.map(|(_, r)| *r), &want)?;
                    }
                    let c = LeakCandidate::of(&want, run.leak_grace);
                    if now >= c.due_at_ms {
                        due.entry(*cidr).or_default().push(c);
                    } else {
                        run.report.leak_candidates.push(c);
                    }
                }
            }
        }
    }
    for (ip, (_, rev)) in &leak_marks {
        if !used.contains(ip) {
            run.drop_mark(&keys::leak(ip), *rev)?;
        }
    }

    // Free what is due, re-checking each against fresh reads.
    let live = if due.is_empty() { live } else { live_nodes(store)? };
    let live_fresh = |n: &str| live.contains(n);
    let fresh = Judge { live: &live_fresh, this_node: ctx.this_node, pending: ctx.pending, netns_gone: &gone };
    let mut freed_handles: BTreeSet<String> = BTreeSet::new();
    for (cidr, candidates) in due {
        let freed = free_in_block(&mut run, &fresh, &mut blocks, cidr, &candidates)?;
        for f in freed {
            freed_handles.insert(f.handle.clone());
            run.report.leaks_freed.push(f);
        }
    }

    // Endpoint records of handles that hold nothing any more.
    let mut holding: HashMap<IpAddr, &str> = HashMap::new();
    for b in blocks.values() {
        for (ord, h) in &b.value.handles {
            holding.insert(b.value.block.addr(*ord), h.as_str());
        }
    }
    let held_handles: HashSet<&str> = holding.values().copied().collect();
    let holds = |handle: &str| held_handles.contains(handle);
    let mut remove: BTreeSet<String> = freed_handles.into_iter().filter(|h| !holds(h)).collect();
    for r in records.values() {
        let r = &r.value;
        let stale = !holds(&r.handle)
            && !ctx.pending.contains(&r.handle)
            && r.created_at_ms.saturating_add(run.leak_grace) <= now
            && !r.addresses.iter().any(|a| holding.get(a).is_some_and(|h| h.starts_with(WARM_HANDLE_PREFIX)));
        if stale {
            remove.insert(r.handle.clone());
        }
    }
    for handle in remove {
        if !dry_run {
            endpoints::remove(store, &handle)?;
        }
        run.report.endpoint_records_removed.push(handle);
    }
    // Pod records whose attachment record is gone (a crash between the two deletes).
    for kv in store.list(keys::ENDPOINTS)?.kvs {
        let Ok(r) = serde_json::from_slice::<EndpointRecord>(&kv.value) else {
            run.warn(format!("endpoint record {} is unreadable", kv.key));
            continue;
        };
        let orphan = !records.contains_key(r.handle.as_str())
            && !matches!(record_of(&r.handle), Record::Unreadable)
            && !holds(&r.handle)
            && !ctx.pending.contains(&r.handle)
            && r.created_at_ms.saturating_add(run.leak_grace) <= now;
        if orphan {
            if !dry_run {
                match store.delete_if_revision(&kv.key, kv.revision) {
                    Ok(()) => {}
                    Err(e) if e.is_conflict() => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            if !run.report.endpoint_records_removed.contains(&r.handle) {
                run.report.endpoint_records_removed.push(r.handle);
            }
        }
    }

    // Blocks, as the leaks just freed left them.
    for (cidr, b) in &blocks {
        let rec = &b.value;
        let owner_live = ctx.this_node == Some(rec.node.as_str()) || live.contains(&rec.node);
        let stored = idle_marks.get(cidr);
        let mark = stored.and_then(|(m, _)| m.as_ref());
        if owner_live && !rec.is_empty() {
            if let Some((_, rev)) = stored {
                run.drop_mark(&keys::idle_block(cidr), *rev)?;
            }
            continue;
        }
        let reason = if owner_live { IdleReason::Empty } else { IdleReason::NodeDead };
        let want = idle_mark_now(mark, *cidr, &rec.node, reason, b.revision, now);
        if mark != Some(&want) {
            run.write_mark(&keys::idle_block(cidr), stored.map(|(_, r)| *r), &want)?;
        }
        let c = BlockCandidate {
            cidr: *cidr,
            node: rec.node.clone(),
            reason,
            first_seen_ms: want.first_seen_ms,
            due_at_ms: want.first_seen_ms.saturating_add(run.block_grace),
            in_use: rec.block.used(),
        };
        if now < c.due_at_ms || !rec.is_empty() {
            run.report.blocks_waiting.push(c);
            continue;
        }
        if !dry_run {
            match store.delete_if_revision(&keys::block(cidr), b.revision) {
                Ok(()) => {}
                // Used or released meanwhile: the next run looks again.
                Err(e) if e.is_conflict() => continue,
                Err(e) => return Err(e.into()),
            }
            if let Ok(aff) = keys::affinity(&rec.node, cidr) {
                store.delete(&aff)?;
            }
            store.delete(&keys::idle_block(cidr))?;
        }
        match reason {
            IdleReason::Empty => run.report.empty_blocks_released.push(c),
            IdleReason::NodeDead => run.report.dead_node_blocks_reclaimed.push(c),
        }
    }
    for (cidr, (_, rev)) in &idle_marks {
        if !blocks.contains_key(cidr) {
            run.drop_mark(&keys::idle_block(cidr), *rev)?;
        }
    }
    // A dead node whose last block this run reclaimed is gone for good: its
    // routing record goes too, so peers drop their neighbour and FDB
    // entries for it (its block routes went with the blocks).
    let released: HashSet<IpNet> =
        run.report.empty_blocks_released.iter().chain(&run.report.dead_node_blocks_reclaimed).map(|c| c.cidr).collect();
    let owners: HashSet<&str> =
        blocks.iter().filter(|(c, _)| !released.contains(c)).map(|(_, b)| b.value.node.as_str()).collect();
    let gone: BTreeSet<String> = run
        .report
        .dead_node_blocks_reclaimed
        .iter()
        .map(|c| c.node.clone())
        .filter(|n| !owners.contains(n.as_str()) && !live.contains(n) && ctx.this_node != Some(n.as_str()))
        .collect();
    for node in gone {
        if !dry_run {
            crate::routing::withdraw(store, &node)?;
        }
        run.report.routing_records_withdrawn.push(node);
    }
    Ok(run.report)
}

/// Frees the due `candidates` of one block that still look leaked on a
/// fresh read; updates `blocks` with what was written. Returns the freed.
fn free_in_block(
    run: &mut Run<'_>,
    judge: &Judge<'_>,
    blocks: &mut BTreeMap<IpNet, Versioned<BlockRecord>>,
    cidr: IpNet,
    candidates: &[LeakCandidate],
) -> Result<Vec<LeakCandidate>, AgentError> {
    let store = run.store;
    for _ in 0..ATTEMPTS {
        let Some(cur) = get_block(store, &cidr)? else {
            blocks.remove(&cidr);
            return Ok(Vec::new());
        };
        let mut rec = cur.value.clone();
        let mut freed = Vec::new();
        for c in candidates {
            if rec.handle_of(c.address) != Some(c.handle.as_str()) {
                continue; // freed or re-used since
            }
            let holder = rec.borrower_of(c.address).unwrap_or(rec.node.as_str()).to_string();
            let fresh = match endpoints::get_by_handle(store, &c.handle) {
                Ok(r) => r,
                Err(StoreError::Corrupt { .. }) => continue,
                Err(e) => return Err(e.into()),
            };
            let record = fresh.as_ref().map_or(Record::Missing, |r| Record::Present(&r.value));
            if let Verdict::Leak { reason, node } = judge.address(&holder, &c.handle, record) {
                rec.release(c.address);
                freed.push(LeakCandidate { reason, node, ..c.clone() });
            }
        }
        if freed.is_empty() {
            blocks.insert(cidr, cur);
            return Ok(freed);
        }
        if run.dry_run {
            blocks.insert(cidr, Versioned { value: rec, revision: cur.revision });
            return Ok(freed);
        }
        match write_block(store, cur.revision, &rec) {
            Ok(revision) => {
                blocks.insert(cidr, Versioned { value: rec, revision });
                for f in &freed {
                    store.delete(&keys::leak(&f.address))?;
                }
                return Ok(freed);
            }
            Err(e) if e.is_conflict() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    run.warn(format!("block {cidr}: changed under every attempt to free its leaks; next run"));
    Ok(Vec::new())
}

/// Logs an error unless it is the same as the last one.
fn log_once(last: &mut Option<String>, node: &str, what: &str, e: &dyn std::fmt::Display) {
    let msg = format!("{what}: {e}");
    if last.as_deref() != Some(&msg) {
        eprintln!("tern agent: node {node}: {msg}");
        *last = Some(msg);
    }
}

/// The agent's collector thread: writes missing endpoint records once
/// ([`Endpoints::recover`]), then collects every `cfg.interval`. `wait(d)`
/// sleeps up to `d` and says whether the agent is stopping; the endpoint
/// writer is told to stop when this returns (or unwinds).
pub(crate) fn run_loop(
    store: &dyn Datastore,
    node: &str,
    cfg: &GcConfig,
    endpoints: &Endpoints,
    wait: &dyn Fn(Duration) -> bool,
) {
    struct StopWriter<'a>(&'a Endpoints);
    impl Drop for StopWriter<'_> {
        fn drop(&mut self) {
            self.0.stop();
        }
    }
    let _stop_writer = StopWriter(endpoints);
    let tick = if cfg.interval.is_zero() { Duration::from_secs(1) } else { cfg.interval.min(Duration::from_secs(1)) };
    let mut recovered = false;
    let mut last_run: Option<Instant> = None;
    let mut last_error: Option<String> = None;
    // The first round at once (recovery should not wait), then every tick.
    let mut first = true;
    loop {
        if !first && wait(tick) {
            break;
        }
        first = false;
        if !recovered {
            match endpoints.recover() {
                Ok(n) => {
                    recovered = true;
                    if n > 0 {
                        eprintln!("tern agent: node {node}: wrote {n} missing endpoint records (recovered)");
                    }
                }
                Err(e) => {
                    log_once(&mut last_error, node, "recovering endpoint records", &e);
                    continue;
                }
            }
        }
        if cfg.interval.is_zero() || last_run.is_some_and(|t| t.elapsed() < cfg.interval) {
            continue;
        }
        last_run = Some(Instant::now());
        let pending = endpoints.pending_handles();
        match collect(store, &Context { this_node: Some(node), pending: &pending }, cfg, false) {
            Ok(report) => {
                if report.changed() {
                    eprintln!("tern agent: node {node}: gc: {}", report.summary());
                }
                last_error = None;
            }
            Err(e) => log_once(&mut last_error, node, "gc", &e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(node: &str, netns: Option<&str>) -> EndpointRecord {
        let mut r = EndpointRecord::new("cnet/c/eth0", node, vec!["10.0.0.1".parse().unwrap()], None);
        r.netns = netns.map(String::from);
        r
    }

    fn judge_with<T>(this_node: Option<&str>, pending: &[&str], f: impl FnOnce(&Judge<'_>) -> T) -> T {
        let live = |n: &str| n == "n1" || n == "n2";
        let gone = |p: &str| p.starts_with("/gone/");
        let pending: HashSet<String> = pending.iter().map(|s| s.to_string()).collect();
        f(&Judge { live: &live, this_node, pending: &pending, netns_gone: &gone })
    }

    fn leak(reason: LeakReason, node: &str) -> Verdict {
        Verdict::Leak { reason, node: node.into() }
    }

    #[test]
    fn verdicts() {
        let here = record("n1", Some("/run/netns/p"));
        let gone = record("n1", Some("/gone/p"));
        let bare = record("n1", None);
        let dead = record("n9", Some("/gone/p"));
        judge_with(Some("n1"), &["cnet/pending/eth0"], |j| {
            assert_eq!(j.address("n1", "h", Record::Present(&here)), Verdict::InUse);
            assert_eq!(j.address("n1", "h", Record::Present(&gone)), leak(LeakReason::NetnsGone, "n1"));
            assert_eq!(j.address("n1", "h", Record::Present(&bare)), Verdict::InUse);
            assert_eq!(j.address("n1", "h", Record::Missing), leak(LeakReason::NoEndpoint, "n1"));
            assert_eq!(j.address("n1", "h", Record::Unreadable), Verdict::InUse);
            // Queued record writes and the warm pool are in use on a live node.
            assert_eq!(j.address("n1", "cnet/pending/eth0", Record::Missing), Verdict::InUse);
            assert_eq!(j.address("n1", "@warm/n1/10.0.0.1", Record::Missing), Verdict::InUse);
            assert_eq!(j.address("n1", "@tunnel/n1", Record::Missing), Verdict::InUse, "a live node's tunnel address");
            assert_eq!(j.address("n9", "@tunnel/n9", Record::Missing), leak(LeakReason::NodeDead, "n9"));
            // A dead node's addresses, warm ones included.
            assert_eq!(j.address("n9", "h", Record::Missing), leak(LeakReason::NodeDead, "n9"));
            assert_eq!(j.address("n9", "@warm/n9/10.0.0.1", Record::Missing), leak(LeakReason::NodeDead, "n9"));
            assert_eq!(j.address("n9", "h", Record::Present(&dead)), leak(LeakReason::NodeDead, "n9"));
            // Dead block owner, but the endpoint (a borrower) is on a live node.
            assert_eq!(j.address("n9", "h", Record::Present(&here)), Verdict::InUse);
            // Another live node's netns: not ours to check.
            let other = record("n2", Some("/gone/p"));
            assert_eq!(j.address("n2", "h", Record::Present(&other)), Verdict::Undecided { node: "n2".into() });
            // The running agent is alive even if its node record is missing right now.
            let me = record("n5", Some("/run/netns/p"));
            judge_with(Some("n5"), &[], |j5| {
                assert_eq!(j5.address("n5", "h", Record::Present(&me)), Verdict::InUse);
            });
        });
        // From the CLI no netns is checkable; missing records still are leaks.
        judge_with(None, &[], |j| {
            assert_eq!(j.address("n1", "h", Record::Present(&gone)), Verdict::Undecided { node: "n1".into() });
            assert_eq!(j.address("n1", "h", Record::Missing), leak(LeakReason::NoEndpoint, "n1"));
            assert_eq!(j.address("n1", "cnet/pending/eth0", Record::Missing), leak(LeakReason::NoEndpoint, "n1"));
        });
    }

    #[test]
    fn marks_continue_only_for_the_same_use() {
        let block: IpNet = "10.0.0.0/26".parse().unwrap();
        let m = LeakMark {
            address: "10.0.0.1".parse().unwrap(),
            block,
            handle: "h".into(),
            node: "n1".into(),
            reason: LeakReason::NoEndpoint,
            first_seen_ms: 100,
        };
        assert_eq!(leak_first_seen(Some(&m), block, "h", 500), 100);
        assert_eq!(leak_first_seen(Some(&m), block, "other", 500), 500);
        assert_eq!(leak_first_seen(Some(&m), "10.0.0.64/26".parse().unwrap(), "h", 500), 500);
        assert_eq!(leak_first_seen(None, block, "h", 500), 500);

        let empty = idle_mark_now(None, block, "n1", IdleReason::Empty, 7, 100);
        assert_eq!(empty.first_seen_ms, 100);
        // Unchanged block: the period continues; any write restarts it.
        assert_eq!(idle_mark_now(Some(&empty), block, "n1", IdleReason::Empty, 7, 900).first_seen_ms, 100);
        let changed = idle_mark_now(Some(&empty), block, "n1", IdleReason::Empty, 8, 900);
        assert_eq!((changed.first_seen_ms, changed.block_revision), (900, 8));
        // The owner died: a new period, which block writes do not restart.
        let dead = idle_mark_now(Some(&empty), block, "n1", IdleReason::NodeDead, 7, 900);
        assert_eq!(dead.first_seen_ms, 900);
        assert_eq!(idle_mark_now(Some(&dead), block, "n1", IdleReason::NodeDead, 12, 1500), dead);
        // Another owner (released and claimed again): a new period.
        assert_eq!(idle_mark_now(Some(&dead), block, "n2", IdleReason::NodeDead, 12, 1500).first_seen_ms, 1500);
    }

    #[test]
    fn netns_paths() {
        let dir = tern_testkit::TempDir::new();
        let present = dir.join("ns1");
        std::fs::write(&present, b"").unwrap();
        assert!(!netns_gone(&present));
        assert!(netns_gone(&dir.join("ns2")));
        // A directory this process cannot see: undecidable, so not gone.
        assert!(!netns_gone(&dir.join("no-such-dir/ns3")));
        assert!(!netns_gone(Path::new("relative/ns")));
        assert!(!netns_gone(Path::new("/proc/self/ns/net")));
        assert!(!netns_gone(&Path::new("/proc").join(std::process::id().to_string()).join("ns/net")));
        // pid_max is at most 2^22: this pid never exists.
        assert!(netns_gone(Path::new("/proc/99999999/ns/net")));
    }

    #[test]
    fn config_in_seconds() {
        let c: GcConfig = serde_json::from_str(r#"{"intervalSeconds":5,"leakGraceSeconds":60}"#).unwrap();
        assert_eq!(
            c,
            GcConfig {
                interval: Duration::from_secs(5),
                block_grace: Duration::from_secs(300),
                leak_grace: Duration::from_secs(60)
            }
        );
        assert_eq!(serde_json::from_str::<GcConfig>("{}").unwrap(), GcConfig::default());
        let e = serde_json::from_str::<GcConfig>(r#"{"graceSeconds":1}"#).unwrap_err().to_string();
        assert!(e.contains("graceSeconds"), "{e}");
        let e = serde_json::from_str::<GcConfig>(r#"{"leakGraceSeconds":-1}"#).unwrap_err().to_string();
        assert!(e.contains("-1"), "{e}");
        assert_eq!(
            serde_json::to_string(&GcConfig::default()).unwrap(),
            r#"{"intervalSeconds":30,"blockGraceSeconds":300,"leakGraceSeconds":300}"#
        );
    }
}
