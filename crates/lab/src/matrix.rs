//! `tern lab test`: the connectivity matrix. Every pod and node connects
//! over TCP to every pod, node and the external host; each cell is a
//! verdict.
//!
//! The probe servers and clients are sockets of this process, opened on
//! threads that entered the lab namespaces (a socket stays in the namespace
//! it was created in), so the test needs no helper processes in pods. A
//! server answers each connection with the peer address it saw, which
//! proves masquerade: a pod reaching the external host must appear as its
//! node's underlay address.
//!
//! In a dual-stack lab every pod's IPv6 address is an endpoint of its own
//! (`<pod>/v6`), probed from and to the other pods' IPv6 addresses (nodes
//! and the external host are IPv4 only).
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;
use tern_sys::NetNs;

use crate::fabric::netns_path;
use crate::spec;
use crate::state::LabState;

/// The probe servers' port in every lab namespace.
pub const PROBE_PORT: u16 = 17946;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(1500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    PodPodSameNode,
    PodPodCrossNode,
    PodPodSameNode6,
    PodPodCrossNode6,
    PodNode,
    NodePod,
    NodeNode,
    PodExternal,
    NodeExternal,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::PodPodSameNode => "pod→pod, same node",
            Kind::PodPodCrossNode => "pod→pod, cross node",
            Kind::PodPodSameNode6 => "pod→pod, same node, IPv6",
            Kind::PodPodCrossNode6 => "pod→pod, cross node, IPv6",
            Kind::PodNode => "pod→node (other nodes: masqueraded)",
            Kind::NodePod => "node→pod",
            Kind::NodeNode => "node→node",
            Kind::PodExternal => "pod→external (masquerade)",
            Kind::NodeExternal => "node→external",
        }
    }
}

/// One endpoint of the matrix.
#[derive(Debug, Clone, Serialize)]
pub struct Endpoint {
    pub name: String,
    #[serde(skip)]
    pub netns: String,
    pub ip: IpAddr,
    /// The node it is (or lives on); `None` for the external host.
    pub node: Option<String>,
    pub is_pod: bool,
    #[serde(skip)]
    pub node_ip: Option<IpAddr>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub from: String,
    pub to: String,
    pub kind: Kind,
    pub ok: bool,
    /// Connect + answer time, ms.
    pub ms: f64,
    /// What went wrong, or what the server saw.
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub cells: Vec<Cell>,
    pub passed: usize,
    pub failed: usize,
}

fn endpoints(st: &LabState) -> Vec<Endpoint> {
    let mut out = Vec::new();
    for n in &st.nodes {
        for p in st.pods.iter().filter(|p| p.node == n.name) {
            let v4 = p.ips.iter().find(|ip| ip.is_ipv4()).map(|ip| (p.name.clone(), *ip));
            let v6 = p.ips.iter().find(|ip| ip.is_ipv6()).map(|ip| (format!("{}/v6", p.name), *ip));
            for (name, ip) in v4.into_iter().chain(v6) {
                out.push(Endpoint {
                    name,
                    netns: p.netns.clone(),
                    ip,
                    node: Some(n.name.clone()),
                    is_pod: true,
                    node_ip: Some(IpAddr::V4(n.ip)),
                });
            }
        }
    }
    for n in &st.nodes {
        out.push(Endpoint {
            name: n.name.clone(),
            netns: n.netns.clone(),
            ip: IpAddr::V4(n.ip),
            node: Some(n.name.clone()),
            is_pod: false,
            node_ip: Some(IpAddr::V4(n.ip)),
        });
    }
    out.push(Endpoint {
        name: "external".into(),
        netns: st.lab.external(),
        ip: IpAddr::V4(spec::EXTERNAL_IP),
        node: None,
        is_pod: false,
        node_ip: None,
    });
    out
}

fn kind(from: &Endpoint, to: &Endpoint) -> Kind {
    if from.ip.is_ipv6() {
        return if from.node == to.node { Kind::PodPodSameNode6 } else { Kind::PodPodCrossNode6 };
    }
    match (from.is_pod, to.is_pod, to.node.is_none()) {
        (true, _, true) => Kind::PodExternal,
        (false, _, true) => Kind::NodeExternal,
        (true, true, _) if from.node == to.node => Kind::PodPodSameNode,
        (true, true, _) => Kind::PodPodCrossNode,
        (true, false, _) => Kind::PodNode,
        (false, true, _) => Kind::NodePod,
        (false, false, _) => Kind::NodeNode,
    }
}

/// Echo-the-peer servers in every endpoint's namespace until dropped.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Servers {
    fn start(eps: &[Endpoint]) -> Result<Servers> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut seen = std::collections::BTreeSet::new();
        for ep in eps {
            if !seen.insert(ep.netns.clone()) {
                continue;
            }
            let ns = NetNs::open(netns_path(&ep.netns)).with_context(|| format!("netns {}", ep.netns))?;
            // Dual stack ([::], IPV6_V6ONLY off): IPv4 peers arrive as
            // v4-mapped addresses, which `serve` answers in IPv4 form.
            let listener = ns
                .enter(|| TcpListener::bind(SocketAddr::new(IpAddr::from([0u16; 8]), PROBE_PORT)))?
                .with_context(|| format!("probe server in {}", ep.netns))?;
            listener.set_nonblocking(true)?;
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || serve(listener, &stop)));
        }
        Ok(Servers { stop, threads })
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve(listener: TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((mut conn, peer)) => {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut line = String::new();
                if BufReader::new(&conn).read_line(&mut line).is_ok() {
                    let _ = writeln!(conn, "{}", peer.ip().to_canonical());
                }
            }
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}

