//! Cluster IPAM while etcd is down: the warm pool serves ADDs, DELs are
//! journaled on the node and applied when etcd returns, the journal survives
//! an agent restart, and afterwards the block records in etcd hold every
//! pod's address exactly once and nothing else but the warm pool.
//!
//! The agent runs inside the test process ([`tern_agent::Agent`], the same
//! code `tern agent` runs), on a real etcd the test starts and kills by pid;
//! tern-ipam runs as a process inside a node namespace, as a runtime would
//! start it, and talks to the agent over its unix socket.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_agent::{Agent, AgentConfig, PoolConfig, WarmConfig, WARM_HANDLE_PREFIX};
use tern_ipam::block::Pool;
use tern_store::ipam::list_blocks;
use tern_store::Datastore;
use tern_testkit::*;

mod cluster_kit;
use cluster_kit::*;

const NET: &str = "onet";

fn conf(socket: &Path) -> String {
    cluster_conf(NET, socket)
}

fn handle(cid: &str) -> String {
    cluster_handle(NET, cid)
}

fn start_agent(etcd: &Etcd, dir: &TempDir, node: &str, pool: &str, warm: u32) -> Result<Agent, tern_agent::AgentError> {
    let mut config = AgentConfig::new(
        node,
        etcd_store(etcd),
        dir.join(format!("{node}.sock")),
        vec![PoolConfig { pool: Pool::new(pool.parse().unwrap(), Some(26)).unwrap(), max_blocks: None }],
    );
    config.lease_ttl = Duration::from_secs(3);
    config.warm = WarmConfig { warm_ip_target: warm, minimum_ip_target: 0 };
    config.state_dir = dir.join(format!("{node}-state"));
    Agent::start(config)
}

/// Waits until the agent has written every journaled change and its warm
/// pool holds `warm` addresses.
fn wait_settled(agent: &Agent, warm: usize) {
    let ok = wait_until(Duration::from_secs(30), || agent.ipam().pending() == 0 && agent.ipam().warm_free() == warm);
    assert!(ok, "agent never settled: {:?}", agent.ipam().status());
}

struct Node<'a> {
    ns: &'a Netns,
    plugins: &'a Plugins,
    socket: PathBuf,
}

impl Node<'_> {
    fn run(&self, cmd: &str, cid: &str) -> PluginRun {
        exec_plugin(
            self.ns,
            self.plugins,
            "tern-ipam",
            cmd,
            cid,
            Some(&self.ns.path()),
            "eth0",
            "",
            &conf(&self.socket),
        )
    }

    fn add(&self, cid: &str) -> IpAddr {
        let run = self.run("ADD", cid);
        run.assert_ok();
        let ips = run.ips();
        assert_eq!(ips.len(), 1, "{run}");
        ips[0]
    }
}

/// address -> handle of every used address in etcd's block records; panics
/// on a record whose bitmap and handles disagree.
fn owners(store: &dyn Datastore) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    for b in list_blocks(store).unwrap() {
        let rec = &b.value;
        assert_eq!(rec.block.used() as usize, rec.handles.len(), "block {}: bitmap vs handles: {rec:?}", rec.cidr());
        for (ord, h) in &rec.handles {
            let ip = rec.block.addr(*ord);
            assert!(rec.block.is_allocated(ip), "{ip} named {h} but free");
            assert!(out.insert(ip, h.clone()).is_none(), "{ip} in two blocks");
        }
    }
    out
}

/// The records say exactly: every live pod owns its address (and only it),
/// plus `warm` warm addresses of `node`; nothing else is reserved.
fn assert_records(store: &dyn Datastore, node: &str, live: &BTreeMap<String, IpAddr>, warm: usize) {
    let o = owners(store);
    for (cid, ip) in live {
        assert_eq!(o.get(ip), Some(&handle(cid)), "{cid}'s address {ip} in etcd: {o:?}");
    }
    let mut per_handle: BTreeMap<&str, usize> = BTreeMap::new();
    for h in o.values() {
        *per_handle.entry(h).or_default() += 1;
    }
    for (h, n) in &per_handle {
        if !h.starts_with(WARM_HANDLE_PREFIX) {
            assert_eq!(*n, 1, "{h} owns {n} addresses: {o:?}");
        }
    }
    let warm_prefix = format!("{WARM_HANDLE_PREFIX}{node}/");
    assert_eq!(o.values().filter(|h| h.starts_with(&warm_prefix)).count(), warm, "warm pool in etcd: {o:?}");
    assert_eq!(o.len(), live.len() + warm, "nothing but live pods and the warm pool reserved: {o:?}");
}

