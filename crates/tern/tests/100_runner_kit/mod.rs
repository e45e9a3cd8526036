//! Shared helpers for the `tern cni` (runner) tests: a throwaway node with
//! private config, cache, IPAM and plugin directories, `tern cni` run inside
//! it, and recording plugins.
#![allow(dead_code)]

use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tern_testkit::*;

/// The `tern` executable under test.
pub fn tern_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_tern"))
}

/// Every plugin name the tern executable answers to.
pub const TERN_PLUGINS: &[&str] =
    &["tern", "tern-ipam", "tern-portmap", "tern-bandwidth", "tern-firewall", "tern-tuning"];

/// What a `tern cni` run returned.
pub struct Run {
    pub argv: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}`: exit code {}\n--- stdout\n{}\n--- stderr\n{}",
            self.argv,
            self.code,
            self.stdout.trim_end(),
            self.stderr.trim_end()
        )
    }
}

impl Run {
    pub fn ok(&self) -> &Run {
        assert_eq!(self.code, 0, "expected success:\n{self}");
        self
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }

    /// Panics unless the run failed and stderr mentions every needle.
    pub fn fails_with(&self, needles: &[&str]) -> &Run {
        assert_ne!(self.code, 0, "expected a failure:\n{self}");
        for n in needles {
            assert!(self.stderr.contains(n), "stderr does not mention {n:?}:\n{self}");
        }
        self
    }
}

/// One test's node: its own netns (where `tern cni` and so the plugins
/// run), a plugin dir with every tern plugin name, and private config,
/// cache, IPAM, tuning and recorder directories. All removed on drop.
pub struct Lab {
    pub node: Netns,
    pub plugins: Plugins,
    pub dir: TempDir,
    /// A unique network name.
    pub net: String,
    /// A unique bridge name.
    pub bridge: String,
}

impl Lab {
    pub fn new() -> Lab {
        let dir = TempDir::new();
        for d in ["conf", "cache", "ipam", "rec", "tuning"] {
            std::fs::create_dir(dir.join(d)).expect("create lab dir");
        }
        Lab {
            node: Netns::new("rn-node"),
            plugins: Plugins::with_names(tern_bin(), TERN_PLUGINS),
            dir,
            net: unique("rnet"),
            bridge: unique_short("rbr"),
        }
    }

    pub fn conf_dir(&self) -> PathBuf {
        self.dir.join("conf")
    }
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.join("cache")
    }
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.join("ipam")
    }
    pub fn rec_dir(&self) -> PathBuf {
        self.dir.join("rec")
    }
    pub fn tuning_dir(&self) -> PathBuf {
        self.dir.join("tuning")
    }

    /// Recording plugins first, then the tern plugins, then the reference ones.
    pub fn cni_path(&self) -> String {
        format!("{}:{}", self.rec_dir().display(), self.plugins.cni_path())
    }

    /// Writes `conf/<file>` and returns the exact bytes written.
    pub fn write_conf(&self, file: &str, conf: &Value) -> Vec<u8> {
        let bytes = serde_json::to_vec_pretty(conf).expect("conf serialises");
        std::fs::write(self.conf_dir().join(file), &bytes).expect("write conf");
        bytes
    }

    /// A conflist of this lab's network with `plugins`.
    pub fn conflist(&self, version: &str, plugins: Value) -> Value {
        json!({ "cniVersion": version, "name": self.net, "plugins": plugins })
    }

    /// The `tern` plugin object (bridge mode, this lab's bridge and dataDir), dual-stack.
    pub fn tern_plugin(&self) -> Value {
        json!({
            "type": "tern",
            "bridge": self.bridge,
            "isGateway": true,
            "ipam": {
                "type": "tern-ipam",
                "dataDir": self.ipam_dir(),
                "ranges": [[{ "subnet": "10.101.0.0/24" }], [{ "subnet": "fd01:101::/64" }]],
            },
        })
    }

    /// `tern cni <sub> <args>` with this lab's --conf-dir, --cache-dir and --cni-path, inside the node.
    pub fn cni(&self, sub: &str, args: &[&str]) -> Run {
        let conf = self.conf_dir().display().to_string();
        let cache = self.cache_dir().display().to_string();
        let path = self.cni_path();
        let mut argv = vec!["cni", sub, "--conf-dir", &conf, "--cache-dir", &cache, "--cni-path", &path];
        argv.extend_from_slice(args);
        self.tern(&argv)
    }

    /// `tern <argv>` inside the node.
    pub fn tern(&self, argv: &[&str]) -> Run {
        let bin = tern_bin().display().to_string();
        let mut full = vec![bin.as_str()];
        full.extend_from_slice(argv);
        let out = self.node.run(&full);
        Run {
            argv: format!("tern {}", argv.join(" ")),
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `tern cni add` of `id` into `pod` (eth0) with extra args; the result JSON.
    pub fn add(&self, id: &str, pod: &Netns, extra: &[&str]) -> Value {
        let ns = pod.path().display().to_string();
        let mut args = vec!["--id", id, "--netns", &ns];
        args.extend_from_slice(extra);
        self.cni("add", &args).ok().json()
    }

    /// The cache file of `id`/eth0 on this lab's network.
    pub fn cache_file(&self, id: &str) -> PathBuf {
        self.cache_dir().join("results").join(format!("{}-{id}-eth0", self.net))
    }

    /// Files in the cache's results dir.
    pub fn cache_entries(&self) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(self.cache_dir().join("results")) else { return Vec::new() };
        let mut v: Vec<String> = rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
        v.sort();
        v
    }

    pub fn reservations(&self) -> Vec<String> {
        reservations(&self.ipam_dir(), &self.net)
    }

    /// tern's host veths (`tn*`).
    pub fn veths(&self) -> Vec<String> {
        veth_links(&self.node, "tn")
    }

    /// No tern veth, no reservation, no cache entry.
    pub fn assert_nothing_left(&self) {
        assert_eq!(self.veths(), Vec::<String>::new(), "tern veths left in the node");
        assert_eq!(self.reservations(), Vec::<String>::new(), "reservations left");
        assert_eq!(self.cache_entries(), Vec::<String>::new(), "cache entries left");
    }

    /// A recording plugin named `name` in the recorder dir.
    pub fn recorder(&self, name: &str) -> Recorder {
        Recorder::create(&self.rec_dir(), name)
    }
}

impl Default for Lab {
    fn default() -> Self {
        Lab::new()
    }
}

/// A plugin that records every call and answers simply:
/// - stdin goes to `<name>.stdin` (one line per call), the CNI variables to
///   `<name>.env` (`COMMAND|CONTAINERID|NETNS|IFNAME|ARGS|PATH` per call);
/// - if `<name>.fail-<COMMAND>` exists, its content is printed and it exits 1;
/// - ADD prints `prevResult` when there is one (the runner puts it last in
///   the request), else `<name>.result` if present, else a minimal result;
/// - VERSION prints `<name>.versions` if present, else versions up to 1.1.0.
pub struct Recorder {
    pub path: PathBuf,
}

const RECORDER: &str = r#"#!/bin/sh
me="$0"
input=$(cat)
printf '%s\n' "$input" >>"$me.stdin"
printf '%s|%s|%s|%s|%s|%s\n' "$CNI_COMMAND" "$CNI_CONTAINERID" "$CNI_NETNS" "$CNI_IFNAME" "$CNI_ARGS" "$CNI_PATH" >>"$me.env"
if [ -f "$me.fail-$CNI_COMMAND" ]; then
  cat "$me.fail-$CNI_COMMAND"
  exit 1
fi
case "$CNI_COMMAND" in
ADD)
  case "$input" in
  *'"prevResult":'*) printf '%s' "$input" | sed 's/.*,"prevResult":\(.*\)}$/\1/' ;;
  *) if [ -f "$me.result" ]; then cat "$me.result"; else printf '{"cniVersion":"1.0.0","dns":{}}'; fi ;;
  esac
  ;;
VERSION)
  if [ -f "$me.versions" ]; then cat "$me.versions"; else
    printf '{"cniVersion":"1.0.0","supportedVersions":["0.3.1","0.4.0","1.0.0","1.1.0"]}'
  fi
  ;;
esac
exit 0
"#;

/// One recorded call.
#[derive(Debug, Clone)]
pub struct Call {
    pub command: String,
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    pub path: String,
    pub stdin: Value,
}

impl Recorder {
    fn create(dir: &Path, name: &str) -> Recorder {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, RECORDER).expect("write recorder");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod recorder");
        Recorder { path }
    }

    fn side(&self, suffix: &str) -> PathBuf {
        PathBuf::from(format!("{}.{suffix}", self.path.display()))
    }

    /// Make `command` fail with this error object.
    pub fn fail(&self, command: &str, error: &Value) {
        std::fs::write(self.side(&format!("fail-{command}")), error.to_string()).expect("write fail file");
    }

    pub fn heal(&self, command: &str) {
        let _ = std::fs::remove_file(self.side(&format!("fail-{command}")));
    }

    /// The ADD result printed when there is no prevResult.
    pub fn set_result(&self, result: &Value) {
        std::fs::write(self.side("result"), result.to_string()).expect("write result file");
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<Call> {
        let env = std::fs::read_to_string(self.side("env")).unwrap_or_default();
        let stdin = std::fs::read_to_string(self.side("stdin")).unwrap_or_default();
        let envs: Vec<&str> = env.lines().collect();
        let ins: Vec<&str> = stdin.lines().collect();
        assert_eq!(envs.len(), ins.len(), "recorder logs out of step: {envs:?} / {ins:?}");
        envs.iter()
            .zip(ins)
            .map(|(e, i)| {
                let f: Vec<&str> = e.splitn(6, '|').collect();
                Call {
                    command: f[0].into(),
                    container_id: f[1].into(),
                    netns: f[2].into(),
                    ifname: f[3].into(),
                    args: f[4].into(),
                    path: f[5].into(),
                    stdin: serde_json::from_str(i).unwrap_or_else(|e| panic!("recorded stdin is not JSON ({e}): {i}")),
                }
            })
            .collect()
    }

    /// The commands called so far.
    pub fn commands(&self) -> Vec<String> {
        self.calls().into_iter().map(|c| c.command).collect()
    }

    /// The last call of `command`.
    pub fn last(&self, command: &str) -> Call {
        self.calls()
            .into_iter()
            .rev()
            .find(|c| c.command == command)
            .unwrap_or_else(|| panic!("{} was never called with {command}", self.path.display()))
    }
}
