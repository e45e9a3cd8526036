//! What `tern cni` sends each plugin, observed with recording plugins:
//! capability args only to the plugins that declare them, `prevResult`
//! chaining on ADD and the cached result on CHECK/DEL, the CNI_* variables set
//! as libcni sets them, `disableCheck`, `disableGC`, and STATUS codes.
//!
//! Privileged: run as root (each test has its own node namespace).

#[path = "100_runner_kit/mod.rs"]
mod kit;

use std::os::unix::fs::PermissionsExt;

use kit::*;
use serde_json::{json, Value};
use tern_testkit::*;

#[test]
fn capability_args_reach_only_the_plugins_that_declare_them() {
    let lab = Lab::new();
    let pod = Netns::new("rn-pod");
    let id = unique("ctr");
    let (a, b, c) = (lab.recorder("rec-a"), lab.recorder("rec-b"), lab.recorder("rec-c"));
    let first = json!({"cniVersion":"1.0.0","ips":[{"address":"10.9.9.9/24"}],"dns":{}});
    a.set_result(&first);
    lab.write_conf(
        "10-rec.conflist",
        &lab.conflist(
            "1.0.0",
            json!([
                { "type": "rec-a", "capabilities": { "portMappings": true, "mac": true } },
                { "type": "rec-b", "keep": { "me": 1 } },
                { "type": "rec-c", "capabilities": { "mac": true, "bandwidth": false } },
            ]),
        ),
    );
    let ports = json!([{ "hostPort": 8080, "containerPort": 80, "protocol": "tcp" }]);
    let ns = pod.path().display().to_string();
    let add = lab.cni(
        "add",
        &[
            "--id",
            &id,
            "--netns",
            &ns,
            "--ifname",
            "net1",
            "--args",
            "IgnoreUnknown=1;K8S_POD_NAME=p",
            "--cap",
            &format!("portMappings={ports}"),
            "--cap",
            "mac=\"c2:00:00:00:00:02\"",
            "--cap",
            r#"bandwidth={"ingressRate":1000,"ingressBurst":1000}"#,
        ],
    );
    assert_eq!(add.ok().json(), first, "the final result is printed");

    let (ca, cb, cc) = (a.last("ADD"), b.last("ADD"), c.last("ADD"));
    assert_eq!(ca.stdin["runtimeConfig"], json!({ "portMappings": ports, "mac": "c2:00:00:00:00:02" }));
    assert!(cb.stdin.get("runtimeConfig").is_none(), "rec-b declares nothing: {}", cb.stdin);
    assert_eq!(cc.stdin["runtimeConfig"], json!({ "mac": "c2:00:00:00:00:02" }), "bandwidth is false for rec-c");
    // R8: name and version injected, plugin keys passed through, prevResult chained.
    for call in [&ca, &cb, &cc] {
        assert_eq!(call.stdin["name"], lab.net.as_str());
        assert_eq!(call.stdin["cniVersion"], "1.0.0");
        assert_eq!(
            (call.container_id.as_str(), call.netns.as_str(), call.ifname.as_str()),
            (id.as_str(), ns.as_str(), "net1")
        );
        assert_eq!(call.args, "IgnoreUnknown=1;K8S_POD_NAME=p");
        assert_eq!(call.path, lab.cni_path());
    }
    assert_eq!(cb.stdin["keep"], json!({ "me": 1 }));
    assert!(ca.stdin.get("prevResult").is_none(), "the first plugin gets no prevResult");
    assert_eq!(cb.stdin["prevResult"], first);
    assert_eq!(cc.stdin["prevResult"], first);

    // CHECK in order and DEL in reverse, each with the cached result and the cached args.
    let id_args = ["--id", id.as_str(), "--ifname", "net1"];
    lab.cni("check", &id_args).ok();
    lab.cni("del", &id_args).ok();
    for (rec, caps) in [
        (&a, json!({ "portMappings": ports, "mac": "c2:00:00:00:00:02" })),
        (&c, json!({ "mac": "c2:00:00:00:00:02" })),
    ] {
        for cmd in ["CHECK", "DEL"] {
            let call = rec.last(cmd);
            assert_eq!(call.stdin["runtimeConfig"], caps, "{cmd}");
            assert_eq!(call.stdin["prevResult"], first, "{cmd}");
            assert_eq!(call.args, "IgnoreUnknown=1;K8S_POD_NAME=p", "{cmd}");
        }
    }
    assert!(b.last("DEL").stdin.get("runtimeConfig").is_none());
    assert_eq!(a.commands(), ["ADD", "CHECK", "DEL"]);
    assert_eq!(c.commands(), ["ADD", "CHECK", "DEL"]);
    assert!(lab.cache_entries().is_empty());
}