#[test]
fn etcd_killed_while_adding_warm_pool_serves_and_nothing_is_lost() {
    let mut etcd = Etcd::start();
    let dir = TempDir::new();
    let plugins = Plugins::new(tern_bin());
    let ns = Netns::new("onode");
    let node = unique_short("on");
    let agent = start_agent(&etcd, &dir, &node, "10.70.0.0/16", 4).unwrap();
    let n = Node { ns: &ns, plugins: &plugins, socket: agent.socket().to_path_buf() };
    wait_settled(&agent, 4);

    let mut live: BTreeMap<String, IpAddr> = BTreeMap::new();
    for cid in ["p0", "p1", "p2"] {
        live.insert(cid.into(), n.add(cid));
    }
    wait_settled(&agent, 4);
    let store = etcd_store(&etcd);
    assert_records(&*store, &node, &live, 4);

    etcd.stop();
    // Four ADDs come from the warm pool; the rest fail with 11 naming etcd.
    let mut failed = Vec::new();
    for i in 0..7 {
        let cid = format!("w{i}");
        let run = n.run("ADD", &cid);
        if run.code == 0 {
            let ips = run.ips();
            assert_eq!(ips.len(), 1, "{run}");
            assert!(!live.values().any(|ip| *ip == ips[0]), "{} handed out twice", ips[0]);
            live.insert(cid, ips[0]);
        } else {
            run.assert_error(11);
            let msg = run.json()["msg"].as_str().unwrap().to_string();
            assert!(msg.contains("etcd") && msg.contains(&etcd.endpoint()), "{run}");
            failed.push(cid);
        }
    }
    assert_eq!(failed, ["w4", "w5", "w6"], "the warm pool serves exactly its 4 addresses");
    // A retried ADD of a warm-served pod gets the same address.
    assert_eq!(n.add("w0"), live["w0"]);
    // DELs while etcd is down succeed: an older pod and a warm-served one.
    let released: Vec<(String, IpAddr)> = ["p0", "w1"].iter().map(|c| (c.to_string(), live[*c])).collect();
    for (cid, _) in &released {
        let del = n.run("DEL", cid);
        del.assert_ok();
        assert!(!del.stderr.contains("nothing to release"), "{del}");
        live.remove(cid);
    }
    assert!(agent.ipam().pending() >= 2, "{:?}", agent.ipam().status());
    let status = agent.ipam().status();
    assert!(!status.store_reachable && status.warm_free == 0 && status.warm_ip_target == 4, "{status:?}");
    // The released handle comes back while its release is still pending: nothing free, so 11.
    n.run("ADD", "p0").assert_error(11);

    etcd.restart();
    wait_settled(&agent, 4);
    assert_records(&*store, &node, &live, 4);
    for (cid, ip) in &released {
        assert_ne!(owners(&*store).get(ip), Some(&handle(cid)), "released {cid} still owns {ip}");
    }
    // The failed ADDs are retried and succeed; so does the released handle.
    for cid in failed.iter().map(|s| s.as_str()).chain(["p0"]) {
        let ip = n.add(cid);
        assert!(!live.values().any(|x| *x == ip), "{ip} handed out twice");
        live.insert(cid.to_string(), ip);
    }
    wait_settled(&agent, 4);
    assert_records(&*store, &node, &live, 4);

    let cids: Vec<String> = live.keys().cloned().collect();
    for cid in &cids {
        n.run("DEL", cid).assert_ok();
    }
    drop(agent);
    // The stopped agent's warm pool stays reserved (a leak collector's job
    // once the node is gone); every pod address is free.
    assert_records(&*store, &node, &BTreeMap::new(), 4);
}

