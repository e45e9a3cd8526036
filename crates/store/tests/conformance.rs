//! One conformance suite, run unchanged against LocalStore (a temp
//! directory) and EtcdStore (a real etcd per test, started by
//! `tern_testkit::Etcd` on free loopback ports and killed by pid).
mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use common::{EtcdFx, Fixture, LocalFx};
use ipnet::IpNet;
use tern_ipam::block::Pool;
use tern_store::ipam::{
    self, claim_block, ensure_pool, get_block, list_blocks, node_blocks, reconcile_affinities, release_block_if_empty,
    write_block, Claim, ClaimOptions, IpamError, Release,
};
use tern_store::{keys, Datastore, StoreError, WatchEvent};

macro_rules! suite {
    ($($t:ident),* $(,)?) => {
        mod local {
            $( #[test] fn $t() { super::$t(&super::LocalFx::new()); } )*
        }
        mod etcd {
            $( #[test] fn $t() { super::$t(&super::EtcdFx::new()); } )*
        }
    };
}

suite!(
    get_put_list_delete,
    compare_and_swap_semantics,
    list_prefix_boundaries,
    lease_expiry_deletes_keys,
    lease_keep_alive_and_revoke,
    watch_delivers_puts_and_deletes,
    watch_from_revision_replays,
    watch_burst_converges,
    concurrent_claims_never_double_claim,
    release_block_only_when_empty_and_owned,
    claim_limits_and_pool_conflicts,
    schema_version_and_corrupt_records,
);

/// The next event within `t`, failing the test on timeout or error.
fn next_event(w: &tern_store::Watch, t: Duration) -> WatchEvent {
    match w.recv_timeout(t) {
        Some(Ok(ev)) => ev,
        Some(Err(e)) => panic!("watch failed: {e}"),
        None => panic!("no watch event within {t:?}"),
    }
}

fn get_put_list_delete(fx: &dyn Fixture) {
    let s = fx.client();
    assert_eq!(s.get("/t/a").unwrap(), None);
    let r1 = s.put("/t/a", b"one", None).unwrap();
    assert!(r1 > 0);
    let kv = s.get("/t/a").unwrap().expect("present");
    assert_eq!((kv.key.as_str(), kv.value.as_slice(), kv.revision, kv.create_revision), ("/t/a", &b"one"[..], r1, r1));
    assert_eq!(kv.lease, None);
    let r2 = s.put("/t/a", b"two", None).unwrap();
    assert!(r2 > r1, "revisions increase: {r1} then {r2}");
    let kv = s.get("/t/a").unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.revision, kv.create_revision), (&b"two"[..], r2, r1));
    // Binary values and keys with the characters the layout uses.
    let odd = "/t/ipam/blocks/fd00::40-122";
    s.put(odd, &[0, 255, b'\n', 1], None).unwrap();
    s.put("/t/with space/x.y", b"", None).unwrap();
    let l = s.list("/t/").unwrap();
    let keys: Vec<&str> = l.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, vec!["/t/a", odd, "/t/with space/x.y"], "sorted by key");
    assert_eq!(l.kvs[1].value, vec![0, 255, b'\n', 1]);
    assert_eq!(l.kvs[2].value, b"");
    assert!(l.revision >= r2);
    assert!(s.delete("/t/a").unwrap());
    assert!(!s.delete("/t/a").unwrap());
    assert_eq!(s.get("/t/a").unwrap(), None);
    assert_eq!(s.list("/t/").unwrap().kvs.len(), 2);
    // Another client sees the same data.
    let other = fx.client();
    assert_eq!(other.get(odd).unwrap().unwrap().value, vec![0, 255, b'\n', 1]);
    assert!(s.list("").unwrap().kvs.len() >= 2);
    // Keys are checked the same way everywhere.
    assert!(matches!(s.put("relative", b"", None), Err(StoreError::Invalid(_))));
    assert!(matches!(s.get("/a\nb"), Err(StoreError::Invalid(_))));
    assert!(s.describe().starts_with(fx.kind()), "{}", s.describe());
}

