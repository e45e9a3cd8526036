//! Operating `tern agent`: restarts that leave pods and the kernel alone,
//! `tern status`, `tern ipam show`, and the agent's config file.
//!
//! Real parts only: Debian's etcd-server on loopback with a temp dir
//! (tern_testkit::Etcd), `tern agent` processes, and the `tern` plugin with
//! tern-ipam's cluster allocator run as a runtime would inside node
//! namespaces. The restart test runs etcd and the agent inside the node
//! namespace, so "nothing changed in the kernel" covers the agent's own
//! namespace too. Every process is started here and killed by pid.
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tern_testkit::*;

mod cluster_kit;
use cluster_kit::*;

const START: Duration = Duration::from_secs(20);

/// `tern <args>` in the test's namespace (`tern status`/`ipam` have their own timeouts).
fn tern(args: &[&str]) -> Output {
    Command::new(tern_bin()).args(args).stdin(Stdio::null()).output().expect("run tern")
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn json_of(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(o)))
}

/// The `tern` plugin in bridge mode with addresses from the cluster allocator.
fn pod_conf(socket: &Path) -> String {
    json!({
        "cniVersion": "1.1.0", "name": "opsnet", "type": "tern", "mode": "bridge",
        "bridge": "topsbr0", "isGateway": true,
        "ipam": {"type": "tern-ipam", "allocator": "cluster", "agentSocket": socket}
    })
    .to_string()
}

fn ipam_conf(socket: &Path) -> String {
    json!({
        "cniVersion": "1.1.0", "name": "opsipam", "type": "tern",
        "ipam": {"type": "tern-ipam", "allocator": "cluster", "agentSocket": socket}
    })
    .to_string()
}

fn k8s_args(pod: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=ops;K8S_POD_NAME={pod}")
}

