//! Crash safety: for every fault step of ADD (`tern_plugins::fault::ADD_STEPS`)
//! the plugin SIGKILLs itself there (`TERN_TEST_KILL_AT=<step>`), and then DEL
//! or GC must leave nothing of that attachment: no `tn*` veth, no reservation,
//! no nftables element, no pod interface, no host route. A second, live
//! attachment on the same node must survive the cleanup untouched.
//!
//! The config exercises every step: isGateway, ipMasq, macspoofchk and
//! dual-stack tern-ipam, in bridge mode and in routed mode (which has no
//! bridge step: killing there must not happen, the ADD just succeeds).
//!
//! Each (mode, cleanup, step) scenario builds its own node and pod
//! namespaces; a test runs all steps of one (mode, cleanup) pair and reports
//! every failing step at the end.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use serde_json::{json, Value};
use tern_plugins::fault::ADD_STEPS;
use tern_plugins::names::{host_veth, owner_tag};
use tern_testkit::*;

const MASQ: (&str, &str) = ("inet", "tern_masq");
const SPOOF: (&str, &str) = ("bridge", "tern_spoof");
/// Container ids of the crashed attachment and of the live one.
const VICTIM: &str = "victim";
const KEEP: &str = "keep";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Bridge,
    Routed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cleanup {
    /// DEL of the crashed attachment (1.0.0), a live attachment alongside.
    Del,
    /// The crashed pod's netns is removed, then DEL (1.0.0) without CNI_NETNS.
    DelNetnsGone,
    /// GC (1.1.0) listing only the live attachment as valid.
    GcKeep,
    /// GC (1.1.0) with an empty valid-attachments list, no live attachment.
    GcEmpty,
}

struct World {
    node: Netns,
    plugins: Plugins,
    data: TempDir,
    network: String,
    bridge: String,
    mode: Mode,
    version: &'static str,
}

impl World {
    fn new(mode: Mode, cleanup: Cleanup) -> World {
        World {
            node: Netns::new("tcr-node"),
            plugins: Plugins::new(Path::new(env!("CARGO_BIN_EXE_tern"))),
            data: TempDir::new(),
            network: unique("tcrnet"),
            bridge: unique_short("tcb"),
            mode,
            version: if matches!(cleanup, Cleanup::Del | Cleanup::DelNetnsGone) { "1.0.0" } else { "1.1.0" },
        }
    }

    fn conf(&self, extra: Value) -> String {
        let mut conf = json!({
            "cniVersion": self.version,
            "name": self.network,
            "type": "tern",
            "mode": if self.mode == Mode::Bridge { "bridge" } else { "routed" },
            "bridge": self.bridge,
            "isGateway": true,
            "ipMasq": true,
            "macspoofchk": true,
            "ipam": {
                "type": "tern-ipam",
                "dataDir": self.data.path(),
                "ranges": [[{"subnet": "10.78.0.0/24"}], [{"subnet": "fd78::/64"}]],
                "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}],
            },
        });
        for (k, v) in extra.as_object().expect("object") {
            conf[k] = v.clone();
        }
        conf.to_string()
    }

    fn run(&self, env: &[(&str, &str)], conf: &str) -> PluginRun {
        let cni_path = self.plugins.cni_path();
        let mut full = env.to_vec();
        full.push(("CNI_PATH", &cni_path));
        exec_plugin_env(&self.node, &self.plugins, "tern", &full, conf)
    }

    /// ADD of `cid` (eth0) into `pod`, killed at `kill_at` if given.
    fn add(&self, cid: &str, pod: &Netns, kill_at: Option<&str>) -> PluginRun {
        let path = pod.path().display().to_string();
        let mut env =
            vec![("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", cid), ("CNI_NETNS", &path), ("CNI_IFNAME", "eth0")];
        if let Some(step) = kill_at {
            env.push(("TERN_TEST_KILL_AT", step));
        }
        self.run(&env, &self.conf(json!({})))
    }

    fn del(&self, cid: &str, pod: &Netns) -> PluginRun {
        let path = pod.path().display().to_string();
        let env = [("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", cid), ("CNI_NETNS", &*path), ("CNI_IFNAME", "eth0")];
        self.run(&env, &self.conf(json!({})))
    }

    /// DEL with CNI_NETNS unset (the runtime already removed the netns).
    fn del_without_netns(&self, cid: &str) -> PluginRun {
        let env = [("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", cid), ("CNI_IFNAME", "eth0")];
        self.run(&env, &self.conf(json!({})))
    }