fn compare_and_swap_semantics(fx: &dyn Fixture) {
    let s = fx.client();
    let k = "/cas/k";
    let r1 = s.create(k, b"v1", None).unwrap();
    match s.create(k, b"again", None) {
        Err(StoreError::Conflict { key, current }) => assert_eq!((key.as_str(), current), (k, r1)),
        other => panic!("create over an existing key: {other:?}"),
    }
    let r2 = s.compare_and_swap(k, r1, b"v2", None).unwrap();
    assert!(r2 > r1);
    match s.compare_and_swap(k, r1, b"stale", None) {
        Err(StoreError::Conflict { current, .. }) => assert_eq!(current, r2),
        other => panic!("swap with a stale revision: {other:?}"),
    }
    assert_eq!(s.get(k).unwrap().unwrap().value, b"v2", "a lost swap changes nothing");
    assert_eq!(s.get(k).unwrap().unwrap().create_revision, r1, "create revision survives swaps");
    match s.delete_if_revision(k, r1) {
        Err(StoreError::Conflict { current, .. }) => assert_eq!(current, r2),
        other => panic!("delete with a stale revision: {other:?}"),
    }
    s.delete_if_revision(k, r2).unwrap();
    assert_eq!(s.get(k).unwrap(), None);
    assert!(matches!(s.compare_and_swap(k, r2, b"x", None), Err(StoreError::NotFound { .. })));
    assert!(matches!(s.compare_and_swap(k, 0, b"x", None), Err(StoreError::NotFound { .. })), "0 never matches");
    assert!(matches!(s.delete_if_revision(k, r2), Err(StoreError::NotFound { .. })));
    // Recreated: a new create revision; the old revision no longer matches (no ABA).
    let r3 = s.create(k, b"v3", None).unwrap();
    assert!(r3 > r2);
    assert_eq!(s.get(k).unwrap().unwrap().create_revision, r3);
    assert!(s.compare_and_swap(k, r1, b"x", None).unwrap_err().is_conflict());

    // Racing swaps from several clients: exactly one wins each round.
    let clients: Vec<Box<dyn Datastore>> = (0..3).map(|_| fx.client()).collect();
    let counter = "/cas/counter";
    s.create(counter, b"0", None).unwrap();
    let barrier = Barrier::new(clients.len());
    std::thread::scope(|sc| {
        for c in &clients {
            let barrier = &barrier;
            sc.spawn(move || {
                barrier.wait();
                for _ in 0..20 {
                    loop {
                        let kv = c.get(counter).unwrap().unwrap();
                        let n: u64 = String::from_utf8(kv.value).unwrap().parse().unwrap();
                        match c.compare_and_swap(counter, kv.revision, (n + 1).to_string().as_bytes(), None) {
                            Ok(_) => break,
                            Err(e) if e.is_conflict() => continue,
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            });
        }
    });
    assert_eq!(s.get(counter).unwrap().unwrap().value, b"60", "no lost update");
}

fn list_prefix_boundaries(fx: &dyn Fixture) {
    let s = fx.client();
    for k in ["/p/a", "/p/ab", "/p/a/b", "/p/a/b/c", "/pa", "/p"] {
        s.put(k, k.as_bytes(), None).unwrap();
    }
    let names = |prefix: &str| -> Vec<String> { s.list(prefix).unwrap().kvs.into_iter().map(|kv| kv.key).collect() };
    assert_eq!(names("/p/a"), vec!["/p/a", "/p/a/b", "/p/a/b/c", "/p/ab"]);
    assert_eq!(names("/p/a/"), vec!["/p/a/b", "/p/a/b/c"]);
    assert_eq!(names("/p/"), vec!["/p/a", "/p/a/b", "/p/a/b/c", "/p/ab"]);
    assert_eq!(names("/p"), vec!["/p", "/p/a", "/p/a/b", "/p/a/b/c", "/p/ab", "/pa"]);
    assert_eq!(names("/q"), Vec::<String>::new());
    assert_eq!(names("/p/a/b/c"), vec!["/p/a/b/c"]);
}

fn lease_expiry_deletes_keys(fx: &dyn Fixture) {
    let s = fx.client();
    // Ask for 1 s: etcd raises it to its minimum (2 s by default); report what we got.
    let short = s.grant_lease(Duration::from_millis(1)).unwrap();
    assert!(short.ttl >= Duration::from_secs(1), "{short:?}");
    eprintln!("{}: asked for a 1 s lease, granted {:?}", fx.kind(), short.ttl);

    let lease = s.grant_lease(Duration::from_secs(2)).unwrap();
    assert_eq!(lease.ttl, Duration::from_secs(2));
    let w = s.watch("/lease/", None).unwrap();
    let t0 = Instant::now();
    s.put("/lease/a", b"a", Some(lease.id)).unwrap();
    s.create("/lease/b", b"b", Some(lease.id)).unwrap();
    s.put("/lease/keep", b"k", None).unwrap();
    assert_eq!(s.get("/lease/a").unwrap().unwrap().lease, Some(lease.id));
    for _ in 0..3 {
        assert!(matches!(next_event(&w, Duration::from_secs(5)), WatchEvent::Put(_)));
    }
    // Both leased keys disappear after the TTL (etcd checks every 500 ms).
    let mut deleted = HashSet::new();
    while deleted.len() < 2 {
        match next_event(&w, Duration::from_secs(8)) {
            WatchEvent::Delete { key, .. } => {
                deleted.insert(key);
            }
            ev => panic!("unexpected {ev:?}"),
        }
    }
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1900), "expired too early: {took:?}");
    assert!(took < Duration::from_secs(8), "expired too late: {took:?}");
    assert_eq!(deleted, HashSet::from(["/lease/a".to_string(), "/lease/b".to_string()]));
    assert_eq!(s.get("/lease/a").unwrap(), None);
    assert_eq!(s.get("/lease/keep").unwrap().unwrap().value, b"k", "keys without the lease stay");
    assert!(matches!(s.keep_alive(lease.id), Err(StoreError::LeaseNotFound(_))));
    assert!(matches!(s.put("/lease/c", b"c", Some(lease.id)), Err(StoreError::LeaseNotFound(_))));
    assert!(matches!(s.create("/lease/c", b"c", Some(lease.id)), Err(StoreError::LeaseNotFound(_))));
    assert_eq!(s.get("/lease/c").unwrap(), None);
    s.revoke_lease(lease.id).unwrap();
}

fn lease_keep_alive_and_revoke(fx: &dyn Fixture) {
    let s = fx.client();
    let lease = s.grant_lease(Duration::from_secs(2)).unwrap();
    s.put("/ka/node", b"alive", Some(lease.id)).unwrap();
    // Renewed every 600 ms, it outlives its TTL twice over.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        assert_eq!(s.keep_alive(lease.id).unwrap(), Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(600));
    }
    assert!(s.get("/ka/node").unwrap().is_some(), "renewed lease kept its key");
    // Another client can renew it too (the agent's lease survives a reconnect).
    assert!(fx.client().keep_alive(lease.id).is_ok());
    s.revoke_lease(lease.id).unwrap();
    assert_eq!(s.get("/ka/node").unwrap(), None, "revoke deletes at once");
    s.revoke_lease(lease.id).unwrap();
    let r = s.keep_alive(lease.id);
    assert!(matches!(r, Err(StoreError::LeaseNotFound(_))), "{r:?}");
}

