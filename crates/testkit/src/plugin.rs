//! Plugin directories and plugin invocation.

use std::path::{Path, PathBuf};

use crate::exec::{code_of, command_in, output, TIMEOUT};
use crate::names::TempDir;
use crate::Netns;

/// Where Debian's containernetworking-plugins live (reference `bridge`,
/// `host-local`, ...).
pub const REFERENCE_CNI_DIR: &str = "/usr/lib/cni";

/// Plugin names the `tern` executable answers to (by argv\[0\]).
const TERN_PLUGINS: &[&str] = &["tern", "tern-ipam"];

/// A private plugin directory: a symlink to the `tern` executable under each
/// plugin name (the executable dispatches on its argv\[0\] file name).
/// `cni_path()` puts it before the reference plugins. Removed on drop.
#[derive(Debug)]
pub struct Plugins {
    pub dir: PathBuf,
    _tmp: TempDir,
}

impl Plugins {
    /// `tern_bin`: in crates/tern integration tests, `env!("CARGO_BIN_EXE_tern")`.
    pub fn new(tern_bin: &Path) -> Plugins {
        Plugins::with_names(tern_bin, TERN_PLUGINS)
    }

    /// Like [`Plugins::new`] with explicit plugin names.
    pub fn with_names(tern_bin: &Path, names: &[&str]) -> Plugins {
        let bin = std::fs::canonicalize(tern_bin).unwrap_or_else(|e| {
            panic!(
                "testkit: tern executable {} not found ({e}); build it first (cargo build -p tern)",
                tern_bin.display()
            )
        });
        let tmp = TempDir::new();
        let dir = tmp.join("bin");
        std::fs::create_dir(&dir).expect("create plugin dir");
        for name in names {
            std::os::unix::fs::symlink(&bin, dir.join(name)).unwrap_or_else(|e| panic!("testkit: symlink {name}: {e}"));
        }
        Plugins { dir, _tmp: tmp }
    }

    /// `CNI_PATH`: this directory, then [`REFERENCE_CNI_DIR`].
    pub fn cni_path(&self) -> String {
        format!("{}:{REFERENCE_CNI_DIR}", self.dir.display())
    }

    /// The executable for `plugin`: ours if we have it, else the reference one.
    pub fn path(&self, plugin: &str) -> PathBuf {
        let ours = self.dir.join(plugin);
        if ours.exists() {
            return ours;
        }
        let reference = Path::new(REFERENCE_CNI_DIR).join(plugin);
        if reference.exists() {
            return reference;
        }
        panic!(
            "testkit: no plugin {plugin:?} in {} or {REFERENCE_CNI_DIR} (make setup installs containernetworking-plugins)",
            self.dir.display()
        )
    }
}

/// What a plugin invocation returned.
#[derive(Debug, Clone)]
pub struct PluginRun {
    /// Exit code (128 + signal if it was killed).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl PluginRun {
    /// stdout parsed as JSON; panics (showing the run) if it isn't.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("testkit: plugin stdout is not JSON ({e}):\n{self}"))
    }

    /// The addresses (without prefix) in a CNI result's `ips`.
    pub fn ips(&self) -> Vec<std::net::IpAddr> {
        let v = self.json();
        let ips = v["ips"].as_array().unwrap_or_else(|| panic!("testkit: result without ips:\n{self}"));
        ips.iter()
            .map(|ip| {
                let a = ip["address"].as_str().unwrap_or_else(|| panic!("testkit: ip without address:\n{self}"));
                a.split('/')
                    .next()
                    .unwrap_or_default()
                    .parse()
                    .unwrap_or_else(|e| panic!("testkit: bad address {a}: {e}"))
            })
            .collect()
    }

    /// Panics (showing exit code, stdout, stderr) unless the exit code is 0.
    pub fn assert_ok(&self) -> &Self {
        if self.code != 0 {
            panic!("testkit: plugin failed:\n{self}");
        }
        self
    }

    /// Panics unless the plugin failed with CNI error `code` on stdout.
    pub fn assert_error(&self, code: u64) -> &Self {
        if self.code == 0 || self.error_code() != Some(code) {
            panic!("testkit: expected CNI error code {code}, got:\n{self}");
        }
        self
    }

    /// The `code` of a CNI error object on stdout, if stdout is one.
    pub fn error_code(&self) -> Option<u64> {
        serde_json::from_str::<serde_json::Value>(&self.stdout).ok()?.get("code")?.as_u64()
    }
}

impl std::fmt::Display for PluginRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

/// Invokes `plugin` (see [`Plugins::path`]) as a runtime would, inside `node`
/// (the plugin process lives in node's netns), with `stdin` as its config.
///
/// The environment is exactly: `PATH` (the usual sbin/bin dirs), `CNI_PATH`
/// (`plugins.cni_path()`), `CNI_COMMAND`, and `CNI_CONTAINERID`, `CNI_NETNS`,
/// `CNI_IFNAME`, `CNI_ARGS` each only when given (`None` / empty string means
/// unset), plus `RUST_BACKTRACE` and `RUST_LOG` when the test has them.
/// Killed after [`TIMEOUT`].
#[allow(clippy::too_many_arguments)]
pub fn exec_plugin(
    node: &Netns,
    plugins: &Plugins,
    plugin: &str,
    command: &str,
    container_id: &str,
    netns: Option<&Path>,
    ifname: &str,
    cni_args: &str,
    stdin: &str,
) -> PluginRun {
    let netns = netns.map(|p| p.to_string_lossy().into_owned());
    let cni_path = plugins.cni_path();
    let mut env: Vec<(&str, &str)> = vec![("CNI_COMMAND", command), ("CNI_PATH", &cni_path)];
    for (k, v) in [
        ("CNI_CONTAINERID", container_id),
        ("CNI_NETNS", netns.as_deref().unwrap_or("")),
        ("CNI_IFNAME", ifname),
        ("CNI_ARGS", cni_args),
    ] {
        if !v.is_empty() {
            env.push((k, v));
        }
    }
    exec_plugin_env(node, plugins, plugin, &env, stdin)
}

/// Lower level [`exec_plugin`]: the `CNI_*` variables are exactly `env` (for
/// tests of missing or malformed variables); `PATH` is added unless given.
pub fn exec_plugin_env(node: &Netns, plugins: &Plugins, plugin: &str, env: &[(&str, &str)], stdin: &str) -> PluginRun {
    let exe = plugins.path(plugin);
    let mut cmd = command_in(node, &exe);
    cmd.env_clear().current_dir("/");
    if !env.iter().any(|(k, _)| *k == "PATH") {
        cmd.env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
    }
    for k in ["RUST_BACKTRACE", "RUST_LOG"] {
        if let Some(v) = std::env::var_os(k) {
            cmd.env(k, v);
        }
    }
    cmd.envs(env.iter().copied());
    let what = format!("plugin {plugin} in netns {}", node.name());
    let out = output(cmd, Some(stdin.as_bytes().to_vec()), TIMEOUT, Some(node), &what);
    PluginRun {
        code: code_of(&out.status),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
