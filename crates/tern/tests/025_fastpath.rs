//! The eBPF fast path (`"dataplane": "ebpf"`, crates/bpf): pods of one node
//! in routed and bridge mode reach each other over TCP (IPv4 and IPv6) by
//! `bpf_redirect_peer`, i.e. without crossing the node's forward hook (an
//! nftables counter in the node sees no TCP, the datapath's per-pod counter
//! grows); pod↔node and masquerade still take the kernel path; a pod chained
//! with tern-firewall is off the fast path and stays isolated; a spoofed
//! source is not redirected; DEL and GC leave no map entry, and the pins of
//! a node namespace that is gone are swept.
//!
//! Each test builds its own node and pods. Privileged.

mod chained;
mod common;

use std::net::IpAddr;

use chained::*;
use common::*;
use serde_json::{json, Value};
use tern_bpf::Endpoint;
use tern_testkit::*;

fn pinned(node: &Netns) -> bool {
    node.enter(|| tern_bpf::is_pinned_in_current_netns().unwrap())
}

fn redirected(node: &Netns, addr: IpAddr) -> u64 {
    fast_entry(node, addr).unwrap_or_else(|| panic!("no fast-path entry for {addr}")).redirected
}

/// An nftables table in the node counting the TCP packets its forward hook
/// sees (routed forwarding, and bridged ones through br_netfilter).
fn count_forwarded_tcp(node: &Netns) {
    node.ok("nft add table inet t025 && \
         nft add chain inet t025 fw '{ type filter hook forward priority -10; }' && \
         nft add rule inet t025 fw meta l4proto tcp counter");
}

fn forwarded_tcp(node: &Netns) -> u64 {
    let out = node.ok("nft list chain inet t025 fw");
    let after = out.split("packets ").nth(1).unwrap_or_else(|| panic!("no counter in {out}"));
    after.split_whitespace().next().unwrap().parse().unwrap()
}

fn drop_counter(node: &Netns) {
    node.ok("nft delete table inet t025");
}

/// A node with its own addresses on lo, as a real node has.
fn fast_node(k: u8) -> Node {
    // Plugins run in private mount namespaces (as `ip netns exec` does):
    // tern's bpffs must exist before, in the host's.
    tern_bpf::ensure_bpffs().unwrap();
    let node = chain_node();
    node.ns.ok(&format!("ip addr add 10.254.{k}.1/32 dev lo && ip addr add fd25:{k}::1/128 dev lo nodad"));
    node
}

fn conf(node: &Node, k: u8, mode: &str, extra: Value) -> String {
    let ranges = json!([[{ "subnet": format!("10.25.{k}.0/24") }], [{ "subnet": format!("fd25:{k}:1::/64") }]]);
    let mut x = json!({ "mode": mode, "dataplane": "ebpf", "isGateway": true });
    for (key, v) in extra.as_object().unwrap() {
        x[key] = v.clone();
    }
    node.conf("1.1.0", ranges, x)
}

fn addrs(res: &Value) -> Vec<IpAddr> {
    result_addrs(res).iter().map(|a| ip_of(a)).collect()
}