    /// GC keeping `valid`. A non-empty list is sent under both keys, as
    /// libcni >= 1.2.3 does; the empty one only as `cni.dev/valid-attachments`.
    fn gc(&self, valid: &[&str]) -> PluginRun {
        let list: Vec<Value> = valid.iter().map(|c| json!({"containerID": c, "ifname": "eth0"})).collect();
        let extra = if valid.is_empty() {
            json!({ "cni.dev/valid-attachments": list })
        } else {
            json!({ "cni.dev/valid-attachments": list, "cni.dev/attachments": list })
        };
        self.run(&[("CNI_COMMAND", "GC")], &self.conf(extra))
    }

    fn owner(&self, cid: &str) -> String {
        owner_tag(&self.network, cid, "eth0")
    }

    /// Reserved addresses of `cid`, from the reservation files' contents.
    fn reserved_by(&self, cid: &str) -> Vec<String> {
        reservations(self.data.path(), &self.network)
            .into_iter()
            .filter(|ip| {
                let text = std::fs::read_to_string(self.data.join(&self.network).join(ip)).unwrap_or_default();
                text.lines().next().map(str::trim) == Some(cid)
            })
            .collect()
    }

    /// nft elements of `table` (comments of every set/map element), or
    /// `None` when the table does not exist.
    fn nft_comments(&self, (family, table): (&str, &str)) -> Option<Vec<String>> {
        if !nft_tables(&self.node).iter().any(|t| t == &format!("{family} {table}")) {
            return None;
        }
        let out = self.node.run(&["nft", "-j", "list", "table", family, table]);
        assert!(out.status.success(), "nft list table {family} {table}: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).expect("nft -j output is JSON");
        let mut comments = Vec::new();
        for item in v["nftables"].as_array().into_iter().flatten() {
            let Some(set) = item.get("set").or_else(|| item.get("map")) else { continue };
            for elem in set["elem"].as_array().into_iter().flatten() {
                let mut found = Vec::new();
                collect_comments(elem, &mut found);
                comments.push(found.into_iter().next().unwrap_or_default());
            }
        }
        Some(comments)
    }

    /// How many elements of `table` carry `cid`'s owner tag (0 if no table).
    fn nft_count(&self, table: (&str, &str), cid: &str) -> usize {
        let owner = self.owner(cid);
        self.nft_comments(table).unwrap_or_default().iter().filter(|c| **c == owner).count()
    }

    /// Host routes (/32, /128) in the node to any of `addrs`.
    fn host_routes_to(&self, addrs: &[String]) -> Vec<String> {
        let mut found = Vec::new();
        for fam in ["-4", "-6"] {
            let out = self.node.run(&["ip", "-j", fam, "route", "show"]);
            assert!(out.status.success(), "ip route: {}", String::from_utf8_lossy(&out.stderr));
            let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Array(vec![]));
            for r in v.as_array().into_iter().flatten() {
                let dst = r["dst"].as_str().unwrap_or_default();
                let dst_ip = dst.split('/').next().unwrap_or_default();
                if addrs.iter().any(|a| a == dst_ip) {
                    found.push(r.to_string());
                }
            }
        }
        found
    }
}

fn collect_comments(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(c)) = m.get("comment") {
                out.push(c.clone());
            }
            m.values().for_each(|x| collect_comments(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| collect_comments(x, out)),
        _ => {}
    }
}

fn step_index(step: &str) -> usize {
    ADD_STEPS.iter().position(|s| *s == step).unwrap_or_else(|| panic!("no fault step {step:?} in {ADD_STEPS:?}"))
}

/// Whether an ADD killed at `kill_at` had got past `step` (so what `step`
/// makes exists). `kill_at == None`: the ADD completed.
fn passed(kill_at: Option<&str>, step: &str) -> bool {
    kill_at.is_none_or(|k| step_index(k) > step_index(step))
}

/// Asserts that `cid`'s attachment in `pod` is complete and untouched.
fn assert_live(w: &World, cid: &str, pod: &Netns, what: &str) {
    let veth = host_veth(cid, "eth0");
    assert!(veth_links(&w.node, "tn").contains(&veth), "{what}: live attachment {cid} lost its veth {veth}");
    assert!(pod.links().contains(&"eth0".to_string()), "{what}: live attachment {cid} lost eth0");
    assert_eq!(pod.addrs("eth0").len(), 2, "{what}: live attachment {cid} lost addresses");
    assert_eq!(w.reserved_by(cid).len(), 2, "{what}: live attachment {cid} lost reservations");
    assert_eq!(w.nft_count(MASQ, cid), 2, "{what}: live attachment {cid} lost masquerade elements");
    let spoof = if w.mode == Mode::Bridge { 2 } else { 0 };
    assert_eq!(w.nft_count(SPOOF, cid), spoof, "{what}: live attachment {cid}: spoof-check elements");
}

