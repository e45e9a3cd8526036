//! `tern bench cni`: how long a container runtime waits for ADD and DEL, for
//! tern's two dataplanes and for the reference bridge plugin, in one run.
//!
//! Everything happens in namespaces the bench creates and removes: a "node"
//! netns the plugins run in, and a small pool of pod namespaces reused across
//! cycles (so creating a netns is never timed). The driver stays in the
//! namespace it was started in; it enters the node netns only around each
//! `spawn`, so that the plugin process starts there. See BENCHMARKS.md for
//! the method.
//!
//! The only `unsafe` here is installing the ctrl-c handler (`sigaction`);
//! the namespace switch is tern-sys's [`NetNs::enter`].
use std::io::{IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::sys::signal::{killpg, sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tern_sys::netns::{self, NetNs};
use tern_sys::Netlink;

/// Where Debian's containernetworking-plugins puts the reference plugins.
const REFERENCE_DIR: &str = "/usr/lib/cni";
/// Unrecorded ADD+DEL cycles per dataplane before measuring.
const WARMUP: usize = 3;
/// Pod namespaces, used in turn; each cycle's ADD and DEL use the same one.
const POD_POOL: usize = 6;
/// How long processes a plugin leaves behind may run before it is an error.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
const SETTLE_POLL: Duration = Duration::from_micros(200);
const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand)]
enum What {
    /// Time CNI ADD and DEL: tern (bridge and routed) against the reference bridge plugin.
    Cni(CniArgs),
}

#[derive(clap::Args)]
struct CniArgs {
    /// ADD+DEL cycles measured per dataplane.
    #[arg(long, default_value_t = 60, conflicts_with = "quick")]
    pods: usize,
    /// A short run: 20 cycles per dataplane.
    #[arg(long)]
    quick: bool,
    /// Print the results as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Use the tern plugins installed here (`tern install --cni-bin-dir DIR`)
    /// instead of linking this executable into a temporary directory.
    #[arg(long, value_name = "DIR")]
    cni_bin_dir: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Cni(a) => cni(a),
    }
}

// ---------------------------------------------------------------------------
// Dataplanes

struct Dataplane {
    name: &'static str,
    /// What is configured, for the table's legend.
    summary: &'static str,
    plugin: &'static str,
    /// Whether the plugin is one of the reference plugins in [`REFERENCE_DIR`].
    reference: bool,
    conf: Value,
}

fn dataplanes(data_root: &Path) -> Vec<Dataplane> {
    let data = |name: &str| data_root.join(name).display().to_string();
    vec![
        Dataplane {
            name: "tern-bridge",
            summary: "type tern, mode bridge, isGateway, tern-ipam (host-local range)",
            plugin: "tern",
            reference: false,
            conf: json!({
                "cniVersion": "1.0.0",
                "name": "bench-tern-bridge",
                "type": "tern",
                "mode": "bridge",
                "bridge": "tbench0",
                "isGateway": true,
                "ipMasq": false,
                "ipam": {"type": "tern-ipam", "ranges": [[{"subnet": "10.251.1.0/24"}]], "dataDir": data("tern-bridge")},
            }),
        },
        Dataplane {
            name: "tern-routed",
            summary: "type tern, mode routed, tern-ipam (host-local range)",
            plugin: "tern",
            reference: false,
            conf: json!({
                "cniVersion": "1.0.0",
                "name": "bench-tern-routed",
                "type": "tern",
                "mode": "routed",
                "ipMasq": false,
                "ipam": {"type": "tern-ipam", "ranges": [[{"subnet": "10.251.2.0/24"}]], "dataDir": data("tern-routed")},
            }),
        },
        Dataplane {
            name: "ref-bridge",
            summary: "reference bridge + host-local (/usr/lib/cni), isGateway",
            plugin: "bridge",
            reference: true,
            conf: json!({
                "cniVersion": "1.0.0",
                "name": "bench-ref-bridge",
                "type": "bridge",
                "bridge": "rbench0",
                "isGateway": true,
                "ipMasq": false,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.251.3.0/24"}]], "dataDir": data("ref-bridge")},
            }),
        },
    ]
}

/// The dataplane every ratio is taken against.
const REFERENCE: &str = "ref-bridge";

