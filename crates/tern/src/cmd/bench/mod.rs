//! `tern bench`: measurements of tern against the limit and a real peer, in
//! one run, in namespaces the bench creates and removes.
//!
//! - `tern bench cni` ([`cni`]): how long a runtime waits for ADD and DEL, and
//!   how many pods per second a node churns through.
//! - `tern bench datapath` ([`datapath`]): latency, throughput, CPU cost and
//!   connection rate between two pods of one node.
//! - `tern bench ipam` ([`cluster`]): cluster-IPAM allocations per second
//!   with several `tern agent`s on one throwaway etcd.
//!
//! Both take their dataplanes from one table, [`dataplanes::registry`]; a
//! dataplane added there appears in both without changes to the harness.
//! This module holds what both share: the [`Workspace`] (throwaway
//! namespaces, plugin and data directories, removed on drop), running a CNI
//! plugin as a runtime would, the ctrl-c handling, progress and tables.
//!
//! The only `unsafe` here is installing the signal handler (`sigaction`);
//! the namespace switch is tern-sys's [`NetNs::enter`].
use std::io::{IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{killpg, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::Pid;
use tern_sys::netns::{self, NetNs};

mod cluster;
mod cni;
mod crossnode;
mod datapath;
mod dataplanes;
mod svg;
mod traffic;

use dataplanes::CniPlugin;

/// Where Debian's containernetworking-plugins puts the reference plugins.
pub(crate) const REFERENCE_DIR: &str = "/usr/lib/cni";
const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// Time CNI ADD and DEL, and pod churn: tern (bridge, routed, cluster IPAM) against the reference bridge plugin.
    Cni(cni::CniArgs),
    /// Pod-to-pod latency, throughput, CPU per Gbit and connection rate: the limit, tern, the reference.
    Datapath(datapath::DatapathArgs),
    /// Cluster IPAM: allocations and releases per second with several `tern agent`s on one throwaway etcd.
    Ipam(cluster::IpamArgs),
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Cni(a) => cni::run(a),
        What::Datapath(a) => datapath::run(a),
        What::Ipam(a) => cluster::run_ipam(a),
    }
}

