//! CNI GC (spec 1.1.0) on the `tern` plugin: exactly the attachments missing from the valid list
//! lose their host veth, reservations and masquerade elements; the listed ones keep everything
//! and keep working. Both GC keys are accepted, GC needs cniVersion 1.1.0, and GC of one network
//! leaves another network's attachments alone.
//!
//! Privileged: run as root. Every test builds its own node and pod namespaces.

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::path::Path;

use serde_json::{json, Value};
use tern_testkit::*;

const PORT: u16 = 7070;
const MASQ_TABLE: &str = "tern_masq";
const SPOOF_TABLE: &str = "tern_spoof";

fn plugins() -> Plugins {
    Plugins::new(Path::new(env!("CARGO_BIN_EXE_tern")))
}

/// One attachment: a pod namespace (shared by several attachments), container id, ifname, and
/// the network (index into the test's configs) it was added to.
struct Att<'a> {
    pod: &'a Netns,
    id: String,
    ifname: &'static str,
    net: usize,
    ips: Vec<IpAddr>,
    /// The host veth this ADD created.
    veth: String,
}

/// A node with some tern networks and attachments on them.
struct World {
    node: Netns,
    plugins: Plugins,
    data: TempDir,
    names: Vec<String>,
    confs: Vec<String>,
}

impl World {
    /// `nets`: (cniVersion, subnet index) per network; all share one dataDir, each has its own
    /// bridge and subnets, ipMasq and macspoofchk on.
    fn new(nets: &[(&str, u8)]) -> World {
        let nets: Vec<(String, &str, &str, u8)> =
            nets.iter().map(|&(v, k)| (unique("gc-net"), "bridge", v, k)).collect();
        World::with(&nets)
    }

    /// (name, mode, cniVersion, subnet index) per network.
    fn with(nets: &[(String, &str, &str, u8)]) -> World {
        let data = TempDir::new();
        let mut names = Vec::new();
        let mut confs = Vec::new();
        for (name, mode, version, k) in nets {
            confs.push(net_conf(version, name, mode, &unique_short("gcbr"), *k, data.path()).to_string());
            names.push(name.clone());
        }
        World { node: Netns::new("gc-node"), plugins: plugins(), data, names, confs }
    }

    fn add<'a>(&self, pod: &'a Netns, id: &str, ifname: &'static str, net: usize) -> Att<'a> {
        let before: HashSet<String> = veth_links(&self.node, "tn").into_iter().collect();
        let run =
            exec_plugin(&self.node, &self.plugins, "tern", "ADD", id, Some(&pod.path()), ifname, "", &self.confs[net]);
        run.assert_ok();
        let ips = run.ips();
        assert_eq!(ips.len(), 2, "{run}");
        let new: Vec<String> = veth_links(&self.node, "tn").into_iter().filter(|v| !before.contains(v)).collect();
        assert_eq!(new.len(), 1, "ADD {id}/{ifname} made host veths {new:?}");
        Att { pod, id: id.to_string(), ifname, net, ips, veth: new[0].clone() }
    }

