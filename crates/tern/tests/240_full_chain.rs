//! The full chain: a main plugin (`tern`, or the reference `bridge`)
//! followed by tern-portmap → tern-bandwidth → tern-firewall → tern-tuning,
//! driven the way runtimes drive it: through `tern cni` (a libcni-equivalent
//! runner with its own cache) and through podman 4.3 (libcni 1.1.2). ADD
//! makes every plugin's effect (a host port that answers, the qdiscs and the
//! ifb, the firewall and masquerade elements, the pod's sysctl and MAC, all
//! in the final result), CHECK passes, DEL leaves nothing: no tern or
//! reference host veth, no ifb, no reservation, no tern nftables table, no
//! tuning backup, no cache entry, no podman netns.
//!
//! Privileged: run as root. Each test builds its own node namespace (with a
//! "client" namespace standing for another host) and private conf, cache,
//! IPAM and tuning directories, so the tests run in parallel with the rest.

#[path = "100_runner_kit/mod.rs"]
mod kit;

mod chained;
mod common;
mod podman_kit;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use chained::{connect_client, sa, sysctl_in, table_elements, tcp_must, Client, Elem};
use kit::Lab;
use podman_kit::{attachment, install_plugins, libcni_cache_entries, make_rootfs, run_in_test_mnt, Podman};
use serde_json::{json, Value};
use tern_testkit::*;

/// The host port published in every test, and the port the pod listens on.
const HOST_PORT: u16 = 18090;
const POD_PORT: u16 = 8080;
/// Shaping rates (bits per second) and bursts (bits), different per direction.
const INGRESS_RATE: u64 = 24_000_000;
const EGRESS_RATE: u64 = 16_000_000;
const BURST: u64 = 256 * 1024;
/// The sysctl tern-tuning sets in the pod (IFNAME substituted).
const SYSCTL_KEY: &str = "net.ipv4.conf.IFNAME.arp_filter";
const SYSCTL_PATH: &str = "net/ipv4/conf/eth0/arp_filter";
/// The nftables tables the full `tern` chain makes in the node.
const TERN_TABLES: [&str; 3] = ["inet tern_firewall", "inet tern_masq", "inet tern_portmap"];

fn bandwidth() -> Value {
    json!({ "ingressRate": INGRESS_RATE, "ingressBurst": BURST, "egressRate": EGRESS_RATE, "egressBurst": BURST })
}

/// The four tern chained plugins, in the order of the issue. `bandwidth_caps`:
/// tern-bandwidth takes its rates from the `bandwidth` capability (else they
/// are static keys of its config, as podman 4.3 never sends the capability).
fn chained_plugins(tuning_dir: &Path, bandwidth_caps: bool) -> Vec<Value> {
    let mut bw = json!({ "type": "tern-bandwidth" });
    if bandwidth_caps {
        bw["capabilities"] = json!({ "bandwidth": true });
    } else {
        for (k, v) in bandwidth().as_object().unwrap() {
            bw[k] = v.clone();
        }
    }
    vec![
        json!({ "type": "tern-portmap", "capabilities": { "portMappings": true } }),
        bw,
        json!({ "type": "tern-firewall" }),
        json!({
            "type": "tern-tuning",
            "capabilities": { "mac": true },
            "sysctl": { SYSCTL_KEY: "1" },
            "dataDir": tuning_dir,
        }),
    ]
}

/// Links in `node` whose name starts with one of `prefixes`.
fn links_with(node: &Netns, prefixes: &[&str]) -> Vec<String> {
    node.links().into_iter().filter(|l| prefixes.iter().any(|p| l.starts_with(p))).collect()
}

/// ifb devices in `node`.
fn ifbs(node: &Netns) -> Vec<String> {
    let out = node.ok("ip -o link show type ifb");
    out.lines().filter_map(|l| l.split(": ").nth(1)).map(|n| n.split('@').next().unwrap().to_string()).collect()
}

