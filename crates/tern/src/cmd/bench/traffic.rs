//! The traffic of `tern bench datapath`: a small TCP request/response
//! server and client of tern's own (latency and connection rate), iperf3
//! (throughput) and `/proc/stat` (CPU).
//!
//! Sockets belong to the network namespace of the thread that creates them,
//! whatever thread uses them later. So the echo server's listener is bound
//! inside the server pod's namespace and then served from a plain thread,
//! and a client enters the client pod's namespace only to create its
//! sockets. iperf3 processes are born in the pod's namespace the same way
//! (`spawn_in`) and are killed by pid if anything goes wrong.
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;
use serde_json::Value;
use tern_sys::netns::NetNs;
use tern_sys::sysctl;

use super::{check_interrupt, interrupted, spawn_in};

/// Bytes of each request and of each response.
pub const PAYLOAD: usize = 64;
/// The echo server's port in the server pod.
const ECHO_PORT: u16 = 7777;
/// iperf3's port in the server pod.
const IPERF_PORT: u16 = 5201;
/// Connections opened and closed before the connection rate is timed.
const CRR_WARMUP: usize = 200;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// No single read may take this long: a pod pair that stops answering is an
/// error, not a hang.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long iperf3's server may take to listen, and to exit after its test.
const IPERF_START: Duration = Duration::from_secs(5);
/// Slack on top of the test duration before the iperf3 client is killed.
const IPERF_SLACK: Duration = Duration::from_secs(15);

/// `iperf3` on `PATH`, or an error naming the Debian package.
pub fn find_iperf3() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| super::PATH_ENV.into());
    std::env::split_paths(&path).map(|dir| dir.join("iperf3")).find(|p| p.is_file()).ok_or_else(|| {
        anyhow!(
            "iperf3 is missing (tern bench datapath measures throughput with it): install the Debian package \
                 iperf3 (apt-get install iperf3, or `make setup`)"
        )
    })
}

/// iperf3's version line (`iperf 3.12 (cJSON 1.7.15)`), for the report.
pub fn iperf3_version(iperf3: &Path) -> String {
    Command::new(iperf3)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// Per-namespace settings of a pod that opens many short connections: the
/// whole ephemeral port range, and reuse of its own TIME_WAIT ports for new
/// outgoing connections (otherwise the connection-rate runs exhaust the
/// ports of a namespace within a minute). Applied to every dataplane's
/// client pod alike.
pub fn prepare_client(ns: &NetNs) -> Result<()> {
    ns.enter(|| -> Result<()> {
        sysctl::write("net/ipv4/ip_local_port_range", "1024 65535")?;
        sysctl::write("net/ipv4/tcp_tw_reuse", "1")?;
        Ok(())
    })
    .with_context(|| format!("entering {}", ns.path().display()))?
    .with_context(|| format!("setting the client's TCP sysctls in {}", ns.path().display()))
}

// ---------------------------------------------------------------------------
// CPU placement

/// Where the client and the server run.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Pin {
    /// Wherever the scheduler puts them.
    None,
    /// Both on the first CPU.
    Same,
    /// Client on the first CPU, server on the second.
    Split,
}

