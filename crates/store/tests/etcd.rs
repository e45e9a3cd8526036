//! EtcdStore when etcd goes away: every call answers `Unavailable` within
//! the timeout (never hangs), watches end with an error, and the same
//! client works again once etcd is back.
mod common;

use std::time::{Duration, Instant};

use common::{etcd_options, EtcdFx};
use tern_store::{Datastore, EtcdStore, StoreError};

/// Runs `f`, checks it fails with Unavailable, and returns how long it took.
fn unavailable<T: std::fmt::Debug>(what: &str, f: impl FnOnce() -> Result<T, StoreError>) -> Duration {
    let t0 = Instant::now();
    let r = f();
    let took = t0.elapsed();
    match r {
        Err(StoreError::Unavailable { .. }) => {}
        other => panic!("{what}: expected Unavailable, got {other:?}"),
    }
    // The options say 2 s per call; allow scheduling slack, never a hang.
    assert!(took < Duration::from_secs(4), "{what} took {took:?}");
    took
}

#[test]
fn stopped_etcd_is_unavailable_then_recovers() {
    let mut fx = EtcdFx::new();
    let s = fx.open();
    let r = s.put("/u/k", b"v", None).unwrap();
    let lease = s.grant_lease(Duration::from_secs(30)).unwrap();
    let w = s.watch("/u/", None).unwrap();

    fx.etcd.stop();
    let mut times = vec![
        unavailable("get", || s.get("/u/k")),
        unavailable("list", || s.list("/u/")),
        unavailable("put", || s.put("/u/k", b"x", None)),
        unavailable("create", || s.create("/u/new", b"x", None)),
        unavailable("compare_and_swap", || s.compare_and_swap("/u/k", r, b"x", None)),
        unavailable("delete_if_revision", || s.delete_if_revision("/u/k", r)),
        unavailable("grant_lease", || s.grant_lease(Duration::from_secs(5))),
        unavailable("keep_alive", || s.keep_alive(lease.id)),
        unavailable("watch", || s.watch("/u/", None)),
    ];
    // A client made while etcd is down: connecting does not need etcd.
    let late = EtcdStore::connect(&fx.etcd.endpoints(), etcd_options()).expect("lazy connect");
    times.push(unavailable("get on a new client", || late.get("/u/k")));
    eprintln!("calls against a stopped etcd failed after {times:?}");
    // The established watch ends with an error instead of going silent.
    match w.recv_timeout(Duration::from_secs(5)) {
        Some(Err(StoreError::Unavailable { .. })) => {}
        other => panic!("watch on a stopped etcd: {other:?}"),
    }
    let e = s.get("/u/k").unwrap_err();
    assert!(e.is_unavailable());
    assert!(e.to_string().contains(&fx.etcd.endpoint()), "the message names the store: {e}");

    // Back on the same port with the same data: the same clients recover.
    fx.etcd.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    let kv = loop {
        match s.get("/u/k") {
            Ok(kv) => break kv,
            Err(e) if e.is_unavailable() && Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("no recovery: {e}"),
        }
    };
    assert_eq!(kv.unwrap().revision, r, "nothing was written while etcd was down");
    assert_eq!(late.get("/u/k").unwrap().unwrap().value, b"v");
    assert!(s.keep_alive(lease.id).is_ok(), "leases survive an etcd restart");
    let w2 = s.watch("/u/", None).unwrap();
    s.put("/u/k2", b"x", None).unwrap();
    assert!(matches!(w2.recv_timeout(Duration::from_secs(5)), Some(Ok(_))));
}

#[test]
fn frozen_etcd_times_out_as_unavailable() {
    let fx = EtcdFx::new();
    let s = fx.open();
    s.put("/f/k", b"v", None).unwrap();
    let w = s.watch("/f/", None).unwrap();
    fx.etcd.pause();
    let took = unavailable("get", || s.get("/f/k"));
    assert!(took >= Duration::from_millis(1500), "a frozen etcd is a timeout, got an answer after {took:?}");
    let took_create = unavailable("create", || s.create("/f/new", b"x", None));
    eprintln!("frozen etcd: get failed after {took:?}, create after {took_create:?}");
    // HTTP/2 keep-alive (1 s + 1 s here) notices the frozen peer and ends the watch.
    match w.recv_timeout(Duration::from_secs(8)) {
        Some(Err(StoreError::Unavailable { .. })) => {}
        other => panic!("watch on a frozen etcd: {other:?}"),
    }
    fx.etcd.resume();
    let deadline = Instant::now() + Duration::from_secs(10);
    while let Err(e) = s.get("/f/k") {
        assert!(e.is_unavailable() && Instant::now() < deadline, "no recovery: {e}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A write that timed out has an unknown outcome: the frozen etcd may
    // still apply it once thawed. Re-read before deciding.
    match s.create("/f/new", b"x", None) {
        Ok(_) => eprintln!("the timed-out create was not applied"),
        Err(StoreError::Conflict { .. }) => {
            assert_eq!(s.get("/f/new").unwrap().unwrap().value, b"x");
            eprintln!("the timed-out create was applied after etcd resumed");
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn compacted_start_revision_is_reported() {
    let fx = EtcdFx::new();
    let s = fx.open();
    let r1 = s.put("/c/k", b"1", None).unwrap();
    let mut last = 0;
    for i in 0..5 {
        last = s.put("/c/k", i.to_string().as_bytes(), None).unwrap();
    }
    // Compact the history up to `last` with a plain etcd client.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = etcd_client::Client::connect(fx.etcd.endpoints(), None).await.unwrap();
        c.compact(last, None).await.unwrap();
    });
    // etcd confirms the watch, then cancels it: the error is the first event.
    let err = match s.watch("/c/", Some(r1)) {
        Err(e) => e,
        Ok(w) => match w.recv_timeout(Duration::from_secs(5)) {
            Some(Err(e)) => e,
            other => panic!("watch from a compacted revision: {other:?}"),
        },
    };
    assert_eq!(err, StoreError::Compacted { requested: r1, compacted: last });
    assert!(s.watch("/c/", Some(last + 1)).is_ok());
}

/// etcd inside a test's network namespace (where node agents will reach it):
/// a client built on a thread inside that namespace talks to it.
#[test]
fn etcd_inside_a_network_namespace() {
    let ns = tern_testkit::Netns::new("etcd");
    let mut etcd = tern_testkit::Etcd::start_in(&ns, "127.0.0.1");
    let eps = etcd.endpoints();
    let rev = ns.enter(|| {
        let s = EtcdStore::connect(&eps, etcd_options()).unwrap();
        s.put("/ns/k", b"v", None).unwrap()
    });
    assert!(rev > 0);
    etcd.restart();
    let v = ns.enter(|| EtcdStore::connect(&eps, etcd_options()).unwrap().get("/ns/k").unwrap().unwrap().value);
    assert_eq!(v, b"v");
}
