//! The CNI specification (0.1.0 to 1.1.0) as plain data: versions, commands,
//! environment, network configuration, results and errors.
//!
//! Invariant: this crate performs no I/O. It turns bytes and environment
//! values into typed requests and typed results back into bytes, so every
//! rule of the spec can be unit-tested without a kernel.
#![forbid(unsafe_code)]

pub mod args;
pub mod config;
pub mod conflist;
pub mod env;
pub mod error;
pub mod result;
mod serde_util;
pub mod validate;
pub mod version;

pub use config::{Attachment, Bandwidth, NetConf, PortMapping, RuntimeConfig};
pub use conflist::NetConfList;
pub use env::{Command, Env};
pub use error::{CniError, Code};
pub use result::{CniResult, Dns, Interface, IpConfig, Route};
pub use version::{select_version, Version};
