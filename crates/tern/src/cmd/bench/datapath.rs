//! `tern bench datapath`: what two pods of one node get from each dataplane:
//! request/response latency, single- and multi-stream throughput, the CPU
//! that throughput costs, and the rate of new connections. The limit (a bare
//! veth pair), tern's dataplanes and the reference bridge plugin are set up
//! side by side in throwaway namespaces and measured in one run, interleaved,
//! so their ratios hold on a noisy machine. See BENCHMARKS.md for the method.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Map, Value};

use super::crossnode::is_cross_node;
use super::dataplanes::{self, Dataplane, Pair, NATIVE, REFERENCE, UNDERLAY};
use super::traffic::{self, EchoServer, Iperf, Pin, PAYLOAD};
use super::{check_interrupt, interrupted, loadavg, median, percentile, print_table, round_to, svg};
use super::{Machine, Progress, SignalGuard, Workspace};

#[derive(clap::Args)]
pub struct DatapathArgs {
    /// Rounds; in each, every dataplane is measured once, interleaved (A B C D A B C D ...). Default 3, 1 with --quick.
    #[arg(long)]
    rounds: Option<usize>,
    /// A short run (under 2 minutes): 1 round, 10000 round trips, 2 s throughput and 1 s connection-rate runs.
    #[arg(long)]
    quick: bool,
    /// Print the results as one JSON object instead of tables.
    #[arg(long)]
    json: bool,
    /// Only these dataplanes, comma-separated (e.g. underlay,direct,vxlan) [default: all].
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    dataplanes: Vec<String>,
    /// Also draw latency percentiles, throughput and connection rate per dataplane into this SVG file.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Use the tern plugins installed here (`tern install --cni-bin-dir DIR`)
    /// instead of linking this executable into a temporary directory.
    #[arg(long, value_name = "DIR")]
    cni_bin_dir: Option<PathBuf>,
    /// Where client and server run: `same` (both on the first CPU this process may use), `split` (client on the
    /// first, server on the second), `none` (where the scheduler puts them).
    #[arg(long, value_enum, default_value = "same")]
    pin: Pin,
    /// Timed round trips per dataplane and round (tests use a few).
    #[arg(long, hide = true)]
    samples: Option<usize>,
    /// Length of each connection-rate run, and of each throughput run rounded up to whole seconds (tests).
    #[arg(long, hide = true, value_name = "MS")]
    duration_ms: Option<u64>,
}

/// What one run does.
struct Config {
    rounds: usize,
    warmup: usize,
    samples: usize,
    /// Each iperf3 test, in seconds (iperf3 takes whole seconds).
    iperf_secs: u32,
    crr: Duration,
    pin: Pin,
    /// (client CPU, server CPU) when pinned.
    cpus: Option<(usize, usize)>,
}

impl Config {
    fn of(a: &DatapathArgs) -> Result<Config> {
        let mut c = if a.quick {
            Config {
                rounds: 1,
                warmup: 1_000,
                samples: 10_000,
                iperf_secs: 2,
                crr: Duration::from_secs(1),
                pin: a.pin,
                cpus: None,
            }
        } else {
            // 3 s throughput runs: with every registered dataplane (11) and
            // 3 rounds the default run stays under 6 minutes.
            Config {
                rounds: 3,
                warmup: 5_000,
                samples: 50_000,
                iperf_secs: 3,
                crr: Duration::from_millis(1500),
                pin: a.pin,
                cpus: None,
            }
        };
        if let Some(r) = a.rounds {
            c.rounds = r;
        }
        if let Some(s) = a.samples {
            c.samples = s;
            c.warmup = (s / 10).max(1);
        }
        if let Some(ms) = a.duration_ms {
            c.crr = Duration::from_millis(ms);
            c.iperf_secs = ms.div_ceil(1000).max(1) as u32;
        }
        c.cpus = c.pin.cpus()?;
        if c.rounds == 0 || c.samples == 0 || c.crr.is_zero() {
            anyhow::bail!("--rounds, --samples and --duration-ms must be at least 1");
        }
        Ok(c)
    }
}

/// The figures, in the order of every table, JSON object and ratio.
#[derive(Clone, Copy)]
struct Metric {
    key: &'static str,
    /// Column heading.
    head: &'static str,
    unit: &'static str,
    higher_is_better: bool,
    /// Decimals in the table.
    decimals: usize,
}

