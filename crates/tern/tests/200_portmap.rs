//! tern-portmap chained after `tern`: host ports reached from a client
//! namespace, from the node itself and from pods (hairpin); hostIP, IPv6,
//! localhost, conditions; conflicts, CHECK, DEL without portMappings, GC.
//!
//! Each test builds its own node, pods and client namespaces. Privileged.

mod chained;
mod common;

use std::net::IpAddr;
use std::time::Duration;

use chained::*;
use common::*;
use serde_json::{json, Value};
use tern_testkit::*;

const TABLE: &str = "tern_portmap";

/// A node running `tern` (bridge, default gateway) for pods in 10.<120+k>.0.0/24
/// (and fd20:<k>::/64 when `v6`), with a client namespace on 192.168.<k>.0/24.
struct World {
    node: Node,
    client: Client,
    conf: String,
    k: u8,
}

impl World {
    fn new(k: u8, v6: bool) -> World {
        let node = chain_node();
        let client = connect_client(&node.ns, k);
        let mut ranges = vec![json!([{ "subnet": format!("10.{}.0.0/24", 120 + k) }])];
        if v6 {
            ranges.push(json!([{ "subnet": format!("fd20:{k}::/64") }]));
        }
        // hairpinMode: with br_netfilter active (as here) a pod reaching
        // itself through a host port is bridged back out of its own port.
        let conf = node.conf("1.1.0", Value::Array(ranges), json!({ "isDefaultGateway": true, "hairpinMode": true }));
        World { node, client, conf, k }
    }

    fn gw4(&self) -> IpAddr {
        format!("10.{}.0.1", 120 + self.k).parse().unwrap()
    }

    fn gw6(&self) -> IpAddr {
        format!("fd20:{}::1", self.k).parse().unwrap()
    }

    /// `tern` ADD of `cid` into `pod`: the result and the pod's addresses.
    fn pod(&self, cid: &str, pod: &Netns) -> (Value, Vec<IpAddr>) {
        let res = self.node.add_ok(&self.conf, cid, pod);
        let ips = result_addrs(&res).iter().map(|a| ip_of(a)).collect();
        (res, ips)
    }

    fn portmap_conf(&self, list: Value, extra: Value, prev: Option<&Value>) -> String {
        let mut e = mappings(list);
        for (k, v) in extra.as_object().unwrap() {
            e[k] = v.clone();
        }
        meta_conf(&self.node.network, "tern-portmap", e, prev)
    }

    fn portmap(&self, command: &str, cid: &str, pod: Option<&Netns>, conf: &str) -> PluginRun {
        run_meta(&self.node, "tern-portmap", command, cid, pod, conf)
    }

    /// tern-portmap ADD that must succeed and pass prevResult through.
    fn map_ok(&self, cid: &str, pod: &Netns, prev: &Value, list: Value, extra: Value) {
        let run = self.portmap("ADD", cid, Some(pod), &self.portmap_conf(list, extra, Some(prev)));
        assert_eq!(&run.assert_ok().json(), prev, "tern-portmap must pass prevResult through");
    }

    /// DEL as a runtime that does not resend portMappings nor prevResult.
    fn unmap(&self, cid: &str) {
        let conf = meta_conf(&self.node.network, "tern-portmap", json!({}), None);
        assert_empty_ok(&self.portmap("DEL", cid, None, &conf));
    }

    fn elements(&self) -> Option<Vec<Elem>> {
        table_elements(&self.node.ns, "inet", TABLE)
    }

    fn owned_by(&self, cid: &str) -> Vec<Elem> {
        let tag = format!("{}/{cid}/eth0", self.node.network);
        self.elements().unwrap_or_default().into_iter().filter(|e| e.comment == tag).collect()
    }

    fn table_gone(&self) -> bool {
        !nft_tables(&self.node.ns).contains(&format!("inet {TABLE}"))
    }

    fn del_pod(&self, cid: &str, pod: &Netns) {
        assert_empty_ok(&self.node.del(&self.conf, cid, Some(&pod.path())));
    }
}

