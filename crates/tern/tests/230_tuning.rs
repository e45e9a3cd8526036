//! tern-tuning chained after `tern` and after the reference `bridge`:
//! sysctls in the pod namespace (not in the node), interface attributes and
//! their restore on DEL, CHECK naming what changed, the MAC sources, GC,
//! validation and undo.
//!
//! Privileged: run as root. Every test builds its own node and pod namespaces.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{json, Value};
use tern_testkit::*;

struct World {
    node: Node,
    meta: Plugins,
    /// tern-tuning's dataDir.
    backups: TempDir,
}

impl World {
    fn new() -> World {
        World {
            node: Node::new(),
            meta: Plugins::with_names(Path::new(env!("CARGO_BIN_EXE_tern")), &["tern-tuning"]),
            backups: TempDir::new(),
        }
    }

    fn tern_conf(&self) -> String {
        self.node.conf("1.0.0", json!([[{ "subnet": "10.23.0.0/24" }]]), json!({ "isGateway": true }))
    }

    /// A tern-tuning config of this network (with this world's dataDir) and
    /// `keys` on top, in prevResult's version (1.1.0 without).
    fn conf(&self, keys: Value, prev: Option<&Value>) -> String {
        let version = prev.map_or(json!("1.1.0"), |p| p["cniVersion"].clone());
        let mut c = json!({
            "cniVersion": version,
            "name": self.node.network,
            "type": "tern-tuning",
            "dataDir": self.backups.path(),
        });
        for (k, v) in keys.as_object().expect("object") {
            c[k] = v.clone();
        }
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c.to_string()
    }

    fn tuning(&self, command: &str, cid: &str, netns: Option<&Path>, args: &str, conf: &str) -> PluginRun {
        exec_plugin(&self.node.ns, &self.meta, "tern-tuning", command, cid, netns, "eth0", args, conf)
    }

    fn backup(&self, cid: &str) -> PathBuf {
        self.backups.join(format!("{cid}_eth0.json"))
    }
}

/// A sysctl as the process in `ns` sees it.
fn sysctl_in(ns: &Netns, path: &str) -> String {
    ns.ok(&format!("cat /proc/sys/{path}")).trim().to_owned()
}

/// (mac, mtu, promisc, allmulti, txqlen) of `dev` in `ns`.
fn attrs(ns: &Netns, dev: &str) -> (String, u64, bool, bool, u64) {
    let l = link(ns, dev).unwrap_or_else(|| panic!("no {dev} in {}", ns.name()));
    let flags: Vec<&str> = l["flags"].as_array().unwrap().iter().filter_map(|f| f.as_str()).collect();
    (
        l["address"].as_str().unwrap().to_owned(),
        l["mtu"].as_u64().unwrap(),
        flags.contains(&"PROMISC"),
        flags.contains(&"ALLMULTI"),
        // `ip` leaves out a zero queue length.
        l["txqlen"].as_u64().unwrap_or(0),
    )
}

