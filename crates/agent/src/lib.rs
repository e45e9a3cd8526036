//! tern's node agent.
//!
//! [`Agent::start`] does, in order:
//! 1. checks the store's schema and records the node's pools
//!    ([`tern_store::keys::ensure_schema`], [`tern_store::ipam::ensure_pool`]),
//!    repairs the node's affinity index, and loads the node's blocks
//!    ([`ipam::NodeIpam`]): a restarted agent knows every address its pods hold;
//! 2. registers the node at `/tern/v1/nodes/<node>` under a lease of
//!    [`AgentConfig::lease_ttl`] and keeps the lease alive on a thread (every
//!    third of the TTL); if the lease is lost (the store was away longer than
//!    the TTL), it grants a new one and registers again;
//! 3. serves the local API ([`proto`]) on a unix socket, one thread per
//!    connection, every request answered from the one store client the
//!    agent holds (no connection per pod).
//!
//! Dropping the [`Agent`] (or [`Agent::shutdown`]) stops serving, removes the
//! socket and revokes the lease, so the node disappears from
//! `/tern/v1/nodes/` at once; a killed agent's node disappears when the lease
//! runs out.
pub mod ipam;
pub mod proto;
pub mod routing;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tern_store::ipam::{ensure_pool, reconcile_affinities};
use tern_store::{keys, Datastore, LeaseId, StoreError};

pub use ipam::{NodeIpam, OpError, PoolConfig};
use proto::{ErrorKind, Request, Response};

/// Where the agent listens unless told otherwise (tern-ipam's default too).
pub const DEFAULT_SOCKET: &str = "/run/tern/agent.sock";
/// The node lease's default TTL.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct AgentConfig {
    pub node: String,
    pub store: Arc<dyn Datastore>,
    pub socket: PathBuf,
    pub pools: Vec<PoolConfig>,
    pub lease_ttl: Duration,
}

impl AgentConfig {
    /// A configuration with every optional setting at its default; callers
    /// change the public fields they care about.
    pub fn new(
        node: impl Into<String>,
        store: Arc<dyn Datastore>,
        socket: impl Into<PathBuf>,
        pools: Vec<PoolConfig>,
    ) -> Self {
        AgentConfig { node: node.into(), store, socket: socket.into(), pools, lease_ttl: DEFAULT_LEASE_TTL }
    }
}

/// `/tern/v1/nodes/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub name: String,
    pub pools: Vec<ipnet::IpNet>,
    /// Unix seconds the agent started.
    pub started_at: u64,
    pub agent_pid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Op(#[from] OpError),
    #[error("{0}")]
    Ipam(#[from] tern_store::ipam::IpamError),
    #[error("socket {path}: {err}")]
    Socket { path: PathBuf, err: std::io::Error },
}

impl AgentError {
    pub fn is_unavailable(&self) -> bool {
        match self {
            AgentError::Store(e) => e.is_unavailable(),
            AgentError::Op(e) => e.kind == ErrorKind::Unavailable,
            AgentError::Ipam(e) => e.is_unavailable(),
            AgentError::Socket { .. } => false,
        }
    }
}

/// Set once to stop the agent's threads; they wait on it between rounds.
#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    cv: Condvar,
}

impl Stop {
    fn stop(&self) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }

    /// Sleeps up to `d`; whether the agent is stopping.
    fn wait(&self, d: Duration) -> bool {
        let g = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self.cv.wait_timeout_while(g, d, |s| !*s).unwrap_or_else(|e| e.into_inner());
        *g
    }
}