#[test]
fn host_port_reaches_the_pod_from_a_client_the_node_and_pods_until_del() {
    let w = World::new(1, false);
    let (pod_a, pod_b) = (Netns::new("tpa"), Netns::new("tpb"));
    let (res_a, ips_a) = w.pod("ctr-a", &pod_a);
    let (res_b, ips_b) = w.pod("ctr-b", &pod_b);
    let a = ips_a[0];
    w.map_ok("ctr-a", &pod_a, &res_a, json!([{ "hostPort": 8080, "containerPort": 80, "protocol": "tcp" }]), json!({}));
    // A pod without mappings: passed through, nothing made.
    w.map_ok("ctr-b", &pod_b, &res_b, json!([]), json!({}));
    assert!(w.owned_by("ctr-b").is_empty());

    let c = &w.client;
    let seen = tcp_must("client -> node", &c.ns, &pod_a, sa(a, 80), sa(c.node_ip4, 8080));
    assert_eq!(seen.peer, c.ip4, "traffic from another host keeps its source address");
    let seen = tcp_must("node -> its own address", &w.node.ns, &pod_a, sa(a, 80), sa(c.node_ip4, 8080));
    assert_eq!(seen.peer, c.node_ip4);
    tcp_must("node -> bridge address", &w.node.ns, &pod_a, sa(a, 80), sa(w.gw4(), 8080));
    // Hairpin: another pod on the bridge, and the pod itself, via the node.
    let seen = tcp_must("pod b -> node -> pod a", &pod_b, &pod_a, sa(a, 80), sa(c.node_ip4, 8080));
    assert_eq!(seen.peer, w.gw4(), "hairpin traffic is masqueraded to the bridge address");
    assert_ne!(seen.peer, ips_b[0]);
    tcp_must("pod a -> node -> pod a", &pod_a, &pod_a, sa(a, 80), sa(c.node_ip4, 8080));
    // Localhost host ports are off unless asked for.
    tcp_must_not("node -> 127.0.0.1", &w.node.ns, &pod_a, sa(a, 80), sa("127.0.0.1".parse().unwrap(), 8080));
    // Another port is not mapped.
    tcp_must_not("unmapped port", &c.ns, &pod_a, sa(a, 81), sa(c.node_ip4, 8081));

    let check = w.portmap_conf(json!([{ "hostPort": 8080, "containerPort": 80 }]), json!({}), Some(&res_a));
    assert_empty_ok(&w.portmap("CHECK", "ctr-a", Some(&pod_a), &check));

    // DEL without portMappings and without prevResult removes everything.
    w.unmap("ctr-a");
    assert!(w.table_gone(), "table left after the last DEL: {:?}", w.elements());
    tcp_must_not("client after DEL", &c.ns, &pod_a, sa(a, 80), sa(c.node_ip4, 8080));
    tcp_must_not("node after DEL", &w.node.ns, &pod_a, sa(a, 80), sa(c.node_ip4, 8080));
    w.unmap("ctr-a");
    w.unmap("ctr-b");
    w.del_pod("ctr-a", &pod_a);
    w.del_pod("ctr-b", &pod_b);
    w.node.assert_clean();
}

