//! DEL in every form a runtime may send it, and failed ADDs: each must leave
//! no veth and no reservation, and never touch another attachment.

mod common;

use common::*;
use serde_json::{json, Value};
use tern_testkit::*;

/// One address per family: whoever holds it, nobody else can ADD.
fn tiny_ranges() -> Value {
    json!([
        [{ "subnet": "10.70.0.0/29", "rangeStart": "10.70.0.4", "rangeEnd": "10.70.0.4" }],
        [{ "subnet": "fd70::/64", "rangeStart": "fd70::4", "rangeEnd": "fd70::4" }],
    ])
}

const TINY_ADDRS: [&str; 2] = ["10.70.0.4/29", "fd70::4/64"];

fn tiny(node: &Node) -> String {
    node.conf("1.0.0", tiny_ranges(), json!({ "isGateway": true }))
}

/// An attachment `ctr` in a fresh pod; returns (pod, result).
fn attach(node: &Node, conf: &str) -> (Netns, Value) {
    let pod = Netns::new("tp");
    let res = node.add_ok(conf, "ctr", &pod);
    assert_eq!(result_addrs(&res), TINY_ADDRS);
    assert_eq!(node.reservations(), ["10.70.0.4", "fd70::4"]);
    assert_eq!(node.veths().len(), 1);
    (pod, res)
}

/// Everything of `ctr` is gone, and the (only) addresses can be taken again.
fn assert_released(node: &Node, conf: &str) {
    // The host veth may still be on its way out if its pod netns was deleted.
    assert!(wait_until(std::time::Duration::from_secs(5), || node.veths().is_empty()), "{:?}", node.veths());
    node.assert_clean();
    let pod = Netns::new("tp2");
    let res = node.add_ok(conf, "ctr-next", &pod);
    assert_eq!(result_addrs(&res), TINY_ADDRS, "the freed addresses are handed out again");
    assert_empty_ok(&node.del(conf, "ctr-next", Some(&pod.path())));
    node.assert_clean();
}

#[test]
fn tiny_range_is_exhausted_while_held() {
    // What makes `assert_released` meaningful: a second attachment can't get an address.
    let node = Node::new();
    let conf = tiny(&node);
    let (pod, res) = attach(&node, &conf);
    let other = Netns::new("tpo");
    let run = node.add(&conf, "ctr-other", &other);
    assert_error_naming(&run, &["no IP addresses available"]);
    assert_eq!(node.veths().len(), 1);
    assert_eq!(node.reservations(), ["10.70.0.4", "fd70::4"]);
    assert_empty_ok(&node.del(&with_prev(&conf, &res), "ctr", Some(&pod.path())));
    assert_released(&node, &conf);
}

#[test]
fn del_twice() {
    let node = Node::new();
    let conf = tiny(&node);
    let (pod, res) = attach(&node, &conf);
    let del = with_prev(&conf, &res);
    assert_empty_ok(&node.del(&del, "ctr", Some(&pod.path())));
    assert!(!pod.links().contains(&"eth0".to_string()));
    assert_empty_ok(&node.del(&del, "ctr", Some(&pod.path())));
    assert_released(&node, &conf);
}

#[test]
fn del_after_the_pod_netns_is_gone() {
    let node = Node::new();
    let conf = tiny(&node);
    let (pod, res) = attach(&node, &conf);
    let path = pod.path();
    pod.delete_now();
    assert!(!path.exists());
    assert_empty_ok(&node.del(&with_prev(&conf, &res), "ctr", Some(&path)));
    assert_released(&node, &conf);
}

#[test]
fn del_with_empty_cni_netns() {
    let node = Node::new();
    let conf = tiny(&node);
    let (pod, res) = attach(&node, &conf);
    assert_empty_ok(&node.del(&with_prev(&conf, &res), "ctr", None));
    // Deleting the host end takes the pod end with it; DEL hands that
    // unregister to a background reaper, so it completes shortly after.
    let gone =
        tern_testkit::wait_until(std::time::Duration::from_secs(5), || !pod.links().contains(&"eth0".to_string()));
    assert!(gone, "eth0 still in the pod: {:?}", pod.links());
    assert_released(&node, &conf);
}

#[test]
fn del_without_prev_result() {
    let node = Node::new();
    let conf = tiny(&node);
    let (pod, _res) = attach(&node, &conf);
    assert_empty_ok(&node.del(&conf, "ctr", Some(&pod.path())));
    assert!(!pod.links().contains(&"eth0".to_string()));
    assert_released(&node, &conf);
}

#[test]
fn del_with_masq_after_the_pod_netns_is_gone_and_without_netns() {
    let node = Node::new();
    let conf = node.conf("1.0.0", tiny_ranges(), json!({ "isGateway": true, "ipMasq": true }));
    let (pod, _res) = attach(&node, &conf);
    assert!(nft_tables(&node.ns).contains(&"inet tern_masq".to_string()));
    pod.delete_now();
    assert_empty_ok(&node.del(&conf, "ctr", None));
    assert_released(&node, &conf);
}

#[test]
fn failed_add_with_requested_ip_outside_the_range_leaves_nothing() {
    let node = Node::new();
    let conf = tiny(&node);
    let pod = Netns::new("tp");
    let run = node.tern("ADD", "ctr", Some(&pod.path()), "IP=10.99.0.5", &conf);
    assert_error_naming(&run, &["10.99.0.5"]);
    assert_eq!(pod.links(), ["lo"]);
    assert_released(&node, &conf);
}