/// `tc -j qdisc show dev <dev>` in `node`.
fn qdiscs(node: &Netns, dev: &str) -> Vec<Value> {
    let out = node.run(&["tc", "-j", "qdisc", "show", "dev", dev]);
    assert!(out.status.success(), "tc qdisc show dev {dev}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice::<Value>(&out.stdout).expect("tc -j is JSON").as_array().cloned().unwrap_or_default()
}

/// Asserts tern-bandwidth's shaping of one attachment: a tbf at the ingress
/// rate plus an ingress qdisc on the host veth, a tbf at the egress rate on
/// the ifb. The configured rates, not measured ones (220_bandwidth measures).
fn assert_shaped(node: &Netns, host_veth: &str, ifb: &str) {
    let kinds = |dev: &str| {
        let mut k: Vec<String> =
            qdiscs(node, dev).iter().filter_map(|q| q["kind"].as_str()).map(str::to_owned).collect();
        k.sort();
        k
    };
    let tbf_rate = |dev: &str| {
        let q = qdiscs(node, dev).into_iter().find(|q| q["kind"] == "tbf");
        q.unwrap_or_else(|| panic!("no tbf on {dev}: {:?}", qdiscs(node, dev)))["options"]["rate"].as_u64()
    };
    let on_veth = kinds(host_veth);
    assert!(on_veth.contains(&"tbf".into()) && on_veth.contains(&"ingress".into()), "{host_veth}: {on_veth:?}");
    assert_eq!(tbf_rate(host_veth), Some(INGRESS_RATE / 8), "ingress rate on {host_veth}");
    assert!(kinds(ifb).contains(&"tbf".into()), "{ifb}: {:?}", kinds(ifb));
    assert_eq!(tbf_rate(ifb), Some(EGRESS_RATE / 8), "egress rate on {ifb}");
}

/// nftables tables in `node` whose name starts with `tern`, sorted.
fn tern_tables(node: &Netns) -> Vec<String> {
    let mut v: Vec<String> =
        nft_tables(node).into_iter().filter(|t| t.split(' ').nth(1).is_some_and(|n| n.starts_with("tern"))).collect();
    v.sort();
    v
}

/// The elements of `inet <table>` owned by `tag` (empty without the table).
fn owned(node: &Netns, table: &str, tag: &str) -> Vec<Elem> {
    table_elements(node, "inet", table).unwrap_or_default().into_iter().filter(|e| e.comment == tag).collect()
}

/// Files in `dir`, sorted.
fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
    v.sort();
    v
}

