//! Cluster IPAM: `tern agent` processes on one etcd (or the local store),
//! tern-ipam's `"allocator": "cluster"` invoked as a runtime would, inside
//! node namespaces, talking to its node's agent over the unix socket.
//!
//! The agents and etcd run in the test's own network namespace on loopback
//! (they only talk to each other); the plugins run inside the node
//! namespaces and reach their agent through the socket file. Every process
//! is started here and killed by pid.
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use nix::sys::signal::Signal;
use serde_json::Value;
use tern_store::ipam::list_blocks;
use tern_store::{Datastore, LocalStore};
use tern_testkit::*;

mod cluster_kit;
use cluster_kit::*;

fn conf(socket: &Path) -> String {
    cluster_conf("cnet", socket)
}

/// Runs `n` ADDs (containers `<prefix>-<i>`) in `node` against `socket`,
/// `workers` at a time; returns (container id, addresses).
fn adds(
    node: &Netns,
    plugins: &Plugins,
    socket: &Path,
    prefix: &str,
    n: usize,
    workers: usize,
) -> Vec<(String, Vec<IpAddr>)> {
    let conf = conf(socket);
    let out = std::sync::Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= n {
                    return;
                }
                let cid = format!("{prefix}-{i}");
                let run = exec_plugin(node, plugins, "tern-ipam", "ADD", &cid, Some(&node.path()), "eth0", "", &conf);
                run.assert_ok();
                let v = run.json();
                for ip in v["ips"].as_array().unwrap() {
                    assert!(ip.get("gateway").is_none(), "no gateway expected: {run}");
                }
                out.lock().unwrap().push((cid, run.ips()));
            });
        }
    });
    out.into_inner().unwrap()
}

fn dels(node: &Netns, plugins: &Plugins, socket: &Path, cids: &[String], workers: usize) {
    let conf = conf(socket);
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Some(cid) = cids.get(i) else { return };
                exec_plugin(node, plugins, "tern-ipam", "DEL", cid, Some(&node.path()), "eth0", "", &conf).assert_ok();
            });
        }
    });
}

/// Blocks never overlap and every address lies in a block owned by its node.
fn assert_owned(store: &dyn Datastore, got: &BTreeMap<IpAddr, String>) {
    let blocks = list_blocks(store).unwrap();
    let cidrs: Vec<IpNet> = blocks.iter().map(|b| b.value.cidr()).collect();
    for (i, a) in cidrs.iter().enumerate() {
        for b in &cidrs[i + 1..] {
            assert!(!a.contains(b) && !b.contains(a), "blocks {a} and {b} overlap");
        }
    }
    for (ip, node) in got {
        let b = blocks.iter().find(|b| b.value.cidr().contains(ip)).unwrap_or_else(|| panic!("{ip}: in no block"));
        assert_eq!(&b.value.node, node, "{ip} is in block {} of node {}", b.value.cidr(), b.value.node);
        assert!(b.value.block.is_allocated(*ip), "{ip} not marked used in {}", b.value.cidr());
    }
}

