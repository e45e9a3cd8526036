//! Many concurrent ADDs and DELs on one `tern` network, in bridge and routed mode: distinct
//! addresses, one host veth each, and after the DELs no link, route, nftables element or
//! reservation left.
//!
//! Privileged: run as root. Every test builds its own node and pod namespaces.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;

use serde_json::{json, Value};
use tern_testkit::*;

const IFNAME: &str = "eth0";
const PORT: u16 = 7040;
const MASQ_TABLE: &str = "tern_masq";

fn plugins() -> Plugins {
    Plugins::new(Path::new(env!("CARGO_BIN_EXE_tern")))
}

/// Every route of the node (all tables, both families) as text lines.
fn node_routes(node: &Netns) -> Vec<String> {
    let mut lines = Vec::new();
    for fam in ["-4", "-6"] {
        let out = node.run(&["ip", fam, "route", "show", "table", "all"]);
        assert!(out.status.success(), "ip {fam} route: {}", String::from_utf8_lossy(&out.stderr));
        lines.extend(String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned));
    }
    lines
}

/// Routes that mention one of `addrs` as a whole token (with or without a prefix length).
fn routes_mentioning(node: &Netns, addrs: &HashSet<IpAddr>) -> Vec<String> {
    node_routes(node)
        .into_iter()
        .filter(|l| {
            l.split_whitespace()
                .any(|t| t.split('/').next().and_then(|a| a.parse::<IpAddr>().ok()).is_some_and(|a| addrs.contains(&a)))
        })
        .collect()
}

/// Runs `f(i)` for i in 0..n, all at once on their own threads; returns the results in order.
fn concurrently<T: Send>(n: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = (0..n).map(|i| s.spawn(move || f(i))).collect();
        handles.into_iter().map(|h| h.join().expect("worker thread")).collect()
    })
}

fn new_pods(n: usize) -> Vec<Netns> {
    concurrently(n, |_| Netns::new("cc-pod"))
}