fn eth0_mac(res: &Value) -> String {
    res["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "eth0" && i.get("sandbox").is_some())
        .unwrap_or_else(|| panic!("no eth0 in {res:#}"))["mac"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Sysctls land in the pod's namespace and nowhere else; CHECK passes with
/// IFNAME keys, and after a manual change fails naming the sysctl.
#[test]
fn sysctls_are_set_in_the_pod_and_checked() {
    let w = World::new();
    let pod = Netns::new("ttup");
    let res = w.node.add_ok(&w.tern_conf(), "ctr-s", &pod);
    let node_somaxconn = sysctl_in(&w.node.ns, "net/core/somaxconn");
    let keys = json!({ "sysctl": {
        "net.ipv4.conf.IFNAME.arp_filter": "1",
        "net/ipv4/conf/IFNAME/arp_announce": "2",
        "net.core.somaxconn": "1234",
    }});
    let out = w.tuning("ADD", "ctr-s", Some(&pod.path()), "", &w.conf(keys.clone(), Some(&res))).assert_ok().json();
    assert_eq!(out, res, "sysctls alone leave the result as it was");

    assert_eq!(sysctl_in(&pod, "net/ipv4/conf/eth0/arp_filter"), "1");
    assert_eq!(sysctl_in(&pod, "net/ipv4/conf/eth0/arp_announce"), "2");
    assert_eq!(sysctl_in(&pod, "net/core/somaxconn"), "1234");
    // Not in the node: neither its own value nor the host veth's.
    assert_eq!(sysctl_in(&w.node.ns, "net/core/somaxconn"), node_somaxconn);
    assert_ne!(node_somaxconn, "1234");
    let hv = w.node.veths().pop().expect("host veth");
    assert_eq!(sysctl_in(&w.node.ns, &format!("net/ipv4/conf/{hv}/arp_filter")), "0");
    assert_eq!(sysctl_in(&w.node.ns, "net/ipv4/conf/all/arp_filter"), "0");
    // Sysctls only: no backup.
    assert!(!w.backup("ctr-s").exists());

    let check = || w.tuning("CHECK", "ctr-s", Some(&pod.path()), "", &w.conf(keys.clone(), Some(&out)));
    assert_empty_ok(&check());
    pod.ok("echo 0 > /proc/sys/net/ipv4/conf/eth0/arp_filter");
    assert_error_naming(&check(), &["net.ipv4.conf.IFNAME.arp_filter", "net.ipv4.conf.eth0.arp_filter", "\"0\""]);
    pod.ok("echo 1 > /proc/sys/net/ipv4/conf/eth0/arp_filter");
    assert_empty_ok(&check());
    pod.ok("echo 99 > /proc/sys/net/core/somaxconn");
    assert_error_naming(&check(), &["net.core.somaxconn"]);
    pod.ok("echo 1234 > /proc/sys/net/core/somaxconn");
    assert_empty_ok(&check());

    assert_empty_ok(&w.tuning("DEL", "ctr-s", Some(&pod.path()), "", &w.conf(keys, Some(&out))));
    assert_empty_ok(&w.node.del(&with_prev(&w.tern_conf(), &res), "ctr-s", Some(&pod.path())));
    w.node.assert_clean();
}

/// mac, mtu, promisc, allmulti and txQLen are applied (the MAC also in the
/// result), traffic still flows, CHECK names a changed attribute, and DEL
/// puts the originals back and removes the backup.
#[test]
fn attributes_are_applied_and_restored() {
    let w = World::new();
    let pod = Netns::new("ttup");
    let res = w.node.add_ok(&w.tern_conf(), "ctr-a", &pod);
    let before = attrs(&pod, "eth0");
    assert_eq!((before.2, before.3), (false, false));
    let keys = json!({ "mac": "02:AA:bb:cc:dd:0e", "mtu": 1400, "promisc": true, "allmulti": true, "txQLen": 500 });
    let out = w.tuning("ADD", "ctr-a", Some(&pod.path()), "", &w.conf(keys.clone(), Some(&res))).assert_ok().json();

    assert_eq!(attrs(&pod, "eth0"), ("02:aa:bb:cc:dd:0e".to_owned(), 1400, true, true, 500));
    assert_eq!(eth0_mac(&out), "02:aa:bb:cc:dd:0e");
    let mut expect = res.clone();
    for i in expect["interfaces"].as_array_mut().unwrap() {
        if i["name"] == "eth0" {
            i["mac"] = json!("02:aa:bb:cc:dd:0e");
        }
    }
    assert_eq!(out, expect, "only the pod interface's MAC changes in the result");

    // The backup holds the originals in the reference's keys.
    let b: Value = serde_json::from_slice(&std::fs::read(w.backup("ctr-a")).expect("backup written")).unwrap();
    assert_eq!(b["mac"], before.0.as_str(), "{b:#}");
    assert_eq!(b["mtu"], before.1, "{b:#}");
    assert_eq!((&b["promisc"], &b["allmulti"], &b["txQLen"]), (&json!(false), &json!(false), &json!(before.4)));

    // Traffic both ways with the new MAC and MTU.
    let ip = ip_of(&result_addrs(&res)[0]);
    let gw: std::net::IpAddr = res["ips"][0]["gateway"].as_str().unwrap().parse().unwrap();
    assert!(tcp_ok(&w.node.ns, &pod, ip, 7230), "node -> pod");
    assert!(tcp_ok(&pod, &w.node.ns, gw, 7231), "pod -> node");

    let check = || w.tuning("CHECK", "ctr-a", Some(&pod.path()), "", &w.conf(keys.clone(), Some(&out)));
    assert_empty_ok(&check());
    pod.ok("ip link set eth0 mtu 1300");
    assert_error_naming(&check(), &["mtu", "1300", "1400"]);
    pod.ok("ip link set eth0 mtu 1400 && ip link set eth0 allmulticast off");
    assert_error_naming(&check(), &["allmulti"]);
    pod.ok("ip link set eth0 allmulticast on && ip link set eth0 address 02:00:00:00:00:01");
    assert_error_naming(&check(), &["mac", "02:aa:bb:cc:dd:0e"]);
    pod.ok("ip link set eth0 address 02:aa:bb:cc:dd:0e && ip link set eth0 txqueuelen 7");
    assert_error_naming(&check(), &["txQLen"]);
    pod.ok("ip link set eth0 txqueuelen 500 && ip link set eth0 promisc off");
    assert_error_naming(&check(), &["promisc"]);
    pod.ok("ip link set eth0 promisc on");
    assert_empty_ok(&check());

    assert_empty_ok(&w.tuning("DEL", "ctr-a", Some(&pod.path()), "", &w.conf(keys.clone(), Some(&out))));
    assert_eq!(attrs(&pod, "eth0"), before);
    assert!(!w.backup("ctr-a").exists());
    // Idempotent.
    assert_empty_ok(&w.tuning("DEL", "ctr-a", Some(&pod.path()), "", &w.conf(keys, Some(&out))));
    assert_empty_ok(&w.node.del(&with_prev(&w.tern_conf(), &res), "ctr-a", Some(&pod.path())));
    w.node.assert_clean();
}

/// MAC: config < CNI_ARGS MAC < runtimeConfig.mac < args.cni.mac; args.cni.*
/// override the config, args.cni.sysctl key by key.
#[test]
fn mac_sources_and_args_overrides() {
    let w = World::new();
    let pod = Netns::new("ttup");
    let res = w.node.add_ok(&w.tern_conf(), "ctr-m", &pod);
    let orig = attrs(&pod, "eth0");
    let args_mac = "02:00:00:00:0a:01";
    let cases = [
        (json!({ "mac": "02:00:00:00:0c:01" }), "", "02:00:00:00:0c:01"),
        (json!({ "mac": "02:00:00:00:0c:01" }), "MAC=02:00:00:00:0e:01", "02:00:00:00:0e:01"),
        (
            json!({ "mac": "02:00:00:00:0c:01", "runtimeConfig": { "mac": "02:00:00:00:0b:01" } }),
            "MAC=02:00:00:00:0e:01",
            "02:00:00:00:0b:01",
        ),
        (
            json!({ "mac": "02:00:00:00:0c:01", "runtimeConfig": { "mac": "02:00:00:00:0b:01" },
                    "args": { "cni": { "mac": args_mac } } }),
            "MAC=02:00:00:00:0e:01",
            args_mac,
        ),
    ];
    for (keys, cni_args, want) in cases {
        let out =
            w.tuning("ADD", "ctr-m", Some(&pod.path()), cni_args, &w.conf(keys.clone(), Some(&res))).assert_ok().json();
        assert_eq!(attrs(&pod, "eth0").0, want, "{keys} {cni_args}");
        assert_eq!(eth0_mac(&out), want);
        assert_empty_ok(&w.tuning("CHECK", "ctr-m", Some(&pod.path()), cni_args, &w.conf(keys.clone(), Some(&out))));
        assert_empty_ok(&w.tuning("DEL", "ctr-m", Some(&pod.path()), cni_args, &w.conf(keys, Some(&out))));
        assert_eq!(attrs(&pod, "eth0"), orig);
    }

    let keys = json!({
        "mtu": 1300,
        "sysctl": { "net.ipv4.conf.IFNAME.arp_filter": "1", "net.ipv4.conf.IFNAME.arp_ignore": "1" },
        "args": { "cni": { "mtu": 1350, "sysctl": { "net/ipv4/conf/IFNAME/arp_filter": "0", "net.core.somaxconn": "777" } } },
    });
    let out = w.tuning("ADD", "ctr-m", Some(&pod.path()), "", &w.conf(keys.clone(), Some(&res))).assert_ok().json();
    assert_eq!(attrs(&pod, "eth0").1, 1350);
    assert_eq!(sysctl_in(&pod, "net/ipv4/conf/eth0/arp_filter"), "0");
    assert_eq!(sysctl_in(&pod, "net/ipv4/conf/eth0/arp_ignore"), "1");
    assert_eq!(sysctl_in(&pod, "net/core/somaxconn"), "777");
    assert_empty_ok(&w.tuning("CHECK", "ctr-m", Some(&pod.path()), "", &w.conf(keys.clone(), Some(&out))));
    assert_empty_ok(&w.tuning("DEL", "ctr-m", Some(&pod.path()), "", &w.conf(keys, Some(&out))));
    assert_eq!(attrs(&pod, "eth0"), orig);
    assert_empty_ok(&w.node.del(&with_prev(&w.tern_conf(), &res), "ctr-m", Some(&pod.path())));
    w.node.assert_clean();
}

/// Bad configurations fail with code 7 naming the field, and change nothing.
#[test]
fn invalid_configurations_name_the_field() {
    let w = World::new();
    let pod = Netns::new("ttup");
    let res = w.node.add_ok(&w.tern_conf(), "ctr-i", &pod);
    let orig = attrs(&pod, "eth0");
    let add = |conf: &str| w.tuning("ADD", "ctr-i", Some(&pod.path()), "", conf);
    for (keys, field) in [
        (json!({ "sysctl": { "kernel.pid_max": "100000" } }), "sysctl.kernel.pid_max"),
        (json!({ "sysctl": { "net/../kernel/pid_max": "100000" } }), "sysctl.net/../kernel/pid_max"),
        (json!({ "sysctl": { "vm.swappiness": "1" } }), "sysctl.vm.swappiness"),
        (json!({ "sysctl": { "net.core.somaxconn": 100 } }), "sysctl.net.core.somaxconn"),
        (
            json!({ "sysctl": { "net.ipv4.conf.IFNAME.arp_filter": "1", "net/ipv4/conf/eth0/arp_filter": "1" } }),
            "sysctl",
        ),
        (json!({ "args": { "cni": { "sysctl": { "kernel.x": "1" } } } }), "args.cni.sysctl.kernel.x"),
        (json!({ "mac": "02:00:00:00:00" }), "mac"),
        (json!({ "mac": "01:00:5e:00:00:01" }), "mac"),
        (json!({ "runtimeConfig": { "mac": "zz:00:00:00:00:01" } }), "runtimeConfig.mac"),
        (json!({ "mtu": "big" }), "mtu"),
        (json!({ "txQLen": -1 }), "txQLen"),
    ] {
        let run = add(&w.conf(keys.clone(), Some(&res)));
        run.assert_error(7);
        assert_error_naming(&run, &[field]);
    }
    // A key given twice in the JSON text (the decoded config keeps only one).
    let dup = w.conf(json!({}), Some(&res)).replacen(
        '{',
        r#"{"sysctl":{"net.core.somaxconn":"1","net.core.somaxconn":"2"},"#,
        1,
    );
    let run = add(&dup);
    run.assert_error(7);
    assert_error_naming(&run, &["duplicated sysctl key", "net.core.somaxconn"]);
    // Chained only.
    add(&w.conf(json!({ "mtu": 1400 }), None)).assert_error(7);

    assert_eq!(attrs(&pod, "eth0"), orig);
    assert_ne!(sysctl_in(&pod, "net/core/somaxconn"), "1");
    assert!(std::fs::read_dir(w.backups.path()).map(|d| d.count()).unwrap_or(0) == 0, "no backup written");
    assert_empty_ok(&w.node.del(&with_prev(&w.tern_conf(), &res), "ctr-i", Some(&pod.path())));
    w.node.assert_clean();
}

/// A failing ADD puts back the sysctls it wrote and the attributes it changed,
/// and removes its backup.
#[test]
fn failed_add_undoes_sysctls_and_attributes() {
    let w = World::new();
    let pod = Netns::new("ttup");
    let res = w.node.add_ok(&w.tern_conf(), "ctr-u", &pod);
    let orig = attrs(&pod, "eth0");

    let keys =
        json!({ "sysctl": { "net.ipv4.conf.IFNAME.arp_filter": "1", "net.ipv4.conf.IFNAME.no_such_knob": "1" } });
    let run = w.tuning("ADD", "ctr-u", Some(&pod.path()), "", &w.conf(keys, Some(&res)));
    assert_error_naming(&run, &["net.ipv4.conf.IFNAME.no_such_knob"]);
    assert_eq!(sysctl_in(&pod, "net/ipv4/conf/eth0/arp_filter"), "0");

    // The MAC is set, then the kernel refuses the MTU.
    let keys =
        json!({ "sysctl": { "net.ipv4.conf.IFNAME.arp_filter": "1" }, "mac": "02:00:00:00:0d:01", "mtu": 70000 });
    let run = w.tuning("ADD", "ctr-u", Some(&pod.path()), "", &w.conf(keys.clone(), Some(&res)));
    assert_error_naming(&run, &["mtu 70000"]);
    assert_eq!(attrs(&pod, "eth0"), orig);
    assert_eq!(sysctl_in(&pod, "net/ipv4/conf/eth0/arp_filter"), "0");
    assert!(!w.backup("ctr-u").exists());
    // The runtime's DEL after the failed ADD is fine.
    assert_empty_ok(&w.tuning("DEL", "ctr-u", Some(&pod.path()), "", &w.conf(keys, None)));

    // A missing interface is an error, not a silent no-op.
    let run = w.tuning("ADD", "ctr-u", Some(&w.node.ns.path()), "", &w.conf(json!({ "mtu": 1400 }), Some(&res)));
    assert_error_naming(&run, &["eth0", "not found"]);
    assert_empty_ok(&w.node.del(&with_prev(&w.tern_conf(), &res), "ctr-u", Some(&pod.path())));
    w.node.assert_clean();
}

/// DEL needs neither the netns nor prevResult and removes the backup either
/// way; GC removes the backups of this network's unlisted attachments only.
#[test]
fn del_without_netns_and_gc() {
    let w = World::new();
    let pods = [Netns::new("ttup"), Netns::new("ttup"), Netns::new("ttup")];
    let ids = ["ctr-g0", "ctr-g1", "ctr-g2"];
    let mut results = Vec::new();
    for (pod, id) in pods.iter().zip(ids) {
        let res = w.node.add_ok(&w.tern_conf(), id, pod);
        w.tuning("ADD", id, Some(&pod.path()), "", &w.conf(json!({ "mtu": 1400 }), Some(&res))).assert_ok();
        assert!(w.backup(id).exists());
        results.push(res);
    }
    // The reference plugin's backup (no owner) and another network's.
    std::fs::write(w.backups.join("ref-ctr_eth0.json"), r#"{"mtu":1500}"#).unwrap();
    std::fs::write(
        w.backups.join("ctr-x_eth0.json"),
        r#"{"mtu":1500,"network":"other-net","containerID":"ctr-x","ifname":"eth0"}"#,
    )
    .unwrap();

    let gc = |valid: Value| {
        let mut c: Value = serde_json::from_str(&w.conf(json!({}), None)).unwrap();
        c["cni.dev/valid-attachments"] = valid;
        exec_plugin(&w.node.ns, &w.meta, "tern-tuning", "GC", "", None, "", "", &c.to_string())
    };
    assert_empty_ok(&gc(
        json!([{ "containerID": ids[0], "ifname": "eth0" }, { "containerID": ids[2], "ifname": "eth0" }]),
    ));
    let mut left: Vec<String> =
        std::fs::read_dir(w.backups.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    left.sort();
    assert_eq!(left, vec!["ctr-g0_eth0.json", "ctr-g2_eth0.json", "ctr-x_eth0.json", "ref-ctr_eth0.json"]);

    // DEL without CNI_NETNS and without prevResult: nothing to restore, backup gone.
    assert_empty_ok(&w.tuning("DEL", ids[0], None, "", &w.conf(json!({}), None)));
    assert!(!w.backup(ids[0]).exists());
    assert_eq!(attrs(&pods[0], "eth0").1, 1400, "not restored without the netns");
    // DEL after the pod's netns is gone.
    let [p0, p1, p2] = pods;
    let p2_path = p2.path();
    p2.delete_now();
    assert_empty_ok(&w.tuning("DEL", ids[2], Some(&p2_path), "", &w.conf(json!({ "mtu": 1400 }), Some(&results[2]))));
    assert!(!w.backup(ids[2]).exists());

    for (i, pod) in [(0, Some(&p0)), (1, Some(&p1)), (2, None)] {
        let netns = pod.map(|p| p.path());
        assert_empty_ok(&w.node.del(&with_prev(&w.tern_conf(), &results[i]), ids[i], netns.as_deref()));
    }
    w.node.assert_clean();
}

/// After the reference bridge (whose CHECK needs the interface's MAC in
/// prevResult to be the one tuning set).
#[test]
fn works_after_the_reference_bridge() {
    let w = World::new();
    let pod = Netns::new("ttup");
    let bridge_conf = json!({
        "cniVersion": "1.0.0",
        "name": w.node.network,
        "type": "bridge",
        "bridge": w.node.bridge,
        "isGateway": true,
        "ipam": { "type": "host-local", "dataDir": w.node.data.path(), "ranges": [[{ "subnet": "10.24.0.0/24" }]] },
    })
    .to_string();
    let res =
        exec_plugin(&w.node.ns, &w.node.plugins, "bridge", "ADD", "ctr-r", Some(&pod.path()), "eth0", "", &bridge_conf)
            .assert_ok()
            .json();
    let orig = attrs(&pod, "eth0");
    let keys = json!({ "mac": "02:00:00:00:0f:01", "sysctl": { "net.ipv4.conf.IFNAME.arp_filter": "1" } });
    let out = w.tuning("ADD", "ctr-r", Some(&pod.path()), "", &w.conf(keys.clone(), Some(&res))).assert_ok().json();
    assert_eq!(eth0_mac(&out), "02:00:00:00:0f:01");
    assert_eq!(sysctl_in(&pod, "net/ipv4/conf/eth0/arp_filter"), "1");
    assert_empty_ok(&w.tuning("CHECK", "ctr-r", Some(&pod.path()), "", &w.conf(keys.clone(), Some(&out))));
    // The reference bridge agrees with the result tuning passed on.
    let check = exec_plugin(
        &w.node.ns,
        &w.node.plugins,
        "bridge",
        "CHECK",
        "ctr-r",
        Some(&pod.path()),
        "eth0",
        "",
        &with_prev(&bridge_conf, &out),
    );
    assert_empty_ok(&check);
    let ip = ip_of(&result_addrs(&res)[0]);
    assert!(tcp_ok(&w.node.ns, &pod, ip, 7232), "node -> pod");

    assert_empty_ok(&w.tuning("DEL", "ctr-r", Some(&pod.path()), "", &w.conf(keys, Some(&out))));
    assert_eq!(attrs(&pod, "eth0"), orig);
    exec_plugin(
        &w.node.ns,
        &w.node.plugins,
        "bridge",
        "DEL",
        "ctr-r",
        Some(&pod.path()),
        "eth0",
        "",
        &with_prev(&bridge_conf, &res),
    )
    .assert_ok();
    assert!(veth_links(&w.node.ns, "").is_empty());
}
