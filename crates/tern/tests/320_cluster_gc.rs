//! Cluster IPAM's collector and endpoint records, on a real etcd.
//!
//! Agents run in this test process (`tern_agent::Agent`, collector interval
//! zero unless a test wants the agent's own thread, so each test drives
//! `tern_agent::gc::run_once` itself and sees every step), or as `tern
//! agent` processes where a node has to die without deregistering (SIGKILL:
//! its lease runs out). tern-ipam's `"allocator": "cluster"` is executed as a
//! runtime would, inside a node namespace, with `CNI_NETNS` naming pod
//! namespaces the test creates and removes.
//!
//! "In use", as these tests check it: an address is in use while its block
//! marks it used and its attachment exists on a live node (an endpoint
//! record whose node has a node record and, checked by that node's agent,
//! whose netns path exists). A dead node's block is reclaimed only once
//! none of its addresses is in use: its own pods' addresses are freed by
//! the leak collector after the leak grace period, an address held by a
//! live node's pod (borrowed) keeps the block until that pod releases it.
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use tern_agent::endpoints::{self, EndpointRecord};
use tern_agent::gc::{self, GcConfig, GcReport, IdleReason, LeakReason};
use tern_agent::{Agent, AgentConfig, PoolConfig};
use tern_ipam::block::Pool;
use tern_store::ipam::{get_block, list_blocks, write_block};
use tern_store::{keys, Datastore};
use tern_testkit::*;

mod cluster_kit;
use cluster_kit::*;

const POOL: &str = "10.70.0.0/16";
const NET: &str = "cnet";

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

/// Waits until the wall clock has passed `due_ms` (a grace period's end).
fn wait_past(due_ms: u64) {
    assert!(wait_until(Duration::from_secs(60), || unix_ms() > due_ms + 50), "clock never reached {due_ms}");
}

/// Every key with its revision, the node registrations aside (leases).
fn snapshot(store: &dyn Datastore) -> Vec<(String, i64)> {
    store
        .list("/tern/")
        .unwrap()
        .kvs
        .into_iter()
        .filter(|kv| !kv.key.starts_with(keys::NODES))
        .map(|kv| (kv.key, kv.revision))
        .collect()
}

fn keys_under(store: &dyn Datastore, prefix: &str) -> Vec<String> {
    store.list(prefix).unwrap().kvs.into_iter().map(|kv| kv.key).collect()
}

fn grace(block: u64, leak: u64) -> GcConfig {
    GcConfig {
        interval: Duration::ZERO,
        block_grace: Duration::from_secs(block),
        leak_grace: Duration::from_secs(leak),
    }
}

/// An agent in this process with the test's own state dir and socket.
fn agent(store: &Arc<dyn Datastore>, dir: &TempDir, node: &str, gc: GcConfig) -> Agent {
    let pool = PoolConfig { pool: Pool::new(POOL.parse().unwrap(), Some(26)).unwrap(), max_blocks: None };
    let mut cfg = AgentConfig::new(node, store.clone(), dir.join(format!("{node}.sock")), vec![pool]);
    cfg.lease_ttl = Duration::from_secs(3);
    cfg.state_dir = dir.join(format!("{node}-state"));
    cfg.gc = gc;
    Agent::start(cfg).unwrap_or_else(|e| panic!("agent {node}: {e}"))
}

fn conf(socket: &Path) -> String {
    cluster_conf(NET, socket)
}

fn handle(cid: &str) -> String {
    cluster_handle(NET, cid)
}

/// The agent of `node`, with the test's pool and a short lease.
fn agent_proc(dir: &TempDir, node: &str, datastore: &str) -> AgentProc {
    AgentProc::start(dir, node, datastore, &["--pool", POOL, "--lease-ttl", "3"])
}

fn k8s(namespace: &str, pod: &str) -> String {
    format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID=x")
}

/// ADD through tern-ipam in `node`: the pod's addresses.
fn add(node: &Netns, plugins: &Plugins, socket: &Path, cid: &str, netns: &Path, args: &str) -> Vec<IpAddr> {
    let run = exec_plugin(node, plugins, "tern-ipam", "ADD", cid, Some(netns), "eth0", args, &conf(socket));
    run.assert_ok();
    run.ips()
}

