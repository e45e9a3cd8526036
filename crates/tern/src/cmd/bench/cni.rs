//! `tern bench cni`: how long a container runtime waits for ADD and DEL, and
//! how many pods per second a node churns through, for every dataplane a CNI
//! plugin sets up (tern's two and the reference bridge plugin), in one run.
//!
//! One more dataplane is only here, not in the registry: `tern-cluster`, the
//! `tern-bridge` config with tern-ipam's `cluster` allocator instead of
//! host-local, against a `tern agent` on a throwaway etcd that the bench
//! starts and stops ([`super::cluster`]). Measured interleaved with the
//! others, its ratio to `tern-bridge` is the price of cluster IPAM per pod.
//!
//! Everything happens in namespaces the bench creates and removes: a "node"
//! netns the plugins run in, and a small pool of pod namespaces reused across
//! cycles (so creating a netns is never timed). The driver stays in the
//! namespace it was started in; it enters the node netns only around each
//! `spawn`, so that the plugin process starts there. See BENCHMARKS.md for
//! the method.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use serde_json::{json, Value};
use tern_sys::netns::NetNs;
use tern_sys::Netlink;

use super::cluster::{self, CniCluster};
use super::dataplanes::{self, CniPlugin, Dataplane, REFERENCE};
use super::{check_interrupt, interrupted, percentile, print_table, round_to};
use super::{Invocation, Machine, Progress, SignalGuard, Workspace};

/// Unrecorded ADD+DEL cycles per dataplane before measuring.
const WARMUP: usize = 3;
/// Pod namespaces: the sequential cycles use them in turn (each cycle's ADD
/// and DEL the same one); each churn worker has its own.
const POD_POOL: usize = 16;
/// Concurrent ADD+DEL workers of the churn measurements.
const CONCURRENCY: [usize; 3] = [1, 4, 16];
/// How long processes a plugin leaves behind may run before it is an error.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
const SETTLE_POLL: Duration = Duration::from_micros(200);

#[derive(clap::Args)]
pub struct CniArgs {
    /// ADD+DEL cycles measured per dataplane.
    #[arg(long, default_value_t = 60, conflicts_with = "quick")]
    pods: usize,
    /// A short run: 20 cycles per dataplane, 32 pods per churn measurement.
    #[arg(long)]
    quick: bool,
    /// Print the results as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Use the tern plugins installed here (`tern install --cni-bin-dir DIR`)
    /// instead of linking this executable into a temporary directory.
    #[arg(long, value_name = "DIR")]
    cni_bin_dir: Option<PathBuf>,
    /// Unrecorded cycles per dataplane before measuring (tests use 0).
    #[arg(long, hide = true)]
    warmup: Option<usize>,
    /// ADD+DEL cycles per churn measurement (at least the concurrency).
    #[arg(long, hide = true)]
    churn_pods: Option<usize>,
    /// Leave out the `tern-cluster` dataplane (no etcd, no agent).
    #[arg(long)]
    no_cluster: bool,
    /// `tern-cluster`'s agent on a local: store even when etcd-server is installed.
    #[arg(long, conflicts_with = "no_cluster")]
    local_store: bool,
}

/// The dataplane `tern-cluster` is compared with: the same plugin config with host-local IPAM.
const CLUSTER_PEER: &str = "tern-bridge";
const CLUSTER: &str = "tern-cluster";

/// `tern-cluster`: `tern-bridge` with the cluster allocator (see the module docs).
fn cluster_dataplane() -> Dataplane {
    Dataplane {
        name: CLUSTER,
        summary: "type tern, mode bridge, isGateway, tern-ipam allocator cluster (tern agent, /26 blocks)",
        cni: Some(CniPlugin {
            plugin: "tern",
            reference: false,
            conf: |data| {
                json!({
                    "cniVersion": "1.0.0",
                    "name": "bench-tern-cluster",
                    "type": "tern",
                    "mode": "bridge",
                    "bridge": "tcbench0",
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {"type": "tern-ipam", "allocator": "cluster", "agentSocket": cluster::cni_socket(data)},
                })
            },
        }),
        pair: dataplanes::cni_pair,
    }
}