fn watch_delivers_puts_and_deletes(fx: &dyn Fixture) {
    let s = fx.client();
    s.put("/w/before", b"0", None).unwrap();
    let w = s.watch("/w/", None).unwrap();
    let writer = fx.client();
    let t = Duration::from_secs(5);
    let r1 = writer.put("/w/a", b"1", None).unwrap();
    match next_event(&w, t) {
        WatchEvent::Put(kv) => assert_eq!((kv.key.as_str(), kv.value.as_slice(), kv.revision), ("/w/a", &b"1"[..], r1)),
        ev => panic!("{ev:?}"),
    }
    writer.put("/other/x", b"outside the prefix", None).unwrap();
    let r2 = writer.compare_and_swap("/w/a", r1, b"2", None).unwrap();
    match next_event(&w, t) {
        WatchEvent::Put(kv) => assert_eq!((kv.value.as_slice(), kv.revision, kv.create_revision), (&b"2"[..], r2, r1)),
        ev => panic!("{ev:?}"),
    }
    assert!(writer.delete("/w/a").unwrap());
    match next_event(&w, t) {
        WatchEvent::Delete { key, revision } => {
            assert_eq!(key, "/w/a");
            assert!(revision > r2);
        }
        ev => panic!("{ev:?}"),
    }
    writer.delete("/w/before").unwrap();
    assert_eq!(next_event(&w, t).key(), "/w/before");
    assert!(w.recv_timeout(Duration::from_millis(300)).is_none(), "nothing else (the /other write is outside)");
    // A second watch on another prefix sees only its own keys.
    let w2 = s.watch("/v/", None).unwrap();
    writer.put("/v/1", b"x", None).unwrap();
    assert_eq!(next_event(&w2, t).key(), "/v/1");
    assert!(w.recv_timeout(Duration::from_millis(200)).is_none());
    drop(w);
    writer.put("/w/after-drop", b"x", None).unwrap();
}

