//! CHECK: passes on an intact attachment, and fails (naming what is wrong)
//! once the kernel or the IPAM state no longer matches prevResult.

mod common;

use common::*;
use serde_json::{json, Value};
use tern_testkit::*;

const ADDR4: &str = "10.71.0.2/24";
const ADDR6: &str = "fd71::2/64";

fn ranges() -> Value {
    json!([[{ "subnet": "10.71.0.0/24" }], [{ "subnet": "fd71::/64" }]])
}

/// A node with one dual-stack attachment `ctr` made with the keys of `extra`,
/// on which CHECK passes; returns (node, pod, conf with prevResult).
fn attached(extra: Value) -> (Node, Netns, String) {
    let node = Node::new();
    let pod = Netns::new("tp");
    let routed = extra["mode"] == "routed";
    let conf = node.conf("1.0.0", ranges(), extra);
    let res = node.add_ok(&conf, "ctr", &pod);
    let want = if routed { ["10.71.0.2/32", "fd71::2/128"] } else { [ADDR4, ADDR6] };
    assert_eq!(result_addrs(&res), want);
    let check = with_prev(&conf, &res);
    // Intact: CHECK passes.
    assert_empty_ok(&check_run(&node, &pod, &check));
    (node, pod, check)
}

/// Bridge mode with default routes via the gateways.
fn bridge_attached() -> (Node, Netns, String) {
    attached(json!({ "isDefaultGateway": true }))
}

fn check_run(node: &Node, pod: &Netns, conf: &str) -> PluginRun {
    node.tern("CHECK", "ctr", Some(&pod.path()), "", conf)
}

/// After the test's damage, DEL still cleans up everything.
fn del_clean(node: &Node, pod: &Netns, conf: &str) {
    assert_empty_ok(&node.del(conf, "ctr", Some(&pod.path())));
    node.assert_clean();
}

#[test]
fn check_passes_after_add_bridge() {
    let (node, pod, conf) = bridge_attached();
    // Repeatable, and changes nothing.
    assert_empty_ok(&check_run(&node, &pod, &conf));
    assert_eq!(node.reservations(), ["10.71.0.2", "fd71::2"]);
    del_clean(&node, &pod, &conf);
}

/// Routed results hold /32 and /128 addresses (what the pod has), while the
/// IPAM range is a /24 and a /64: CHECK must still pass.
#[test]
fn check_passes_after_add_routed() {
    let (node, pod, conf) = attached(json!({ "mode": "routed" }));
    assert_empty_ok(&check_run(&node, &pod, &conf));
    del_clean(&node, &pod, &conf);
}

#[test]
fn check_fails_when_the_pod_interface_is_deleted() {
    let (node, pod, conf) = bridge_attached();
    pod.ok("ip link del eth0");
    assert_error_naming(&check_run(&node, &pod, &conf), &["eth0", "missing"]);
    del_clean(&node, &pod, &conf);
}

#[test]
fn check_fails_when_an_address_is_removed() {
    let (node, pod, conf) = bridge_attached();
    pod.ok(&format!("ip addr del {ADDR6} dev eth0"));
    assert_error_naming(&check_run(&node, &pod, &conf), &[ADDR6]);
    pod.ok(&format!("ip addr add {ADDR6} dev eth0 nodad"));
    assert_empty_ok(&check_run(&node, &pod, &conf));
    // The v4 address goes (the default route via it with it).
    pod.ok(&format!("ip addr del {ADDR4} dev eth0"));
    assert_error_naming(&check_run(&node, &pod, &conf), &[ADDR4]);
    del_clean(&node, &pod, &conf);
}

#[test]
fn check_fails_when_a_route_is_removed() {
    let (node, pod, conf) = bridge_attached();
    pod.ok("ip -4 route del default");
    assert_error_naming(&check_run(&node, &pod, &conf), &["0.0.0.0/0"]);
    pod.ok("ip -4 route add default via 10.71.0.1 dev eth0");
    assert_empty_ok(&check_run(&node, &pod, &conf));
    pod.ok("ip -6 route del default");
    assert_error_naming(&check_run(&node, &pod, &conf), &["::/0"]);
    del_clean(&node, &pod, &conf);
}

#[test]
fn check_fails_when_the_reservation_file_is_removed() {
    let (node, pod, conf) = bridge_attached();
    std::fs::remove_file(node.data.join(&node.network).join("10.71.0.2")).unwrap();
    assert_error_naming(&check_run(&node, &pod, &conf), &["10.71.0.2"]);
    del_clean(&node, &pod, &conf);
}

#[test]
fn check_fails_when_tern_ipam_released_the_addresses() {
    let (node, pod, conf) = bridge_attached();
    let del = exec_plugin(&node.ns, &node.plugins, "tern-ipam", "DEL", "ctr", Some(&pod.path()), "eth0", "", &conf);
    assert_empty_ok(&del);
    assert_eq!(node.reservations(), Vec::<String>::new());
    assert_error_naming(&check_run(&node, &pod, &conf), &["ctr"]);
    del_clean(&node, &pod, &conf);
}

#[test]
fn check_fails_when_the_mac_changes() {
    let (node, pod, conf) = bridge_attached();
    pod.ok("ip link set dev eth0 address 02:00:5e:10:20:30");
    assert_error_naming(&check_run(&node, &pod, &conf), &["MAC", "02:00:5e:10:20:30"]);
    del_clean(&node, &pod, &conf);
}

#[test]
fn check_fails_when_the_host_veth_leaves_the_bridge() {
    let (node, pod, conf) = bridge_attached();
    let prev: Value = serde_json::from_str::<Value>(&conf).unwrap()["prevResult"].clone();
    let veth = prev["interfaces"][1]["name"].as_str().unwrap().to_owned();
    node.ns.ok(&format!("ip link set dev {veth} nomaster"));
    assert_error_naming(&check_run(&node, &pod, &conf), &[&veth, &node.bridge]);
    del_clean(&node, &pod, &conf);
}

#[test]
fn check_without_prev_result_fails() {
    let (node, pod, conf) = bridge_attached();
    let mut bare: Value = serde_json::from_str(&conf).unwrap();
    bare.as_object_mut().unwrap().remove("prevResult");
    let run = check_run(&node, &pod, &bare.to_string());
    run.assert_error(7);
    assert_error_naming(&run, &["prevResult"]);
    del_clean(&node, &pod, &conf);
}

#[test]
fn check_with_cni_version_0_3_1_is_code_1() {
    let node = Node::new();
    let pod = Netns::new("tp");
    let conf = node.conf("0.3.1", ranges(), json!({ "isGateway": true }));
    let res = node.add_ok(&conf, "ctr", &pod);
    let run = check_run(&node, &pod, &with_prev(&conf, &res));
    run.assert_error(1);
    assert_error_naming(&run, &["CHECK"]);
    del_clean(&node, &pod, &conf);
}
