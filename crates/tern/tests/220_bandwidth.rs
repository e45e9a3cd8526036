//! tern-bandwidth chained after `tern` (bridge and routed) and after the
//! reference `bridge`: the rates iperf3 measures between pod and node, the
//! qdiscs and ifb it makes, DEL, CHECK, GC, validation and undo; after
//! `tern` with the eBPF fast path: the shaped pod taken off the fast path,
//! the redirect under the fast path's clsact, and DEL and GC leaving the
//! fast path alone.
//!
//! Privileged: run as root. Every test builds its own node and pod namespaces.

mod common;

use std::fs::{File, OpenOptions};
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use nix::fcntl::{Flock, FlockArg};
use serde_json::{json, Value};
use tern_bpf::{Endpoint, FastPath};
use tern_testkit::*;

/// Shaped rates, bit/s; different per direction so a swap shows.
const INGRESS_RATE: u64 = 24_000_000;
const EGRESS_RATE: u64 = 16_000_000;
/// 32 KiB buckets: a few 1500-byte packets at line rate, a negligible
/// head start over a 3 s run.
const BURST: u64 = 32 * 1024 * 8;
/// The node's own address in routed mode.
const NODE_IP: &str = "192.0.2.1/32";

#[derive(Clone, Copy, Debug)]
enum Main {
    TernBridge,
    TernRouted,
    /// Routed, `"dataplane": "ebpf"`.
    TernFast,
    RefBridge,
}

/// A node with the plugins, and a network.
struct World {
    node: Node,
    meta: Plugins,
}

impl World {
    fn new() -> World {
        World {
            node: Node::new(),
            meta: Plugins::with_names(Path::new(env!("CARGO_BIN_EXE_tern")), &["tern-bandwidth"]),
        }
    }

    fn main_conf(&self, main: Main) -> String {
        let ranges = json!([[{ "subnet": "10.22.0.0/24" }]]);
        match main {
            Main::TernBridge => self.node.conf("1.0.0", ranges, json!({ "isGateway": true })),
            Main::TernRouted => self.node.conf("1.0.0", ranges, json!({ "mode": "routed" })),
            Main::TernFast => self.node.conf("1.0.0", ranges, json!({ "mode": "routed", "dataplane": "ebpf" })),
            Main::RefBridge => json!({
                "cniVersion": "1.0.0",
                "name": self.node.network,
                "type": "bridge",
                "bridge": self.node.bridge,
                "isGateway": true,
                "ipam": { "type": "host-local", "dataDir": self.node.data.path(), "ranges": ranges },
            })
            .to_string(),
        }
    }