impl Pin {
    /// (client CPU, server CPU): the first one or two CPUs this process
    /// may run on; `None` when not pinned. `split` on a single CPU is `same`.
    pub fn cpus(self) -> Result<Option<(usize, usize)>> {
        if self == Pin::None {
            return Ok(None);
        }
        let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
        let allowed: Vec<usize> = (0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect();
        let first = *allowed.first().ok_or_else(|| anyhow!("no CPU in this process's affinity mask"))?;
        let second = if self == Pin::Split { allowed.get(1).copied().unwrap_or(first) } else { first };
        Ok(Some((first, second)))
    }
}

/// Pins the calling thread to `cpu` until dropped, then restores its
/// previous affinity.
struct Pinned(Option<CpuSet>);

impl Pinned {
    fn to(cpu: Option<usize>) -> Result<Pinned> {
        let Some(cpu) = cpu else { return Ok(Pinned(None)) };
        let me = Pid::from_raw(0);
        let before = sched_getaffinity(me).context("sched_getaffinity")?;
        let mut set = CpuSet::new();
        set.set(cpu).context("CPU number")?;
        sched_setaffinity(me, &set).with_context(|| format!("pinning to CPU {cpu}"))?;
        Ok(Pinned(Some(before)))
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if let Some(before) = self.0.take() {
            let _ = sched_setaffinity(Pid::from_raw(0), &before);
        }
    }
}

// ---------------------------------------------------------------------------
// Request/response: a server thread in the server pod, the client here.

/// Answers each `PAYLOAD`-byte request with the same bytes, one connection
/// at a time, until dropped.
pub struct EchoServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on `ip` in `ns`; the server thread runs on `cpu` if given.
    pub fn start(ns: &NetNs, ip: IpAddr, cpu: Option<usize>) -> Result<EchoServer> {
        let addr = SocketAddr::new(ip, ECHO_PORT);
        let listener = ns
            .enter(|| TcpListener::bind(addr))
            .with_context(|| format!("entering {}", ns.path().display()))?
            .with_context(|| format!("listening on {addr} in {}", ns.path().display()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("bench-echo".into())
            .spawn(move || {
                let _pinned = Pinned::to(cpu);
                serve(listener, &flag)
            })
            .context("starting the echo server thread")?;
        Ok(EchoServer { addr, stop, handle: Some(handle) })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn serve(listener: TcpListener, stop: &AtomicBool) {
    let mut buf = [0u8; PAYLOAD];
    while !stop.load(Ordering::SeqCst) && !interrupted() {
        // Wait for a connection, but look at `stop` every 100 ms.
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(100u16)) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        let Ok((mut conn, _)) = listener.accept() else { continue };
        let _ = conn.set_nodelay(true);
        let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
        // Until the client closes (EOF), a timeout, or an error.
        while conn.read_exact(&mut buf).is_ok() {
            if conn.write_all(&buf).is_err() {
                break;
            }
        }
    }
}

/// One connection from the client pod; `warmup` unrecorded round trips,
/// then `samples` timed ones: the microseconds from just before the request
/// is written until the whole response is read.
pub fn round_trips(
    client: &NetNs,
    server: SocketAddr,
    warmup: usize,
    samples: usize,
    cpu: Option<usize>,
) -> Result<Vec<f64>> {
    let _pinned = Pinned::to(cpu)?;
    let mut s = client
        .enter(|| TcpStream::connect_timeout(&server, CONNECT_TIMEOUT))
        .with_context(|| format!("entering {}", client.path().display()))?
        .with_context(|| format!("connecting to {server} from {}", client.path().display()))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0x5au8; PAYLOAD];
    let mut out = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        if i.is_multiple_of(1024) {
            check_interrupt()?;
        }
        let t = Instant::now();
        s.write_all(&buf).context("request")?;
        s.read_exact(&mut buf).context("response")?;
        let dt = t.elapsed();
        if i >= warmup {
            out.push(dt.as_secs_f64() * 1e6);
        }
    }
    Ok(out)
}

/// New connections per second from the client pod for `duration`, each
/// one connect, one request/response, close (netperf's TCP_CRR), after
/// [`CRR_WARMUP`] unrecorded ones.
pub fn connection_rate(client: &NetNs, server: SocketAddr, duration: Duration, cpu: Option<usize>) -> Result<f64> {
    let _pinned = Pinned::to(cpu)?;
    let mut buf = [0x5au8; PAYLOAD];
    let mut one = || -> std::io::Result<()> {
        let mut s = TcpStream::connect(server)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(IO_TIMEOUT))?;
        s.write_all(&buf)?;
        s.read_exact(&mut buf)?;
        Ok(())
    };
    // Every socket is created in the client's namespace.
    client
        .enter(|| -> Result<f64> {
            for _ in 0..CRR_WARMUP {
                one().with_context(|| format!("a connection to {server}"))?;
            }
            check_interrupt()?;
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < duration {
                one().with_context(|| format!("a connection to {server} (after {n})"))?;
                n += 1;
                if n.is_multiple_of(256) {
                    check_interrupt()?;
                }
            }
            Ok(n as f64 / start.elapsed().as_secs_f64())
        })
        .with_context(|| format!("entering {}", client.path().display()))?
}

// ---------------------------------------------------------------------------
// Throughput: iperf3

/// One iperf3 test and the machine's CPU time while it ran.
pub struct IperfRun {
    /// Received bits per second / 1e9.
    pub gbps: f64,
    /// Gigabits received.
    pub gbit: f64,
    /// Busy CPU seconds while the client ran: of the CPUs client and server
    /// are pinned to, or of the whole machine when not pinned.
    pub cpu_s: f64,
}

/// `iperf3 -s -1` in the server pod, then `iperf3 -c <server> -P streams
/// -t secs -J` in the client pod (with `-A client,server` when pinned); busy
/// CPU from `/proc/stat` around the client (see [`IperfRun::cpu_s`]).
pub struct Iperf<'a> {
    pub iperf3: &'a Path,
    pub client: &'a NetNs,
    pub server: &'a NetNs,
    pub server_ip: IpAddr,
    pub streams: u32,
    pub secs: u32,
    /// (client CPU, server CPU), if pinned.
    pub cpus: Option<(usize, usize)>,
    /// Where the client's JSON goes.
    pub out_file: &'a Path,
}

