//! A real CNI runtime: Debian's podman 4.3 with its CNI backend (libcni
//! 1.1.2) runs busybox containers on a tern network, and they reach each
//! other; removing them leaves nothing behind.
//!
//! Isolation: podman runs inside a throwaway node namespace, so the bridge,
//! the host veths and the nft tables land there, never in the root
//! namespace. It is started through the test kit (which enters the node's
//! netns and a private mount namespace) and then `nsenter --mount` back into
//! the test's own mount namespace: podman needs the real `/sys/fs/cgroup`
//! (the kit remounts `/sys`) and its netns bind mounts must be visible to
//! every later podman command. Everything else podman keeps is private: its
//! containers.conf, storage.conf (vfs), graphroot/runroot, tmp dir and
//! XDG_RUNTIME_DIR live in a TempDir; the plugins come from
//! `tern install --cni-bin-dir` into that TempDir; the network config dir
//! holds only this test's conflist. Containers run from a busybox-static
//! rootfs (`--rootfs DIR:O`), so no image is pulled.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::{json, Value};
use tern_testkit::*;

const PODMAN_TIMEOUT: Duration = Duration::from_secs(45);
const V4_SUBNET: &str = "10.79.0.0/24";
const V6_SUBNET: &str = "fd79::/64";
const PORT: &str = "8080";

/// podman with private configuration and storage, run inside `node`.
/// Drop removes every container of its private store (`rm -a -f`) and, as
/// a fallback, kills the container and conmon processes it recorded.
struct Podman<'a> {
    node: &'a Netns,
    env: Vec<(String, String)>,
    /// (pid, comm) of container and conmon processes, for the fallback.
    pids: std::sync::Mutex<Vec<(i32, String)>>,
}

impl<'a> Podman<'a> {
    /// Writes containers.conf and storage.conf under `root`.
    fn new(node: &'a Netns, root: &Path, plugin_dir: &Path, config_dir: &Path) -> Podman<'a> {
        for d in ["storage/graph", "storage/run", "tmp", "xdg"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        let containers_conf = format!(
            r#"[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
log_driver = "k8s-file"

[network]
network_backend = "cni"
cni_plugin_dirs = ["{plugins}"]
network_config_dir = "{config}"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "{tmp}"
"#,
            plugins = plugin_dir.display(),
            config = config_dir.display(),
            tmp = root.join("tmp").display(),
        );
        let storage_conf = format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{}\"\nrunroot = \"{}\"\n",
            root.join("storage/graph").display(),
            root.join("storage/run").display()
        );
        std::fs::write(root.join("containers.conf"), containers_conf).unwrap();
        std::fs::write(root.join("storage.conf"), storage_conf).unwrap();
        let env = vec![
            ("PATH".to_string(), "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string()),
            ("CONTAINERS_CONF".to_string(), root.join("containers.conf").display().to_string()),
            ("CONTAINERS_STORAGE_CONF".to_string(), root.join("storage.conf").display().to_string()),
            ("XDG_RUNTIME_DIR".to_string(), root.join("xdg").display().to_string()),
            ("TMPDIR".to_string(), root.join("tmp").display().to_string()),
        ];
        Podman { node, env, pids: Default::default() }
    }

    /// `podman args...` in the node netns and the test's mount namespace.
    fn run(&self, args: &[&str]) -> Output {
        let mnt = format!("--mount=/proc/{}/ns/mnt", std::process::id());
        let envs: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let mut argv: Vec<&str> = vec!["nsenter", &mnt, "--", "env", "-i"];
        argv.extend(envs.iter().map(String::as_str));
        argv.push("podman");
        argv.extend_from_slice(args);
        self.node.run_timeout(&argv, PODMAN_TIMEOUT)
    }

    /// `run`, panicking unless it succeeds; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        if !out.status.success() {
            panic!(
                "`podman {}` failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `podman inspect` of one container, as JSON.
    fn inspect(&self, name: &str) -> Value {
        let v: Value = serde_json::from_str(&self.ok(&["inspect", "--type", "container", name])).expect("inspect JSON");
        v.as_array().and_then(|a| a.first()).cloned().unwrap_or_else(|| panic!("no inspect output for {name}"))
    }

    /// `podman logs`: the container's stdout and stderr.
    fn logs(&self, name: &str) -> String {
        let out = self.run(&["logs", name]);
        assert!(out.status.success(), "podman logs {name}: {}", String::from_utf8_lossy(&out.stderr));
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// Records the container's and its conmon's pid for the drop fallback.
    fn remember(&self, info: &Value) {
        let mut pids = self.pids.lock().unwrap();
        for key in ["Pid", "ConmonPid"] {
            if let Some(pid) = info["State"][key].as_i64().filter(|p| *p > 0) {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                pids.push((pid as i32, comm.trim().to_string()));
            }
        }
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        let out = self.run(&["rm", "--all", "--force", "--time", "0"]);
        if !out.status.success() {
            eprintln!("podman rm --all failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        // Fallback: processes podman started for us that outlived `rm` (conmon
        // exits a moment after its container). Only the recorded pids, and
        // only while they still run the same program.
        let pids = self.pids.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let alive = |(pid, comm): &(i32, String)| {
            let now = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            !comm.is_empty() && now.trim() == comm
        };
        wait_until(Duration::from_secs(10), || !pids.iter().any(alive));
        for p in pids.iter().filter(|p| alive(p)) {
            eprintln!("killing leftover {} (pid {})", p.1, p.0);
            let _ = std::process::Command::new("kill").args(["-9", &p.0.to_string()]).status();
        }
    }
}

/// A busybox-static rootfs: /bin/busybox plus applet links, /www/index.html.
fn make_rootfs(dir: &Path, token: &str) {
    std::fs::create_dir_all(dir.join("bin")).unwrap();
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).expect("busybox-static is installed (/bin/busybox)");
    for applet in ["sh", "nc", "ip", "httpd", "cat", "sleep", "seq", "printf", "echo", "grep"] {
        std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet)).unwrap();
    }
    for d in ["proc", "sys", "dev", "etc", "tmp", "run", "www"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::write(dir.join("www/index.html"), format!("{token}\n")).unwrap();
}

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
    format!(
        "ip -o addr show dev eth0; \
         for i in $(seq 1 50); do \
           printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} {PORT} && exit 0; \
           sleep 0.2; \
         done; exit 1"
    )
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

/// (IPv4, IPv6, MAC, netns path) of a container on `network`.
fn attachment(info: &Value, network: &str) -> (String, String, String, String) {
    let net = &info["NetworkSettings"]["Networks"][network];
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        s(&net["IPAddress"]),
        s(&net["GlobalIPv6Address"]),
        s(&net["MacAddress"]),
        s(&info["NetworkSettings"]["SandboxKey"]),
    )
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