const LAT_P50: usize = 0;
const LAT_P95: usize = 1;
const LAT_P99: usize = 2;
const TPUT_1: usize = 3;
const TPUT_4: usize = 4;
const CPU: usize = 5;
const CRR: usize = 6;

const METRICS: [Metric; 7] = [
    Metric { key: "latency_p50_us", head: "lat p50", unit: "µs", higher_is_better: false, decimals: 1 },
    Metric { key: "latency_p95_us", head: "lat p95", unit: "µs", higher_is_better: false, decimals: 1 },
    Metric { key: "latency_p99_us", head: "lat p99", unit: "µs", higher_is_better: false, decimals: 1 },
    Metric { key: "throughput_1_stream_gbps", head: "1 stream", unit: "Gbit/s", higher_is_better: true, decimals: 2 },
    Metric { key: "throughput_4_streams_gbps", head: "4 streams", unit: "Gbit/s", higher_is_better: true, decimals: 2 },
    Metric { key: "cpu_s_per_gbit", head: "CPU", unit: "s/Gbit", higher_is_better: false, decimals: 3 },
    Metric { key: "connections_per_s", head: "conn rate", unit: "conn/s", higher_is_better: true, decimals: 0 },
];

/// The measurements of one round, one after the other for every dataplane.
#[derive(Clone, Copy)]
enum Step {
    Latency,
    Throughput(u32),
    ConnRate,
}

const STEPS: [Step; 4] = [Step::Latency, Step::Throughput(1), Step::Throughput(4), Step::ConnRate];

impl Step {
    fn label(self) -> String {
        match self {
            Step::Latency => "latency".into(),
            Step::Throughput(1) => "throughput, 1 stream".into(),
            Step::Throughput(n) => format!("throughput, {n} streams"),
            Step::ConnRate => "connection rate".into(),
        }
    }
}

/// One dataplane's pods and per-round figures.
struct Plane {
    dp: Dataplane,
    pair: Pair,
    _server: EchoServer,
    echo: SocketAddr,
    /// Per metric, one value per round.
    values: [Vec<f64>; 7],
    /// Per round: (busy CPU seconds, Gbit) summed over the throughput runs.
    cpu: Vec<(f64, f64)>,
}

pub fn run(args: DatapathArgs) -> Result<()> {
    let cfg = Config::of(&args)?;
    super::preflight("datapath")?;
    let iperf3 = traffic::find_iperf3()?;
    let load_start = loadavg();

    let _signals = SignalGuard::install()?;
    let ws = Workspace::new(args.cni_bin_dir.as_deref())?;
    let mut registry = dataplanes::registry();
    if !args.dataplanes.is_empty() {
        let known: Vec<&str> = registry.iter().map(|d| d.name).collect();
        if let Some(bad) = args.dataplanes.iter().find(|n| !known.contains(&n.as_str())) {
            anyhow::bail!("--dataplanes: no dataplane {bad:?} (known: {})", known.join(", "));
        }
        registry.retain(|d| args.dataplanes.iter().any(|n| n == d.name));
    }
    let announce = format!(
        "tern bench datapath: {} dataplanes, {} round(s), about {} s",
        registry.len(),
        cfg.rounds,
        estimate_secs(&cfg, registry.len())
    );
    let progress = Progress::new(cfg.rounds * STEPS.len() * registry.len(), &announce, args.json);

    // Set up every pair before anything is measured; they idle while the
    // others are measured.
    let mut planes = Vec::new();
    for dp in registry {
        check_interrupt()?;
        progress.show(&format!("setting up {}", dp.name));
        let pair = (dp.pair)(&dp, &ws).inspect_err(|_| progress.clear())?;
        traffic::prepare_client(&pair.client)?;
        let server = EchoServer::start(&pair.server, pair.server_ip, cfg.cpus.map(|c| c.1))?;
        let echo = server.addr;
        traffic::round_trips(&pair.client, echo, 0, 3, None)
            .with_context(|| format!("{}: the client pod cannot reach the server pod", dp.name))
            .inspect_err(|_| progress.clear())?;
        planes.push(Plane { dp, pair, _server: server, echo, values: Default::default(), cpu: Vec::new() });
    }

    let iperf_out = ws.data_dir.join("iperf3.json");
    for round in 0..cfg.rounds {
        for step in STEPS {
            for p in planes.iter_mut() {
                check_interrupt().inspect_err(|_| progress.clear())?;
                let what = format!("round {}/{}: {}, {}", round + 1, cfg.rounds, step.label(), p.dp.name);
                progress.show(&what);
                measure(&cfg, &iperf3, &iperf_out, p, round, step)
                    .map_err(|e| if interrupted() { anyhow!("interrupted") } else { e })
                    .with_context(|| format!("{}: {}", p.dp.name, step.label()))
                    .inspect_err(|_| progress.clear())?;
                progress.tick(&what);
            }
        }
    }
    progress.clear();

    let report = Report::new(&planes);
    let machine = Machine::probe();
    let load = (load_start, loadavg());
    let version = traffic::iperf3_version(&iperf3);
    if let Some(path) = &args.svg {
        let chart = svg::chart(&report.svg_title(&machine, &cfg), &report.panels());
        std::fs::write(path, chart).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json(&machine, &cfg, load, &version))?);
    } else {
        report.print(&machine, &cfg, load, &version);
        if let Some(path) = &args.svg {
            println!("chart: {}", path.display());
        }
    }
    Ok(())
}