fn watch_from_revision_replays(fx: &dyn Fixture) {
    let s = fx.client();
    s.put("/r/a", b"a", None).unwrap();
    s.put("/r/b", b"b", None).unwrap();
    let listing = s.list("/r/").unwrap();
    // Changes between the list and the watch are not lost.
    s.put("/r/c", b"c", None).unwrap();
    s.delete("/r/a").unwrap();
    let w = s.watch("/r/", Some(listing.revision + 1)).unwrap();
    let t = Duration::from_secs(5);
    let e1 = next_event(&w, t);
    let e2 = next_event(&w, t);
    assert!(matches!(&e1, WatchEvent::Put(kv) if kv.key == "/r/c"), "{e1:?}");
    assert!(matches!(&e2, WatchEvent::Delete { key, .. } if key == "/r/a"), "{e2:?}");
    assert!(e1.revision() < e2.revision());
    s.put("/r/d", b"d", None).unwrap();
    assert_eq!(next_event(&w, t).key(), "/r/d");
}

/// A burst of writes without waiting: every event comes in revision order
/// and replaying them gives the final state (LocalStore may merge several
/// writes of one key into the last; etcd delivers each).
fn watch_burst_converges(fx: &dyn Fixture) {
    let s = fx.client();
    let w = s.watch("/burst/", None).unwrap();
    for i in 0..40 {
        let k = format!("/burst/{}", i % 7);
        if i % 5 == 4 {
            s.delete(&k).unwrap();
        } else {
            s.put(&k, i.to_string().as_bytes(), None).unwrap();
        }
    }
    let listing = s.list("/burst/").unwrap();
    let final_rev = listing.revision;
    let want: BTreeMap<String, Vec<u8>> = listing.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
    let mut state: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut prev = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while state != want || prev < final_rev {
        assert!(Instant::now() < deadline, "did not converge: {state:?} vs {want:?}");
        let Some(ev) = w.recv_timeout(Duration::from_millis(500)) else { continue };
        let ev = ev.unwrap();
        assert!(ev.revision() > prev, "revision order");
        assert!(ev.revision() <= final_rev);
        prev = ev.revision();
        match ev {
            WatchEvent::Put(kv) => {
                state.insert(kv.key, kv.value);
            }
            WatchEvent::Delete { key, .. } => {
                state.remove(&key);
            }
        }
    }
}

fn pool(cidr: &str) -> Pool {
    Pool::parse(cidr, None).unwrap()
}

