//! `tern cni` driving chains that mix tern and the reference plugins (Debian
//! containernetworking-plugins v1.1.1) in both directions (`tern` followed by
//! the reference portmap, bandwidth and tuning; the reference bridge with
//! tern-ipam followed by tern's chained plugins): ADD, CHECK and DEL succeed,
//! every plugin's effect is there in between, and nothing of the chain is
//! left after DEL.
//!
//! Privileged: run as root. Each test builds its own node and pod namespaces.

#[path = "100_runner_kit/mod.rs"]
mod kit;

use kit::*;
use serde_json::{json, Value};
use tern_testkit::*;

const MAC: &str = "c2:11:22:33:44:55";

/// `iptables-save` (v4 and v6) in the node, or `None` when iptables is not installed.
fn iptables_save(lab: &Lab) -> Option<String> {
    let mut all = String::new();
    for cmd in ["iptables-save", "ip6tables-save"] {
        let out = lab.node.sh(&format!("command -v {cmd} >/dev/null || exit 127; {cmd}"));
        if out.status.code() == Some(127) {
            return None;
        }
        assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
        all.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    Some(all)
}

/// Links in the node whose name starts with `prefix`.
fn links_with(lab: &Lab, prefix: &str) -> Vec<String> {
    lab.node.links().into_iter().filter(|l| l.starts_with(prefix)).collect()
}

fn sandbox_mac(result: &Value) -> String {
    result["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .find(|i| i["name"] == "eth0" && i["sandbox"].as_str().is_some_and(|s| !s.is_empty()))
        .expect("eth0 in the result")["mac"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn tern_then_reference_portmap_bandwidth_and_tuning() {
    let lab = Lab::new();
    let pod = Netns::new("rn-pod");
    let id = unique("ctr");
    lab.write_conf(
        "10-chain.conflist",
        &lab.conflist(
            "1.0.0",
            json!([
                lab.tern_plugin(),
                { "type": "portmap", "capabilities": { "portMappings": true }, "snat": true },
                { "type": "bandwidth", "capabilities": { "bandwidth": true } },
                {
                    "type": "tuning",
                    "mac": MAC,
                    "sysctl": { "net.ipv4.conf.eth0.arp_filter": "1" },
                    "dataDir": lab.tuning_dir(),
                },
            ]),
        ),
    );
    let ports = r#"portMappings=[{"hostPort":18080,"containerPort":80,"protocol":"tcp"}]"#;
    let bw = r#"bandwidth={"ingressRate":8000000,"ingressBurst":80000,"egressRate":8000000,"egressBurst":80000}"#;
    let result = lab.add(&id, &pod, &["--cap", ports, "--cap", bw]);

    // tern: the veth, the addresses, the reservations.
    assert_eq!(lab.veths().len(), 1);
    assert_eq!(lab.reservations(), ["10.101.0.2", "fd01:101::2"]);
    assert_eq!(pod.addrs("eth0"), ["10.101.0.2/24", "fd01:101::2/64"]);
    // tuning: the MAC (also in the final result) and the sysctl, and its backup file.
    assert_eq!(sandbox_mac(&result), MAC);
    assert!(pod.ok("ip link show eth0").contains(MAC));
    assert_eq!(pod.ok("cat /proc/sys/net/ipv4/conf/eth0/arp_filter").trim(), "1");
    assert_eq!(std::fs::read_dir(lab.tuning_dir()).unwrap().count(), 1, "tuning keeps one backup file");
    // bandwidth: the IFB device, in the result too.
    let ifbs = links_with(&lab, "bwp");
    assert_eq!(ifbs.len(), 1, "{:?}", lab.node.links());
    assert!(result["interfaces"].as_array().unwrap().iter().any(|i| i["name"] == ifbs[0]));
    // portmap: the DNAT to the pod.
    if let Some(rules) = iptables_save(&lab) {
        assert!(rules.contains("--to-destination 10.101.0.2:80"), "{rules}");
        assert!(rules.contains(&format!("id: \\\"{id}\\\"")), "{rules}");
    }
    // The cache holds the final result and the capability args.
    let cached: Value = serde_json::from_slice(&std::fs::read(lab.cache_file(&id)).unwrap()).unwrap();
    assert_eq!(cached["result"]["interfaces"].as_array().unwrap().len(), 4);
    assert_eq!(cached["capabilityArgs"]["portMappings"][0]["hostPort"], 18080);

    // CHECK with the ADD's arguments, except the port mappings: the reference portmap v1.1.1 checks
    // the IPv4 rules in ip6tables too and so fails CHECK whenever there is a mapping (fixed upstream
    // later); without mappings it has nothing to check. tern, bandwidth and tuning check for real.
    lab.cni("check", &["--id", &id, "--cap", "portMappings=[]", "--cap", bw]).ok();

    // `tern cni list` shows the attachment while it exists.
    let list = lab.tern(&["cni", "list", "--cache-dir", &lab.cache_dir().display().to_string()]);
    assert!(list.ok().stdout.contains(&id) && list.stdout.contains("10.101.0.2/24"), "{list}");

    // DEL re-sends the cached args (portmap needs its mappings to find its rules).
    lab.cni("del", &["--id", &id]).ok();
    lab.assert_nothing_left();
    assert_eq!(links_with(&lab, "bwp"), Vec::<String>::new(), "IFB device left");
    assert_eq!(std::fs::read_dir(lab.tuning_dir()).unwrap().count(), 0, "tuning backup left");
    if let Some(rules) = iptables_save(&lab) {
        // The shared CNI-HOSTPORT-* chains stay (the reference portmap never removes them);
        // nothing of this container does.
        assert!(!rules.contains("CNI-DN-") && !rules.contains(&id) && !rules.contains("10.101.0.2"), "{rules}");
    }
    assert!(pod.links() == ["lo"], "{:?}", pod.links());
}

/// nftables tables in the node whose name starts with `tern`, sorted.
fn tern_tables(lab: &Lab) -> Vec<String> {
    let mut v: Vec<String> = nft_tables(&lab.node)
        .into_iter()
        .filter(|t| t.split(' ').nth(1).is_some_and(|n| n.starts_with("tern")))
        .collect();
    v.sort();
    v
}

/// ifb devices in the node.
fn ifbs(lab: &Lab) -> Vec<String> {
    let out = lab.node.ok("ip -o link show type ifb");
    out.lines().filter_map(|l| l.split(": ").nth(1)).map(|n| n.split('@').next().unwrap().to_string()).collect()
}

#[test]
fn reference_bridge_with_tern_ipam_then_tern_chained_plugins() {
    let lab = Lab::new();
    let pods = [Netns::new("rn-pod"), Netns::new("rn-pod")];
    let ids = [unique("ctr"), unique("ctr")];
    let macs = ["c2:00:00:00:01:01", "c2:00:00:00:01:02"];
    lab.write_conf(
        "10-bridge.conflist",
        &lab.conflist(
            "1.0.0",
            json!([
                {
                    "type": "bridge",
                    "bridge": lab.bridge,
                    "isGateway": true,
                    "ipam": {
                        "type": "tern-ipam",
                        "dataDir": lab.ipam_dir(),
                        "ranges": [[{ "subnet": "10.102.0.0/24" }], [{ "subnet": "fd01:102::/64" }]],
                    },
                },
                {
                    "type": "tern-tuning",
                    "capabilities": { "mac": true },
                    "sysctl": { "net.ipv4.conf.IFNAME.arp_filter": "1" },
                    "dataDir": lab.tuning_dir(),
                },
                { "type": "tern-portmap", "capabilities": { "portMappings": true } },
                { "type": "tern-bandwidth", "capabilities": { "bandwidth": true } },
                { "type": "tern-firewall" },
            ]),
        ),
    );
    let bw =
        r#"bandwidth={"ingressRate":100000000,"ingressBurst":1000000,"egressRate":100000000,"egressBurst":1000000}"#;

    let mut addrs = Vec::new();
    for (i, (pod, id)) in pods.iter().zip(&ids).enumerate() {
        let mac = format!("mac=\"{}\"", macs[i]);
        let ports = format!(r#"portMappings=[{{"hostPort":{},"containerPort":80,"protocol":"tcp"}}]"#, 18081 + i);
        let result = lab.add(id, pod, &["--cap", &mac, "--cap", &ports, "--cap", bw]);
        assert_eq!(result["cniVersion"], "1.0.0");
        let a: Vec<String> =
            result["ips"].as_array().unwrap().iter().map(|ip| ip["address"].as_str().unwrap().to_string()).collect();
        assert_eq!(pod.addrs("eth0"), a);
        // tern-tuning: the MAC (in the result too) and the sysctl.
        assert_eq!(sandbox_mac(&result), macs[i]);
        assert!(pod.ok("ip link show eth0").contains(macs[i]));
        assert_eq!(pod.ok("cat /proc/sys/net/ipv4/conf/eth0/arp_filter").trim(), "1");
        addrs.push(a);
    }
    assert_eq!(addrs[0], ["10.102.0.2/24", "fd01:102::2/64"]);
    assert_eq!(addrs[1], ["10.102.0.3/24", "fd01:102::3/64"]);
    assert_eq!(lab.reservations().len(), 4);
    // The reference bridge names its host veths veth*; tern-bandwidth adds an ifb per pod,
    // tern-portmap and tern-firewall their nftables tables.
    assert_eq!(veth_links(&lab.node, "veth").len(), 2);
    assert_eq!(ifbs(&lab).len(), 2, "{:?}", lab.node.links());
    assert_eq!(tern_tables(&lab), ["inet tern_firewall", "inet tern_portmap"], "{:?}", nft_tables(&lab.node));
    assert!(lab.node.ok("nft list table inet tern_portmap").contains("10.102.0.2"));
    // Pods of one network reach each other through the firewall and the shapers.
    assert!(tcp_ok(&pods[0], &pods[1], "10.102.0.3".parse().unwrap(), 7100));
    assert!(tcp_ok(&pods[1], &pods[0], "fd01:102::2".parse().unwrap(), 7101));
    for id in &ids {
        lab.cni("check", &["--id", id]).ok();
    }
    for id in &ids {
        lab.cni("del", &["--id", id]).ok();
    }
    lab.assert_nothing_left();
    assert_eq!(veth_links(&lab.node, ""), Vec::<String>::new());
    assert_eq!(ifbs(&lab), Vec::<String>::new(), "ifb left");
    assert_eq!(tern_tables(&lab), Vec::<String>::new(), "tern nftables tables left");
    assert_eq!(std::fs::read_dir(lab.tuning_dir()).unwrap().count(), 0, "tern-tuning backups left");
}

#[test]
fn cni_versions_picks_the_highest_version_every_plugin_supports() {
    let lab = Lab::new();
    let pod = Netns::new("rn-pod");
    let id = unique("ctr");
    // tern speaks 1.1.0, the reference tuning stops at 1.0.0.
    let mut conf = lab.conflist("0.4.0", json!([lab.tern_plugin(), { "type": "tuning", "mac": MAC }]));
    conf["cniVersions"] = json!(["0.4.0", "1.0.0", "1.1.0"]);
    lab.write_conf("10-versions.conflist", &conf);
    let ns = pod.path().display().to_string();
    let add = lab.cni("add", &["--id", &id, "--netns", &ns]);
    assert_eq!(add.ok().json()["cniVersion"], "1.0.0", "{add}");
    assert!(add.stderr.contains("using version 1.0.0"), "{add}");
    lab.cni("check", &["--id", &id]).ok();
    lab.cni("del", &["--id", &id]).ok();
    lab.assert_nothing_left();

    // Without the reference plugin the list runs at 1.1.0.
    let mut conf = lab.conflist("0.4.0", json!([lab.tern_plugin()]));
    conf["cniVersions"] = json!(["0.4.0", "1.0.0", "1.1.0"]);
    lab.write_conf("10-versions.conflist", &conf);
    assert_eq!(lab.add(&id, &pod, &[])["cniVersion"], "1.1.0");
    lab.cni("del", &["--id", &id]).ok();
    lab.assert_nothing_left();
}
