//! Endpoint records: which pod holds which cluster addresses.
//!
//! Every successful `allocate` on the agent's socket records the attachment
//! ([`EndpointRecord`]: handle, addresses, node, interface, netns, container
//! id, pod namespace and name from the plugin's [`EndpointInfo`]); every
//! `release` deletes the record. One record, stored under up to two keys
//! (see [`tern_store::keys`]):
//!
//! * `/tern/v1/attachments/<handle-id>`, always: the endpoint **by handle**,
//!   which is what the leak collector ([`crate::gc`]) looks up for every
//!   used address;
//! * `/tern/v1/endpoints/<namespace>/<pod>/<ifname>`, when the ADD carried
//!   `K8S_POD_NAMESPACE` and `K8S_POD_NAME`: the endpoint **by pod**.
//!
//! **By address** there is no extra key: the address's block record maps it
//! to its handle, and the handle to the record ([`get_by_address`]), so no
//! index can disagree with the blocks.
//!
//! Writes: the attachment key first, then the pod key (put); on release the
//! pod key first (only if it still names this handle: a pod re-created under
//! the same name owns it now), then the attachment key. A crash in between
//! leaves an attachment record whose handle holds no address, which the
//! collector removes after the leak grace period.
//!
//! Writing never delays or fails an ADD or a DEL: the agent queues the
//! write when it answers (before the answer is sent, so a DEL's delete is
//! queued before the runtime's next ADD of the same attachment can be), and
//! one writer thread ([`Endpoints::run_writer`]) applies the queue in order,
//! retrying every second while the store is away. So an ADD served from the
//! warm pool never waits for the store, and a record appears a moment
//! after the ADD returns. The collector treats handles with a queued write
//! as in use. If the agent dies with writes queued, the next agent writes a
//! minimal record (`"recovered": true`, no netns) for every handle of its
//! blocks that has none ([`Endpoints::recover`]), so a pod is never taken
//! for a leak because its record was lost.
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tern_ipam::block::block_containing;
use tern_store::ipam::{get_block, list_blocks, list_pools, Versioned};
use tern_store::{keys, Datastore, StoreError};

/// What the plugin knows about the attachment at ADD: `CNI_CONTAINERID`,
/// `CNI_IFNAME`, `CNI_NETNS`, and `K8S_POD_NAMESPACE` / `K8S_POD_NAME` from
/// `CNI_ARGS`. Sent as the `endpoint` of an allocate request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointInfo {
    #[serde(default)]
    pub container_id: String,
    #[serde(default)]
    pub ifname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
}

/// `/tern/v1/attachments/<handle-id>` and `/tern/v1/endpoints/<ns>/<pod>/<ifname>`:
/// `{"handle":"cnet/<cid>/eth0","node":"n1","addresses":["10.244.7.3"],"containerId":"<cid>",
/// "interface":"eth0","netns":"/run/netns/x","podNamespace":"default","podName":"web-0","createdAtMs":...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointRecord {
    pub handle: String,
    /// The node the pod runs on (the agent that allocated).
    pub node: String,
    pub addresses: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub container_id: String,
    /// The pod's interface name (`CNI_IFNAME`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub interface: String,
    /// The pod's netns path as the runtime gave it (`CNI_NETNS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// Unix milliseconds of the ADD (of the recovery, for recovered records).
    #[serde(default)]
    pub created_at_ms: u64,
    /// Written by [`Endpoints::recover`]: the ADD's own record was lost, so
    /// only the handle, node and addresses are known.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub recovered: bool,
}

impl EndpointRecord {
    pub fn new(handle: &str, node: &str, addresses: Vec<IpAddr>, info: Option<&EndpointInfo>) -> EndpointRecord {
        let info = info.cloned().unwrap_or_default();
        let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
        EndpointRecord {
            handle: handle.to_string(),
            node: node.to_string(),
            addresses,
            container_id: info.container_id,
            interface: info.ifname,
            netns: nonempty(info.netns),
            pod_namespace: nonempty(info.pod_namespace),
            pod_name: nonempty(info.pod_name),
            created_at_ms: unix_ms(),
            recovered: false,
        }
    }