/// Two pods on the fast path: TCP both ways and both families without the
/// node's forward hook seeing a packet; pod↔node over the kernel path;
/// nothing left after DEL.
fn pod_to_pod(k: u8, mode: &str) {
    let node = fast_node(k);
    let _pins = Pins(&node.ns);
    let (pod_a, pod_b) = (Netns::new("tfa"), Netns::new("tfb"));
    // Bridged pods need a default route to reach the node's own addresses.
    let conf = conf(&node, k, mode, json!({ "isDefaultGateway": mode == "bridge" }));
    let res_a = node.add_ok(&conf, "ctr-a", &pod_a);
    let res_b = node.add_ok(&conf, "ctr-b", &pod_b);
    let (a, b) = (addrs(&res_a), addrs(&res_b));
    assert_eq!((a.len(), b.len()), (2, 2), "{res_a:#} {res_b:#}");
    assert!(pinned(&node.ns));
    for ep in fast_entries(&node.ns) {
        assert!(ep.fast, "{ep:?}");
    }
    // The program sits at tc ingress of both host veths.
    for res in [&res_a, &res_b] {
        let hv = res["interfaces"][if mode == "bridge" { 1 } else { 0 }]["name"].as_str().unwrap();
        let filters = node.ns.ok(&format!("tc filter show dev {hv} ingress"));
        assert!(filters.contains("tern_fastpath") && filters.contains("direct-action"), "{hv}: {filters}");
    }

    count_forwarded_tcp(&node.ns);
    for i in 0..2 {
        let before = (redirected(&node.ns, a[i]), redirected(&node.ns, b[i]));
        assert!(tcp_ok(&pod_a, &pod_b, b[i], 8080), "pod a -> pod b {}", b[i]);
        assert!(tcp_ok(&pod_b, &pod_a, a[i], 8081), "pod b -> pod a {}", a[i]);
        let after = (redirected(&node.ns, a[i]), redirected(&node.ns, b[i]));
        assert!(after.0 > before.0 && after.1 > before.1, "not redirected: {before:?} -> {after:?}");
    }
    assert_eq!(forwarded_tcp(&node.ns), 0, "pod-to-pod TCP crossed the node's forward hook");

    // Pod <-> node is not pod-to-pod: the kernel path, unchanged.
    let node_ips: [IpAddr; 2] = [format!("10.254.{k}.1").parse().unwrap(), format!("fd25:{k}::1").parse().unwrap()];
    for (i, node_ip) in node_ips.iter().enumerate() {
        assert!(tcp_ok(&pod_a, &node.ns, *node_ip, 8082), "pod a -> node {node_ip}");
        assert!(tcp_ok(&node.ns, &pod_b, b[i], 8083), "node -> pod b {}", b[i]);
    }
    drop_counter(&node.ns);

    assert_empty_ok(&node.del(&with_prev(&conf, &res_a), "ctr-a", Some(&pod_a.path())));
    assert!(
        fast_entry(&node.ns, a[0]).is_none() && fast_entry(&node.ns, a[1]).is_none(),
        "pod a's entries survived DEL"
    );
    assert_eq!(fast_entries(&node.ns).len(), 2, "pod b's entries must stay");
    // DEL is idempotent.
    assert_empty_ok(&node.del(&with_prev(&conf, &res_a), "ctr-a", Some(&pod_a.path())));
    assert_empty_ok(&node.del(&with_prev(&conf, &res_b), "ctr-b", Some(&pod_b.path())));
    assert_eq!(fast_entries(&node.ns), Vec::<Endpoint>::new(), "entries left after the last DEL");
    // The instance stays pinned while the node lives: the next pod only opens it.
    assert!(pinned(&node.ns));
    node.assert_clean();
}

#[test]
fn routed_pods_use_the_fast_path() {
    pod_to_pod(1, "routed");
}

#[test]
fn bridged_pods_use_the_fast_path() {
    pod_to_pod(2, "bridge");
}

/// ipMasq: traffic leaving the pod network still goes through the node and
/// is masqueraded; pod-to-pod stays on the fast path.
#[test]
fn masquerade_still_works() {
    let k = 3;
    let node = fast_node(k);
    let _pins = Pins(&node.ns);
    let client = connect_client(&node.ns, 125);
    let (pod_a, pod_b) = (Netns::new("tfa"), Netns::new("tfb"));
    let conf = conf(&node, k, "routed", json!({ "ipMasq": true }));
    let res_a = node.add_ok(&conf, "ctr-a", &pod_a);
    let res_b = node.add_ok(&conf, "ctr-b", &pod_b);
    let (a, b) = (addrs(&res_a), addrs(&res_b));
    let seen = tcp_must("pod a -> other host", &pod_a, &client.ns, sa(client.ip4, 7100), sa(client.ip4, 7100));
    assert_eq!(seen.peer, client.node_ip4, "not masqueraded to the node's address");
    let seen = tcp_must("pod a -> pod b", &pod_a, &pod_b, sa(b[0], 7101), sa(b[0], 7101));
    assert_eq!(seen.peer, a[0], "pod-to-pod must keep the source address");
    assert!(redirected(&node.ns, b[0]) > 0);
    assert_empty_ok(&node.del(&with_prev(&conf, &res_a), "ctr-a", Some(&pod_a.path())));
    assert_empty_ok(&node.del(&with_prev(&conf, &res_b), "ctr-b", Some(&pod_b.path())));
    assert_eq!(fast_entries(&node.ns), Vec::<Endpoint>::new(), "entries left after DEL");
    node.assert_clean();
}

