//! Tests of the test kit itself (privileged: run as root).

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tern_testkit::*;

fn exists(p: &Path) -> bool {
    p.symlink_metadata().is_ok()
}

#[test]
fn unique_names_differ_and_short_ones_fit() {
    let a = unique("x");
    let b = unique("x");
    assert_ne!(a, b);
    assert!(a.starts_with(&format!("x-{}-", std::process::id())));
    let mut seen = std::collections::HashSet::new();
    for p in ["", "v", "a-very-long-prefix-indeed", "tern"] {
        for _ in 0..50 {
            let s = unique_short(p);
            assert!(s.len() <= 15, "{s}");
            assert!(seen.insert(s));
        }
    }
}

#[test]
fn netns_is_created_and_removed_on_drop() {
    let ns = Netns::new("tk-drop");
    let path = ns.path();
    assert_eq!(path, Path::new("/run/netns").join(ns.name()));
    assert!(exists(&path));
    assert_eq!(ns.links(), vec!["lo".to_string()]);
    assert!(ns.ok("ip -o link show lo").contains("UP"));
    // The command really runs in the namespace, /sys included.
    assert_eq!(ns.ok("ls /sys/class/net").trim(), "lo");
    let inode = ns.ok("readlink /proc/self/ns/net");
    assert_eq!(inode.trim(), format!("net:[{}]", ns.inode()));
    drop(ns);
    assert!(!exists(&path));
}

#[test]
fn netns_is_removed_when_the_test_panics() {
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::panic::catch_unwind(move || {
        let ns = Netns::new("tk-panic");
        tx.send(ns.path()).unwrap();
        panic!("boom");
    });
    assert!(r.is_err());
    let path = rx.recv().unwrap();
    assert!(!exists(&path), "{} left behind", path.display());
}

#[test]
fn delete_now_removes_immediately() {
    let ns = Netns::new("tk-del");
    let path = ns.path();
    ns.delete_now();
    assert!(!exists(&path));
}

#[test]
fn enter_runs_on_another_thread_in_the_namespace() {
    let ns = Netns::new("tk-enter");
    let mine = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let inside = ns.enter(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap());
    assert_eq!(inside.to_str().unwrap(), format!("net:[{}]", ns.inode()));
    assert_eq!(std::fs::read_link("/proc/thread-self/ns/net").unwrap(), mine);
    // Panics propagate.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ns.enter(|| panic!("x"))));
    assert!(r.is_err());
}

