//! `tern bench datapath` and `tern bench cni`, tiny: every dataplane and
//! every metric is in the JSON, with sane numbers (finite, above zero). No
//! timing assertions: the figures depend on the machine and its load.
//!
//! Each bench creates its own namespaces (`/run/netns/tern-bench-<pid>-*`)
//! and work directory (`$TMPDIR/tern-bench-<pid>`), unique by the bench's
//! pid, so these tests run in parallel with any other; afterwards nothing of
//! the bench's may be left.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_testkit::*;

const DATAPLANES: [&str; 11] = [
    "native",
    "tern-bridge",
    "tern-routed",
    "tern-bridge-ebpf",
    "tern-routed-ebpf",
    "ref-bridge",
    "underlay",
    "direct",
    "vxlan",
    "direct-ebpf",
    "vxlan-ebpf",
];
/// Measured between two lab nodes: compared with the underlay, not native.
const CROSS_NODE: [&str; 5] = ["underlay", "direct", "vxlan", "direct-ebpf", "vxlan-ebpf"];
const CNI_DATAPLANES: [&str; 3] = ["tern-bridge", "tern-routed", "ref-bridge"];
const DATAPATH_METRICS: [&str; 7] = [
    "latency_p50_us",
    "latency_p95_us",
    "latency_p99_us",
    "throughput_1_stream_gbps",
    "throughput_4_streams_gbps",
    "cpu_s_per_gbit",
    "connections_per_s",
];
const LIMIT: Duration = Duration::from_secs(180);

/// Runs `tern <args>` (stdout to a file, so a large output never blocks),
/// kills it after [`LIMIT`]; returns its stdout as JSON, and the pid.
fn tern_json(tmp: &TempDir, args: &[&str]) -> (Value, u32) {
    let out_path = tmp.join("stdout");
    let err_path = tmp.join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tern"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("starting tern");
    let pid = child.id();
    let deadline = Instant::now() + LIMIT;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if Instant::now() > deadline {
            // Our own child, by pid; SIGTERM so that the bench cleans up.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGTERM);
            let st = child.wait().unwrap();
            panic!("tern {args:?} still running after {LIMIT:?} ({st}); stderr:\n{}", read(&err_path));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = read(&out_path);
    assert!(status.success(), "tern {args:?} failed ({status})\nstdout:\n{stdout}\nstderr:\n{}", read(&err_path));
    let json = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("tern {args:?}: not JSON ({e}):\n{stdout}"));
    (json, pid)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Nothing of the bench with this pid is left: no namespace, no work dir.
fn assert_cleaned_up(pid: u32) {
    let prefix = format!("tern-bench-{pid}-");
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    let left: Vec<&String> = left.iter().filter(|n| n.starts_with(&prefix)).collect();
    assert!(left.is_empty(), "the bench left namespaces: {left:?}");
    let work: PathBuf = std::env::temp_dir().join(format!("tern-bench-{pid}"));
    assert!(!work.exists(), "the bench left {}", work.display());
}

fn sane(v: &Value, what: &str) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{what}: not a number: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what} = {x}: not finite and above zero");
    x
}

fn dataplane<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["dataplanes"]
        .as_array()
        .expect("dataplanes array")
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no dataplane {name} in {report:#}"))
}

#[test]
fn datapath_tiny_reports_every_dataplane_and_metric() {
    require_root();
    let tmp = TempDir::new();
    let svg = tmp.join("chart.svg");
    let (report, pid) = tern_json(
        &tmp,
        &[
            "bench",
            "datapath",
            "--json",
            "--rounds",
            "1",
            "--samples",
            "200",
            "--duration-ms",
            "300",
            "--svg",
            svg.to_str().unwrap(),
        ],
    );
    assert_cleaned_up(pid);

    assert_eq!(report["bench"], "datapath");
    let keys: Vec<&str> = report["metrics"].as_array().unwrap().iter().map(|m| m["key"].as_str().unwrap()).collect();
    assert_eq!(keys, DATAPATH_METRICS);
    let names: Vec<&str> =
        report["dataplanes"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    for name in DATAPLANES {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    for name in &names {
        let dp = dataplane(&report, name);
        for m in DATAPATH_METRICS {
            let what = format!("{name} {m}");
            let s = &dp["metrics"][m];
            let (med, min, max) = (sane(&s["median"], &what), sane(&s["min"], &what), sane(&s["max"], &what));
            assert!(min <= med && med <= max, "{what}: min {min} median {med} max {max}");
            assert_eq!(s["rounds"].as_array().map(Vec::len), Some(1), "{what}: one value per round: {s}");
            if CROSS_NODE.contains(name) {
                sane(&dp["ratio_to_underlay"][m], &format!("{what} ratio to the underlay"));
                assert!(dp["ratio_to_native"].is_null(), "{what}: cross-node rows have no ratio to native");
            } else {
                sane(&dp["ratio_to_native"][m], &format!("{what} ratio to native"));
                sane(&dp["ratio_to_ref"][m], &format!("{what} ratio to ref-bridge"));
            }
        }
    }
    // The limits are their own references.
    for m in DATAPATH_METRICS {
        assert_eq!(dataplane(&report, "native")["ratio_to_native"][m], 1.0, "{m}");
        assert_eq!(dataplane(&report, "underlay")["ratio_to_underlay"][m], 1.0, "{m}");
    }
    // Latency percentiles are ordered.
    for name in &names {
        let lat = |m: &str| dataplane(&report, name)["metrics"][m]["median"].as_f64().unwrap();
        assert!(lat("latency_p50_us") <= lat("latency_p95_us") && lat("latency_p95_us") <= lat("latency_p99_us"));
    }

    let chart = std::fs::read_to_string(&svg).expect("the --svg file");
    assert!(chart.starts_with("<svg") && chart.trim_end().ends_with("</svg>"), "{chart}");
    for name in DATAPLANES {
        assert!(chart.contains(&format!(">{name}</text>")), "{name} not labelled in the chart");
    }
}

#[test]
fn cni_tiny_reports_every_dataplane_and_metric() {
    require_root();
    let tmp = TempDir::new();
    let (report, pid) =
        tern_json(&tmp, &["bench", "cni", "--json", "--pods", "2", "--warmup", "0", "--churn-pods", "4"]);
    assert_cleaned_up(pid);

    assert_eq!(report["bench"], "cni");
    let names: Vec<&str> =
        report["dataplanes"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    for name in CNI_DATAPLANES {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    assert!(!names.contains(&"native"), "native has no CNI plugin to time: {names:?}");
    for name in &names {
        let dp = dataplane(&report, name);
        for m in ["add_ms", "del_ms", "cycle_ms", "del_until_done_ms"] {
            let p50 = sane(&dp[m]["p50"], &format!("{name} {m} p50"));
            let p95 = sane(&dp[m]["p95"], &format!("{name} {m} p95"));
            assert!(p50 <= p95, "{name} {m}: p50 {p50} > p95 {p95}");
        }
        sane(&dp["ratio_to_ref"], &format!("{name} ratio_to_ref"));
        for workers in ["1", "4", "16"] {
            sane(&dp["churn_pods_per_s"][workers], &format!("{name} churn with {workers} workers"));
            sane(&dp["churn_ratio_to_ref"][workers], &format!("{name} churn ratio with {workers} workers"));
        }
    }
}