/// Rough length of a run, for the announcement.
fn estimate_secs(cfg: &Config, planes: usize) -> u64 {
    let latency = (cfg.warmup + cfg.samples) as f64 * 40e-6;
    let per_plane = latency + 2.0 * (cfg.iperf_secs as f64 + 0.3) + cfg.crr.as_secs_f64() + 0.1;
    (per_plane * planes as f64 * cfg.rounds as f64).ceil() as u64
}

fn measure(
    cfg: &Config,
    iperf3: &std::path::Path,
    out: &std::path::Path,
    p: &mut Plane,
    round: usize,
    step: Step,
) -> Result<()> {
    let client_cpu = cfg.cpus.map(|c| c.0);
    match step {
        Step::Latency => {
            let mut rtt = traffic::round_trips(&p.pair.client, p.echo, cfg.warmup, cfg.samples, client_cpu)?;
            rtt.sort_by(f64::total_cmp);
            p.values[LAT_P50].push(percentile(&rtt, 0.50));
            p.values[LAT_P95].push(percentile(&rtt, 0.95));
            p.values[LAT_P99].push(percentile(&rtt, 0.99));
        }
        Step::Throughput(streams) => {
            let r = traffic::iperf(&Iperf {
                iperf3,
                client: &p.pair.client,
                server: &p.pair.server,
                server_ip: p.pair.server_ip,
                streams,
                secs: cfg.iperf_secs,
                cpus: cfg.cpus,
                out_file: out,
            })?;
            p.values[if streams == 1 { TPUT_1 } else { TPUT_4 }].push(r.gbps);
            if p.cpu.len() <= round {
                p.cpu.push((0.0, 0.0));
            }
            p.cpu[round].0 += r.cpu_s;
            p.cpu[round].1 += r.gbit;
            if streams == 4 {
                let (cpu, gbit) = p.cpu[round];
                p.values[CPU].push(cpu / gbit);
            }
        }
        Step::ConnRate => p.values[CRR].push(traffic::connection_rate(&p.pair.client, p.echo, cfg.crr, client_cpu)?),
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Report

/// Median of the rounds, and their spread.
#[derive(Clone, Copy)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Summary {
    fn of(v: &[f64]) -> Summary {
        Summary {
            median: median(v),
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

struct Row {
    name: &'static str,
    summary: &'static str,
    rounds: [Vec<f64>; 7],
    stats: [Summary; 7],
    /// Median / native's median, per metric.
    vs_native: Option<[f64; 7]>,
    /// Median / ref-bridge's median, per metric.
    vs_ref: Option<[f64; 7]>,
    /// Cross-node dataplanes: median / the underlay's median, per metric.
    vs_underlay: Option<[f64; 7]>,
}

struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn new(planes: &[Plane]) -> Report {
        let stats = |p: &Plane| -> [Summary; 7] { std::array::from_fn(|m| Summary::of(&p.values[m])) };
        let base = |name: &str| planes.iter().find(|p| p.dp.name == name).map(stats);
        let (native, reference, underlay) = (base(NATIVE), base(REFERENCE), base(UNDERLAY));
        let ratio = |s: &[Summary; 7], b: &Option<[Summary; 7]>| {
            b.as_ref().map(|b| -> [f64; 7] { std::array::from_fn(|m| s[m].median / b[m].median) })
        };
        let rows = planes
            .iter()
            .map(|p| {
                let s = stats(p);
                // Same-node dataplanes compare with native and the reference,
                // cross-node ones with the underlay between their nodes.
                let cross = is_cross_node(p.dp.name);
                Row {
                    name: p.dp.name,
                    summary: p.dp.summary,
                    rounds: p.values.clone(),
                    vs_native: if cross { None } else { ratio(&s, &native) },
                    vs_ref: if cross { None } else { ratio(&s, &reference) },
                    vs_underlay: if cross { ratio(&s, &underlay) } else { None },
                    stats: s,
                }
            })
            .collect();
        Report { rows }
    }

    fn to_json(&self, machine: &Machine, cfg: &Config, load: (f64, f64), iperf3: &str) -> Value {
        let per_metric = |f: &dyn Fn(usize) -> Value| -> Value {
            let mut m = Map::new();
            for (i, metric) in METRICS.iter().enumerate() {
                m.insert(metric.key.into(), f(i));
            }
            Value::Object(m)
        };
        let ratios = |r: &Option<[f64; 7]>| match r {
            Some(r) => per_metric(&|i| json!(round_to(r[i], 3))),
            None => Value::Null,
        };
        json!({
            "bench": "datapath",
            "machine": {"kernel": machine.kernel, "cpus": machine.cpus, "cpu_model": machine.model},
            "load_average_1m": {"start": finite_or_null(load.0), "end": finite_or_null(load.1)},
            "config": {
                "rounds": cfg.rounds,
                "latency_warmup": cfg.warmup,
                "latency_samples": cfg.samples,
                "payload_bytes": PAYLOAD,
                "throughput_seconds": cfg.iperf_secs,
                "connection_rate_seconds": cfg.crr.as_secs_f64(),
                "iperf3": iperf3,
                "pin": format!("{:?}", cfg.pin).to_lowercase(),
                "client_cpu": cfg.cpus.map(|c| c.0),
                "server_cpu": cfg.cpus.map(|c| c.1),
            },
            "metrics": METRICS.iter().map(|m| json!({
                "key": m.key,
                "unit": m.unit,
                "better": if m.higher_is_better { "higher" } else { "lower" },
            })).collect::<Vec<_>>(),
            "dataplanes": self.rows.iter().map(|r| json!({
                "name": r.name,
                "summary": r.summary,
                "metrics": per_metric(&|i| json!({
                    "median": round_to(r.stats[i].median, 4),
                    "min": round_to(r.stats[i].min, 4),
                    "max": round_to(r.stats[i].max, 4),
                    "rounds": r.rounds[i].iter().map(|x| round_to(*x, 4)).collect::<Vec<_>>(),
                })),
                "ratio_to_native": ratios(&r.vs_native),
                "ratio_to_ref": ratios(&r.vs_ref),
                "ratio_to_underlay": ratios(&r.vs_underlay),
            })).collect::<Vec<_>>(),
        })
    }

    fn print(&self, machine: &Machine, cfg: &Config, load: (f64, f64), iperf3: &str) {
        println!(
            "tern bench datapath: {} round(s), dataplanes interleaved in each; median of the rounds (min-max)",
            cfg.rounds
        );
        println!(
            "machine: Linux {}, {} x {}; load average {:.2} at start, {:.2} at end",
            machine.kernel, machine.cpus, machine.model, load.0, load.1
        );
        println!(
            "two pods on one node (cross-node: on two lab nodes), IPv4; latency: TCP {PAYLOAD}-byte request/response, {} round trips per round \
             after {}; throughput: {iperf3}, {} s per test",
            cfg.samples, cfg.warmup, cfg.iperf_secs
        );
        println!("{}", placement(cfg));
        println!();
        let cell = |s: &Summary, d: usize| -> String {
            if s.min == s.max {
                format!("{:.d$}", s.median)
            } else {
                format!("{:.d$} ({:.d$}-{:.d$})", s.median, s.min, s.max)
            }
        };
        // Two tables, so that "median (min-max)" cells stay readable.
        for metrics in [&[LAT_P50, LAT_P95, LAT_P99][..], &[TPUT_1, TPUT_4, CPU, CRR][..]] {
            let mut header = vec!["dataplane".to_string()];
            header.extend(metrics.iter().map(|&i| format!("{} {}", METRICS[i].head, METRICS[i].unit)));
            let rows: Vec<Vec<String>> = self
                .rows
                .iter()
                .map(|r| {
                    let mut row = vec![r.name.to_string()];
                    row.extend(metrics.iter().map(|&i| cell(&r.stats[i], METRICS[i].decimals)));
                    row
                })
                .collect();
            print_table(&header.iter().map(String::as_str).collect::<Vec<_>>(), &rows);
            println!();
        }
        let mut header = vec!["ratio of medians".to_string()];
        header.extend(METRICS.iter().map(|m| m.head.to_string()));
        let mut rows = Vec::new();
        for (base, pick) in [(NATIVE, 0), (REFERENCE, 1), (UNDERLAY, 2)] {
            for r in self.rows.iter().filter(|r| r.name != base) {
                let ratios = match pick {
                    0 => &r.vs_native,
                    1 => &r.vs_ref,
                    _ => &r.vs_underlay,
                };
                if let Some(x) = ratios {
                    let mut row = vec![format!("{} / {base}", r.name)];
                    row.extend(x.iter().map(|v| format!("{v:.2}x")));
                    rows.push(row);
                }
            }
        }
        print_table(&header.iter().map(String::as_str).collect::<Vec<_>>(), &rows);
        println!();
        println!("lat = round-trip time; 1/4 streams = iperf3 -P 1/-P 4 received Gbit/s;");
        println!(
            "CPU = busy CPU seconds (/proc/stat user+nice+system+irq+softirq) per Gbit moved in the throughput tests"
        );
        println!("conn rate = new TCP connections per second, each: connect, one request/response, close (TCP_CRR)");
        println!("lower is better for lat and CPU, higher for throughput and conn rate");
        let w = self.rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
        for r in &self.rows {
            println!("  {:<w$}  {}", r.name, r.summary);
        }
    }

    fn svg_title(&self, machine: &Machine, cfg: &Config) -> String {
        format!(
            "tern bench datapath — {} round(s), --pin {} — Linux {}, {} x {}",
            cfg.rounds,
            format!("{:?}", cfg.pin).to_lowercase(),
            machine.kernel,
            machine.cpus,
            machine.model
        )
    }

    fn panels(&self) -> Vec<svg::Panel> {
        let groups: Vec<String> = self.rows.iter().map(|r| r.name.to_string()).collect();
        let panel = |title: &str, unit: &str, metrics: &[(usize, &str)]| svg::Panel {
            title: title.into(),
            unit: unit.into(),
            groups: groups.clone(),
            series: metrics.iter().map(|(_, label)| label.to_string()).collect(),
            values: self.rows.iter().map(|r| metrics.iter().map(|(m, _)| r.stats[*m]).collect()).collect(),
        };
        vec![
            panel("Latency (lower is better)", "µs", &[(LAT_P50, "p50"), (LAT_P95, "p95"), (LAT_P99, "p99")]),
            panel("Throughput (higher is better)", "Gbit/s", &[(TPUT_1, "1 stream"), (TPUT_4, "4 streams")]),
            panel("Connection rate (higher is better)", "conn/s", &[(CRR, "TCP_CRR")]),
        ]
    }
}

fn placement(cfg: &Config) -> String {
    match cfg.cpus {
        None => "client and server not pinned; CPU = the whole machine's busy time".into(),
        Some((c, s)) if c == s => {
            format!("client and server pinned to CPU {c} (--pin same); CPU = busy time of CPU {c}")
        }
        Some((c, s)) => {
            format!("client pinned to CPU {c}, server to CPU {s} (--pin split); CPU = busy time of CPUs {c} and {s}")
        }
    }
}

fn finite_or_null(x: f64) -> Value {
    if x.is_finite() {
        json!(x)
    } else {
        Value::Null
    }
}
