//! tern-firewall chained after `tern`: two bridge networks on one node are
//! isolated from each other with the firewall and not without it; pods of one
//! network still reach each other; replies pass; `ingressPolicy: same-bridge`
//! keeps new connections from outside out (published host ports excepted);
//! CHECK, DEL without prevResult and GC leave nothing behind.
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

const TABLE: &str = "tern_firewall";
const PORT: u16 = 7000;

struct Net {
    name: String,
    conf: String,
}

/// A node with two `tern` bridge networks (dual-stack, default gateway):
/// net 0 in 10.<130+k>.1.0/24 + fd31:<k>:1::/64, net 1 in 10.<130+k>.2.0/24
/// + fd31:<k>:2::/64, and a client namespace on 192.168.<100+k>.0/24.
struct World {
    node: Node,
    client: Client,
    nets: Vec<Net>,
}

/// A pod: its namespace, container id, network, `tern` result, addresses.
struct Pod {
    ns: Netns,
    cid: String,
    net: usize,
    res: Value,
    ips: Vec<IpAddr>,
}

impl World {
    fn new(k: u8) -> World {
        let node = chain_node();
        let client = connect_client(&node.ns, 100 + k);
        let mut nets = Vec::new();
        for n in 1..=2u8 {
            let (name, bridge) = if n == 1 {
                (node.network.clone(), node.bridge.clone())
            } else {
                (unique("tcnet2"), unique_short("tcbr2"))
            };
            let ranges = json!([[{ "subnet": format!("10.{}.{n}.0/24", 130 + k) }], [{ "subnet": format!("fd31:{k}:{n}::/64") }]]);
            let conf = node.conf("1.1.0", ranges, json!({ "name": name, "bridge": bridge, "isDefaultGateway": true }));
            nets.push(Net { name, conf });
        }
        World { node, client, nets }
    }

    /// `tern` ADD of a new pod `cid` on network `net`.
    fn pod(&self, cid: &str, net: usize) -> Pod {
        let ns = Netns::new("tfp");
        let res = self.node.add_ok(&self.nets[net].conf, cid, &ns);
        let ips = result_addrs(&res).iter().map(|a| ip_of(a)).collect();
        Pod { ns, cid: cid.into(), net, res, ips }
    }

    fn fw_conf(&self, net: usize, extra: Value, prev: Option<&Value>) -> String {
        meta_conf(&self.nets[net].name, "tern-firewall", extra, prev)
    }

    fn firewall(&self, command: &str, p: &Pod, conf: &str) -> PluginRun {
        run_meta(&self.node, "tern-firewall", command, &p.cid, Some(&p.ns), conf)
    }

    /// tern-firewall ADD that must succeed and pass prevResult through.
    fn isolate(&self, p: &Pod, extra: Value) {
        let run = self.firewall("ADD", p, &self.fw_conf(p.net, extra, Some(&p.res)));
        assert_eq!(&run.assert_ok().json(), &p.res, "tern-firewall must pass prevResult through");
    }

    /// DEL as a runtime that lost prevResult and the netns.
    fn unisolate(&self, p: &Pod) {
        let conf = self.fw_conf(p.net, json!({}), None);
        assert_empty_ok(&run_meta(&self.node, "tern-firewall", "DEL", &p.cid, None, &conf));
    }

    fn elements_of(&self, p: &Pod) -> Vec<Elem> {
        let tag = format!("{}/{}/eth0", self.nets[p.net].name, p.cid);
        table_elements(&self.node.ns, "inet", TABLE)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e.comment == tag)
            .collect()
    }

    fn table_gone(&self) -> bool {
        !nft_tables(&self.node.ns).contains(&format!("inet {TABLE}"))
    }

    fn del_pod(&self, p: Pod) {
        assert_empty_ok(&self.node.del(&self.nets[p.net].conf, &p.cid, Some(&p.ns.path())));
    }
}

/// TCP from pod/namespace `from` to `to`'s address of family `v6`, within
/// `timeout`.
fn reach(from: &Netns, to: &Pod, v6: bool, timeout: Duration) -> bool {
    let ip = to.ips[usize::from(v6)];
    tcp_via(from, &to.ns, sa(ip, PORT), sa(ip, PORT), timeout).is_some()
}

/// Both families. Negative checks are only meaningful once the path has
/// been seen working (IPv6 neighbour discovery on fresh bridges takes a
/// moment): each test first shows it without the firewall.
fn assert_reach(what: &str, from: &Netns, to: &Pod, want: bool) {
    let timeout = if want { Duration::from_secs(5) } else { Duration::from_millis(1200) };
    for v6 in [false, true] {
        let got = reach(from, to, v6, timeout);
        let fam = if v6 { "IPv6" } else { "IPv4" };
        assert_eq!(got, want, "{what} ({fam}): expected {}", if want { "reachable" } else { "blocked" });
    }
}

