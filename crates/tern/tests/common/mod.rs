//! Shared helpers for the `tern` plugin integration tests.
//!
//! Append-only: several test files use this module, so add functions rather
//! than change existing ones.
#![allow(dead_code)]

use std::path::Path;

use serde_json::{json, Value};
use tern_testkit::*;

/// One node of a test: its own network namespace (where the plugins run), a
/// private plugin directory, a private IPAM dataDir and a unique network and
/// bridge name. Everything goes away on drop.
pub struct Node {
    pub ns: Netns,
    pub plugins: Plugins,
    pub data: TempDir,
    pub network: String,
    pub bridge: String,
}

impl Node {
    pub fn new() -> Node {
        Node {
            ns: Netns::new("tnode"),
            plugins: Plugins::new(Path::new(env!("CARGO_BIN_EXE_tern"))),
            data: TempDir::new(),
            network: unique("tnet"),
            bridge: unique_short("tb"),
        }
    }

    /// A `tern` config for this node: `cniVersion`, `name`, `type`, `bridge`
    /// and an `ipam` section (`tern-ipam`, this node's dataDir, `ranges`),
    /// then the keys of `extra` on top (an `ipam` object in `extra` is merged
    /// into the ipam section instead of replacing it).
    pub fn conf(&self, version: &str, ranges: Value, extra: Value) -> String {
        let mut conf = json!({
            "cniVersion": version,
            "name": self.network,
            "type": "tern",
            "bridge": self.bridge,
            "ipam": {"type": "tern-ipam", "dataDir": self.data.path(), "ranges": ranges},
        });
        for (k, v) in extra.as_object().expect("extra is an object") {
            match (k.as_str(), v) {
                ("ipam", Value::Object(m)) => {
                    for (ik, iv) in m {
                        conf["ipam"][ik] = iv.clone();
                    }
                }
                _ => conf[k] = v.clone(),
            }
        }
        conf.to_string()
    }

    /// Runs the `tern` plugin in this node with CNI_IFNAME=eth0.
    pub fn tern(&self, command: &str, cid: &str, netns: Option<&Path>, args: &str, conf: &str) -> PluginRun {
        exec_plugin(&self.ns, &self.plugins, "tern", command, cid, netns, "eth0", args, conf)
    }

    /// ADD of `cid` into `pod` (eth0).
    pub fn add(&self, conf: &str, cid: &str, pod: &Netns) -> PluginRun {
        self.tern("ADD", cid, Some(&pod.path()), "", conf)
    }

    /// ADD that must succeed; returns the result JSON.
    pub fn add_ok(&self, conf: &str, cid: &str, pod: &Netns) -> Value {
        self.add(conf, cid, pod).assert_ok().json()
    }

    /// DEL of `cid` (eth0), `netns` as CNI_NETNS (`None`: unset).
    pub fn del(&self, conf: &str, cid: &str, netns: Option<&Path>) -> PluginRun {
        self.tern("DEL", cid, netns, "", conf)
    }

    /// Reserved addresses in this node's dataDir for its network.
    pub fn reservations(&self) -> Vec<String> {
        reservations(self.data.path(), &self.network)
    }

    /// tern's host veths (`tn*`) in the node.
    pub fn veths(&self) -> Vec<String> {
        veth_links(&self.ns, "tn")
    }

    /// Nothing of any attachment left: no `tn*` veth, no reservation, no nft table.
    pub fn assert_clean(&self) {
        assert_eq!(self.veths(), Vec::<String>::new(), "tern veths left in the node");
        assert_eq!(self.reservations(), Vec::<String>::new(), "reservations left");
        assert_eq!(nft_tables(&self.ns), Vec::<String>::new(), "nft tables left in the node");
    }
}

/// `conf` with `prevResult` set to `prev`.
pub fn with_prev(conf: &str, prev: &Value) -> String {
    let mut v: Value = serde_json::from_str(conf).expect("conf is JSON");
    v["prevResult"] = prev.clone();
    v.to_string()
}

/// Panics unless a DEL/CHECK-like run succeeded with exit 0 and empty stdout.
pub fn assert_empty_ok(run: &PluginRun) {
    assert!(run.code == 0 && run.stdout.trim().is_empty(), "expected exit 0 and empty stdout, got:\n{run}");
}

/// Panics unless the run failed with a CNI error object on stdout whose `msg`
/// contains every one of `needles`; returns the error object.
pub fn assert_error_naming(run: &PluginRun, needles: &[&str]) -> Value {
    assert_ne!(run.code, 0, "expected a failure, got:\n{run}");
    let e: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("error is not JSON ({e}):\n{run}"));
    assert!(e["code"].as_u64().is_some(), "error without a code:\n{run}");
    let msg = e["msg"].as_str().unwrap_or_else(|| panic!("error without msg:\n{run}"));
    for n in needles {
        assert!(msg.contains(n), "error msg {msg:?} does not mention {n:?}");
    }
    e
}

/// `ip -j <args>` in `ns`, parsed (empty output = empty list).
pub fn ip_json(ns: &Netns, args: &[&str]) -> Vec<Value> {
    let mut argv = vec!["ip", "-j"];
    argv.extend_from_slice(args);
    let out = ns.run(&argv);
    assert!(out.status.success(), "`{}` failed: {}", argv.join(" "), String::from_utf8_lossy(&out.stderr));
    if out.stdout.iter().all(u8::is_ascii_whitespace) {
        return Vec::new();
    }
    match serde_json::from_slice(&out.stdout).expect("ip -j output is JSON") {
        Value::Array(v) => v,
        other => panic!("unexpected `{}` output: {other}", argv.join(" ")),
    }
}

/// `ip -d -j link show dev <name>` in `ns`, or `None` if there is no such link.
pub fn link(ns: &Netns, name: &str) -> Option<Value> {
    let out = ns.run(&["ip", "-d", "-j", "link", "show", "dev", name]);
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("ip -j output is JSON");
    v.as_array().and_then(|a| a.first()).cloned()
}

/// The `ips[].address` values of a result.
pub fn result_addrs(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .expect("result has ips")
        .iter()
        .map(|ip| ip["address"].as_str().expect("address").to_owned())
        .collect()
}

/// The address part of `a/len`.
pub fn ip_of(cidr: &str) -> std::net::IpAddr {
    cidr.split('/').next().unwrap().parse().unwrap_or_else(|e| panic!("bad address {cidr:?}: {e}"))
}

/// Removes a test node's eBPF fast-path pins when the node goes (a real node
/// keeps them while it lives; the attached filters keep running pods going).
pub struct Pins<'a>(pub &'a Netns);

impl Drop for Pins<'_> {
    fn drop(&mut self) {
        let _ = self.0.enter(tern_bpf::unpin_current_netns);
    }
}

/// The node's fast-path entry for `addr`.
pub fn fast_entry(node: &Netns, addr: std::net::IpAddr) -> Option<tern_bpf::Endpoint> {
    node.enter(|| tern_bpf::FastPath::open_existing().unwrap().and_then(|fp| fp.endpoint(addr).unwrap()))
}

/// Every fast-path entry of the node.
pub fn fast_entries(node: &Netns) -> Vec<tern_bpf::Endpoint> {
    node.enter(|| tern_bpf::FastPath::open_existing().unwrap().map(|fp| fp.endpoints().unwrap()).unwrap_or_default())
}