    /// GC of network `net` with `extra` merged into its config.
    fn gc(&self, net: usize, extra: Value) -> PluginRun {
        let mut conf: Value = serde_json::from_str(&self.confs[net]).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            conf[k] = v.clone();
        }
        exec_plugin(&self.node, &self.plugins, "tern", "GC", "", None, "", "", &conf.to_string())
    }

    /// Asserts that `a` has everything (`alive`) or nothing (`!alive`) left.
    fn assert_state(&self, a: &Att, alive: bool) {
        let what = format!("{}/{} on {}", a.id, a.ifname, self.names[a.net]);
        let veths = veth_links(&self.node, "tn");
        assert_eq!(veths.contains(&a.veth), alive, "host veth {} of {what} (veths: {veths:?})", a.veth);
        let pod_links = a.pod.links();
        assert_eq!(pod_links.iter().any(|l| l == a.ifname), alive, "{} in the pod, {what}: {pod_links:?}", a.ifname);

        let res = reservations(self.data.path(), &self.names[a.net]);
        let owner = format!("{}\r\n{}", a.id, a.ifname);
        let mine: Vec<&String> = res
            .iter()
            .filter(|f| std::fs::read_to_string(self.data.join(&self.names[a.net]).join(f)).is_ok_and(|c| c == owner))
            .collect();
        let want: Vec<String> = if alive {
            let mut v: Vec<String> = a.ips.iter().map(IpAddr::to_string).collect();
            v.sort();
            v
        } else {
            Vec::new()
        };
        assert_eq!(mine, want.iter().collect::<Vec<_>>(), "reservations of {what}");
        if !alive {
            for ip in &a.ips {
                assert!(!res.contains(&ip.to_string()), "{ip} of {what} still reserved");
            }
        }

        // Masquerade elements are keyed by the pod's addresses (unique on the node here) and
        // carry one owner tag; readable when the names are short, hashed otherwise.
        let keys: HashSet<String> = a.ips.iter().map(IpAddr::to_string).collect();
        let masq: Vec<(String, String)> =
            masq_elements(&self.node).into_iter().filter(|(_, k)| keys.contains(k)).collect();
        assert_eq!(masq.len(), if alive { a.ips.len() } else { 0 }, "masquerade elements of {what}: {masq:?}");
        let tags: HashSet<&String> = masq.iter().map(|(c, _)| c).collect();
        assert!(tags.len() <= 1, "one owner tag per attachment: {tags:?}");
        if a.id.len() < 60 && self.names[a.net].len() <= 48 {
            let tag = format!("{}/{}/{}", self.names[a.net], a.id, a.ifname);
            assert!(masq.iter().all(|(c, _)| *c == tag), "owner tag of {what}: {masq:?}");
        }

        // Bridge mode: MAC spoof check elements are keyed by the host veth.
        let spoof = spoof_ports(&self.node);
        let n = spoof.iter().filter(|p| p.contains(&a.veth)).count();
        if self.is_routed(a.net) {
            assert_eq!(n, 0, "routed mode has no spoof check: {spoof:?}");
        } else {
            assert_eq!(n, if alive { 2 } else { 0 }, "spoof check elements (ports, allowed) of {what}: {spoof:?}");
        }

        // Routed mode: one host route per pod address while alive.
        if self.is_routed(a.net) {
            let routes = routes_to(&self.node, &a.ips);
            assert_eq!(routes.len(), if alive { a.ips.len() } else { 0 }, "host routes of {what}: {routes:?}");
        }
    }

    fn is_routed(&self, net: usize) -> bool {
        serde_json::from_str::<Value>(&self.confs[net]).unwrap()["mode"] == "routed"
    }
}

fn net_conf(version: &str, name: &str, mode: &str, bridge: &str, k: u8, data_dir: &Path) -> Value {
    let mut c = json!({
        "cniVersion": version,
        "name": name,
        "type": "tern",
        "mode": mode,
        "ipMasq": true,
        "ipam": {
            "type": "tern-ipam",
            "dataDir": data_dir,
            "ranges": [[{"subnet": format!("10.70.{k}.0/24")}], [{"subnet": format!("fd00:70:{k}::/64")}]],
        },
    });
    if mode == "bridge" {
        c["bridge"] = json!(bridge);
        c["isGateway"] = json!(true);
        c["macspoofchk"] = json!(true);
    }
    c
}

/// The elements of the spoof check sets (`ports`, `allowed`) as nft prints them, one per line.
fn spoof_ports(node: &Netns) -> Vec<String> {
    let out = node.run(&["nft", "-j", "list", "table", "bridge", SPOOF_TABLE]);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("No such file or directory"), "nft list table bridge {SPOOF_TABLE}: {err}");
        return Vec::new();
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("nft -j output");
    let mut elems = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(set) = item.get("set") else { continue };
        for e in set["elem"].as_array().into_iter().flatten() {
            elems.push(format!("{}: {e}", set["name"].as_str().unwrap_or_default()));
        }
    }
    elems
}

/// Node routes (both families, all tables) whose destination is one of `ips`.
fn routes_to(node: &Netns, ips: &[IpAddr]) -> Vec<String> {
    let mut found = Vec::new();
    for fam in ["-4", "-6"] {
        let out = node.run(&["ip", fam, "route", "show", "table", "all"]);
        assert!(out.status.success(), "ip route: {}", String::from_utf8_lossy(&out.stderr));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let dst = line.split_whitespace().next().unwrap_or_default();
            let dst = dst.strip_suffix("/32").or_else(|| dst.strip_suffix("/128")).unwrap_or(dst);
            if dst.parse::<IpAddr>().is_ok_and(|d| ips.contains(&d)) {
                found.push(line.to_string());
            }
        }
    }
    found
}