#[test]
fn pods_of_different_networks_are_isolated_with_the_firewall_only() {
    let w = World::new(1);
    let a1 = w.pod("ctr-a1", 0);
    let a2 = w.pod("ctr-a2", 0);
    let b1 = w.pod("ctr-b1", 1);

    // Without tern-firewall the node routes between its networks.
    assert_reach("a1 -> b1 without firewall", &a1.ns, &b1, true);
    assert_reach("b1 -> a1 without firewall", &b1.ns, &a1, true);

    for p in [&a1, &a2, &b1] {
        w.isolate(p, json!({}));
    }
    assert_eq!(
        w.elements_of(&a1).len(),
        6,
        "to4, to6, pods4, pods6 and the network's two sets: {:?}",
        w.elements_of(&a1)
    );
    assert_reach("a1 -> b1", &a1.ns, &b1, false);
    assert_reach("a2 -> b1", &a2.ns, &b1, false);
    assert_reach("b1 -> a1", &b1.ns, &a1, false);
    assert_reach("a1 -> a2 (same network)", &a1.ns, &a2, true);
    assert_reach("a2 -> a1 (same network)", &a2.ns, &a1, true);
    // open: everything that is not a pod of another network gets in.
    assert_reach("client -> a1", &w.client.ns, &a1, true);
    assert_reach("client -> b1", &w.client.ns, &b1, true);
    assert_reach("node -> b1", &w.node.ns, &b1, true);
    for p in [&a1, &b1] {
        assert_empty_ok(&w.firewall("CHECK", p, &w.fw_conf(p.net, json!({}), Some(&p.res))));
    }

    // b1 leaves the firewall: it is no longer known, so no longer isolated.
    w.unisolate(&b1);
    assert!(w.elements_of(&b1).is_empty());
    assert_reach("a1 -> b1 after b1's DEL", &a1.ns, &b1, true);
    assert_reach("b1 -> a1 after b1's DEL", &b1.ns, &a1, true);
    let rules = w.node.ns.ok(&format!("nft list table inet {TABLE}"));
    assert_eq!(rules.matches("chain i").count(), 1, "net 1's chain went with its last pod:\n{rules}");

    w.unisolate(&a1);
    w.unisolate(&a2);
    assert!(w.table_gone());
    w.unisolate(&a1);
    for p in [a1, a2, b1] {
        w.del_pod(p);
    }
    w.node.assert_clean();
}

#[test]
fn same_bridge_lets_in_only_its_own_network_replies_and_published_ports() {
    let w = World::new(2);
    let a1 = w.pod("ctr-a1", 0);
    let a2 = w.pod("ctr-a2", 0);
    let b1 = w.pod("ctr-b1", 1);
    assert_reach("client -> a1 without firewall", &w.client.ns, &a1, true);
    assert_reach("b1 -> a1 without firewall", &b1.ns, &a1, true);
    assert_reach("a1 -> b1 without firewall", &a1.ns, &b1, true);
    // The standard chain: tern -> tern-portmap -> tern-firewall.
    let pm = meta_conf(
        &w.nets[0].name,
        "tern-portmap",
        mappings(json!([{ "hostPort": 8095, "containerPort": PORT }])),
        Some(&a1.res),
    );
    let res = run_meta(&w.node, "tern-portmap", "ADD", &a1.cid, Some(&a1.ns), &pm).assert_ok().json();
    assert_eq!(res, a1.res);
    for p in [&a1, &a2] {
        w.isolate(p, json!({ "ingressPolicy": "same-bridge" }));
    }
    w.isolate(&b1, json!({ "ingressPolicy": "open" }));

    assert_reach("client -> a1", &w.client.ns, &a1, false);
    assert_reach("b1 -> a1", &b1.ns, &a1, false);
    assert_reach("a1 -> b1 (b1 is open but a1 is of another network)", &a1.ns, &b1, false);
    assert_reach("a1 -> a2", &a1.ns, &a2, true);
    assert_reach("node -> a1", &w.node.ns, &a1, true);
    // Replies to connections the pod opened pass.
    let c = &w.client;
    assert!(tcp_via(&a1.ns, &c.ns, sa(c.ip4, PORT), sa(c.ip4, PORT), Duration::from_secs(3)).is_some(), "a1 -> client");
    assert!(
        tcp_via(&a1.ns, &c.ns, sa(c.ip6, PORT), sa(c.ip6, PORT), Duration::from_secs(3)).is_some(),
        "a1 -> client (IPv6)"
    );
    // A published host port is reachable: from the client and from the other network.
    let seen = tcp_must("client -> host port -> a1", &c.ns, &a1.ns, sa(a1.ips[0], PORT), sa(c.node_ip4, 8095));
    assert_eq!(seen.peer, c.ip4);
    tcp_must("b1 -> host port -> a1", &b1.ns, &a1.ns, sa(a1.ips[0], PORT), sa(c.node_ip4, 8095));
    tcp_must_not("b1 -> a1 directly", &b1.ns, &a1.ns, sa(a1.ips[0], PORT), sa(a1.ips[0], PORT));

    // DEL in reverse order, without prevResult.
    for p in [&a1, &a2, &b1] {
        w.unisolate(p);
    }
    assert!(w.table_gone());
    assert_empty_ok(&run_meta(
        &w.node,
        "tern-portmap",
        "DEL",
        &a1.cid,
        None,
        &meta_conf(&w.nets[0].name, "tern-portmap", json!({}), None),
    ));
    assert!(!nft_tables(&w.node.ns).iter().any(|t| t.contains("tern_portmap")));
    assert_reach("client -> a1 without firewall", &w.client.ns, &a1, true);
    for p in [a1, a2, b1] {
        w.del_pod(p);
    }
    w.node.assert_clean();
}

