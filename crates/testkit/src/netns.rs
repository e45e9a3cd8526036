//! Throwaway named network namespaces.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sched::CloneFlags;

use crate::exec::{command_in, describe, output, TIMEOUT};
use crate::names::{require_root, unique};

/// A network namespace created with `ip netns add` (so it is visible as
/// `/run/netns/<name>` to every tool), with `lo` up.
///
/// Drop (also while panicking): kills the processes this test process started
/// in it that are still running (found by pid: our descendants, or members of
/// process groups the kit started there, whose netns is this one), then
/// `ip netns del`. Links inside go away with the namespace.
#[derive(Debug)]
pub struct Netns {
    name: String,
    path: PathBuf,
    fd: Arc<OwnedFd>,
    ino: u64,
    pgids: Mutex<Vec<i32>>,
}

impl Netns {
    /// Creates `<prefix>-<pid>-<n>` (see [`crate::unique`]). Panics if not root.
    pub fn new(prefix: &str) -> Netns {
        require_root();
        loop {
            let name = unique(prefix);
            let path = Path::new("/run/netns").join(&name);
            if path.exists() {
                // Leftover of a crashed run with a recycled pid: not ours, skip it.
                continue;
            }
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "add", &name]);
            let out = output(cmd, None, TIMEOUT, None, "ip netns add");
            if !out.status.success() {
                panic!("testkit: `ip netns add {name}` failed: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            let file = File::open(&path).unwrap_or_else(|e| panic!("testkit: open {}: {e}", path.display()));
            let ino = file.metadata().expect("stat netns").ino();
            let ns = Netns { name, path, fd: Arc::new(OwnedFd::from(file)), ino, pgids: Mutex::new(Vec::new()) };
            ns.ok("ip link set lo up");
            return ns;
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`: what a runtime passes as `CNI_NETNS`.
    pub fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// The namespace's inode number (as in `/proc/<pid>/ns/net` -> `net:[ino]`).
    pub fn inode(&self) -> u64 {
        self.ino
    }

    pub(crate) fn fd(&self) -> Arc<OwnedFd> {
        self.fd.clone()
    }

    pub(crate) fn track(&self, pgid: i32) {
        self.pgids.lock().unwrap_or_else(|e| e.into_inner()).push(pgid);
    }

    /// A `Command` that runs `program` inside this namespace (as with
    /// `ip netns exec`), for cases the helpers don't cover. Its process is in
    /// its own process group; spawn it yourself and clean it up yourself (or
    /// use [`crate::spawn_in`]).
    pub fn command(&self, program: &str) -> Command {
        command_in(self, program)
    }

    /// Runs `argv` inside the namespace, killing it after [`TIMEOUT`].
    pub fn run(&self, argv: &[&str]) -> Output {
        self.run_timeout(argv, TIMEOUT)
    }

    /// [`Netns::run`] with an explicit timeout.
    pub fn run_timeout(&self, argv: &[&str], timeout: Duration) -> Output {
        assert!(!argv.is_empty(), "testkit: empty argv");
        let mut cmd = command_in(self, argv[0]);
        cmd.args(&argv[1..]);
        let what = format!("`{}` in netns {}", describe(argv), self.name);
        output(cmd, None, timeout, Some(self), &what)
    }

    /// `bash -c script` inside the namespace. Like `$(...)`, it waits until the
    /// script's stdout/stderr close: redirect background jobs
    /// (`cmd >/dev/null 2>&1 &`), or better use [`crate::spawn_in`].
    pub fn sh(&self, script: &str) -> Output {
        self.run(&["bash", "-c", script])
    }

    /// [`Netns::sh`], panicking (with stdout and stderr) unless it succeeds;
    /// returns stdout.
    pub fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        if !out.status.success() {
            panic!(
                "testkit: in netns {}: `{}` failed ({})\n--- stdout\n{}--- stderr\n{}",
                self.name,
                script,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `f` on a new thread that has joined this network namespace (the
    /// caller's thread is untouched), and returns its result; a panic in `f`
    /// is propagated. Sockets created there belong to this namespace for good.
    /// Only the network namespace changes: `/sys` still shows the root's.
    pub fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = self.fd.as_fd();
        let name = &self.name;
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                nix::sched::setns(fd, CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("testkit: setns into {name}: {e}"));
                f()
            });
            match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    /// Names of all links in the namespace (`ip -j link show`).
    ///
    /// Waits (up to 5 s) for tern's detached `tx*` links to be reaped first,
    /// so a DEL's background unregister is not mistaken for a leak, and a
    /// reaper that never finishes shows up as one.
    pub fn links(&self) -> Vec<String> {
        let list = || -> Vec<String> {
            ip_json(self, &["link", "show"]).iter().filter_map(|l| l["ifname"].as_str().map(str::to_owned)).collect()
        };
        crate::wait_until(std::time::Duration::from_secs(5), || {
            !list().iter().any(|n| n.starts_with(crate::inspect::TRASH_PREFIX))
        });
        list()
    }

    /// Global-scope addresses of `ifname` as `addr/prefixlen` strings, IPv4
    /// first (`ip -j addr show dev ifname`); empty if the link is missing.
    pub fn addrs(&self, ifname: &str) -> Vec<String> {
        let out = self.run(&["ip", "-j", "addr", "show", "dev", ifname]);
        if !out.status.success() {
            return Vec::new();
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        let mut res: Vec<(bool, String)> = Vec::new();
        for link in v.as_array().into_iter().flatten() {
            for a in link["addr_info"].as_array().into_iter().flatten() {
                if a["scope"] != "global" {
                    continue;
                }
                if let (Some(local), Some(plen)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
                    res.push((a["family"] == "inet6", format!("{local}/{plen}")));
                }
            }
        }
        res.sort_by_key(|(v6, _)| *v6);
        res.into_iter().map(|(_, a)| a).collect()
    }

    /// Removes the namespace now (for tests that need it gone, e.g. DEL after
    /// the pod's netns disappeared). Panics if removal fails.
    pub fn delete_now(self) {
        drop(self)
    }
}

/// `ip -j <args>` in `ns`, parsed; panics on failure.
pub(crate) fn ip_json(ns: &Netns, args: &[&str]) -> Vec<serde_json::Value> {
    let mut argv = vec!["ip", "-j"];
    argv.extend_from_slice(args);
    let out = ns.run(&argv);
    if !out.status.success() {
        panic!(
            "testkit: `{}` in netns {} failed: {}",
            argv.join(" "),
            ns.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    match serde_json::from_slice::<serde_json::Value>(&out.stdout) {
        Ok(serde_json::Value::Array(v)) => v,
        other => panic!("testkit: `{}`: unexpected output {other:?}", argv.join(" ")),
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let pgids = std::mem::take(&mut *self.pgids.lock().unwrap_or_else(|e| e.into_inner()));
        crate::process::kill_registered(&self.name);
        kill_leftovers(self.ino, &pgids);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "del", &self.name]);
        let out = output(cmd, None, TIMEOUT, None, "ip netns del");
        if self.path.exists() {
            let msg = format!(
                "testkit: could not remove netns {}: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            if std::thread::panicking() {
                eprintln!("{msg}");
            } else {
                panic!("{msg}");
            }
        }
    }
}

/// SIGKILLs, by pid, every process whose netns is `ino` and that this process
/// started: a descendant of ours, or a member of a process group the kit
/// created (which catches orphaned background jobs of `sh` scripts).
fn kill_leftovers(ino: u64, pgids: &[i32]) {
    kill_in_ns(ino, |pgrp, descends_from_me| descends_from_me || pgids.contains(&pgrp));
}

/// SIGKILLs the members of process group `pgid` whose netns is `ino`.
pub(crate) fn kill_group_in_ns(ino: u64, pgid: i32) {
    kill_in_ns(ino, |pgrp, _| pgrp == pgid);
}

/// SIGKILLs each process (other than us) in netns `ino` for which
/// `pick(pgrp, is_our_descendant)` holds.
fn kill_in_ns(ino: u64, pick: impl Fn(i32, bool) -> bool) {
    let me = std::process::id() as i32;
    let want = format!("net:[{ino}]");
    let mut procs: HashMap<i32, (i32, i32)> = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in dir.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid pgrp ...": comm may contain anything, so split after the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if let (Some(ppid), Some(pgrp)) = (f.get(1).and_then(|s| s.parse().ok()), f.get(2).and_then(|s| s.parse().ok()))
        {
            procs.insert(pid, (ppid, pgrp));
        }
    }
    let descends_from_me = |mut pid: i32| {
        for _ in 0..64 {
            match procs.get(&pid) {
                Some(&(ppid, _)) if ppid == me => return true,
                Some(&(ppid, _)) if ppid > 1 => pid = ppid,
                _ => return false,
            }
        }
        false
    };
    for (&pid, &(_, pgrp)) in &procs {
        if pid == me {
            continue;
        }
        match std::fs::read_link(format!("/proc/{pid}/ns/net")) {
            Ok(l) if l.as_os_str() == want.as_str() => {}
            _ => continue,
        }
        if pick(pgrp, descends_from_me(pid)) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}
