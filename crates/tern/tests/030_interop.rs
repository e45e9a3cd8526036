//! Interoperability with the reference plugins (Debian containernetworking-plugins v1.1.1):
//! the reference `bridge` delegating to `tern-ipam`, `tern` delegating to the reference
//! `host-local`, and both IPAM plugins sharing one dataDir.
//!
//! Privileged: run as root. Every test builds its own node and pod namespaces.

use std::collections::{BTreeSet, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use serde_json::{json, Value};
use tern_testkit::*;

const IFNAME: &str = "eth0";
const PORT: u16 = 7030;

fn plugins() -> Plugins {
    Plugins::new(Path::new(env!("CARGO_BIN_EXE_tern")))
}

/// The (v4, v6) pair of a dual-stack result.
fn dual(run: &PluginRun) -> (IpAddr, IpAddr) {
    let ips = run.ips();
    assert_eq!(ips.len(), 2, "expected one address per family:\n{run}");
    let v4 = *ips.iter().find(|i| i.is_ipv4()).unwrap_or_else(|| panic!("no IPv4 address:\n{run}"));
    let v6 = *ips.iter().find(|i| i.is_ipv6()).unwrap_or_else(|| panic!("no IPv6 address:\n{run}"));
    (v4, v6)
}

/// Addresses (without prefix) on `ifname` in `ns`.
fn addrs_on(ns: &Netns, ifname: &str) -> Vec<IpAddr> {
    ns.addrs(ifname).iter().map(|a| a.split('/').next().unwrap().parse().unwrap()).collect()
}

/// Asserts the reservation files of `network` are exactly `expected` (address -> owner) and hold
/// the reference format `<id>\r\n<ifname>`, no trailing newline.
fn assert_reservations(data_dir: &Path, network: &str, expected: &[(IpAddr, String)]) {
    let mut want: Vec<String> = expected.iter().map(|(ip, _)| ip.to_string()).collect();
    want.sort();
    assert_eq!(reservations(data_dir, network), want, "reservation files of {network}");
    for (ip, owner) in expected {
        let path = data_dir.join(network).join(ip.to_string());
        let content = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        assert_eq!(
            String::from_utf8_lossy(&content),
            format!("{owner}\r\n{IFNAME}"),
            "content of {} (reference format: <id>\\r\\n<ifname>)",
            path.display()
        );
    }
}

/// Two pods on one network: ADD both, check addresses, reservations and TCP both ways over both
/// families, then DEL both and check that the reservations, the host veths and the pod interfaces
/// are gone.
fn two_pods_round_trip(plugins: &Plugins, main_plugin: &str, conf: &str, data_dir: &Path, network: &str) {
    let node = Netns::new("ia-node");
    let pods = [Netns::new("ia-pod"), Netns::new("ia-pod")];
    let ids = [unique("ia-ctr"), unique("ia-ctr")];

    let mut got = Vec::new();
    let mut adds = Vec::new();
    for (pod, id) in pods.iter().zip(&ids) {
        let run = exec_plugin(&node, plugins, main_plugin, "ADD", id, Some(&pod.path()), IFNAME, "", conf);
        run.assert_ok();
        let (v4, v6) = dual(&run);
        let on_eth0 = addrs_on(pod, IFNAME);
        assert!(on_eth0.contains(&v4) && on_eth0.contains(&v6), "{v4} and {v6} not on {IFNAME}: {on_eth0:?}");
        got.push((v4, v6));
        adds.push(run);
    }
    assert_ne!(got[0].0, got[1].0, "same IPv4 address twice");
    assert_ne!(got[0].1, got[1].1, "same IPv6 address twice");
    let expected: Vec<(IpAddr, String)> =
        got.iter().zip(&ids).flat_map(|(&(a, b), id)| [(a, id.clone()), (b, id.clone())]).collect();
    assert_reservations(data_dir, network, &expected);
    assert_eq!(veth_links(&node, "").len(), 2, "host veths: {:?}", veth_links(&node, ""));

    // CHECK (0.4.0 and up) with the ADD result as prevResult passes through the delegate too.
    let version = serde_json::from_str::<Value>(conf).unwrap()["cniVersion"].as_str().unwrap().to_string();
    if !version.starts_with("0.3") {
        for ((pod, id), run) in pods.iter().zip(&ids).zip(&adds) {
            let mut with_prev: Value = serde_json::from_str(conf).unwrap();
            with_prev["prevResult"] = run.json();
            let check = exec_plugin(
                &node,
                plugins,
                main_plugin,
                "CHECK",
                id,
                Some(&pod.path()),
                IFNAME,
                "",
                &with_prev.to_string(),
            );
            check.assert_ok();
        }
    }

    for (c, s) in [(0, 1), (1, 0)] {
        assert!(tcp_ok(&pods[c], &pods[s], got[s].0, PORT), "TCP pod{c} -> pod{s} over IPv4 ({})", got[s].0);
        assert!(tcp_ok(&pods[c], &pods[s], got[s].1, PORT), "TCP pod{c} -> pod{s} over IPv6 ({})", got[s].1);
    }

    for (pod, id) in pods.iter().zip(&ids) {
        exec_plugin(&node, plugins, main_plugin, "DEL", id, Some(&pod.path()), IFNAME, "", conf).assert_ok();
        assert!(!pod.links().iter().any(|l| l == IFNAME), "{IFNAME} left in {}", pod.name());
    }
    assert_eq!(reservations(data_dir, network), Vec::<String>::new(), "DEL left reservations");
    assert_eq!(veth_links(&node, ""), Vec::<String>::new(), "DEL left host veths");

    // A second DEL is still a success and changes nothing.
    exec_plugin(&node, plugins, main_plugin, "DEL", &ids[0], Some(&pods[0].path()), IFNAME, "", conf).assert_ok();
}

fn reference_bridge_with_tern_ipam_at(version: &str) {
    let plugins = plugins();
    let data = TempDir::new();
    let network = unique("ia-refbr");
    let bridge = unique_short("iarb");
    let conf = json!({
        "cniVersion": version,
        "name": network,
        "type": "bridge",
        "bridge": bridge,
        "isGateway": true,
        "ipam": {
            "type": "tern-ipam",
            "dataDir": data.path(),
            "ranges": [[{"subnet": "10.230.0.0/24"}], [{"subnet": "fd00:230::/64"}]],
        },
    })
    .to_string();
    two_pods_round_trip(&plugins, "bridge", &conf, data.path(), &network);
}

/// The reference bridge (v1.1.1) delegating to tern-ipam through CNI_PATH.
#[test]
fn reference_bridge_with_tern_ipam() {
    reference_bridge_with_tern_ipam_at("1.0.0");
}

/// The same with older configs: tern-ipam's result converts to what the reference expects.
#[test]
fn reference_bridge_with_tern_ipam_older_versions() {
    for version in ["0.3.1", "0.4.0"] {
        reference_bridge_with_tern_ipam_at(version);
    }
}

/// tern delegating to the reference host-local. A logging wrapper named `host-local` first on
/// CNI_PATH proves the reference binary really ran (tern-ipam would run in-process).
#[test]
fn tern_with_reference_host_local() {
    tern_with_reference_host_local_at("1.0.0");
}

/// The same with older configs: tern reads host-local's older result formats.
#[test]
fn tern_with_reference_host_local_older_versions() {
    for version in ["0.3.1", "0.4.0"] {
        tern_with_reference_host_local_at(version);
    }
}

fn tern_with_reference_host_local_at(version: &str) {
    let plugins = plugins();
    let data = TempDir::new();
    let log = data.join("host-local.log");
    let wrapper = plugins.dir.join("host-local");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$CNI_COMMAND $CNI_CONTAINERID\" >> '{}'\nexec {REFERENCE_CNI_DIR}/host-local \"$@\"\n",
            log.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();

    let network = unique("ia-ternhl");
    let bridge = unique_short("iath");
    let conf = json!({
        "cniVersion": version,
        "name": network,
        "type": "tern",
        "bridge": bridge,
        "isGateway": true,
        "ipam": {
            "type": "host-local",
            "dataDir": data.path(),
            "ranges": [[{"subnet": "10.231.0.0/24"}], [{"subnet": "fd00:231::/64"}]],
        },
    })
    .to_string();
    two_pods_round_trip(&plugins, "tern", &conf, data.path(), &network);

    let calls = std::fs::read_to_string(&log).unwrap_or_default();
    let verbs: Vec<&str> = calls.lines().filter_map(|l| l.split_whitespace().next()).collect();
    let want: &[&str] = if version.starts_with("0.3") {
        &["ADD", "ADD", "DEL", "DEL", "DEL"]
    } else {
        &["ADD", "ADD", "CHECK", "CHECK", "DEL", "DEL", "DEL"]
    };
    assert_eq!(verbs, want, "host-local invocations:\n{calls}");
}

/// The two IPAM plugins, run directly (as IPAM plugins, not through a main plugin).
const IPAMS: [&str; 2] = ["tern-ipam", "host-local"];

/// Size of each family's range in the shared-dataDir test: a little more than the 40 pods, so
/// the second round wraps around into released addresses.
const RANGE_SIZE: u32 = 44;
const V4_START: Ipv4Addr = Ipv4Addr::new(10, 232, 0, 10);
const V6_START: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x232, 0, 0, 0, 0, 0, 0x10);