/// Three nodes, each with its own client, race for 3 x 50 blocks of a /20
/// (64 blocks of /26): every block is claimed exactly once, by one node,
/// then everyone sees the pool exhausted.
fn concurrent_claims_never_double_claim(fx: &dyn Fixture) {
    let p = pool("10.10.0.0/20");
    let nodes = ["node-a", "node-b", "node-c"];
    let barrier = Barrier::new(nodes.len());
    let results: Vec<(String, Vec<IpNet>, usize)> = std::thread::scope(|sc| {
        let handles: Vec<_> = nodes
            .iter()
            .map(|node| {
                let barrier = &barrier;
                let p = &p;
                sc.spawn(move || {
                    let store = fx.client();
                    barrier.wait();
                    let mut mine = Vec::new();
                    let mut exhausted = 0;
                    for _ in 0..50 {
                        match claim_block(store.as_ref(), node, p, &ClaimOptions::default()).unwrap() {
                            Claim::Claimed(b) => {
                                assert_eq!(b.value.node, *node);
                                assert!(b.value.is_empty());
                                mine.push(b.value.cidr());
                            }
                            Claim::Exhausted => exhausted += 1,
                            other => panic!("{other:?}"),
                        }
                    }
                    (node.to_string(), mine, exhausted)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut all = HashSet::new();
    for (node, mine, exhausted) in &results {
        eprintln!("{}: {node} claimed {} blocks, saw exhaustion {exhausted} times", fx.kind(), mine.len());
        for b in mine {
            assert!(p.has_block(b));
            assert!(all.insert(*b), "{b} claimed twice");
        }
    }
    assert_eq!(all.len(), 64, "every block claimed once");
    assert_eq!(results.iter().map(|r| r.2).sum::<usize>(), 150 - 64, "the rest saw Exhausted");
    // The store agrees: 64 records, each owned by the node that claimed it.
    let s = fx.client();
    let blocks = list_blocks(s.as_ref()).unwrap();
    assert_eq!(blocks.len(), 64);
    let owner: HashMap<IpNet, String> =
        results.iter().flat_map(|(n, m, _)| m.iter().map(move |b| (*b, n.clone()))).collect();
    for b in &blocks {
        assert_eq!(owner[&b.value.cidr()], b.value.node);
    }
    for (node, mine, _) in &results {
        assert_eq!(node_blocks(s.as_ref(), node).unwrap().len(), mine.len());
        assert_eq!(s.list(&keys::affinity_prefix(node).unwrap()).unwrap().kvs.len(), mine.len());
        assert_eq!(reconcile_affinities(s.as_ref(), node).unwrap(), (0, 0), "index already complete");
    }
    assert_eq!(claim_block(s.as_ref(), "node-d", &p, &ClaimOptions::default()).unwrap(), Claim::Exhausted);
}

fn release_block_only_when_empty_and_owned(fx: &dyn Fixture) {
    let s = fx.client();
    let s = s.as_ref();
    let p = pool("10.20.0.0/24");
    let Claim::Claimed(mut b) = claim_block(s, "n1", &p, &ClaimOptions::default()).unwrap() else { panic!() };
    let cidr = b.value.cidr();
    // Allocate an address with a compare-and-swap on the block.
    let ip = b.value.allocate("pod-1").unwrap();
    b.revision = write_block(s, b.revision, &b.value).unwrap();
    assert_eq!(get_block(s, &cidr).unwrap().unwrap().value.handle_of(ip), Some("pod-1"));
    assert_eq!(release_block_if_empty(s, "n1", &cidr).unwrap(), Release::NotEmpty);
    assert_eq!(release_block_if_empty(s, "n2", &cidr).unwrap(), Release::NotOwner { owner: "n1".into() });
    // A write from a stale read loses.
    let stale = b.clone();
    assert_eq!(b.value.release(ip).as_deref(), Some("pod-1"));
    b.revision = write_block(s, b.revision, &b.value).unwrap();
    let mut lost = stale.value.clone();
    lost.allocate("pod-2").unwrap();
    assert!(write_block(s, stale.revision, &lost).unwrap_err().is_conflict());
    // Empty now: released, the index entry goes with it, and the block is claimable again.
    assert_eq!(release_block_if_empty(s, "n1", &cidr).unwrap(), Release::Released);
    assert_eq!(get_block(s, &cidr).unwrap(), None);
    assert_eq!(s.get(&keys::affinity("n1", &cidr).unwrap()).unwrap(), None);
    assert_eq!(release_block_if_empty(s, "n1", &cidr).unwrap(), Release::Absent);
    assert!(matches!(claim_block(s, "n2", &p, &ClaimOptions::default()).unwrap(), Claim::Claimed(_)));

    // A stale index entry (crash between release and index cleanup) and a
    // missing one (crash between claim and index write) are both repaired.
    let ghost: IpNet = "10.20.0.192/26".parse().unwrap();
    s.put(&keys::affinity("n2", &ghost).unwrap(), b"{}", None).unwrap();
    let owned = node_blocks(s, "n2").unwrap();
    s.delete(&keys::affinity("n2", &owned[0].value.cidr()).unwrap()).unwrap();
    assert_eq!(reconcile_affinities(s, "n2").unwrap(), (1, 1));
    assert_eq!(reconcile_affinities(s, "n2").unwrap(), (0, 0));
}

fn claim_limits_and_pool_conflicts(fx: &dyn Fixture) {
    let s = fx.client();
    let s = s.as_ref();
    let p = pool("10.30.0.0/22");
    let opts = ClaimOptions { max_blocks: Some(2) };
    assert!(matches!(claim_block(s, "n1", &p, &opts).unwrap(), Claim::Claimed(_)));
    assert!(matches!(claim_block(s, "n1", &p, &opts).unwrap(), Claim::Claimed(_)));
    assert_eq!(claim_block(s, "n1", &p, &opts).unwrap(), Claim::LimitReached { have: 2, max: 2 });
    assert!(matches!(claim_block(s, "n2", &p, &opts).unwrap(), Claim::Claimed(_)), "the limit is per node");
    // The pool's block size is pinned; overlapping pools are refused.
    let other_size = Pool::parse("10.30.0.0/22", Some(28)).unwrap();
    assert!(matches!(ensure_pool(s, &other_size), Err(IpamError::PoolConflict { .. })));
    assert!(matches!(claim_block(s, "n1", &other_size, &opts), Err(IpamError::PoolConflict { .. })));
    assert!(matches!(ensure_pool(s, &pool("10.30.0.0/16")), Err(IpamError::PoolConflict { .. })));
    assert!(matches!(ensure_pool(s, &pool("10.30.2.0/24")), Err(IpamError::PoolConflict { .. })));
    ensure_pool(s, &p).unwrap();
    // IPv6 works the same way, side by side.
    let p6 = pool("fd00:30::/120");
    let Claim::Claimed(b6) = claim_block(s, "n1", &p6, &opts).unwrap() else { panic!() };
    assert_eq!(b6.value.cidr().prefix_len(), 122);
    assert_eq!(ipam::list_pools(s).unwrap().len(), 2);
    assert!(matches!(claim_block(s, "bad/name", &p6, &opts), Err(IpamError::Store(StoreError::Invalid(_)))));
}

fn schema_version_and_corrupt_records(fx: &dyn Fixture) {
    let s = fx.client();
    let s = s.as_ref();
    assert_eq!(keys::ensure_schema(s).unwrap(), 1);
    assert_eq!(keys::ensure_schema(s).unwrap(), 1);
    let kv = s.get(keys::SCHEMA_KEY).unwrap().unwrap();
    s.compare_and_swap(keys::SCHEMA_KEY, kv.revision, br#"{"version":2}"#, None).unwrap();
    assert_eq!(keys::ensure_schema(s).unwrap_err(), StoreError::Schema { found: 2, supported: 1 });
    // A block record that does not decode is reported with its key.
    let key = keys::block(&"10.40.0.0/26".parse().unwrap());
    s.put(&key, b"{not json", None).unwrap();
    match list_blocks(s) {
        Err(StoreError::Corrupt { key: k, .. }) => assert_eq!(k, key),
        other => panic!("{other:?}"),
    }
}