/// tern-firewall takes its pods off the fast path: their traffic crosses the
/// forward hook (where the firewall's table is), and networks stay isolated.
#[test]
fn firewall_chained_pods_take_the_kernel_path() {
    let k = 4;
    let node = fast_node(k);
    let _pins = Pins(&node.ns);
    let net2 = unique("tfnet2");
    let conf1 = conf(&node, k, "bridge", json!({}));
    let conf2 = {
        let ranges = json!([[{ "subnet": format!("10.26.{k}.0/24") }]]);
        node.conf(
            "1.1.0",
            ranges,
            json!({ "name": net2, "bridge": unique_short("tfb2"), "dataplane": "ebpf", "isGateway": true, "isDefaultGateway": true }),
        )
    };
    let conf1 = {
        let mut c: Value = serde_json::from_str(&conf1).unwrap();
        c["isDefaultGateway"] = json!(true);
        c.to_string()
    };
    let pods: Vec<(Netns, &str, &str, String)> = vec![
        (Netns::new("tfa"), "ctr-a", conf1.as_str(), node.network.clone()),
        (Netns::new("tfb"), "ctr-b", conf1.as_str(), node.network.clone()),
        (Netns::new("tfc"), "ctr-c", conf2.as_str(), net2.clone()),
    ];
    let mut results = Vec::new();
    for (ns, cid, conf, net) in &pods {
        let res = node.add_ok(conf, cid, ns);
        let fw = meta_conf(net, "tern-firewall", json!({}), Some(&res));
        run_meta(&node, "tern-firewall", "ADD", cid, Some(ns), &fw).assert_ok();
        run_meta(&node, "tern-firewall", "CHECK", cid, Some(ns), &fw).assert_ok();
        results.push(res);
    }
    for res in &results {
        for ip in addrs(res) {
            let ep = fast_entry(&node.ns, ip).expect("entry kept, flag cleared");
            assert!(!ep.fast, "{ep:?}");
        }
    }
    let (a, b) = (addrs(&results[0]), addrs(&results[1]));
    count_forwarded_tcp(&node.ns);
    for ip in &b {
        tcp_must("same network", &pods[0].0, &pods[1].0, sa(*ip, 7200), sa(*ip, 7200));
    }
    assert!(forwarded_tcp(&node.ns) > 0, "firewalled pods' traffic must cross the forward hook");
    assert_eq!(redirected(&node.ns, b[0]), 0);
    // Isolation holds: the pod of the other network cannot open connections.
    tcp_must_not("other network", &pods[2].0, &pods[0].0, sa(a[0], 7201), sa(a[0], 7201));
    drop_counter(&node.ns);

    for ((ns, cid, conf, net), res) in pods.iter().zip(&results) {
        let fw = meta_conf(net, "tern-firewall", json!({}), Some(res));
        run_meta(&node, "tern-firewall", "DEL", cid, Some(ns), &fw).assert_ok();
        assert_empty_ok(&node.del(&with_prev(conf, res), cid, Some(&ns.path())));
    }
    assert_eq!(fast_entries(&node.ns), Vec::<Endpoint>::new(), "entries left after DEL");
    node.assert_clean();
}

/// The program remembers each redirect (its flow cache); taking a pod off
/// the fast path after its flows were remembered must still send its next
/// packets through the kernel path at once, in both directions and both
/// families, and putting it back must bring the fast path back. The counters
/// include what remembered redirects delivered.
#[test]
fn remembered_redirects_follow_changes_to_the_endpoints() {
    let k = 10;
    let node = fast_node(k);
    let _pins = Pins(&node.ns);
    let (pod_a, pod_b) = (Netns::new("tfa"), Netns::new("tfb"));
    let conf = conf(&node, k, "routed", json!({}));
    let res_a = node.add_ok(&conf, "ctr-a", &pod_a);
    let res_b = node.add_ok(&conf, "ctr-b", &pod_b);
    let (a, b) = (addrs(&res_a), addrs(&res_b));
    count_forwarded_tcp(&node.ns);
    // Warm the flows: each connection after the first hits remembered redirects.
    for &ip in &b {
        let before = redirected(&node.ns, ip);
        for port in 0..5 {
            assert!(tcp_ok(&pod_a, &pod_b, ip, 8090 + port), "pod a -> pod b {ip}");
        }
        // A TCP connection is at least 3 packets to the server and a close.
        let after = redirected(&node.ns, ip);
        assert!(after >= before + 5 * 3, "{ip} counted {before} -> {after}");
    }
    assert_eq!(forwarded_tcp(&node.ns), 0);

    node.ns.enter(|| tern_bpf::FastPath::open_existing().unwrap().unwrap().set_policy_bypass(&b, false).unwrap());
    for i in 0..2 {
        let forwarded = forwarded_tcp(&node.ns);
        assert!(tcp_ok(&pod_a, &pod_b, b[i], 8100), "pod a -> pod b {}", b[i]);
        assert!(tcp_ok(&pod_b, &pod_a, a[i], 8101), "pod b -> pod a {}", a[i]);
        assert!(forwarded_tcp(&node.ns) > forwarded, "a remembered redirect outlived the fast flag ({})", b[i]);
        assert_eq!(redirected(&node.ns, b[i]), 0, "{} is off the fast path", b[i]);
    }

    node.ns.enter(|| tern_bpf::FastPath::open_existing().unwrap().unwrap().set_policy_bypass(&b, true).unwrap());
    let forwarded = forwarded_tcp(&node.ns);
    for &ip in &b {
        assert!(tcp_ok(&pod_a, &pod_b, ip, 8102), "pod a -> pod b {ip}");
        assert!(redirected(&node.ns, ip) > 0, "{ip} is back on the fast path");
    }
    assert_eq!(forwarded_tcp(&node.ns), forwarded, "back on the fast path, yet forwarded");
    drop_counter(&node.ns);

    assert_empty_ok(&node.del(&with_prev(&conf, &res_a), "ctr-a", Some(&pod_a.path())));
    assert_empty_ok(&node.del(&with_prev(&conf, &res_b), "ctr-b", Some(&pod_b.path())));
    assert_eq!(fast_entries(&node.ns), Vec::<Endpoint>::new(), "entries left after the last DEL");
    node.assert_clean();
}