fn valid(atts: &[&Att]) -> Value {
    Value::Array(atts.iter().map(|a| json!({"containerID": a.id, "ifname": a.ifname})).collect())
}

fn assert_tcp(client: &Att, server: &Att) {
    for ip in &server.ips {
        assert!(tcp_ok(client.pod, server.pod, *ip, PORT), "TCP {} -> {} at {ip}", client.id, server.id);
    }
}

/// GC keeps the listed attachments and removes the others, matching on (containerID, ifname):
/// pod 0's second interface is not listed and goes, its first stays.
#[test]
fn gc_releases_exactly_the_unlisted_attachments() {
    let w = World::new(&[("1.1.0", 1)]);
    let pods: Vec<Netns> = (0..4).map(|_| Netns::new("gc-pod")).collect();
    let ids: Vec<String> = (0..4).map(|_| unique("gc-ctr")).collect();
    let atts: Vec<Att> = pods.iter().zip(&ids).map(|(p, id)| w.add(p, id, "eth0", 0)).collect();
    let second = w.add(&pods[0], &ids[0], "net1", 0);
    for a in atts.iter().chain([&second]) {
        w.assert_state(a, true);
    }

    let run = w.gc(0, json!({"cni.dev/valid-attachments": valid(&[&atts[0], &atts[2]])}));
    run.assert_ok();
    assert_eq!(run.stdout.trim(), "", "GC prints nothing on success");

    w.assert_state(&atts[0], true);
    w.assert_state(&atts[2], true);
    w.assert_state(&atts[1], false);
    w.assert_state(&atts[3], false);
    w.assert_state(&second, false);
    assert_eq!(veth_links(&w.node, "tn").len(), 2);
    assert_eq!(reservations(w.data.path(), &w.names[0]).len(), 4);
    assert_eq!(masq_elements(&w.node).len(), 4);
    assert_tcp(&atts[0], &atts[2]);
    assert_tcp(&atts[2], &atts[0]);

    // GC is idempotent, and the kept attachments still DEL cleanly.
    w.gc(0, json!({"cni.dev/valid-attachments": valid(&[&atts[0], &atts[2]])})).assert_ok();
    w.assert_state(&atts[0], true);
    for a in [&atts[0], &atts[2]] {
        exec_plugin(&w.node, &w.plugins, "tern", "DEL", &a.id, Some(&a.pod.path()), a.ifname, "", &w.confs[0])
            .assert_ok();
        w.assert_state(a, false);
    }
    assert_eq!(reservations(w.data.path(), &w.names[0]), Vec::<String>::new());
    assert!(!nft_tables(&w.node).iter().any(|t| t.contains(MASQ_TABLE)), "{:?}", nft_tables(&w.node));
}

/// The spec-1.1 tag's key `cni.dev/attachments` works alone too.
#[test]
fn gc_accepts_the_older_attachments_key() {
    let w = World::new(&[("1.1.0", 2)]);
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("gc-pod")).collect();
    let atts: Vec<Att> = pods.iter().map(|p| w.add(p, &unique("gc-ctr"), "eth0", 0)).collect();

    w.gc(0, json!({"cni.dev/attachments": valid(&[&atts[1], &atts[2]])})).assert_ok();
    w.assert_state(&atts[0], false);
    w.assert_state(&atts[1], true);
    w.assert_state(&atts[2], true);
    assert_tcp(&atts[1], &atts[2]);

    // An empty list means no attachment is valid any more.
    w.gc(0, json!({"cni.dev/attachments": []})).assert_ok();
    for a in &atts {
        w.assert_state(a, false);
    }
    assert_eq!(reservations(w.data.path(), &w.names[0]), Vec::<String>::new());
    assert_eq!(veth_links(&w.node, ""), Vec::<String>::new());
}

/// GC does not exist before spec 1.1.0: code 1, and nothing is touched.
#[test]
fn gc_with_cni_version_1_0_0_fails_with_code_1() {
    let w = World::new(&[("1.0.0", 3)]);
    let pod = Netns::new("gc-pod");
    let att = w.add(&pod, &unique("gc-ctr"), "eth0", 0);

    let run = w.gc(0, json!({"cni.dev/valid-attachments": []}));
    run.assert_error(1);
    let run = w.gc(0, json!({"cni.dev/attachments": []}));
    run.assert_error(1);
    w.assert_state(&att, true);
}

