//! A real CNI runtime: Debian's podman 4.3 with its CNI backend (libcni
//! 1.1.2) runs busybox containers on a tern network, and they reach each
//! other; removing them leaves nothing behind.
//!
//! Isolation (podman inside a throwaway node namespace, with private
//! configuration, storage and plugins): see `podman_kit`.

mod podman_kit;

use std::path::Path;
use std::time::Duration;

use podman_kit::{attachment, make_rootfs, Podman};
use serde_json::{json, Value};
use tern_testkit::*;

const V4_SUBNET: &str = "10.79.0.0/24";
const V6_SUBNET: &str = "fd79::/64";
const PORT: &str = "8080";

/// A tern conflist at cniVersion 1.0.0 (what libcni 1.1.2 accepts).
fn conflist(network: &str, bridge: &str, data_dir: &Path) -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": network,
        "plugins": [{
            "type": "tern",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": true,
            "ipam": {
                "type": "tern-ipam",
                "dataDir": data_dir,
                "ranges": [[{"subnet": V4_SUBNET}], [{"subnet": V6_SUBNET}]],
                "routes": [{"dst": "0.0.0.0/0"}],
            },
        }],
    })
    .to_string()
}

/// A shell script that fetches /index.html from `ip` with busybox nc,
/// retrying while the server comes up (at most ~10 s).
fn fetch_script(ip: &str) -> String {
    podman_kit::fetch_script(ip, PORT)
}