fn del(node: &Netns, plugins: &Plugins, socket: &Path, cid: &str, args: &str) {
    exec_plugin(node, plugins, "tern-ipam", "DEL", cid, None, "eth0", args, &conf(socket)).assert_ok();
}

fn block_of(store: &dyn Datastore, ip: IpAddr) -> IpNet {
    list_blocks(store).unwrap().into_iter().map(|b| b.value.cidr()).find(|c| c.contains(&ip)).expect("in a block")
}

/// The handle holding an address, from the blocks.
fn held(store: &dyn Datastore, ip: IpAddr) -> Option<String> {
    list_blocks(store)
        .unwrap()
        .into_iter()
        .find(|b| b.value.cidr().contains(&ip))
        .and_then(|b| b.value.handle_of(ip).map(String::from))
}

fn leak_addresses(r: &GcReport) -> Vec<IpAddr> {
    r.leak_candidates.iter().map(|l| l.address).collect()
}

fn freed_addresses(r: &GcReport) -> Vec<IpAddr> {
    r.leaks_freed.iter().map(|l| l.address).collect()
}

#[test]
fn endpoint_records_follow_add_and_del() {
    let etcd = Etcd::start();
    let dir = TempDir::new();
    let plugins = Plugins::new(tern_bin());
    let store = etcd_store(&etcd);
    let a = agent(&store, &dir, "n1", grace(300, 300));
    let node = Netns::new("gnode");
    let pod = Netns::new("gpod");

    let ips = add(&node, &plugins, a.socket(), "web", &pod.path(), &k8s("shop", "web-0"));
    assert_eq!(ips.len(), 1);
    // Written by the agent's writer thread a moment after the ADD returned.
    assert!(a.endpoints().wait_idle(Duration::from_secs(10)));
    let by_pod = endpoints::get_by_pod(&*store, "shop", "web-0", "eth0").unwrap().expect("record by pod");
    let want = EndpointRecord {
        handle: handle("web"),
        node: "n1".into(),
        addresses: ips.clone(),
        container_id: "web".into(),
        interface: "eth0".into(),
        netns: Some(pod.path().to_string_lossy().into_owned()),
        pod_namespace: Some("shop".into()),
        pod_name: Some("web-0".into()),
        created_at_ms: by_pod.created_at_ms,
        recovered: false,
    };
    assert_eq!(by_pod, want);
    assert_eq!(endpoints::get_by_handle(&*store, &handle("web")).unwrap().unwrap().value, want);
    assert_eq!(endpoints::get_by_address(&*store, ips[0]).unwrap(), Some(want.clone()));

    // Without K8S names: by handle (and address) only.
    let bare = add(&node, &plugins, a.socket(), "bare", &pod.path(), "");
    assert!(a.endpoints().wait_idle(Duration::from_secs(10)));
    let rec = endpoints::get_by_handle(&*store, &handle("bare")).unwrap().unwrap().value;
    assert_eq!((rec.pod_namespace, rec.pod_name, rec.addresses), (None, None, bare.clone()));
    assert_eq!(keys_under(&*store, keys::ENDPOINTS), ["/tern/v1/endpoints/shop/web-0/eth0"]);

    // The pod re-created under the same name (new sandbox): the pod key is the
    // new sandbox's, and the old sandbox's DEL leaves it alone.
    let again = add(&node, &plugins, a.socket(), "web2", &pod.path(), &k8s("shop", "web-0"));
    del(&node, &plugins, a.socket(), "web", &k8s("shop", "web-0"));
    assert!(a.endpoints().wait_idle(Duration::from_secs(10)));
    assert_eq!(endpoints::get_by_handle(&*store, &handle("web")).unwrap(), None);
    let by_pod = endpoints::get_by_pod(&*store, "shop", "web-0", "eth0").unwrap().expect("new sandbox's record");
    assert_eq!((by_pod.handle, by_pod.addresses), (handle("web2"), again));
    assert_eq!(endpoints::get_by_address(&*store, ips[0]).unwrap(), None, "released address");

    del(&node, &plugins, a.socket(), "web2", &k8s("shop", "web-0"));
    del(&node, &plugins, a.socket(), "bare", "");
    assert!(a.endpoints().wait_idle(Duration::from_secs(10)));
    assert!(keys_under(&*store, keys::ENDPOINTS).is_empty());
    assert!(keys_under(&*store, keys::ATTACHMENTS).is_empty());
}

