//! Shared helpers for the tests that drive a real CNI runtime: Debian's
//! podman 4.3 with its CNI backend (libcni 1.1.2) running busybox containers
//! inside a throwaway node namespace.
//!
//! Isolation: podman runs inside the test's node namespace, so the bridge,
//! the host veths, the ifbs and the nft tables land there, never in the root
//! namespace. It is started through the test kit (which enters the node's
//! netns and a private mount namespace) and then `nsenter --mount` back into
//! the test's own mount namespace: podman needs the real `/sys/fs/cgroup`
//! (the kit remounts `/sys`) and its netns bind mounts must be visible to
//! every later podman command. Everything else podman keeps is private: its
//! containers.conf, storage.conf (vfs), graphroot/runroot, tmp dir and
//! XDG_RUNTIME_DIR live in a TempDir; the plugins come from
//! `tern install --cni-bin-dir`; the network config dir holds only the
//! test's conflist. Containers run from a busybox-static rootfs
//! (`--rootfs DIR:O`), so no image is pulled. Only libcni's result cache is
//! shared (`/var/lib/cni/results`, keyed by the test's unique network name).
#![allow(dead_code)]

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use serde_json::Value;
use tern_testkit::*;

pub const PODMAN_TIMEOUT: Duration = Duration::from_secs(45);

/// libcni's result cache, which podman's CNI backend always uses.
pub const LIBCNI_CACHE_DIR: &str = "/var/lib/cni";

/// The usual sbin/bin dirs, for commands run with an empty environment.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `argv` in `node`'s netns but the test's own mount namespace, with exactly
/// the environment `env`.
pub fn run_in_test_mnt(node: &Netns, env: &[(String, String)], argv: &[&str], timeout: Duration) -> Output {
    let mnt = format!("--mount=/proc/{}/ns/mnt", std::process::id());
    let envs: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut full: Vec<&str> = vec!["nsenter", &mnt, "--", "env", "-i"];
    full.extend(envs.iter().map(String::as_str));
    full.extend_from_slice(argv);
    node.run_timeout(&full, timeout)
}

/// `tern install --cni-bin-dir <dir>` in `node`: the plugins the way an operator installs them.
pub fn install_plugins(node: &Netns, dir: &Path) {
    let install = node.run(&[env!("CARGO_BIN_EXE_tern"), "install", "--cni-bin-dir", &dir.display().to_string()]);
    assert!(install.status.success(), "tern install: {}", String::from_utf8_lossy(&install.stderr));
    assert!(dir.join("tern").is_file() && dir.join("tern-ipam").exists());
}

/// podman with private configuration and storage, run inside `node`.
/// Drop removes every container of its private store (`rm -a -f`) and, as
/// a fallback, kills the container and conmon processes it recorded.
pub struct Podman<'a> {
    node: &'a Netns,
    env: Vec<(String, String)>,
    /// (pid, comm) of container and conmon processes, for the fallback.
    pids: std::sync::Mutex<Vec<(i32, String)>>,
}

impl<'a> Podman<'a> {
    /// Writes containers.conf and storage.conf under `root`.
    pub fn new(node: &'a Netns, root: &Path, plugin_dir: &Path, config_dir: &Path) -> Podman<'a> {
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
            ("PATH".to_string(), PATH.to_string()),
            ("CONTAINERS_CONF".to_string(), root.join("containers.conf").display().to_string()),
            ("CONTAINERS_STORAGE_CONF".to_string(), root.join("storage.conf").display().to_string()),
            ("XDG_RUNTIME_DIR".to_string(), root.join("xdg").display().to_string()),
            ("TMPDIR".to_string(), root.join("tmp").display().to_string()),
        ];
        Podman { node, env, pids: Default::default() }
    }

    /// `podman args...` in the node netns and the test's mount namespace.
    pub fn run(&self, args: &[&str]) -> Output {
        let mut argv = vec!["podman"];
        argv.extend_from_slice(args);
        run_in_test_mnt(self.node, &self.env, &argv, PODMAN_TIMEOUT)
    }

    /// `run`, panicking unless it succeeds; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
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
    pub fn inspect(&self, name: &str) -> Value {
        let v: Value = serde_json::from_str(&self.ok(&["inspect", "--type", "container", name])).expect("inspect JSON");
        v.as_array().and_then(|a| a.first()).cloned().unwrap_or_else(|| panic!("no inspect output for {name}"))
    }

    /// `podman logs`: the container's stdout and stderr.
    pub fn logs(&self, name: &str) -> String {
        let out = self.run(&["logs", name]);
        assert!(out.status.success(), "podman logs {name}: {}", String::from_utf8_lossy(&out.stderr));
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// Records the container's and its conmon's pid for the drop fallback.
    pub fn remember(&self, info: &Value) {
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

/// A busybox-static rootfs: /bin/busybox plus applet links, /www/index.html
/// holding `token`.
pub fn make_rootfs(dir: &Path, token: &str) {
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

/// A shell script that fetches /index.html from `ip`:`port` with busybox nc,
/// retrying while the server comes up (at most ~10 s).
pub fn fetch_script(ip: &str, port: &str) -> String {
    format!(
        "ip -o addr show dev eth0; \
         for i in $(seq 1 50); do \
           printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {ip} {port} && exit 0; \
           sleep 0.2; \
         done; exit 1"
    )
}

/// (IPv4, IPv6, MAC, netns path) of a container on `network`.
pub fn attachment(info: &Value, network: &str) -> (String, String, String, String) {
    let net = &info["NetworkSettings"]["Networks"][network];
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (
        s(&net["IPAddress"]),
        s(&net["GlobalIPv6Address"]),
        s(&net["MacAddress"]),
        s(&info["NetworkSettings"]["SandboxKey"]),
    )
}

/// File names of libcni's cache entries for `network`.
pub fn libcni_cache_entries(network: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(Path::new(LIBCNI_CACHE_DIR).join("results"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("{network}-")))
        .collect();
    v.sort();
    v
}