    fn main_plugin(main: Main) -> &'static str {
        match main {
            Main::RefBridge => "bridge",
            _ => "tern",
        }
    }

    /// The main plugin's ADD; returns its result.
    fn main_add(&self, main: Main, cid: &str, pod: &Netns) -> Value {
        let conf = self.main_conf(main);
        if matches!(main, Main::TernRouted | Main::TernFast) && !self.node.ns.addrs("lo").iter().any(|a| a == NODE_IP) {
            // A routed node talks to its pods from an address of its own.
            self.node.ns.ok(&format!("ip addr add {NODE_IP} dev lo"));
        }
        exec_plugin(
            &self.node.ns,
            &self.node.plugins,
            Self::main_plugin(main),
            "ADD",
            cid,
            Some(&pod.path()),
            "eth0",
            "",
            &conf,
        )
        .assert_ok()
        .json()
    }

    fn main_del(&self, main: Main, cid: &str, pod: &Netns, prev: &Value) {
        let conf = with_prev(&self.main_conf(main), prev);
        let run = exec_plugin(
            &self.node.ns,
            &self.node.plugins,
            Self::main_plugin(main),
            "DEL",
            cid,
            Some(&pod.path()),
            "eth0",
            "",
            &conf,
        );
        run.assert_ok();
    }

    /// A tern-bandwidth config of this network with `keys` on top.
    fn bw_conf(&self, version: &str, keys: Value, prev: Option<&Value>) -> String {
        let mut c = json!({ "cniVersion": version, "name": self.node.network, "type": "tern-bandwidth" });
        for (k, v) in keys.as_object().expect("object") {
            c[k] = v.clone();
        }
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c.to_string()
    }

    fn bw(&self, command: &str, cid: &str, netns: Option<&Path>, conf: &str) -> PluginRun {
        exec_plugin(&self.node.ns, &self.meta, "tern-bandwidth", command, cid, netns, "eth0", "", conf)
    }

    /// ifb links in the node.
    fn ifbs(&self) -> Vec<String> {
        ip_json(&self.node.ns, &["link", "show", "type", "ifb"])
            .iter()
            .filter_map(|l| l["ifname"].as_str().map(str::to_owned))
            .collect()
    }

    /// `tc -j qdisc show dev <dev>` in the node (empty if the link is gone).
    fn qdiscs(&self, dev: &str) -> Vec<Value> {
        let out = self.node.ns.run(&["tc", "-j", "qdisc", "show", "dev", dev]);
        if !out.status.success() || out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Vec::new();
        }
        serde_json::from_slice::<Value>(&out.stdout).expect("tc -j is JSON").as_array().cloned().unwrap_or_default()
    }

    /// The kinds of `dev`'s qdiscs but the default `noqueue`.
    fn qdisc_kinds(&self, dev: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .qdiscs(dev)
            .iter()
            .filter_map(|q| q["kind"].as_str())
            .filter(|k| *k != "noqueue")
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    }

    /// `tc -s -j qdisc show dev <dev>`: the packets `dev`'s `kind` qdisc sent.
    fn qdisc_packets(&self, dev: &str, kind: &str) -> u64 {
        let out = self.node.ns.ok(&format!("tc -s -j qdisc show dev {dev}"));
        let qs: Value = serde_json::from_str(&out).expect("tc -j is JSON");
        let q = qs.as_array().unwrap().iter().find(|q| q["kind"] == kind);
        q.and_then(|q| q["packets"].as_u64()).unwrap_or_else(|| panic!("no {kind} qdisc on {dev}: {out}"))
    }

    /// `tc -j filter show dev <dev> ingress` in the node (a u32 filter is
    /// several entries; the one with actions names the mirred's `to_dev`).
    fn ingress_filters(&self, dev: &str) -> Vec<Value> {
        let out = self.node.ns.ok(&format!("tc -j filter show dev {dev} ingress"));
        if out.trim().is_empty() {
            return Vec::new();
        }
        serde_json::from_str::<Value>(&out).expect("tc -j is JSON").as_array().cloned().unwrap_or_default()
    }

    /// Packets `dev` sent, from `ip -s`.
    fn tx_packets(&self, dev: &str) -> u64 {
        let l = ip_json(&self.node.ns, &["-s", "link", "show", "dev", dev]);
        l[0]["stats64"]["tx"]["packets"].as_u64().unwrap_or_else(|| panic!("no tx stats: {l:?}"))
    }

    /// The kinds of `dev`'s qdiscs that are tern-bandwidth's (tbf, ingress).
    fn shaping_qdiscs(&self, dev: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .qdiscs(dev)
            .iter()
            .filter_map(|q| q["kind"].as_str())
            .filter(|k| *k == "tbf" || *k == "ingress")
            .map(str::to_owned)
            .collect();
        v.sort();
        v
    }
}

fn rates() -> Value {
    json!({ "ingressRate": INGRESS_RATE, "ingressBurst": BURST, "egressRate": EGRESS_RATE, "egressBurst": BURST })
}

