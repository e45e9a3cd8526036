//! The `tern` plugin in bridge mode with `tern-ipam`: results, kernel state,
//! traffic, and cleanup. Each test builds its own node and pod namespaces.

mod common;

use std::net::IpAddr;

use common::*;
use serde_json::{json, Value};
use tern_testkit::*;

const V4_SUBNET: &str = "10.66.0.0/24";
const V6_SUBNET: &str = "fd66::/64";

fn ranges(v4: bool, v6: bool) -> Value {
    let mut r = Vec::new();
    if v4 {
        r.push(json!([{ "subnet": V4_SUBNET }]));
    }
    if v6 {
        r.push(json!([{ "subnet": V6_SUBNET }]));
    }
    Value::Array(r)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Addresses the n-th pod (0-based) of a fresh dataDir gets, and the gateways.
fn expected(v4: bool, v6: bool, n: usize) -> Vec<(String, IpAddr)> {
    let mut v = Vec::new();
    if v4 {
        v.push((format!("10.66.0.{}/24", n + 2), ip("10.66.0.1")));
    }
    if v6 {
        v.push((format!("fd66::{}/64", n + 2), ip("fd66::1")));
    }
    v
}

fn mac_of(ns: &Netns, name: &str) -> String {
    link(ns, name).unwrap_or_else(|| panic!("no link {name} in {}", ns.name()))["address"].as_str().unwrap().to_owned()
}

/// The 1.0.0 result shape: [bridge, host veth, pod eth0 (sandbox)], every ip
/// on interface 2 with its gateway; and the kernel agrees with it.
fn assert_bridge_result(node: &Node, pod: &Netns, res: &Value, want: &[(String, IpAddr)]) -> String {
    assert_eq!(res["cniVersion"], "1.0.0", "{res:#}");
    let ifs = res["interfaces"].as_array().expect("interfaces");
    assert_eq!(ifs.len(), 3, "{res:#}");

    assert_eq!(ifs[0]["name"], node.bridge.as_str(), "{res:#}");
    // (Its MAC is checked by `result_reports_the_bridge_mac_after_the_port_joined`.)
    assert!(ifs[0]["mac"].as_str().is_some_and(|m| m.len() == 17), "{res:#}");
    assert!(ifs[0].get("sandbox").is_none(), "{res:#}");

    let host_veth = ifs[1]["name"].as_str().expect("host veth name").to_owned();
    assert!(host_veth.starts_with("tn"), "{res:#}");
    assert!(ifs[1].get("sandbox").is_none(), "{res:#}");
    let hv = link(&node.ns, &host_veth).expect("host veth exists in the node");
    assert_eq!(ifs[1]["mac"], hv["address"], "{res:#}");
    assert_eq!(hv["master"], node.bridge.as_str(), "host veth not on the bridge: {hv:#}");
    assert_eq!(hv["operstate"], "UP", "{hv:#}");

    assert_eq!(ifs[2]["name"], "eth0", "{res:#}");
    assert_eq!(ifs[2]["sandbox"], pod.path().to_str().unwrap(), "{res:#}");
    assert_eq!(ifs[2]["mac"], mac_of(pod, "eth0").as_str(), "{res:#}");
    for i in ifs {
        assert!(i.get("mtu").is_none(), "mtu is a 1.1.0 key: {res:#}");
    }

    let ips = res["ips"].as_array().expect("ips");
    assert_eq!(ips.len(), want.len(), "{res:#}");
    for (got, (addr, gw)) in ips.iter().zip(want) {
        assert_eq!(got, &json!({ "interface": 2, "address": addr, "gateway": gw.to_string() }), "{res:#}");
    }
    let want_addrs: Vec<String> = want.iter().map(|(a, _)| a.clone()).collect();
    assert_eq!(pod.addrs("eth0"), want_addrs);
    assert_eq!(res["dns"], json!({}), "{res:#}");
    host_veth
}

fn bridge_family(v4: bool, v6: bool) {
    let node = Node::new();
    let pod_a = Netns::new("tpa");
    let pod_b = Netns::new("tpb");
    let conf = node.conf("1.0.0", ranges(v4, v6), json!({ "isGateway": true }));

    let res_a = node.add_ok(&conf, "ctr-a", &pod_a);
    let hv_a = assert_bridge_result(&node, &pod_a, &res_a, &expected(v4, v6, 0));
    let res_b = node.add_ok(&conf, "ctr-b", &pod_b);
    let hv_b = assert_bridge_result(&node, &pod_b, &res_b, &expected(v4, v6, 1));
    assert_ne!(hv_a, hv_b);
    let mut veths = vec![hv_a, hv_b];
    veths.sort();
    assert_eq!(node.veths(), veths);

    // The bridge holds the gateway addresses.
    let gws: Vec<String> =
        expected(v4, v6, 0).iter().map(|(a, gw)| format!("{gw}/{}", a.split('/').nth(1).unwrap())).collect();
    assert_eq!(node.ns.addrs(&node.bridge), gws);
    assert_eq!(node.reservations().len(), 2 * gws.len());

    for (i, (_, gw)) in expected(v4, v6, 0).iter().enumerate() {
        let a = ip_of(&result_addrs(&res_a)[i]);
        let b = ip_of(&result_addrs(&res_b)[i]);
        assert!(tcp_ok(&pod_a, &pod_b, b, 8080), "pod a -> pod b {b}");
        assert!(tcp_ok(&pod_b, &pod_a, a, 8080), "pod b -> pod a {a}");
        assert!(tcp_ok(&pod_a, &node.ns, *gw, 8081), "pod a -> node {gw}");
        assert!(tcp_ok(&node.ns, &pod_b, b, 8082), "node -> pod b {b}");
    }

    assert_empty_ok(&node.del(&with_prev(&conf, &res_a), "ctr-a", Some(&pod_a.path())));
    assert_eq!(node.veths().len(), 1);
    assert_eq!(node.reservations().len(), gws.len());
    assert_empty_ok(&node.del(&with_prev(&conf, &res_b), "ctr-b", Some(&pod_b.path())));
    node.assert_clean();
    assert!(!pod_a.links().contains(&"eth0".to_string()));
    assert!(!pod_b.links().contains(&"eth0".to_string()));
    // The bridge stays, as the reference bridge plugin's does.
    assert_eq!(link(&node.ns, &node.bridge).expect("bridge still there")["linkinfo"]["info_kind"], "bridge");
}

/// The bridge's MAC in the result is the one it has after the ADD: the kernel
/// changes a bridge's MAC when ports join (it takes the lowest port MAC), and
/// the reference plugin re-reads it after attaching the veth.
#[test]
fn result_reports_the_bridge_mac_after_the_port_joined() {
    let node = Node::new();
    let pod_a = Netns::new("tpa");
    let pod_b = Netns::new("tpb");
    let conf = node.conf("1.0.0", ranges(true, false), json!({ "isGateway": true }));
    for (cid, pod) in [("ctr-a", &pod_a), ("ctr-b", &pod_b)] {
        let res = node.add_ok(&conf, cid, pod);
        assert_eq!(res["interfaces"][0]["name"], node.bridge.as_str());
        assert_eq!(
            res["interfaces"][0]["mac"],
            mac_of(&node.ns, &node.bridge).as_str(),
            "{cid}: the result's bridge MAC is not the bridge's MAC after the ADD: {res:#}"
        );
    }
    assert_empty_ok(&node.del(&conf, "ctr-a", Some(&pod_a.path())));
    assert_empty_ok(&node.del(&conf, "ctr-b", Some(&pod_b.path())));
    node.assert_clean();
}

#[test]
fn bridge_ipv4() {
    bridge_family(true, false);
}

#[test]
fn bridge_ipv6() {
    bridge_family(false, true);
}

#[test]
fn bridge_dual_stack() {
    bridge_family(true, true);
}

/// Addresses in the maps of `inet tern_masq` with their owner comments, or
/// `None` if the table does not exist.
fn masq_elements(node: &Node) -> Option<Vec<(String, String)>> {
    let out = node.ns.run(&["nft", "-j", "list", "table", "inet", "tern_masq"]);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("No such file or directory"), "nft list failed: {err}");
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("nft -j is JSON");
    let mut elems = Vec::new();
    for item in v["nftables"].as_array().unwrap() {
        let Some(map) = item.get("map") else { continue };
        for e in map["elem"].as_array().into_iter().flatten() {
            // [ {"elem": {"val": addr, "comment": owner}}, {"jump": ...} ]
            let key = &e[0]["elem"];
            elems.push((key["val"].as_str().unwrap().to_owned(), key["comment"].as_str().unwrap().to_owned()));
        }
    }
    elems.sort();
    Some(elems)
}

