//! Test kit for tern's privileged integration tests.
//!
//! Every test that touches networking builds its own little world out of
//! throwaway network namespaces and tears it down again, so tests can run in
//! parallel, in any order, on a developer's machine or in CI, without touching
//! the host's network.
//!
//! # Isolation rules
//!
//! * **Never the root namespace.** Plugins run inside a throwaway "node"
//!   namespace ([`Netns`]) that the test creates; pods are further namespaces.
//!   [`exec_plugin`] starts the plugin process *inside* the node namespace, so
//!   everything the plugin creates (bridges, veth host ends, routes, nft tables,
//!   sysctls under `/proc/sys/net`) lands there and disappears with it.
//! * **Unique names.** [`unique`] / [`unique_short`] give `prefix-<pid>-<n>`
//!   names: unique across the tests of one process (a global counter) and
//!   across concurrent test processes (the pid). No test may depend on another
//!   test's leftovers, nor on a fixed name.
//! * **Guards clean up on drop and on panic.** [`Netns`], [`TempDir`],
//!   [`Plugins`] and [`ChildGuard`] remove what they created in `Drop`, which
//!   also runs while a failing test unwinds. A netns guard first kills the
//!   processes this test process started in that namespace (by pid, never by
//!   name), then runs `ip netns del`. If the removal itself fails, the guard
//!   panics (unless the thread is already panicking), so leaks fail tests.
//! * **Traffic stays inside.** Only send traffic to addresses inside
//!   namespaces the test created ([`tcp_ok`] does exactly that).
//! * **Fail, don't skip.** Privileged tests call [`require_root`] (Netns does it
//!   for you), which panics with a clear message when not run as root.
//! * **Every external command has a timeout** ([`TIMEOUT`] by default); on
//!   expiry the command's process group is killed and the output says so.
//!
//! # Example
//!
//! ```no_run
//! use tern_testkit::*;
//! let node = Netns::new("node");
//! let pod = Netns::new("pod");
//! // In crates/tern/tests/*.rs: Path::new(env!("CARGO_BIN_EXE_tern")).
//! let plugins = Plugins::new(std::path::Path::new("target/release/tern"));
//! let conf = r#"{"cniVersion":"1.0.0","name":"t","type":"tern"}"#;
//! let add = exec_plugin(&node, &plugins, "tern", "ADD", "c1", Some(&pod.path()), "eth0", "", conf);
//! add.assert_ok();
//! assert!(veth_links(&node, "").len() <= 1);
//! ```
//!
//! Commands run through [`Netns::run`], [`Netns::sh`], [`exec_plugin`] and
//! [`spawn_in`] enter the namespace the way `ip netns exec` does (setns into the
//! netns plus a private mount namespace with that netns's own `/sys`), but
//! without the extra `ip` process. Closures run with [`Netns::enter`] only
//! switch the network namespace of a fresh thread: `/sys/class/net` there still
//! shows the root namespace, so read link state with `ip` via `run`/`sh`.

mod exec;
mod inspect;
mod names;
mod netns;
mod plugin;
mod process;
mod tcp;

pub use exec::TIMEOUT;
pub use inspect::{nft_elements, nft_tables, reservations, veth_links, TRASH_PREFIX};
pub use names::{require_root, unique, unique_short, wait_until, TempDir};
pub use netns::Netns;
pub use plugin::{exec_plugin, exec_plugin_env, PluginRun, Plugins, REFERENCE_CNI_DIR};
pub use process::{spawn_in, ChildGuard};
pub use tcp::{tcp_ok, tcp_ok_within};
mod etcd;
pub use etcd::{Etcd, ETCD_BIN};
