//! Error paths end to end, through the real `tern` executable: malformed
//! configs, environments and versions each give a non-zero exit, a CNI error
//! object on stdout with the spec's code and a message naming the culprit,
//! and leave nothing behind in the node. Also VERSION, the "about" text, and
//! STATUS on a full / free range.
//!
//! Every case gets its own node namespace (the plugin runs there), pod
//! namespace and dataDir.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tern_testkit::*;

const ALL_VERSIONS: [&str; 7] = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A node namespace with a pod namespace, a plugin dir and a dataDir that
/// does not exist yet (so any directory created under it is visible).
struct World {
    node: Netns,
    pod: Netns,
    plugins: Plugins,
    tmp: TempDir,
    network: String,
    bridge: String,
}

impl World {
    fn new() -> World {
        World {
            node: Netns::new("terr-node"),
            pod: Netns::new("terr-pod"),
            plugins: Plugins::new(Path::new(env!("CARGO_BIN_EXE_tern"))),
            tmp: TempDir::new(),
            network: unique("terrnet"),
            bridge: unique_short("teb"),
        }
    }

    fn data_dir(&self) -> PathBuf {
        self.tmp.join("data")
    }

    /// A valid bridge-mode config at `version`, then `patch`'s keys on top (a
    /// `null` value removes the key).
    fn conf(&self, version: &str, patch: Value) -> String {
        let mut conf = json!({
            "cniVersion": version,
            "name": self.network,
            "type": "tern",
            "bridge": self.bridge,
            "isGateway": true,
            "ipam": {
                "type": "tern-ipam",
                "dataDir": self.data_dir(),
                "ranges": [[{"subnet": "10.61.0.0/24"}], [{"subnet": "fd61::/64"}]],
            },
        });
        let obj = conf.as_object_mut().unwrap();
        for (k, v) in patch.as_object().expect("patch is an object") {
            if v.is_null() {
                obj.remove(k);
            } else {
                obj.insert(k.clone(), v.clone());
            }
        }
        conf.to_string()
    }

    /// The pod namespace's path, for CNI_NETNS.
    fn pod_path(&self) -> String {
        self.pod.path().display().to_string()
    }

    /// `tern` with exactly `env` (plus CNI_PATH unless given) and `stdin`.
    fn run(&self, plugin: &str, env: &[(&str, &str)], stdin: &str) -> PluginRun {
        let cni_path = self.plugins.cni_path();
        let mut full: Vec<(&str, &str)> = env.to_vec();
        if !full.iter().any(|(k, _)| *k == "CNI_PATH") {
            full.push(("CNI_PATH", &cni_path));
        }
        exec_plugin_env(&self.node, &self.plugins, plugin, &full, stdin)
    }

    /// A full ADD environment for container `c1`, eth0, into the pod netns.
    fn add_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", "ADD".to_string()),
            ("CNI_CONTAINERID", "c1".to_string()),
            ("CNI_NETNS", self.pod_path()),
            ("CNI_IFNAME", "eth0".to_string()),
        ]
    }

    /// Nothing was made anywhere: the node has only `lo` (no veth, no
    /// bridge), the pod has only `lo`, no nft table exists in the node, and
    /// the dataDir was not even created (so no reservation either).
    fn assert_nothing_made(&self, what: &str) {
        assert_eq!(self.node.links(), vec!["lo".to_string()], "{what}: links made in the node");
        assert_eq!(veth_links(&self.node, ""), Vec::<String>::new(), "{what}: veths in the node");
        assert_eq!(self.pod.links(), vec!["lo".to_string()], "{what}: links made in the pod");
        assert_eq!(nft_tables(&self.node), Vec::<String>::new(), "{what}: nft tables made in the node");
        assert_eq!(reservations(&self.data_dir(), &self.network), Vec::<String>::new(), "{what}: reservations");
        assert!(
            !self.data_dir().exists(),
            "{what}: the IPAM dataDir {} was created by a request that failed validation",
            self.data_dir().display()
        );
    }
}

