//! The one error type of the datastore.
//!
//! Callers branch on the variant, never on the text:
//! * [`StoreError::Unavailable`]: the store cannot be reached or used right
//!   now (etcd down or hung past the timeout, the local directory unreadable).
//!   Worth retrying later; the CNI path reports it as code 11 ("try again
//!   later"). For a write, Unavailable means "outcome unknown": a request
//!   that timed out may still be applied (a frozen etcd applies it when it
//!   thaws), so re-read before retrying; conditional writes make the retry
//!   safe (a create that did land comes back as Conflict).
//! * [`StoreError::Conflict`] / [`StoreError::NotFound`]: a conditional write
//!   lost (someone else changed or created the key first, or the key is gone).
//!   Re-read and decide again.
//! * [`StoreError::Corrupt`]: stored bytes that cannot be decoded; names the key.
use crate::Revision;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store is unreachable or unusable (`store` says which one, e.g.
    /// `etcd http://10.0.0.1:2379` or `local /var/lib/tern/store`).
    #[error("datastore {store} unavailable: {detail}")]
    Unavailable { store: String, detail: String },

    /// A compare-and-swap lost: `create` found the key present, or a
    /// revision-guarded write found another revision. `current` is the key's
    /// revision now (0 when unknown).
    #[error("conflict on {key}: it changed (now at revision {current})")]
    Conflict { key: String, current: Revision },

    /// A revision-guarded write or a record lookup found no such key.
    #[error("{key} not found")]
    NotFound { key: String },

    /// The lease does not exist any more (expired, revoked, never granted).
    #[error("lease {0:x} not found (expired or revoked)")]
    LeaseNotFound(i64),

    /// Stored data that cannot be decoded.
    #[error("corrupt data at {key}: {detail}")]
    Corrupt { key: String, detail: String },

    /// A watch asked to start at a revision whose history is gone; list again
    /// and watch from the listing's revision.
    #[error("revision {requested} has been compacted (history starts after {compacted})")]
    Compacted { requested: Revision, compacted: Revision },

    /// The cluster's data uses a key layout this binary does not know.
    #[error("datastore schema version {found} is not supported (this tern supports {supported}); upgrade tern")]
    Schema { found: u32, supported: u32 },

    /// A bad key, prefix, TTL or endpoint from the caller.
    #[error("invalid argument: {0}")]
    Invalid(String),

    /// Anything else the backend reported (quota exceeded, permission denied).
    #[error("datastore {store}: {detail}")]
    Backend { store: String, detail: String },
}

impl StoreError {
    /// Store down or unusable: retry later (CNI code 11).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }

    /// A conditional write lost (Conflict or NotFound): re-read and retry.
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Conflict { .. } | StoreError::NotFound { .. })
    }

    pub(crate) fn corrupt(key: &str, detail: impl std::fmt::Display) -> StoreError {
        StoreError::Corrupt { key: key.to_string(), detail: detail.to_string() }
    }
}
