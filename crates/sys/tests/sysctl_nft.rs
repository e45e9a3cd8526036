//! sysctl and nft inside a namespace via NetNs::enter. Needs root.

mod common;

use common::TestNs;
use tern_sys::{nft, sysctl, SysError};

#[test]
fn sysctl_in_netns_does_not_touch_root() {
    let t = TestNs::new();
    let key = "net.ipv4.ip_forward";
    let root_before = sysctl::read(key).unwrap(); // read-only in the root netns
    let want = if root_before == "1" { "0" } else { "1" };

    t.run(|| {
        sysctl::write(key, want).unwrap();
        assert_eq!(sysctl::read(key).unwrap(), want);
        assert_eq!(sysctl::read("net/ipv4/ip_forward").unwrap(), want);
    });
    assert_eq!(sysctl::read(key).unwrap(), root_before, "root netns sysctl changed");
    assert_eq!(t.run(|| sysctl::read(key).unwrap()), want);

    // Interface names with dots need the slash form.
    let nl = t.nl();
    nl.create_bridge("tbr.5", None).unwrap();
    t.run(|| {
        let k = "net/ipv4/conf/tbr.5/rp_filter";
        sysctl::write(k, "2").unwrap();
        assert_eq!(sysctl::read(k).unwrap(), "2");
        sysctl::write("net/ipv6/conf/tbr.5/accept_ra", "0").unwrap();
    });
    assert!(sysctl::read("net/ipv4/conf/tbr.5/rp_filter").is_err(), "tbr.5 visible in root netns");

    let e = sysctl::read("net.ipv4.no_such_key").unwrap_err();
    assert!(matches!(e, SysError::Io { .. }), "{e:?}");
    assert_eq!(e.errno(), Some(libc::ENOENT));
    assert!(e.to_string().starts_with("read sysctl /proc/sys/net/ipv4/no_such_key: "), "{e}");
    let e = t.run(|| sysctl::write("net.ipv4.ip_forward", "bogus")).unwrap_err();
    assert_eq!(e.errno(), Some(libc::EINVAL), "{e:?}");
}

#[test]
fn nft_in_netns() {
    let t = TestNs::new();
    let table = format!("tsys{}", std::process::id());
    let script = format!(
        "table inet {table} {{\n  set pods {{ type ipv4_addr; }}\n  chain tsys_fwd {{ type filter hook forward priority 0; policy accept; ip saddr @pods counter accept; }}\n}}\n"
    );
    t.run(|| nft::run(&script)).unwrap();

    let v =
        t.run(|| nft::list_json(&["list", "table", "inet", &table])).unwrap().expect("table exists in the test netns");
    let items = v["nftables"].as_array().unwrap();
    assert!(items.iter().any(|i| i["table"]["name"] == table.as_str()), "{v}");
    assert!(items.iter().any(|i| i["chain"]["name"] == "tsys_fwd"), "{v}");

    // Not in the root namespace (read-only check).
    assert!(nft::list_json(&["list", "table", "inet", &table]).unwrap().is_none());

    // Missing objects are None, errors carry stderr.
    let none = t.run(|| nft::list_json(&["list", "chain", "inet", &table, "nope"])).unwrap();
    assert!(none.is_none());
    let e = t.run(|| nft::run("table inet x { chain c { bogus; } }")).unwrap_err();
    match &e {
        SysError::Command { cmd, stderr, .. } => {
            assert_eq!(cmd, "nft -f -");
            assert!(stderr.contains("Error"), "{stderr}");
        }
        other => panic!("expected Command error, got {other:?}"),
    }

    // Delete, then it is gone.
    t.run(|| nft::run(&format!("delete table inet {table}"))).unwrap();
    assert!(t.run(|| nft::list_json(&["list", "table", "inet", &table])).unwrap().is_none());
}
