//! Long-running processes inside a namespace, killed by pid on drop.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::exec::command_in;
use crate::names::{unique, wait_until};
use crate::Netns;

/// (netns name, pgid) of every live ChildGuard, so a Netns dropped first can
/// still kill what was started in it.
static REGISTRY: Mutex<Vec<(String, i32)>> = Mutex::new(Vec::new());

pub(crate) fn kill_registered(ns: &str) {
    let reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    for (_, pgid) in reg.iter().filter(|(n, _)| n == ns) {
        // Still unreaped (the guard waits for it), so the pid can't be reused.
        let _ = killpg(Pid::from_raw(*pgid), Signal::SIGKILL);
    }
}

/// A process started with [`spawn_in`]. On drop its process group (the
/// process and whatever it forked without `setsid`) gets SIGKILL, by pid, and
/// the process is reaped. Its stdout and stderr go to a log file (see
/// [`ChildGuard::log`]), removed on drop.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    log: PathBuf,
    /// Once reaped, its pid may be reused: never signal it again.
    reaped: bool,
}

fn unregister(pid: i32) {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner()).retain(|(_, p)| *p != pid);
}

/// Starts `argv` inside `ns` in the background (stdin from /dev/null).
pub fn spawn_in(ns: &Netns, argv: &[&str]) -> ChildGuard {
    assert!(!argv.is_empty(), "testkit: empty argv");
    let log = PathBuf::from(format!("/tmp/{}.log", unique("tern-test")));
    let f = File::create(&log).unwrap_or_else(|e| panic!("testkit: create {}: {e}", log.display()));
    let f2 = f.try_clone().expect("dup log fd");
    let mut cmd = command_in(ns, argv[0]);
    cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(Stdio::from(f)).stderr(Stdio::from(f2));
    // Hold the registry lock across spawn so the pid is registered before anyone can drop the ns.
    let mut reg = REGISTRY.lock().unwrap_or_else(|e| e.into_inner());
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            drop(reg);
            let _ = std::fs::remove_file(&log);
            panic!("testkit: cannot start `{}` in netns {}: {e}", argv.join(" "), ns.name());
        }
    };
    let pid = child.id() as i32;
    reg.push((ns.name().to_owned(), pid));
    drop(reg);
    ns.track(pid);
    ChildGuard { child, log, reaped: false }
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// Waits up to `timeout` for `needle` to appear in [`ChildGuard::log`].
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    /// Whether the process is still running (reaps it if it exited).
    pub fn running(&mut self) -> bool {
        self.exit_code().is_none()
    }

    /// Exit code if it has exited (128 + signal if killed); reaps it.
    pub fn exit_code(&mut self) -> Option<i32> {
        match self.child.try_wait() {
            Ok(Some(s)) => {
                if !self.reaped {
                    self.reaped = true;
                    unregister(self.child.id() as i32);
                }
                Some(crate::exec::code_of(&s))
            }
            _ => None,
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if !self.reaped {
            let pid = self.child.id() as i32;
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            unregister(pid);
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