/// ADD `n` pods concurrently, check everything is there, DEL them concurrently, check nothing is
/// left. `routed`: per-pod host routes are expected while the pods exist.
fn add_del_many(n: usize, mode: &str, conf: &str, data: &TempDir, network: &str) {
    let plugins = plugins();
    let node = Netns::new("cc-node");
    let pods = new_pods(n);
    let ids: Vec<String> = (0..n).map(|i| format!("{network}-{i}")).collect();

    let adds = concurrently(n, |i| {
        exec_plugin(&node, &plugins, "tern", "ADD", &ids[i], Some(&pods[i].path()), IFNAME, "", conf)
    });
    let failed: Vec<String> =
        adds.iter().enumerate().filter(|(_, r)| r.code != 0).map(|(i, r)| format!("ADD {i}: {r}")).collect();
    assert!(failed.is_empty(), "{} of {n} concurrent ADDs failed:\n{}", failed.len(), failed.join("\n"));

    let per_pod: Vec<Vec<IpAddr>> = adds.iter().map(PluginRun::ips).collect();
    let v4: HashSet<IpAddr> = per_pod.iter().flatten().copied().filter(IpAddr::is_ipv4).collect();
    let v6: HashSet<IpAddr> = per_pod.iter().flatten().copied().filter(IpAddr::is_ipv6).collect();
    assert!(per_pod.iter().all(|ips| ips.len() == 2), "expected two addresses per pod: {per_pod:?}");
    assert_eq!(v4.len(), n, "IPv4 addresses not distinct: {per_pod:?}");
    assert_eq!(v6.len(), n, "IPv6 addresses not distinct: {per_pod:?}");
    let all: HashSet<IpAddr> = v4.union(&v6).copied().collect();

    // The kernel agrees with the results.
    for (i, ips) in per_pod.iter().enumerate() {
        let have = pods[i].addrs(IFNAME);
        for ip in ips {
            assert!(have.iter().any(|a| a.starts_with(&format!("{ip}/"))), "pod {i}: {ip} not on {IFNAME}: {have:?}");
        }
    }
    let veths = veth_links(&node, "tn");
    assert_eq!(veths.len(), n, "host veths: {veths:?}");
    let mut want_res: Vec<String> = all.iter().map(IpAddr::to_string).collect();
    want_res.sort();
    assert_eq!(reservations(data.path(), network), want_res);
    let masq = masq_elements(&node);
    assert_eq!(masq.len(), 2 * n, "masquerade elements: {masq:?}");
    let masq_keys: HashSet<IpAddr> = masq.iter().map(|(k, _)| k.parse().expect("address key")).collect();
    assert_eq!(masq_keys, all, "masquerade elements vs pod addresses");
    let owners: HashSet<String> = masq.iter().map(|(_, c)| c.clone()).collect();
    let want_owners: HashSet<String> = ids.iter().map(|id| format!("{network}/{id}/{IFNAME}")).collect();
    assert_eq!(owners, want_owners, "masquerade owner tags");
    if mode == "routed" {
        let routed = routes_mentioning(&node, &all);
        assert_eq!(routed.len(), 2 * n, "host routes to the pods: {routed:#?}");
    } else {
        let br = node.run(&["ip", "-j", "link", "show", "type", "veth"]);
        let links: Value = serde_json::from_slice(&br.stdout).unwrap();
        let masters: HashSet<String> =
            links.as_array().unwrap().iter().filter_map(|l| l["master"].as_str().map(str::to_owned)).collect();
        assert_eq!(masters.len(), 1, "host veths on more than one bridge: {masters:?}");
    }

    // Pods talk to each other (first and last, both families).
    let (a, b) = (0, n - 1);
    for ip in &per_pod[b] {
        assert!(tcp_ok(&pods[a], &pods[b], *ip, PORT), "TCP pod{a} -> pod{b} at {ip} ({mode})");
    }

    let dels = concurrently(n, |i| {
        exec_plugin(&node, &plugins, "tern", "DEL", &ids[i], Some(&pods[i].path()), IFNAME, "", conf)
    });
    let failed: Vec<String> =
        dels.iter().enumerate().filter(|(_, r)| r.code != 0).map(|(i, r)| format!("DEL {i}: {r}")).collect();
    assert!(failed.is_empty(), "{} of {n} concurrent DELs failed:\n{}", failed.len(), failed.join("\n"));

    let tn: Vec<String> = node.links().into_iter().filter(|l| l.starts_with("tn")).collect();
    assert_eq!(tn, Vec::<String>::new(), "tn* links left");
    assert_eq!(veth_links(&node, ""), Vec::<String>::new(), "veths left");
    assert_eq!(routes_mentioning(&node, &all), Vec::<String>::new(), "routes to deleted pods left");
    assert_eq!(masq_elements(&node), Vec::new(), "masquerade elements left");
    let tables: Vec<String> = nft_tables(&node).into_iter().filter(|t| t.contains("tern")).collect();
    assert_eq!(tables, Vec::<String>::new(), "tern nftables tables left");
    let ruleset = node.ok("nft list ruleset");
    for ip in &all {
        assert!(
            !ruleset.split(|c: char| c.is_whitespace() || c == ',').any(|t| t == ip.to_string()),
            "{ip} still in the ruleset:\n{ruleset}"
        );
    }
    assert_eq!(reservations(data.path(), network), Vec::<String>::new(), "reservations left");
    for (i, pod) in pods.iter().enumerate() {
        assert_eq!(pod.links(), ["lo"], "pod {i} still has links");
    }
}

fn conf(network: &str, mode: &str, bridge: Option<&str>, data: &TempDir) -> String {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": network,
        "type": "tern",
        "mode": mode,
        "ipMasq": true,
        "ipam": {
            "type": "tern-ipam",
            "dataDir": data.path(),
            "ranges": [[{"subnet": "10.240.0.0/24"}], [{"subnet": "fd00:240::/64"}]],
        },
    });
    if let Some(br) = bridge {
        c["bridge"] = json!(br);
        c["isGateway"] = json!(true);
    }
    c.to_string()
}

#[test]
fn concurrent_add_del_bridge_64() {
    let data = TempDir::new();
    let network = unique("cc-br");
    let bridge = unique_short("ccbr");
    add_del_many(64, "bridge", &conf(&network, "bridge", Some(&bridge), &data), &data, &network);
}

#[test]
fn concurrent_add_del_routed_32() {
    let data = TempDir::new();
    let network = unique("cc-rt");
    add_del_many(32, "routed", &conf(&network, "routed", None, &data), &data, &network);
}

/// The masquerade map elements as (address, owner tag).
fn masq_elements(node: &Netns) -> Vec<(String, String)> {
    nft_elements(node, "inet", MASQ_TABLE)
}