#[test]
fn three_agents_300_adds_distinct_owned_then_released() {
    let etcd = Etcd::start();
    let dir = TempDir::new();
    let plugins = Plugins::new(tern_bin());
    let ds = format!("etcd:{}", etcd.endpoint());
    let names = ["n1", "n2", "n3"];
    let agents: Vec<AgentProc> = names
        .iter()
        .map(|n| {
            AgentProc::start(&dir, n, &ds, &["--pool", "10.60.0.0/16", "--block-prefix", "26", "--lease-ttl", "5"])
        })
        .collect();
    let nss: Vec<Netns> = names.iter().map(|_| Netns::new("cnode")).collect();
    let store = etcd_store(&etcd);
    assert_eq!(nodes_in(&*store), names);

    let started = Instant::now();
    let results: Vec<Vec<(String, Vec<IpAddr>)>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|i| {
                let (ns, a, plugins) = (&nss[i], &agents[i], &plugins);
                s.spawn(move || adds(ns, plugins, &a.socket, &format!("c{i}"), 100, 6))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!("300 cluster ADDs on 3 nodes: {:?}", started.elapsed());

    let mut got: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.len(), 100);
        for (cid, ips) in r {
            assert_eq!(ips.len(), 1, "{cid}: {ips:?}");
            assert!("10.60.0.0/16".parse::<IpNet>().unwrap().contains(&ips[0]));
            assert!(got.insert(ips[0], names[i].to_string()).is_none(), "{} handed out twice", ips[0]);
        }
    }
    assert_eq!(got.len(), 300);
    assert_owned(&*store, &got);
    // 100 addresses in /26 blocks: two blocks per node.
    for n in names {
        let count = list_blocks(&*store).unwrap().iter().filter(|b| b.value.node == n).count();
        assert_eq!(count, 2, "blocks of {n}");
    }

    // The result carries the pool prefix; CHECK against it passes, a foreign address fails.
    let c = conf(&agents[0].socket);
    let add = exec_plugin(&nss[0], &plugins, "tern-ipam", "ADD", "c0-0", Some(&nss[0].path()), "eth0", "", &c);
    let prev = add.assert_ok().json();
    assert!(prev["ips"][0]["address"].as_str().unwrap().ends_with("/16"), "{add}");
    let mut with_prev: Value = serde_json::from_str(&c).unwrap();
    with_prev["prevResult"] = prev.clone();
    exec_plugin(
        &nss[0],
        &plugins,
        "tern-ipam",
        "CHECK",
        "c0-0",
        Some(&nss[0].path()),
        "eth0",
        "",
        &with_prev.to_string(),
    )
    .assert_ok();
    with_prev["prevResult"]["ips"][0]["address"] = "10.60.255.1/16".into();
    let bad = exec_plugin(
        &nss[0],
        &plugins,
        "tern-ipam",
        "CHECK",
        "c0-0",
        Some(&nss[0].path()),
        "eth0",
        "",
        &with_prev.to_string(),
    );
    assert_ne!(bad.code, 0, "{bad}");
    exec_plugin(&nss[0], &plugins, "tern-ipam", "STATUS", "", None, "", "", &c).assert_ok();

    std::thread::scope(|s| {
        for (i, r) in results.iter().enumerate() {
            let cids: Vec<String> = r.iter().map(|(c, _)| c.clone()).collect();
            let (ns, a, plugins) = (&nss[i], &agents[i], &plugins);
            s.spawn(move || dels(ns, plugins, &a.socket, &cids, 6));
        }
    });
    for b in list_blocks(&*store).unwrap() {
        assert!(b.value.is_empty(), "block {} of {} still used: {:?}", b.value.cidr(), b.value.node, b.value.handles);
    }
    // DEL again: the agent no longer knows the handle, which is not an error.
    let again = exec_plugin(
        &nss[1],
        &plugins,
        "tern-ipam",
        "DEL",
        "c1-0",
        Some(&nss[1].path()),
        "eth0",
        "",
        &conf(&agents[1].socket),
    );
    again.assert_ok();
    assert!(again.stderr.contains("nothing to release"), "{again}");
}

#[test]
fn local_store_dual_stack_allocate_release() {
    let dir = TempDir::new();
    let data = dir.join("store");
    let plugins = Plugins::new(tern_bin());
    let ds = format!("local:{}", data.display());
    let agent = AgentProc::start(
        &dir,
        "solo",
        &ds,
        &["--pool", "10.61.0.0/16", "--pool", "fd00:61::/48", "--block-prefix", "26", "--block-prefix", "122"],
    );
    let ns = Netns::new("lnode");
    let r = adds(&ns, &plugins, &agent.socket, "l", 100, 6);
    let mut got: BTreeMap<IpAddr, String> = BTreeMap::new();
    for (cid, ips) in &r {
        assert_eq!(ips.len(), 2, "{cid}: one IPv4 and one IPv6 address: {ips:?}");
        assert!(ips[0].is_ipv4() && ips[1].is_ipv6(), "{ips:?}");
        for ip in ips {
            assert!(got.insert(*ip, "solo".into()).is_none(), "{ip} twice");
        }
    }
    assert_eq!(got.len(), 200);
    {
        let store = LocalStore::open(&data).unwrap();
        assert_owned(&store, &got);
        assert_eq!(list_blocks(&store).unwrap().len(), 4, "two /26 and two /122 blocks");
        assert_eq!(nodes_in(&store), ["solo"]);
    }
    let cids: Vec<String> = r.iter().map(|(c, _)| c.clone()).collect();
    dels(&ns, &plugins, &agent.socket, &cids, 6);
    let store = LocalStore::open(&data).unwrap();
    let blocks = list_blocks(&store).unwrap();
    assert!(blocks.iter().all(|b| b.value.is_empty()), "{blocks:?}");
    // A restarted agent reuses the node's (now empty) blocks rather than claiming more.
    drop(agent);
    let agent = AgentProc::start(
        &dir,
        "solo",
        &ds,
        &["--pool", "10.61.0.0/16", "--pool", "fd00:61::/48", "--block-prefix", "26", "--block-prefix", "122"],
    );
    let r = adds(&ns, &plugins, &agent.socket, "m", 3, 1);
    assert!(r.iter().all(|(_, ips)| ips.len() == 2));
    assert_eq!(list_blocks(&store).unwrap().len(), 4);
}

