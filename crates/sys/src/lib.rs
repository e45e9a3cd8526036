//! `tern-sys`: the kernel-facing layer of tern.
//!
//! This is the only crate in tern with `unsafe` code or raw kernel I/O:
//!
//! * [`netns`]: network namespace handles, entering a namespace on the
//!   calling thread.
//! * [`netlink`]: a synchronous rtnetlink client (links, addresses, routes).
//! * [`sysctl`]: `/proc/sys` reads and writes.
//! * [`nft`]: nftables through the `nft` binary.
//!
//! Everything is synchronous and cheap to set up, for CNI plugin processes
//! that live a few milliseconds. Namespaces are per thread: see
//! [`netns::NetNs::enter`].

mod error;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod sysctl;

pub use error::{Result, SysError};
pub use netlink::{Family, LinkInfo, Mac, NeighbourInfo, Netlink, RouteInfo, RouteSpec};
pub use netlink::{QdiscInfo, Tbf};
pub use netns::NetNs;