fn owned<'a>(env: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    env.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn set(env: &mut Vec<(&'static str, String)>, key: &'static str, value: &str) {
    env.retain(|(k, _)| *k != key);
    env.push((key, value.to_string()));
}

fn unset(env: &mut Vec<(&'static str, String)>, key: &str) {
    env.retain(|(k, _)| *k != key);
}

/// The run failed (non-zero exit) with a CNI error object on stdout with
/// `code`, whose `msg` (or `msg` + `details`, when `in_details`) names every
/// one of `needles`. Returns the error object.
fn assert_cni_error(run: &PluginRun, code: u64, needles: &[&str]) -> Value {
    assert_ne!(run.code, 0, "expected a failure, got:\n{run}");
    let e: Value = serde_json::from_str(run.stdout.trim())
        .unwrap_or_else(|err| panic!("stdout is not a JSON error ({err}):\n{run}"));
    assert_eq!(e["code"].as_u64(), Some(code), "wrong CNI error code:\n{run}");
    let msg = e["msg"].as_str().unwrap_or_else(|| panic!("error without msg:\n{run}"));
    assert!(!msg.is_empty(), "empty msg:\n{run}");
    let text = format!("{msg} {}", e["details"].as_str().unwrap_or_default());
    for n in needles {
        assert!(text.contains(n), "error {text:?} does not name {n:?}:\n{run}");
    }
    e
}

/// An ADD with `env` and `conf` fails with `code` naming `needles`, and makes nothing.
fn add_fails(w: &World, env: &[(&'static str, String)], conf: &str, code: u64, needles: &[&str]) -> Value {
    let run = w.run("tern", &owned(env), conf);
    let e = assert_cni_error(&run, code, needles);
    w.assert_nothing_made(&format!("error code {code}"));
    e
}

// ---- malformed configs -------------------------------------------------------

#[test]
fn bad_json_is_code_6() {
    let w = World::new();
    let e = add_fails(&w, &w.add_env(), r#"{"cniVersion":"1.0.0","name":"#, 6, &["network config"]);
    assert!(e["msg"].as_str().unwrap().contains("unmarshal"), "{e}");
}

#[test]
fn non_object_json_is_code_6() {
    let w = World::new();
    add_fails(&w, &w.add_env(), "[1,2,3]", 6, &["network config"]);
}

#[test]
fn unsupported_cni_version_is_code_1() {
    let w = World::new();
    let e = add_fails(&w, &w.add_env(), &w.conf("9.9.9", json!({})), 1, &["incompatible CNI versions", "9.9.9"]);
    // The details list what the plugin supports.
    let details = e["details"].as_str().unwrap_or_default();
    for v in ALL_VERSIONS {
        assert!(details.contains(v), "details {details:?} do not list {v}");
    }
}

#[test]
fn missing_name_is_code_7() {
    let w = World::new();
    add_fails(&w, &w.add_env(), &w.conf("1.0.0", json!({"name": null})), 7, &["name"]);
}

#[test]
fn invalid_network_name_is_code_7() {
    let w = World::new();
    add_fails(&w, &w.add_env(), &w.conf("1.0.0", json!({"name": "bad/name"})), 7, &["name"]);
}

#[test]
fn bad_mtu_type_is_code_7() {
    let w = World::new();
    add_fails(&w, &w.add_env(), &w.conf("1.0.0", json!({"mtu": "big"})), 7, &["mtu"]);
}

#[test]
fn mtu_out_of_range_is_code_7() {
    let w = World::new();
    add_fails(&w, &w.add_env(), &w.conf("1.0.0", json!({"mtu": 20})), 7, &["mtu"]);
}

#[test]
fn bogus_mode_is_code_7() {
    let w = World::new();
    add_fails(&w, &w.add_env(), &w.conf("1.0.0", json!({"mode": "bogus"})), 7, &["mode", "bogus"]);
}

#[test]
fn hairpin_with_promisc_is_code_7() {
    let w = World::new();
    let conf = w.conf("1.0.0", json!({"hairpinMode": true, "promiscMode": true}));
    add_fails(&w, &w.add_env(), &conf, 7, &["hairpinMode", "promiscMode"]);
}

#[test]
fn invalid_bridge_name_is_code_7() {
    let w = World::new();
    add_fails(&w, &w.add_env(), &w.conf("1.0.0", json!({"bridge": "a-bridge-name-too-long"})), 7, &["bridge"]);
}

#[test]
fn ipam_range_outside_subnet_is_code_7() {
    let w = World::new();
    let ipam = json!({
        "type": "tern-ipam",
        "dataDir": w.data_dir(),
        "ranges": [[{"subnet": "10.61.0.0/24", "rangeStart": "10.62.0.5"}]],
    });
    add_fails(&w, &w.add_env(), &w.conf("1.0.0", json!({ "ipam": ipam })), 7, &["10.62.0.5", "ipam.ranges"]);
}

#[test]
fn ipam_without_type_is_code_7() {
    let w = World::new();
    let ipam = json!({"dataDir": w.data_dir(), "ranges": [[{"subnet": "10.61.0.0/24"}]]});
    add_fails(&w, &w.add_env(), &w.conf("1.0.0", json!({ "ipam": ipam })), 7, &["ipam.type"]);
}

#[test]
fn invalid_runtime_config_mac_is_code_7() {
    let w = World::new();
    let conf = w.conf("1.0.0", json!({"runtimeConfig": {"mac": "not-a-mac"}}));
    add_fails(&w, &w.add_env(), &conf, 7, &["runtimeConfig.mac", "not-a-mac"]);
}

#[test]
fn vlan_is_unsupported_code_2() {
    let w = World::new();
    add_fails(&w, &w.add_env(), &w.conf("1.0.0", json!({"vlan": 5})), 2, &["vlan"]);
}

#[test]
fn vlan_trunk_is_unsupported_code_2() {
    let w = World::new();
    add_fails(&w, &w.add_env(), &w.conf("1.0.0", json!({"vlanTrunk": [{"id": 5}]})), 2, &["vlan"]);
}

#[test]
fn bad_ip_masq_type_is_code_7() {
    let w = World::new();
    add_fails(&w, &w.add_env(), &w.conf("1.0.0", json!({"ipMasq": "yes"})), 7, &["ipMasq"]);
}

#[test]
fn ipam_gateway_outside_subnet_is_code_7() {
    let w = World::new();
    let ipam = json!({
        "type": "tern-ipam",
        "dataDir": w.data_dir(),
        "ranges": [[{"subnet": "10.61.0.0/24", "gateway": "10.70.0.1"}]],
    });
    add_fails(
        &w,
        &w.add_env(),
        &w.conf("1.0.0", json!({ "ipam": ipam })),
        7,
        &["10.70.0.1", "ipam.ranges[0][0].gateway"],
    );
}

#[test]
fn ipam_overlapping_range_sets_are_code_7() {
    let w = World::new();
    let ipam = json!({
        "type": "tern-ipam",
        "dataDir": w.data_dir(),
        "ranges": [[{"subnet": "10.61.0.0/24"}], [{"subnet": "10.61.0.0/25"}]],
    });
    add_fails(&w, &w.add_env(), &w.conf("1.0.0", json!({ "ipam": ipam })), 7, &["overlap", "ipam.ranges"]);
}

#[test]
fn ipam_bad_route_is_code_7() {
    let w = World::new();
    let ipam = json!({
        "type": "tern-ipam",
        "dataDir": w.data_dir(),
        "ranges": [[{"subnet": "10.61.0.0/24"}]],
        "routes": [{"dst": "not-a-cidr"}],
    });
    add_fails(&w, &w.add_env(), &w.conf("1.0.0", json!({ "ipam": ipam })), 7, &["ipam.routes[0].dst"]);
}

#[test]
fn ipam_unknown_allocator_is_code_7() {
    let w = World::new();
    let ipam = json!({
        "type": "tern-ipam",
        "dataDir": w.data_dir(),
        "allocator": "magic",
        "ranges": [[{"subnet": "10.61.0.0/24"}]],
    });
    add_fails(&w, &w.add_env(), &w.conf("1.0.0", json!({ "ipam": ipam })), 7, &["magic", "ipam.allocator"]);
}

/// Not a validation error (code 999), but caught before anything is reserved.
#[test]
fn ipam_missing_resolv_conf_fails_before_reserving() {
    let w = World::new();
    let missing = w.tmp.join("no-such-resolv.conf");
    let ipam = json!({
        "type": "tern-ipam",
        "dataDir": w.data_dir(),
        "resolvConf": missing,
        "ranges": [[{"subnet": "10.61.0.0/24"}]],
    });
    add_fails(&w, &w.add_env(), &w.conf("1.0.0", json!({ "ipam": ipam })), 999, &["ipam.resolvConf"]);
}

/// A failure after IPAM (the bridge name is taken by a link that is not a
/// bridge, here one end of a veth pair): the ADD undoes its reservation and
/// makes no veth of its own; the pre-existing pair stays.
#[test]
fn failure_after_ipam_undoes_everything() {
    let w = World::new();
    let peer = unique_short("tep");
    w.node.ok(&format!("ip link add {} type veth peer name {peer}", w.bridge));
    let mut before = w.node.links();
    before.sort();
    let conf = w.conf("1.0.0", json!({"ipMasq": true, "macspoofchk": true}));
    let run = w.run("tern", &owned(&w.add_env()), &conf);
    assert_cni_error(&run, 999, &[&w.bridge, "not a bridge"]);
    let mut after = w.node.links();
    after.sort();
    assert_eq!(after, before, "links made or removed in the node");
    assert_eq!(veth_links(&w.node, "tn"), Vec::<String>::new(), "tern veths left");
    assert_eq!(w.pod.links(), vec!["lo".to_string()], "links left in the pod");
    assert_eq!(reservations(&w.data_dir(), &w.network), Vec::<String>::new(), "reservations left");
    assert_eq!(nft_tables(&w.node), Vec::<String>::new(), "nft tables left");
}

/// I3: an ADD into a pod that already has the interface fails, undoes its
/// reservation, makes no veth; the runtime's DEL afterwards leaves the
/// pod's own interface alone.
#[test]
fn existing_pod_interface_fails_and_is_left_alone() {
    let w = World::new();
    w.pod.ok("ip link add eth0 type veth peer name eth0peer");
    let conf = w.conf("1.0.0", json!({"ipMasq": true, "macspoofchk": true}));
    let run = w.run("tern", &owned(&w.add_env()), &conf);
    assert_cni_error(&run, 999, &["eth0", "exists"]);
    assert_eq!(veth_links(&w.node, "tn"), Vec::<String>::new(), "tern veths left");
    assert_eq!(reservations(&w.data_dir(), &w.network), Vec::<String>::new(), "reservations left");
    assert_eq!(nft_tables(&w.node), Vec::<String>::new(), "nft tables left");
    let mut links = w.pod.links();
    links.sort();
    assert_eq!(links, ["eth0", "eth0peer", "lo"], "the pod's own links changed");

    let mut env = w.add_env();
    set(&mut env, "CNI_COMMAND", "DEL");
    let del = w.run("tern", &owned(&env), &conf);
    del.assert_ok();
    let mut links = w.pod.links();
    links.sort();
    assert_eq!(links, ["eth0", "eth0peer", "lo"], "DEL after the failed ADD touched the pod's own links");
}

/// A second ADD of the same attachment (no DEL in between) fails and
/// leaves the first one whole: veth, addresses, reservations, pod eth0.
#[test]
fn duplicate_add_fails_without_harming_the_first() {
    let w = World::new();
    let conf = w.conf("1.0.0", json!({"ipMasq": true, "macspoofchk": true}));
    w.run("tern", &owned(&w.add_env()), &conf).assert_ok();
    let veths = veth_links(&w.node, "tn");
    let reserved = reservations(&w.data_dir(), &w.network);
    let addrs = w.pod.addrs("eth0");
    let elems = w.node.ok("nft list ruleset | grep -c comment || true");
    assert_eq!((veths.len(), reserved.len(), addrs.len()), (1, 2, 2));

    for pod in [None, Some(Netns::new("terr-pod2"))] {
        let mut env = w.add_env();
        if let Some(p) = &pod {
            set(&mut env, "CNI_NETNS", &p.path().display().to_string());
        }
        let run = w.run("tern", &owned(&env), &conf);
        assert_ne!(run.code, 0, "a duplicate ADD succeeded:\n{run}");
        assert!(run.error_code().is_some(), "{run}");
        if let Some(p) = &pod {
            assert_eq!(p.links(), vec!["lo".to_string()], "the duplicate ADD left a link in its pod");
        }
        assert_eq!(veth_links(&w.node, "tn"), veths, "the duplicate ADD changed the veths");
        assert_eq!(reservations(&w.data_dir(), &w.network), reserved, "the duplicate ADD changed the reservations");
        assert_eq!(w.pod.addrs("eth0"), addrs, "the duplicate ADD changed the first pod");
        assert_eq!(w.node.ok("nft list ruleset | grep -c comment || true"), elems, "nft elements changed");
    }
}

/// The duplicate-ADD error should say which attachment exists: network,
/// container id and ifname (the owner tag), not just network and ifname.
#[test]
fn duplicate_add_error_names_the_container() {
    let w = World::new();
    let conf = w.conf("1.0.0", json!({}));
    w.run("tern", &owned(&w.add_env()), &conf).assert_ok();
    let run = w.run("tern", &owned(&w.add_env()), &conf);
    assert_cni_error(&run, 999, &["already exists", &format!("{}/c1/eth0", w.network)]);
}

// ---- malformed environments --------------------------------------------------

#[test]
fn missing_cni_netns_on_add_is_code_4() {
    let w = World::new();
    let mut env = w.add_env();
    unset(&mut env, "CNI_NETNS");
    add_fails(&w, &env, &w.conf("1.0.0", json!({})), 4, &["CNI_NETNS"]);
}

#[test]
fn missing_ifname_on_add_is_code_4() {
    let w = World::new();
    let mut env = w.add_env();
    unset(&mut env, "CNI_IFNAME");
    add_fails(&w, &env, &w.conf("1.0.0", json!({})), 4, &["CNI_IFNAME"]);
}

#[test]
fn missing_container_id_is_code_3() {
    let w = World::new();
    let mut env = w.add_env();
    unset(&mut env, "CNI_CONTAINERID");
    add_fails(&w, &env, &w.conf("1.0.0", json!({})), 3, &["containerID"]);
}

#[test]
fn container_id_with_slash_is_code_4() {
    let w = World::new();
    let mut env = w.add_env();
    set(&mut env, "CNI_CONTAINERID", "bad/id");
    let e = add_fails(&w, &env, &w.conf("1.0.0", json!({})), 4, &["CNI_CONTAINERID"]);
    assert!(e["details"].as_str().unwrap_or_default().contains("bad/id"), "{e}");
}

#[test]
fn ifname_of_16_chars_is_code_4() {
    let w = World::new();
    let mut env = w.add_env();
    set(&mut env, "CNI_IFNAME", "abcdefghijklmnop");
    add_fails(&w, &env, &w.conf("1.0.0", json!({})), 4, &["CNI_IFNAME", "too long"]);
}

#[test]
fn unknown_command_is_code_4() {
    let w = World::new();
    let mut env = w.add_env();
    set(&mut env, "CNI_COMMAND", "FROB");
    add_fails(&w, &env, &w.conf("1.0.0", json!({})), 4, &["FROB"]);
}

#[test]
fn unknown_cni_args_key_is_code_4() {
    let w = World::new();
    let mut env = w.add_env();
    set(&mut env, "CNI_ARGS", "K8S_POD_NAME=p;FOO=bar");
    add_fails(&w, &env, &w.conf("1.0.0", json!({})), 4, &["CNI_ARGS", "FOO"]);
}

#[test]
fn malformed_cni_args_pair_is_code_4() {
    let w = World::new();
    let mut env = w.add_env();
    set(&mut env, "CNI_ARGS", "IgnoreUnknown=1;novalue");
    add_fails(&w, &env, &w.conf("1.0.0", json!({})), 4, &["CNI_ARGS", "novalue"]);
}

#[test]
fn netns_that_does_not_exist_is_code_4() {
    let w = World::new();
    let mut env = w.add_env();
    let missing = format!("/run/netns/{}", unique("terr-missing"));
    set(&mut env, "CNI_NETNS", &missing);
    add_fails(&w, &env, &w.conf("1.0.0", json!({})), 4, &["CNI_NETNS", &missing]);
}

// ---- commands the config version does not allow ------------------------------

#[test]
fn check_with_0_3_1_is_code_1() {
    let w = World::new();
    let mut env = w.add_env();
    set(&mut env, "CNI_COMMAND", "CHECK");
    let prev = json!({"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.61.0.2/24"}]});
    let conf = w.conf("0.3.1", json!({ "prevResult": prev }));
    add_fails(&w, &env, &conf, 1, &["CHECK", "0.3.1"]);
}

#[test]
fn gc_with_1_0_0_is_code_1() {
    let w = World::new();
    let env = vec![("CNI_COMMAND", "GC".to_string())];
    let conf = w.conf("1.0.0", json!({"cni.dev/valid-attachments": []}));
    add_fails(&w, &env, &conf, 1, &["GC", "1.0.0"]);
}

#[test]
fn status_with_1_0_0_is_code_1() {
    let w = World::new();
    let env = vec![("CNI_COMMAND", "STATUS".to_string())];
    add_fails(&w, &env, &w.conf("1.0.0", json!({})), 1, &["STATUS", "1.0.0"]);
}

/// The base config of the cases above is itself valid: an ADD with it
/// succeeds, and DEL leaves the node as it was (the bridge aside).
#[test]
fn control_valid_config_adds_and_deletes() {
    let w = World::new();
    let conf = w.conf("1.0.0", json!({}));
    let run = w.run("tern", &owned(&w.add_env()), &conf);
    run.assert_ok();
    let res = run.json();
    assert_eq!(res["cniVersion"], "1.0.0", "{run}");
    assert_eq!(res["ips"].as_array().map(Vec::len), Some(2), "{run}");
    assert_eq!(veth_links(&w.node, "tn").len(), 1);
    assert_eq!(reservations(&w.data_dir(), &w.network).len(), 2);

    let mut env = w.add_env();
    set(&mut env, "CNI_COMMAND", "DEL");
    let del = w.run("tern", &owned(&env), &conf);
    del.assert_ok();
    assert_eq!(del.stdout.trim(), "", "{del}");
    assert_eq!(veth_links(&w.node, ""), Vec::<String>::new());
    assert_eq!(reservations(&w.data_dir(), &w.network), Vec::<String>::new());
    assert_eq!(w.pod.links(), vec!["lo".to_string()]);
}

// ---- VERSION and the about text -----------------------------------------------

#[test]
fn version_echoes_the_input_and_lists_all_versions() {
    let w = World::new();
    for plugin in ["tern", "tern-ipam"] {
        for asked in ["0.1.0", "0.2.0", "0.4.0", "1.0.0", "1.1.0"] {
            let run = w.run(plugin, &[("CNI_COMMAND", "VERSION")], &json!({ "cniVersion": asked }).to_string());
            run.assert_ok();
            let v = run.json();
            assert_eq!(v["cniVersion"], asked, "{plugin}: {run}");
            assert_eq!(v["supportedVersions"], json!(ALL_VERSIONS), "{plugin}: {run}");
            assert!(run.stdout.ends_with('\n'), "{plugin}: stdout does not end with a newline: {run}");
        }
    }
    // libcni's probe sets dummy attachment variables; they must not matter.
    let probe = [("CNI_COMMAND", "VERSION"), ("CNI_NETNS", "dummy"), ("CNI_IFNAME", "dummy"), ("CNI_PATH", "dummy")];
    let run = w.run("tern", &probe, r#"{"cniVersion":"1.0.0"}"#);
    run.assert_ok();
    assert_eq!(run.json()["cniVersion"], "1.0.0", "{run}");
    assert_eq!(run.json()["supportedVersions"], json!(ALL_VERSIONS), "{run}");
    assert_eq!(w.node.links(), vec!["lo".to_string()]);
}

#[test]
fn tern_ipam_without_cni_command_prints_about_and_exits_0() {
    let w = World::new();
    let run = exec_plugin_env(&w.node, &w.plugins, "tern-ipam", &[], "");
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(run.stdout, "", "{run}");
    assert!(run.stderr.contains("CNI tern-ipam plugin"), "{run}");
    assert!(run.stderr.contains(&ALL_VERSIONS.join(", ")), "{run}");
}

// ---- STATUS --------------------------------------------------------------------

/// A /30 has exactly one allocatable address (.1 is the gateway): after one
/// ADD, STATUS (1.1.0) reports code 50 naming the range; after DEL, it is 0.
#[test]
fn status_reports_a_full_range_with_code_50() {
    let w = World::new();
    let ipam = json!({"type": "tern-ipam", "dataDir": w.data_dir(), "ranges": [[{"subnet": "10.63.0.0/30"}]]});
    let conf = w.conf("1.1.0", json!({ "ipam": ipam }));
    let status = |plugin: &str| w.run(plugin, &[("CNI_COMMAND", "STATUS")], &conf);

    for plugin in ["tern", "tern-ipam"] {
        let run = status(plugin);
        assert!(run.code == 0 && run.stdout.trim().is_empty(), "{plugin} STATUS on a fresh range: {run}");
    }

    let add = w.run("tern", &owned(&w.add_env()), &conf);
    add.assert_ok();
    let res = add.json();
    assert_eq!(res["cniVersion"], "1.1.0", "{add}");
    assert_eq!(res["ips"][0]["address"], "10.63.0.2/30", "{add}");

    for plugin in ["tern", "tern-ipam"] {
        let run = status(plugin);
        assert_cni_error(&run, 50, &["no IP addresses available", "10.63.0.2"]);
    }

    // A second ADD fails (nothing left) and leaves nothing of its own.
    let pod2 = Netns::new("terr-pod2");
    let env2 = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c2"),
        ("CNI_NETNS", &*pod2.path().display().to_string()),
        ("CNI_IFNAME", "eth0"),
    ]
    .map(|(k, v)| (k, v.to_string()));
    let run = w.run("tern", &owned(&env2), &conf);
    assert_ne!(run.code, 0, "{run}");
    assert!(run.error_code().is_some(), "{run}");
    assert_eq!(pod2.links(), vec!["lo".to_string()], "the failed ADD left a link in its pod");
    assert_eq!(veth_links(&w.node, "tn").len(), 1, "the failed ADD left a veth");
    assert_eq!(reservations(&w.data_dir(), &w.network), vec!["10.63.0.2".to_string()]);

    let mut del = w.add_env();
    set(&mut del, "CNI_COMMAND", "DEL");
    w.run("tern", &owned(&del), &conf).assert_ok();
    for plugin in ["tern", "tern-ipam"] {
        let run = status(plugin);
        assert!(run.code == 0 && run.stdout.trim().is_empty(), "{plugin} STATUS after DEL: {run}");
    }
    assert_eq!(veth_links(&w.node, ""), Vec::<String>::new());
}