#[test]
fn empty_block_released_after_grace_not_before() {
    let etcd = Etcd::start();
    let dir = TempDir::new();
    let plugins = Plugins::new(tern_bin());
    let store = etcd_store(&etcd);
    let a = agent(&store, &dir, "n1", grace(300, 300));
    let node = Netns::new("gnode");
    let pod = Netns::new("gpod");
    let cfg = grace(3, 3600);

    let ip = add(&node, &plugins, a.socket(), "a", &pod.path(), "")[0];
    let cidr = block_of(&*store, ip);
    assert!(a.endpoints().wait_idle(Duration::from_secs(10)));
    // In use: not a candidate.
    let r = gc::run_once(&*store, None, &cfg, false).unwrap();
    assert!(r.blocks_waiting.is_empty() && r.leak_candidates.is_empty(), "{r:#?}");
    del(&node, &plugins, a.socket(), "a", "");

    let r1 = gc::run_once(&*store, None, &cfg, false).unwrap();
    assert_eq!(r1.blocks_waiting.len(), 1, "{r1:#?}");
    let w1 = &r1.blocks_waiting[0];
    assert_eq!((w1.cidr, w1.node.as_str(), w1.reason, w1.in_use), (cidr, "n1", IdleReason::Empty, 0));
    assert!(r1.empty_blocks_released.is_empty());
    assert!(get_block(&*store, &cidr).unwrap().is_some());
    assert_eq!(keys_under(&*store, keys::IPAM_IDLE), [keys::idle_block(&cidr)]);

    // Used again within the grace period: the period starts over.
    add(&node, &plugins, a.socket(), "b", &pod.path(), "");
    del(&node, &plugins, a.socket(), "b", "");
    wait_past(w1.due_at_ms);
    let r2 = gc::run_once(&*store, None, &cfg, false).unwrap();
    assert!(r2.empty_blocks_released.is_empty(), "released although used within the grace period: {r2:#?}");
    let w2 = &r2.blocks_waiting[0];
    assert!(w2.first_seen_ms > w1.first_seen_ms, "{r2:#?}");
    assert!(r2.now_ms < w2.due_at_ms);

    wait_past(w2.due_at_ms);
    // Dry run: says it would release, changes nothing.
    let before = snapshot(&*store);
    let dry = gc::run_once(&*store, None, &cfg, true).unwrap();
    assert!(dry.dry_run);
    assert_eq!(dry.empty_blocks_released.iter().map(|b| b.cidr).collect::<Vec<_>>(), [cidr]);
    assert_eq!(snapshot(&*store), before, "dry run wrote");

    let r3 = gc::run_once(&*store, None, &cfg, false).unwrap();
    assert_eq!(r3.empty_blocks_released.iter().map(|b| b.cidr).collect::<Vec<_>>(), [cidr], "{r3:#?}");
    assert!(get_block(&*store, &cidr).unwrap().is_none());
    assert!(keys_under(&*store, keys::IPAM_AFFINITY).is_empty());
    assert!(keys_under(&*store, keys::IPAM_IDLE).is_empty());

    // The agent learns its block is gone at its next write, and claims again.
    let ip = add(&node, &plugins, a.socket(), "c", &pod.path(), "")[0];
    assert_eq!(held(&*store, ip), Some(handle("c")));
    del(&node, &plugins, a.socket(), "c", "");
}