#[test]
fn ip_masq_table_holds_the_pods_until_the_last_del() {
    let node = Node::new();
    let pod_a = Netns::new("tpa");
    let pod_b = Netns::new("tpb");
    let conf = node.conf("1.0.0", ranges(true, true), json!({ "isGateway": true, "ipMasq": true }));
    assert_eq!(masq_elements(&node), None);

    let res_a = node.add_ok(&conf, "ctr-a", &pod_a);
    let res_b = node.add_ok(&conf, "ctr-b", &pod_b);
    assert!(nft_tables(&node.ns).contains(&"inet tern_masq".to_string()));
    let owner = |c: &str| format!("{}/{c}/eth0", node.network);
    let elems = |res: &Value, c: &str| -> Vec<(String, String)> {
        result_addrs(res).iter().map(|a| (ip_of(a).to_string(), owner(c))).collect()
    };
    let mut all = elems(&res_a, "ctr-a");
    all.extend(elems(&res_b, "ctr-b"));
    all.sort();
    assert_eq!(masq_elements(&node), Some(all));

    assert_empty_ok(&node.del(&with_prev(&conf, &res_a), "ctr-a", Some(&pod_a.path())));
    let mut left = elems(&res_b, "ctr-b");
    left.sort();
    assert_eq!(masq_elements(&node), Some(left));

    assert_empty_ok(&node.del(&with_prev(&conf, &res_b), "ctr-b", Some(&pod_b.path())));
    assert_eq!(masq_elements(&node), None);
    node.assert_clean();
}