// ---------------------------------------------------------------------------
// The run

fn cni(args: CniArgs) -> Result<()> {
    let pods = if args.quick { 20 } else { args.pods };
    if pods == 0 {
        bail!("--pods must be at least 1");
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
    if !nix::unistd::geteuid().is_root() {
        bail!("tern bench cni creates network namespaces: run it as root");
    }

    let _signals = SignalGuard::install()?;
    // Processes a plugin leaves running (tern's DEL hands the veth unregister
    // to one) are re-parented to us, so we can tell when they are done.
    nix::sys::prctl::set_child_subreaper(true).context("prctl(PR_SET_CHILD_SUBREAPER)")?;
    let sandbox = Sandbox::new(args.cni_bin_dir.as_deref())?;
    let planes = dataplanes(&sandbox.data_dir);
    let mut samples: Vec<Samples> = planes.iter().map(|_| Samples::default()).collect();
    let progress = Progress::new(pods, planes.len(), args.json);

    let mut seq = 0usize;
    for round in 0..WARMUP + pods {
        for (i, dp) in planes.iter().enumerate() {
            if INTERRUPTED.load(Ordering::SeqCst) {
                progress.clear();
                bail!("interrupted");
            }
            let pod = &sandbox.pods[seq % sandbox.pods.len()];
            let container_id = format!("tern-bench-{}-{round}", dp.name);
            let c = sandbox.cycle(dp, &container_id, pod).inspect_err(|_| progress.clear())?;
            seq += 1;
            if round >= WARMUP {
                samples[i].add.push(c.add);
                samples[i].del.push(c.del);
                samples[i].cycle.push(c.add + c.del);
                samples[i].del_done.push(c.del_done);
                progress.tick(dp.name);
            }
        }
    }
    progress.clear();

    let machine = Machine::probe();
    let report = Report::new(&planes, &samples);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json(&machine, pods))?);
    } else {
        report.print_table(&machine, pods, &planes);
    }
    Ok(())
}

/// One ADD+DEL: wall-clock times of the two plugin processes, and the time
/// from the start of DEL until it and every process it started had exited.
struct Cycle {
    add: Duration,
    del: Duration,
    del_done: Duration,
}

#[derive(Default)]
struct Samples {
    add: Vec<Duration>,
    del: Vec<Duration>,
    cycle: Vec<Duration>,
    del_done: Vec<Duration>,
}

// ---------------------------------------------------------------------------
// Namespaces, plugin directory, data directories: made here, removed on drop.

/// Everything the bench creates; `Drop` removes exactly what was created.
struct Sandbox {
    /// The node netns; `node_path` is set once it exists.
    node: Option<NetNs>,
    node_path: Option<PathBuf>,
    /// A netlink socket in the node netns, to check what a DEL left.
    node_nl: Option<Netlink>,
    pods: Vec<PodNs>,
    /// Set once created.
    work_dir: Option<PathBuf>,
    data_dir: PathBuf,
    /// Where the `tern` and `tern-ipam` plugins are.
    tern_dir: PathBuf,
}

struct PodNs {
    path: PathBuf,
    _ns: NetNs,
}