#[test]
fn leak_collector_frees_only_addresses_whose_netns_is_gone() {
    let etcd = Etcd::start();
    let dir = TempDir::new();
    let plugins = Plugins::new(tern_bin());
    let store = etcd_store(&etcd);
    let a = agent(&store, &dir, "n1", grace(300, 300));
    let node = Netns::new("gnode");
    let gone_pod = Netns::new("gpod");
    let live_pod = Netns::new("gpod");
    let cfg = grace(3600, 2);

    let lost = add(&node, &plugins, a.socket(), "lost", &gone_pod.path(), &k8s("ns", "lost"))[0];
    let kept = add(&node, &plugins, a.socket(), "kept", &live_pod.path(), &k8s("ns", "kept"))[0];
    assert!(a.endpoints().wait_idle(Duration::from_secs(10)));
    gone_pod.delete_now();

    // Only n1's agent can look at n1's netns paths.
    let r = gc::run_once(&*store, None, &cfg, false).unwrap();
    assert!(r.leak_candidates.is_empty() && r.leaks_freed.is_empty(), "{r:#?}");
    let r = gc::run_once(&*store, Some("n1"), &cfg, false).unwrap();
    assert_eq!(leak_addresses(&r), [lost], "{r:#?}");
    let c = &r.leak_candidates[0];
    assert_eq!((c.reason, c.handle.as_str(), c.node.as_str()), (LeakReason::NetnsGone, handle("lost").as_str(), "n1"));
    assert!(r.leaks_freed.is_empty());
    let due = c.due_at_ms;
    // From elsewhere the mark is kept as found, and nothing is freed.
    wait_past(due);
    let r = gc::run_once(&*store, None, &cfg, false).unwrap();
    assert_eq!(leak_addresses(&r), [lost], "{r:#?}");
    assert!(r.leak_candidates[0].note.is_some());
    assert!(r.leaks_freed.is_empty());

    let before = snapshot(&*store);
    let dry = gc::run_once(&*store, Some("n1"), &cfg, true).unwrap();
    assert_eq!(freed_addresses(&dry), [lost], "{dry:#?}");
    assert_eq!(snapshot(&*store), before, "dry run wrote");

    let r = gc::run_once(&*store, Some("n1"), &cfg, false).unwrap();
    assert_eq!(freed_addresses(&r), [lost], "{r:#?}");
    assert_eq!(r.endpoint_records_removed, [handle("lost")]);
    assert_eq!(held(&*store, lost), None);
    assert_eq!(held(&*store, kept), Some(handle("kept")));
    assert_eq!(endpoints::get_by_pod(&*store, "ns", "lost", "eth0").unwrap(), None);
    assert!(endpoints::get_by_pod(&*store, "ns", "kept", "eth0").unwrap().is_some());
    assert!(keys_under(&*store, keys::IPAM_LEAKS).is_empty());
    // Further runs leave the live pod alone.
    let r = gc::run_once(&*store, Some("n1"), &cfg, false).unwrap();
    assert!(r.leak_candidates.is_empty() && r.leaks_freed.is_empty(), "{r:#?}");

    // An address whose endpoint record is gone is a leak for any collector.
    store.delete(&keys::attachment(&handle("kept")).unwrap()).unwrap();
    let r = gc::run_once(&*store, None, &cfg, false).unwrap();
    assert_eq!(leak_addresses(&r), [kept], "{r:#?}");
    assert_eq!(r.leak_candidates[0].reason, LeakReason::NoEndpoint);
    wait_past(r.leak_candidates[0].due_at_ms);
    let r = gc::run_once(&*store, None, &cfg, false).unwrap();
    assert_eq!(freed_addresses(&r), [kept], "{r:#?}");
    // The stale pod key went with it.
    assert!(keys_under(&*store, keys::ENDPOINTS).is_empty());

    // The runtime's DELs still succeed.
    del(&node, &plugins, a.socket(), "lost", &k8s("ns", "lost"));
    del(&node, &plugins, a.socket(), "kept", &k8s("ns", "kept"));
    assert!(list_blocks(&*store).unwrap().iter().all(|b| b.value.is_empty()));
}