fn hairpin(node: &Node, host_veth: &str) -> bool {
    let l = link(&node.ns, host_veth).expect("host veth");
    l["linkinfo"]["info_slave_data"]["hairpin"].as_bool().unwrap_or_else(|| panic!("no hairpin flag in {l:#}"))
}

#[test]
fn hairpin_mode_sets_hairpin_on_the_port() {
    let node = Node::new();
    let pod_a = Netns::new("tpa");
    let pod_b = Netns::new("tpb");
    let with = node.conf("1.0.0", ranges(true, false), json!({ "isGateway": true, "hairpinMode": true }));
    let without = node.conf("1.0.0", ranges(true, false), json!({ "isGateway": true }));
    let res_a = node.add_ok(&with, "ctr-a", &pod_a);
    let res_b = node.add_ok(&without, "ctr-b", &pod_b);
    assert!(hairpin(&node, res_a["interfaces"][1]["name"].as_str().unwrap()));
    assert!(!hairpin(&node, res_b["interfaces"][1]["name"].as_str().unwrap()));
    // `bridge -d link` agrees.
    let out = node.ns.ok(&format!("bridge -d link show dev {}", res_a["interfaces"][1]["name"].as_str().unwrap()));
    assert!(out.contains("hairpin on"), "{out}");
    assert_empty_ok(&node.del(&with, "ctr-a", Some(&pod_a.path())));
    assert_empty_ok(&node.del(&without, "ctr-b", Some(&pod_b.path())));
    node.assert_clean();
}

#[test]
fn mtu_on_both_veth_ends_and_the_bridge() {
    let node = Node::new();
    let pod = Netns::new("tp");
    let conf = node.conf("1.1.0", ranges(true, true), json!({ "isGateway": true, "mtu": 1400 }));
    let res = node.add_ok(&conf, "ctr", &pod);
    let hv = res["interfaces"][1]["name"].as_str().unwrap();
    assert_eq!(link(&pod, "eth0").unwrap()["mtu"], 1400);
    assert_eq!(link(&node.ns, hv).unwrap()["mtu"], 1400);
    assert_eq!(link(&node.ns, &node.bridge).unwrap()["mtu"], 1400);
    // 1.1.0 results carry the interface MTU.
    assert_eq!(res["interfaces"][1]["mtu"], 1400, "{res:#}");
    assert_eq!(res["interfaces"][2]["mtu"], 1400, "{res:#}");
    assert_empty_ok(&node.del(&conf, "ctr", Some(&pod.path())));
    node.assert_clean();
}

fn default_route(pod: &Netns, family: &str) -> Vec<Value> {
    ip_json(pod, &[family, "route", "show", "default"])
}