/// Asserts that nothing of `cid` is left: no veth, no reservation, no nft
/// element, no interface in its pod, no node route to its addresses.
fn assert_gone(w: &World, cid: &str, pod: &Netns, addrs: &[String], what: &str) {
    let veth = host_veth(cid, "eth0");
    let veths = veth_links(&w.node, "");
    assert!(!veths.contains(&veth), "{what}: veth {veth} of {cid} left in the node ({veths:?})");
    assert!(veths.iter().all(|v| !v.starts_with("tx")), "{what}: detached veths left in the node ({veths:?})");
    assert_eq!(pod.links(), vec!["lo".to_string()], "{what}: interfaces left in {cid}'s pod");
    assert_eq!(w.reserved_by(cid), Vec::<String>::new(), "{what}: reservations of {cid} left");
    for table in [MASQ, SPOOF] {
        assert_eq!(w.nft_count(table, cid), 0, "{what}: {} {} elements of {cid} left", table.0, table.1);
    }
    assert_eq!(w.host_routes_to(addrs), Vec::<String>::new(), "{what}: node routes to {cid}'s addresses left");
}

/// Asserts the node holds no attachment at all: no `tn*` veth, no
/// reservation, and the nft tables absent or without elements.
fn assert_node_empty(w: &World, what: &str) {
    assert_eq!(veth_links(&w.node, "tn"), Vec::<String>::new(), "{what}: tern veths left");
    assert_eq!(reservations(w.data.path(), &w.network), Vec::<String>::new(), "{what}: reservations left");
    for table in [MASQ, SPOOF] {
        let left = w.nft_comments(table).unwrap_or_default();
        assert_eq!(left, Vec::<String>::new(), "{what}: elements left in {} {}", table.0, table.1);
    }
}

fn scenario(mode: Mode, cleanup: Cleanup, step: &str) {
    let w = World::new(mode, cleanup);
    let mut victim_pod = Netns::new("tcr-victim");
    let keep_pod = (cleanup != Cleanup::GcEmpty).then(|| Netns::new("tcr-keep"));

    if let Some(pod) = &keep_pod {
        w.add(KEEP, pod, None).assert_ok();
        assert_live(&w, KEEP, pod, "before the crash");
    }

    // The crash. Routed mode never reaches the bridge step: ADD completes.
    let run = w.add(VICTIM, &victim_pod, Some(step));
    let kill_at = if mode == Mode::Routed && step == "bridge" {
        assert_eq!(run.code, 0, "routed mode has no bridge step, the ADD should complete:\n{run}");
        None
    } else {
        assert_eq!(run.code, 137, "expected the plugin to die of SIGKILL at {step:?}:\n{run}");
        assert_eq!(run.stdout.trim(), "", "a killed plugin printed a result:\n{run}");
        Some(step)
    };

    // The crash left what the steps before it made (the test is not vacuous).
    let reserved = w.reserved_by(VICTIM);
    assert_eq!(reserved.len(), if passed(kill_at, "ipam") { 2 } else { 0 }, "reservations after the crash");
    let has_veth = veth_links(&w.node, "tn").contains(&host_veth(VICTIM, "eth0"));
    assert_eq!(has_veth, passed(kill_at, "veth"), "host veth after the crash");
    assert_eq!(victim_pod.links().contains(&"eth0".to_string()), passed(kill_at, "veth"), "pod eth0 after the crash");
    assert_eq!(w.nft_count(MASQ, VICTIM), if passed(kill_at, "masq") { 2 } else { 0 }, "masq after the crash");
    let spoof = if mode == Mode::Bridge && passed(kill_at, "spoof") { 2 } else { 0 };
    assert_eq!(w.nft_count(SPOOF, VICTIM), spoof, "spoof elements after the crash");
    if mode == Mode::Routed && passed(kill_at, "host-routes") {
        assert_eq!(w.host_routes_to(&reserved).len(), 2, "routed host routes after the crash");
    }

    // The cleanup.
    let clean = match cleanup {
        Cleanup::Del => w.del(VICTIM, &victim_pod),
        Cleanup::DelNetnsGone => {
            // The runtime removes the netns (the pod end of the veth goes with
            // it); a fresh pod namespace stands in for later checks and the re-ADD.
            std::mem::replace(&mut victim_pod, Netns::new("tcr-victim")).delete_now();
            w.del_without_netns(VICTIM)
        }
        Cleanup::GcKeep => w.gc(&[KEEP]),
        Cleanup::GcEmpty => w.gc(&[]),
    };
    assert!(clean.code == 0 && clean.stdout.trim().is_empty(), "{cleanup:?} after the crash failed:\n{clean}");
    assert_gone(&w, VICTIM, &victim_pod, &reserved, &format!("after {cleanup:?}"));
    match &keep_pod {
        Some(pod) => assert_live(&w, KEEP, pod, &format!("after {cleanup:?}")),
        None => assert_node_empty(&w, &format!("after {cleanup:?}")),
    }

    // The names and addresses are free again: the same attachment can be
    // added and deleted normally.
    w.add(VICTIM, &victim_pod, None).assert_ok();
    assert_live(&w, VICTIM, &victim_pod, "re-ADD after the cleanup");
    let del = w.del(VICTIM, &victim_pod);
    assert!(del.code == 0 && del.stdout.trim().is_empty(), "DEL after the re-ADD:\n{del}");
    assert_gone(&w, VICTIM, &victim_pod, &reserved, "DEL after the re-ADD");

    // Finally the live attachment goes too, the way this variant cleans up.
    if let Some(pod) = &keep_pod {
        let run = match cleanup {
            Cleanup::Del | Cleanup::DelNetnsGone => w.del(KEEP, pod),
            Cleanup::GcKeep | Cleanup::GcEmpty => w.gc(&[]),
        };
        assert!(run.code == 0 && run.stdout.trim().is_empty(), "final cleanup of {KEEP}:\n{run}");
        assert_gone(&w, KEEP, pod, &[], "final cleanup");
    }
    assert_node_empty(&w, "the end");
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

/// Runs the scenario for every ADD step and fails listing every step that failed.
fn all_steps(mode: Mode, cleanup: Cleanup) {
    assert!(ADD_STEPS.len() >= 10 && ADD_STEPS.contains(&"result"), "unexpected ADD_STEPS {ADD_STEPS:?}");
    let mut failures = Vec::new();
    for step in ADD_STEPS {
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| scenario(mode, cleanup, step))) {
            failures.push(format!("step {step:?}: {}", panic_text(&*p)));
        }
    }
    assert!(
        failures.is_empty(),
        "{mode:?} mode, {cleanup:?}: {} of {} steps failed:\n{}",
        failures.len(),
        ADD_STEPS.len(),
        failures.join("\n")
    );
}