#[test]
fn agent_collects_on_its_own() {
    let etcd = Etcd::start();
    let dir = TempDir::new();
    let plugins = Plugins::new(tern_bin());
    let store = etcd_store(&etcd);
    let cfg = GcConfig {
        interval: Duration::from_millis(300),
        block_grace: Duration::from_secs(2),
        leak_grace: Duration::from_secs(2),
    };
    let a = agent(&store, &dir, "n1", cfg);
    let node = Netns::new("gnode");
    let gone_pod = Netns::new("gpod");
    let live_pod = Netns::new("gpod");
    let lost = add(&node, &plugins, a.socket(), "lost", &gone_pod.path(), "")[0];
    let kept = add(&node, &plugins, a.socket(), "kept", &live_pod.path(), "")[0];
    let cidr = block_of(&*store, lost);
    assert!(a.endpoints().wait_idle(Duration::from_secs(10)));

    let t0 = Instant::now();
    gone_pod.delete_now();
    assert!(wait_until(Duration::from_secs(30), || held(&*store, lost).is_none()), "leak never freed");
    assert!(t0.elapsed() >= Duration::from_secs(2), "freed after {:?}, before the grace period", t0.elapsed());
    assert_eq!(held(&*store, kept), Some(handle("kept")));
    // The record goes right after the address, in the same round.
    let recorded = |cid: &str| endpoints::get_by_handle(&*store, &handle(cid)).unwrap().is_some();
    assert!(wait_until(Duration::from_secs(10), || !recorded("lost")));
    assert!(recorded("kept"));

    let t1 = Instant::now();
    del(&node, &plugins, a.socket(), "kept", "");
    assert!(wait_until(Duration::from_secs(30), || get_block(&*store, &cidr).unwrap().is_none()), "block kept");
    assert!(t1.elapsed() >= Duration::from_secs(2), "released after {:?}, before the grace period", t1.elapsed());
    del(&node, &plugins, a.socket(), "lost", "");
    assert!(keys_under(&*store, keys::ATTACHMENTS).is_empty());
    assert!(keys_under(&*store, keys::IPAM_LEAKS).is_empty());
    assert!(keys_under(&*store, keys::IPAM_IDLE).is_empty());
}