#[test]
fn check_fails_on_a_missing_element_and_gc_removes_stale_attachments() {
    let w = World::new(3);
    let a1 = w.pod("ctr-a1", 0);
    let a2 = w.pod("ctr-a2", 0);
    let b1 = w.pod("ctr-b1", 1);
    assert_reach("a2 -> b1 without firewall", &a2.ns, &b1, true);
    for p in [&a1, &a2, &b1] {
        w.isolate(p, json!({}));
    }
    let check = w.fw_conf(0, json!({}), Some(&a1.res));
    assert_empty_ok(&w.firewall("CHECK", &a1, &check));
    let v6 = a1.ips[1];
    w.node.ns.ok(&format!("nft delete element inet {TABLE} to6 {{ {v6} }}"));
    assert_error_naming(&w.firewall("CHECK", &a1, &check), &[&v6.to_string(), "missing"]);
    assert_empty_ok(&w.firewall("CHECK", &a2, &w.fw_conf(0, json!({}), Some(&a2.res))));

    // GC of net 0 keeping a2: a1's elements go, a2's and net 1's stay.
    let gc = gc_conf(&w.nets[0].name, "tern-firewall", &["ctr-a2"]);
    assert_empty_ok(&run_meta(&w.node, "tern-firewall", "GC", "", None, &gc));
    assert!(w.elements_of(&a1).is_empty(), "{:?}", w.elements_of(&a1));
    assert_eq!(w.elements_of(&a2).len(), 6);
    assert_eq!(w.elements_of(&b1).len(), 6);
    assert_reach("a2 still isolated from b1", &a2.ns, &b1, false);
    assert_reach("a1 -> b1 (a1 is not known any more)", &a1.ns, &b1, true);
    assert_reach("b1 -> a1 (a1 is not known any more)", &b1.ns, &a1, true);

    // GC of net 1 with nothing valid, then of net 0: nothing left.
    assert_empty_ok(&run_meta(
        &w.node,
        "tern-firewall",
        "GC",
        "",
        None,
        &gc_conf(&w.nets[1].name, "tern-firewall", &[]),
    ));
    assert!(w.elements_of(&b1).is_empty());
    assert_empty_ok(&run_meta(
        &w.node,
        "tern-firewall",
        "GC",
        "",
        None,
        &gc_conf(&w.nets[0].name, "tern-firewall", &[]),
    ));
    assert!(w.table_gone());
    for p in [a1, a2, b1] {
        w.del_pod(p);
    }
    w.node.assert_clean();
}

#[test]
fn bad_configs_are_refused() {
    let w = World::new(4);
    let a1 = w.pod("ctr-a1", 0);
    let run = w.firewall("ADD", &a1, &w.fw_conf(0, json!({ "ingressPolicy": "closed" }), Some(&a1.res)));
    run.assert_error(7);
    assert_error_naming(&run, &["ingressPolicy"]);
    let run = w.firewall("ADD", &a1, &w.fw_conf(0, json!({}), None));
    run.assert_error(7);
    assert_error_naming(&run, &["prevResult"]);
    assert!(w.table_gone());
    assert_empty_ok(&run_meta(&w.node, "tern-firewall", "STATUS", "", None, &w.fw_conf(0, json!({}), None)));
    // DEL cleans up whatever the config says: a runtime must never be stuck.
    w.isolate(&a1, json!({}));
    let del = w.fw_conf(0, json!({ "ingressPolicy": "closed" }), None);
    assert_empty_ok(&run_meta(&w.node, "tern-firewall", "DEL", &a1.cid, None, &del));
    assert!(w.table_gone());
    w.del_pod(a1);
    w.node.assert_clean();
}