/// A pod sending with another pod's address: the source check fails, the
/// packets take the kernel path (the forward hook counts them) and never
/// reach the destination by the fast path.
#[test]
fn spoofed_source_is_not_redirected() {
    let k = 5;
    let node = fast_node(k);
    let _pins = Pins(&node.ns);
    node.ns.ok("sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0");
    let (pod_a, pod_b, pod_c) = (Netns::new("tfa"), Netns::new("tfb"), Netns::new("tfc"));
    let conf = conf(&node, k, "routed", json!({}));
    let res: Vec<Value> = [(&pod_a, "ctr-a"), (&pod_b, "ctr-b"), (&pod_c, "ctr-c")]
        .iter()
        .map(|(ns, cid)| node.add_ok(&conf, cid, ns))
        .collect();
    let (b, c) = (addrs(&res[1])[0], addrs(&res[2])[0]);
    // Pod a takes pod c's address as a second one and sends from it.
    pod_a.ok(&format!("ip addr add {c}/32 dev eth0"));
    node.ns.ok(&format!(
        "nft add table ip t025s && \
         nft add chain ip t025s fw '{{ type filter hook forward priority -10; }}' && \
         nft add rule ip t025s fw ip saddr {c} ip daddr {b} counter"
    ));
    let before = redirected(&node.ns, b);
    pod_a.sh(&format!("ping -c 3 -i 0.2 -W 1 -I {c} {b}"));
    assert_eq!(redirected(&node.ns, b), before, "a spoofed packet was redirected to pod b");
    let counted = node.ns.ok("nft list chain ip t025s fw");
    assert!(counted.contains("packets 3"), "spoofed packets must take the kernel path: {counted}");
    node.ns.ok("nft delete table ip t025s");
    // Pod a's own address still works, on the fast path.
    let a = addrs(&res[0])[0];
    pod_a.ok(&format!("ip addr del {c}/32 dev eth0"));
    assert!(tcp_ok(&pod_a, &pod_b, b, 7300));
    assert!(redirected(&node.ns, b) > before && redirected(&node.ns, a) > 0);

    for ((ns, cid), r) in [(&pod_a, "ctr-a"), (&pod_b, "ctr-b"), (&pod_c, "ctr-c")].iter().zip(&res) {
        assert_empty_ok(&node.del(&with_prev(&conf, r), cid, Some(&ns.path())));
    }
    assert_eq!(fast_entries(&node.ns), Vec::<Endpoint>::new(), "entries left after DEL");
    node.assert_clean();
}