#[test]
fn dead_nodes_blocks_reclaimed_after_grace_only_when_unused() {
    let etcd = Etcd::start();
    let dir = TempDir::new();
    let plugins = Plugins::new(tern_bin());
    let store = etcd_store(&etcd);
    let ds = format!("etcd:{}", etcd.endpoint());
    let mut doomed = agent_proc(&dir, "doomed", &ds);
    let alive = agent(&store, &dir, "alive", grace(300, 300));
    let node = Netns::new("gnode");
    let pod = Netns::new("gpod");

    let d1 = add(&node, &plugins, &doomed.socket, "d1", &pod.path(), &k8s("ns", "d1"))[0];
    let d2 = add(&node, &plugins, &doomed.socket, "d2", &pod.path(), &k8s("ns", "d2"))[0];
    let cidr = block_of(&*store, d1);
    let recorded = |cid: &str| endpoints::get_by_handle(&*store, &handle(cid)).unwrap().is_some();
    assert!(wait_until(Duration::from_secs(10), || recorded("d1") && recorded("d2")));
    // A pod of the live node holding an address in the doomed node's block,
    // as borrowing does when the live node's pool has no free block.
    let borrowed = {
        let b = get_block(&*store, &cidr).unwrap().unwrap();
        let mut rec = b.value.clone();
        let ip = rec.allocate_borrowed(&handle("borrowed"), "alive").unwrap();
        write_block(&*store, b.revision, &rec).unwrap();
        let info = tern_agent::EndpointInfo {
            container_id: "borrowed".into(),
            ifname: "eth0".into(),
            netns: Some(pod.path().to_string_lossy().into_owned()),
            ..Default::default()
        };
        endpoints::put(&*store, &EndpointRecord::new(&handle("borrowed"), "alive", vec![ip], Some(&info))).unwrap();
        ip
    };
    assert_eq!(nodes_in(&*store), ["alive", "doomed"]);

    // The node stops renewing its lease: it disappears after the TTL.
    // How peers reach the doomed node: its routing record outlives its lease.
    let rec = tern_agent::routing::RoutingRecord {
        name: "doomed".into(),
        underlay: "10.10.9.9/24".parse().unwrap(),
        vtep: None,
        mode: tern_routing::Mode::Direct,
    };
    tern_agent::routing::publish(&*store, &rec).unwrap();
    let routing_key = format!("{}doomed", tern_agent::routing::ROUTING_PREFIX);
    let t0 = Instant::now();
    doomed.kill9();
    assert!(wait_until(Duration::from_secs(20), || nodes_in(&*store) == ["alive"]), "{}", doomed.log_text());
    assert!(t0.elapsed() >= Duration::from_secs(1), "node gone after {:?}, before its lease ran out", t0.elapsed());

    let cfg = grace(2, 5);
    let r1 = gc::run_once(&*store, None, &cfg, false).unwrap();
    let mut cands = leak_addresses(&r1);
    cands.sort();
    assert_eq!(cands, [d1, d2], "{r1:#?}");
    assert!(r1.leak_candidates.iter().all(|c| c.reason == LeakReason::NodeDead && c.node == "doomed"));
    assert_eq!(r1.blocks_waiting.len(), 1, "{r1:#?}");
    let w = &r1.blocks_waiting[0];
    assert_eq!((w.cidr, w.reason, w.in_use), (cidr, IdleReason::NodeDead, 3));
    assert!(r1.dead_node_blocks_reclaimed.is_empty() && r1.leaks_freed.is_empty());

    // Block grace over, leak grace not: the block waits for its addresses.
    wait_past(w.due_at_ms);
    let r2 = gc::run_once(&*store, None, &cfg, false).unwrap();
    assert!(r2.dead_node_blocks_reclaimed.is_empty(), "reclaimed with addresses in use: {r2:#?}");
    assert!(get_block(&*store, &cidr).unwrap().is_some());

    wait_past(r1.leak_candidates.iter().map(|c| c.due_at_ms).max().unwrap());
    let r3 = gc::run_once(&*store, None, &cfg, false).unwrap();
    let mut freed = freed_addresses(&r3);
    freed.sort();
    assert_eq!(freed, [d1, d2], "{r3:#?}");
    // The live node's pod still holds its address: the block stays.
    assert!(r3.dead_node_blocks_reclaimed.is_empty(), "{r3:#?}");
    assert_eq!(r3.blocks_waiting[0].in_use, 1);
    assert_eq!(held(&*store, borrowed), Some(handle("borrowed")));
    assert!(r3.routing_records_withdrawn.is_empty(), "withdrawn while it still owns a block: {r3:#?}");
    assert!(store.get(&routing_key).unwrap().is_some());
    assert_eq!(endpoints::get_by_pod(&*store, "ns", "d1", "eth0").unwrap(), None);
    assert!(endpoints::get_by_handle(&*store, &handle("d2")).unwrap().is_none());

    // The borrower releases it (its DEL); now the block goes.
    {
        let b = get_block(&*store, &cidr).unwrap().unwrap();
        let mut rec = b.value.clone();
        rec.release(borrowed);
        write_block(&*store, b.revision, &rec).unwrap();
        endpoints::remove(&*store, &handle("borrowed")).unwrap();
    }
    let before = snapshot(&*store);
    let dry = gc::run_once(&*store, None, &cfg, true).unwrap();
    assert_eq!(dry.dead_node_blocks_reclaimed.iter().map(|b| b.cidr).collect::<Vec<_>>(), [cidr]);
    assert_eq!(snapshot(&*store), before, "dry run wrote");
    let r4 = gc::run_once(&*store, None, &cfg, false).unwrap();
    assert_eq!(r4.dead_node_blocks_reclaimed.iter().map(|b| b.cidr).collect::<Vec<_>>(), [cidr], "{r4:#?}");
    // Its last block gone, the dead node is gone for good: peers drop it.
    assert_eq!(dry.routing_records_withdrawn, ["doomed"]);
    assert_eq!(r4.routing_records_withdrawn, ["doomed"]);
    assert!(store.get(&routing_key).unwrap().is_none());
    assert!(list_blocks(&*store).unwrap().is_empty());
    assert!(keys_under(&*store, &keys::affinity_prefix("doomed").unwrap()).is_empty());
    for prefix in [keys::IPAM_IDLE, keys::IPAM_LEAKS, keys::ATTACHMENTS, keys::ENDPOINTS] {
        assert!(keys_under(&*store, prefix).is_empty(), "{prefix}: {:?}", keys_under(&*store, prefix));
    }
    drop(alive);
}

