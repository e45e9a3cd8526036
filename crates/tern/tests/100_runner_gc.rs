//! `tern cni gc`: the cached attachments of the network are the valid ones;
//! those whose netns is gone get a DEL first (with their cached result and
//! args); then GC goes to every plugin, which releases everything not in the
//! cache. Other attachments keep working.
//!
//! Privileged: run as root (each test has its own node and pod namespaces).

#[path = "100_runner_kit/mod.rs"]
mod kit;

use kit::*;
use serde_json::json;
use tern_testkit::*;

#[test]
fn gc_deletes_attachments_whose_netns_is_gone_and_releases_everything_not_cached() {
    let lab = Lab::new();
    let rec = lab.recorder("rec");
    lab.write_conf(
        "10-net.conflist",
        &lab.conflist("1.1.0", json!([lab.tern_plugin(), { "type": "rec", "capabilities": { "mac": true } }])),
    );
    let (gone, kept, stray) = (Netns::new("rn-gone"), Netns::new("rn-kept"), Netns::new("rn-stray"));
    let (gone_id, kept_id, stray_id) = (unique("gone"), unique("kept"), unique("stray"));
    lab.add(&gone_id, &gone, &["--args", "IgnoreUnknown=1", "--cap", "mac=\"c2:00:00:00:00:03\""]);
    let kept_result = lab.add(&kept_id, &kept, &[]);
    // An attachment nobody cached (a runtime crashed before writing its cache, say).
    let mut conf = lab.tern_plugin();
    conf["cniVersion"] = json!("1.1.0");
    conf["name"] = json!(lab.net);
    exec_plugin(&lab.node, &lab.plugins, "tern", "ADD", &stray_id, Some(&stray.path()), "eth0", "", &conf.to_string())
        .assert_ok();
    assert_eq!(lab.veths().len(), 3);
    assert_eq!(lab.reservations().len(), 6);
    assert_eq!(lab.cache_entries().len(), 2);

    gone.delete_now();
    let run = lab.cni("gc", &["--output", "json"]);
    let summary = run.ok().json();
    assert_eq!(summary["deleted"], json!([{ "containerID": gone_id, "ifname": "eth0" }]), "{run}");
    assert_eq!(summary["valid"], json!([{ "containerID": kept_id, "ifname": "eth0" }]), "{run}");
    assert_eq!(summary["pluginsCalled"], true);

    // The stale attachment's DEL had its cached result and args.
    let del = rec.last("DEL");
    assert_eq!(del.container_id, gone_id);
    assert_eq!(del.args, "IgnoreUnknown=1");
    assert_eq!(del.stdin["runtimeConfig"]["mac"], "c2:00:00:00:00:03");
    assert!(del.stdin["prevResult"]["ips"].is_array());
    // Then GC to every plugin with the rest as valid.
    let gc = rec.last("GC");
    assert_eq!(gc.stdin["cni.dev/valid-attachments"], json!([{ "containerID": kept_id, "ifname": "eth0" }]));

    // Only the kept attachment is left: its veth, its two addresses, its cache entry; it still checks.
    assert_eq!(lab.veths().len(), 1, "{:?}", lab.veths());
    let kept_addrs: Vec<String> = kept_result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ip| ip["address"].as_str().unwrap().split('/').next().unwrap().to_string())
        .collect();
    let mut want = kept_addrs.clone();
    want.sort();
    assert_eq!(lab.reservations(), want);
    assert_eq!(lab.cache_entries(), [format!("{}-{kept_id}-eth0", lab.net)]);
    assert!(stray.links() == ["lo"], "the stray attachment's pod end went with its veth: {:?}", stray.links());
    lab.cni("check", &["--id", &kept_id]).ok();

    lab.cni("del", &["--id", &kept_id]).ok();
    lab.assert_nothing_left();
}

#[test]
fn gc_before_1_1_0_only_deletes_stale_attachments() {
    let lab = Lab::new();
    let rec = lab.recorder("rec");
    lab.write_conf("10-net.conflist", &lab.conflist("1.0.0", json!([lab.tern_plugin(), { "type": "rec" }])));
    let pod = Netns::new("rn-pod");
    let id = unique("ctr");
    lab.add(&id, &pod, &[]);
    pod.delete_now();
    let run = lab.cni("gc", &[]);
    assert!(run.ok().stderr.contains("GC exists from 1.1.0"), "{run}");
    assert_eq!(rec.commands(), ["ADD", "DEL"], "no GC below 1.1.0");
    // The host veth goes with the pod's netns; DEL released the addresses and the entry.
    assert!(wait_until(std::time::Duration::from_secs(5), || lab.veths().is_empty()));
    lab.assert_nothing_left();
}