pub fn iperf(run: &Iperf) -> Result<IperfRun> {
    let Iperf { iperf3, client, server, server_ip, streams, secs, cpus: place, out_file } = *run;
    let port = IPERF_PORT.to_string();
    let mut cmd = Command::new(iperf3);
    cmd.args(["-s", "-1", "-p", &port]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let (_, mut srv) = spawn_in(server, &mut cmd).context("starting the iperf3 server")?;
    wait_listening(&mut srv, IPERF_PORT)?;

    let out = File::create(out_file).with_context(|| format!("creating {}", out_file.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(iperf3);
    cmd.args(["-c", &server_ip.to_string(), "-p", &port, "-t", &secs.to_string(), "-P", &streams.to_string()])
        .args(["-i", "0", "-J"])
        .args(place.map(|(c, s)| format!("-A{c},{s}")))
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    let cpus: Vec<usize> = match place {
        Some((c, s)) if c == s => vec![c],
        Some((c, s)) => vec![c, s],
        None => Vec::new(),
    };
    let cpu0 = cpu_busy_seconds(&cpus)?;
    let (start, mut cli) = spawn_in(client, &mut cmd).context("starting the iperf3 client")?;
    let deadline = start + Duration::from_secs(secs as u64) + IPERF_SLACK;
    let status = loop {
        if let Some(st) = cli.exited()? {
            break st;
        }
        check_interrupt()?;
        if Instant::now() > deadline {
            cli.kill();
            bail!("iperf3 -c {server_ip} -P {streams} still running after {:?}; killed", deadline - start);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let cpu_s = cpu_busy_seconds(&cpus)? - cpu0;
    // The server exits after its one test.
    let deadline = Instant::now() + IPERF_START;
    while srv.exited()?.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(srv); // killed by pid if it is still running

    let text = std::fs::read_to_string(out_file).with_context(|| format!("reading {}", out_file.display()))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|_| anyhow!("iperf3 -c {server_ip} ({status}) printed no JSON:\n{}", text.trim_end()))?;
    if let Some(e) = json.get("error").and_then(Value::as_str) {
        bail!("iperf3 -c {server_ip} -P {streams}: {e}");
    }
    let sum = &json["end"]["sum_received"];
    let (bytes, bps) = (sum["bytes"].as_f64(), sum["bits_per_second"].as_f64());
    match (bytes, bps) {
        (Some(bytes), Some(bps)) if status.success() && bytes > 0.0 => {
            Ok(IperfRun { gbps: bps / 1e9, gbit: bytes * 8.0 / 1e9, cpu_s })
        }
        _ => bail!("iperf3 -c {server_ip} -P {streams} ({status}): no end.sum_received in its output:\n{text}"),
    }
}

/// Waits until the process listens on TCP `port` (its own namespace's
/// `/proc/<pid>/net/tcp{,6}`).
fn wait_listening(srv: &mut super::Tracked, port: u16) -> Result<()> {
    let pid = srv.id();
    let needle = format!(":{port:04X} ");
    let deadline = Instant::now() + IPERF_START;
    loop {
        let listening = ["tcp", "tcp6"].iter().any(|f| {
            std::fs::read_to_string(format!("/proc/{pid}/net/{f}")).is_ok_and(|t| {
                t.lines().skip(1).any(|l| {
                    let cols: Vec<&str> = l.split_whitespace().collect();
                    cols.len() > 3 && format!("{} ", cols[1]).ends_with(&needle) && cols[3] == "0A"
                })
            })
        });
        if listening {
            return Ok(());
        }
        if let Some(st) = srv.exited()? {
            bail!("the iperf3 server exited ({st}) before listening on port {port}");
        }
        check_interrupt()?;
        if Instant::now() > deadline {
            bail!("the iperf3 server did not listen on port {port} within {IPERF_START:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Busy CPU time so far, in seconds, of the CPUs in `cpus` (`cpuN` lines
/// of `/proc/stat`), or of the whole machine (the `cpu` line) if empty:
/// user + nice + system + irq + softirq (idle, iowait and steal excluded).
pub fn cpu_busy_seconds(cpus: &[usize]) -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let wanted: Vec<String> =
        if cpus.is_empty() { vec!["cpu".into()] } else { cpus.iter().map(|c| format!("cpu{c}")).collect() };
    let mut busy = 0u64;
    for name in &wanted {
        let line = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name.as_str()))
            .ok_or_else(|| anyhow!("/proc/stat has no {name} line"))?;
        let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
        if f.len() < 7 {
            bail!("/proc/stat: unexpected line {line:?}");
        }
        busy += f[0] + f[1] + f[2] + f[5] + f[6];
    }
    Ok(busy as f64 / clock_ticks())
}

/// USER_HZ, the unit of `/proc/stat`.
fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}