impl Sandbox {
    fn new(cni_bin_dir: Option<&Path>) -> Result<Sandbox> {
        let pid = std::process::id();
        let work_dir = std::env::temp_dir().join(format!("tern-bench-{pid}"));
        let mut sb = Sandbox {
            node: None,
            node_path: None,
            node_nl: None,
            pods: Vec::new(),
            work_dir: None,
            data_dir: work_dir.join("data"),
            tern_dir: PathBuf::new(),
        };
        // From here on `sb` is dropped (and cleans up) on every early return.
        std::fs::create_dir(&work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
        sb.work_dir = Some(work_dir.clone());
        std::fs::create_dir(&sb.data_dir).with_context(|| format!("creating {}", sb.data_dir.display()))?;
        sb.tern_dir = match cni_bin_dir {
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

        let node_path = PathBuf::from(format!("/run/netns/tern-bench-{pid}"));
        let node = netns::create(&node_path)
            .with_context(|| format!("creating the node netns {} (are you root?)", node_path.display()))?;
        sb.node_path = Some(node_path);
        sb.node_nl = Some(Netlink::in_netns(&node).context("netlink in the node netns")?);
        sb.node = Some(node);
        for i in 0..POD_POOL {
            let path = PathBuf::from(format!("/run/netns/tern-bench-{pid}-pod{i}"));
            let ns = netns::create(&path).with_context(|| format!("creating the pod netns {}", path.display()))?;
            sb.pods.push(PodNs { path, _ns: ns });
        }
        Ok(sb)
    }

    /// The dataplane's plugin executable and its `CNI_PATH`: the reference
    /// plugins see only their own directory, tern's see tern's first.
    fn plugin(&self, dp: &Dataplane) -> (PathBuf, String) {
        if dp.reference {
            (Path::new(REFERENCE_DIR).join(dp.plugin), REFERENCE_DIR.to_string())
        } else {
            (self.tern_dir.join(dp.plugin), format!("{}:{REFERENCE_DIR}", self.tern_dir.display()))
        }
    }

    /// One ADD then one DEL of `container_id` in `pod`, then a wait until the
    /// node is quiet. The DEL gets the ADD's result as `prevResult`, as
    /// libcni does.
    fn cycle(&self, dp: &Dataplane, container_id: &str, pod: &PodNs) -> Result<Cycle> {
        let conf = dp.conf.to_string();
        let (_, add_time, add_out) = self.invoke(dp, "ADD", container_id, pod, &conf)?;
        self.settle(dp, &format!("ADD {container_id}"))?;
        let result: Value = serde_json::from_str(&add_out)
            .ok()
            .filter(|v: &Value| v.get("ips").and_then(Value::as_array).is_some_and(|a| !a.is_empty()))
            .ok_or_else(|| {
                anyhow!("{}: ADD {container_id} exited 0 but printed no result with ips:\n{add_out}", dp.name)
            })?;
        let mut del_conf = dp.conf.clone();
        del_conf["prevResult"] = result;
        let (del_start, del_time, _) = self.invoke(dp, "DEL", container_id, pod, &del_conf.to_string())?;
        let quiet = self.settle(dp, &format!("DEL {container_id}"))?;
        Ok(Cycle { add: add_time, del: del_time, del_done: quiet.duration_since(del_start) })
    }

    /// Waits until every process the plugin left behind has exited (the
    /// bench is their child subreaper): a DEL that hands the veth's
    /// unregister to a background process has then really finished. Every
    /// invocation thus starts on a quiet node, and no dataplane's deferred
    /// work is charged to the next one's timing. Then checks that no veth is
    /// left in the node netns.
    fn settle(&self, dp: &Dataplane, what: &str) -> Result<Instant> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let done = loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Err(Errno::ECHILD) => break Instant::now(),
                Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {}
                Ok(_) => continue, // reaped one; there may be more
                Err(e) => bail!("waiting for processes left by {what}: {e}"),
            }
            if INTERRUPTED.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            if Instant::now() > deadline {
                bail!("{}: processes started by {what} still running after {:?}", dp.name, SETTLE_TIMEOUT);
            }
            std::thread::sleep(SETTLE_POLL);
        };
        let left: Vec<String> = self
            .node_nl
            .as_ref()
            .expect("node netlink exists while running")
            .links()
            .context("listing links in the node netns")?
            .into_iter()
            .filter(|l| l.kind.as_deref() == Some("veth"))
            .map(|l| l.name)
            .collect();
        if what.starts_with("DEL") && !left.is_empty() {
            bail!("{}: {what} left veth {} in the node netns", dp.name, left.join(", "));
        }
        Ok(done)
    }

    /// Runs the dataplane's plugin as a runtime would, its process in the
    /// node netns; times spawn to exit. Any failure is an error showing the
    /// plugin's exit status, stdout and stderr.
    fn invoke(
        &self,
        dp: &Dataplane,
        command: &str,
        container_id: &str,
        pod: &PodNs,
        conf: &str,
    ) -> Result<(Instant, Duration, String)> {
        let node = self.node.as_ref().expect("node netns exists while running");
        let (exe, cni_path) = self.plugin(dp);
        let mut cmd = Command::new(&exe);
        cmd.env_clear()
            .env("PATH", PATH_ENV)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_NETNS", &pod.path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &cni_path)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: a terminal's ctrl-c reaches the driver
            // only, which then kills the plugin and cleans up.
            .process_group(0);
        // The child inherits the namespace of the thread that spawns it.
        // Timing starts in the node netns, right before the spawn, and ends
        // when the plugin's exit and output have been collected.
        let (start, spawned) = node
            .enter(|| (Instant::now(), cmd.spawn()))
            .with_context(|| format!("entering the node netns {}", node.path().display()))?;
        let mut child = spawned.with_context(|| format!("starting {}", exe.display()))?;
        CHILD.store(child.id() as i32, Ordering::SeqCst);
        if let Some(mut stdin) = child.stdin.take() {
            // A config is far below the pipe buffer: this never blocks.
            let _ = stdin.write_all(conf.as_bytes());
        }
        let out = child.wait_with_output();
        let elapsed = start.elapsed();
        CHILD.store(0, Ordering::SeqCst);
        let out = out.with_context(|| format!("waiting for {}", exe.display()))?;

        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            if INTERRUPTED.load(Ordering::SeqCst) {
                bail!("interrupted");
            }
            bail!(
                "{}: {command} {container_id} failed ({}), plugin {}\nCNI_NETNS={} (in node netns {})\n--- stdin\n{conf}\n--- stdout\n{}\n--- stderr\n{}",
                dp.name,
                out.status,
                exe.display(),
                pod.path.display(),
                node.path().display(),
                stdout.trim_end(),
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
        }
        Ok((start, elapsed, stdout))
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Unpin the namespaces; closing our descriptors lets the kernel
        // destroy them, and with them every link a failed run left behind.
        self.node_nl = None;
        self.node = None;
        let pods = self.pods.drain(..).map(|p| p.path);
        for path in pods.chain(self.node_path.take()) {
            if let Err(e) = netns::remove(&path) {
                eprintln!("tern bench: cannot remove {}: {e}", path.display());
            }
        }
        if let Some(dir) = self.work_dir.take() {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                eprintln!("tern bench: cannot remove {}: {e}", dir.display());
            }
        }
    }
}