#[test]
fn del_runs_in_reverse_order() {
    let lab = Lab::new();
    let pod = Netns::new("rn-pod");
    let id = unique("ctr");
    // Each recorder appends its name to one shared file, so the order of calls across plugins shows.
    let order = lab.dir.join("order");
    let names = ["rec-1", "rec-2", "rec-3"];
    for n in names {
        lab.recorder(n);
        let wrapped = lab.rec_dir().join(format!("w{n}"));
        std::fs::write(
            &wrapped,
            format!(
                "#!/bin/sh\necho \"$CNI_COMMAND {n}\" >>{}\nexec {} \"$@\"\n",
                order.display(),
                lab.rec_dir().join(n).display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&wrapped, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let plugins: Vec<Value> = names.iter().map(|n| json!({ "type": format!("w{n}") })).collect();
    lab.write_conf("10-rec.conflist", &lab.conflist("1.0.0", Value::Array(plugins)));
    lab.add(&id, &pod, &[]);
    lab.cni("check", &["--id", &id]).ok();
    lab.cni("del", &["--id", &id]).ok();
    let got = std::fs::read_to_string(&order).unwrap();
    assert_eq!(
        got.lines().collect::<Vec<_>>(),
        [
            "ADD rec-1",
            "ADD rec-2",
            "ADD rec-3",
            "CHECK rec-1",
            "CHECK rec-2",
            "CHECK rec-3",
            "DEL rec-3",
            "DEL rec-2",
            "DEL rec-1"
        ]
    );
}

#[test]
fn disable_check_and_disable_gc_skip_the_plugins() {
    let lab = Lab::new();
    let pod = Netns::new("rn-pod");
    let id = unique("ctr");
    let rec = lab.recorder("rec");
    let mut conf = lab.conflist("1.1.0", json!([{ "type": "rec" }]));
    conf["disableCheck"] = json!(true);
    conf["disableGC"] = json!("true");
    lab.write_conf("10-rec.conflist", &conf);
    lab.add(&id, &pod, &[]);
    let check = lab.cni("check", &["--id", &id]);
    assert!(check.ok().stderr.contains("disableCheck"), "{check}");
    let gc = lab.cni("gc", &[]);
    assert!(gc.ok().stdout.contains("disableGC"), "{gc}");
    assert_eq!(rec.commands(), ["ADD"], "neither CHECK nor GC reached the plugin");
    // Without them, both run.
    lab.write_conf("10-rec.conflist", &lab.conflist("1.1.0", json!([{ "type": "rec" }])));
    lab.cni("check", &["--id", &id]).ok();
    lab.cni("gc", &[]).ok();
    assert_eq!(rec.commands(), ["ADD", "CHECK", "GC"]);
    let gc = rec.last("GC");
    assert_eq!(gc.stdin["cni.dev/valid-attachments"], json!([{ "containerID": id, "ifname": "eth0" }]));
    assert_eq!(gc.stdin["cni.dev/attachments"], gc.stdin["cni.dev/valid-attachments"]);
    assert_eq!((gc.container_id.as_str(), gc.netns.as_str(), gc.ifname.as_str()), ("", "", ""));
    lab.cni("del", &["--id", &id]).ok();
}

#[test]
fn status_stops_at_the_first_error_and_keeps_its_code() {
    let lab = Lab::new();
    let (a, b, c) = (lab.recorder("rec-a"), lab.recorder("rec-b"), lab.recorder("rec-c"));
    lab.write_conf(
        "10-rec.conflist",
        &lab.conflist("1.1.0", json!([{ "type": "rec-a" }, { "type": "rec-b" }, { "type": "rec-c" }])),
    );
    lab.cni("status", &[]).ok();
    b.fail("STATUS", &json!({ "code": 50, "msg": "no addresses left" }));
    let run = lab.cni("status", &["--output", "json"]);
    run.fails_with(&["rec-b", "no addresses left", "code 50"]);
    assert_eq!(run.json()["code"], 50);
    assert_eq!(a.commands(), ["STATUS", "STATUS"]);
    assert_eq!(b.commands(), ["STATUS", "STATUS"]);
    assert_eq!(c.commands(), ["STATUS"], "STATUS stops at the first failure");
    let s = a.last("STATUS");
    assert!(s.stdin.get("runtimeConfig").is_none() && s.stdin.get("prevResult").is_none());
    assert_eq!(
        (s.container_id.as_str(), s.netns.as_str(), s.ifname.as_str(), s.path.as_str()),
        ("", "", "", lab.cni_path().as_str())
    );

    // Before 1.1.0 there is no STATUS: nothing is asked.
    lab.write_conf("10-rec.conflist", &lab.conflist("1.0.0", json!([{ "type": "rec-a" }])));
    lab.cni("status", &[]).ok();
    assert_eq!(a.commands().len(), 2);
}

#[test]
fn default_network_is_the_first_file_and_a_single_plugin_conf_is_up_converted() {
    let lab = Lab::new();
    let pod = Netns::new("rn-pod");
    let id = unique("ctr");
    let (a, b) = (lab.recorder("rec-a"), lab.recorder("rec-b"));
    // 10-*.conf comes first in lexical order, whatever the extensions.
    let single = json!({ "cniVersion": "1.0.0", "name": "single", "type": "rec-a", "z": 1.0, "a": "<&>" });
    std::fs::write(lab.conf_dir().join("10-single.conf"), single.to_string()).unwrap();
    lab.write_conf(
        "20-list.conflist",
        &json!({ "cniVersion": "1.0.0", "name": "listed", "plugins": [{ "type": "rec-b" }] }),
    );
    lab.add(&id, &pod, &[]);
    assert_eq!(a.commands(), ["ADD"]);
    assert!(b.commands().is_empty());
    assert_eq!(a.last("ADD").stdin["name"], "single");
    // The cache holds the list libcni synthesises (a Go map: sorted keys, Go number and HTML escaping).
    let file = lab.cache_dir().join("results").join(format!("single-{id}-eth0"));
    let entry: Value = serde_json::from_slice(&std::fs::read(&file).unwrap()).unwrap();
    let config = String::from_utf8(decode_base64(entry["config"].as_str().unwrap())).unwrap();
    assert_eq!(
        config,
        r#"{"cniVersion":"1.0.0","name":"single","plugins":[{"a":"\u003c\u0026\u003e","cniVersion":"1.0.0","name":"single","type":"rec-a","z":1}]}"#
    );
    // --net picks the other one.
    lab.add(&id, &pod, &["--net", "listed"]);
    assert_eq!(b.commands(), ["ADD"]);
    lab.cni("del", &["--id", &id]).ok();
    lab.cni("del", &["--id", &id, "--net", "listed"]).ok();
    assert!(lab.cache_entries().is_empty());
}

fn decode_base64(s: &str) -> Vec<u8> {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let vals: Vec<u32> =
        s.bytes().filter(|&c| c != b'=').map(|c| A.iter().position(|&x| x == c).unwrap() as u32).collect();
    let mut out = Vec::new();
    for chunk in vals.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, v)| acc | v << (18 - 6 * i));
        for i in 0..chunk.len() - 1 {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}
