//! tern's datastore: one small synchronous interface, [`Datastore`], with
//! two implementations, and the cluster-IPAM operations built on it.
//!
//! * [`LocalStore`] (`local:DIR`): embedded, a directory on the node; the
//!   single-node default. Safe across threads and processes (flock).
//! * [`EtcdStore`] (`etcd:URL[,URL]`): etcd v3 through `etcd-client`;
//!   transactions for compare-and-swap, native leases and watches. The sync
//!   facade drives a private tokio runtime thread, every call is bounded by a
//!   timeout, and an unreachable etcd is [`StoreError::Unavailable`], never a
//!   hang.
//!
//! The model is etcd's, so both behave alike (the conformance suite in
//! `tests/` runs unchanged against both):
//! * keys are strings starting with `/`; values are bytes (JSON by convention,
//!   see [`keys`] for the layout);
//! * every write gets a store-wide, strictly increasing [`Revision`]; a key's
//!   [`KeyValue::revision`] is the revision of its last write, and the
//!   conditional writes ([`Datastore::create`], [`Datastore::compare_and_swap`],
//!   [`Datastore::delete_if_revision`]) compare against it;
//! * a key written with a lease disappears (a delete event) when the lease
//!   expires or is revoked;
//! * [`Datastore::watch`] delivers puts and deletes under a prefix, in
//!   revision order, from a start revision on, so "list, then watch from
//!   `listing.revision + 1`" misses nothing.
//!
//! Everything here is blocking; an async caller (the agent) runs these calls
//! on a blocking thread (`spawn_blocking`) or a dedicated thread.
pub mod error;
pub mod etcd;
pub mod ipam;
pub mod keys;
pub mod local;

use std::fmt;
use std::str::FromStr;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

pub use error::{Result, StoreError};
pub use etcd::{EtcdOptions, EtcdStore};
pub use local::{LocalOptions, LocalStore};

/// etcd's revision: store-wide, strictly increasing, never reused.
pub type Revision = i64;

/// A lease: keys put with it are deleted when it expires or is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LeaseId(pub i64);

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

/// A granted lease. `ttl` is what the store granted, which may be longer
/// than asked: etcd raises TTLs to its minimum (2 s with default settings)
/// and both stores count in whole seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: LeaseId,
    pub ttl: Duration,
}

/// One key as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the last write of this key (etcd's `mod_revision`).
    pub revision: Revision,
    /// Revision at which the key was (last) created.
    pub create_revision: Revision,
    pub lease: Option<LeaseId>,
}

/// The keys under a prefix, sorted by key, and the store revision they were
/// read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub kvs: Vec<KeyValue>,
    pub revision: Revision,
}

/// A change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete { key: String, revision: Revision },
}

impl WatchEvent {
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }

    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.revision,
            WatchEvent::Delete { revision, .. } => *revision,
        }
    }
}

/// The interface cluster IPAM and node registration use. Implementations
/// are cheap to share (`Arc<dyn Datastore>`) and safe to call from many
/// threads at once.
pub trait Datastore: Send + Sync {
    /// What the store is, for messages (`etcd http://127.0.0.1:2379`,
    /// `local /var/lib/tern/store`).
    fn describe(&self) -> String;

    /// The key's value and revision, `None` if absent.
    fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Every key starting with `prefix` (`""`: all), sorted by key.
    fn list(&self, prefix: &str) -> Result<Listing>;

    /// Writes unconditionally (replacing any lease with `lease`); returns the
    /// new revision.
    fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision>;

    /// Writes only if the key is absent; [`StoreError::Conflict`] otherwise.
    fn create(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision>;

    /// Writes only if the key's revision is `expected`:
    /// [`StoreError::Conflict`] if it is another, [`StoreError::NotFound`] if
    /// the key is gone.
    fn compare_and_swap(&self, key: &str, expected: Revision, value: &[u8], lease: Option<LeaseId>)
        -> Result<Revision>;

    /// Deletes unconditionally; whether the key existed.
    fn delete(&self, key: &str) -> Result<bool>;

    /// Deletes only if the key's revision is `expected` (errors as
    /// [`Datastore::compare_and_swap`]).
    fn delete_if_revision(&self, key: &str, expected: Revision) -> Result<()>;

    /// A new lease of (at least) `ttl`, rounded up to whole seconds.
    fn grant_lease(&self, ttl: Duration) -> Result<Lease>;

    /// Renews the lease for its full TTL; returns the TTL.
    /// [`StoreError::LeaseNotFound`] once it has expired.
    fn keep_alive(&self, lease: LeaseId) -> Result<Duration>;

    /// Ends the lease now, deleting its keys. Revoking an unknown or expired
    /// lease is not an error.
    fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// Changes under `prefix` from revision `start` on (`None`: from now).
    /// When the call returns, the watch is established: later writes are
    /// delivered. A start revision older than the kept history is
    /// [`StoreError::Compacted`], returned by this call (LocalStore) or as the
    /// watch's first and only event (etcd confirms such a watch before it
    /// cancels it): either way, list again. The watch ends (with a final error event)
    /// when the store becomes unreachable; dropping it stops it.
    fn watch(&self, prefix: &str, start: Option<Revision>) -> Result<Watch>;
}

/// A stream of [`WatchEvent`]s. Blocking iteration (`for ev in watch`) ends
/// after a final `Err` (store unreachable, history compacted) or when the
/// store side closed. Dropping the watch cancels it.
pub struct Watch {
    rx: Receiver<Result<WatchEvent>>,
    _cancel: Box<dyn Send>,
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Watch")
    }
}