/// Fails unless running as root (namespaces) and the reference plugins are
/// there, naming the Debian package to install.
fn preflight(what: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("tern bench {what} creates network namespaces: run it as root");
    }
    for p in ["bridge", "host-local"] {
        let path = Path::new(REFERENCE_DIR).join(p);
        if !path.is_file() {
            bail!(
                "the reference plugin {} is missing: install the Debian package containernetworking-plugins \
                 (apt-get install containernetworking-plugins, or `make setup`)",
                path.display()
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The workspace: namespaces, plugin directory, data directories. Made here,
// removed on drop.

/// Everything a bench creates outside its own memory; `Drop` removes exactly
/// what was created: the namespaces `/run/netns/tern-bench-<pid>-<label>`
/// and the directory `$TMPDIR/tern-bench-<pid>`. The pid makes the names
/// unique among concurrent benches (and tests running them).
pub(crate) struct Workspace {
    /// Pinned namespaces, removed on drop.
    netns: Mutex<Vec<PathBuf>>,
    /// Labs (cross-node dataplanes), brought down on drop.
    labs: Mutex<Vec<tern_lab::spec::Lab>>,
    /// Set once created.
    work_dir: Option<PathBuf>,
    pub data_dir: PathBuf,
    /// Where the `tern` and `tern-ipam` plugins are.
    pub tern_dir: PathBuf,
}

impl Workspace {
    pub fn new(cni_bin_dir: Option<&Path>) -> Result<Workspace> {
        let pid = std::process::id();
        let work_dir = std::env::temp_dir().join(format!("tern-bench-{pid}"));
        let mut ws = Workspace {
            netns: Mutex::new(Vec::new()),
            labs: Mutex::new(Vec::new()),
            work_dir: None,
            data_dir: work_dir.join("data"),
            tern_dir: PathBuf::new(),
        };
        // From here on `ws` is dropped (and cleans up) on every early return.
        std::fs::create_dir(&work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
        ws.work_dir = Some(work_dir.clone());
        std::fs::create_dir(&ws.data_dir).with_context(|| format!("creating {}", ws.data_dir.display()))?;
        ws.tern_dir = match cni_bin_dir {
            Some(dir) => {
                for name in tern_plugins::PLUGIN_NAMES {
                    if !dir.join(name).exists() {
                        bail!(
                            "{} has no {name}: run `tern install --cni-bin-dir {}` first",
                            dir.display(),
                            dir.display()
                        );
                    }
                }
                dir.to_path_buf()
            }
            None => {
                let me = std::env::current_exe()
                    .and_then(|p| p.canonicalize())
                    .context("locating the running executable")?;
                let bin = work_dir.join("bin");
                std::fs::create_dir(&bin).with_context(|| format!("creating {}", bin.display()))?;
                for name in tern_plugins::PLUGIN_NAMES {
                    std::os::unix::fs::symlink(&me, bin.join(name))
                        .with_context(|| format!("linking {} to {}", bin.join(name).display(), me.display()))?;
                }
                bin
            }
        };
        Ok(ws)
    }

    /// Creates and pins the namespace `/run/netns/tern-bench-<pid>-<label>`,
    /// removed when the workspace is dropped.
    pub fn netns(&self, label: &str) -> Result<NetNs> {
        let path = PathBuf::from(format!("/run/netns/tern-bench-{}-{label}", std::process::id()));
        let ns =
            netns::create(&path).with_context(|| format!("creating the netns {} (are you root?)", path.display()))?;
        self.netns.lock().unwrap_or_else(|e| e.into_inner()).push(path);
        Ok(ns)
    }

    /// Brings up a lab named `tb-<pid>-<label>` (see tern-lab), brought down
    /// when the workspace is dropped.
    pub fn lab(&self, label: &str, spec: tern_lab::spec::LabSpec) -> Result<tern_lab::state::LabState> {
        let name = format!("tb-{}-{label}", std::process::id());
        let lab = tern_lab::spec::Lab::new(&name).map_err(anyhow::Error::msg)?;
        self.labs.lock().unwrap_or_else(|e| e.into_inner()).push(lab.clone());
        let tern = std::env::current_exe().context("locating the running executable")?;
        tern_lab::up(&lab, spec, &tern, &mut tern_lab::Quiet).with_context(|| format!("lab {name}"))
    }

    /// A private IPAM data directory for `name` (inside the workspace).
    pub fn data(&self, name: &str) -> PathBuf {
        self.data_dir.join(name)
    }

    /// The plugin executable and its `CNI_PATH`: the reference plugins see
    /// only their own directory, tern's see tern's first.
    fn plugin(&self, p: &CniPlugin) -> (PathBuf, String) {
        if p.reference {
            (Path::new(REFERENCE_DIR).join(p.plugin), REFERENCE_DIR.to_string())
        } else {
            (self.tern_dir.join(p.plugin), format!("{}:{REFERENCE_DIR}", self.tern_dir.display()))
        }
    }

    /// Runs a CNI plugin as a runtime would: its process in the `node`
    /// netns, the runtime's environment, the config on stdin. Times spawn to
    /// exit (what a runtime waits for). Any failure is an error showing the
    /// plugin's exit status, stdin, stdout and stderr.
    pub fn invoke(&self, inv: &Invocation) -> Result<Invoked> {
        let (exe, cni_path) = self.plugin(inv.plugin);
        let mut cmd = Command::new(&exe);
        cmd.env_clear()
            .env("PATH", PATH_ENV)
            .env("CNI_COMMAND", inv.command)
            .env("CNI_CONTAINERID", inv.container_id)
            .env("CNI_NETNS", inv.pod.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &cni_path)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (start, mut child) = spawn_in(inv.node, &mut cmd).with_context(|| format!("starting {}", exe.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            // A config is far below the pipe buffer: this never blocks.
            let _ = stdin.write_all(inv.conf.as_bytes());
        }
        let out = child.wait_with_output();
        let elapsed = start.elapsed();
        let out = out.with_context(|| format!("waiting for {}", exe.display()))?;

        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            if interrupted() {
                bail!("interrupted");
            }
            bail!(
                "{}: {} {} failed ({}), plugin {}\nCNI_NETNS={} (in node netns {})\n--- stdin\n{}\n--- stdout\n{}\n--- stderr\n{}",
                inv.dataplane,
                inv.command,
                inv.container_id,
                out.status,
                exe.display(),
                inv.pod.path().display(),
                inv.node.path().display(),
                inv.conf,
                stdout.trim_end(),
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        Ok(Invoked { start, elapsed, stdout })
    }
}

impl Drop for Workspace {
    fn drop(&mut self) {
        for lab in std::mem::take(self.labs.get_mut().unwrap_or_else(|e| e.into_inner())) {
            if let Err(e) = tern_lab::down(&lab) {
                eprintln!("tern bench: cannot remove lab {}: {e:#}", lab.name);
            }
        }
        // Unpin the namespaces; once the last descriptor on one is closed the
        // kernel destroys it, and with it every link a failed run left behind.
        let paths = std::mem::take(self.netns.get_mut().unwrap_or_else(|e| e.into_inner()));
        for path in paths {
            if let Err(e) = netns::remove(&path) {
                eprintln!("tern bench: cannot remove {}: {e}", path.display());
            }
        }
        // The eBPF dataplanes' pins of node namespaces that are now gone.
        if let Err(e) = tern_bpf::sweep_dead_namespaces() {
            eprintln!("tern bench: cannot sweep eBPF pins of removed namespaces: {e}");
        }
        if let Some(dir) = self.work_dir.take() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                eprintln!("tern bench: cannot remove {}: {e}", dir.display());
            }
        }
    }
}

/// One CNI invocation.
pub(crate) struct Invocation<'a> {
    pub dataplane: &'a str,
    pub plugin: &'a CniPlugin,
    pub command: &'a str,
    pub container_id: &'a str,
    pub node: &'a NetNs,
    pub pod: &'a NetNs,
    pub conf: &'a str,
}

pub(crate) struct Invoked {
    pub start: Instant,
    pub elapsed: Duration,
    pub stdout: String,
}

/// Spawns `cmd` with its process born in `ns`: the calling thread enters
/// the namespace for the spawn only (the child inherits the namespace of the
/// thread that spawns it). The child gets its own process group, so a
/// terminal's ctrl-c reaches the bench only, which then kills it by pid (see
/// [`Tracked`]). Returns the instant right before the spawn.
pub(crate) fn spawn_in(ns: &NetNs, cmd: &mut Command) -> Result<(Instant, Tracked)> {
    cmd.process_group(0);
    let (start, spawned) = ns
        .enter(|| (Instant::now(), cmd.spawn()))
        .with_context(|| format!("entering the netns {}", ns.path().display()))?;
    let child = spawned?;
    Ok((start, Tracked::new(child)))
}

// ---------------------------------------------------------------------------
// ctrl-c: stop at the next step (killing running children), then clean up.

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
const SLOTS: usize = 64;
/// Pids (= process groups) of the running children the bench started, 0 = free slot.
static CHILDREN: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

pub(crate) fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Bails with "interrupted" once ctrl-c (or SIGTERM/SIGHUP) arrived.
pub(crate) fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// A child process whose pid the signal handler knows (to kill its process
/// group on ctrl-c) until it has been waited for. Dropping it kills (by pid)
/// and reaps a child still running. Derefs to the [`Child`].
pub(crate) struct Tracked {
    /// `None` once consumed by [`Tracked::wait_with_output`].
    child: Option<Child>,
    slot: Option<usize>,
}

impl Tracked {
    fn new(child: Child) -> Tracked {
        let pid = child.id() as i32;
        let mut slot = None;
        for _ in 0..SLOTS {
            let i = NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS;
            if CHILDREN[i].compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                slot = Some(i);
                break;
            }
        }
        Tracked { child: Some(child), slot }
    }

    /// Waits for the child to exit and collects its output.
    pub fn wait_with_output(mut self) -> std::io::Result<std::process::Output> {
        let child = self.child.take().expect("a tracked child until consumed");
        let out = child.wait_with_output();
        self.untrack();
        out
    }

    /// Kills the child's process group (SIGKILL) if it is still running, and
    /// reaps it.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // Not yet reaped, so the pid is still this child's.
            if let Ok(None) = child.try_wait() {
                let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            }
            let _ = child.wait();
        }
        self.untrack();
    }

    /// Whether it has exited (reaping it if so).
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        let st = self.child.as_mut().expect("a tracked child until consumed").try_wait()?;
        if st.is_some() {
            self.untrack();
        }
        Ok(st)
    }

    fn untrack(&mut self) {
        if let Some(i) = self.slot.take() {
            CHILDREN[i].store(0, Ordering::SeqCst);
        }
    }
}

