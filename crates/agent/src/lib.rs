//! tern's node agent.
//!
//! [`Agent::start`] does, in order:
//! 1. checks the store's schema and records the node's pools
//!    ([`tern_store::keys::ensure_schema`], [`tern_store::ipam::ensure_pool`]),
//!    repairs the node's affinity index, and loads the node's blocks
//!    ([`ipam::NodeIpam`]): a restarted agent knows every address its pods hold;
//!    the node-local journal ([`journal`], under [`AgentConfig::state_dir`])
//!    of changes answered but not yet written to the store (warm-pool
//!    assignments, releases while the store was down) is replayed over them;
//! 2. registers the node at `/tern/v1/nodes/<node>` under a lease of
//!    [`AgentConfig::lease_ttl`] and keeps the lease alive on a thread (every
//!    third of the TTL); if the lease is lost (the store was away longer than
//!    the TTL), it grants a new one and registers again;
//! 3. serves the local API ([`proto`]) on a unix socket, one thread per
//!    connection, every request answered from the one store client the
//!    agent holds (no connection per pod).
//!
//! 4. runs the IPAM reconciler ([`warm`]): it writes journaled changes to
//!    the store (each exactly once in effect: an op checks the block before
//!    changing it), keeps the warm pool at [`AgentConfig::warm`]'s targets,
//!    and notices when an unreachable store is back. With a warm pool an ADD
//!    is answered from node-local state and never waits for the store; while
//!    the store is down, ADDs the pool cannot serve fail as `unavailable`
//!    (CNI 11) naming the store, and DELs succeed and are applied later.
//!
//! 5. records every allocation's endpoint ([`endpoints`]: by handle, and by
//!    pod when the plugin sent `K8S_POD_NAMESPACE`/`K8S_POD_NAME`) and deletes
//!    it on release, through a queue a writer thread applies in order (so no
//!    ADD waits for it); and runs the collector ([`gc`], every
//!    [`AgentConfig::gc`] interval): empty blocks and dead nodes' blocks
//!    released, leaked addresses freed, each after its grace period and a
//!    re-check.
//!
//! Dropping the [`Agent`] (or [`Agent::shutdown`]) stops serving, removes the
//! socket and revokes the lease, so the node disappears from
//! `/tern/v1/nodes/` at once; a killed agent's node disappears when the lease
//! runs out.
pub mod endpoints;
pub mod gc;
pub mod ipam;
pub mod journal;
pub mod proto;
pub mod routing;
pub mod warm;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tern_store::ipam::{ensure_pool, reconcile_affinities};
use tern_store::{keys, Datastore, LeaseId, StoreError};

pub use endpoints::{EndpointInfo, EndpointRecord, Endpoints};
pub use gc::{GcConfig, GcReport};
pub use ipam::{IpamOptions, NodeIpam, OpError, PoolConfig};
use proto::{ErrorKind, Request, Response};
pub use warm::{WarmConfig, WARM_HANDLE_PREFIX};

/// Whether `handle` is one of a node's own addresses rather than a pod's:
/// its warm pool (`@warm/<node>/...`) or its VXLAN tunnel address
/// (`@tunnel/<node>`). CNI handles start with the network name, which
/// cannot start with `@`; the leak collector never frees these while their
/// node lives.
pub fn is_node_internal(handle: &str) -> bool {
    handle.starts_with('@')
}

/// Where the agent listens unless told otherwise (tern-ipam's default too).
pub const DEFAULT_SOCKET: &str = "/run/tern/agent.sock";
/// The node lease's default TTL.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// Where the agent keeps node-local state (the IPAM journal) by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/tern/agent";

