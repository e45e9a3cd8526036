//! The lab's long-running processes (etcd, one agent per node): started
//! detached inside a namespace with `ip netns exec`, recorded by pid *and*
//! start time, and ended only after both still match — a recycled pid is
//! never signalled.
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

/// A process the lab started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProcRef {
    pub pid: u32,
    /// `/proc/<pid>/stat` field 22 (clock ticks since boot).
    pub start_time: u64,
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').map(|i| s[i + 2..].starts_with('Z')))
        .unwrap_or(false)
}

impl ProcRef {
    /// Whether this very process is still running.
    pub fn alive(&self) -> bool {
        start_time(self.pid) == Some(self.start_time) && !is_zombie(self.pid)
    }

    fn signal(&self, sig: Signal) -> bool {
        self.alive() && kill(Pid::from_raw(self.pid as i32), sig).is_ok()
    }

    /// SIGTERM, then SIGKILL after `grace`; waits until it is gone.
    pub fn stop(&self, grace: Duration) {
        if !self.signal(Signal::SIGTERM) {
            return;
        }
        let deadline = Instant::now() + grace;
        while self.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.signal(Signal::SIGKILL) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn kill9(&self) {
        self.signal(Signal::SIGKILL);
    }
}

/// Starts `argv` inside network namespace `netns`, detached (own process
/// group, stdin from /dev/null, output appended to `log`), and returns it
/// once it runs.
pub fn spawn_in(netns: &str, argv: &[String], log: &Path) -> Result<ProcRef> {
    let out =
        File::options().create(true).append(true).open(log).with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", netns]).args(argv);
    cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out).process_group(0);
    let child = cmd.spawn().with_context(|| format!("starting {} in netns {netns}", argv.join(" ")))?;
    let pid = child.id();
    // Not waited for: it outlives this command. Dropping `Child` neither
    // kills nor reaps; the process is reparented when we exit.
    drop(child);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Some(t) = start_time(pid) {
            return Ok(ProcRef { pid, start_time: t });
        }
        if Instant::now() > deadline {
            bail!("{} in netns {netns} exited at once; see {}", argv.join(" "), log.display());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `ready` holds, while `proc` lives; the log's tail on failure.
pub fn wait_ready(
    proc: &ProcRef,
    what: &str,
    log: &Path,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if !proc.alive() || Instant::now() > deadline {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
            let why = if proc.alive() { "is not ready" } else { "exited" };
            proc.stop(Duration::from_secs(1));
            bail!(
                "{what} {why} after {:.1} s; the end of {}:\n{}",
                timeout.as_secs_f64(),
                log.display(),
                tail.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