#[test]
fn is_default_gateway_adds_default_routes_via_the_gateway() {
    let node = Node::new();
    let pod = Netns::new("tp");
    let plain = Netns::new("tpp");
    let conf = node.conf("1.0.0", ranges(true, true), json!({ "isDefaultGateway": true }));
    let res = node.add_ok(&conf, "ctr", &pod);
    let r4 = default_route(&pod, "-4");
    assert_eq!(r4.len(), 1, "{r4:?}");
    assert_eq!((&r4[0]["gateway"], &r4[0]["dev"]), (&json!("10.66.0.1"), &json!("eth0")));
    let r6 = default_route(&pod, "-6");
    assert_eq!(r6.len(), 1, "{r6:?}");
    assert_eq!((&r6[0]["gateway"], &r6[0]["dev"]), (&json!("fd66::1"), &json!("eth0")));
    assert_eq!(
        res["routes"],
        json!([{ "dst": "0.0.0.0/0", "gw": "10.66.0.1" }, { "dst": "::/0", "gw": "fd66::1" }]),
        "{res:#}"
    );
    // isDefaultGateway implies isGateway: the bridge has the gateways.
    assert_eq!(node.ns.addrs(&node.bridge), vec!["10.66.0.1/24".to_string(), "fd66::1/64".to_string()]);

    // Without it, no default route.
    let conf_plain = node.conf("1.0.0", ranges(true, true), json!({ "isGateway": true }));
    let res_plain = node.add_ok(&conf_plain, "ctr-plain", &plain);
    assert_eq!(default_route(&plain, "-4"), Vec::<Value>::new());
    assert_eq!(default_route(&plain, "-6"), Vec::<Value>::new());
    assert!(res_plain.get("routes").is_none(), "{res_plain:#}");

    assert_empty_ok(&node.del(&conf, "ctr", Some(&pod.path())));
    assert_empty_ok(&node.del(&conf_plain, "ctr-plain", Some(&plain.path())));
    node.assert_clean();
}

#[test]
fn result_0_3_1_has_ip_versions() {
    let node = Node::new();
    let pod = Netns::new("tp");
    let conf = node.conf("0.3.1", ranges(true, true), json!({ "isGateway": true }));
    let res = node.add_ok(&conf, "ctr", &pod);
    assert_eq!(res["cniVersion"], "0.3.1");
    assert_eq!(res["interfaces"].as_array().unwrap().len(), 3, "{res:#}");
    assert_eq!(
        res["ips"],
        json!([
            { "version": "4", "interface": 2, "address": "10.66.0.2/24", "gateway": "10.66.0.1" },
            { "version": "6", "interface": 2, "address": "fd66::2/64", "gateway": "fd66::1" },
        ]),
        "{res:#}"
    );
    assert_empty_ok(&node.del(&with_prev(&conf, &res), "ctr", Some(&pod.path())));
    node.assert_clean();
}

#[test]
fn result_0_2_0_is_legacy_ip4_ip6() {
    let node = Node::new();
    let pod = Netns::new("tp");
    let conf = node.conf("0.2.0", ranges(true, true), json!({ "isGateway": true }));
    let res = node.add_ok(&conf, "ctr", &pod);
    assert_eq!(
        res,
        json!({
            "cniVersion": "0.2.0",
            "ip4": { "ip": "10.66.0.2/24", "gateway": "10.66.0.1" },
            "ip6": { "ip": "fd66::2/64", "gateway": "fd66::1" },
            "dns": {},
        })
    );
    assert_eq!(pod.addrs("eth0"), vec!["10.66.0.2/24".to_string(), "fd66::2/64".to_string()]);
    assert_empty_ok(&node.del(&conf, "ctr", Some(&pod.path())));
    node.assert_clean();
}

#[test]
fn lo_is_brought_up_in_the_pod() {
    let node = Node::new();
    let pod = Netns::new("tp");
    pod.ok("ip link set lo down");
    let is_up = |ns: &Netns| link(ns, "lo").unwrap()["flags"].as_array().unwrap().iter().any(|f| f == "UP");
    assert!(!is_up(&pod));
    let conf = node.conf("1.0.0", ranges(true, false), json!({ "isGateway": true }));
    node.add_ok(&conf, "ctr", &pod);
    assert!(is_up(&pod));
    assert!(tcp_ok(&pod, &pod, ip("127.0.0.1"), 8083));
    assert_empty_ok(&node.del(&conf, "ctr", Some(&pod.path())));
    node.assert_clean();
}
