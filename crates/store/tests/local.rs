//! LocalStore specifics: the directory format survives reopening, a hung
//! lock holder is Unavailable (not a hang), corrupt files name their key,
//! crash leftovers are ignored and collected, history is compacted.
mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::{local_options, LocalFx};
use tern_store::{Datastore, LocalOptions, LocalStore, StoreError, WatchEvent};
use tern_testkit::TempDir;

#[test]
fn data_and_revisions_survive_reopen() {
    let fx = LocalFx::new();
    let (r, lease) = {
        let s = fx.open();
        let lease = s.grant_lease(Duration::from_secs(30)).unwrap();
        s.put("/tern/v1/nodes/n1", b"node", Some(lease.id)).unwrap();
        (s.put("/a/b", b"v", None).unwrap(), lease)
    };
    let s = fx.open();
    let kv = s.get("/a/b").unwrap().unwrap();
    assert_eq!((kv.value.as_slice(), kv.revision), (&b"v"[..], r));
    assert_eq!(s.get("/tern/v1/nodes/n1").unwrap().unwrap().lease, Some(lease.id), "leases persist too");
    assert!(s.put("/a/c", b"", None).unwrap() > r, "revisions continue, never reused");
    assert!(s.keep_alive(lease.id).is_ok());
}

#[test]
fn hung_lock_holder_is_unavailable_not_a_hang() {
    let fx = LocalFx::new();
    let opts = LocalOptions { lock_timeout: Duration::from_millis(300), ..local_options() };
    let s = LocalStore::open_with(fx.dir.join("store"), opts).unwrap();
    s.put("/k", b"v", None).unwrap();
    // Another "process" takes the lock and never lets go.
    let held = fs::OpenOptions::new().write(true).open(fx.dir.join("store/lock")).unwrap();
    held.lock().unwrap();
    for what in ["put", "get"] {
        let t0 = Instant::now();
        let r = if what == "put" { s.put("/k", b"x", None).map(drop) } else { s.get("/k").map(drop) };
        match r {
            Err(StoreError::Unavailable { detail, .. }) => assert!(detail.contains("locked"), "{detail}"),
            other => panic!("{what}: {other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "{what} took {:?}", t0.elapsed());
    }
    drop(held);
    assert_eq!(s.get("/k").unwrap().unwrap().value, b"v");
}

#[test]
fn corrupt_files_name_the_key_and_leftovers_are_ignored() {
    let fx = LocalFx::new();
    let s = fx.open();
    s.put("/tern/v1/ipam/blocks/10.0.0.0-26", b"{}", None).unwrap();
    s.put("/tern/v1/ipam/blocks/10.0.0.64-26", b"{}", None).unwrap();
    let dir = fx.dir.join("store/data/tern/v1/ipam/blocks");
    fs::write(dir.join("=10.0.0.64-26"), b"garbage").unwrap();
    match s.get("/tern/v1/ipam/blocks/10.0.0.64-26") {
        Err(StoreError::Corrupt { key, .. }) => assert_eq!(key, "/tern/v1/ipam/blocks/10.0.0.64-26"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(s.list("/tern/v1/ipam/"), Err(StoreError::Corrupt { .. })));
    assert!(matches!(
        s.compare_and_swap("/tern/v1/ipam/blocks/10.0.0.64-26", 1, b"x", None),
        Err(StoreError::Corrupt { .. })
    ));
    // Other keys keep working, and an unconditional write repairs the bad one.
    s.put("/tern/v1/nodes/n1", b"{}", None).unwrap();
    assert!(s.delete("/tern/v1/ipam/blocks/10.0.0.64-26").unwrap());
    assert_eq!(s.get("/tern/v1/ipam/blocks/10.0.0.64-26").unwrap(), None);
    // A create whose data a power cut lost (an empty file) counts as absent.
    fs::write(dir.join("=10.0.0.128-26"), b"").unwrap();
    assert_eq!(s.get("/tern/v1/ipam/blocks/10.0.0.128-26").unwrap(), None);
    // A writer that died between writing its temp file and renaming it.
    fs::write(dir.join("=10.0.0.64-26"), b"tern1 1 1 0 0\n{}").unwrap();
    fs::write(dir.join(".tmp.999999.0"), b"half written").unwrap();
    assert_eq!(s.list("/tern/v1/ipam/").unwrap().kvs.len(), 2);
    assert_eq!(s.list("/tern/v1/ipam/").unwrap().kvs[1].revision, 1);
    s.housekeeping().unwrap();
    // Housekeeping runs the collection only when due; force it with a store whose retention is zero.
    let eager = LocalStore::open_with(
        fx.dir.join("store"),
        LocalOptions { tombstone_retention: Duration::ZERO, ..local_options() },
    )
    .unwrap();
    eager.housekeeping().unwrap();
    assert!(!dir.join(".tmp.999999.0").exists(), "stray temp file collected");
    // An unusable directory is Unavailable.
    let file = fx.dir.join("plain-file");
    fs::write(&file, b"").unwrap();
    assert!(matches!(LocalStore::open(file.join("store")), Err(StoreError::Unavailable { .. })));
}

#[test]
fn tombstones_serve_watches_until_compacted() {
    let fx = LocalFx::new();
    let s = fx.open();
    let r1 = s.put("/h/a", b"1", None).unwrap();
    s.delete("/h/a").unwrap();
    // A watch starting in the past sees the delete (kept as a tombstone).
    let w = s.watch("/h/", Some(r1)).unwrap();
    match w.recv_timeout(Duration::from_secs(2)) {
        Some(Ok(WatchEvent::Delete { key, .. })) => assert_eq!(key, "/h/a"),
        other => panic!("{other:?}"),
    }
    drop(w);
    // Once tombstones are collected, that start revision is gone.
    let eager = LocalStore::open_with(
        fx.dir.join("store"),
        LocalOptions { tombstone_retention: Duration::ZERO, ..local_options() },
    )
    .unwrap();
    eager.housekeeping().unwrap();
    match s.watch("/h/", Some(r1)) {
        Err(StoreError::Compacted { requested, compacted }) => assert_eq!((requested, compacted > r1), (r1, true)),
        other => panic!("{other:?}"),
    }
    let now = s.list("/h/").unwrap().revision;
    assert!(s.watch("/h/", Some(now + 1)).is_ok());
}

#[test]
fn leases_from_a_previous_boot_are_expired() {
    let fx = LocalFx::new();
    let s = fx.open();
    let lease = s.grant_lease(Duration::from_secs(60)).unwrap();
    s.put("/boot/k", b"v", Some(lease.id)).unwrap();
    let path = fx.dir.join(format!("store/leases/{}", lease.id.0));
    let text = fs::read_to_string(&path).unwrap();
    let boot_line = text.lines().find(|l| l.starts_with("boot ")).unwrap().to_string();
    fs::write(&path, text.replace(&boot_line, "boot 00000000-0000-0000-0000-000000000000")).unwrap();
    assert_eq!(s.get("/boot/k").unwrap(), None, "the node rebooted: its lease holders are gone");
    assert!(matches!(s.keep_alive(lease.id), Err(StoreError::LeaseNotFound(_))));
    // The sweep turned it into a real delete.
    assert!(s.list("/boot/").unwrap().kvs.is_empty());
    assert!(!path.exists());
}

#[test]
fn many_processes_share_one_directory() {
    // Separate handles on one directory behave like separate processes.
    let dir = TempDir::new();
    let stores: Vec<LocalStore> = (0..4).map(|_| LocalStore::open(dir.join("s")).unwrap()).collect();
    std::thread::scope(|sc| {
        for (i, s) in stores.iter().enumerate() {
            sc.spawn(move || {
                for j in 0..25 {
                    s.create(&format!("/m/{i}/{j}"), b"x", None).unwrap();
                }
            });
        }
    });
    let l = stores[0].list("/m/").unwrap();
    assert_eq!(l.kvs.len(), 100);
    let mut revs: Vec<i64> = l.kvs.iter().map(|kv| kv.revision).collect();
    revs.sort();
    revs.dedup();
    assert_eq!(revs.len(), 100, "every write got its own revision");
    assert_eq!(l.revision, *revs.last().unwrap());
}

#[test]
fn torn_or_lost_metadata_is_rebuilt_from_the_files() {
    let fx = LocalFx::new();
    let s = fx.open();
    s.put("/m/a", b"1", None).unwrap();
    let r = s.put("/m/b", b"2", None).unwrap();
    let lease = s.grant_lease(Duration::from_secs(60)).unwrap();
    let meta = fx.dir.join("store/meta");
    for damage in ["torn", "lost"] {
        if damage == "torn" {
            fs::write(&meta, b"tern-local-store 1\nrev 1\ncomp").unwrap();
        } else {
            fs::remove_file(&meta).unwrap();
        }
        // Reads still work; the revision continues above everything on disk.
        assert_eq!(s.get("/m/b").unwrap().unwrap().revision, r);
        let listing = s.list("/m/").unwrap();
        assert!(listing.revision >= r, "{damage}: {listing:?}");
        let r2 = s.put("/m/c", b"3", None).unwrap();
        assert!(r2 > r, "{damage}: revision reused ({r2} <= {r})");
        // History before the loss is unknown: old start revisions must relist.
        match s.watch("/m/", Some(1)) {
            Err(StoreError::Compacted { .. }) => {}
            other => panic!("{damage}: {other:?}"),
        }
        let next = s.grant_lease(Duration::from_secs(60)).unwrap();
        assert!(next.id.0 > lease.id.0, "{damage}: lease id reused");
    }
}
