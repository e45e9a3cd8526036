//! Throwaway network namespaces for the privileged tests.
//!
//! Every test creates its own namespaces under /run/netns/tsys-<pid>-<n>,
//! and does all its netlink work through sockets opened inside them: the
//! root namespace is never modified. Namespaces are unmounted on drop (also
//! when the test panics); the kernel destroys their links with them.

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use tern_sys::netns::{self, NetNs};
use tern_sys::Netlink;

/// These tests need CAP_SYS_ADMIN / CAP_NET_ADMIN: fail loudly without root.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "tern-sys privileged tests must run as root (they create network namespaces)"
    );
}

pub struct TestNs {
    pub ns: NetNs,
    pub path: PathBuf,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

impl TestNs {
    pub fn new() -> TestNs {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(format!("/run/netns/tsys-{}-{n}", std::process::id()));
        let _ = netns::remove(&path);
        let ns = netns::create(&path).expect("create test netns");
        assert!(!ns.same_as_current().unwrap(), "test netns must not be the current (root) namespace");
        TestNs { ns, path }
    }

    /// A netlink socket inside this namespace.
    pub fn nl(&self) -> Netlink {
        Netlink::in_netns(&self.ns).expect("netlink socket in test netns")
    }

    /// Run `f` on this thread inside the namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> T {
        self.ns.enter(f).expect("enter test netns")
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = netns::remove(&self.path);
    }
}