#[test]
fn dead_agent_gives_code_11_and_its_node_expires() {
    let etcd = Etcd::start();
    let dir = TempDir::new();
    let plugins = Plugins::new(tern_bin());
    let ds = format!("etcd:{}", etcd.endpoint());
    let args = ["--pool", "10.62.0.0/16", "--lease-ttl", "3"];
    let mut killed = AgentProc::start(&dir, "doomed", &ds, &args);
    let mut termed = AgentProc::start(&dir, "polite", &ds, &args);
    let store = etcd_store(&etcd);
    assert_eq!(nodes_in(&*store), ["doomed", "polite"]);
    let ns = Netns::new("dnode");
    let c = conf(&killed.socket);
    let added = exec_plugin(&ns, &plugins, "tern-ipam", "ADD", "p1", Some(&ns.path()), "eth0", "", &c);
    added.assert_ok();

    // The lease outlives several keep-alive rounds.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(nodes_in(&*store), ["doomed", "polite"]);

    // SIGTERM: deregistered at once, exit 0.
    assert_eq!(termed.signal_and_wait(Signal::SIGTERM), Some(0), "{}", termed.log_text());
    assert_eq!(nodes_in(&*store), ["doomed"], "{}", termed.log_text());
    assert!(!termed.socket.exists());

    // SIGKILL: the node stays until its lease runs out.
    let t0 = Instant::now();
    assert_eq!(killed.signal_and_wait(Signal::SIGKILL), None);
    assert!(wait_until(Duration::from_secs(15), || nodes_in(&*store).is_empty()), "node {} never expired", killed.node);
    let gone = t0.elapsed();
    assert!(gone >= Duration::from_secs(1), "node vanished after {gone:?}, before its lease could expire");
    eprintln!("killed agent's node expired after {gone:?}");
    // Its block and the pod's address stay owned (reclaiming is the grace-period collector's job).
    let blocks = list_blocks(&*store).unwrap();
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].value.node, "doomed");
    assert_eq!(blocks[0].value.block.used(), 1);

    // The socket file is left behind by the dead agent: connection refused -> 11.
    let run = exec_plugin(&ns, &plugins, "tern-ipam", "ADD", "p2", Some(&ns.path()), "eth0", "", &c);
    run.assert_error(11);
    let msg = run.json()["msg"].as_str().unwrap().to_string();
    assert!(msg.contains("not reachable") && msg.contains(killed.socket.to_str().unwrap()), "{run}");
    exec_plugin(&ns, &plugins, "tern-ipam", "DEL", "p1", Some(&ns.path()), "eth0", "", &c).assert_error(11);
    exec_plugin(&ns, &plugins, "tern-ipam", "STATUS", "", None, "", "", &c).assert_error(50);
    // No socket file at all -> 11 too.
    let missing = conf(&dir.join("nope.sock"));
    exec_plugin(&ns, &plugins, "tern-ipam", "ADD", "p3", Some(&ns.path()), "eth0", "", &missing).assert_error(11);

    // A restarted agent picks up its pod's address: DEL now releases it.
    let restarted = AgentProc::start(&dir, "doomed", &ds, &args);
    assert_eq!(nodes_in(&*store), ["doomed"]);
    let del = exec_plugin(&ns, &plugins, "tern-ipam", "DEL", "p1", Some(&ns.path()), "eth0", "", &c);
    del.assert_ok();
    assert!(!del.stderr.contains("nothing to release"), "{del}");
    assert!(list_blocks(&*store).unwrap()[0].value.is_empty());
    drop(restarted);
}

#[test]
fn etcd_down_add_gives_code_11_naming_the_store() {
    let mut etcd = Etcd::start();
    let dir = TempDir::new();
    let plugins = Plugins::new(tern_bin());
    let ds = format!("etcd:{}", etcd.endpoint());
    let agent = AgentProc::start(&dir, "n1", &ds, &["--pool", "10.63.0.0/16"]);
    let ns = Netns::new("enode");
    let c = conf(&agent.socket);
    let first = exec_plugin(&ns, &plugins, "tern-ipam", "ADD", "a", Some(&ns.path()), "eth0", "", &c);
    first.assert_ok();
    etcd.stop();
    let run = exec_plugin(&ns, &plugins, "tern-ipam", "ADD", "b", Some(&ns.path()), "eth0", "", &c);
    run.assert_error(11);
    let msg = run.json()["msg"].as_str().unwrap().to_string();
    assert!(msg.contains("etcd") && msg.contains(&etcd.endpoint()), "{run}");
    exec_plugin(&ns, &plugins, "tern-ipam", "STATUS", "", None, "", "", &c).assert_error(50);
    etcd.restart();
    let ok = exec_plugin(&ns, &plugins, "tern-ipam", "ADD", "b", Some(&ns.path()), "eth0", "", &c);
    ok.assert_ok();
    let store = etcd_store(&etcd);
    let mut seen = HashSet::new();
    for b in list_blocks(&*store).unwrap() {
        for ip in b.value.handles.keys() {
            assert!(seen.insert((b.value.cidr(), *ip)));
        }
    }
    assert_ne!(first.ips(), ok.ips());
}
