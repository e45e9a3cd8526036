//! Helpers for the cluster-IPAM and agent tests (300–330): `tern agent`
//! processes started and killed by pid, a client of the test's etcd, and
//! the plugin configs that use the cluster allocator.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tern_store::{keys, Datastore, EtcdOptions, EtcdStore};
use tern_testkit::{wait_until, Etcd, TempDir};

pub fn tern_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tern"))
}

const START: Duration = Duration::from_secs(20);

/// A `tern agent` in the test's own namespace; SIGKILLed by pid and reaped
/// on drop.
pub struct AgentProc {
    child: Option<Child>,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub node: String,
}

impl AgentProc {
    /// Starts `tern agent <args>` (log `<dir>/<label>.log`, appended to
    /// across restarts) and waits until it logs that it serves, or exits.
    pub fn spawn(dir: &TempDir, label: &str, socket: PathBuf, args: &[&str]) -> AgentProc {
        let log = dir.join(format!("{label}.log"));
        let before = std::fs::read_to_string(&log).unwrap_or_default().matches("ready on").count();
        let f = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        let child = Command::new(tern_bin())
            .arg("agent")
            .args(args)
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .expect("spawn tern agent");
        let mut a = AgentProc { child: Some(child), socket, log, node: label.to_string() };
        wait_until(START, || a.log_text().matches("ready on").count() > before || !a.running());
        a
    }

    /// The agent of `node` on `datastore` with its socket and journal in
    /// `dir` (never in /run or /var/lib), plus `extra` flags; panics unless
    /// it serves.
    pub fn start(dir: &TempDir, node: &str, datastore: &str, extra: &[&str]) -> AgentProc {
        let socket = dir.join(format!("{node}.sock"));
        let state = dir.join(format!("state-{node}"));
        let mut args = vec![
            "--node",
            node,
            "--datastore",
            datastore,
            "--socket",
            socket.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut a = AgentProc::spawn(dir, node, socket.clone(), &args);
        assert!(a.running(), "agent {node} did not start:\n{}", a.log_text());
        a
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits for an agent that is expected to exit by itself; its exit code.
    pub fn wait_exit(&mut self) -> Option<i32> {
        let ok = wait_until(START, || !self.running());
        assert!(ok, "agent still running:\n{}", self.log_text());
        self.child.take().unwrap().wait().unwrap().code()
    }

    /// Sends `sig` and waits for the exit; the exit code (None if killed by a signal).
    pub fn signal_and_wait(&mut self, sig: Signal) -> Option<i32> {
        kill(Pid::from_raw(self.pid() as i32), sig).unwrap();
        self.child.take().unwrap().wait().unwrap().code()
    }

    pub fn kill9(&mut self) {
        self.signal_and_wait(Signal::SIGKILL);
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
            let _ = c.wait();
        }
    }
}

pub fn etcd_store(etcd: &Etcd) -> Arc<dyn Datastore> {
    Arc::new(EtcdStore::connect(&etcd.endpoints(), EtcdOptions::default()).unwrap())
}

/// Names of the nodes registered in the store.
pub fn nodes_in(store: &dyn Datastore) -> Vec<String> {
    store
        .list(keys::NODES)
        .unwrap()
        .kvs
        .iter()
        .filter_map(|kv| keys::name_under(keys::NODES, &kv.key))
        .map(String::from)
        .collect()
}

/// Network `net`: the `tern` plugin with addresses from the cluster allocator.
pub fn cluster_conf(net: &str, socket: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.1.0", "name": net, "type": "tern",
        "ipam": {"type": "tern-ipam", "allocator": "cluster", "agentSocket": socket}
    })
    .to_string()
}

/// The agent's handle for container `cid` of network `net` on eth0.
pub fn cluster_handle(net: &str, cid: &str) -> String {
    format!("{net}/{cid}/eth0")
}