impl std::ops::Deref for Tracked {
    type Target = Child;
    fn deref(&self) -> &Child {
        self.child.as_ref().expect("a tracked child until consumed")
    }
}

impl std::ops::DerefMut for Tracked {
    fn deref_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("a tracked child until consumed")
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        // Never leave a child running: kill it (by its pid) and reap it.
        self.kill();
    }
}

extern "C" fn on_signal(_: std::ffi::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    for slot in &CHILDREN {
        let pid = slot.load(Ordering::SeqCst);
        if pid > 0 {
            // kill(2) is async-signal-safe; nix's wrapper neither allocates nor locks.
            let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Catches SIGINT, SIGTERM and SIGHUP for the run: the handler sets the
/// interrupted flag and kills the running children, the run stops at the
/// next step and the [`Workspace`] cleans up. Children start with default
/// dispositions (exec resets handled signals) and an unchanged signal mask.
/// Dropping the guard restores the previous actions.
pub(crate) struct SignalGuard(Vec<(Signal, SigAction)>);

impl SignalGuard {
    pub fn install() -> Result<SignalGuard> {
        let action = SigAction::new(SigHandler::Handler(on_signal), SaFlags::SA_RESTART, SigSet::empty());
        let mut old = Vec::new();
        for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            // SAFETY: the handler only touches atomics and calls kill(2),
            // both async-signal-safe.
            let prev = unsafe { sigaction(sig, &action) }.with_context(|| format!("installing a {sig} handler"))?;
            old.push((sig, prev));
        }
        Ok(SignalGuard(old))
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for (sig, prev) in self.0.drain(..) {
            // SAFETY: puts back the action that was installed before.
            let _ = unsafe { sigaction(sig, &prev) };
        }
    }
}

// ---------------------------------------------------------------------------
// Progress on stderr

/// A `\r` counter line on a terminal; one line announcing the run otherwise.
pub(crate) struct Progress {
    total: usize,
    done: std::cell::Cell<usize>,
    live: bool,
    started: Instant,
}

impl Progress {
    pub fn new(total: usize, announce: &str, quiet: bool) -> Progress {
        let live = !quiet && std::io::stderr().is_terminal();
        if !live {
            eprintln!("{announce} ...");
        }
        Progress { total, done: std::cell::Cell::new(0), live, started: Instant::now() }
    }

    /// Shows what is running now (before it runs).
    pub fn show(&self, what: &str) {
        if self.live {
            let secs = self.started.elapsed().as_secs();
            eprint!("\r\x1b[K[{}/{}] {:>2}:{:02} {what}", self.done.get() + 1, self.total, secs / 60, secs % 60);
        }
    }

    /// Counts one step as done.
    pub fn tick(&self, what: &str) {
        self.done.set(self.done.get() + 1);
        if self.live {
            eprint!("\r\x1b[K[{}/{}] {what}", self.done.get(), self.total);
        }
    }

    pub fn clear(&self) {
        if self.live {
            eprint!("\r\x1b[K");
        }
    }
}

// ---------------------------------------------------------------------------
// Statistics and tables

/// Linear interpolation between the closest ranks of a sorted sample.
pub(crate) fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// The median of unsorted values (NaN if empty).
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

/// Rounds to `digits` significant-looking decimals for JSON.
pub(crate) fn round_to(x: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (x * f).round() / f
}

/// Prints rows as a table: the first column left-aligned, the others
/// right-aligned, two spaces between columns.
pub(crate) fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..header.len())
        .map(|c| {
            rows.iter()
                .map(|row| row.get(c).map(|s| s.chars().count()).unwrap_or(0))
                .chain([header[c].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |row: &[&str]| {
        let mut s = format!("{:<w$}", row[0], w = widths[0]);
        for (c, cell) in row.iter().enumerate().skip(1) {
            s.push_str(&format!("  {:>w$}", cell, w = widths[c]));
        }
        println!("{}", s.trim_end());
    };
    line(header);
    for row in rows {
        line(&row.iter().map(String::as_str).collect::<Vec<_>>());
    }
}

pub(crate) struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub model: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into());
        let cpus = match cpuinfo.lines().filter(|l| l.starts_with("processor")).count() {
            0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            n => n,
        };
        Machine { kernel, cpus, model }
    }
}

/// The 1-minute load average (`/proc/loadavg`), NaN if unreadable.
pub(crate) fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(f64::NAN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate() {
        let s = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&s, 0.5), 2.5);
        assert_eq!(percentile(&s, 0.0), 1.0);
        assert_eq!(percentile(&s, 1.0), 4.0);
        assert!((percentile(&s, 0.95) - 3.85).abs() < 1e-9);
        assert_eq!(percentile(&[7.0], 0.95), 7.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }
}