/// `ip <args>` in `ns`, with what changes by itself over time (lifetimes,
/// route expiry, bridge timers) dropped.
fn ip_stable(ns: &Netns, args: &str) -> String {
    let out = ns.ok(&format!("ip {args}"));
    out.lines()
        .map(|l| {
            let mut words: Vec<&str> = Vec::new();
            let mut it = l.split_whitespace();
            while let Some(w) = it.next() {
                if matches!(w, "valid_lft" | "preferred_lft" | "expires" | "used") {
                    it.next();
                    continue;
                }
                words.push(w);
            }
            words.join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The node's kernel state and every pod's addresses: links (with MACs and
/// flags), addresses, routes of both families in all tables, permanent
/// neighbours, the nftables ruleset.
fn snapshot(node: &Netns, pods: &[Netns]) -> BTreeMap<String, String> {
    let mut s = BTreeMap::new();
    for (name, ns) in std::iter::once(("node".to_string(), node)).chain(pods.iter().map(|p| (p.name().to_string(), p)))
    {
        s.insert(format!("{name} links"), ip_stable(ns, "-o link show"));
        s.insert(format!("{name} addrs"), ip_stable(ns, "-o addr show"));
        s.insert(format!("{name} routes4"), ip_stable(ns, "-4 route show table all"));
        s.insert(format!("{name} routes6"), ip_stable(ns, "-6 route show table all"));
        s.insert(format!("{name} neigh"), ip_stable(ns, "neigh show nud permanent"));
        s.insert(format!("{name} neigh6"), ip_stable(ns, "-6 neigh show nud permanent"));
        s.insert(format!("{name} nft"), ns.ok("nft list ruleset"));
    }
    s
}

fn assert_same(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>, what: &str) {
    for (k, v) in before {
        assert_eq!(Some(v), after.get(k), "{what}: {k} changed");
    }
    assert_eq!(before.len(), after.len(), "{what}");
}

/// No address still tentative (IPv6 DAD), so snapshots compare settled state.
fn wait_dad(namespaces: &[&Netns]) {
    for ns in namespaces {
        let ok = wait_until(Duration::from_secs(10), || !ns.ok("ip -o addr show").contains("tentative"));
        assert!(ok, "addresses in {} stay tentative", ns.name());
    }
}

/// `tern agent` inside `ns`, started with [`spawn_in`] (killed by pid on drop).
fn agent_in(ns: &Netns, node: &str, datastore: &str, socket: &Path, extra: &[&str]) -> ChildGuard {
    let exe = tern_bin().to_str().unwrap();
    let state = socket.with_extension("state");
    let mut argv = vec![
        exe,
        "agent",
        "--node",
        node,
        "--datastore",
        datastore,
        "--socket",
        socket.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    argv.extend_from_slice(extra);
    let mut g = spawn_in(ns, &argv);
    let ok = wait_until(START, || g.log().contains("ready on") || !g.running());
    assert!(ok && g.running(), "agent {node} did not start in {}:\n{}", ns.name(), g.log());
    g
}

fn status_ok(socket: &Path) -> Value {
    let out = tern(&["status", "--socket", socket.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    json_of(&out)
}

#[test]
fn restarting_the_agent_keeps_pod_addresses_and_changes_nothing_in_the_kernel() {
    let node = Netns::new("rnode");
    let etcd = Etcd::start_in(&node, "127.0.0.1");
    let dir = TempDir::new();
    let plugins = Plugins::new(tern_bin());
    let socket = dir.join("agent.sock");
    let ds = format!("etcd:{}", etcd.endpoint());
    let pools = ["--pool", "10.71.0.0/16", "--pool", "fd00:71::/48", "--lease-ttl", "5"];
    let mut agent = agent_in(&node, "rn1", &ds, &socket, &pools);
    let conf = pod_conf(&socket);

    let pods: Vec<Netns> = (0..4).map(|_| Netns::new("rpod")).collect();
    let mut addrs: Vec<Vec<IpAddr>> = Vec::new();
    for (i, pod) in pods.iter().enumerate() {
        let run = exec_plugin(
            &node,
            &plugins,
            "tern",
            "ADD",
            &format!("r{i}"),
            Some(&pod.path()),
            "eth0",
            &k8s_args(&format!("p{i}")),
            &conf,
        );
        run.assert_ok();
        let ips = run.ips();
        assert_eq!(ips.len(), 2, "one IPv4 and one IPv6 address: {run}");
        addrs.push(ips);
    }
    let all: HashSet<IpAddr> = addrs.iter().flatten().copied().collect();
    assert_eq!(all.len(), 8, "{addrs:?}");
    let mut namespaces: Vec<&Netns> = pods.iter().collect();
    namespaces.push(&node);
    wait_dad(&namespaces);
    let before = snapshot(&node, &pods);
    // The snapshot holds what matters: the bridge with its gateways, both families' routes, the pods' addresses.
    assert!(before["node links"].contains("topsbr0"), "{}", before["node links"]);
    assert!(before["node addrs"].contains("10.71.0.1/16"), "{}", before["node addrs"]);
    assert!(before["node routes6"].contains("fd00:71::/48"), "{}", before["node routes6"]);
    assert!(before["node routes4"].contains("10.71.0.0/16"), "{}", before["node routes4"]);
    for (pod, ips) in pods.iter().zip(&addrs) {
        for ip in ips {
            assert!(before[&format!("{} addrs", pod.name())].contains(&ip.to_string()), "{ip} not in {before:#?}");
        }
    }
    assert_eq!(status_ok(&socket)["status"]["handles"], 4);
    // The pods' endpoint records, as `tern status` reads them from the store.
    // Run on the node: etcd listens on the node namespace's loopback.
    let pod_names = || -> Vec<String> {
        let out = node.run(&[tern_bin().to_str().unwrap(), "status", "--socket", socket.to_str().unwrap(), "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        let st = json_of(&out);
        assert!(st["endpointsError"].is_null(), "{st:#}");
        let mut v: Vec<String> = st["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|r| format!("{}/{}", r["podNamespace"].as_str().unwrap_or("?"), r["podName"].as_str().unwrap_or("?")))
            .collect();
        v.sort();
        v
    };
    let want = ["ops/p0", "ops/p1", "ops/p2", "ops/p3"];
    assert!(wait_until(START, || pod_names() == want), "endpoints: {:?}", pod_names());

    // SIGTERM: exits 0 after deregistering; a new agent picks the pods up.
    kill(Pid::from_raw(agent.pid() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_until(START, || !agent.running()), "agent ignored SIGTERM:\n{}", agent.log());
    assert_eq!(agent.exit_code(), Some(0), "{}", agent.log());
    drop(agent);
    let mut agent = agent_in(&node, "rn1", &ds, &socket, &pools);
    let st = status_ok(&socket);
    assert_eq!(st["status"]["handles"], 4, "{st:#}");
    assert_eq!(st["status"]["storeReachable"], true, "{st:#}");
    assert_same(&before, &snapshot(&node, &pods), "after SIGTERM and restart");

    // kill -9: the socket file and the node's lease are left behind; a new agent still starts and knows the pods.
    kill(Pid::from_raw(agent.pid() as i32), Signal::SIGKILL).unwrap();
    assert!(wait_until(START, || !agent.running()));
    assert!(socket.exists(), "a killed agent cannot remove its socket");
    drop(agent);
    let agent = agent_in(&node, "rn1", &ds, &socket, &pools);
    let st = status_ok(&socket);
    assert_eq!(st["status"]["handles"], 4, "{st:#}");
    assert_eq!(pod_names(), want);
    assert_same(&before, &snapshot(&node, &pods), "after kill -9 and restart");

    // Each pod still has its own addresses.
    for (pod, want) in pods.iter().zip(&addrs) {
        let have: Vec<IpAddr> =
            pod.addrs("eth0").iter().map(|a| a.split('/').next().unwrap().parse().unwrap()).collect();
        assert_eq!(&have, want, "pod {}", pod.name());
    }

    // New ADDs get addresses nobody holds.
    let more: Vec<Netns> = (0..2).map(|_| Netns::new("rpod")).collect();
    let mut seen = all.clone();
    for (i, pod) in more.iter().enumerate() {
        let run = exec_plugin(
            &node,
            &plugins,
            "tern",
            "ADD",
            &format!("m{i}"),
            Some(&pod.path()),
            "eth0",
            &k8s_args(&format!("m{i}")),
            &conf,
        );
        run.assert_ok();
        for ip in run.ips() {
            assert!(seen.insert(ip), "{ip} handed out twice after the restarts");
        }
    }
    let show = node.run(&[tern_bin().to_str().unwrap(), "ipam", "show", "--datastore", &ds, "--json"]);
    assert!(show.status.success(), "{}", text(&show));
    let show = json_of(&show);
    assert_eq!(show["byNode"]["rn1"]["used"], 12, "six pods, two addresses each: {show:#}");

    // DEL still works for every pod, old and new; nothing is left.
    for (i, pod) in pods.iter().enumerate() {
        exec_plugin(
            &node,
            &plugins,
            "tern",
            "DEL",
            &format!("r{i}"),
            Some(&pod.path()),
            "eth0",
            &k8s_args(&format!("p{i}")),
            &conf,
        )
        .assert_ok();
    }
    for (i, pod) in more.iter().enumerate() {
        exec_plugin(
            &node,
            &plugins,
            "tern",
            "DEL",
            &format!("m{i}"),
            Some(&pod.path()),
            "eth0",
            &k8s_args(&format!("m{i}")),
            &conf,
        )
        .assert_ok();
    }
    assert!(veth_links(&node, "").is_empty(), "veths left: {:?}", veth_links(&node, ""));
    let show = node.run(&[tern_bin().to_str().unwrap(), "ipam", "show", "--datastore", &ds, "--json"]);
    let show = json_of(&show);
    assert_eq!(show["byNode"]["rn1"]["used"], 0, "{show:#}");
    assert_eq!(status_ok(&socket)["status"]["handles"], 0);
    drop(agent);
}

#[test]
fn status_says_which_part_is_down() {
    let mut etcd = Etcd::start();
    let dir = TempDir::new();
    let ds = format!("etcd:{}", etcd.endpoint());
    let mut agent = AgentProc::start(&dir, "sn1", &ds, &["--pool", "10.72.0.0/16", "--lease-ttl", "3"]);
    let sock = agent.socket.to_str().unwrap().to_string();

    let out = tern(&["status", "--socket", &sock]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("sn1") && stdout.contains("reachable") && stdout.contains(&format!("pid {}", agent.pid())),
        "{}",
        text(&out)
    );
    let st = status_ok(agent.socket.as_path());
    assert_eq!(st["agent"]["answering"], true);
    assert_eq!(st["agent"]["pid"], agent.pid());
    assert!(st["agent"]["uptimeSeconds"].is_u64(), "{st:#}");
    assert_eq!(st["status"]["node"], "sn1");

    // etcd down: the agent answers, the store does not.
    etcd.stop();
    let out = tern(&["status", "--socket", &sock]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("datastore") && err.contains("unreachable") && err.contains(&etcd.endpoint()),
        "{}",
        text(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("UNREACHABLE"), "{}", text(&out));
    let out = tern(&["status", "--socket", &sock, "--json"]);
    assert!(!out.status.success());
    assert_eq!(json_of(&out)["status"]["storeReachable"], false);
    let out = tern(&["ipam", "show", "--datastore", &ds]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unreachable"), "{}", text(&out));

    etcd.restart();
    assert!(wait_until(START, || tern(&["status", "--socket", &sock]).status.success()), "the store never came back");

    // The agent down: nobody answers on the socket.
    assert_eq!(agent.signal_and_wait(Signal::SIGTERM), Some(0));
    let out = tern(&["status", "--socket", &sock]);
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("agent is not answering") && err.contains(&sock), "{}", text(&out));
    let out = tern(&["status", "--socket", &sock, "--json"]);
    assert!(!out.status.success());
    assert_eq!(json_of(&out)["agent"]["answering"], false);
}

#[test]
fn ipam_show_lists_the_blocks_of_two_nodes() {
    let etcd = Etcd::start();
    let dir = TempDir::new();
    let plugins = Plugins::new(tern_bin());
    let ds = format!("etcd:{}", etcd.endpoint());
    let args = ["--pool", "10.73.0.0/16", "--block-prefix", "26"];
    let a1 = AgentProc::start(&dir, "in1", &ds, &args);
    let a2 = AgentProc::start(&dir, "in2", &ds, &args);
    let (ns1, ns2) = (Netns::new("inode"), Netns::new("inode"));
    // 3 addresses on in1 (one block), 70 on in2 (two /26 blocks).
    let mut cids = Vec::new();
    for (ns, a, n, prefix) in [(&ns1, &a1, 3, "x"), (&ns2, &a2, 70, "y")] {
        let conf = ipam_conf(&a.socket);
        for i in 0..n {
            let cid = format!("{prefix}{i}");
            exec_plugin(ns, &plugins, "tern-ipam", "ADD", &cid, Some(&ns.path()), "eth0", "", &conf).assert_ok();
            cids.push((ns, conf.clone(), cid));
        }
    }

    let out = tern(&["ipam", "show", "--datastore", &ds, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let show = json_of(&out);
    let nodes: Vec<&str> = show["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(nodes, ["in1", "in2"], "{show:#}");
    assert_eq!(show["pools"], json!([{"cidr": "10.73.0.0/16", "blockPrefix": 26}]));
    let blocks = show["blocks"].as_array().unwrap();
    let of = |n: &str| blocks.iter().filter(|b| b["node"] == n).collect::<Vec<_>>();
    assert_eq!(of("in1").len(), 1, "{show:#}");
    assert_eq!(of("in2").len(), 2, "{show:#}");
    assert_eq!(of("in1")[0]["used"], 3);
    assert_eq!(of("in1")[0]["size"], 64);
    assert_eq!(of("in2").iter().map(|b| b["used"].as_u64().unwrap()).sum::<u64>(), 70);
    assert!(blocks.iter().all(|b| b["nodeAlive"] == true && b["cidr"].as_str().unwrap().ends_with("/26")));
    assert_eq!(show["byNode"]["in1"], json!({"alive": true, "blocks": 1, "used": 3, "size": 64, "utilisation": 4.7}));
    assert_eq!(show["byNode"]["in2"]["used"], 70);
    assert_eq!(show["byNode"]["in2"]["blocks"], 2);

    let out = tern(&["ipam", "show", "--datastore", &ds]);
    assert!(out.status.success(), "{}", text(&out));
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(t.contains("in1") && t.contains("in2") && t.contains("3/64"), "{t}");

    for (ns, conf, cid) in &cids {
        exec_plugin(ns, &plugins, "tern-ipam", "DEL", cid, Some(&ns.path()), "eth0", "", conf).assert_ok();
    }
    let show = json_of(&tern(&["ipam", "show", "--datastore", &ds, "--json"]));
    assert_eq!(show["byNode"]["in2"]["used"], 0, "{show:#}");
    assert!(show["leakCandidates"].as_array().is_some_and(|a| a.is_empty()), "{show:#}");

    // `ipam gc`: a dry run changes nothing; a real run with no grace gives the three empty blocks back.
    let out = tern(&["ipam", "gc", "--datastore", &ds, "--dry-run", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(json_of(&out)["dryRun"], true);
    assert_eq!(json_of(&tern(&["ipam", "show", "--datastore", &ds, "--json"]))["blocks"].as_array().unwrap().len(), 3);
    let mut released = 0;
    let all_gone = wait_until(START, || {
        let out = tern(&["ipam", "gc", "--datastore", &ds, "--block-grace", "0", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
        released += json_of(&out)["report"]["emptyBlocksReleased"].as_array().map_or(0, Vec::len);
        json_of(&tern(&["ipam", "show", "--datastore", &ds, "--json"]))["blocks"].as_array().unwrap().is_empty()
    });
    assert!(all_gone && released == 3, "released {released} blocks");
    let out = tern(&["ipam", "gc", "--datastore", &ds]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn config_file_starts_the_agent_and_bad_keys_are_named() {
    let dir = TempDir::new();
    let store = dir.join("store");
    let socket = dir.join("cfg.sock");
    let good = dir.join("agent.json");
    std::fs::write(
        &good,
        json!({
            "node": "cfg1",
            "datastore": format!("local:{}", store.display()),
            "socket": socket,
            "pools": [{"cidr": "10.74.0.0/16", "blockPrefix": 28}],
            "maxBlocks": 2,
            "leaseTtlSeconds": 5,
            "stateDir": dir.join("cfg-state"),
            "warmIPTarget": 2,
            "minimumIpTarget": 1,
            "strictAffinity": true,
            "gc": {"intervalSeconds": 60, "blockGraceSeconds": 600, "leakGraceSeconds": 600},
        })
        .to_string(),
    )
    .unwrap();
    let good_arg = good.to_str().unwrap().to_string();
    let mut agent = AgentProc::spawn(&dir, "cfg1", socket.clone(), &["--config", &good_arg]);
    assert!(agent.running(), "{}", agent.log_text());
    let st = status_ok(&socket);
    assert_eq!(st["status"]["node"], "cfg1");
    assert_eq!(st["status"]["pools"], json!(["10.74.0.0/16"]));
    assert_eq!(st["status"]["warmIPTarget"], 2, "{st:#}");
    assert_eq!(st["status"]["minimumIPTarget"], 1, "{st:#}");
    let ns = Netns::new("cnode");
    let plugins = Plugins::new(tern_bin());
    let run = exec_plugin(&ns, &plugins, "tern-ipam", "ADD", "c1", Some(&ns.path()), "eth0", "", &ipam_conf(&socket));
    run.assert_ok();
    assert!(run.ips()[0].to_string().starts_with("10.74."), "{run}");
    exec_plugin(&ns, &plugins, "tern-ipam", "DEL", "c1", Some(&ns.path()), "eth0", "", &ipam_conf(&socket)).assert_ok();
    assert_eq!(agent.signal_and_wait(Signal::SIGTERM), Some(0));

    // A flag overrides the file.
    let other = dir.join("other.sock");
    let mut agent = AgentProc::spawn(
        &dir,
        "cfg2",
        other.clone(),
        &["--config", &good_arg, "--node", "cfg2", "--socket", other.to_str().unwrap()],
    );
    assert!(agent.running(), "{}", agent.log_text());
    assert_eq!(status_ok(&other)["status"]["node"], "cfg2");
    assert_eq!(agent.signal_and_wait(Signal::SIGTERM), Some(0));

    // Unknown keys and bad values: the agent refuses to start and names the key.
    for (body, key) in [
        (json!({"node": "x", "pols": [{"cidr": "10.74.0.0/16"}]}), "pols"),
        (json!({"node": "x", "pools": [{"cidr": "10.74.0.0/16"}], "leaseTtlSeconds": "ten"}), "leaseTtlSeconds"),
        (json!({"node": "x", "pools": [{"cidr": "10.74.0.0/16", "blockPrefx": 26}]}), "pools[0].blockPrefx"),
        (
            json!({"node": "x", "pools": [{"cidr": "10.74.0.0/16"}], "gc": {"intervalSeconds": "1m"}}),
            "gc.intervalSeconds",
        ),
    ] {
        let bad = dir.join("bad.json");
        std::fs::write(&bad, body.to_string()).unwrap();
        let mut a = AgentProc::spawn(&dir, "bad", dir.join("bad.sock"), &["--config", bad.to_str().unwrap()]);
        let code = a.wait_exit();
        assert_ne!(code, Some(0), "{body} was accepted:\n{}", a.log_text());
        let log = a.log_text();
        assert!(log.contains(key) && log.contains("bad.json"), "{body}: error does not name {key}:\n{log}");
        assert!(!dir.join("bad.sock").exists());
    }
    // A missing file is named too.
    let mut a = AgentProc::spawn(&dir, "missing", dir.join("m.sock"), &["--config", "/nonexistent/agent.json"]);
    assert_ne!(a.wait_exit(), Some(0));
    assert!(a.log_text().contains("/nonexistent/agent.json"), "{}", a.log_text());
}