fn v4_at(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(u32::from(V4_START) + i))
}

fn v6_at(i: u32) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(u128::from(V6_START) + i as u128))
}

/// One network config for `ipam` (only `ipam.type` and `type` differ between the two).
fn shared_conf(ipam: &str, network: &str, data_dir: &Path) -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": network,
        "type": ipam,
        "ipam": {
            "type": ipam,
            "dataDir": data_dir,
            "ranges": [
                [{"subnet": "10.232.0.0/24", "rangeStart": v4_at(0).to_string(), "rangeEnd": v4_at(RANGE_SIZE - 1).to_string()}],
                [{"subnet": "fd00:232::/64", "rangeStart": v6_at(0).to_string(), "rangeEnd": v6_at(RANGE_SIZE - 1).to_string()}],
            ],
        },
    })
    .to_string()
}

struct Shared<'a> {
    node: &'a Netns,
    plugins: &'a Plugins,
    /// What IPAM plugins get as CNI_NETNS (they do not open it; ADD requires one).
    dummy_netns: &'a Path,
    confs: [String; 2],
}

impl Shared<'_> {
    fn run(&self, which: usize, cmd: &str, id: &str) -> PluginRun {
        exec_plugin(
            self.node,
            self.plugins,
            IPAMS[which],
            cmd,
            id,
            Some(self.dummy_netns),
            IFNAME,
            "",
            &self.confs[which],
        )
    }

    fn add(&self, which: usize, id: &str) -> (IpAddr, IpAddr) {
        let run = self.run(which, "ADD", id);
        if run.code != 0 {
            panic!("{} ADD {id} failed:\n{run}", IPAMS[which]);
        }
        // host-local results carry no interface index; neither should tern-ipam's.
        let v: Value = run.json();
        assert!(v["ips"].as_array().unwrap().iter().all(|ip| ip.get("interface").is_none()), "{run}");
        dual(&run)
    }

    fn del(&self, which: usize, id: &str) {
        let run = self.run(which, "DEL", id);
        if run.code != 0 {
            panic!("{} DEL {id} failed:\n{run}", IPAMS[which]);
        }
    }
}