#[derive(Clone)]
pub struct AgentConfig {
    pub node: String,
    pub store: Arc<dyn Datastore>,
    pub socket: PathBuf,
    pub pools: Vec<PoolConfig>,
    pub lease_ttl: Duration,
    /// The warm pool's targets (default 0/0: no warm pool).
    pub warm: WarmConfig,
    /// Node-local state: the IPAM journal (default [`DEFAULT_STATE_DIR`]).
    pub state_dir: PathBuf,
    /// Never borrow addresses from other nodes' blocks (default false).
    pub strict_affinity: bool,
    /// The collector's interval and grace periods ([`GcConfig::default`]).
    pub gc: GcConfig,
    /// Cross-node routing ([`routing`]); `None`: this node routes nothing
    /// to other nodes (a single-node cluster).
    pub routing: Option<routing::RoutingConfig>,
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
        AgentConfig {
            node: node.into(),
            store,
            socket: socket.into(),
            pools,
            lease_ttl: DEFAULT_LEASE_TTL,
            warm: WarmConfig::default(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            strict_affinity: false,
            gc: GcConfig::default(),
            routing: None,
        }
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
    #[error("cross-node routing: {0}")]
    Routing(String),
}

impl AgentError {
    pub fn is_unavailable(&self) -> bool {
        match self {
            AgentError::Store(e) => e.is_unavailable(),
            AgentError::Op(e) => e.kind == ErrorKind::Unavailable,
            AgentError::Ipam(e) => e.is_unavailable(),
            AgentError::Socket { .. } | AgentError::Routing(_) => false,
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

    fn is_stopped(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner())
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
    endpoints: Arc<Endpoints>,
    lease: Arc<Mutex<Option<LeaseId>>>,
    stop: Arc<Stop>,
    accepting: Arc<AtomicBool>,
    /// A handle on the API socket, to wake its accept loop at stop.
    listener: Option<UnixListener>,
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
        let AgentConfig { node, store, socket, pools, lease_ttl, warm, state_dir, strict_affinity, gc, routing } =
            config;
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
        let ipam_opts = IpamOptions { warm, strict_affinity, state_dir: Some(state_dir) };
        let pool_cidrs: Vec<ipnet::IpNet> = pools.iter().map(|p| p.pool.cidr()).collect();
        let ipam = Arc::new(NodeIpam::open(store.clone(), &node, pools, ipam_opts)?);
        // Cross-node routing is set up before the node registers, so peers
        // never see a half-made node. The VTEP's tunnel addresses come from
        // the node's own blocks (idempotent per handle: a restart keeps them).
        let router = match routing {
            Some(cfg) => Some(
                routing::setup(&*store, &node, cfg, &pool_cidrs, || {
                    ipam.allocate(&routing::tunnel_handle(&node), &[])
                        .map(|a| a.into_iter().map(|a| a.address).collect())
                        .map_err(|e| format!("tunnel address: {e}"))
                })
                .map_err(AgentError::Routing)?,
            ),
            None => None,
        };

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
        let listener_handle = listener.try_clone().ok();

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
        let endpoints = Arc::new(Endpoints::new(store.clone(), &node));
        {
            let (ipam, endpoints, accepting) = (ipam.clone(), endpoints.clone(), accepting.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("tern-agent-api".into())
                    .spawn(move || serve(listener, ipam, endpoints, accepting))
                    .expect("spawn api thread"),
            );
        }
        {
            // The collector thread stops the writer when it ends.
            let (store, endpoints, stop, node) = (store.clone(), endpoints.clone(), stop.clone(), node.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("tern-agent-gc".into())
                    .spawn(move || gc::run_loop(&*store, &node, &gc, &endpoints, &|d| stop.wait(d)))
                    .expect("spawn gc thread"),
            );
        }
        {
            let endpoints = endpoints.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("tern-agent-endpoints".into())
                    .spawn(move || endpoints.run_writer())
                    .expect("spawn endpoint writer thread"),
            );
        }
        threads.push(warm::spawn(ipam.clone()));
        if let Some(mut router) = router {
            let (store, stop, node) = (store.clone(), stop.clone(), node.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("tern-agent-routing".into())
                    .spawn(move || routing::run(&*store, &node, &mut router, &|| stop.is_stopped()))
                    .expect("spawn routing thread"),
            );
        }
        Ok(Agent { node, store, socket, ipam, endpoints, lease, stop, accepting, listener: listener_handle, threads })
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

    /// The endpoint record writer (its queue of writes the store did not take).
    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
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
        self.ipam.stop_background();
        self.accepting.store(false, Ordering::SeqCst);
        // Wake the accept loop: shutting the listening socket down fails
        // its accept() at once, even when the socket file was removed
        // behind our back (a connect to the path would then never arrive).
        if let Some(l) = &self.listener {
            let _ = nix::sys::socket::shutdown(l.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
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

fn serve(listener: UnixListener, ipam: Arc<NodeIpam>, endpoints: Arc<Endpoints>, accepting: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if !accepting.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else { continue };
        let (ipam, endpoints) = (ipam.clone(), endpoints.clone());
        let _ = std::thread::Builder::new()
            .name("tern-agent-conn".into())
            .spawn(move || handle_conn(conn, &ipam, &endpoints));
    }
}

fn handle_conn(conn: UnixStream, ipam: &NodeIpam, endpoints: &Endpoints) {
    let Ok(mut out) = conn.try_clone() else { return };
    let reader = BufReader::new(conn);
    for line in reader.lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer_and_record(ipam, endpoints, req),
            Err(e) => Response::error(ErrorKind::Invalid, format!("bad request: {e}")),
        };
        let mut text = serde_json::to_string(&resp).expect("response serialises");
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

/// [`answer`], keeping the endpoint records in step: written after a
/// successful allocate, deleted after a successful release, both queued
/// for the endpoint writer before the answer goes out ([`endpoints`]).
pub fn answer_and_record(ipam: &NodeIpam, endpoints: &Endpoints, req: Request) -> Response {
    let record = match &req {
        Request::Allocate { handle, endpoint, .. } => Some((handle.clone(), Some(endpoint.clone()))),
        Request::Release { handle } => Some((handle.clone(), None)),
        _ => None,
    };
    let resp = answer(ipam, req);
    if resp.ok {
        match record {
            Some((handle, Some(info))) => {
                let addrs: Vec<std::net::IpAddr> = resp.addresses.iter().flatten().map(|a| a.address).collect();
                endpoints.allocated(&handle, info.as_ref(), &addrs);
            }
            Some((handle, None)) => endpoints.released(&handle),
            None => {}
        }
    }
    resp
}

/// Answers one API request.
pub fn answer(ipam: &NodeIpam, req: Request) -> Response {
    let fail = |e: OpError| Response::error(e.kind, e.message);
    match req {
        Request::Allocate { handle, pools, .. } => match ipam.allocate(&handle, &pools) {
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
