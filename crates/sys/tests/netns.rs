//! Namespace handles: open, enter, create/remove. Needs root.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};

use common::{require_root, TestNs};
use tern_sys::netns::{self, NetNs};
use tern_sys::SysError;

#[test]
fn open_errors() {
    require_root();
    let missing = format!("/run/netns/tsys-missing-{}", std::process::id());
    match NetNs::open(&missing) {
        Err(SysError::NetnsGone(p)) => assert_eq!(p.to_str(), Some(missing.as_str())),
        other => panic!("expected NetnsGone, got {other:?}"),
    }
    // A plain file (like a /run/netns entry whose mount is gone).
    let plain = std::env::temp_dir().join(format!("tsys-plain-{}", std::process::id()));
    std::fs::write(&plain, b"").unwrap();
    let r = NetNs::open(&plain);
    std::fs::remove_file(&plain).unwrap();
    assert!(matches!(r, Err(SysError::NetnsGone(_))), "{r:?}");
    // Another namespace type.
    let r = NetNs::open("/proc/self/ns/uts");
    assert!(matches!(r, Err(SysError::Invalid(_))), "{r:?}");
    let e = NetNs::open(&missing).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENOENT));
    assert!(e.to_string().starts_with("network namespace /run/netns/tsys-missing-"), "{e}");
}

#[test]
fn current_and_enter() {
    let t = TestNs::new();
    let root = NetNs::current().unwrap();
    assert!(root.same_as_current().unwrap());
    assert!(!t.ns.same_as_current().unwrap());
    assert_ne!(root.inode().unwrap(), t.ns.inode().unwrap());

    let inside =
        t.ns.enter(|| {
            let cur = NetNs::current().unwrap();
            (t.ns.same_as_current().unwrap(), cur.inode().unwrap())
        })
        .unwrap();
    assert_eq!(inside, (true, t.ns.inode().unwrap()));
    assert!(root.same_as_current().unwrap(), "thread was not moved back");

    // Nested enters restore to the right namespace at each level.
    let t2 = TestNs::new();
    t.ns.enter(|| {
        t2.ns.enter(|| assert!(t2.ns.same_as_current().unwrap())).unwrap();
        assert!(t.ns.same_as_current().unwrap());
    })
    .unwrap();
    assert!(root.same_as_current().unwrap());

    // A panic inside enter() still moves the thread back.
    let r = catch_unwind(AssertUnwindSafe(|| {
        t.ns.enter(|| panic!("boom")).unwrap();
    }));
    assert!(r.is_err());
    assert!(root.same_as_current().unwrap(), "thread left in test netns after panic");

    // Works on any thread, and only affects that thread.
    let root_ino = root.inode().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            t.ns.enter(|| {
                assert!(t.ns.same_as_current().unwrap());
            })
            .unwrap();
            assert_eq!(NetNs::current().unwrap().inode().unwrap(), root_ino);
        });
        s.spawn(|| {
            // Meanwhile another thread enters the other namespace.
            t2.ns.enter(|| assert!(t2.ns.same_as_current().unwrap())).unwrap();
        });
    });
    assert!(root.same_as_current().unwrap());
}

#[test]
fn create_exists_remove() {
    let t = TestNs::new();
    let e = netns::create(&t.path).unwrap_err();
    assert!(e.is_exists(), "{e:?}");
    // Re-opening by path gives the same namespace.
    let again = NetNs::open(&t.path).unwrap();
    assert_eq!(again.inode().unwrap(), t.ns.inode().unwrap());
    let clone = t.ns.try_clone().unwrap();
    assert_eq!(clone.path(), t.path.as_path());

    netns::remove(&t.path).unwrap();
    netns::remove(&t.path).unwrap(); // idempotent
    assert!(matches!(NetNs::open(&t.path), Err(SysError::NetnsGone(_))));
    // The open handle keeps the namespace usable.
    t.ns.enter(|| assert!(t.ns.same_as_current().unwrap())).unwrap();
}