/// A dataplane a CNI plugin sets up, with its config for this run.
struct Plane<'a> {
    dp: &'a Dataplane,
    cni: &'a CniPlugin,
    conf: Value,
}

/// The workspace, the node the plugins run in, and the pod pool.
struct Node {
    /// `tern-cluster`'s agent and store: first, so they stop (by pid) before
    /// the workspace removes their directory, also on an early error return.
    cluster: Option<CniCluster>,
    ws: Workspace,
    node: NetNs,
    /// A netlink socket in the node netns, to check what a DEL left.
    nl: Netlink,
    pods: Vec<NetNs>,
}

pub fn run(args: CniArgs) -> Result<()> {
    let pods = if args.quick { 20 } else { args.pods };
    let warmup = args.warmup.unwrap_or(WARMUP);
    let churn_pods = args.churn_pods.unwrap_or(if args.quick { 32 } else { 64 });
    if pods == 0 || churn_pods == 0 {
        bail!("--pods must be at least 1");
    }
    super::preflight("cni")?;

    let _signals = SignalGuard::install()?;
    let ws = Workspace::new(args.cni_bin_dir.as_deref())?;
    let cluster_dp = cluster_dataplane();
    // Before becoming the subreaper: the agent and etcd are started detached
    // and must not be re-parented to us (see super::cluster).
    let cluster = if args.no_cluster {
        None
    } else {
        let data = ws.data(cluster_dp.name);
        std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
        Some(CniCluster::start(&data, args.local_store)?)
    };
    if let Some(note) = cluster.as_ref().and_then(|c| c.store.note.as_ref()) {
        eprintln!("tern bench cni: {CLUSTER}: {note}");
    }
    // Processes a plugin leaves running (tern's DEL hands the veth unregister
    // to one) are re-parented to us, so we can tell when they are done.
    nix::sys::prctl::set_child_subreaper(true).context("prctl(PR_SET_CHILD_SUBREAPER)")?;
    let node = ws.netns("node")?;
    let nl = Netlink::in_netns(&node).context("netlink in the node netns")?;
    let pool = (0..POD_POOL).map(|i| ws.netns(&format!("pod{i}"))).collect::<Result<Vec<_>>>()?;
    let node = Node { cluster, ws, node, nl, pods: pool };

    let registry = dataplanes::registry();
    let extra: Vec<&Dataplane> = node.cluster.iter().map(|_| &cluster_dp).collect();
    let planes: Vec<Plane> = registry
        .iter()
        .chain(extra)
        .filter_map(|dp| dp.cni.as_ref().map(|cni| Plane { dp, cni, conf: (cni.conf)(&node.ws.data(dp.name)) }))
        .collect();
    let mut samples: Vec<Samples> = planes.iter().map(|_| Samples::default()).collect();
    let total = pods * planes.len() + CONCURRENCY.len() * planes.len();
    let announce = format!(
        "tern bench cni: {pods} ADD+DEL cycles for each of {} dataplanes after {warmup} warm-up cycles each, \
         then churn with {CONCURRENCY:?} concurrent workers",
        planes.len()
    );
    let progress = Progress::new(total, &announce, args.json);

    let mut seq = 0usize;
    for round in 0..warmup + pods {
        for (i, p) in planes.iter().enumerate() {
            check_interrupt().inspect_err(|_| progress.clear())?;
            let pod = &node.pods[seq % node.pods.len()];
            let container_id = format!("tern-bench-{}-{round}", p.dp.name);
            let c = node.cycle(p, &container_id, pod).inspect_err(|_| progress.clear())?;
            seq += 1;
            if round >= warmup {
                samples[i].add.push(c.add);
                samples[i].del.push(c.del);
                samples[i].cycle.push(c.add + c.del);
                samples[i].del_done.push(c.del_done);
                progress.tick(&format!("ADD+DEL, {}", p.dp.name));
            }
        }
    }
    for workers in CONCURRENCY {
        for (i, p) in planes.iter().enumerate() {
            let what = format!("churn, {workers} concurrent, {}", p.dp.name);
            progress.show(&what);
            let rate = node.churn(p, workers, churn_pods.max(workers)).inspect_err(|_| progress.clear())?;
            samples[i].churn.push((workers, rate));
            progress.tick(&what);
        }
    }
    progress.clear();

    let machine = Machine::probe();
    let report = Report::new(&planes, &samples);
    let cluster_store = node.cluster.as_ref().map(|c| (c.store.kind, c.store.note.clone()));
    if args.json {
        let mut out = report.to_json(&machine, pods, warmup, churn_pods);
        if let Some(c) = report.cluster_json(cluster_store) {
            out["cluster_ipam"] = c;
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        report.print_table(&machine, pods, warmup, churn_pods, &planes);
        report.print_cluster(cluster_store);
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
    /// (concurrent workers, pods per second)
    churn: Vec<(usize, f64)>,
}

impl Node {
    /// One ADD then one DEL of `container_id` in `pod`, each followed by a
    /// wait until the node is quiet. The DEL gets the ADD's result as
    /// `prevResult`, as libcni does.
    fn cycle(&self, p: &Plane, container_id: &str, pod: &NetNs) -> Result<Cycle> {
        let (result, add) = add(&self.ws, &self.node, p, container_id, pod)?;
        self.settle(p, &format!("ADD {container_id}"))?;
        let del = del(&self.ws, &self.node, p, container_id, pod, result)?;
        let quiet = self.settle(p, &format!("DEL {container_id}"))?;
        Ok(Cycle { add: add.elapsed, del: del.elapsed, del_done: quiet.duration_since(del.start) })
    }

    /// Pod churn: `workers` threads, each in its own pod netns, do ADD then
    /// DEL of a fresh container until `total` cycles are done. The clock
    /// runs from the first ADD until every plugin and every process one left
    /// behind has exited. Returns cycles (pods) per second.
    fn churn(&self, p: &Plane, workers: usize, total: usize) -> Result<f64> {
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
        let (ws, node) = (&self.ws, &self.node);
        let start = Instant::now();
        std::thread::scope(|s| {
            for pod in &self.pods[..workers] {
                let (next, failed, error) = (&next, &failed, &error);
                s.spawn(move || loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= total || failed.load(Ordering::SeqCst) || interrupted() {
                        return;
                    }
                    let cid = format!("tern-bench-{}-churn{workers}-{i}", p.dp.name);
                    let r = add(ws, node, p, &cid, pod).and_then(|(res, _)| del(ws, node, p, &cid, pod, res));
                    if let Err(e) = r {
                        failed.store(true, Ordering::SeqCst);
                        error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                        return;
                    }
                });
            }
        });
        if let Some(e) = error.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e.context(format!("{}: churn with {workers} concurrent workers", p.dp.name)));
        }
        check_interrupt()?;
        let done = self.settle(p, &format!("DEL (churn, {workers} workers)"))?;
        Ok(total as f64 / done.duration_since(start).as_secs_f64())
    }

    /// Waits until every process the plugins left behind has exited (the
    /// bench is their child subreaper): a DEL that hands the veth's
    /// unregister to a background process has then really finished. Every
    /// invocation thus starts on a quiet node, and no dataplane's deferred
    /// work is charged to the next one's timing. Then checks that no veth is
    /// left in the node netns after a DEL. Not while plugins run on other
    /// threads: it reaps any child.
    fn settle(&self, p: &Plane, what: &str) -> Result<Instant> {
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let done = loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Err(Errno::ECHILD) => break Instant::now(),
                Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => {}
                Ok(_) => continue, // reaped one; there may be more
                Err(e) => bail!("waiting for processes left by {what}: {e}"),
            }
            check_interrupt()?;
            if Instant::now() > deadline {
                bail!("{}: processes started by {what} still running after {:?}", p.dp.name, SETTLE_TIMEOUT);
            }
            std::thread::sleep(SETTLE_POLL);
        };
        if what.starts_with("DEL") {
            let left: Vec<String> = self
                .nl
                .links()
                .context("listing links in the node netns")?
                .into_iter()
                .filter(|l| l.kind.as_deref() == Some("veth"))
                .map(|l| l.name)
                .collect();
            if !left.is_empty() {
                bail!("{}: {what} left veth {} in the node netns", p.dp.name, left.join(", "));
            }
        }
        Ok(done)
    }
}

