//! Cluster IPAM in the benches: a throwaway etcd and `tern agent`s for
//! `tern bench cni`'s `tern-cluster` dataplane, and `tern bench ipam`
//! (allocations per second with several agents on one etcd).
//!
//! etcd (Debian's etcd-server) runs on free 127.0.0.1 ports with its data in
//! the bench's work directory, the agents in the bench's own network
//! namespace with their sockets there too; the plugins reach an agent
//! through its socket file from any namespace. Without `/usr/bin/etcd` the
//! agents share a `local:` store in the work directory instead, and the
//! report says so.
//!
//! These servers are started detached (`sh -c '... & echo $!'`), so they
//! are not the bench's children: `bench cni` is the child subreaper of the
//! plugins and waits until it has no children left to know that a DEL's
//! background work is done, which a long-running child would prevent. They
//! are stopped by pid ([`Service`]'s drop: SIGTERM, then SIGKILL), before
//! the workspace removes their directory.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use super::{check_interrupt, interrupted, median, percentile, print_table, round_to};
use super::{Machine, SignalGuard, Workspace};

/// Where Debian's etcd-server installs the server.
pub(crate) const ETCD_BIN: &str = "/usr/bin/etcd";
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A server process started detached; stopped by pid on drop.
pub(crate) struct Service {
    what: String,
    pid: i32,
    log: PathBuf,
}

impl Service {
    /// Runs `argv` in the background with output to `log`, not as our child
    /// (see the module docs).
    fn spawn_detached(what: &str, argv: &[String], log: &Path) -> Result<Service> {
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(r#"log="$1"; shift; "$@" </dev/null >"$log" 2>&1 & echo $!"#)
            .arg("sh")
            .arg(log)
            .args(argv)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .with_context(|| format!("starting {what}"))?;
        let pid: i32 = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| anyhow!("starting {what}: no pid from the shell ({})", out.status))?;
        Ok(Service { what: what.to_string(), pid, log: log.to_path_buf() })
    }