// ---------------------------------------------------------------------------
// ctrl-c: stop at the next step (killing a running plugin), then clean up.

static INTERRUPTED: AtomicBool = AtomicBool::new(false);
/// The running plugin's pid (= its process group), 0 when none.
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(_: std::ffi::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // kill(2) is async-signal-safe; nix's wrapper neither allocates nor locks.
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// Catches SIGINT, SIGTERM and SIGHUP for the run: the handler sets
/// [`INTERRUPTED`] and kills the running plugin, the run stops at the next
/// step and the [`Sandbox`] cleans up. Plugins start with default
/// dispositions (exec resets handled signals) and an unchanged signal mask.
/// Dropping the guard restores the previous actions.
struct SignalGuard(Vec<(Signal, SigAction)>);

impl SignalGuard {
    fn install() -> Result<SignalGuard> {
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

struct Progress {
    total: usize,
    done: std::cell::Cell<usize>,
    live: bool,
}

impl Progress {
    fn new(pods: usize, planes: usize, quiet: bool) -> Progress {
        let live = !quiet && std::io::stderr().is_terminal();
        if !live {
            eprintln!(
                "tern bench cni: {pods} ADD+DEL cycles for each of {planes} dataplanes, after {WARMUP} warm-up cycles each ..."
            );
        }
        Progress { total: pods * planes, done: std::cell::Cell::new(0), live }
    }

    fn tick(&self, name: &str) {
        self.done.set(self.done.get() + 1);
        if self.live {
            eprint!("\r\x1b[Kcycle {}/{} ({name})", self.done.get(), self.total);
        }
    }

    fn clear(&self) {
        if self.live {
            eprint!("\r\x1b[K");
        }
    }
}

// ---------------------------------------------------------------------------
// Statistics and output

#[derive(Clone, Copy)]
struct Stat {
    p50: f64,
    p95: f64,
}

impl Stat {
    fn of(samples: &[Duration]) -> Stat {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        Stat { p50: percentile(&ms, 0.50), p95: percentile(&ms, 0.95) }
    }

    fn to_json(self) -> Value {
        json!({"p50": round3(self.p50), "p95": round3(self.p95)})
    }
}

/// Linear interpolation between the closest ranks of a sorted sample.
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

struct Row {
    name: &'static str,
    add: Stat,
    del: Stat,
    cycle: Stat,
    del_done: Stat,
    ratio: Option<f64>,
}

struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn new(planes: &[Dataplane], samples: &[Samples]) -> Report {
        let mut rows: Vec<Row> = planes
            .iter()
            .zip(samples)
            .map(|(dp, s)| Row {
                name: dp.name,
                add: Stat::of(&s.add),
                del: Stat::of(&s.del),
                cycle: Stat::of(&s.cycle),
                del_done: Stat::of(&s.del_done),
                ratio: None,
            })
            .collect();
        if let Some(reference) = rows.iter().find(|r| r.name == REFERENCE).map(|r| r.cycle.p50) {
            for r in &mut rows {
                r.ratio = Some(r.cycle.p50 / reference);
            }
        }
        Report { rows }
    }

    fn to_json(&self, machine: &Machine, pods: usize) -> Value {
        json!({
            "machine": {"kernel": machine.kernel, "cpus": machine.cpus, "cpu_model": machine.model},
            "pods": pods,
            "warmup": WARMUP,
            "ip_masq": false,
            "dataplanes": self.rows.iter().map(|r| json!({
                "name": r.name,
                "add_ms": r.add.to_json(),
                "del_ms": r.del.to_json(),
                "cycle_ms": r.cycle.to_json(),
                "del_until_done_ms": r.del_done.to_json(),
                "ratio_to_ref": r.ratio.map(|x| (x * 100.0).round() / 100.0),
            })).collect::<Vec<_>>(),
        })
    }

    fn print_table(&self, machine: &Machine, pods: usize, planes: &[Dataplane]) {
        println!(
            "tern bench cni: {pods} ADD+DEL cycles per dataplane, interleaved, after {WARMUP} warm-up cycles each"
        );
        println!("machine: Linux {}, {} x {}", machine.kernel, machine.cpus, machine.model);
        println!("no ipMasq in any dataplane; IPv4 only; plugins run in a throwaway node netns");
        println!();
        let header = [
            "dataplane",
            "ADD p50",
            "ADD p95",
            "DEL p50",
            "DEL p95",
            "ADD+DEL p50",
            "ADD+DEL p95",
            "vs ref",
            "DEL→done p50",
            "p95",
        ];
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                let f = |x: f64| format!("{x:.2}");
                vec![
                    r.name.to_string(),
                    f(r.add.p50),
                    f(r.add.p95),
                    f(r.del.p50),
                    f(r.del.p95),
                    f(r.cycle.p50),
                    f(r.cycle.p95),
                    r.ratio.map(|x| format!("{x:.2}x")).unwrap_or_else(|| "-".into()),
                    f(r.del_done.p50),
                    f(r.del_done.p95),
                ]
            })
            .collect();
        let widths: Vec<usize> = (0..header.len())
            .map(|c| {
                cells.iter().map(|row| row[c].chars().count()).chain([header[c].chars().count()]).max().unwrap_or(0)
            })
            .collect();
        let line = |row: &[&str]| {
            let mut s = format!("{:<w$}", row[0], w = widths[0]);
            for (c, cell) in row.iter().enumerate().skip(1) {
                s.push_str(&format!("  {:>w$}", cell, w = widths[c]));
            }
            println!("{}", s.trim_end());
        };
        line(&header);
        for row in &cells {
            line(&row.iter().map(String::as_str).collect::<Vec<_>>());
        }
        println!();
        println!("times in ms, spawn to exit of the plugin process; vs ref = ADD+DEL median / {REFERENCE}'s;");
        println!(
            "DEL→done = from DEL's start until it and every process it started (background veth unregister) exited"
        );
        for dp in planes {
            println!("  {:<w$}  {}", dp.name, dp.summary, w = widths[0]);
        }
    }
}

struct Machine {
    kernel: String,
    cpus: usize,
    model: String,
}

impl Machine {
    fn probe() -> Machine {
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
    }
}