#[test]
fn node_back_within_grace_keeps_its_addresses() {
    let etcd = Etcd::start();
    let dir = TempDir::new();
    let plugins = Plugins::new(tern_bin());
    let store = etcd_store(&etcd);
    let ds = format!("etcd:{}", etcd.endpoint());
    let mut n1 = agent_proc(&dir, "n1", &ds);
    let node = Netns::new("gnode");
    let pod = Netns::new("gpod");
    let ip = add(&node, &plugins, &n1.socket, "p", &pod.path(), &k8s("ns", "p"))[0];
    let cfg = grace(3600, 3600);
    // The agent writes the record a moment after the ADD (killed before
    // that, its successor writes a minimal one at start).
    assert!(wait_until(Duration::from_secs(10), || endpoints::get_by_handle(&*store, &handle("p")).unwrap().is_some()));

    n1.kill9();
    assert!(wait_until(Duration::from_secs(20), || nodes_in(&*store).is_empty()));
    let r = gc::run_once(&*store, None, &cfg, false).unwrap();
    assert_eq!(leak_addresses(&r), [ip], "{r:#?}");
    assert_eq!(r.blocks_waiting.len(), 1);
    assert!(!keys_under(&*store, keys::IPAM_LEAKS).is_empty());

    // Back before the grace periods end: nothing freed, the marks go.
    let n1 = agent_proc(&dir, "n1", &ds);
    assert_eq!(nodes_in(&*store), ["n1"]);
    let r = gc::run_once(&*store, None, &cfg, false).unwrap();
    assert!(r.leak_candidates.is_empty() && r.blocks_waiting.is_empty(), "{r:#?}");
    assert!(keys_under(&*store, keys::IPAM_LEAKS).is_empty());
    assert!(keys_under(&*store, keys::IPAM_IDLE).is_empty());
    assert_eq!(held(&*store, ip), Some(handle("p")));
    del(&node, &plugins, &n1.socket, "p", &k8s("ns", "p"));
    assert_eq!(held(&*store, ip), None);
}

#[test]
fn endpoint_record_waits_for_the_store_and_never_fails_an_add() {
    let mut etcd = Etcd::start();
    let dir = TempDir::new();
    let plugins = Plugins::new(tern_bin());
    let store = etcd_store(&etcd);
    let pool = PoolConfig { pool: Pool::new(POOL.parse().unwrap(), Some(26)).unwrap(), max_blocks: None };
    let mut cfg = AgentConfig::new("n1", etcd_store(&etcd), dir.join("n1.sock"), vec![pool]);
    cfg.state_dir = dir.join("n1-state");
    cfg.warm = tern_agent::WarmConfig { warm_ip_target: 2, minimum_ip_target: 0 };
    cfg.gc = grace(300, 300);
    let a = Agent::start(cfg).unwrap();
    assert!(wait_until(Duration::from_secs(30), || a.ipam().warm_free() == 2 && a.ipam().pending() == 0));
    let node = Netns::new("gnode");
    let pod = Netns::new("gpod");

    etcd.stop();
    // Served from the warm pool; the record waits in the agent's queue.
    let ip = add(&node, &plugins, a.socket(), "w", &pod.path(), &k8s("ns", "w"))[0];
    assert_eq!(a.endpoints().pending_count(), 1);
    assert!(a.endpoints().pending_handles().contains(&handle("w")));

    etcd.restart();
    assert!(a.endpoints().wait_idle(Duration::from_secs(30)), "queued record never written");
    let rec = endpoints::get_by_pod(&*store, "ns", "w", "eth0").unwrap().expect("record after the store returned");
    assert_eq!((rec.handle.as_str(), rec.addresses.as_slice()), (handle("w").as_str(), &[ip][..]));
    assert!(wait_until(Duration::from_secs(30), || a.ipam().pending() == 0));
    assert_eq!(held(&*store, ip), Some(handle("w")));
    let r = gc::run_once(&*store, Some("n1"), &grace(3600, 3600), false).unwrap();
    assert!(r.leak_candidates.is_empty(), "{r:#?}");

    del(&node, &plugins, a.socket(), "w", &k8s("ns", "w"));
    assert!(a.endpoints().wait_idle(Duration::from_secs(10)));
    assert!(keys_under(&*store, keys::ENDPOINTS).is_empty());
    assert!(keys_under(&*store, keys::ATTACHMENTS).is_empty());
}