    /// Running, and not a zombie waiting for its (new) parent to reap it.
    pub fn alive(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) {
            Ok(stat) => stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next()) != Some("Z"),
            Err(_) => false,
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// SIGTERM (an agent then deregisters its node), SIGKILL after a while.
    fn stop(&mut self) {
        if self.pid <= 0 {
            return;
        }
        let pid = Pid::from_raw(self.pid);
        if self.alive() && kill(pid, Signal::SIGTERM).is_ok() {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while self.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if self.alive() {
                eprintln!("tern bench: {} (pid {}) ignored SIGTERM: killing it", self.what, self.pid);
                let _ = kill(pid, Signal::SIGKILL);
                let deadline = Instant::now() + STOP_TIMEOUT;
                while self.alive() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        self.pid = 0;
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Whether `GET /health` on `addr` says healthy.
fn etcd_healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = s.set_write_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n").is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

/// A throwaway single-member etcd on loopback.
pub(crate) struct Etcd {
    pub endpoint: String,
    _service: Service,
}

impl Etcd {
    /// Starts etcd with its data under `dir`; `None` if etcd-server is not installed.
    pub fn start(dir: &Path) -> Result<Option<Etcd>> {
        if !Path::new(ETCD_BIN).exists() {
            return Ok(None);
        }
        let mut last = String::new();
        // A free port can be taken before etcd binds it: then it exits and we try others.
        for attempt in 0..5 {
            let (client, peer) = (free_port()?, free_port()?);
            if client == peer {
                continue;
            }
            let name = format!("tern-bench-{}-{attempt}", std::process::id());
            let (curl, purl) = (format!("http://127.0.0.1:{client}"), format!("http://127.0.0.1:{peer}"));
            let argv: Vec<String> = [
                ETCD_BIN,
                "--name",
                &name,
                "--data-dir",
                &dir.join(format!("etcd{attempt}")).display().to_string(),
                "--listen-client-urls",
                &curl,
                "--advertise-client-urls",
                &curl,
                "--listen-peer-urls",
                &purl,
                "--initial-advertise-peer-urls",
                &purl,
                "--initial-cluster",
                &format!("{name}={purl}"),
                "--logger=zap",
                "--log-outputs=stderr",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let svc = Service::spawn_detached("etcd", &argv, &dir.join(format!("etcd{attempt}.log")))?;
            let addr: SocketAddr = format!("127.0.0.1:{client}").parse().expect("socket address");
            let deadline = Instant::now() + START_TIMEOUT;
            loop {
                if etcd_healthy(addr) {
                    return Ok(Some(Etcd { endpoint: curl, _service: svc }));
                }
                check_interrupt()?;
                if !svc.alive() || Instant::now() > deadline {
                    last = svc.log_text();
                    break; // svc dropped: stopped by pid
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        bail!("etcd did not start:\n{last}")
    }
}

/// Starts `tern agent` (this executable) and waits until it serves.
pub(crate) fn start_agent(node: &str, datastore: &str, socket: &Path, dir: &Path, pools: &[&str]) -> Result<Service> {
    let me = std::env::current_exe().context("locating the running executable")?;
    let mut argv: Vec<String> = vec![
        me.display().to_string(),
        "agent".into(),
        "--node".into(),
        node.into(),
        "--datastore".into(),
        datastore.into(),
        "--socket".into(),
        socket.display().to_string(),
        "--state-dir".into(),
        dir.join(format!("state-{node}")).display().to_string(),
    ];
    for p in pools {
        argv.extend(["--pool".to_string(), p.to_string()]);
    }
    let svc = Service::spawn_detached(&format!("tern agent {node}"), &argv, &dir.join(format!("agent-{node}.log")))?;
    let deadline = Instant::now() + START_TIMEOUT;
    while !svc.log_text().contains("ready on") {
        check_interrupt()?;
        if !svc.alive() || Instant::now() > deadline {
            bail!("tern agent {node} did not start:\n{}", svc.log_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(svc)
}

/// The datastore for the agents: a throwaway etcd, or a local store in
/// `dir` when etcd-server is missing.
pub(crate) struct ClusterStore {
    pub spec: String,
    /// "etcd" or "local".
    pub kind: &'static str,
    pub note: Option<String>,
    _etcd: Option<Etcd>,
}

impl ClusterStore {
    /// `force_local`: the `local:` store even when etcd-server is installed.
    pub fn start(dir: &Path, force_local: bool) -> Result<ClusterStore> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let etcd = if force_local { None } else { Etcd::start(dir)? };
        Ok(match etcd {
            Some(etcd) => {
                ClusterStore { spec: format!("etcd:{}", etcd.endpoint), kind: "etcd", note: None, _etcd: Some(etcd) }
            }
            None => ClusterStore {
                spec: format!("local:{}", dir.join("store").display()),
                kind: "local",
                note: Some(if force_local {
                    "asked for the local: store (--local-store)".to_string()
                } else {
                    format!("{ETCD_BIN} is missing (Debian package etcd-server): the agents use a local: store instead")
                }),
                _etcd: None,
            },
        })
    }
}

/// `tern bench cni`'s `tern-cluster` dataplane: one agent and its store.
/// Fields drop in order: the agent (deregisters) before the store.
pub(crate) struct CniCluster {
    _agent: Service,
    pub store: ClusterStore,
}

/// The pool of the `tern-cluster` dataplane.
pub(crate) const CNI_POOL: &str = "10.252.0.0/16";

/// The agent socket of the `tern-cluster` dataplane, given its data directory.
pub(crate) fn cni_socket(data: &Path) -> PathBuf {
    data.join("agent.sock")
}

impl CniCluster {
    pub fn start(data: &Path, force_local: bool) -> Result<CniCluster> {
        let store = ClusterStore::start(&data.join("cluster"), force_local)?;
        let agent = start_agent("bench-node", &store.spec, &cni_socket(data), &data.join("cluster"), &[CNI_POOL])?;
        Ok(CniCluster { _agent: agent, store })
    }
}

// ---------------------------------------------------------------------------
// tern bench ipam

const IPAM_POOL: &str = "10.253.0.0/16";

#[derive(clap::Args)]
pub struct IpamArgs {
    /// `tern agent` processes, one per simulated node, all on one etcd.
    #[arg(long, default_value_t = 3)]
    agents: usize,
    /// Concurrent clients per agent (each one connection to the agent's socket, as many plugins at once).
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Measured rounds; the figures are the median of the rounds.
    #[arg(long, conflicts_with = "quick")]
    rounds: Option<usize>,
    /// Addresses allocated (then released) per agent per round.
    #[arg(long, conflicts_with = "quick")]
    per_agent: Option<usize>,
    /// A short run: 3 rounds of 150 addresses per agent.
    #[arg(long)]
    quick: bool,
    /// Print the results as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Use a local: store (shared by the agents through its directory) even when etcd-server is installed.
    #[arg(long)]
    local_store: bool,
}

/// One connection to an agent's socket.
struct AgentConn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl AgentConn {
    fn open(socket: &Path) -> Result<AgentConn> {
        let s = UnixStream::connect(socket).with_context(|| format!("connecting to {}", socket.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        Ok(AgentConn { writer: s.try_clone()?, reader: BufReader::new(s) })
    }

    fn call(&mut self, req: &Value) -> Result<Value> {
        let mut line = req.to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let mut answer = String::new();
        self.reader.read_line(&mut answer)?;
        let v: Value = serde_json::from_str(&answer).with_context(|| format!("agent answered {answer:?}"))?;
        if v["ok"] != json!(true) {
            bail!("{req} failed: {}", v["error"]);
        }
        Ok(v)
    }
}

/// One round: every client allocates its share, then (after all allocated)
/// releases it. Returns (allocations/s, releases/s, allocate latencies ms).
fn ipam_round(sockets: &[PathBuf], clients: usize, per_agent: usize, round: usize) -> Result<(f64, f64, Vec<f64>)> {
    let per_client = per_agent.div_ceil(clients);
    let total = per_client * clients * sockets.len();
    let latencies = Mutex::new(Vec::with_capacity(total));
    let barrier = std::sync::Barrier::new(clients * sockets.len() + 1);
    let errors: Mutex<Vec<anyhow::Error>> = Mutex::new(Vec::new());
    let (mut alloc_time, mut release_time) = (Duration::ZERO, Duration::ZERO);
    std::thread::scope(|s| {
        for (a, socket) in sockets.iter().enumerate() {
            for c in 0..clients {
                let (latencies, barrier, errors) = (&latencies, &barrier, &errors);
                s.spawn(move || {
                    let handles: Vec<String> =
                        (0..per_client).map(|i| format!("bench/r{round}-a{a}-c{c}-{i}/eth0")).collect();
                    let mut conn = AgentConn::open(socket);
                    barrier.wait(); // start allocating together
                    let mut mine = Vec::with_capacity(per_client);
                    if let Ok(conn) = conn.as_mut() {
                        for h in &handles {
                            if interrupted() {
                                break;
                            }
                            let t = Instant::now();
                            if let Err(e) = conn.call(&json!({"op": "allocate", "handle": h})) {
                                errors.lock().unwrap_or_else(|e| e.into_inner()).push(e);
                                break;
                            }
                            mine.push(t.elapsed().as_secs_f64() * 1e3);
                        }
                    }
                    latencies.lock().unwrap_or_else(|e| e.into_inner()).extend(mine);
                    barrier.wait(); // all allocated
                    barrier.wait(); // start releasing together
                    match conn {
                        Ok(mut conn) => {
                            for h in &handles {
                                if let Err(e) = conn.call(&json!({"op": "release", "handle": h})) {
                                    errors.lock().unwrap_or_else(|e| e.into_inner()).push(e);
                                    break;
                                }
                            }
                        }
                        Err(e) => errors.lock().unwrap_or_else(|e| e.into_inner()).push(e),
                    }
                    barrier.wait(); // all released
                });
            }
        }
        barrier.wait();
        let t = Instant::now();
        barrier.wait();
        alloc_time = t.elapsed();
        barrier.wait();
        let t = Instant::now();
        barrier.wait();
        release_time = t.elapsed();
    });
    if let Some(e) = errors.into_inner().unwrap_or_else(|e| e.into_inner()).into_iter().next() {
        return Err(e.context(format!("round {round}")));
    }
    check_interrupt()?;
    let lat = latencies.into_inner().unwrap_or_else(|e| e.into_inner());
    Ok((total as f64 / alloc_time.as_secs_f64(), total as f64 / release_time.as_secs_f64(), lat))
}

pub fn run_ipam(args: IpamArgs) -> Result<()> {
    let (rounds, per_agent) =
        if args.quick { (3, 150) } else { (args.rounds.unwrap_or(5), args.per_agent.unwrap_or(600)) };
    if args.agents == 0 || args.clients == 0 || rounds == 0 || per_agent == 0 {
        bail!("--agents, --clients, --rounds and --per-agent must be at least 1");
    }
    let _signals = SignalGuard::install()?;
    let ws = Workspace::new(None)?;
    let dir = ws.data("ipam");
    let store = ClusterStore::start(&dir, args.local_store)?;
    if let Some(note) = &store.note {
        eprintln!("tern bench ipam: {note}");
    }
    let mut agents = Vec::new();
    let mut sockets = Vec::new();
    for i in 0..args.agents {
        let socket = dir.join(format!("agent{i}.sock"));
        agents.push(start_agent(&format!("bench-n{i}"), &store.spec, &socket, &dir, &[IPAM_POOL])?);
        sockets.push(socket);
    }
    if !args.json {
        eprintln!(
            "tern bench ipam: {} agents on {} ({}), {} clients each, {rounds} rounds of {per_agent} addresses per agent",
            args.agents, store.kind, store.spec, args.clients
        );
    }
    // Warm-up: connections, the first block claim of every node.
    ipam_round(&sockets, 1, 2, usize::MAX)?;
    let mut alloc_rates = Vec::new();
    let mut release_rates = Vec::new();
    let mut lat_all = Vec::new();
    for round in 0..rounds {
        let (a, r, lat) = ipam_round(&sockets, args.clients, per_agent, round)?;
        if !args.json {
            eprintln!("  round {}: {a:.0} allocations/s, {r:.0} releases/s", round + 1);
        }
        alloc_rates.push(a);
        release_rates.push(r);
        lat_all.extend(lat);
    }
    lat_all.sort_by(f64::total_cmp);
    let stats = |v: &[f64]| {
        json!({
            "median": round_to(median(v), 1),
            "min": round_to(v.iter().copied().fold(f64::INFINITY, f64::min), 1),
            "max": round_to(v.iter().copied().fold(0.0, f64::max), 1),
            "rounds": v.iter().map(|x| round_to(*x, 1)).collect::<Vec<_>>(),
        })
    };
    let machine = Machine::probe();
    let report = json!({
        "bench": "ipam",
        "machine": {"kernel": machine.kernel, "cpus": machine.cpus, "cpu_model": machine.model},
        "store": store.kind,
        "note": store.note,
        "agents": args.agents,
        "clients_per_agent": args.clients,
        "addresses_per_agent_per_round": per_agent.div_ceil(args.clients) * args.clients,
        "rounds": rounds,
        "allocations_per_s": stats(&alloc_rates),
        "releases_per_s": stats(&release_rates),
        "allocate_latency_ms": {
            "p50": round_to(percentile(&lat_all, 0.5), 3),
            "p95": round_to(percentile(&lat_all, 0.95), 3),
            "p99": round_to(percentile(&lat_all, 0.99), 3),
        },
    });
    // Stop the agents (they deregister) while the store still runs.
    drop(agents);
    drop(store);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "tern bench ipam: {} agents on one {} store, {} concurrent clients each over the agent sockets",
            args.agents,
            report["store"].as_str().unwrap_or("?"),
            args.clients
        );
        println!("machine: Linux {}, {} x {}", machine.kernel, machine.cpus, machine.model);
        println!();
        let row = |name: &str, v: &Value| {
            vec![name.to_string(), format!("{}", v["median"]), format!("{}", v["min"]), format!("{}", v["max"])]
        };
        print_table(
            &["per second", "median", "min", "max"],
            &[row("allocations", &report["allocations_per_s"]), row("releases", &report["releases_per_s"])],
        );
        println!();
        let l = &report["allocate_latency_ms"];
        println!(
            "allocate latency (ms, every request of every round): p50 {} p95 {} p99 {}",
            l["p50"], l["p95"], l["p99"]
        );
        println!(
            "each round: every client allocates its share (claiming blocks as they fill), then all release; \
             {rounds} rounds, median reported"
        );
    }
    Ok(())
}