/// The host-side interface of `eth0` in a main plugin's result: the one
/// without sandbox that is a veth in the node.
fn host_veth(w: &World, res: &Value) -> String {
    res["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .filter(|i| i.get("sandbox").is_none())
        .filter_map(|i| i["name"].as_str())
        .find(|n| link(&w.node.ns, n).is_some_and(|l| l["linkinfo"]["info_kind"] == "veth"))
        .unwrap_or_else(|| panic!("no host veth in {res:#}"))
        .to_owned()
}

fn pod_ip(res: &Value) -> IpAddr {
    ip_of(&result_addrs(res)[0])
}

/// Serialises iperf3 runs across the test processes that run in parallel:
/// an unshaped run saturates the CPUs and would starve a shaped one.
fn iperf_lock() -> Flock<File> {
    let path = std::env::temp_dir().join("tern-test-iperf3.lock");
    let f = OpenOptions::new().create(true).truncate(false).write(true).open(&path).expect("open the iperf3 lock");
    Flock::lock(f, FlockArg::LockExclusive).unwrap_or_else(|(_, e)| panic!("lock {}: {e}", path.display()))
}

/// iperf3 between `client` and a one-shot server in `server` at `addr`:
/// bits per second the receiving side counted. `reverse`: the server sends.
fn iperf(client: &Netns, server: &Netns, addr: IpAddr, reverse: bool, secs: u32) -> f64 {
    let _lock = iperf_lock();
    let port = "5201";
    let s = spawn_in(server, &["iperf3", "-s", "-1", "--forceflush", "-p", port]);
    assert!(s.wait_log("Server listening", Duration::from_secs(10)), "iperf3 server did not start:\n{}", s.log());
    let addr = addr.to_string();
    let t = secs.to_string();
    let mut argv = vec!["iperf3", "-c", &addr, "-p", port, "-t", &t, "-J"];
    if reverse {
        argv.push("-R");
    }
    let out = client.run_timeout(&argv, Duration::from_secs(secs as u64 + 30));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 output is not JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(out.status.success(), "iperf3 client failed: {v:#}\nserver:\n{}", s.log());
    v["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or_else(|| panic!("no sum_received: {v:#}"))
}

/// Asserts `measure()` gives the configured rate within 15%. A run above the
/// rate fails at once (the shaping is wrong); one below is retried twice,
/// since a busy machine can only slow a shaped flow down.
fn assert_rate(what: &str, configured: u64, measure: impl Fn() -> f64) {
    let c = configured as f64;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let m = measure();
        eprintln!("{what}: {:.2} Mbit/s measured, {:.2} configured", m / 1e6, c / 1e6);
        seen.push(format!("{:.2}", m / 1e6));
        assert!(m <= 1.15 * c, "{what}: measured {:.2} Mbit/s, more than 15% above {:.2} Mbit/s", m / 1e6, c / 1e6);
        if m >= 0.85 * c {
            return;
        }
    }
    panic!("{what}: measured {seen:?} Mbit/s, more than 15% below the configured {:.2} Mbit/s", c / 1e6);
}

/// Unshaped, iperf3 runs far faster than the configured rates; with
/// tern-bandwidth, it measures them within 15% each way; DEL removes the
/// ifb and the qdiscs and the rate is unlimited again.
fn shaped_traffic(main: Main) {
    let w = World::new();
    let pod = Netns::new("tbwp");
    let res = w.main_add(main, "ctr-bw", &pod);
    let hv = host_veth(&w, &res);
    let ip = pod_ip(&res);

    let free_in = iperf(&w.node.ns, &pod, ip, false, 1);
    let free_out = iperf(&w.node.ns, &pod, ip, true, 1);
    eprintln!("{main:?} unshaped: to the pod {:.0} Mbit/s, from the pod {:.0} Mbit/s", free_in / 1e6, free_out / 1e6);
    assert!(free_in > 5.0 * INGRESS_RATE as f64, "unshaped rate to the pod is only {free_in}");
    assert!(free_out > 5.0 * EGRESS_RATE as f64, "unshaped rate from the pod is only {free_out}");

    let conf = w.bw_conf("1.0.0", rates(), Some(&res));
    let out = w.bw("ADD", "ctr-bw", Some(&pod.path()), &conf).assert_ok().json();
    // The result is prevResult plus the ifb, a host interface.
    let ifs = out["interfaces"].as_array().unwrap();
    assert_eq!(&ifs[..ifs.len() - 1], res["interfaces"].as_array().unwrap().as_slice(), "{out:#}");
    let ifb = ifs.last().unwrap();
    let ifb_name = ifb["name"].as_str().unwrap().to_owned();
    assert!(ifb_name.starts_with("tb") && ifb_name.len() <= 15, "{out:#}");
    assert!(ifb.get("sandbox").is_none(), "{out:#}");
    assert_eq!(out["ips"], res["ips"]);
    assert_eq!(w.ifbs(), vec![ifb_name.clone()]);
    let l = link(&w.node.ns, &ifb_name).unwrap();
    assert_eq!(l["ifalias"], format!("tern:{}/ctr-bw/eth0", w.node.network).as_str(), "{l:#}");
    assert_eq!(w.shaping_qdiscs(&hv), vec!["ingress", "tbf"]);
    let tbf = w.qdiscs(&hv).into_iter().find(|q| q["kind"] == "tbf").unwrap();
    assert_eq!(tbf["options"]["rate"], INGRESS_RATE / 8, "{tbf:#}");
    let tbf = w.qdiscs(&ifb_name).into_iter().find(|q| q["kind"] == "tbf").unwrap();
    assert_eq!(tbf["options"]["rate"], EGRESS_RATE / 8, "{tbf:#}");

    assert_empty_ok(&w.bw("CHECK", "ctr-bw", Some(&pod.path()), &w.bw_conf("1.0.0", rates(), Some(&out))));

    assert_rate(&format!("{main:?}: node -> pod (ingressRate)"), INGRESS_RATE, || {
        iperf(&w.node.ns, &pod, ip, false, 3)
    });
    assert_rate(&format!("{main:?}: pod -> node (egressRate)"), EGRESS_RATE, || iperf(&w.node.ns, &pod, ip, true, 3));

    assert_empty_ok(&w.bw("DEL", "ctr-bw", Some(&pod.path()), &w.bw_conf("1.0.0", rates(), Some(&out))));
    assert_eq!(w.ifbs(), Vec::<String>::new());
    assert_eq!(w.shaping_qdiscs(&hv), Vec::<String>::new());
    let again = iperf(&w.node.ns, &pod, ip, true, 1);
    assert!(again > 5.0 * EGRESS_RATE as f64, "still shaped after DEL: {again}");

    w.main_del(main, "ctr-bw", &pod, &res);
    assert!(veth_links(&w.node.ns, "").is_empty(), "veths left");
}

#[test]
fn shapes_both_directions_after_tern_bridge() {
    shaped_traffic(Main::TernBridge);
}

#[test]
fn shapes_both_directions_after_tern_routed() {
    shaped_traffic(Main::TernRouted);
}

#[test]
fn shapes_both_directions_after_the_reference_bridge() {
    shaped_traffic(Main::RefBridge);
}

/// DEL works from the names alone: without prevResult, without CNI_NETNS, and
/// after the pod's netns is gone; it is idempotent.
#[test]
fn del_needs_neither_prev_result_nor_netns() {
    let w = World::new();
    let pod = Netns::new("tbwp");
    let res = w.main_add(Main::TernBridge, "ctr-d", &pod);
    let hv = host_veth(&w, &res);
    let conf = w.bw_conf("1.0.0", rates(), Some(&res));
    w.bw("ADD", "ctr-d", Some(&pod.path()), &conf).assert_ok();
    assert_eq!(w.ifbs().len(), 1);

    // No prevResult, no netns: the ifb by its name, the host veth by tern's name.
    let bare = w.bw_conf("1.0.0", json!({}), None);
    assert_empty_ok(&w.bw("DEL", "ctr-d", None, &bare));
    assert_eq!(w.ifbs(), Vec::<String>::new());
    assert_eq!(w.shaping_qdiscs(&hv), Vec::<String>::new());
    assert_empty_ok(&w.bw("DEL", "ctr-d", None, &bare));

    // Again, then the pod goes away first (its veth with it).
    w.bw("ADD", "ctr-d", Some(&pod.path()), &conf).assert_ok();
    let pod_path = pod.path();
    pod.delete_now();
    assert_empty_ok(&w.bw("DEL", "ctr-d", Some(&pod_path), &conf));
    assert_eq!(w.ifbs(), Vec::<String>::new());
    assert_empty_ok(&w.bw("DEL", "ctr-d", Some(&pod_path), &conf));
    w.node.del(&w.main_conf(Main::TernBridge), "ctr-d", None).assert_ok();
    w.node.assert_clean();
}

/// CHECK passes on what ADD made and names what is missing or changed.
#[test]
fn check_verifies_the_qdiscs_and_the_ifb() {
    let w = World::new();
    let pod = Netns::new("tbwp");
    let res = w.main_add(Main::TernRouted, "ctr-c", &pod);
    let hv = host_veth(&w, &res);
    let out = w.bw("ADD", "ctr-c", Some(&pod.path()), &w.bw_conf("1.1.0", rates(), Some(&res))).assert_ok().json();
    let ifb = out["interfaces"].as_array().unwrap().last().unwrap()["name"].as_str().unwrap().to_owned();
    let check = |keys: Value| w.bw("CHECK", "ctr-c", Some(&pod.path()), &w.bw_conf("1.1.0", keys, Some(&out)));
    assert_empty_ok(&check(rates()));

    // A different configured rate is a mismatch.
    let mut other = rates();
    other["ingressRate"] = json!(INGRESS_RATE * 2);
    assert_error_naming(&check(other), &["rate", &hv]);

    // The ifb's tbf removed by hand.
    w.node.ns.ok(&format!("tc qdisc del dev {ifb} root"));
    assert_error_naming(&check(rates()), &[&ifb, "tbf"]);
    // The host veth's tbf removed by hand.
    w.node.ns.ok(&format!("tc qdisc del dev {hv} root"));
    assert_error_naming(&check(rates()), &[&hv, "tbf"]);
    // Only egress configured: the redirect and the ifb are what count.
    let egress_only = json!({ "egressRate": EGRESS_RATE, "egressBurst": BURST });
    assert_error_naming(&check(egress_only.clone()), &[&ifb, "tbf"]);
    w.node.ns.ok(&format!("ip link del {ifb}"));
    assert_error_naming(&check(egress_only), &[&ifb, "missing"]);

    assert_empty_ok(&w.bw("DEL", "ctr-c", Some(&pod.path()), &w.bw_conf("1.1.0", rates(), Some(&out))));
    assert_eq!(w.shaping_qdiscs(&hv), Vec::<String>::new());
    w.main_del(Main::TernRouted, "ctr-c", &pod, &res);
    w.node.assert_clean();
}

/// GC removes the ifbs of this network's attachments that are not listed,
/// and nothing of another network.
#[test]
fn gc_removes_stale_ifbs() {
    let w = World::new();
    let pods = [Netns::new("tbwp"), Netns::new("tbwp"), Netns::new("tbwp")];
    let ids = ["ctr-g0", "ctr-g1", "ctr-g2"];
    let mut results = Vec::new();
    for (pod, id) in pods.iter().zip(ids) {
        let res = w.main_add(Main::TernBridge, id, pod);
        let out = w.bw("ADD", id, Some(&pod.path()), &w.bw_conf("1.1.0", rates(), Some(&res))).assert_ok().json();
        results.push((res, out));
    }
    // An ifb of another network, tagged like ours.
    let other_alias = format!("tern:other-net/{}/eth0", ids[1]);
    w.node.ns.ok(&format!("ip link add tbother0 type ifb && ip link set tbother0 alias {other_alias}"));
    let mut before = w.ifbs();
    before.sort();
    assert_eq!(before.len(), 4);

    let gc = |valid: Value| {
        let mut c: Value = serde_json::from_str(&w.bw_conf("1.1.0", json!({}), None)).unwrap();
        c["cni.dev/valid-attachments"] = valid;
        exec_plugin(&w.node.ns, &w.meta, "tern-bandwidth", "GC", "", None, "", "", &c.to_string())
    };
    assert_empty_ok(&gc(
        json!([{ "containerID": ids[0], "ifname": "eth0" }, { "containerID": ids[2], "ifname": "eth0" }]),
    ));
    let ifb_of =
        |i: usize| results[i].1["interfaces"].as_array().unwrap().last().unwrap()["name"].as_str().unwrap().to_owned();
    let mut want = vec![ifb_of(0), ifb_of(2), "tbother0".to_string()];
    want.sort();
    let mut now = w.ifbs();
    now.sort();
    assert_eq!(now, want);
    // Idempotent; an empty list removes the rest of this network's.
    assert_empty_ok(&gc(
        json!([{ "containerID": ids[0], "ifname": "eth0" }, { "containerID": ids[2], "ifname": "eth0" }]),
    ));
    assert_empty_ok(&gc(json!([])));
    assert_eq!(w.ifbs(), vec!["tbother0".to_string()]);
    // GC needs the list.
    w.bw("GC", "", None, &w.bw_conf("1.1.0", json!({}), None)).assert_error(7);

    for ((pod, id), (res, out)) in pods.iter().zip(ids).zip(&results) {
        assert_empty_ok(&w.bw("DEL", id, Some(&pod.path()), &w.bw_conf("1.1.0", rates(), Some(out))));
        w.main_del(Main::TernBridge, id, pod, res);
    }
    w.node.ns.ok("ip link del tbother0");
    w.node.assert_clean();
}

/// The reference's validation, with the field named (code 7); top-level keys
/// win over the capability; nothing to shape passes prevResult through.
#[test]
fn validation_and_precedence() {
    let w = World::new();
    let pod = Netns::new("tbwp");
    let res = w.main_add(Main::TernBridge, "ctr-v", &pod);
    let hv = host_veth(&w, &res);
    let add = |keys: Value| w.bw("ADD", "ctr-v", Some(&pod.path()), &w.bw_conf("1.0.0", keys, Some(&res)));

    for (keys, field) in [
        (json!({ "ingressRate": 1000 }), "ingressBurst"),
        (json!({ "egressBurst": 1000 }), "egressRate"),
        (json!({ "egressRate": 1000, "egressBurst": 8u64 * u32::MAX as u64 }), "egressBurst"),
        (json!({ "ingressRate": -1, "ingressBurst": 100 }), "ingressRate"),
        (json!({ "runtimeConfig": { "bandwidth": { "ingressRate": 1000 } } }), "runtimeConfig.bandwidth.ingressBurst"),
    ] {
        let run = add(keys.clone());
        run.assert_error(7);
        assert_error_naming(&run, &[field]);
    }
    assert_eq!(w.ifbs(), Vec::<String>::new());
    assert_eq!(w.shaping_qdiscs(&hv), Vec::<String>::new());

    // Nothing to shape: prevResult unchanged, nothing made.
    let out = add(json!({ "runtimeConfig": { "bandwidth": { "ingressRate": 0 } } })).assert_ok().json();
    assert_eq!(out, res);
    assert_eq!(w.shaping_qdiscs(&hv), Vec::<String>::new());

    // A top-level key makes the capability ignored: only ingress here.
    let keys = json!({
        "ingressRate": INGRESS_RATE, "ingressBurst": BURST,
        "runtimeConfig": { "bandwidth": { "egressRate": EGRESS_RATE, "egressBurst": BURST } },
    });
    let out = add(keys.clone()).assert_ok().json();
    assert_eq!(out, res, "no ifb without egress shaping");
    assert_eq!(w.shaping_qdiscs(&hv), vec!["tbf"]);
    assert_empty_ok(&w.bw("DEL", "ctr-v", Some(&pod.path()), &w.bw_conf("1.0.0", keys, Some(&out))));

    // The capability alone applies.
    let keys = json!({ "runtimeConfig": { "bandwidth": { "egressRate": EGRESS_RATE, "egressBurst": BURST } } });
    let out = add(keys.clone()).assert_ok().json();
    assert_eq!(out["interfaces"].as_array().unwrap().len(), res["interfaces"].as_array().unwrap().len() + 1);
    assert_eq!(w.shaping_qdiscs(&hv), vec!["ingress"]);
    assert_eq!(w.ifbs().len(), 1);
    assert_empty_ok(&w.bw("DEL", "ctr-v", Some(&pod.path()), &w.bw_conf("1.0.0", keys, Some(&out))));
    assert_eq!(w.ifbs(), Vec::<String>::new());

    // Chained only: prevResult is required; versions before 0.3.0 are refused.
    w.bw("ADD", "ctr-v", Some(&pod.path()), &w.bw_conf("1.0.0", rates(), None)).assert_error(7);
    w.bw("ADD", "ctr-v", Some(&pod.path()), &w.bw_conf("0.2.0", rates(), None)).assert_error(1);

    w.main_del(Main::TernBridge, "ctr-v", &pod, &res);
    w.node.assert_clean();
}

/// An ADD that fails halfway removes what it made, and only that.
#[test]
fn failed_add_undoes_what_it_made() {
    let w = World::new();
    let pod = Netns::new("tbwp");
    let res = w.main_add(Main::TernBridge, "ctr-u", &pod);
    let hv = host_veth(&w, &res);
    // Someone else's ingress qdisc (mirroring to lo) on the host veth: the
    // ingress qdisc cannot be added, after the root tbf and the ifb were made.
    w.node.ns.ok(&format!(
        "tc qdisc add dev {hv} ingress && \
         tc filter add dev {hv} ingress protocol all u32 match u32 0 0 action mirred egress mirror dev lo"
    ));
    let run = w.bw("ADD", "ctr-u", Some(&pod.path()), &w.bw_conf("1.0.0", rates(), Some(&res)));
    assert_error_naming(&run, &[&hv, "ingress qdisc"]);
    assert_eq!(w.ifbs(), Vec::<String>::new());
    assert_eq!(w.shaping_qdiscs(&hv), vec!["ingress"], "the ingress qdisc that was there is kept, the tbf went");
    // A DEL after the failed ADD leaves the foreign qdisc and filter alone too.
    assert_empty_ok(&w.bw("DEL", "ctr-u", Some(&pod.path()), &w.bw_conf("1.0.0", rates(), Some(&res))));
    assert_eq!(w.shaping_qdiscs(&hv), vec!["ingress"]);
    assert!(w.ingress_filters(&hv).iter().any(|f| f.to_string().contains("\"to_dev\":\"lo\"")));
    w.node.ns.ok(&format!("tc qdisc del dev {hv} ingress"));

    // Someone else's clsact whose priority 1 is taken by another filter: the
    // redirect fails last; the tbf and ifb go, their clsact and filter stay.
    w.node.ns.ok(&format!(
        "tc qdisc add dev {hv} clsact && \
         tc filter add dev {hv} ingress pref 1 protocol ip u32 match u32 0 0 action mirred egress mirror dev lo"
    ));
    let run = w.bw("ADD", "ctr-u", Some(&pod.path()), &w.bw_conf("1.0.0", rates(), Some(&res)));
    assert_error_naming(&run, &[&hv, "clsact"]);
    assert_eq!(w.ifbs(), Vec::<String>::new());
    assert_eq!(w.qdisc_kinds(&hv), vec!["clsact"]);
    let filters = w.ingress_filters(&hv);
    assert!(filters.iter().all(|f| f["protocol"] == "ip"), "{filters:?}");
    assert!(!filters.is_empty());
    w.node.ns.ok(&format!("tc qdisc del dev {hv} clsact"));

    // A second ADD on a shaped attachment is refused and breaks nothing.
    let out = w.bw("ADD", "ctr-u", Some(&pod.path()), &w.bw_conf("1.0.0", rates(), Some(&res))).assert_ok().json();
    let run = w.bw("ADD", "ctr-u", Some(&pod.path()), &w.bw_conf("1.0.0", rates(), Some(&res)));
    assert_error_naming(&run, &["already"]);
    assert_empty_ok(&w.bw("CHECK", "ctr-u", Some(&pod.path()), &w.bw_conf("1.0.0", rates(), Some(&out))));

    assert_empty_ok(&w.bw("DEL", "ctr-u", Some(&pod.path()), &w.bw_conf("1.0.0", rates(), Some(&out))));
    w.main_del(Main::TernBridge, "ctr-u", &pod, &res);
    w.node.assert_clean();
}

fn set_fast(node: &Netns, addr: IpAddr, fast: bool) {
    node.enter(|| FastPath::open_existing().unwrap().unwrap().set_policy_bypass(&[addr], fast).unwrap());
}

fn result_ips(res: &Value) -> Vec<IpAddr> {
    result_addrs(res).iter().map(|a| ip_of(a)).collect()
}

/// The ifb a tern-bandwidth result added (its last interface).
fn ifb_of(out: &Value) -> String {
    out["interfaces"].as_array().unwrap().last().unwrap()["name"].as_str().unwrap().to_owned()
}

/// The u32 redirect entries (with a mirred action) on `dev`'s ingress hook.
fn redirects(w: &World, dev: &str) -> Vec<Value> {
    w.ingress_filters(dev).into_iter().filter(|f| f["kind"] == "u32" && f.to_string().contains("mirred")).collect()
}

/// The fast path's BPF filter on `dev`'s ingress hook.
fn bpf_filter(w: &World, dev: &str) -> Value {
    let filters = w.ingress_filters(dev);
    filters
        .iter()
        .find(|f| f["kind"] == "bpf")
        .cloned()
        .unwrap_or_else(|| panic!("no BPF filter on {dev}: {filters:?}"))
}

/// After `tern` with the eBPF fast path: ADD takes the shaped pod off the
/// fast path and puts the redirect under the fast path's clsact, ahead of
/// its BPF filter; traffic with another pod of the node then crosses the
/// ifb and the host veth's tbf (counters, not rates); DEL removes the ifb,
/// the filter and the tbf, and nothing of the fast path.
#[test]
fn fast_path_pod_is_taken_off_it_and_shaped() {
    // Plugins run in private mount namespaces: tern's bpffs must exist first.
    tern_bpf::ensure_bpffs().unwrap();
    let w = World::new();
    let _pins = Pins(&w.node.ns);
    let (pod_a, pod_b) = (Netns::new("tbwp"), Netns::new("tbwp"));
    let res_a = w.main_add(Main::TernFast, "ctr-fa", &pod_a);
    let res_b = w.main_add(Main::TernFast, "ctr-fb", &pod_b);
    let (hv_a, hv_b) = (host_veth(&w, &res_a), host_veth(&w, &res_b));
    let (a, b) = (pod_ip(&res_a), pod_ip(&res_b));
    assert!(fast_entry(&w.node.ns, a).expect("pod a registered").fast);

    let conf = w.bw_conf("1.1.0", rates(), Some(&res_a));
    let out = w.bw("ADD", "ctr-fa", Some(&pod_a.path()), &conf).assert_ok().json();
    let ifb = ifb_of(&out);
    assert_eq!(w.ifbs(), vec![ifb.clone()]);
    for ip in result_ips(&res_a) {
        let ep = fast_entry(&w.node.ns, ip).expect("entry kept, flag cleared");
        assert!(!ep.fast, "the shaped pod is still on the fast path: {ep:?}");
    }
    assert!(fast_entry(&w.node.ns, b).unwrap().fast, "the other pod stays on the fast path");
    // The fast path's clsact is shared, not replaced by an ingress qdisc.
    assert_eq!(w.qdisc_kinds(&hv_a), vec!["clsact", "tbf"]);
    let redirect = redirects(&w, &hv_a);
    assert_eq!(redirect.len(), 1, "{redirect:?}");
    assert!(redirect[0].to_string().contains(&format!("\"to_dev\":\"{ifb}\"")), "{redirect:?}");
    let bpf = bpf_filter(&w, &hv_a);
    assert!(
        redirect[0]["pref"].as_u64().unwrap() < bpf["pref"].as_u64().unwrap(),
        "the redirect must run before the BPF filter: {redirect:?} {bpf:?}"
    );
    let check = || w.bw("CHECK", "ctr-fa", Some(&pod_a.path()), &w.bw_conf("1.1.0", rates(), Some(&out)));
    assert_empty_ok(&check());

    // Pod to pod, both ways: pod a's packets cross its ifb (the redirect
    // runs first), pod b's answers its host veth's tbf (no bpf_redirect_peer
    // past it), and the fast path delivers nothing to either.
    let before = (w.tx_packets(&ifb), w.qdisc_packets(&hv_a, "tbf"), fast_entry(&w.node.ns, b).unwrap().redirected);
    assert!(tcp_ok(&pod_a, &pod_b, b, 8090), "pod a -> pod b");
    assert!(tcp_ok(&pod_b, &pod_a, a, 8091), "pod b -> pod a");
    assert!(w.tx_packets(&ifb) > before.0, "pod a's packets did not cross ifb {ifb}");
    assert!(w.qdisc_packets(&hv_a, "tbf") > before.1, "packets to pod a skipped the tbf of {hv_a}");
    assert_eq!(fast_entry(&w.node.ns, b).unwrap().redirected, before.2, "pod a -> pod b took the fast path");
    assert_eq!(fast_entry(&w.node.ns, a).unwrap().redirected, 0, "pod b -> pod a took the fast path");

    // CHECK names a pod that is back on the fast path.
    set_fast(&w.node.ns, a, true);
    assert_error_naming(&check(), &["fast path", &a.to_string()]);
    set_fast(&w.node.ns, a, false);
    assert_empty_ok(&check());

    assert_empty_ok(&w.bw("DEL", "ctr-fa", Some(&pod_a.path()), &w.bw_conf("1.1.0", rates(), Some(&out))));
    assert_eq!(w.ifbs(), Vec::<String>::new());
    let left = w.ingress_filters(&hv_a);
    assert!(left.iter().all(|f| f["kind"] == "bpf"), "the redirect survived DEL: {left:?}");
    assert_eq!(w.qdisc_kinds(&hv_a), vec!["clsact"], "DEL must keep the fast path's clsact and only that");
    bpf_filter(&w, &hv_a);
    // The other pod's fast path is untouched.
    assert_eq!(w.qdisc_kinds(&hv_b), vec!["clsact"]);
    bpf_filter(&w, &hv_b);
    assert!(fast_entry(&w.node.ns, b).unwrap().fast);
    // Idempotent, and the pods still talk.
    assert_empty_ok(&w.bw("DEL", "ctr-fa", Some(&pod_a.path()), &w.bw_conf("1.1.0", rates(), Some(&out))));
    assert!(tcp_ok(&pod_a, &pod_b, b, 8092), "pod a -> pod b after DEL");

    w.main_del(Main::TernFast, "ctr-fa", &pod_a, &res_a);
    w.main_del(Main::TernFast, "ctr-fb", &pod_b, &res_b);
    assert_eq!(fast_entries(&w.node.ns), Vec::<Endpoint>::new(), "fast-path entries left");
    w.node.assert_clean();
}

/// After `tern` with the eBPF fast path: DEL after the pod's netns is gone
/// (and the host veth with it) succeeds, removes the ifb, and stays
/// idempotent.
#[test]
fn fast_path_del_after_the_netns_is_gone() {
    tern_bpf::ensure_bpffs().unwrap();
    let w = World::new();
    let _pins = Pins(&w.node.ns);
    let pod = Netns::new("tbwp");
    let res = w.main_add(Main::TernFast, "ctr-fg", &pod);
    let conf = w.bw_conf("1.1.0", rates(), Some(&res));
    let out = w.bw("ADD", "ctr-fg", Some(&pod.path()), &conf).assert_ok().json();
    assert_eq!(w.ifbs(), vec![ifb_of(&out)]);

    let pod_path = pod.path();
    pod.delete_now();
    let conf = w.bw_conf("1.1.0", rates(), Some(&out));
    assert_empty_ok(&w.bw("DEL", "ctr-fg", Some(&pod_path), &conf));
    assert_eq!(w.ifbs(), Vec::<String>::new());
    assert_empty_ok(&w.bw("DEL", "ctr-fg", Some(&pod_path), &conf));
    w.node.del(&with_prev(&w.main_conf(Main::TernFast), &res), "ctr-fg", None).assert_ok();
    assert_eq!(fast_entries(&w.node.ns), Vec::<Endpoint>::new(), "fast-path entries left");
    w.node.assert_clean();
}

/// GC of a shaped fast-path pod that is not listed: the redirect under the
/// clsact goes before its ifb (a redirect to a deleted link drops every
/// packet), the clsact and the BPF filter stay.
#[test]
fn fast_path_gc_removes_the_redirect_with_the_ifb() {
    tern_bpf::ensure_bpffs().unwrap();
    let w = World::new();
    let _pins = Pins(&w.node.ns);
    let pod = Netns::new("tbwp");
    let res = w.main_add(Main::TernFast, "ctr-fc", &pod);
    let hv = host_veth(&w, &res);
    let out = w.bw("ADD", "ctr-fc", Some(&pod.path()), &w.bw_conf("1.1.0", rates(), Some(&res))).assert_ok().json();
    assert_eq!(redirects(&w, &hv).len(), 1);

    let mut gc: Value = serde_json::from_str(&w.bw_conf("1.1.0", json!({}), None)).unwrap();
    gc["cni.dev/valid-attachments"] = json!([]);
    assert_empty_ok(&w.bw("GC", "", None, &gc.to_string()));
    assert_eq!(w.ifbs(), Vec::<String>::new());
    let left = w.ingress_filters(&hv);
    assert!(left.iter().all(|f| f["kind"] == "bpf"), "GC left a redirect to its deleted ifb: {left:?}");
    assert!(w.qdisc_kinds(&hv).contains(&"clsact".to_string()));
    bpf_filter(&w, &hv);

    assert_empty_ok(&w.bw("DEL", "ctr-fc", Some(&pod.path()), &w.bw_conf("1.1.0", rates(), Some(&out))));
    assert_eq!(w.qdisc_kinds(&hv), vec!["clsact"]);
    w.main_del(Main::TernFast, "ctr-fc", &pod, &res);
    assert_eq!(fast_entries(&w.node.ns), Vec::<Endpoint>::new(), "fast-path entries left");
    w.node.assert_clean();
}