#[test]
fn pods_get_their_own_host_ports_and_a_taken_port_is_refused() {
    let w = World::new(2, false);
    let (pod_a, pod_b, pod_c) = (Netns::new("tpa"), Netns::new("tpb"), Netns::new("tpc"));
    let (res_a, ips_a) = w.pod("ctr-a", &pod_a);
    let (res_b, ips_b) = w.pod("ctr-b", &pod_b);
    let (res_c, _) = w.pod("ctr-c", &pod_c);
    let list_a = json!([
        { "hostPort": 8081, "containerPort": 80 },
        { "hostPort": 5353, "containerPort": 53, "protocol": "udp" },
    ]);
    w.map_ok("ctr-a", &pod_a, &res_a, list_a.clone(), json!({}));
    w.map_ok("ctr-b", &pod_b, &res_b, json!([{ "hostPort": 8082, "containerPort": 80, "protocol": "TCP" }]), json!({}));
    let c = &w.client;
    tcp_must("8081 -> a", &c.ns, &pod_a, sa(ips_a[0], 80), sa(c.node_ip4, 8081));
    tcp_must("8082 -> b", &c.ns, &pod_b, sa(ips_b[0], 80), sa(c.node_ip4, 8082));
    tcp_must_not("8082 is not a's", &c.ns, &pod_a, sa(ips_a[0], 80), sa(c.node_ip4, 8082));
    let peer = udp_via(&c.ns, &pod_a, sa(ips_a[0], 53), sa(c.node_ip4, 5353), Duration::from_secs(3));
    assert_eq!(peer, Some(c.ip4), "udp 5353 -> a:53");

    // The same host port for another attachment: refused, naming who has it.
    let run = w.portmap(
        "ADD",
        "ctr-c",
        Some(&pod_c),
        &w.portmap_conf(json!([{ "hostPort": 8081, "containerPort": 80 }]), json!({}), Some(&res_c)),
    );
    assert_error_naming(&run, &["8081", "ctr-a"]);
    // A specific hostIP overlaps a mapping on every address.
    let list = json!([{ "hostPort": 8082, "containerPort": 80, "hostIP": c.node_ip4.to_string() }]);
    let run = w.portmap("ADD", "ctr-c", Some(&pod_c), &w.portmap_conf(list, json!({}), Some(&res_c)));
    assert_error_naming(&run, &["8082", "ctr-b"]);
    // Another protocol on the same number is a different port.
    w.map_ok("ctr-c", &pod_c, &res_c, json!([{ "hostPort": 8081, "containerPort": 80, "protocol": "udp" }]), json!({}));
    // The refused ADDs left nothing, and the owners still work.
    assert_eq!(w.owned_by("ctr-c").len(), 2, "{:?}", w.owned_by("ctr-c"));
    tcp_must("8081 still -> a", &c.ns, &pod_a, sa(ips_a[0], 80), sa(c.node_ip4, 8081));
    // A repeated ADD of the same attachment replaces its own elements.
    w.map_ok("ctr-a", &pod_a, &res_a, list_a, json!({}));
    assert_eq!(w.owned_by("ctr-a").len(), 3, "two mappings and one hairpin element: {:?}", w.owned_by("ctr-a"));

    for cid in ["ctr-a", "ctr-b", "ctr-c"] {
        w.unmap(cid);
    }
    assert!(w.table_gone());
    w.del_pod("ctr-a", &pod_a);
    w.del_pod("ctr-b", &pod_b);
    w.del_pod("ctr-c", &pod_c);
    w.node.assert_clean();
}

#[test]
fn host_ip_limits_the_mapping_to_that_address() {
    let w = World::new(3, false);
    let c = &w.client;
    let second: IpAddr = "192.168.3.10".parse().unwrap();
    w.node.ns.ok(&format!("ip addr add {second}/24 dev {}", c.node_if));
    let pod = Netns::new("tpa");
    let (res, ips) = w.pod("ctr-a", &pod);
    let list = json!([
        { "hostPort": 8083, "containerPort": 80, "hostIP": second.to_string() },
        { "hostPort": 8084, "containerPort": 84, "hostIP": "0.0.0.0" },
    ]);
    w.map_ok("ctr-a", &pod, &res, list, json!({}));
    tcp_must("hostIP address", &c.ns, &pod, sa(ips[0], 80), sa(second, 8083));
    tcp_must("node -> hostIP address", &w.node.ns, &pod, sa(ips[0], 80), sa(second, 8083));
    tcp_must_not("other address", &c.ns, &pod, sa(ips[0], 80), sa(c.node_ip4, 8083));
    tcp_must("0.0.0.0 = every IPv4 address", &c.ns, &pod, sa(ips[0], 84), sa(c.node_ip4, 8084));
    tcp_must("0.0.0.0 = every IPv4 address", &c.ns, &pod, sa(ips[0], 84), sa(second, 8084));
    w.unmap("ctr-a");
    assert!(w.table_gone());
    tcp_must_not("after DEL", &c.ns, &pod, sa(ips[0], 80), sa(second, 8083));
    w.del_pod("ctr-a", &pod);
}