fn assert_distinct(held: &[(String, IpAddr, IpAddr)]) {
    let v4: HashSet<IpAddr> = held.iter().map(|h| h.1).collect();
    let v6: HashSet<IpAddr> = held.iter().map(|h| h.2).collect();
    assert_eq!(v4.len(), held.len(), "an IPv4 address was handed out twice: {held:?}");
    assert_eq!(v6.len(), held.len(), "an IPv6 address was handed out twice: {held:?}");
}

fn expected_files(held: &[(String, IpAddr, IpAddr)]) -> Vec<(IpAddr, String)> {
    held.iter().flat_map(|(id, a, b)| [(*a, id.clone()), (*b, id.clone())]).collect()
}

/// tern-ipam and the reference host-local take turns on one dataDir and network: allocations
/// continue each other's round-robin, releases work across plugins, and no address is given out
/// twice.
#[test]
fn tern_ipam_and_host_local_share_a_data_dir() {
    let plugins = plugins();
    let node = Netns::new("ia-share");
    let data = TempDir::new();
    let network = unique("ia-shared");
    let dummy = node.path();
    let s = Shared {
        node: &node,
        plugins: &plugins,
        dummy_netns: &dummy,
        confs: [shared_conf(IPAMS[0], &network, data.path()), shared_conf(IPAMS[1], &network, data.path())],
    };

    // Round 1: 40 pods, alternating allocator. Both follow the shared last_reserved_ip pointer,
    // so the addresses are consecutive from rangeStart.
    let mut held: Vec<(String, IpAddr, IpAddr)> = Vec::new();
    for i in 0..40u32 {
        let id = format!("{network}-a{i}");
        let (v4, v6) = s.add(i as usize % 2, &id);
        assert_eq!((v4, v6), (v4_at(i), v6_at(i)), "pod {i} (allocated by {})", IPAMS[i as usize % 2]);
        held.push((id, v4, v6));
    }
    assert_distinct(&held);
    assert_reservations(data.path(), &network, &expected_files(&held));

    // Release half (two of every four, so each plugin's allocations are among them), each with
    // the plugin that did not allocate it.
    let mut freed_v4 = BTreeSet::new();
    let mut freed_v6 = BTreeSet::new();
    let mut kept = Vec::new();
    for (i, h) in held.into_iter().enumerate() {
        if i % 4 < 2 {
            s.del(1 - i % 2, &h.0);
            freed_v4.insert(h.1);
            freed_v6.insert(h.2);
        } else {
            kept.push(h);
        }
    }
    assert_eq!(kept.len(), 20);
    assert_reservations(data.path(), &network, &expected_files(&kept));

    // Round 2: 20 more. Round-robin goes on to the end of the range, then wraps into the freed
    // addresses, skipping those still held.
    let fresh = 40..RANGE_SIZE;
    let mut want_v4: Vec<IpAddr> = fresh.clone().map(v4_at).collect();
    want_v4.extend(freed_v4.iter().take(20 - want_v4.len()));
    let mut want_v6: Vec<IpAddr> = fresh.map(v6_at).collect();
    want_v6.extend(freed_v6.iter().take(20 - want_v6.len()));
    let mut held = kept;
    for i in 0..20usize {
        let id = format!("{network}-b{i}");
        let (v4, v6) = s.add(i % 2, &id);
        assert_eq!((v4, v6), (want_v4[i], want_v6[i]), "round 2 pod {i} (allocated by {})", IPAMS[i % 2]);
        held.push((id, v4, v6));
    }
    assert_eq!(held.len(), 40);
    assert_distinct(&held);
    assert_reservations(data.path(), &network, &expected_files(&held));

    // Release everything, alternating plugin; a repeated DEL is fine with both.
    for (i, h) in held.iter().enumerate() {
        s.del(i % 2, &h.0);
    }
    s.del(0, &held[0].0);
    s.del(1, &held[1].0);
    assert_eq!(reservations(data.path(), &network), Vec::<String>::new(), "reservations left");
    // Only the lock and the round-robin pointers remain, as with host-local alone.
    let mut left: Vec<String> = std::fs::read_dir(data.join(&network))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["last_reserved_ip.0", "last_reserved_ip.1", "lock"]);
}