/// GC removes the entries of pods whose veth is gone (a pod netns deleted
/// without DEL), keeps the listed ones, and a kernel-dataplane ADD of a
/// reused address drops a leftover entry.
#[test]
fn gc_and_address_reuse_clean_leftover_entries() {
    let k = 6;
    let node = fast_node(k);
    let _pins = Pins(&node.ns);
    let pod_a = Netns::new("tfa");
    let pod_b = Netns::new("tfb");
    let conf = conf(&node, k, "routed", json!({}));
    let res_a = node.add_ok(&conf, "ctr-a", &pod_a);
    let res_b = node.add_ok(&conf, "ctr-b", &pod_b);
    let (a, b) = (addrs(&res_a), addrs(&res_b));
    // Pod a dies without DEL: its veth goes with its namespace.
    pod_a.delete_now();
    assert!(wait_until(std::time::Duration::from_secs(5), || node.veths().len() == 1));
    assert!(fast_entry(&node.ns, a[0]).is_some(), "the entry outlives the veth until GC");
    let gc = {
        let mut c: Value = serde_json::from_str(&conf).unwrap();
        c["cni.dev/valid-attachments"] = json!([{ "containerID": "ctr-b", "ifname": "eth0" }]);
        c.to_string()
    };
    exec_plugin(&node.ns, &node.plugins, "tern", "GC", "", None, "", "", &gc).assert_ok();
    let left: Vec<IpAddr> = fast_entries(&node.ns).iter().map(|e| e.addr).collect();
    assert_eq!(left.len(), 2, "{left:?}");
    assert!(left.contains(&b[0]) && left.contains(&b[1]), "{left:?}");

    // A pod of the kernel dataplane getting b's address (after a crash, say)
    // must not be captured by b's entry.
    let pod_c = Netns::new("tfc");
    let kernel_conf = {
        let mut c: Value = serde_json::from_str(&conf).unwrap();
        c["dataplane"] = json!("kernel");
        c["ipam"]["dataDir"] = json!(node.data.join("other").to_str().unwrap());
        c["ipam"]["ranges"] = json!([[{ "subnet": format!("10.25.{k}.0/24"), "rangeStart": b[0].to_string(), "rangeEnd": b[0].to_string() }]]);
        c.to_string()
    };
    let res_c = node.add_ok(&kernel_conf, "ctr-c", &pod_c);
    assert!(fast_entry(&node.ns, b[0]).is_none(), "the kernel-dataplane ADD must drop the entry of its address");
    assert_empty_ok(&node.del(&with_prev(&kernel_conf, &res_c), "ctr-c", Some(&pod_c.path())));
    assert_empty_ok(&node.del(&with_prev(&conf, &res_b), "ctr-b", Some(&pod_b.path())));
    assert_eq!(fast_entries(&node.ns), Vec::<Endpoint>::new(), "entries left after DEL");
    assert_eq!(node.veths(), Vec::<String>::new());
}

/// A malformed `dataplane` is a config error (code 7) naming the field.
#[test]
fn bad_dataplane_is_rejected() {
    let node = fast_node(7);
    let pod = Netns::new("tfa");
    let mut c: Value = serde_json::from_str(&conf(&node, 7, "routed", json!({}))).unwrap();
    for bad in [json!("xdp"), json!(1), json!("EBPF")] {
        c["dataplane"] = bad.clone();
        let run = node.add(&c.to_string(), "ctr-a", &pod);
        assert_error_naming(&run, &["dataplane"]);
        assert_eq!(run.error_code(), Some(7), "{bad}: {}", run.stdout);
    }
    assert_eq!(fast_entries(&node.ns), Vec::<Endpoint>::new(), "entries left after DEL");
    node.assert_clean();
}

/// The pins of a node namespace that is gone are swept by the next GC (or
/// the next load) anywhere on the machine; a live node's stay.
#[test]
fn dead_node_pins_are_swept() {
    let live = fast_node(9);
    let _pins = Pins(&live.ns);
    let dead = fast_node(8);
    let pod = Netns::new("tfa");
    let conf8 = conf(&dead, 8, "routed", json!({}));
    let res = dead.add_ok(&conf8, "ctr-a", &pod);
    assert_empty_ok(&dead.del(&with_prev(&conf8, &res), "ctr-a", Some(&pod.path())));
    let dir = dead.ns.enter(|| tern_bpf::current_pin_dir().unwrap());
    assert!(dir.join("prog").exists(), "{}", dir.display());
    let conf9 = conf(&live, 9, "routed", json!({}));
    let pod2 = Netns::new("tfb");
    let res9 = live.add_ok(&conf9, "ctr-b", &pod2);
    let live_dir = live.ns.enter(|| tern_bpf::current_pin_dir().unwrap());

    let Node { ns, .. } = dead;
    ns.delete_now();
    let gc = {
        let mut c: Value = serde_json::from_str(&conf9).unwrap();
        c["cni.dev/valid-attachments"] = json!([{ "containerID": "ctr-b", "ifname": "eth0" }]);
        c.to_string()
    };
    // Until the dead node's last process (DEL's veth reaper) has exited,
    // the namespace still counts as alive.
    let swept = wait_until(std::time::Duration::from_secs(10), || {
        exec_plugin(&live.ns, &live.plugins, "tern", "GC", "", None, "", "", &gc).assert_ok();
        !dir.exists()
    });
    assert!(swept, "pins of a dead node namespace survived GC: {}", dir.display());
    assert!(live_dir.join("prog").exists(), "GC swept a live node's pins");
    assert_empty_ok(&live.del(&with_prev(&conf9, &res9), "ctr-b", Some(&pod2.path())));
}