#[test]
fn ipv6_mappings_work_like_ipv4() {
    let w = World::new(4, true);
    let c = &w.client;
    let (pod_a, pod_b) = (Netns::new("tpa"), Netns::new("tpb"));
    let (res_a, ips_a) = w.pod("ctr-a", &pod_a);
    w.pod("ctr-b", &pod_b);
    let (a4, a6) = (ips_a[0], ips_a[1]);
    assert!(a6.is_ipv6());
    let list = json!([
        { "hostPort": 8085, "containerPort": 80 },
        { "hostPort": 8086, "containerPort": 86, "hostIP": c.node_ip6.to_string() },
    ]);
    w.map_ok("ctr-a", &pod_a, &res_a, list, json!({}));
    let seen = tcp_must("client -> [node]:8085", &c.ns, &pod_a, sa(a6, 80), sa(c.node_ip6, 8085));
    assert_eq!(seen.peer, c.ip6);
    tcp_must("client -> node:8085 (IPv4 too)", &c.ns, &pod_a, sa(a4, 80), sa(c.node_ip4, 8085));
    tcp_must("node -> [node]:8085", &w.node.ns, &pod_a, sa(a6, 80), sa(c.node_ip6, 8085));
    let seen = tcp_must("pod b -> [node]:8085 (hairpin)", &pod_b, &pod_a, sa(a6, 80), sa(c.node_ip6, 8085));
    assert_eq!(seen.peer, w.gw6(), "IPv6 hairpin is masqueraded too");
    tcp_must("IPv6 hostIP", &c.ns, &pod_a, sa(a6, 86), sa(c.node_ip6, 8086));
    tcp_must_not("IPv6 hostIP is IPv6 only", &c.ns, &pod_a, sa(a4, 86), sa(c.node_ip4, 8086));
    let owned = w.owned_by("ctr-a");
    assert_eq!(owned.len(), 5, "3 mappings + 2 hairpin elements: {owned:?}");
    w.unmap("ctr-a");
    assert!(w.table_gone());
    tcp_must_not("after DEL", &c.ns, &pod_a, sa(a6, 80), sa(c.node_ip6, 8085));
    w.del_pod("ctr-a", &pod_a);
    w.del_pod("ctr-b", &pod_b);
    w.node.assert_clean();
}

#[test]
fn gc_removes_the_mappings_of_attachments_not_listed() {
    let w = World::new(5, false);
    let c = &w.client;
    let (pod_a, pod_b) = (Netns::new("tpa"), Netns::new("tpb"));
    let (res_a, ips_a) = w.pod("ctr-a", &pod_a);
    let (res_b, ips_b) = w.pod("ctr-b", &pod_b);
    w.map_ok("ctr-a", &pod_a, &res_a, json!([{ "hostPort": 8087, "containerPort": 80 }]), json!({}));
    w.map_ok("ctr-b", &pod_b, &res_b, json!([{ "hostPort": 8088, "containerPort": 80 }]), json!({}));

    // Another network's GC touches nothing of this one.
    let other = gc_conf(&unique("othernet"), "tern-portmap", &[]);
    assert_empty_ok(&w.portmap("GC", "", None, &other));
    assert_eq!(w.owned_by("ctr-a").len(), 2);

    let gc = gc_conf(&w.node.network, "tern-portmap", &["ctr-b"]);
    assert_empty_ok(&w.portmap("GC", "", None, &gc));
    assert!(w.owned_by("ctr-a").is_empty(), "{:?}", w.elements());
    assert_eq!(w.owned_by("ctr-b").len(), 2);
    tcp_must_not("a after GC", &c.ns, &pod_a, sa(ips_a[0], 80), sa(c.node_ip4, 8087));
    tcp_must("b kept", &c.ns, &pod_b, sa(ips_b[0], 80), sa(c.node_ip4, 8088));
    // The freed port can be mapped again.
    w.map_ok("ctr-b", &pod_b, &res_b, json!([{ "hostPort": 8087, "containerPort": 80 }]), json!({}));
    tcp_must("b on a's old port", &c.ns, &pod_b, sa(ips_b[0], 80), sa(c.node_ip4, 8087));

    assert_empty_ok(&w.portmap("GC", "", None, &gc_conf(&w.node.network, "tern-portmap", &[])));
    assert!(w.table_gone(), "{:?}", w.elements());
    w.del_pod("ctr-a", &pod_a);
    w.del_pod("ctr-b", &pod_b);
    w.node.assert_clean();
}

