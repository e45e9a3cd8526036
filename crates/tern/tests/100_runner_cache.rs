//! `tern cni`'s result cache is libcni's: an entry tern writes has libcni's
//! file name, field names, encoding and modes; entries a libcni-based runtime
//! wrote (current and legacy) are used by `tern cni del`; a corrupt or empty
//! entry does not block DEL.
//!
//! Privileged: run as root. Each test builds its own node and pod namespaces.

#[path = "100_runner_kit/mod.rs"]
mod kit;

use std::os::unix::fs::PermissionsExt;

use kit::*;
use serde_json::{json, Value};
use tern_testkit::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o7777
}

/// Standard base64 with padding (Go's `[]byte` JSON encoding), for checking the cache independently.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn entry_written_by_tern_has_libcni_fields_encoding_and_modes() {
    let lab = Lab::new();
    let pod = Netns::new("rn-pod");
    let id = unique("ctr");
    let conflist = lab.write_conf("10-net.conflist", &lab.conflist("1.0.0", json!([lab.tern_plugin()])));
    let caps = [
        "--cap",
        r#"portMappings=[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]"#,
        "--cap",
        "mac=\"c2:00:00:00:00:01\"",
    ];
    let mut args = vec!["--args", "IgnoreUnknown=1;K8S_POD_NAME=p1"];
    args.extend_from_slice(&caps);
    let result = lab.add(&id, &pod, &args);

    let file = lab.cache_file(&id);
    assert_eq!(lab.cache_entries(), [format!("{}-{id}-eth0", lab.net)]);
    assert_eq!(mode(&file), 0o600, "cache file mode");
    assert_eq!(mode(&lab.cache_dir().join("results")), 0o700, "results dir mode");

    let raw = std::fs::read_to_string(&file).unwrap();
    assert!(!raw.ends_with('\n'), "libcni writes no trailing newline");
    let v: Value = serde_json::from_str(&raw).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    // libcni's cachedInfo, in its field order.
    assert_eq!(
        keys,
        ["kind", "containerId", "config", "ifName", "networkName", "netns", "cniArgs", "capabilityArgs", "result"]
    );
    assert_eq!(v["kind"], "cniCacheV1");
    assert_eq!(v["containerId"], id.as_str());
    assert_eq!(v["config"], base64(&conflist), "config is the base64 of the conflist bytes as loaded");
    assert_eq!(v["ifName"], "eth0");
    assert_eq!(v["networkName"], lab.net.as_str());
    assert_eq!(v["netns"], pod.path().display().to_string());
    assert_eq!(v["cniArgs"], json!([["IgnoreUnknown", "1"], ["K8S_POD_NAME", "p1"]]));
    assert_eq!(
        v["capabilityArgs"],
        json!({ "mac": "c2:00:00:00:00:01", "portMappings": [{ "containerPort": 80, "hostPort": 8080, "protocol": "tcp" }] })
    );
    assert_eq!(v["result"], result, "the cached result is the printed one");
    // Go marshals maps with sorted keys: capabilityArgs and result are maps.
    let cap_keys: Vec<&String> = v["capabilityArgs"].as_object().unwrap().keys().collect();
    assert_eq!(cap_keys, ["mac", "portMappings"]);
    let res_keys: Vec<&String> = v["result"].as_object().unwrap().keys().collect();
    assert_eq!(res_keys, ["cniVersion", "dns", "interfaces", "ips"]);
    assert!(raw.contains(r#""portMappings":[{"containerPort":80,"hostPort":8080,"protocol":"tcp"}]"#), "{raw}");

    // A second ADD of the same attachment is refused and changes nothing.
    let ns = pod.path().display().to_string();
    lab.cni("add", &["--id", &id, "--netns", &ns]).fails_with(&["already attached"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), raw);

    // `tern cni list`, as JSON.
    let cache = lab.cache_dir().display().to_string();
    let list = lab.tern(&["cni", "list", "--cache-dir", &cache, "--output", "json"]).ok().json();
    assert_eq!(list[0]["containerId"], id.as_str());
    assert_eq!(list[0]["addresses"], json!(["10.101.0.2/24", "fd01:101::2/64"]));

    lab.cni("del", &["--id", &id]).ok();
    lab.assert_nothing_left();
    assert!(lab.tern(&["cni", "list", "--cache-dir", &cache]).ok().stdout.contains("no cached attachments"));
}

/// A chain `tern` → recorder, attached by running the tern plugin directly (as a runtime would
/// have), so the test can write the cache entry itself.
fn attached_by_hand(lab: &Lab, pod: &Netns, id: &str) -> (Recorder, Vec<u8>, Value) {
    let rec = lab.recorder("rec");
    let conflist = lab.write_conf(
        "10-net.conflist",
        &lab.conflist("1.0.0", json!([lab.tern_plugin(), { "type": "rec", "capabilities": { "portMappings": true } }])),
    );
    let mut first = lab.tern_plugin();
    first["cniVersion"] = json!("1.0.0");
    first["name"] = json!(lab.net);
    let run =
        exec_plugin(&lab.node, &lab.plugins, "tern", "ADD", id, Some(&pod.path()), "eth0", "", &first.to_string());
    let result = run.assert_ok().json();
    assert_eq!(lab.veths().len(), 1);
    assert_eq!(lab.reservations().len(), 2);
    (rec, conflist, result)
}

#[test]
fn libcni_cache_entry_is_used_by_del() {
    let lab = Lab::new();
    let pod = Netns::new("rn-pod");
    let id = unique("ctr");
    let (rec, conflist, result) = attached_by_hand(&lab, &pod, &id);

    // Exactly what libcni 1.2 writes: struct fields in order, maps with sorted keys.
    let mut sorted_result = String::new();
    sorted(&result, &mut sorted_result);
    let entry = format!(
        concat!(
            r#"{{"kind":"cniCacheV1","containerId":"{id}","config":"{config}","ifName":"eth0","networkName":"{net}","#,
            r#""netns":"{netns}","cniArgs":[["IgnoreUnknown","1"],["K8S_POD_NAME","p1"]],"#,
            r#""capabilityArgs":{{"portMappings":[{{"containerPort":80,"hostPort":8080,"protocol":"tcp"}}]}},"result":{result}}}"#
        ),
        id = id,
        config = base64(&conflist),
        net = lab.net,
        netns = pod.path().display(),
        result = sorted_result,
    );
    let results = lab.cache_dir().join("results");
    std::fs::create_dir_all(&results).unwrap();
    std::fs::write(lab.cache_file(&id), entry).unwrap();

    // `list` reads it.
    let cache = lab.cache_dir().display().to_string();
    let list = lab.tern(&["cni", "list", "--cache-dir", &cache]);
    assert!(list.ok().stdout.contains(&id) && list.stdout.contains("10.101.0.2/24"), "{list}");

    // DEL with nothing but the id: netns, CNI_ARGS and capability args come from the entry.
    lab.cni("del", &["--id", &id]).ok();
    let del = rec.last("DEL");
    assert_eq!(del.stdin["prevResult"], result, "the cached result reaches the plugin as prevResult");
    assert_eq!(del.stdin["runtimeConfig"]["portMappings"][0]["hostPort"], 8080);
    assert_eq!(del.args, "IgnoreUnknown=1;K8S_POD_NAME=p1");
    assert_eq!(del.netns, pod.path().display().to_string());
    assert_eq!(rec.commands(), ["DEL"]);
    // tern's DEL ran too (after the recorder: reverse order), and the entry is gone.
    lab.assert_nothing_left();
}

#[test]
fn legacy_cache_entry_is_used_by_del() {
    let lab = Lab::new();
    let pod = Netns::new("rn-pod");
    let id = unique("ctr");
    let (rec, _, result) = attached_by_hand(&lab, &pod, &id);
    // A pre-cniCacheV1 entry is the result alone, here in 0.4.0 form (with ips[].version).
    let mut legacy = result.clone();
    legacy["cniVersion"] = json!("0.4.0");
    for ip in legacy["ips"].as_array_mut().unwrap() {
        let v = if ip["address"].as_str().unwrap().contains(':') { "6" } else { "4" };
        ip["version"] = json!(v);
    }
    std::fs::create_dir_all(lab.cache_dir().join("results")).unwrap();
    std::fs::write(lab.cache_file(&id), legacy.to_string()).unwrap();

    let ns = pod.path().display().to_string();
    lab.cni("del", &["--id", &id, "--netns", &ns]).ok();
    // Converted to the list's version (1.0.0) before it is passed on.
    assert_eq!(rec.last("DEL").stdin["prevResult"], result);
    lab.assert_nothing_left();
}

#[test]
fn corrupt_or_empty_cache_entry_does_not_block_del() {
    for content in ["", "{\"kind\":\"cniCacheV1\",\"containerId\":\"x", "[]"] {
        let lab = Lab::new();
        let pod = Netns::new("rn-pod");
        let id = unique("ctr");
        let (rec, _, _) = attached_by_hand(&lab, &pod, &id);
        std::fs::create_dir_all(lab.cache_dir().join("results")).unwrap();
        std::fs::write(lab.cache_file(&id), content).unwrap();

        // CHECK needs the cached result: it reports the entry instead of running anything.
        let ns = pod.path().display().to_string();
        lab.cni("check", &["--id", &id, "--netns", &ns]).fails_with(&["cache entry"]);
        assert!(rec.commands().is_empty());

        let del = lab.cni("del", &["--id", &id, "--netns", &ns]);
        del.ok();
        assert!(del.stderr.contains("unusable") && del.stderr.contains("removed"), "{del}");
        assert!(rec.last("DEL").stdin.get("prevResult").is_none(), "no prevResult from a corrupt entry");
        lab.assert_nothing_left();
    }
}

/// `v` as Go marshals a map: keys sorted at every level, compact.
fn sorted(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).unwrap());
                out.push(':');
                sorted(&m[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                sorted(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}