/// The `eth0` interface (with a sandbox) of a result.
fn pod_iface(result: &Value) -> &Value {
    result["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .find(|i| i["name"] == "eth0" && i["sandbox"].as_str().is_some_and(|s| !s.is_empty()))
        .unwrap_or_else(|| panic!("no eth0 in {result:#}"))
}

/// Names of the host-side interfaces (no sandbox) of a result.
fn host_ifaces(result: &Value) -> Vec<String> {
    result["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .filter(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
        .filter_map(|i| i["name"].as_str().map(str::to_owned))
        .collect()
}

/// The address part of a result's `ips[]`.
fn result_ips(result: &Value) -> Vec<IpAddr> {
    result["ips"].as_array().expect("ips").iter().map(|ip| common::ip_of(ip["address"].as_str().unwrap())).collect()
}

/// An HTTP/1.0 GET of /index.html to `to` from `ns`, retried until `timeout`:
/// the response, if one came.
fn http_get(ns: &Netns, to: SocketAddr, timeout: Duration) -> Option<String> {
    ns.enter(|| {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect_timeout(&to, Duration::from_secs(1)) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                let mut body = String::new();
                if s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").is_ok()
                    && s.read_to_string(&mut body).is_ok()
                    && body.starts_with("HTTP/1.")
                {
                    return Some(body);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    })
}

/// What a main plugin gives the pod.
struct Main {
    v4: &'static str,
    v6: &'static str,
    /// `tern` (host veths `tn*`, ipMasq) rather than the reference bridge (`veth*`).
    tern: bool,
}

/// Through `tern cni`: ADD of `main` (built for the lab) and the four tern
/// chained plugins with every capability; every plugin's effect; CHECK; DEL;
/// nothing left.
fn full_chain_through_runner(main: impl Fn(&Lab) -> Value, expect: Main) {
    let lab = Lab::new();
    let client = connect_client(&lab.node, 1);
    let pod = Netns::new("fc-pod");
    let id = unique("ctr");
    let tag = format!("{}/{id}/eth0", lab.net);
    let mac = "c2:24:00:00:00:01";
    let mut plugins = vec![main(&lab)];
    plugins.extend(chained_plugins(&lab.tuning_dir(), true));
    lab.write_conf("10-full.conflist", &lab.conflist("1.0.0", Value::Array(plugins)));

    let ports = format!(r#"portMappings=[{{"hostPort":{HOST_PORT},"containerPort":{POD_PORT},"protocol":"tcp"}}]"#);
    let bw = format!("bandwidth={}", bandwidth());
    let mac_cap = format!("mac=\"{mac}\"");
    let result = lab.add(&id, &pod, &["--cap", &ports, "--cap", &bw, "--cap", &mac_cap]);
    assert_eq!(result["cniVersion"], "1.0.0");
    let ips = result_ips(&result);
    assert_eq!(ips, [expect.v4.parse::<IpAddr>().unwrap(), expect.v6.parse().unwrap()], "{result:#}");
    let (ip4, ip6) = (ips[0], ips[1]);

    // The main plugin: one host veth, the pod's addresses, the reservations.
    let veth_prefix = if expect.tern { "tn" } else { "veth" };
    let host_veths = veth_links(&lab.node, veth_prefix);
    assert_eq!(host_veths.len(), 1, "{:?}", lab.node.links());
    assert_eq!(lab.reservations(), [expect.v4, expect.v6]);
    assert_eq!(pod.addrs("eth0").len(), 2, "{:?}", pod.addrs("eth0"));
    assert!(pod.addrs("eth0")[0].starts_with(&format!("{ip4}/")), "{:?}", pod.addrs("eth0"));

    // tern-bandwidth: the ifb (a host interface of the result) and the qdiscs.
    let ifb = ifbs(&lab.node);
    assert_eq!(ifb.len(), 1, "{:?}", lab.node.links());
    assert!(ifb[0].starts_with("tb"), "{ifb:?}");
    assert!(host_ifaces(&result).contains(&ifb[0]), "the ifb is not in the result: {result:#}");
    assert_shaped(&lab.node, &host_veths[0], &ifb[0]);

    // tern-tuning: the sysctl in the pod (not in the node), the MAC of the
    // capability in the pod and in the result, one backup.
    assert_eq!(sysctl_in(&pod, SYSCTL_PATH), "1");
    assert_eq!(sysctl_in(&lab.node, "net/ipv4/conf/all/arp_filter"), "0");
    assert_eq!(pod_iface(&result)["mac"], mac);
    assert!(pod.ok("ip link show eth0").contains(mac), "{}", pod.ok("ip link show eth0"));
    assert_eq!(files_in(&lab.tuning_dir()), [format!("{id}_eth0.json")]);

    // tern-portmap, tern-firewall (and tern's ipMasq): their tables, with
    // elements tagged with this attachment.
    let mut want_tables = TERN_TABLES.to_vec();
    if !expect.tern {
        want_tables.retain(|t| *t != "inet tern_masq");
    }
    assert_eq!(tern_tables(&lab.node), want_tables, "{:?}", nft_tables(&lab.node));
    for t in &want_tables {
        let name = t.split(' ').nth(1).unwrap();
        let all = table_elements(&lab.node, "inet", name);
        assert!(!owned(&lab.node, name, &tag).is_empty(), "no element of {tag} in {t}: {all:?}");
    }

    // The host port answers from the client (another host) on the node's
    // addresses, IPv4 and IPv6, through the firewall and the shapers; the
    // pod sees the client's own address. And from the node itself.
    let c: &Client = &client;
    let seen = tcp_must("client -> node:hostPort (v4)", &c.ns, &pod, sa(ip4, POD_PORT), sa(c.node_ip4, HOST_PORT));
    assert_eq!(seen.peer, c.ip4);
    let seen = tcp_must("client -> node:hostPort (v6)", &c.ns, &pod, sa(ip6, POD_PORT), sa(c.node_ip6, HOST_PORT));
    assert_eq!(seen.peer, c.ip6);
    tcp_must("node -> its own address:hostPort", &lab.node, &pod, sa(ip4, POD_PORT), sa(c.node_ip4, HOST_PORT));
    if expect.tern {
        // ipMasq: the pod reaches the client as the node.
        let seen = tcp_must("pod -> client", &pod, &c.ns, sa(c.ip4, 7000), sa(c.ip4, 7000));
        assert_eq!(seen.peer, c.node_ip4, "ipMasq: the client should see the node's address");
    }

    // The runner cached the final result: the ifb and the tuned MAC are in it.
    let cached: Value = serde_json::from_slice(&std::fs::read(lab.cache_file(&id)).unwrap()).unwrap();
    assert_eq!(cached["result"], result, "the cache holds the printed result");
    assert!(host_ifaces(&cached["result"]).contains(&ifb[0]));
    assert_eq!(pod_iface(&cached["result"])["mac"], mac);
    assert_eq!(cached["capabilityArgs"]["portMappings"][0]["hostPort"], HOST_PORT);
    assert_eq!(cached["capabilityArgs"]["bandwidth"], bandwidth());
    assert_eq!(cached["capabilityArgs"]["mac"], mac);

    // CHECK with the cached arguments, through every plugin: it passes, and
    // it reaches the last one (a changed sysctl fails it, by name).
    lab.cni("check", &["--id", &id]).ok();
    pod.ok(&format!("echo 0 > /proc/sys/{SYSCTL_PATH}"));
    lab.cni("check", &["--id", &id]).fails_with(&["arp_filter"]);
    pod.ok(&format!("echo 1 > /proc/sys/{SYSCTL_PATH}"));
    lab.cni("check", &["--id", &id]).ok();

    // DEL re-sends the cached args; nothing of the attachment is left.
    lab.cni("del", &["--id", &id]).ok();
    assert_nothing_left(&lab, &pod);
    // The host port is the node's own again: a listener of the node gets the client.
    let node_port = sa(c.node_ip4, HOST_PORT);
    tcp_must("client -> node:hostPort after DEL", &c.ns, &lab.node, node_port, node_port);
    if !expect.tern {
        // The reference bridge never removes its bridge.
        assert!(lab.node.links().contains(&lab.bridge), "{:?}", lab.node.links());
    }
    // A second DEL (runtimes retry) finds nothing to do and succeeds.
    lab.cni("del", &["--id", &id]).ok();
    assert_nothing_left(&lab, &pod);
}

fn assert_nothing_left(lab: &Lab, pod: &Netns) {
    lab.assert_nothing_left();
    assert_eq!(links_with(&lab.node, &["tn", "tb", "veth"]), Vec::<String>::new(), "links left");
    assert_eq!(ifbs(&lab.node), Vec::<String>::new(), "ifb left");
    assert_eq!(tern_tables(&lab.node), Vec::<String>::new(), "tern nftables tables left");
    assert_eq!(files_in(&lab.tuning_dir()), Vec::<String>::new(), "tern-tuning backups left");
    assert_eq!(pod.links(), ["lo"], "links left in the pod");
}

#[test]
fn full_chain_through_tern_cni() {
    let main = |lab: &Lab| {
        let mut tern = lab.tern_plugin();
        tern["isDefaultGateway"] = json!(true);
        tern["ipMasq"] = json!(true);
        tern
    };
    full_chain_through_runner(main, Main { v4: "10.101.0.2", v6: "fd01:101::2", tern: true });
}

/// The reference bridge (Debian's containernetworking-plugins 1.1.1) with
/// host-local, then the same four tern plugins. The bridge itself stays after
/// DEL, as it always does.
#[test]
fn full_chain_after_reference_bridge_through_tern_cni() {
    let main = |lab: &Lab| {
        json!({
            "type": "bridge",
            "bridge": lab.bridge,
            "isDefaultGateway": true,
            "ipam": {
                "type": "host-local",
                "dataDir": lab.ipam_dir(),
                "ranges": [[{ "subnet": "10.102.0.0/24" }], [{ "subnet": "fd01:102::/64" }]],
            },
        })
    };
    full_chain_through_runner(main, Main { v4: "10.102.0.2", v6: "fd01:102::2", tern: false });
}

/// The libcni cache entry of `id`/eth0 on `network` (podman's CNI backend).
fn libcni_entry(network: &str, id: &str) -> Value {
    let path = Path::new(podman_kit::LIBCNI_CACHE_DIR).join("results").join(format!("{network}-{id}-eth0"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).expect("libcni cache entry is JSON")
}

/// `tern cni check` of a podman attachment, from libcni's cache, in the
/// node netns and the test's mount namespace (where podman's netns bind mounts
/// are): whether it passed, and its output. libcni 1.1.2 does not cache the
/// netns, so it is given.
fn tern_cni_check(
    node: &Netns,
    conf_dir: &Path,
    plugin_dir: &Path,
    network: &str,
    id: &str,
    netns: &str,
) -> (bool, String) {
    let (conf, plugins) = (conf_dir.display().to_string(), plugin_dir.display().to_string());
    let argv = [
        env!("CARGO_BIN_EXE_tern"),
        "cni",
        "check",
        "--conf-dir",
        &conf,
        "--cache-dir",
        podman_kit::LIBCNI_CACHE_DIR,
        "--cni-path",
        &plugins,
        "--net",
        network,
        "--id",
        id,
        "--netns",
        netns,
    ];
    let env = [("PATH".to_string(), "/usr/sbin:/usr/bin:/sbin:/bin".to_string())];
    let out = run_in_test_mnt(node, &env, &argv, TIMEOUT);
    let text = format!(
        "{}: {}\n--- stdout\n{}\n--- stderr\n{}",
        argv.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Through podman 4.3 (libcni 1.1.2): two busybox httpd containers on a
/// network whose conflist is the full tern chain (tern-bandwidth with static
/// rates: podman sends no `bandwidth` capability; the MAC from
/// `--mac-address`, which podman sends as CNI_ARGS MAC). `-p` reaches
/// tern-portmap as the `portMappings` capability, so the host ports answer,
/// from the node and from a client; the containers reach each other through
/// tern-firewall; `tern cni check` passes on podman's own cache entries;
/// `podman rm -f` leaves nothing.
#[test]
fn full_chain_through_podman() {
    let node = Netns::new("fcp-node");
    let client = connect_client(&node, 1);
    let tmp = TempDir::new();
    let network = unique("fcpnet");
    let bridge = unique_short("fcpbr");
    let (plugin_dir, config_dir, ipam_dir, tuning_dir) =
        (tmp.join("cni-bin"), tmp.join("net.d"), tmp.join("ipam"), tmp.join("tuning"));
    install_plugins(&node, &plugin_dir);
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::create_dir_all(&tuning_dir).unwrap();
    let mut plugins = vec![json!({
        "type": "tern",
        "bridge": bridge,
        "isDefaultGateway": true,
        "ipMasq": true,
        "ipam": {
            "type": "tern-ipam",
            "dataDir": ipam_dir,
            "ranges": [[{ "subnet": "10.124.0.0/24" }], [{ "subnet": "fd24::/64" }]],
        },
    })];
    plugins.extend(chained_plugins(&tuning_dir, false));
    let conflist = json!({ "cniVersion": "1.0.0", "name": network, "plugins": plugins });
    std::fs::write(config_dir.join(format!("{network}.conflist")), conflist.to_string()).unwrap();

    let podman = Podman::new(&node, &tmp.join("podman"), &plugin_dir, &config_dir);
    let info = podman.ok(&["info", "--format", "{{.Host.NetworkBackend}}"]);
    assert_eq!(info.trim(), "cni", "podman did not pick up the private configuration");

    // Two servers, each with its own token, MAC and host port.
    struct Ctr {
        name: String,
        token: String,
        mac: &'static str,
        host_port: u16,
        id: String,
        ip4: String,
        ip6: String,
        sandbox: String,
    }
    let mut ctrs = Vec::new();
    for (i, mac) in ["c2:24:00:00:01:01", "c2:24:00:00:01:02"].into_iter().enumerate() {
        let name = unique("fcp");
        let token = unique("tern-full-chain-token");
        let rootfs = tmp.join(format!("rootfs{i}"));
        make_rootfs(&rootfs, &token);
        let host_port = HOST_PORT + i as u16;
        let publish = format!("{host_port}:{POD_PORT}");
        let rootfs_arg = format!("{}:O", rootfs.display());
        let pod_port = POD_PORT.to_string();
        podman.ok(&[
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            &network,
            "--mac-address",
            mac,
            "-p",
            &publish,
            "--rootfs",
            &rootfs_arg,
            "/bin/httpd",
            "-f",
            "-vv",
            "-p",
            &pod_port,
            "-h",
            "/www",
        ]);
        let info = podman.inspect(&name);
        podman.remember(&info);
        let (ip4, ip6, got_mac, sandbox) = attachment(&info, &network);
        assert!(ip4.starts_with("10.124.0.") && ip6.starts_with("fd24::"), "{name}: {ip4} {ip6}\n{info:#}");
        assert_eq!(got_mac, mac, "{name}: podman's view of the MAC");
        let id = info["Id"].as_str().expect("container Id").to_owned();
        ctrs.push(Ctr { name, token, mac, host_port, id, ip4, ip6, sandbox });
    }
    assert_eq!(reservations(&ipam_dir, &network).len(), 4);
    assert_eq!(veth_links(&node, "tn").len(), 2, "{:?}", node.links());
    assert_eq!(ifbs(&node).len(), 2, "{:?}", node.links());
    assert_eq!(tern_tables(&node), TERN_TABLES, "{:?}", nft_tables(&node));
    let backups = files_in(&tuning_dir);
    let mut want: Vec<String> = ctrs.iter().map(|c| format!("{}_eth0.json", c.id)).collect();
    want.sort();
    assert_eq!(backups, want, "one tern-tuning backup per container");

    let c: &Client = &client;
    for ctr in &ctrs {
        // libcni cached the final result: the ifb, and the MAC tern-tuning set.
        let entry = libcni_entry(&network, &ctr.id);
        let result = &entry["result"];
        assert_eq!(pod_iface(result)["mac"], ctr.mac, "{entry:#}");
        let hosts = host_ifaces(result);
        let veth = hosts.iter().find(|n| n.starts_with("tn")).unwrap_or_else(|| panic!("no tn* in {result:#}"));
        let ifb = hosts.iter().find(|n| n.starts_with("tb")).unwrap_or_else(|| panic!("no ifb in {result:#}"));
        assert_shaped(&node, veth, ifb);
        // podman passed the host port as the portMappings capability.
        let maps = entry["capabilityArgs"]["portMappings"].as_array().cloned().unwrap_or_default();
        assert!(maps.iter().any(|m| m["hostPort"] == ctr.host_port && m["containerPort"] == POD_PORT), "{entry:#}");
        let tag = format!("{network}/{}/eth0", ctr.id);
        for t in TERN_TABLES {
            let name = t.split(' ').nth(1).unwrap();
            assert!(!owned(&node, name, &tag).is_empty(), "no element of {tag} in {t}");
        }

        // The MAC and the sysctl inside the container.
        let link = podman.ok(&["exec", &ctr.name, "ip", "link", "show", "eth0"]);
        assert!(link.contains(ctr.mac), "{}: {link}", ctr.name);
        let sysctl = podman.ok(&["exec", &ctr.name, "cat", &format!("/proc/sys/{SYSCTL_PATH}")]);
        assert_eq!(sysctl.trim(), "1", "{}: {SYSCTL_KEY}", ctr.name);

        // The host port answers, from the node and from a client, IPv4 and IPv6.
        for (from, to) in [
            (&node, sa(c.node_ip4, ctr.host_port)),
            (&c.ns, sa(c.node_ip4, ctr.host_port)),
            (&c.ns, sa(c.node_ip6, ctr.host_port)),
        ] {
            let got = http_get(from, to, Duration::from_secs(10));
            let got = got.unwrap_or_else(|| panic!("{} -> {to}: no answer", from.name()));
            assert!(got.contains(&ctr.token), "{} -> {to} did not reach {}:\n{got}", from.name(), ctr.name);
        }

        // CHECK of podman's attachment, by `tern cni` from libcni's cache
        // (podman has no CHECK of its own); it reaches the last plugin: a
        // sysctl changed behind its back fails it, by name.
        let check = tern_cni_check(&node, &config_dir, &plugin_dir, &network, &ctr.id, &ctr.sandbox);
        assert!(check.0, "tern cni check of {}:\n{}", ctr.name, check.1);
        let set_sysctl = |v: &str| {
            let net = format!("--net={}", ctr.sandbox);
            let script = format!("echo {v} > /proc/sys/{SYSCTL_PATH}");
            let out = run_in_test_mnt(&node, &[], &["/usr/bin/nsenter", &net, "/bin/sh", "-c", &script], TIMEOUT);
            assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
        };
        set_sysctl("0");
        let check = tern_cni_check(&node, &config_dir, &plugin_dir, &network, &ctr.id, &ctr.sandbox);
        assert!(!check.0 && check.1.contains("arp_filter"), "CHECK should fail naming arp_filter:\n{}", check.1);
        set_sysctl("1");
        let check = tern_cni_check(&node, &config_dir, &plugin_dir, &network, &ctr.id, &ctr.sandbox);
        assert!(check.0, "tern cni check of {}:\n{}", ctr.name, check.1);
    }

    // The containers reach each other (same network: tern-firewall lets them).
    for (from, to) in [(0, 1), (1, 0)] {
        for dst in [&ctrs[to].ip4, &ctrs[to].ip6] {
            let script = podman_kit::fetch_script(dst, &POD_PORT.to_string());
            let out = podman.run(&["exec", &ctrs[from].name, "/bin/sh", "-c", &script]);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains(&ctrs[to].token),
                "{} could not fetch from {dst}:\n{stdout}\n{}",
                ctrs[from].name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    // Removal: podman DELs each attachment; nothing of them may remain.
    podman.ok(&["rm", "--force", "--time", "0", &ctrs[0].name, &ctrs[1].name]);
    assert_eq!(podman.ok(&["ps", "-a", "-q"]).trim(), "", "containers left");
    assert!(
        wait_until(Duration::from_secs(10), || reservations(&ipam_dir, &network).is_empty()),
        "reservations left: {:?}",
        reservations(&ipam_dir, &network)
    );
    assert_eq!(links_with(&node, &["tn", "tb", "veth"]), Vec::<String>::new(), "links left");
    assert_eq!(ifbs(&node), Vec::<String>::new(), "ifb left");
    assert_eq!(tern_tables(&node), Vec::<String>::new(), "tern nftables tables left");
    assert_eq!(files_in(&tuning_dir), Vec::<String>::new(), "tern-tuning backups left");
    assert_eq!(libcni_cache_entries(&network), Vec::<String>::new(), "libcni cache entries left");
    for ctr in &ctrs {
        assert!(!Path::new(&ctr.sandbox).exists(), "podman's netns {} is left", ctr.sandbox);
    }
    // The host ports are the node's own again.
    for ctr in &ctrs {
        let port = sa(c.node_ip4, ctr.host_port);
        tcp_must("client -> node:hostPort after rm", &c.ns, &node, port, port);
    }
}