#[test]
fn check_passes_then_fails_when_an_element_is_deleted() {
    let w = World::new(6, true);
    let pod = Netns::new("tpa");
    let (res, _) = w.pod("ctr-a", &pod);
    let list = json!([{ "hostPort": 8089, "containerPort": 80 }, { "hostPort": 8090, "containerPort": 90, "protocol": "sctp" }]);
    w.map_ok("ctr-a", &pod, &res, list.clone(), json!({}));
    let check = w.portmap_conf(list, json!({}), Some(&res));
    assert_empty_ok(&w.portmap("CHECK", "ctr-a", Some(&pod), &check));

    let gone = w
        .owned_by("ctr-a")
        .into_iter()
        .find(|e| e.key == "sctp . 8090" && e.set.ends_with("_a6"))
        .expect("sctp/8090 IPv6 element");
    w.node.ns.ok(&format!("nft delete element inet {TABLE} {} {{ sctp . 8090 }}", gone.set));
    let run = w.portmap("CHECK", "ctr-a", Some(&pod), &check);
    assert_error_naming(&run, &["sctp/8090", "missing"]);

    // CHECK without prevResult is refused by the skeleton.
    let no_prev = w.portmap_conf(json!([{ "hostPort": 8089, "containerPort": 80 }]), json!({}), None);
    w.portmap("CHECK", "ctr-a", Some(&pod), &no_prev).assert_error(7);
    w.unmap("ctr-a");
    assert!(w.table_gone());
    assert_error_naming(&w.portmap("CHECK", "ctr-a", Some(&pod), &check), &["missing"]);
    w.del_pod("ctr-a", &pod);
}

#[test]
fn localhost_host_ports_only_when_enabled_and_fenced() {
    let w = World::new(7, false);
    let (pod_a, pod_b) = (Netns::new("tpa"), Netns::new("tpb"));
    let (res_a, ips_a) = w.pod("ctr-a", &pod_a);
    let (res_b, ips_b) = w.pod("ctr-b", &pod_b);
    let lo: IpAddr = "127.0.0.1".parse().unwrap();
    let br = &w.node.bridge;
    let localnet = |i: &str| sysctl_in(&w.node.ns, &format!("net/ipv4/conf/{i}/route_localnet"));

    // Without "localhost": no 127.0.0.1, and no route_localnet anywhere.
    w.map_ok("ctr-a", &pod_a, &res_a, json!([{ "hostPort": 8091, "containerPort": 80 }]), json!({}));
    tcp_must_not("127.0.0.1 without localhost", &w.node.ns, &pod_a, sa(ips_a[0], 80), sa(lo, 8091));
    assert_eq!(localnet(br), "0");
    // A loopback hostIP needs it too.
    let run = w.portmap(
        "ADD",
        "ctr-b",
        Some(&pod_b),
        &w.portmap_conf(
            json!([{ "hostPort": 8092, "containerPort": 80, "hostIP": "127.0.0.1" }]),
            json!({}),
            Some(&res_b),
        ),
    );
    run.assert_error(7);
    assert_error_naming(&run, &["runtimeConfig.portMappings[0].hostIP", "localhost"]);

    w.map_ok("ctr-b", &pod_b, &res_b, json!([{ "hostPort": 8092, "containerPort": 80 }]), json!({ "localhost": true }));
    let seen = tcp_must("node -> 127.0.0.1", &w.node.ns, &pod_b, sa(ips_b[0], 80), sa(lo, 8092));
    assert_eq!(seen.peer, w.gw4(), "localhost traffic is masqueraded to the bridge address");
    tcp_must("client -> node", &w.client.ns, &pod_b, sa(ips_b[0], 80), sa(w.client.node_ip4, 8092));
    assert_eq!(localnet(br), "1", "route_localnet on the interface towards the pod");
    assert_eq!(localnet("all"), "0");
    assert_eq!(localnet(&w.client.node_if), "0");
    let martian = w.node.ns.ok(&format!("nft list chain inet {TABLE} martian"));
    assert!(martian.contains("iifname != \"lo\" ip daddr 127.0.0.0/8 drop"), "{martian}");
    assert!(martian.contains("iifname != \"lo\" ip saddr 127.0.0.0/8 drop"), "{martian}");
    let check =
        w.portmap_conf(json!([{ "hostPort": 8092, "containerPort": 80 }]), json!({ "localhost": true }), Some(&res_b));
    assert_empty_ok(&w.portmap("CHECK", "ctr-b", Some(&pod_b), &check));
    w.node.ns.ok(&format!("echo 0 > /proc/sys/net/ipv4/conf/{br}/route_localnet"));
    assert_error_naming(&w.portmap("CHECK", "ctr-b", Some(&pod_b), &check), &["route_localnet"]);
    w.node.ns.ok(&format!("echo 1 > /proc/sys/net/ipv4/conf/{br}/route_localnet"));

    // The last localhost pod goes: the fence and route_localnet go with it.
    w.unmap("ctr-b");
    assert_eq!(localnet(br), "0");
    let chains = w.node.ns.ok(&format!("nft list table inet {TABLE}"));
    assert!(!chains.contains("martian"), "{chains}");
    tcp_must("a still mapped", &w.client.ns, &pod_a, sa(ips_a[0], 80), sa(w.client.node_ip4, 8091));
    w.unmap("ctr-a");
    assert!(w.table_gone());
    w.del_pod("ctr-a", &pod_a);
    w.del_pod("ctr-b", &pod_b);
    w.node.assert_clean();
}