/// Both IPAM plugins allocating at the same time on one dataDir (they share the flock on
/// `lock`): no duplicates, and concurrent releases by the other plugin leave nothing.
#[test]
fn tern_ipam_and_host_local_concurrently() {
    const N: usize = 32;
    let plugins = plugins();
    let node = Netns::new("ia-conc");
    let data = TempDir::new();
    let network = unique("ia-conc");
    let dummy = node.path();
    let s = Shared {
        node: &node,
        plugins: &plugins,
        dummy_netns: &dummy,
        confs: [shared_conf(IPAMS[0], &network, data.path()), shared_conf(IPAMS[1], &network, data.path())],
    };
    let ids: Vec<String> = (0..N).map(|i| format!("{network}-c{i}")).collect();

    let held: Vec<(String, IpAddr, IpAddr)> = std::thread::scope(|scope| {
        let handles: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let s = &s;
                scope.spawn(move || {
                    let (a, b) = s.add(i % 2, id);
                    (id.clone(), a, b)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("ADD thread")).collect()
    });
    assert_distinct(&held);
    for (_, a, b) in &held {
        assert!((0..RANGE_SIZE).map(v4_at).any(|x| x == *a), "{a} outside the range");
        assert!((0..RANGE_SIZE).map(v6_at).any(|x| x == *b), "{b} outside the range");
    }
    assert_reservations(data.path(), &network, &expected_files(&held));

    std::thread::scope(|scope| {
        for (i, id) in ids.iter().enumerate() {
            let s = &s;
            scope.spawn(move || s.del(1 - i % 2, id));
        }
    });
    assert_eq!(reservations(data.path(), &network), Vec::<String>::new(), "reservations left");
}
