//! Unique names, the root check, temp dirs, polling.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn next() -> u64 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// Panics with a clear message unless running as uid 0.
///
/// Privileged tests must fail, not skip, when they cannot run.
pub fn require_root() {
    if !nix::unistd::geteuid().is_root() {
        panic!(
            "this test needs root (uid 0): it creates network namespaces. \
             Run the suite as root, e.g. `sudo make test` or `sudo -E cargo test`."
        );
    }
}

/// `prefix-<pid>-<n>`: unique within this process (global counter) and across
/// concurrent processes (pid). Fine for netns names and paths; may be longer
/// than 15 characters, so use [`unique_short`] for link names.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), next())
}

/// Like [`unique`] but at most 15 characters (IFNAMSIZ - 1), usable as a link
/// name: `prefix-<pid base36>-<n base36>`, with the prefix truncated as needed.
/// Uniqueness comes from the pid and the counter, never from the prefix.
pub fn unique_short(prefix: &str) -> String {
    let suffix = format!("{}-{}", base36(std::process::id() as u64), base36(next()));
    let room = 15usize.saturating_sub(suffix.len() + 1);
    let p: String = prefix
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_' || *c == '.')
        .take(room)
        .collect();
    if p.is_empty() {
        suffix
    } else {
        format!("{p}-{suffix}")
    }
}

fn base36(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).expect("ascii")
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes; returns
/// whether it became true.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A unique directory `/tmp/tern-test-<pid>-<n>`, removed (recursively) on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        loop {
            let path = PathBuf::from(format!("/tmp/{}", unique("tern-test")));
            match std::fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                // A leftover of a crashed run whose pid was recycled: leave it, take the next.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("testkit: cannot create {}: {e}", path.display()),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(p)`.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("testkit: cannot remove {}: {e}", self.path.display());
            }
        }
    }
}