#[test]
fn conditions_restrict_who_reaches_the_host_port() {
    let w = World::new(8, false);
    let pod = Netns::new("tpa");
    let (res, ips) = w.pod("ctr-a", &pod);
    let c = &w.client;
    let extra = json!({ "conditionsV4": [format!("ip saddr != {}", c.ip4)], "conditionsV6": ["ip6 saddr != ::1"] });
    w.map_ok("ctr-a", &pod, &res, json!([{ "hostPort": 8093, "containerPort": 80 }]), extra);
    tcp_must_not("excluded client", &c.ns, &pod, sa(ips[0], 80), sa(c.node_ip4, 8093));
    tcp_must("node is not excluded", &w.node.ns, &pod, sa(ips[0], 80), sa(c.node_ip4, 8093));
    w.unmap("ctr-a");
    assert!(w.table_gone());
    w.del_pod("ctr-a", &pod);
}

#[test]
fn invalid_configs_are_refused_naming_the_field() {
    let w = World::new(9, false);
    let pod = Netns::new("tpa");
    let (res, _) = w.pod("ctr-a", &pod);
    let one = json!([{ "hostPort": 8094, "containerPort": 80 }]);
    let cases: Vec<(Value, Value, &str)> = vec![
        (
            json!([{ "hostPort": 8094, "containerPort": 80, "protocol": "icmp" }]),
            json!({}),
            "runtimeConfig.portMappings[0].protocol",
        ),
        (json!([{ "hostPort": 0, "containerPort": 80 }]), json!({}), "runtimeConfig.portMappings[0].hostPort"),
        (
            json!([{ "hostPort": 8094, "containerPort": 80, "hostIP": "10.0.0.0/8" }]),
            json!({}),
            "runtimeConfig.portMappings[0].hostIP",
        ),
        (
            json!([{ "hostPort": 8094, "containerPort": 80 }, { "hostPort": 8094, "containerPort": 81 }]),
            json!({}),
            "runtimeConfig.portMappings[1]",
        ),
        (one.clone(), json!({ "conditionsV4": ["-s 10.0.0.0/8"] }), "conditionsV4[0]"),
        (one.clone(), json!({ "conditionsV6": ["ip6 saddr fd00::/8", "! -i eth0"] }), "conditionsV6[1]"),
        (one.clone(), json!({ "conditionsV4": ["ip saddr 10.0.0.0/8; flush ruleset"] }), "conditionsV4[0]"),
        (one.clone(), json!({ "conditionsV4": ["ip nosuchfield 3"] }), "conditionsV4[0]"),
        (one.clone(), json!({ "markMasqBit": 40 }), "markMasqBit"),
        (one.clone(), json!({ "localhost": true, "snat": false }), "localhost"),
        (one.clone(), json!({ "snat": "yes" }), "snat"),
    ];
    for (list, extra, field) in cases {
        let run = w.portmap("ADD", "ctr-a", Some(&pod), &w.portmap_conf(list, extra.clone(), Some(&res)));
        run.assert_error(7);
        assert_error_naming(&run, &[field]);
        assert!(w.table_gone(), "a refused ADD ({extra}) left {:?}", w.elements());
    }
    // Chained only.
    let run = w.portmap("ADD", "ctr-a", Some(&pod), &w.portmap_conf(one.clone(), json!({}), None));
    run.assert_error(7);
    assert_error_naming(&run, &["prevResult"]);
    // iptables-only options are unsupported (code 2).
    let run = w.portmap(
        "ADD",
        "ctr-a",
        Some(&pod),
        &w.portmap_conf(one, json!({ "externalSetMarkChain": "KUBE-MARK-MASQ" }), Some(&res)),
    );
    run.assert_error(2);
    assert!(w.table_gone());
    // STATUS.
    assert_empty_ok(&w.portmap("STATUS", "", None, &meta_conf(&w.node.network, "tern-portmap", json!({}), None)));
    w.del_pod("ctr-a", &pod);
}