/// GC of network A, whose valid list naturally names none of network B's attachments, leaves B
/// alone, even for the same containers (with another ifname) on the same node and dataDir.
#[test]
fn gc_of_one_network_leaves_another_alone() {
    let w = World::new(&[("1.1.0", 4), ("1.1.0", 5)]);
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("gc-pod")).collect();
    let ids: Vec<String> = (0..3).map(|_| unique("gc-ctr")).collect();
    let a: Vec<Att> = pods.iter().zip(&ids).map(|(p, id)| w.add(p, id, "eth0", 0)).collect();
    let b: Vec<Att> = pods.iter().zip(&ids).map(|(p, id)| w.add(p, id, "net1", 1)).collect();

    w.gc(0, json!({"cni.dev/valid-attachments": valid(&[&a[0]])})).assert_ok();
    w.assert_state(&a[0], true);
    w.assert_state(&a[1], false);
    w.assert_state(&a[2], false);
    for att in &b {
        w.assert_state(att, true);
    }
    assert_tcp(&b[1], &b[2]);
    assert_tcp(&b[2], &b[0]);

    // Even "nothing is valid" for A spares B.
    w.gc(0, json!({"cni.dev/valid-attachments": []})).assert_ok();
    w.assert_state(&a[0], false);
    for att in &b {
        w.assert_state(att, true);
    }
    assert_eq!(reservations(w.data.path(), &w.names[0]), Vec::<String>::new());
    assert_eq!(reservations(w.data.path(), &w.names[1]).len(), 6);
    assert_tcp(&b[0], &b[1]);
}

/// Routed mode: GC removes the stale host veths and with them the host routes to the pods.
#[test]
fn gc_in_routed_mode() {
    let w = World::with(&[(unique("gc-rt"), "routed", "1.1.0", 6)]);
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("gc-pod")).collect();
    let atts: Vec<Att> = pods.iter().map(|p| w.add(p, &unique("gc-ctr"), "eth0", 0)).collect();
    for a in &atts {
        w.assert_state(a, true);
    }
    w.gc(0, json!({"cni.dev/valid-attachments": valid(&[&atts[0], &atts[2]])})).assert_ok();
    w.assert_state(&atts[0], true);
    w.assert_state(&atts[1], false);
    w.assert_state(&atts[2], true);
    assert_tcp(&atts[0], &atts[2]);
    assert_tcp(&atts[2], &atts[0]);
}

/// Long names get hashed owner tags (network over 48 characters, container ID plus ifname over
/// 77); GC still tells listed from unlisted attachments and this network from another one.
///
/// Network names this long (over 128 characters) also check that ADD with ipMasq keeps every
/// nftables comment within nftables' 128-character limit.
#[test]
fn gc_with_long_names() {
    let long_net = format!("{}-{}", unique("gc-long"), "n".repeat(130));
    let short_net = unique("gc-short");
    let w = World::with(&[(long_net, "bridge", "1.1.0", 7), (short_net, "bridge", "1.1.0", 8)]);
    let pods: Vec<Netns> = (0..3).map(|_| Netns::new("gc-pod")).collect();
    let ids: Vec<String> = (0..3).map(|_| format!("{}-{}", unique("gc-ctr"), "c".repeat(90))).collect();
    let a: Vec<Att> = pods.iter().zip(&ids).map(|(p, id)| w.add(p, id, "eth0", 0)).collect();
    let b: Vec<Att> = pods.iter().zip(&ids).map(|(p, id)| w.add(p, id, "net1", 1)).collect();

    w.gc(0, json!({"cni.dev/valid-attachments": valid(&[&a[0], &a[2]])})).assert_ok();
    w.assert_state(&a[0], true);
    w.assert_state(&a[1], false);
    w.assert_state(&a[2], true);
    for att in &b {
        w.assert_state(att, true);
    }
    w.gc(1, json!({"cni.dev/valid-attachments": valid(&[&b[1]])})).assert_ok();
    w.assert_state(&b[0], false);
    w.assert_state(&b[1], true);
    w.assert_state(&b[2], false);
    w.assert_state(&a[0], true);
    w.assert_state(&a[2], true);
    assert_tcp(&a[0], &a[2]);
}

/// The masquerade map elements as (owner tag, address).
fn masq_elements(node: &Netns) -> BTreeSet<(String, String)> {
    nft_elements(node, "inet", MASQ_TABLE).into_iter().map(|(k, c)| (c, k)).collect()
}