    /// The by-pod key, when the record names a pod and an interface.
    /// `Err` when the names cannot be key components.
    pub fn pod_key(&self) -> Result<Option<String>, StoreError> {
        match (&self.pod_namespace, &self.pod_name) {
            (Some(ns), Some(pod)) if !self.interface.is_empty() => Ok(Some(keys::endpoint(ns, pod, &self.interface)?)),
            _ => Ok(None),
        }
    }
}

pub(crate) fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn decode(key: &str, bytes: &[u8]) -> Result<EndpointRecord, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt { key: key.to_string(), detail: e.to_string() })
}

fn encode(rec: &EndpointRecord) -> Vec<u8> {
    serde_json::to_vec(rec).expect("endpoint records serialise")
}

/// The record of `handle`, by its attachment key.
pub fn get_by_handle(store: &dyn Datastore, handle: &str) -> Result<Option<Versioned<EndpointRecord>>, StoreError> {
    let key = keys::attachment(handle)?;
    match store.get(&key)? {
        None => Ok(None),
        Some(kv) => {
            let rec = decode(&key, &kv.value)?;
            // A cut-and-hashed id shared by two handles: not ours.
            Ok((rec.handle == handle).then_some(Versioned { value: rec, revision: kv.revision }))
        }
    }
}

/// The record of a pod's interface, by its pod key.
pub fn get_by_pod(
    store: &dyn Datastore,
    namespace: &str,
    pod: &str,
    ifname: &str,
) -> Result<Option<EndpointRecord>, StoreError> {
    let key = keys::endpoint(namespace, pod, ifname)?;
    store.get(&key)?.map(|kv| decode(&key, &kv.value)).transpose()
}

/// The record of the attachment holding `address`: the pools give the
/// block size, the block the handle, the handle the record. `None` when
/// the address is in no pool, free, or its handle has no record.
pub fn get_by_address(store: &dyn Datastore, address: IpAddr) -> Result<Option<EndpointRecord>, StoreError> {
    let Some(pool) = list_pools(store)?.into_iter().find(|p| p.cidr.contains(&address)) else { return Ok(None) };
    let Some(cidr) = block_containing(address, pool.block_prefix) else { return Ok(None) };
    let Some(block) = get_block(store, &cidr)? else { return Ok(None) };
    let Some(handle) = block.value.handle_of(address) else { return Ok(None) };
    Ok(get_by_handle(store, handle)?.map(|v| v.value))
}

/// Every attachment record (by handle), with the keys that could not be
/// decoded listed apart (the collector treats those handles as in use).
pub fn list(store: &dyn Datastore) -> Result<(Vec<Versioned<EndpointRecord>>, Vec<String>), StoreError> {
    let listing = store.list(keys::ATTACHMENTS)?;
    let (mut ok, mut bad) = (Vec::new(), Vec::new());
    for kv in listing.kvs {
        match decode(&kv.key, &kv.value) {
            Ok(rec) => ok.push(Versioned { value: rec, revision: kv.revision }),
            Err(_) => bad.push(kv.key),
        }
    }
    Ok((ok, bad))
}

/// Writes `rec` under its attachment key, then its pod key (if it names a
/// pod whose names are valid key components; invalid names are an
/// `Invalid` error after the attachment key was written).
pub fn put(store: &dyn Datastore, rec: &EndpointRecord) -> Result<(), StoreError> {
    let value = encode(rec);
    store.put(&keys::attachment(&rec.handle)?, &value, None)?;
    if let Some(key) = rec.pod_key()? {
        store.put(&key, &value, None)?;
    }
    Ok(())
}

/// Deletes the records of `handle`: the pod key if it still names this
/// handle, then the attachment key. Whether an attachment record existed.
pub fn remove(store: &dyn Datastore, handle: &str) -> Result<bool, StoreError> {
    let key = keys::attachment(handle)?;
    let cur = match get_by_handle(store, handle) {
        Ok(Some(cur)) => cur,
        Ok(None) => return Ok(false),
        // Unreadable: it cannot name a pod key to clean up; it goes anyway.
        Err(StoreError::Corrupt { .. }) => return store.delete(&key),
        Err(e) => return Err(e),
    };
    if let Ok(Some(pod_key)) = cur.value.pod_key() {
        remove_pod_key_if_ours(store, &pod_key, handle)?;
    }
    match store.delete_if_revision(&key, cur.revision) {
        Ok(()) => Ok(true),
        // Rewritten meanwhile (a retried ADD): its owner deletes it later.
        Err(e) if e.is_conflict() => Ok(true),
        Err(e) => Err(e),
    }
}

