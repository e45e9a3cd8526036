//! `tern cni` errors: each gives a clear message and a non-zero exit, and
//! leaves no half-made attachment (no veth, no reservation, no cache entry).
//! A failed ADD is followed by a DEL of the whole chain, as runtimes do; DEL
//! continues past failing plugins and reports them all.
//!
//! Privileged: run as root (each test has its own node and pod namespaces).

#[path = "100_runner_kit/mod.rs"]
mod kit;

use kit::*;
use serde_json::json;
use tern_testkit::*;

fn add(lab: &Lab, id: &str, pod: &Netns, extra: &[&str]) -> Run {
    let ns = pod.path().display().to_string();
    let mut args = vec!["--id", id, "--netns", ns.as_str()];
    args.extend_from_slice(extra);
    lab.cni("add", &args)
}

#[test]
fn missing_plugin_binary() {
    let lab = Lab::new();
    let pod = Netns::new("rn-pod");
    lab.write_conf("10-net.conflist", &lab.conflist("1.0.0", json!([lab.tern_plugin(), { "type": "no-such-plugin" }])));
    let run = add(&lab, "ctr", &pod, &[]);
    // The message names the binary and every directory searched.
    run.fails_with(&[
        "\"no-such-plugin\"",
        &lab.rec_dir().display().to_string(),
        &lab.plugins.dir.display().to_string(),
        "/usr/lib/cni",
    ]);
    lab.assert_nothing_left();
    assert_eq!(pod.links(), ["lo"]);
    // DEL of such a network reports it too, but still runs the plugins it has.
    lab.cni("del", &["--id", "ctr"]).fails_with(&["no-such-plugin"]);
}

#[test]
fn unsupported_config_version() {
    let lab = Lab::new();
    let pod = Netns::new("rn-pod");
    lab.write_conf("10-net.conflist", &lab.conflist("9.9.9", json!([lab.tern_plugin()])));
    add(&lab, "ctr", &pod, &[]).fails_with(&["10-net.conflist", "incompatible CNI versions", "9.9.9"]);
    lab.assert_nothing_left();
    assert_eq!(pod.links(), ["lo"]);
}

#[test]
fn unknown_network_name() {
    let lab = Lab::new();
    let pod = Netns::new("rn-pod");
    lab.write_conf("10-net.conflist", &lab.conflist("1.0.0", json!([lab.tern_plugin()])));
    add(&lab, "ctr", &pod, &["--net", "nope"]).fails_with(&[
        "no network named \"nope\"",
        &lab.conf_dir().display().to_string(),
        &lab.net,
    ]);
    lab.assert_nothing_left();
    // An empty config dir says so.
    std::fs::remove_file(lab.conf_dir().join("10-net.conflist")).unwrap();
    add(&lab, "ctr", &pod, &[]).fails_with(&["no network configurations"]);
}

#[test]
fn nonexistent_netns() {
    let lab = Lab::new();
    lab.write_conf("10-net.conflist", &lab.conflist("1.0.0", json!([lab.tern_plugin()])));
    let gone = unique("rn-gone");
    // A bare name resolves under /run/netns.
    let run = lab.cni("add", &["--id", "ctr", "--netns", &gone]);
    run.fails_with(&[&format!("/run/netns/{gone}"), "does not exist"]);
    lab.assert_nothing_left();
    lab.cni("add", &["--id", "ctr"]).fails_with(&["--netns is required"]);
}

#[test]
fn bad_container_id_or_ifname() {
    let lab = Lab::new();
    let pod = Netns::new("rn-pod");
    lab.write_conf("10-net.conflist", &lab.conflist("1.0.0", json!([lab.tern_plugin()])));
    add(&lab, "../etc", &pod, &[]).fails_with(&["invalid characters in containerID"]);
    add(&lab, "ctr", &pod, &["--ifname", "a-very-long-ifname"]).fails_with(&["too long"]);
    lab.assert_nothing_left();
}

#[test]
fn failed_add_is_followed_by_a_del_of_the_chain() {
    let lab = Lab::new();
    let pod = Netns::new("rn-pod");
    let rec = lab.recorder("rec");
    rec.fail("ADD", &json!({ "code": 107, "msg": "the recorder says no", "details": "on purpose" }));
    lab.write_conf("10-net.conflist", &lab.conflist("1.0.0", json!([lab.tern_plugin(), { "type": "rec" }])));
    let run = add(&lab, "ctr", &pod, &["--output", "json"]);
    run.fails_with(&["plugin type=\"rec\" failed (add)", "the recorder says no", "on purpose", "code 107"]);
    assert_eq!(run.json()["code"], 107);
    // The runtime-style cleanup: DEL of every plugin, without prevResult (nothing was cached).
    assert_eq!(rec.commands(), ["ADD", "DEL"]);
    assert!(rec.last("DEL").stdin.get("prevResult").is_none());
    lab.assert_nothing_left();
    assert_eq!(pod.links(), ["lo"]);
    // The attachment can be made once the plugin is fixed.
    rec.heal("ADD");
    add(&lab, "ctr", &pod, &[]).ok();
    lab.cni("del", &["--id", "ctr"]).ok();
    lab.assert_nothing_left();
}

#[test]
fn del_continues_past_failures_and_keeps_the_cache_for_a_retry() {
    let lab = Lab::new();
    let pod = Netns::new("rn-pod");
    let (a, b) = (lab.recorder("rec-a"), lab.recorder("rec-b"));
    lab.write_conf(
        "10-net.conflist",
        &lab.conflist("1.0.0", json!([lab.tern_plugin(), { "type": "rec-a" }, { "type": "rec-b" }])),
    );
    add(&lab, "ctr", &pod, &[]).ok();
    a.fail("DEL", &json!({ "code": 11, "msg": "busy a" }));
    b.fail("DEL", &json!({ "code": 999, "msg": "busy b" }));
    let run = lab.cni("del", &["--id", "ctr"]);
    // Both failures are reported, and tern (first in the list, last in DEL order) still ran.
    run.fails_with(&["busy a", "busy b", "rec-a", "rec-b"]);
    assert_eq!(lab.veths(), Vec::<String>::new());
    assert_eq!(lab.reservations(), Vec::<String>::new());
    assert_eq!(lab.cache_entries().len(), 1, "the entry stays for a retry");
    a.heal("DEL");
    b.heal("DEL");
    lab.cni("del", &["--id", "ctr"]).ok();
    lab.assert_nothing_left();
    // DEL of an attachment that is gone is fine (plugins get no prevResult).
    lab.cni("del", &["--id", "ctr"]).ok();
}