impl Watch {
    pub(crate) fn new(rx: Receiver<Result<WatchEvent>>, cancel: Box<dyn Send>) -> Watch {
        Watch { rx, _cancel: cancel }
    }

    /// The next event within `timeout`: `None` if nothing came; after the
    /// watch ended, `Some(Err(Unavailable))` every time.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<Result<WatchEvent>> {
        match self.rx.recv_timeout(timeout) {
            Ok(ev) => Some(ev),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                Some(Err(StoreError::Unavailable { store: "watch".into(), detail: "the watch has ended".into() }))
            }
        }
    }

    /// Everything already delivered, without waiting.
    pub fn drain(&self) -> Vec<Result<WatchEvent>> {
        self.rx.try_iter().collect()
    }
}

impl Iterator for Watch {
    type Item = Result<WatchEvent>;

    fn next(&mut self) -> Option<Result<WatchEvent>> {
        self.rx.recv().ok()
    }
}

/// Where the datastore is, as written in configs and on the command line:
/// `local:DIR` or `etcd:URL[,URL...]` (URLs `http://host:port`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatastoreSpec {
    Local(std::path::PathBuf),
    Etcd(Vec<String>),
}

/// The local store's default directory.
pub const DEFAULT_LOCAL_DIR: &str = "/var/lib/tern/store";

impl FromStr for DatastoreSpec {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<DatastoreSpec> {
        let s = s.trim();
        if let Some(dir) = s.strip_prefix("local:") {
            if dir.is_empty() {
                return Err(StoreError::Invalid("local: needs a directory (local:/var/lib/tern/store)".into()));
            }
            return Ok(DatastoreSpec::Local(dir.into()));
        }
        if let Some(urls) = s.strip_prefix("etcd:") {
            let eps: Vec<String> = urls.split(',').map(|u| u.trim().to_string()).filter(|u| !u.is_empty()).collect();
            if eps.is_empty() {
                return Err(StoreError::Invalid("etcd: needs at least one URL (etcd:http://10.0.0.1:2379)".into()));
            }
            for e in &eps {
                if !e.starts_with("http://") {
                    return Err(StoreError::Invalid(format!(
                        "etcd endpoint {e:?}: only http:// URLs are supported (no TLS yet)"
                    )));
                }
            }
            return Ok(DatastoreSpec::Etcd(eps));
        }
        Err(StoreError::Invalid(format!("datastore {s:?}: expected local:DIR or etcd:URL[,URL]")))
    }
}

impl fmt::Display for DatastoreSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatastoreSpec::Local(d) => write!(f, "local:{}", d.display()),
            DatastoreSpec::Etcd(eps) => write!(f, "etcd:{}", eps.join(",")),
        }
    }
}

impl DatastoreSpec {
    /// Opens the store with default options. Opening etcd does not contact
    /// it: an etcd that is down shows up as `Unavailable` on the first call.
    pub fn open(&self) -> Result<Arc<dyn Datastore>> {
        Ok(match self {
            DatastoreSpec::Local(dir) => Arc::new(LocalStore::open(dir)?),
            DatastoreSpec::Etcd(eps) => Arc::new(EtcdStore::connect(eps, EtcdOptions::default())?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parse() {
        assert_eq!("local:/x".parse::<DatastoreSpec>().unwrap(), DatastoreSpec::Local("/x".into()));
        assert_eq!(
            "etcd:http://a:2379, http://b:2379".parse::<DatastoreSpec>().unwrap(),
            DatastoreSpec::Etcd(vec!["http://a:2379".into(), "http://b:2379".into()])
        );
        assert!("etcd:".parse::<DatastoreSpec>().is_err());
        assert!("etcd:https://a:2379".parse::<DatastoreSpec>().is_err());
        assert!("local:".parse::<DatastoreSpec>().is_err());
        assert!("consul:x".parse::<DatastoreSpec>().is_err());
        assert_eq!(
            "etcd:http://a:1,http://b:2".parse::<DatastoreSpec>().unwrap().to_string(),
            "etcd:http://a:1,http://b:2"
        );
    }
}