fn nft_elements(node: &Netns) -> usize {
    let mut n = 0;
    for t in nft_tables(node) {
        let mut parts = t.split_whitespace();
        let (Some(fam), Some(name)) = (parts.next(), parts.next()) else { continue };
        let out = node.run(&["nft", "-j", "list", "table", fam, name]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        for item in v["nftables"].as_array().into_iter().flatten() {
            if let Some(set) = item.get("set").or_else(|| item.get("map")) {
                n += set["elem"].as_array().map_or(0, Vec::len);
            }
        }
    }
    n
}

#[test]
fn podman_containers_on_a_tern_network_reach_each_other() {
    let node = Netns::new("tpm-node");
    let tmp = TempDir::new();
    let network = unique("tpmnet");
    let bridge = unique_short("tpb");
    let token = unique("tern-podman-token");
    let (plugin_dir, config_dir, data_dir, rootfs) =
        (tmp.join("cni-bin"), tmp.join("net.d"), tmp.join("ipam"), tmp.join("rootfs"));

    // Plugins the way an operator installs them.
    let install =
        node.run(&[env!("CARGO_BIN_EXE_tern"), "install", "--cni-bin-dir", &plugin_dir.display().to_string()]);
    assert!(install.status.success(), "tern install: {}", String::from_utf8_lossy(&install.stderr));
    assert!(plugin_dir.join("tern").is_file() && plugin_dir.join("tern-ipam").exists());

    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join(format!("{network}.conflist")), conflist(&network, &bridge, &data_dir)).unwrap();
    make_rootfs(&rootfs, &token);
    let rootfs_arg = format!("{}:O", rootfs.display());

    let podman = Podman::new(&node, &tmp.join("podman"), &plugin_dir, &config_dir);
    let info = podman.ok(&[
        "info",
        "--format",
        "{{.Host.OCIRuntime.Name}} {{.Host.NetworkBackend}} {{.Store.GraphDriverName}}",
    ]);
    assert_eq!(info.trim(), "runc cni vfs", "podman did not pick up the private configuration");
    let nets = podman.ok(&["network", "ls", "--format", "{{.Name}} {{.Driver}}"]);
    assert!(nets.lines().any(|l| l == format!("{network} tern")), "podman does not list {network}:\n{nets}");

    // Two servers, each serving the token.
    let names = [unique("tpm-a"), unique("tpm-b")];
    let mut atts = Vec::new();
    for name in &names {
        let httpd = ["/bin/httpd", "-f", "-vv", "-p", PORT, "-h", "/www"];
        let mut args = vec!["run", "-d", "--name", name, "--network", &network, "--rootfs", &rootfs_arg];
        args.extend_from_slice(&httpd);
        podman.ok(&args);
        let info = podman.inspect(name);
        podman.remember(&info);
        let att = attachment(&info, &network);
        assert!(att.0.starts_with("10.79.0."), "{name}: no IPv4 address from tern: {att:?}\n{info:#}");
        assert!(att.1.starts_with("fd79::"), "{name}: no IPv6 address from tern: {att:?}");
        assert!(!att.2.is_empty(), "{name}: no MAC: {att:?}");
        atts.push(att);
    }
    assert_ne!(atts[0].0, atts[1].0, "both containers got the same address");
    let mut reserved = reservations(&data_dir, &network);
    reserved.sort();
    let mut want: Vec<String> = atts.iter().flat_map(|a| [a.0.clone(), a.1.clone()]).collect();
    want.sort();
    assert_eq!(reserved, want, "tern-ipam's reservations do not match podman's view");
    assert_eq!(veth_links(&node, "tn").len(), 2, "expected one tern veth per container in the node");
    assert!(node.links().contains(&bridge), "the bridge is not in the node namespace");

    // Each reaches the other over IPv4 and IPv6, and the server sees the
    // client's own address (no NAT inside the network).
    for (from, to, v6) in [(0, 1, false), (1, 0, false), (0, 1, true), (1, 0, true)] {
        let (src, dst) = if v6 { (&atts[from].1, &atts[to].1) } else { (&atts[from].0, &atts[to].0) };
        let out = podman.run(&["exec", &names[from], "/bin/sh", "-c", &fetch_script(dst)]);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(&token),
            "{} could not fetch from {dst} ({}):\n{stdout}\n{}",
            names[from],
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(src.as_str()), "{}: eth0 lacks its address {src}:\n{stdout}", names[from]);
        // httpd -vv logs "[<client>]:<port>: url:/index.html" (IPv4 as
        // ::ffff:a.b.c.d) to its stderr, which `podman logs` replays on
        // stderr; conmon writes the log asynchronously.
        let seen = format!("{src}]:");
        let logged = wait_until(Duration::from_secs(10), || podman.logs(&names[to]).contains(&seen));
        assert!(logged, "{} did not log a request from {src}:\n{}", names[to], podman.logs(&names[to]));
    }

    // A one-shot client (`run --rm`): podman's own DEL path on exit.
    let out = podman.run(&[
        "run",
        "--rm",
        "--network",
        &network,
        "--rootfs",
        &rootfs_arg,
        "/bin/sh",
        "-c",
        &fetch_script(&atts[0].0),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&token),
        "one-shot client failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(Duration::from_secs(10), || reservations(&data_dir, &network).len() == 4),
        "the --rm client's attachment was not released: {:?}",
        reservations(&data_dir, &network)
    );
    assert_eq!(veth_links(&node, "tn").len(), 2, "the --rm client left its veth");

    // Removal: podman DELs each attachment; nothing of them may remain.
    podman.ok(&["rm", "--force", "--time", "0", &names[0], &names[1]]);
    assert_eq!(podman.ok(&["ps", "-a", "-q"]).trim(), "", "containers left");
    assert!(
        wait_until(Duration::from_secs(10), || reservations(&data_dir, &network).is_empty()),
        "reservations left: {:?}",
        reservations(&data_dir, &network)
    );
    assert_eq!(veth_links(&node, "tn"), Vec::<String>::new(), "tern veths left in the node");
    assert_eq!(veth_links(&node, ""), Vec::<String>::new(), "veths left in the node");
    assert_eq!(nft_elements(&node), 0, "nft elements left: {:?}", nft_tables(&node));
    for att in &atts {
        assert!(!Path::new(&att.3).exists(), "podman's netns {} is left", att.3);
    }
    let cache: Vec<String> = std::fs::read_dir("/var/lib/cni/results")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("{network}-")))
        .collect();
    assert_eq!(cache, Vec::<String>::new(), "libcni result cache entries left");
}