#[test]
fn failed_add_into_a_netns_that_has_eth0_leaves_nothing() {
    let node = Node::new();
    let conf = tiny(&node);
    let pod = Netns::new("tp");
    pod.ok("ip link add eth0 type veth peer name eth0p");
    let before = link(&pod, "eth0").unwrap()["ifindex"].clone();
    let run = node.add(&conf, "ctr", &pod);
    assert_error_naming(&run, &["eth0"]);
    // The pod's own eth0 is untouched.
    assert_eq!(link(&pod, "eth0").expect("pod eth0 still there")["ifindex"], before);
    assert!(pod.links().contains(&"eth0p".to_string()));
    assert_released(&node, &conf);
}

/// The first attachment still works: veth, addresses, reservation, CHECK,
/// traffic to the gateway.
fn assert_first_intact(node: &Node, conf: &str, pod: &Netns, res: &Value, veth: &str) {
    assert_eq!(node.veths(), [veth]);
    assert_eq!(pod.addrs("eth0"), TINY_ADDRS);
    assert_eq!(node.reservations(), ["10.70.0.4", "fd70::4"]);
    let check = node.tern("CHECK", "ctr", Some(&pod.path()), "", &with_prev(conf, res));
    assert_empty_ok(&check);
    assert!(tcp_ok(pod, &node.ns, "10.70.0.1".parse().unwrap(), 8080));
    assert!(tcp_ok(&node.ns, pod, "fd70::4".parse().unwrap(), 8080));
}

#[test]
fn second_add_for_the_same_attachment_fails_and_keeps_the_first() {
    let node = Node::new();
    let conf = node.conf(
        "1.0.0",
        json!([[{ "subnet": "10.70.0.0/29" }], [{ "subnet": "fd70::/64", "rangeStart": "fd70::4", "rangeEnd": "fd70::4" }]]),
        json!({ "isGateway": true }),
    );
    let pod = Netns::new("tp");
    let res = node.add_ok(&conf, "ctr", &pod);
    assert_eq!(result_addrs(&res), ["10.70.0.2/29", "fd70::4/64"]);
    let veth = res["interfaces"][1]["name"].as_str().unwrap().to_owned();

    let again = node.add(&conf, "ctr", &pod);
    assert_ne!(again.code, 0, "{again}");
    assert!(again.error_code().is_some(), "{again}");
    assert_eq!(node.veths(), [veth.as_str()]);
    assert_eq!(pod.addrs("eth0"), ["10.70.0.2/29", "fd70::4/64"]);
    assert_eq!(node.reservations(), ["10.70.0.2", "fd70::4"]);
    let check = node.tern("CHECK", "ctr", Some(&pod.path()), "", &with_prev(&conf, &res));
    assert_empty_ok(&check);

    // The same attachment into another netns: refused too, first untouched.
    let other = Netns::new("tpo");
    let run = node.add(&conf, "ctr", &other);
    assert_ne!(run.code, 0, "{run}");
    assert_eq!(other.links(), ["lo"]);
    assert_eq!(node.veths(), [veth.as_str()]);
    assert_eq!(node.reservations(), ["10.70.0.2", "fd70::4"]);

    assert_empty_ok(&node.del(&with_prev(&conf, &res), "ctr", Some(&pod.path())));
    node.assert_clean();
}

/// A second ADD that asks for a free address (CNI_ARGS IP=) gets past IPAM,
/// then fails on the existing veth: its undo must release only the address
/// it took, not the first ADD's.
#[test]
fn second_add_with_a_requested_ip_keeps_the_first_reservation() {
    let node = Node::new();
    let conf = node.conf("1.0.0", json!([[{ "subnet": "10.70.0.0/29" }]]), json!({ "isGateway": true }));
    let pod = Netns::new("tp");
    let res = node.add_ok(&conf, "ctr", &pod);
    assert_eq!(result_addrs(&res), ["10.70.0.2/29"]);
    let veth = res["interfaces"][1]["name"].as_str().unwrap().to_owned();

    let again = node.tern("ADD", "ctr", Some(&pod.path()), "IP=10.70.0.5", &conf);
    assert_ne!(again.code, 0, "{again}");
    assert!(again.error_code().is_some(), "{again}");
    assert_eq!(node.veths(), [veth.as_str()]);
    assert_eq!(pod.addrs("eth0"), ["10.70.0.2/29"]);
    assert_eq!(node.reservations(), ["10.70.0.2"], "the failed ADD released the first ADD's reservation");
    let check = node.tern("CHECK", "ctr", Some(&pod.path()), "", &with_prev(&conf, &res));
    assert_empty_ok(&check);

    assert_empty_ok(&node.del(&with_prev(&conf, &res), "ctr", Some(&pod.path())));
    node.assert_clean();
}

#[test]
fn del_of_one_attachment_keeps_the_other() {
    let node = Node::new();
    let conf = tiny(&node);
    let (pod, res) = attach(&node, &conf);
    let veth = res["interfaces"][1]["name"].as_str().unwrap().to_owned();
    // Another container's DEL (never added) and another ifname's DEL are no-ops for ctr.
    let other = Netns::new("tpo");
    assert_empty_ok(&node.del(&conf, "ctr-other", Some(&other.path())));
    let eth1 = exec_plugin(&node.ns, &node.plugins, "tern", "DEL", "ctr", Some(&pod.path()), "eth1", "", &conf);
    assert_empty_ok(&eth1);
    assert_first_intact(&node, &conf, &pod, &res, &veth);
    assert_empty_ok(&node.del(&with_prev(&conf, &res), "ctr", Some(&pod.path())));
    assert_released(&node, &conf);
}