/// ADD; the result must have `ips`. Returns the result and the timing.
fn add(ws: &Workspace, node: &NetNs, p: &Plane, container_id: &str, pod: &NetNs) -> Result<(Value, super::Invoked)> {
    let conf = p.conf.to_string();
    let out = ws.invoke(&Invocation {
        dataplane: p.dp.name,
        plugin: p.cni,
        command: "ADD",
        container_id,
        node,
        pod,
        conf: &conf,
    })?;
    let result: Value = serde_json::from_str(&out.stdout)
        .ok()
        .filter(|v: &Value| v.get("ips").and_then(Value::as_array).is_some_and(|a| !a.is_empty()))
        .ok_or_else(|| {
            anyhow!("{}: ADD {container_id} exited 0 but printed no result with ips:\n{}", p.dp.name, out.stdout)
        })?;
    Ok((result, out))
}

/// DEL with the ADD's result as `prevResult`.
fn del(
    ws: &Workspace,
    node: &NetNs,
    p: &Plane,
    container_id: &str,
    pod: &NetNs,
    prev: Value,
) -> Result<super::Invoked> {
    let mut conf = p.conf.clone();
    conf["prevResult"] = prev;
    ws.invoke(&Invocation {
        dataplane: p.dp.name,
        plugin: p.cni,
        command: "DEL",
        container_id,
        node,
        pod,
        conf: &conf.to_string(),
    })
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
        json!({"p50": round_to(self.p50, 3), "p95": round_to(self.p95, 3)})
    }
}