/// A running agent; see the crate docs. Drop stops it.
pub struct Agent {
    node: String,
    store: Arc<dyn Datastore>,
    socket: PathBuf,
    ipam: Arc<NodeIpam>,
    lease: Arc<Mutex<Option<LeaseId>>>,
    stop: Arc<Stop>,
    accepting: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn register(store: &dyn Datastore, key: &str, value: &[u8], ttl: Duration) -> Result<LeaseId, StoreError> {
    let lease = store.grant_lease(ttl)?;
    if let Err(e) = store.put(key, value, Some(lease.id)) {
        let _ = store.revoke_lease(lease.id);
        return Err(e);
    }
    Ok(lease.id)
}

impl Agent {
    pub fn start(config: AgentConfig) -> Result<Agent, AgentError> {
        let AgentConfig { node, store, socket, pools, lease_ttl } = config;
        let node_key = keys::node(&node)?;
        keys::ensure_schema(&*store)?;
        for p in &pools {
            ensure_pool(&*store, &p.pool)?;
        }
        reconcile_affinities(&*store, &node)?;
        let record = NodeRecord {
            name: node.clone(),
            pools: pools.iter().map(|p| p.pool.cidr()).collect(),
            started_at: unix_now(),
            agent_pid: std::process::id(),
        };
        let ipam = Arc::new(NodeIpam::load(store.clone(), &node, pools)?);

        // The socket first: a stale file of a dead agent is replaced, a live agent is not.
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir).map_err(|err| AgentError::Socket { path: socket.clone(), err })?;
        }
        if UnixStream::connect(&socket).is_ok() {
            return Err(AgentError::Socket {
                path: socket.clone(),
                err: std::io::Error::new(std::io::ErrorKind::AddrInUse, "another agent is serving it"),
            });
        }
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).map_err(|err| AgentError::Socket { path: socket.clone(), err })?;

        let value = serde_json::to_vec(&record).expect("node record serialises");
        let lease_id = register(&*store, &node_key, &value, lease_ttl).inspect_err(|_| {
            let _ = std::fs::remove_file(&socket);
        })?;
        let lease = Arc::new(Mutex::new(Some(lease_id)));
        let stop = Arc::new(Stop::default());
        let accepting = Arc::new(AtomicBool::new(true));

        let mut threads = Vec::new();
        {
            let (store, lease, stop) = (store.clone(), lease.clone(), stop.clone());
            let node = node.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("tern-agent-lease".into())
                    .spawn(move || keepalive(&*store, &node, &node_key, &value, lease_ttl, &lease, &stop))
                    .expect("spawn lease thread"),
            );
        }
        {
            let (ipam, accepting) = (ipam.clone(), accepting.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("tern-agent-api".into())
                    .spawn(move || serve(listener, ipam, accepting))
                    .expect("spawn api thread"),
            );
        }
        Ok(Agent { node, store, socket, ipam, lease, stop, accepting, threads })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn ipam(&self) -> &NodeIpam {
        &self.ipam
    }

    /// The lease the node is registered under right now.
    pub fn lease(&self) -> Option<LeaseId> {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stops serving, removes the socket and revokes the lease (the node
    /// record goes with it). Same as drop, with the revoke's outcome.
    pub fn shutdown(mut self) -> Result<(), StoreError> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), StoreError> {
        if self.threads.is_empty() {
            return Ok(());
        }
        self.stop.stop();
        self.accepting.store(false, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = UnixStream::connect(&self.socket);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.socket);
        match self.lease.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(id) => self.store.revoke_lease(id),
            None => Ok(()),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            eprintln!("tern agent: node {}: revoking the lease failed: {e}", self.node);
        }
    }
}

fn keepalive(
    store: &dyn Datastore,
    node: &str,
    key: &str,
    value: &[u8],
    ttl: Duration,
    lease: &Mutex<Option<LeaseId>>,
    stop: &Stop,
) {
    let interval = (ttl / 3).max(Duration::from_millis(200));
    let mut last_error: Option<String> = None;
    while !stop.wait(interval) {
        let cur = *lease.lock().unwrap_or_else(|e| e.into_inner());
        let res = match cur {
            Some(id) => match store.keep_alive(id) {
                Ok(_) => Ok(()),
                Err(StoreError::LeaseNotFound(_)) => {
                    eprintln!("tern agent: node {node}: lease {id} expired, registering again");
                    *lease.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    register(store, key, value, ttl).map(|id| {
                        *lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
                    })
                }
                Err(e) => Err(e),
            },
            None => register(store, key, value, ttl).map(|id| {
                *lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
            }),
        };
        match res {
            Ok(()) => {
                if last_error.take().is_some() {
                    eprintln!("tern agent: node {node}: datastore reachable again, lease renewed");
                }
            }
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_deref() != Some(&msg) {
                    eprintln!("tern agent: node {node}: keeping the node lease alive failed: {msg}");
                }
                last_error = Some(msg);
            }
        }
    }
    // A registration that raced with the stop is revoked by stop_inner via `lease`.
}

fn serve(listener: UnixListener, ipam: Arc<NodeIpam>, accepting: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if !accepting.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else { continue };
        let ipam = ipam.clone();
        let _ = std::thread::Builder::new().name("tern-agent-conn".into()).spawn(move || handle_conn(conn, &ipam));
    }
}

fn handle_conn(conn: UnixStream, ipam: &NodeIpam) {
    let Ok(mut out) = conn.try_clone() else { return };
    let reader = BufReader::new(conn);
    for line in reader.lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(ipam, req),
            Err(e) => Response::error(ErrorKind::Invalid, format!("bad request: {e}")),
        };
        let mut text = serde_json::to_string(&resp).expect("response serialises");
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

/// Answers one API request.
pub fn answer(ipam: &NodeIpam, req: Request) -> Response {
    let fail = |e: OpError| Response::error(e.kind, e.message);
    match req {
        Request::Allocate { handle, pools } => match ipam.allocate(&handle, &pools) {
            Ok(a) => Response { ok: true, addresses: Some(a), ..Default::default() },
            Err(e) => fail(e),
        },
        Request::Release { handle } => match ipam.release(&handle) {
            Ok(a) => Response {
                ok: true,
                known: Some(a.is_some()),
                addresses: Some(a.unwrap_or_default()),
                ..Default::default()
            },
            Err(e) => fail(e),
        },
        Request::Get { handle } => {
            let a = ipam.get(&handle);
            Response {
                ok: true,
                known: Some(a.is_some()),
                addresses: Some(a.unwrap_or_default()),
                ..Default::default()
            }
        }
        Request::Status => Response { ok: true, status: Some(ipam.status()), ..Default::default() },
    }
}