#[test]
fn journal_is_replayed_by_an_agent_restarted_during_the_outage() {
    let mut etcd = Etcd::start();
    let dir = TempDir::new();
    let plugins = Plugins::new(tern_bin());
    let ns = Netns::new("rnode");
    let node = unique_short("rn");
    let agent = start_agent(&etcd, &dir, &node, "10.71.0.0/16", 2).unwrap();
    let socket = agent.socket().to_path_buf();
    let n = Node { ns: &ns, plugins: &plugins, socket: socket.clone() };
    wait_settled(&agent, 2);
    let mut live: BTreeMap<String, IpAddr> = BTreeMap::new();
    for cid in ["a0", "a1"] {
        live.insert(cid.into(), n.add(cid));
    }
    wait_settled(&agent, 2);

    etcd.stop();
    live.insert("b0".into(), n.add("b0"));
    let a0 = live.remove("a0").unwrap();
    n.run("DEL", "a0").assert_ok();
    assert_eq!(agent.ipam().pending(), 2, "{:?}", agent.ipam().status());
    let journal = dir.join(format!("{node}-state/ipam-{node}.journal"));
    assert!(journal.exists());

    // The agent goes away during the outage; a new one cannot start yet
    // (it needs the store for the node's blocks) and leaves the journal alone.
    drop(agent);
    let before = std::fs::read(&journal).unwrap();
    let e = start_agent(&etcd, &dir, &node, "10.71.0.0/16", 2).err().expect("no store, no start");
    assert!(e.is_unavailable(), "{e}");
    assert_eq!(std::fs::read(&journal).unwrap(), before);
    n.run("ADD", "c0").assert_error(11); // no agent at all

    etcd.restart();
    let agent = start_agent(&etcd, &dir, &node, "10.71.0.0/16", 2).unwrap();
    // Known from the journal at once: the warm-served pod keeps its address,
    // the released one is gone.
    assert_eq!(n.add("b0"), live["b0"]);
    let again = n.run("DEL", "a0");
    again.assert_ok();
    assert!(again.stderr.contains("nothing to release"), "{again}");
    wait_settled(&agent, 2);
    let store = etcd_store(&etcd);
    assert_records(&*store, &node, &live, 2);
    assert_ne!(owners(&*store).get(&a0), Some(&handle("a0")));
    live.insert("c0".into(), n.add("c0"));
    wait_settled(&agent, 2);
    assert_records(&*store, &node, &live, 2);
    for cid in live.keys() {
        n.run("DEL", cid).assert_ok();
    }
    wait_settled(&agent, 2);
    assert_records(&*store, &node, &BTreeMap::new(), 2);
    // An empty journal is rewritten, not left with applied ops.
    let text = std::fs::read_to_string(&journal).unwrap();
    assert!(text.contains(r#""ops":[]"#), "{text}");
}

#[test]
fn hung_etcd_warm_adds_and_dels_do_not_wait_for_it() {
    let etcd = Etcd::start();
    let dir = TempDir::new();
    let plugins = Plugins::new(tern_bin());
    let ns = Netns::new("hnode");
    let node = unique_short("hn");
    let agent = start_agent(&etcd, &dir, &node, "10.72.0.0/16", 3).unwrap();
    let n = Node { ns: &ns, plugins: &plugins, socket: agent.socket().to_path_buf() };
    wait_settled(&agent, 3);
    let mut live: BTreeMap<String, IpAddr> = BTreeMap::new();
    live.insert("p0".into(), n.add("p0"));
    wait_settled(&agent, 3);

    // Frozen etcd: connections open, nothing answers (every store call runs
    // into its timeout). Warm ADDs and the DEL of a warm-served pod are
    // answered from the node (tern-ipam gives up on the agent after 2 s).
    etcd.pause();
    for cid in ["h0", "h1", "h2"] {
        live.insert(cid.into(), n.add(cid));
    }
    n.run("DEL", "h0").assert_ok();
    live.remove("h0");
    n.run("ADD", "h3").assert_error(11);

    etcd.resume();
    // h3's ADD may still be running in the agent (a runtime retries it).
    assert!(wait_until(Duration::from_secs(30), || n.run("ADD", "h3").code == 0));
    live.insert("h3".into(), n.add("h3"));
    wait_settled(&agent, 3);
    assert_records(&*etcd_store(&etcd), &node, &live, 3);
}