/// Connects from `from`'s namespace to `to`; the peer address the server saw.
fn probe(from: &Endpoint, to: &Endpoint) -> Result<(IpAddr, f64), String> {
    if !spec::is_lab_address(to.ip) {
        return Err(format!("{} is not a lab address", to.ip));
    }
    let ns = NetNs::open(netns_path(&from.netns)).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let conn = ns
        .enter(|| TcpStream::connect_timeout(&SocketAddr::new(to.ip, PROBE_PORT), CONNECT_TIMEOUT))
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("connect: {e}"))?;
    conn.set_read_timeout(Some(CONNECT_TIMEOUT)).map_err(|e| e.to_string())?;
    (&conn).write_all(b"probe\n").map_err(|e| format!("send: {e}"))?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).map_err(|e| format!("no answer: {e}"))?;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let seen: IpAddr = line.trim().parse().map_err(|_| format!("bad answer {line:?}"))?;
    Ok((seen, ms))
}

/// Runs the whole matrix.
pub fn run(st: &LabState) -> Result<Report> {
    let eps = endpoints(st);
    let _servers = Servers::start(&eps)?;
    let mut pairs = Vec::new();
    for from in eps.iter().filter(|e| e.node.is_some()) {
        for to in &eps {
            // IPv6 endpoints (pods) talk to IPv6 endpoints only.
            if from.name != to.name && from.ip.is_ipv6() == to.ip.is_ipv6() {
                pairs.push((from, to));
            }
        }
    }
    // In parallel batches: a broken path costs a timeout per cell.
    let mut cells = Vec::new();
    for chunk in pairs.chunks(16) {
        let got: Vec<Cell> = std::thread::scope(|s| {
            let hs: Vec<_> = chunk
                .iter()
                .map(|(from, to)| {
                    s.spawn(move || {
                        let k = kind(from, to);
                        let (ok, ms, detail) = match probe(from, to) {
                            Ok((seen, ms)) => {
                                // Who the server must see: the pod itself inside the
                                // cluster and on its own node; its node when the
                                // packet leaves the cluster CIDR (the external host,
                                // and other nodes' underlay addresses), masqueraded.
                                let leaves = k == Kind::PodExternal || (k == Kind::PodNode && from.node != to.node);
                                let want = if leaves { from.node_ip.unwrap_or(from.ip) } else { from.ip };
                                if seen == want || (!from.is_pod && k != Kind::PodExternal) {
                                    (true, ms, format!("seen as {seen}"))
                                } else {
                                    (false, ms, format!("seen as {seen}, expected {want}"))
                                }
                            }
                            Err(e) => (false, 0.0, e),
                        };
                        Cell { from: from.name.clone(), to: to.name.clone(), kind: k, ok, ms, detail }
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().expect("probe thread")).collect()
        });
        cells.extend(got);
    }
    let passed = cells.iter().filter(|c| c.ok).count();
    let failed = cells.len() - passed;
    Ok(Report { cells, passed, failed })
}

impl Report {
    /// The matrix as a table: sources down, destinations across, a verdict
    /// per cell; then the verdict per kind of path.
    pub fn render(&self) -> String {
        let mut rows: Vec<&str> = Vec::new();
        for c in &self.cells {
            if !rows.contains(&c.from.as_str()) {
                rows.push(&c.from);
            }
        }
        // Destinations in the sources' order, then those that are never a
        // source (the external host), so the diagonal is the diagonal.
        let mut cols: Vec<&str> = rows.iter().copied().filter(|r| self.cells.iter().any(|c| c.to == *r)).collect();
        for c in &self.cells {
            if !cols.contains(&c.to.as_str()) {
                cols.push(&c.to);
            }
        }
        let w = cols.iter().map(|c| c.len()).max().unwrap_or(4).max(4);
        let rw = rows.iter().map(|r| r.len()).max().unwrap_or(4).max(8);
        let mut out = format!("{:rw$} ", "from \\ to");
        for c in &cols {
            out.push_str(&format!(" {c:>w$}"));
        }
        out.push('\n');
        let by: BTreeMap<(&str, &str), &Cell> =
            self.cells.iter().map(|c| ((c.from.as_str(), c.to.as_str()), c)).collect();
        for r in &rows {
            out.push_str(&format!("{r:rw$} "));
            for c in &cols {
                let v = match by.get(&(*r, *c)) {
                    Some(cell) if cell.ok => "ok",
                    Some(_) => "FAIL",
                    None => "·",
                };
                out.push_str(&format!(" {v:>w$}"));
            }
            out.push('\n');
        }
        out.push('\n');
        let mut kinds: BTreeMap<Kind, (usize, usize, Vec<f64>)> = BTreeMap::new();
        for c in &self.cells {
            let e = kinds.entry(c.kind).or_default();
            if c.ok {
                e.0 += 1;
                e.2.push(c.ms);
            } else {
                e.1 += 1;
            }
        }
        for (k, (ok, bad, mut ms)) in kinds {
            ms.sort_by(|a, b| a.total_cmp(b));
            let median = ms.get(ms.len() / 2).copied().unwrap_or(0.0);
            let verdict = if bad == 0 { "PASS" } else { "FAIL" };
            out.push_str(&format!(
                "{verdict}  {:<38} {ok:>3}/{:<3} connect+answer median {median:.2} ms\n",
                k.label(),
                ok + bad
            ));
        }
        for c in self.cells.iter().filter(|c| !c.ok) {
            out.push_str(&format!("  FAIL {} → {}: {}\n", c.from, c.to, c.detail));
        }
        out.push_str(&format!("\n{} of {} paths work\n", self.passed, self.passed + self.failed));
        out
    }
}