/// Two namespaces joined by a veth pair, IPv4 and IPv6.
fn pair() -> (Netns, Netns) {
    let a = Netns::new("tk-a");
    let b = Netns::new("tk-b");
    a.ok(&format!(
        "ip link add va type veth peer name vb netns {b}
         ip addr add 10.200.0.1/24 dev va
         ip addr add fd00:200::1/64 dev va nodad
         ip link set va up",
        b = b.name()
    ));
    b.ok("ip addr add 10.200.0.2/24 dev vb
          ip addr add fd00:200::2/64 dev vb
          ip link set vb up");
    (a, b)
}

#[test]
fn tcp_ok_between_two_namespaces() {
    let (a, b) = pair();
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(tcp_ok(&a, &b, ip("10.200.0.2"), 8080));
    assert!(tcp_ok(&b, &a, ip("10.200.0.1"), 8080));
    // vb's IPv6 address goes through DAD: tcp_ok waits for it.
    assert!(tcp_ok(&a, &b, ip("fd00:200::2"), 8081));
    assert!(tcp_ok(&b, &a, ip("fd00:200::1"), 8081));
    assert_eq!(veth_links(&a, "v"), vec!["va".to_string()]);
    assert!(veth_links(&a, "x").is_empty());
    assert_eq!(a.addrs("va"), vec!["10.200.0.1/24", "fd00:200::1/64"]);
}

#[test]
fn tcp_ok_is_false_without_a_path() {
    let (_a, b) = pair();
    let lonely = Netns::new("tk-lonely");
    let t = Instant::now();
    let ok = tcp_ok_within(&lonely, &b, "10.200.0.2".parse().unwrap(), 8080, Duration::from_millis(500));
    assert!(!ok);
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
#[should_panic(expected = "cannot listen")]
fn tcp_ok_panics_if_the_server_lacks_the_address() {
    let a = Netns::new("tk-noaddr");
    let b = Netns::new("tk-noaddr");
    tcp_ok(&a, &b, "10.200.9.9".parse().unwrap(), 80);
}

#[test]
fn run_kills_on_timeout() {
    let ns = Netns::new("tk-timeout");
    let t = Instant::now();
    let out = ns.run_timeout(&["sleep", "60"], Duration::from_millis(300));
    assert!(!out.status.success());
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(String::from_utf8_lossy(&out.stderr).contains("timeout"));
}

#[test]
fn sh_reports_failures() {
    let ns = Netns::new("tk-sh");
    let out = ns.sh("echo out; echo err >&2; exit 3");
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let r = std::panic::catch_unwind(|| ns.ok("echo bad-thing >&2; false"));
    let msg = *r.unwrap_err().downcast::<String>().unwrap();
    assert!(msg.contains("bad-thing"), "{msg}");
}

fn alive(pid: u32) -> bool {
    // A zombie counts as gone.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

#[test]
fn child_guard_kills_on_drop() {
    let ns = Netns::new("tk-child");
    let mut child = spawn_in(&ns, &["bash", "-c", "echo started; exec sleep 600"]);
    assert!(child.wait_log("started", Duration::from_secs(10)));
    assert!(child.running());
    let pid = child.pid();
    assert!(alive(pid));
    drop(child);
    assert!(!alive(pid));
}

#[test]
fn netns_drop_kills_what_was_started_in_it() {
    let ns = Netns::new("tk-orphan");
    // A background job orphaned by its shell, and a guarded child outliving the ns guard.
    let pid: u32 = ns.ok("sleep 600 >/dev/null 2>&1 & echo $!").trim().parse().unwrap();
    let child = spawn_in(&ns, &["sleep", "600"]);
    let cpid = child.pid();
    assert!(alive(pid) && alive(cpid));
    drop(ns);
    assert!(wait_until(Duration::from_secs(5), || !alive(pid)));
    drop(child);
    assert!(!alive(cpid));
}

#[test]
fn temp_dir_is_removed_on_drop() {
    let d = TempDir::new();
    let p = d.path().to_path_buf();
    assert!(p.starts_with("/tmp") && p.file_name().unwrap().to_str().unwrap().starts_with("tern-test-"));
    std::fs::write(d.join("f"), "x").unwrap();
    drop(d);
    assert!(!exists(&p));
}

#[test]
fn reservations_skip_lock_and_last_reserved() {
    let d = TempDir::new();
    assert!(reservations(d.path(), "net").is_empty());
    let n = d.join("net");
    std::fs::create_dir(&n).unwrap();
    for f in ["lock", "last_reserved_ip.0", "10.1.0.3", "10.1.0.2", "fd00::2"] {
        std::fs::write(n.join(f), "").unwrap();
    }
    assert_eq!(reservations(d.path(), "net"), vec!["10.1.0.2", "10.1.0.3", "fd00::2"]);
}

/// The whole kit against the reference plugins: a node namespace, a pod,
/// bridge + host-local ADD and DEL, then nothing left.
#[test]
fn reference_bridge_add_del_leaves_nothing() {
    let node = Netns::new("tk-node");
    let pod = Netns::new("tk-pod");
    let data = TempDir::new();
    // Any executable will do for the kit's own directory; VERSION goes to it.
    let plugins = Plugins::new(Path::new("/usr/lib/cni/host-local"));
    assert!(plugins.cni_path().ends_with(":/usr/lib/cni"));
    let v = exec_plugin(&node, &plugins, "tern-ipam", "VERSION", "", None, "", "", r#"{"cniVersion":"1.0.0"}"#);
    v.assert_ok();
    assert!(v.json()["supportedVersions"].to_string().contains("1.0.0"));

    let conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"kit","type":"bridge","bridge":"kbr0","isGateway":true,
            "ipam":{{"type":"host-local","ranges":[[{{"subnet":"10.201.0.0/24"}}],[{{"subnet":"fd00:201::/64"}}]],
                    "dataDir":"{}"}}}}"#,
        data.path().display()
    );
    let add = exec_plugin(&node, &plugins, "bridge", "ADD", "c1", Some(&pod.path()), "eth0", "", &conf);
    add.assert_ok();
    let ips = add.json()["ips"].as_array().unwrap().len();
    assert_eq!(ips, 2);
    assert_eq!(pod.addrs("eth0").len(), 2);
    assert_eq!(veth_links(&node, "").len(), 1);
    assert_eq!(reservations(data.path(), "kit").len(), 2);
    let gw: IpAddr = "10.201.0.1".parse().unwrap();
    assert!(tcp_ok(&pod, &node, gw, 9000));

    let del = exec_plugin(&node, &plugins, "bridge", "DEL", "c1", Some(&pod.path()), "eth0", "", &conf);
    del.assert_ok();
    assert!(veth_links(&node, "").is_empty());
    assert!(reservations(data.path(), "kit").is_empty());
    assert!(nft_tables(&node).is_empty());

    // Errors come back as CNI error objects.
    let bad = exec_plugin(&node, &plugins, "bridge", "ADD", "c2", Some(&pod.path()), "eth0", "", "{not json");
    assert_ne!(bad.code, 0);
    assert!(bad.error_code().is_some(), "{bad}");
}
