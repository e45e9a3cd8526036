//! `tern lab`: virtual clusters of namespaces with real etcd, real agents
//! and pods attached by `tern cni`, in every routing mode and both
//! dataplanes (kernel forwarding, eBPF host routing); nodes joining and
//! leaving; a TCP stream across agent restarts; nothing left behind.
//!
//! Each test runs its own lab under a unique `--name`, so tests run side by
//! side and never touch a user's lab. A guard runs `tern lab down` on drop
//! and on panic.
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_sys::NetNs;
use tern_testkit::*;

fn tern_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tern"))
}

struct Lab {
    name: String,
}

impl Lab {
    fn new() -> Lab {
        require_root();
        // Short: every namespace and file name of the lab derives from it.
        let name = unique_short("tl");
        Lab { name }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(tern_bin());
        c.args(["lab", "--name", &self.name]).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).stdin(Stdio::null()).output().expect("run tern lab")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "tern lab {} failed ({}):\n{}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn up(&self, nodes: u8, routing: &str, subnets: u8, pods: u8) {
        self.up_with(nodes, routing, subnets, pods, "kernel")
    }

    fn up_with(&self, nodes: u8, routing: &str, subnets: u8, pods: u8, dataplane: &str) {
        self.ok(&[
            "up",
            "--dataplane",
            dataplane,
            "--nodes",
            &nodes.to_string(),
            "--routing",
            routing,
            "--subnets",
            &subnets.to_string(),
            "--pods-per-node",
            &pods.to_string(),
        ]);
    }

    fn status(&self) -> Value {
        serde_json::from_str(&self.ok(&["status", "--json"])).expect("status json")
    }

    fn matrix(&self) -> Value {
        let out = self.run(&["test", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "lab test output: {e}\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let failed: Vec<&Value> = v["cells"].as_array().unwrap().iter().filter(|c| c["ok"] != true).collect();
        assert!(failed.is_empty() && out.status.success(), "failed cells: {failed:#?}");
        v
    }

    fn netns(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.name)
    }

    /// `cmd` inside the lab namespace `<name>-<suffix>`; stdout.
    fn sh(&self, suffix: &str, cmd: &str) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.netns(suffix), "sh", "-c", cmd]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The pod's addresses, IPv4 first.
    fn pod_ips(&self, pod: &str) -> Vec<IpAddr> {
        let st = self.status();
        let p = st["pods"].as_array().unwrap().iter().find(|p| p["name"] == pod).unwrap_or_else(|| panic!("pod {pod}"));
        p["ips"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().parse().unwrap()).collect()
    }

    fn pod_ip(&self, pod: &str) -> IpAddr {
        self.pod_ips(pod)[0]
    }

    /// The pod's IPv6 address (dual-stack labs).
    fn pod_ip6(&self, pod: &str) -> IpAddr {
        self.pod_ips(pod).into_iter().find(|i| i.is_ipv6()).unwrap_or_else(|| panic!("pod {pod} has no IPv6 address"))
    }

    fn namespaces(&self) -> Vec<String> {
        std::fs::read_dir("/run/netns")
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n == &self.name || n.starts_with(&format!("{}-", self.name)))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Pids the lab recorded (etcd and agents).
    fn pids(&self) -> Vec<u32> {
        let st = self.status();
        let mut v: Vec<u32> = st["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["agent"]["pid"].as_u64())
            .map(|p| p as u32)
            .collect();
        v.extend(st["etcd"]["pid"].as_u64().map(|p| p as u32));
        v
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

/// A TCP connect from lab namespace `from` to `to:port`.
fn connects(from: &str, to: IpAddr, port: u16) -> bool {
    let ns = NetNs::open(format!("/run/netns/{from}")).unwrap();
    ns.enter(|| TcpStream::connect_timeout(&SocketAddr::new(to, port), Duration::from_millis(300)).is_ok()).unwrap()
}

fn listen_in(netns: &str, port: u16) -> TcpListener {
    let ns = NetNs::open(format!("/run/netns/{netns}")).unwrap();
    // [::] with IPV6_V6ONLY off: IPv4 and IPv6 clients.
    ns.enter(|| TcpListener::bind(SocketAddr::new(IpAddr::from([0u16; 8]), port))).unwrap().unwrap()
}

fn assert_gone(lab: &Lab, pids: &[u32]) {
    assert!(lab.namespaces().is_empty(), "namespaces left: {:?}", lab.namespaces());
    for p in pids {
        assert!(!alive(*p), "process {p} of the lab still runs");
    }
    assert!(!Path::new("/run/tern/labs").join(&lab.name).exists(), "lab files left");
}

#[test]
fn vxlan_lab_passes_the_matrix_and_down_leaves_nothing() {
    let lab = Lab::new();
    lab.up(3, "vxlan", 1, 2);
    let m = lab.matrix();
    assert_eq!(m["failed"], 0);
    // 6 pods and 3 nodes to 6 pods, 3 nodes and the external host.
    assert_eq!(m["passed"], 9 * 10 - 9);
    let routes = lab.sh("n1", "ip route show proto 84");
    assert_eq!(routes.lines().filter(|l| l.contains("dev tern.vxlan")).count(), 2, "{routes}");
    let pids = lab.pids();
    lab.ok(&["down"]);
    assert_gone(&lab, &pids);
}

#[test]
fn direct_lab_passes_the_matrix() {
    let lab = Lab::new();
    lab.up(3, "direct", 1, 2);
    lab.matrix();
    let routes = lab.sh("n1", "ip route show proto 84");
    assert!(routes.lines().count() == 2 && routes.lines().all(|l| l.contains("dev eth0")), "{routes}");
    assert!(
        lab.sh("n1", "ip -o link show").lines().all(|l| !l.contains("tern.vxlan")),
        "no VXLAN device in direct mode"
    );
}

#[test]
fn auto_two_subnets_direct_inside_vxlan_across_and_nodes_join_and_leave() {
    let lab = Lab::new();
    lab.up(3, "auto", 2, 1);
    lab.matrix();
    // n1 and n2 share subnet 1, n3 is behind the router.
    let routes = lab.sh("n1", "ip route show proto 84");
    assert!(routes.lines().any(|l| l.contains("via 10.10.1.12 dev eth0")), "{routes}");
    assert!(routes.lines().any(|l| l.contains("dev tern.vxlan") && l.contains("onlink")), "{routes}");
    let fdb = lab.sh("n1", "bridge fdb show dev tern.vxlan");
    assert!(fdb.contains("dst 10.10.2.13") && !fdb.contains("10.10.1.12"), "{fdb}");

    // A fourth node (subnet 2): its pod is reachable from every pod within a second.
    let p1: Vec<String> = ["n1-p1", "n2-p1", "n3-p1"].iter().map(|p| lab.netns(p)).collect();
    lab.ok(&["node", "add", "--pods", "1"]);
    let target = lab.pod_ip("n4-p1");
    let _server = listen_in(&lab.netns("n4-p1"), 18080);
    let t0 = Instant::now();
    let reached = wait_until(Duration::from_secs(1), || p1.iter().all(|ns| connects(ns, target, 18080)));
    assert!(reached, "n4-p1 not reachable from every node's pods within 1 s ({:?})", t0.elapsed());
    eprintln!("n4-p1 reachable from every node's pods {:?} after `node add` returned", t0.elapsed());
    lab.matrix();

    // Removing it removes its routes, neighbours and FDB entries everywhere.
    lab.ok(&["node", "remove", "n4"]);
    let t0 = Instant::now();
    let clean = wait_until(Duration::from_secs(1), || {
        ["n1", "n2", "n3"].iter().all(|n| {
            let all = lab.sh(n, "ip route show proto 84; ip neigh show dev tern.vxlan; bridge fdb show dev tern.vxlan");
            !all.contains("10.10.2.14")
        })
    });
    assert!(clean, "n4's entries left behind");
    eprintln!(
        "n4's routes, neighbours and FDB entries gone everywhere {:?} after `node remove` returned",
        t0.elapsed()
    );
    assert!(!lab.namespaces().iter().any(|n| n.ends_with("-n4") || n.contains("-n4-")));
    lab.matrix();
}

#[test]
fn tcp_stream_across_nodes_survives_restarting_both_agents() {
    stream_survives_restarting_agents("vxlan", "kernel");
}

#[test]
fn tcp_stream_on_ebpf_host_routing_survives_restarting_both_agents() {
    // The restarted agents re-attach their uplink programs (replaced in
    // place): the stream must not notice.
    stream_survives_restarting_agents("direct", "ebpf");
}

fn stream_survives_restarting_agents(routing: &str, dataplane: &str) {
    let lab = Lab::new();
    lab.up_with(2, routing, 1, 1, dataplane);
    let server = listen_in(&lab.netns("n2-p1"), 18081);
    let dst = lab.pod_ip("n2-p1");
    let stop = Arc::new(AtomicBool::new(false));
    // Receiver: the largest gap between two arrivals.
    let rx = std::thread::spawn(move || {
        let (mut conn, _) = server.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 8];
        let mut last = Instant::now();
        let mut max_gap = Duration::ZERO;
        let mut n = 0u64;
        loop {
            match conn.read_exact(&mut buf) {
                Ok(()) => {
                    let now = Instant::now();
                    if n > 0 {
                        max_gap = max_gap.max(now - last);
                    }
                    last = now;
                    n += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok((n, max_gap)),
                Err(e) => return Err(format!("after {n} messages: {e}")),
            }
        }
    });
    let ns = NetNs::open(format!("/run/netns/{}", lab.netns("n1-p1"))).unwrap();
    let mut client =
        ns.enter(|| TcpStream::connect_timeout(&SocketAddr::new(dst, 18081), Duration::from_secs(2))).unwrap().unwrap();
    client.set_nodelay(true).unwrap();
    let tx = {
        let stop = stop.clone();
        std::thread::spawn(move || -> Result<u64, String> {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                client.write_all(&i.to_be_bytes()).map_err(|e| format!("send {i}: {e}"))?;
                i += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(i)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    lab.ok(&["restart-agents"]);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let sent = tx.join().unwrap().expect("no reset on the sender");
    let (got, max_gap) = rx.join().unwrap().expect("no reset on the receiver");
    assert_eq!(got, sent, "every message arrived");
    eprintln!("stream ({routing}, {dataplane}): {got} messages, largest gap {max_gap:?} across the agents' restart");
    assert!(max_gap < Duration::from_millis(100), "largest gap {max_gap:?}");
}

/// A lab node's eBPF host-routing uplinks: device name → pod packets sent
/// out of it by the fast path.
fn uplink_counters(lab: &Lab, node: &str) -> std::collections::BTreeMap<String, u64> {
    let ns = NetNs::open(format!("/run/netns/{}", lab.netns(node))).unwrap();
    ns.enter(|| {
        let nl = tern_sys::Netlink::new().unwrap();
        let fp = tern_bpf::FastPath::open_existing().unwrap().expect("a fast-path instance on the node");
        fp.uplinks()
            .unwrap()
            .into_iter()
            .map(|(i, n)| (nl.link_by_index(i).unwrap().map_or(format!("#{i}"), |l| l.name), n))
            .collect()
    })
    .unwrap()
}

/// Packets delivered into the pod with this address by the fast path.
fn redirected_into(lab: &Lab, node: &str, pod_ip: IpAddr) -> u64 {
    let ns = NetNs::open(format!("/run/netns/{}", lab.netns(node))).unwrap();
    ns.enter(|| tern_bpf::FastPath::open_existing().unwrap().unwrap().endpoint(pod_ip).unwrap().unwrap().redirected)
        .unwrap()
}

/// 50 request/response round trips over one TCP connection from pod
/// namespace `from` to `to_ip` (a listener in namespace `to`).
fn exchange(lab: &Lab, from: &str, to: &str, to_ip: IpAddr, port: u16) {
    let server = listen_in(&lab.netns(to), port);
    let echo = std::thread::spawn(move || {
        let (mut c, _) = server.accept().unwrap();
        let mut buf = [0u8; 8];
        while c.read_exact(&mut buf).is_ok() {
            c.write_all(&buf).unwrap();
        }
    });
    let ns = NetNs::open(format!("/run/netns/{}", lab.netns(from))).unwrap();
    let mut c = ns
        .enter(|| TcpStream::connect_timeout(&SocketAddr::new(to_ip, port), Duration::from_secs(2)))
        .unwrap()
        .unwrap();
    let mut buf = [0u8; 8];
    for i in 0u64..50 {
        c.write_all(&i.to_be_bytes()).unwrap();
        c.read_exact(&mut buf).unwrap();
        assert_eq!(u64::from_be_bytes(buf), i);
    }
    drop(c);
    echo.join().unwrap();
}

/// Counts the pods' packets (either family) that the node forwards.
const FORWARD_PROBE: &str = "table inet tern_test_probe {
  chain probe {
    type filter hook forward priority -300; policy accept;
    ip saddr 10.244.0.0/16 ip daddr 10.244.0.0/16 counter
    ip6 saddr fd00:10:244::/56 ip6 daddr fd00:10:244::/56 counter
  }
}";

fn forwarded_pod_packets(lab: &Lab, node: &str) -> u64 {
    let out = lab.sh(node, "nft list table inet tern_test_probe");
    let words: Vec<&str> = out.split_whitespace().collect();
    let counts: Vec<u64> =
        words.windows(2).filter(|w| w[0] == "packets").map(|w| w[1].parse().expect("a packet count")).collect();
    assert_eq!(counts.len(), 2, "the probe's two counters on {node}: {out}");
    counts.iter().sum()
}

#[test]
fn ebpf_host_routing_carries_pod_traffic_between_nodes_past_the_nodes_forwarding() {
    let lab = Lab::new();
    lab.up_with(3, "auto", 2, 2, "ebpf");
    // One uplink filter per uplink: eth0 everywhere, tern.vxlan where
    // VXLAN is used (every node in auto mode with two subnets).
    let filters = |node: &str| {
        ["eth0", "tern.vxlan"].map(|dev| {
            lab.sh(node, &format!("tc filter show dev {dev} ingress"))
                .lines()
                .filter(|l| l.contains("tern_uplink"))
                .count()
        })
    };
    for n in ["n1", "n2", "n3"] {
        assert_eq!(filters(n), [1, 1], "uplink filters on {n}");
    }
    lab.matrix();
    // n1 reaches n2's pods directly (eth0) and n3's through VXLAN; n3
    // reaches both through VXLAN. Traffic to nodes and to the external
    // host is never host-routed: n3's eth0 stays at 0.
    let (n1, n3) = (uplink_counters(&lab, "n1"), uplink_counters(&lab, "n3"));
    assert!(n1["eth0"] > 0 && n1["tern.vxlan"] > 0, "n1 uplinks {n1:?}");
    assert!(n3["tern.vxlan"] > 0 && n3["eth0"] == 0, "n3 uplinks {n3:?}");

    // With the next hops resolved (by the matrix), pod traffic between
    // nodes crosses no node's forward hook, direct or through VXLAN.
    for n in ["n1", "n2", "n3"] {
        lab.sh(n, &format!("nft -f - <<'EOF'\n{FORWARD_PROBE}\nEOF"));
        assert_eq!(forwarded_pod_packets(&lab, n), 0);
    }
    let (to_n2, to_n3) = (lab.pod_ip("n2-p1"), lab.pod_ip("n3-p1"));
    let before = (redirected_into(&lab, "n2", to_n2), redirected_into(&lab, "n3", to_n3));
    exchange(&lab, "n1-p1", "n2-p1", to_n2, 18091);
    exchange(&lab, "n1-p1", "n3-p1", to_n3, 18092);
    for n in ["n1", "n2", "n3"] {
        assert_eq!(forwarded_pod_packets(&lab, n), 0, "pod packets through {n}'s forwarding");
    }
    let after = (redirected_into(&lab, "n2", to_n2), redirected_into(&lab, "n3", to_n3));
    assert!(
        after.0 >= before.0 + 50 && after.1 >= before.1 + 50,
        "delivered by the uplink program: {before:?} → {after:?}"
    );

    // Restarted agents replace their filters in place.
    lab.ok(&["restart-agents"]);
    for n in ["n1", "n2", "n3"] {
        assert_eq!(filters(n), [1, 1], "uplink filters on {n} after a restart");
    }
    lab.matrix();

    // Down removes the nodes' pinned instances with their namespaces.
    let pins: Vec<std::path::PathBuf> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| {
            let ns = NetNs::open(format!("/run/netns/{}", lab.netns(n))).unwrap();
            ns.enter(tern_bpf::current_pin_dir).unwrap().unwrap()
        })
        .collect();
    assert!(pins.iter().all(|p| p.exists()), "{pins:?}");
    let pids = lab.pids();
    lab.ok(&["down"]);
    assert_gone(&lab, &pids);
    assert!(pins.iter().all(|p| !p.exists()), "pins left: {pins:?}");
}

/// The IPv6 cells of a matrix, by kind.
fn ipv6_cells(m: &Value) -> std::collections::BTreeMap<String, usize> {
    let mut by = std::collections::BTreeMap::new();
    for c in m["cells"].as_array().unwrap() {
        let kind = c["kind"].as_str().unwrap();
        if kind.ends_with("6") {
            *by.entry(kind.to_string()).or_default() += 1;
        }
    }
    by
}

#[test]
fn dual_stack_lab_carries_ipv6_between_nodes_on_both_dataplanes() {
    // The lab's underlay is IPv4: IPv6 needs VXLAN, and says so.
    let lab = Lab::new();
    let out = lab.run(&["up", "--nodes", "2", "--routing", "direct", "--ipv6"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--routing vxlan"), "{out:?}");

    for dataplane in ["kernel", "ebpf"] {
        lab.ok(&[
            "up",
            "--nodes",
            "2",
            "--routing",
            "vxlan",
            "--pods-per-node",
            "2",
            "--ipv6",
            "--dataplane",
            dataplane,
        ]);
        let m = lab.matrix();
        // 4 pods: each reaches the 3 others over IPv6 too.
        let six = ipv6_cells(&m);
        assert_eq!(
            (six.get("pod-pod-same-node6"), six.get("pod-pod-cross-node6")),
            (Some(&4), Some(&8)),
            "{dataplane}: {six:?}"
        );
        let to = lab.pod_ip6("n2-p1");
        assert!(to.is_ipv6() && to.to_string().starts_with("fd00:10:244:"), "{to}");
        if dataplane == "ebpf" {
            // Host-routed over IPv6 too: no node forwards the pods' packets.
            for n in ["n1", "n2"] {
                lab.sh(n, &format!("nft -f - <<'EOF'\n{FORWARD_PROBE}\nEOF"));
            }
            exchange(&lab, "n1-p1", "n2-p1", to, 18093);
            for n in ["n1", "n2"] {
                assert_eq!(forwarded_pod_packets(&lab, n), 0, "IPv6 pod packets through {n}'s forwarding");
            }
            assert!(uplink_counters(&lab, "n1")["tern.vxlan"] > 0);
        }
    }
}

#[test]
fn killed_up_then_up_works() {
    let lab = Lab::new();
    // SIGKILL `tern lab up` at several steps: etcd, agents and namespaces are
    // left running each time, and the next `up` must clean them first.
    for step in ["etcd", "node n2", "pod n2-p1"] {
        let out = lab
            .cmd(&["up", "--nodes", "2", "--pods-per-node", "1"])
            .env("TERN_TEST_LAB_KILL_AT", step)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success(), "killed at {step}");
        assert!(!lab.namespaces().is_empty(), "remains after a kill at {step}");
    }
    let stale = lab.pids();
    assert!(stale.iter().any(|p| alive(*p)), "the killed run left processes: {stale:?}");
    lab.up(2, "auto", 1, 1);
    for p in &stale {
        assert!(!alive(*p), "process {p} of the crashed lab survived the new up");
    }
    lab.matrix();
    let pids = lab.pids();
    lab.ok(&["down"]);
    assert_gone(&lab, &pids);
}
