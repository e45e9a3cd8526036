//! Test-only fault injection: `TERN_TEST_KILL_AT=<step>` makes the plugin
//! SIGKILL itself when it reaches `<step>`, so tests can prove that DEL or GC
//! after a crash at any step leaves nothing behind. Costs one env lookup per
//! invocation when unset.
use std::sync::OnceLock;

static KILL_AT: OnceLock<Option<String>> = OnceLock::new();

/// Every step name ADD passes, in order (tests iterate over these).
pub const ADD_STEPS: &[&str] = &[
    "ipam",
    "bridge",
    "veth",
    "host-link",
    "pod-link",
    "pod-addr",
    "pod-routes",
    "host-routes",
    "masq",
    "spoof",
    "result",
];

pub fn point(step: &str) {
    let target = KILL_AT.get_or_init(|| std::env::var("TERN_TEST_KILL_AT").ok().filter(|s| !s.is_empty()));
    if target.as_deref() == Some(step) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
