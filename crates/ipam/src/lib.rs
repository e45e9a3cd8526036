//! IPAM for tern, compatible with the reference `host-local` and `static`
//! plugins.
//!
//! Invariant: no file or kernel I/O here. Reservations go through the
//! [`Store`] trait; the on-disk store (byte-exact with host-local, so both
//! can share one `dataDir`) lives in `tern-plugins`. Everything here is
//! tested against [`MemStore`].
//!
//! Error codes: invalid configuration is 7 (the reference says 999),
//! malformed CNI_ARGS 4, allocation failures 999 with the reference's
//! messages, STATUS exhaustion 50.
#![forbid(unsafe_code)]

pub mod allocator;
pub mod block;
pub mod config;
pub mod range;
pub mod resolv;
pub mod static_alloc;
pub mod store;

pub use allocator::{allocate, check, find, gc, gc_victims, release, status};
pub use config::{HostLocalConfig, DEFAULT_DATA_DIR};
pub use range::{Range, RangeConf, RangeSet};
pub use resolv::parse_resolv_conf;
pub use static_alloc::StaticConfig;
pub use store::{owned_by, owned_by_legacy, owner_text, Locked, MemStore, Reservation, Store};