/// The same plugins chained after the reference bridge (v1.1.1, so config
/// version 1.0.0) with host-local: bridge -> tern-portmap -> tern-firewall.
#[test]
fn chained_after_the_reference_bridge() {
    let node = chain_node();
    let c = connect_client(&node.ns, 10);
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": node.network,
        "type": "bridge",
        "bridge": node.bridge,
        "isDefaultGateway": true,
        "hairpinMode": true,
        "ipam": { "type": "host-local", "dataDir": node.data.path(), "ranges": [[{ "subnet": "10.130.0.0/24" }]] },
    })
    .to_string();
    let v = json!({ "cniVersion": "1.0.0" });
    let (pod_a, pod_b) = (Netns::new("tpa"), Netns::new("tpb"));
    let mut results = Vec::new();
    for (cid, pod) in [("ctr-a", &pod_a), ("ctr-b", &pod_b)] {
        let run = exec_plugin(&node.ns, &node.plugins, "bridge", "ADD", cid, Some(&pod.path()), "eth0", "", &conf);
        let mut res = run.assert_ok().json();
        let mut pm = mappings(json!(if cid == "ctr-a" {
            json!([{ "hostPort": 8096, "containerPort": 80 }])
        } else {
            json!([])
        }));
        pm["cniVersion"] = v["cniVersion"].clone();
        let pm = meta_conf(&node.network, "tern-portmap", pm, Some(&res));
        res = run_meta(&node, "tern-portmap", "ADD", cid, Some(pod), &pm).assert_ok().json();
        let fw = meta_conf(&node.network, "tern-firewall", v.clone(), Some(&res));
        res = run_meta(&node, "tern-firewall", "ADD", cid, Some(pod), &fw).assert_ok().json();
        assert_empty_ok(&run_meta(&node, "tern-portmap", "CHECK", cid, Some(pod), &with_prev(&pm, &res)));
        assert_empty_ok(&run_meta(&node, "tern-firewall", "CHECK", cid, Some(pod), &with_prev(&fw, &res)));
        results.push(res);
    }
    let a = ip_of(&result_addrs(&results[0])[0]);
    let seen = tcp_must("client -> host port", &c.ns, &pod_a, sa(a, 80), sa(c.node_ip4, 8096));
    assert_eq!(seen.peer, c.ip4);
    let seen = tcp_must("pod b -> host port (hairpin)", &pod_b, &pod_a, sa(a, 80), sa(c.node_ip4, 8096));
    assert_eq!(seen.peer, "10.130.0.1".parse::<IpAddr>().unwrap());
    tcp_must("pod a -> its own host port", &pod_a, &pod_a, sa(a, 80), sa(c.node_ip4, 8096));

    // DEL in reverse order, as a runtime does (with prevResult, without portMappings).
    for (cid, pod, res) in [("ctr-a", &pod_a, &results[0]), ("ctr-b", &pod_b, &results[1])] {
        for plugin in ["tern-firewall", "tern-portmap"] {
            let del = meta_conf(&node.network, plugin, v.clone(), Some(res));
            assert_empty_ok(&run_meta(&node, plugin, "DEL", cid, Some(pod), &del));
        }
        if cid == "ctr-a" {
            tcp_must_not("client after DEL", &c.ns, &pod_a, sa(a, 80), sa(c.node_ip4, 8096));
        }
        let run = exec_plugin(&node.ns, &node.plugins, "bridge", "DEL", cid, Some(&pod.path()), "eth0", "", &conf);
        assert_empty_ok(&run);
    }
    assert_eq!(nft_tables(&node.ns), Vec::<String>::new());
}
