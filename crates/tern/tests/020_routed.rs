//! The `tern` plugin in routed mode: /32 and /128 pod addresses, link-local
//! gateways pinned by permanent neighbour entries, a host route per pod
//! address, traffic pod↔pod and pod↔node, and nothing left after DEL.

mod common;

use std::net::IpAddr;

use common::*;
use serde_json::{json, Value};
use tern_testkit::*;

const NODE4: &str = "10.255.0.1";
const NODE6: &str = "fd55::1";

fn ranges(v4: bool, v6: bool) -> Value {
    let mut r = Vec::new();
    if v4 {
        r.push(json!([{ "subnet": "10.77.0.0/24" }]));
    }
    if v6 {
        r.push(json!([{ "subnet": "fd77::/64" }]));
    }
    Value::Array(r)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// (pod address as the pod holds it, its gateway) for the n-th pod (0-based).
fn expected(v4: bool, v6: bool, n: usize) -> Vec<(String, &'static str)> {
    let mut v = Vec::new();
    if v4 {
        v.push((format!("10.77.0.{}/32", n + 2), "169.254.1.1"));
    }
    if v6 {
        v.push((format!("fd77::{}/128", n + 2), "fe80::1"));
    }
    v
}

/// A node with "node addresses" on lo, as a real node's own IPs.
fn routed_node() -> Node {
    let node = Node::new();
    node.ns.ok(&format!("ip addr add {NODE4}/32 dev lo && ip addr add {NODE6}/128 dev lo nodad"));
    node
}

/// Routes in `ns` (both families) whose destination is `dst` (an address).
fn routes_to(ns: &Netns, dst: &str) -> Vec<Value> {
    let mut all = ip_json(ns, &["-4", "route", "show"]);
    all.extend(ip_json(ns, &["-6", "route", "show"]));
    all.into_iter()
        .filter(|r| r["dst"] == dst || r["dst"] == format!("{dst}/32") || r["dst"] == format!("{dst}/128"))
        .collect()
}

/// Checks one routed attachment against the kernel; returns the host veth.
fn assert_routed_pod(node: &Node, pod: &Netns, res: &Value, want: &[(String, &str)]) -> String {
    assert_eq!(res["cniVersion"], "1.0.0", "{res:#}");
    let ifs = res["interfaces"].as_array().expect("interfaces");
    assert_eq!(ifs.len(), 2, "routed mode has no bridge: {res:#}");
    let hv = ifs[0]["name"].as_str().unwrap().to_owned();
    assert!(hv.starts_with("tn"), "{res:#}");
    assert!(ifs[0].get("sandbox").is_none(), "{res:#}");
    let hv_link = link(&node.ns, &hv).expect("host veth in the node");
    let hv_mac = hv_link["address"].as_str().unwrap().to_owned();
    assert_eq!(ifs[0]["mac"], hv_mac.as_str());
    assert!(hv_link.get("master").is_none(), "routed veth must not be enslaved: {hv_link:#}");
    assert_eq!(ifs[1]["name"], "eth0");
    assert_eq!(ifs[1]["sandbox"], pod.path().to_str().unwrap());

    let ips = res["ips"].as_array().unwrap();
    assert_eq!(ips.len(), want.len(), "{res:#}");
    for (got, (addr, gw)) in ips.iter().zip(want) {
        assert_eq!(got, &json!({ "interface": 1, "address": addr, "gateway": gw }), "{res:#}");
    }
    let addrs: Vec<String> = want.iter().map(|(a, _)| a.clone()).collect();
    assert_eq!(pod.addrs("eth0"), addrs);

    for (addr, gw) in want {
        let fam = if ip_of(addr).is_ipv4() { "-4" } else { "-6" };
        // Default route via the link-local gateway on eth0.
        let defaults = ip_json(pod, &[fam, "route", "show", "default"]);
        assert_eq!(defaults.len(), 1, "{defaults:?}");
        assert_eq!((&defaults[0]["gateway"], &defaults[0]["dev"]), (&json!(gw), &json!("eth0")), "{defaults:?}");
        // The gateway is pinned to the host veth's MAC.
        let neigh: Vec<Value> =
            ip_json(pod, &[fam, "neigh", "show", "dev", "eth0"]).into_iter().filter(|n| n["dst"] == *gw).collect();
        assert_eq!(neigh.len(), 1, "no neighbour entry for {gw}: {neigh:?}");
        assert_eq!(neigh[0]["lladdr"], hv_mac.as_str(), "{neigh:?}");
        assert_eq!(neigh[0]["state"], json!(["PERMANENT"]), "{neigh:?}");
        // The node routes the pod address to the host veth.
        let a = ip_of(addr).to_string();
        let host_routes = routes_to(&node.ns, &a);
        assert_eq!(host_routes.len(), 1, "node routes to {a}: {host_routes:?}");
        assert_eq!(host_routes[0]["dev"], hv.as_str(), "{host_routes:?}");
    }
    hv
}

fn routed_family(v4: bool, v6: bool) {
    let node = routed_node();
    let pod_a = Netns::new("tpa");
    let pod_b = Netns::new("tpb");
    let conf = node.conf("1.0.0", ranges(v4, v6), json!({ "mode": "routed" }));
    let res_a = node.add_ok(&conf, "ctr-a", &pod_a);
    let res_b = node.add_ok(&conf, "ctr-b", &pod_b);
    let hv_a = assert_routed_pod(&node, &pod_a, &res_a, &expected(v4, v6, 0));
    let hv_b = assert_routed_pod(&node, &pod_b, &res_b, &expected(v4, v6, 1));
    let mut veths = vec![hv_a, hv_b];
    veths.sort();
    assert_eq!(node.veths(), veths);
    // No bridge: the node has lo and the two veths only.
    let mut links = node.ns.links();
    links.sort();
    let mut want_links = veths.clone();
    want_links.push("lo".into());
    want_links.sort();
    assert_eq!(links, want_links);

    let mut node_ips = Vec::new();
    if v4 {
        node_ips.push(ip(NODE4));
    }
    if v6 {
        node_ips.push(ip(NODE6));
    }
    for (i, node_ip) in node_ips.iter().enumerate() {
        let a = ip_of(&result_addrs(&res_a)[i]);
        let b = ip_of(&result_addrs(&res_b)[i]);
        assert!(tcp_ok(&pod_a, &pod_b, b, 8080), "pod a -> pod b {b}");
        assert!(tcp_ok(&pod_b, &pod_a, a, 8080), "pod b -> pod a {a}");
        assert!(tcp_ok(&pod_a, &node.ns, *node_ip, 8081), "pod a -> node {node_ip}");
        assert!(tcp_ok(&node.ns, &pod_b, b, 8082), "node -> pod b {b}");
    }

    let pod_addrs: Vec<String> =
        result_addrs(&res_a).iter().chain(result_addrs(&res_b).iter()).map(|a| ip_of(a).to_string()).collect();
    assert_empty_ok(&node.del(&with_prev(&conf, &res_a), "ctr-a", Some(&pod_a.path())));
    assert_empty_ok(&node.del(&with_prev(&conf, &res_b), "ctr-b", Some(&pod_b.path())));
    node.assert_clean();
    for a in &pod_addrs {
        assert_eq!(routes_to(&node.ns, a), Vec::<Value>::new(), "route to {a} left in the node");
    }
    assert_eq!(node.ns.links(), vec!["lo".to_string()]);
    assert!(!pod_a.links().contains(&"eth0".to_string()));
    assert!(!pod_b.links().contains(&"eth0".to_string()));
}

#[test]
fn routed_ipv4() {
    routed_family(true, false);
}

#[test]
fn routed_ipv6() {
    routed_family(false, true);
}

#[test]
fn routed_dual_stack() {
    routed_family(true, true);
}