struct Row {
    name: &'static str,
    add: Stat,
    del: Stat,
    cycle: Stat,
    del_done: Stat,
    ratio: Option<f64>,
    /// (workers, pods per second, ratio to the reference's)
    churn: Vec<(usize, f64, Option<f64>)>,
}

struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn new(planes: &[Plane], samples: &[Samples]) -> Report {
        let reference = planes.iter().position(|p| p.dp.name == REFERENCE);
        let ref_cycle = reference.map(|i| Stat::of(&samples[i].cycle).p50);
        let ref_churn = |workers: usize| {
            reference.and_then(|i| samples[i].churn.iter().find(|(w, _)| *w == workers).map(|(_, r)| *r))
        };
        let rows = planes
            .iter()
            .zip(samples)
            .map(|(p, s)| {
                let cycle = Stat::of(&s.cycle);
                Row {
                    name: p.dp.name,
                    add: Stat::of(&s.add),
                    del: Stat::of(&s.del),
                    cycle,
                    del_done: Stat::of(&s.del_done),
                    ratio: ref_cycle.map(|r| cycle.p50 / r),
                    churn: s.churn.iter().map(|&(w, rate)| (w, rate, ref_churn(w).map(|r| rate / r))).collect(),
                }
            })
            .collect();
        Report { rows }
    }

    fn to_json(&self, machine: &Machine, pods: usize, warmup: usize, churn_pods: usize) -> Value {
        json!({
            "bench": "cni",
            "machine": {"kernel": machine.kernel, "cpus": machine.cpus, "cpu_model": machine.model},
            "pods": pods,
            "warmup": warmup,
            "churn_pods": churn_pods,
            "ip_masq": false,
            "dataplanes": self.rows.iter().map(|r| json!({
                "name": r.name,
                "add_ms": r.add.to_json(),
                "del_ms": r.del.to_json(),
                "cycle_ms": r.cycle.to_json(),
                "del_until_done_ms": r.del_done.to_json(),
                "ratio_to_ref": r.ratio.map(|x| round_to(x, 3)),
                "churn_pods_per_s": r.churn.iter()
                    .map(|(w, rate, _)| (w.to_string(), json!(round_to(*rate, 2))))
                    .collect::<serde_json::Map<_, _>>(),
                "churn_ratio_to_ref": r.churn.iter()
                    .map(|(w, _, ratio)| (w.to_string(), json!(ratio.map(|x| round_to(x, 3)))))
                    .collect::<serde_json::Map<_, _>>(),
            })).collect::<Vec<_>>(),
        })
    }

    /// `tern-cluster` against `tern-bridge` (same plugin config, cluster
    /// IPAM instead of host-local): ratios of the medians, and of churn.
    fn cluster_json(&self, store: Option<(&str, Option<String>)>) -> Option<Value> {
        let (kind, note) = store?;
        let c = self.rows.iter().find(|r| r.name == CLUSTER)?;
        let b = self.rows.iter().find(|r| r.name == CLUSTER_PEER)?;
        let churn: serde_json::Map<String, Value> = c
            .churn
            .iter()
            .zip(&b.churn)
            .map(|((w, rc, _), (_, rb, _))| (w.to_string(), json!(round_to(rc / rb, 3))))
            .collect();
        Some(json!({
            "dataplane": CLUSTER,
            "compared_with": CLUSTER_PEER,
            "store": kind,
            "note": note,
            "add_ratio": round_to(c.add.p50 / b.add.p50, 3),
            "del_ratio": round_to(c.del.p50 / b.del.p50, 3),
            "cycle_ratio": round_to(c.cycle.p50 / b.cycle.p50, 3),
            "churn_ratio": churn,
        }))
    }

    fn print_cluster(&self, store: Option<(&str, Option<String>)>) {
        let Some(c) = self.cluster_json(store) else { return };
        println!();
        println!(
            "cluster IPAM ({CLUSTER} / {CLUSTER_PEER}, medians; agent on a throwaway {} store): \
             ADD {}x, DEL {}x, ADD+DEL {}x; churn {}",
            c["store"].as_str().unwrap_or("?"),
            c["add_ratio"],
            c["del_ratio"],
            c["cycle_ratio"],
            c["churn_ratio"]
                .as_object()
                .map(|m| m.iter().map(|(w, r)| format!("N={w} {r}x")).collect::<Vec<_>>().join(", "))
                .unwrap_or_default()
        );
        if let Some(note) = c["note"].as_str() {
            println!("note: {note}");
        }
    }

    fn print_table(&self, machine: &Machine, pods: usize, warmup: usize, churn_pods: usize, planes: &[Plane]) {
        println!(
            "tern bench cni: {pods} ADD+DEL cycles per dataplane, interleaved, after {warmup} warm-up cycles each"
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
        let f = |x: f64| format!("{x:.2}");
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
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
        print_table(&header, &rows);
        println!();
        println!("times in ms, spawn to exit of the plugin process; vs ref = ADD+DEL median / {REFERENCE}'s;");
        println!(
            "DEL→done = from DEL's start until it and every process it started (background veth unregister) exited"
        );
        println!();

        println!("churn: pods per second (ADD+DEL cycles per second) with N concurrent workers");
        let mut header = vec!["dataplane".to_string()];
        header.extend(CONCURRENCY.iter().map(|w| format!("N={w}")));
        header.extend(CONCURRENCY.iter().map(|w| format!("vs ref ({w})")));
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                let mut row = vec![r.name.to_string()];
                row.extend(r.churn.iter().map(|(_, rate, _)| format!("{rate:.1}")));
                row.extend(r.churn.iter().map(|(_, _, x)| x.map(|x| format!("{x:.2}x")).unwrap_or("-".into())));
                row
            })
            .collect();
        print_table(&header.iter().map(String::as_str).collect::<Vec<_>>(), &rows);
        println!();
        println!(
            "churn = {churn_pods} ADD+DEL cycles per measurement, each worker in its own pod netns; the clock stops"
        );
        println!("when every plugin and every process one started had exited");
        let w = planes.iter().map(|p| p.dp.name.len()).max().unwrap_or(0);
        for p in planes {
            println!("  {:<w$}  {}", p.dp.name, p.dp.summary);
        }
    }
}