/// Deletes a pod key only while it names `handle`.
pub(crate) fn remove_pod_key_if_ours(store: &dyn Datastore, pod_key: &str, handle: &str) -> Result<(), StoreError> {
    let Some(kv) = store.get(pod_key)? else { return Ok(()) };
    let ours = decode(pod_key, &kv.value).map(|r| r.handle == handle).unwrap_or(false);
    if ours {
        match store.delete_if_revision(pod_key, kv.revision) {
            Ok(()) => {}
            Err(e) if e.is_conflict() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether a failed write may succeed later (the store is away or busy);
/// anything else would fail the same way every time.
fn retryable(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable { .. } | StoreError::Backend { .. })
}

/// A write the store has not taken yet.
#[derive(Debug, Clone)]
enum PendingOp {
    Put(Box<EndpointRecord>),
    Remove,
}

#[derive(Default)]
struct Queue {
    /// Oldest first; the front is the one being written.
    ops: VecDeque<(String, PendingOp)>,
    stopping: bool,
    /// The last write error, while writes fail.
    failing: Option<String>,
}

/// How long the writer waits before retrying a write the store refused.
const RETRY: Duration = Duration::from_secs(1);

/// The agent's endpoint writer: a queue drained by one thread
/// ([`Endpoints::run_writer`]) in order; see the module docs.
pub struct Endpoints {
    store: Arc<dyn Datastore>,
    node: String,
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl Endpoints {
    pub fn new(store: Arc<dyn Datastore>, node: &str) -> Endpoints {
        Endpoints { store, node: node.to_string(), queue: Mutex::new(Queue::default()), changed: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an allocation answered to a plugin (queued, never fails).
    pub fn allocated(&self, handle: &str, info: Option<&EndpointInfo>, addresses: &[IpAddr]) {
        let rec = EndpointRecord::new(handle, &self.node, addresses.to_vec(), info);
        self.push(handle, PendingOp::Put(Box::new(rec)));
    }

    /// Records a release answered to a plugin (queued, never fails).
    pub fn released(&self, handle: &str) {
        self.push(handle, PendingOp::Remove);
    }

    fn push(&self, handle: &str, op: PendingOp) {
        self.lock().ops.push_back((handle.to_string(), op));
        self.changed.notify_all();
    }

    fn write(&self, handle: &str, op: &PendingOp) -> Result<(), StoreError> {
        match op {
            PendingOp::Put(rec) => put(&*self.store, rec),
            PendingOp::Remove => remove(&*self.store, handle).map(|_| ()),
        }
    }

    /// The writer: writes the queue in order, retrying the front every
    /// second while the store refuses it, until [`Endpoints::stop`]; then it
    /// writes what is left unless the store is down.
    pub fn run_writer(&self) {
        loop {
            let (handle, op) = {
                let mut q = self.lock();
                while q.ops.is_empty() && !q.stopping {
                    q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
                }
                match q.ops.front() {
                    Some(front) => front.clone(),
                    None => return, // stopping, nothing left
                }
            };
            let res = self.write(&handle, &op);
            let mut q = self.lock();
            match res {
                Err(e) if retryable(&e) => {
                    let msg = e.to_string();
                    if q.failing.as_deref() != Some(&msg) {
                        eprintln!(
                            "tern agent: node {}: writing endpoint records failed ({} queued): {msg}",
                            self.node,
                            q.ops.len()
                        );
                        q.failing = Some(msg);
                    }
                    if q.stopping {
                        eprintln!("tern agent: node {}: {} endpoint writes not done at stop", self.node, q.ops.len());
                        return;
                    }
                    let (_q, _) =
                        self.changed.wait_timeout_while(q, RETRY, |q| !q.stopping).unwrap_or_else(|e| e.into_inner());
                    continue;
                }
                Err(e) => eprintln!("tern agent: node {}: endpoint record of {handle}: dropped: {e}", self.node),
                Ok(()) => {}
            }
            q.ops.pop_front();
            if q.failing.take().is_some() {
                eprintln!("tern agent: node {}: writing endpoint records again", self.node);
            }
            self.changed.notify_all();
        }
    }

    /// Makes [`Endpoints::run_writer`] return once the queue is written (or
    /// the store refuses a write).
    pub fn stop(&self) {
        self.lock().stopping = true;
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for the queue to be written; whether it is.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let q = self.lock();
        let (q, _) =
            self.changed.wait_timeout_while(q, timeout, |q| !q.ops.is_empty()).unwrap_or_else(|e| e.into_inner());
        q.ops.is_empty()
    }

    /// Handles with a write not yet done (the collector counts them as in use).
    pub fn pending_handles(&self) -> HashSet<String> {
        self.lock().ops.iter().map(|(h, _)| h.clone()).collect()
    }

    pub fn pending_count(&self) -> usize {
        self.lock().ops.len()
    }

    /// Writes a minimal record for every handle of the node's blocks (warm
    /// addresses aside) that has none and no queued write. Returns how many
    /// were written. Run once when the agent starts.
    pub fn recover(&self) -> Result<usize, StoreError> {
        let mut held: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for b in list_blocks(&*self.store)? {
            for (ord, handle) in &b.value.handles {
                // The node's pods: its own blocks' addresses not lent to
                // another node, and the addresses it borrowed elsewhere.
                let holder = b.value.borrowed.get(ord).unwrap_or(&b.value.node);
                if *holder == self.node && !crate::is_node_internal(handle) {
                    held.entry(handle.clone()).or_default().push(b.value.block.addr(*ord));
                }
            }
        }
        let (records, unreadable) = list(&*self.store)?;
        let have: HashSet<&str> = records.iter().map(|r| r.value.handle.as_str()).collect();
        let unreadable: HashSet<&str> = unreadable.iter().map(String::as_str).collect();
        let pending = self.pending_handles();
        let mut written = 0;
        for (handle, addresses) in held {
            let key = keys::attachment(&handle)?;
            if have.contains(handle.as_str()) || unreadable.contains(key.as_str()) || pending.contains(&handle) {
                continue;
            }
            let mut rec = EndpointRecord::new(&handle, &self.node, addresses, None);
            rec.recovered = true;
            // Create-if-absent: the writer putting the full record now wins.
            match self.store.create(&key, &encode(&rec), None) {
                Ok(_) => written += 1,
                Err(e) if e.is_conflict() => {}
                Err(e) => return Err(e),
            }
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_json_and_pod_key() {
        let info = EndpointInfo {
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: Some("/run/netns/p".into()),
            pod_namespace: Some("default".into()),
            pod_name: Some("web-0".into()),
        };
        let mut r = EndpointRecord::new("cnet/c1/eth0", "n1", vec!["10.0.0.3".parse().unwrap()], Some(&info));
        r.created_at_ms = 7;
        let s = String::from_utf8(encode(&r)).unwrap();
        assert_eq!(
            s,
            concat!(
                r#"{"handle":"cnet/c1/eth0","node":"n1","addresses":["10.0.0.3"],"containerId":"c1","#,
                r#""interface":"eth0","netns":"/run/netns/p","podNamespace":"default","podName":"web-0","#,
                r#""createdAtMs":7}"#
            )
        );
        assert_eq!(decode("/k", s.as_bytes()).unwrap(), r);
        assert_eq!(r.pod_key().unwrap().as_deref(), Some("/tern/v1/endpoints/default/web-0/eth0"));
        // No pod names, empty strings count as absent.
        let bare = EndpointInfo { pod_namespace: Some(String::new()), ..info.clone() };
        assert_eq!(EndpointRecord::new("h", "n1", vec![], Some(&bare)).pod_key().unwrap(), None);
        assert_eq!(EndpointRecord::new("h", "n1", vec![], None).pod_key().unwrap(), None);
        let bad = EndpointInfo { pod_name: Some("a/b".into()), ..info };
        assert!(EndpointRecord::new("h", "n1", vec![], Some(&bad)).pod_key().is_err());
        // The wire form of the plugin's info: absent fields default.
        let i: EndpointInfo = serde_json::from_str(r#"{"containerId":"c","ifname":"eth0"}"#).unwrap();
        assert_eq!(i.netns, None);
    }
}