#[test]
fn bridge_crash_then_del() {
    all_steps(Mode::Bridge, Cleanup::Del);
}

#[test]
fn bridge_crash_then_netns_gone_then_del() {
    all_steps(Mode::Bridge, Cleanup::DelNetnsGone);
}

#[test]
fn bridge_crash_then_gc_keeping_a_live_pod() {
    all_steps(Mode::Bridge, Cleanup::GcKeep);
}

#[test]
fn bridge_crash_then_gc_with_empty_list() {
    all_steps(Mode::Bridge, Cleanup::GcEmpty);
}

#[test]
fn routed_crash_then_del() {
    all_steps(Mode::Routed, Cleanup::Del);
}

#[test]
fn routed_crash_then_netns_gone_then_del() {
    all_steps(Mode::Routed, Cleanup::DelNetnsGone);
}

#[test]
fn routed_crash_then_gc_keeping_a_live_pod() {
    all_steps(Mode::Routed, Cleanup::GcKeep);
}

#[test]
fn routed_crash_then_gc_with_empty_list() {
    all_steps(Mode::Routed, Cleanup::GcEmpty);
}

/// The runtime removes a pod's netns and DELs at once, as after a crash or
/// with containerd's empty CNI_NETNS: the kernel tears the veth pair down
/// asynchronously, possibly while DEL is detaching it. Missing things are
/// success, so every DEL must succeed. Four workers in parallel (what a
/// busy node does), 50 pods each.
#[test]
fn del_right_after_the_netns_is_removed_succeeds() {
    let w = World::new(Mode::Bridge, Cleanup::Del);
    let conf = w.conf(json!({"ipMasq": false, "macspoofchk": false, "isGateway": false}));
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for worker in 0..4 {
            let (w, conf, failures) = (&w, &conf, &failures);
            s.spawn(move || {
                for i in 0..50 {
                    let cid = format!("w{worker}-{i}");
                    let pod = Netns::new("tcr-gone");
                    let path = pod.path().display().to_string();
                    let add = [
                        ("CNI_COMMAND", "ADD"),
                        ("CNI_CONTAINERID", &*cid),
                        ("CNI_NETNS", &path),
                        ("CNI_IFNAME", "eth0"),
                    ];
                    w.run(&add, conf).assert_ok();
                    pod.delete_now();
                    // Half the DELs name the vanished path, half leave CNI_NETNS unset.
                    let mut del = vec![("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", &*cid), ("CNI_IFNAME", "eth0")];
                    if i % 2 == 0 {
                        del.push(("CNI_NETNS", &path));
                    }
                    let run = w.run(&del, conf);
                    if run.code != 0 {
                        // What a runtime does next: DEL again. It must succeed.
                        let again = w.run(&del, conf);
                        failures.lock().unwrap().push(format!(
                            "{cid}: {} (a second DEL: exit {})",
                            run.stdout.trim(),
                            again.code
                        ));
                    }
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    // The failed DELs still released everything, and their retries succeeded.
    assert_node_empty(&w, "after all DELs");
    assert!(
        failures.is_empty(),
        "{} of 200 DELs after the netns was removed failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
