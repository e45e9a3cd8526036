//! Finding and executing plugins (libcni `pkg/invoke`, checklist 2.2).
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;
use tern_cni::{CniError, Code, Command};

use crate::RuntimeConf;

/// `<dir>/<plugin>` for the first directory of `dirs` that has it as a
/// regular file (symlinks followed). The error names the binary and every
/// directory searched.
pub fn find_plugin(plugin: &str, dirs: &[PathBuf]) -> Result<PathBuf, CniError> {
    tern_cni::validate::plugin_type(plugin, "type")?;
    for dir in dirs {
        let candidate = dir.join(plugin);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let searched: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(CniError::internal(format!(
        "failed to find plugin {plugin:?} in CNI path [{}]",
        if searched.is_empty() { "(empty)".to_string() } else { searched.join(", ") }
    )))
}

/// `CNI_PATH`: the directories joined with `:`.
pub fn cni_path_env(dirs: &[PathBuf]) -> String {
    dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(":")
}

/// `CNI_ARGS`: `K=V` pairs joined with `;`.
pub fn cni_args_env(args: &[(String, String)]) -> String {
    args.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";")
}

/// The CNI variables for one invocation, as libcni sets them: all six on
/// every call, empty when unused (`rt` is `None` for STATUS and GC). VERSION
/// gets libcni's `dummy` netns and ifname, for plugins that require them.
pub fn plugin_env(command: Command, rt: Option<&RuntimeConf>, cni_path: &str) -> Vec<(&'static str, String)> {
    let (id, netns, ifname, args) = match (command, rt) {
        (Command::Version, _) => (String::new(), "dummy".to_string(), "dummy".to_string(), String::new()),
        (_, Some(rt)) => (rt.container_id.clone(), rt.netns.clone(), rt.ifname.clone(), cni_args_env(&rt.cni_args)),
        (_, None) => Default::default(),
    };
    vec![
        ("CNI_COMMAND", command.as_str().to_string()),
        ("CNI_CONTAINERID", id),
        ("CNI_NETNS", netns),
        ("CNI_ARGS", args),
        ("CNI_IFNAME", ifname),
        ("CNI_PATH", cni_path.to_string()),
    ]
}

/// The error a failed plugin run stands for, as libcni reads it: the error
/// object on stdout; without one, the plugin's stderr. Pure.
pub fn failure(status: &str, stdout: &[u8], stderr: &[u8]) -> CniError {
    let out = String::from_utf8_lossy(stdout);
    if out.trim().is_empty() {
        let err = String::from_utf8_lossy(stderr);
        let err = err.trim();
        return CniError::internal(if err.is_empty() {
            format!("plugin failed ({status}) without an error result")
        } else {
            format!("plugin failed ({status}): {err:?}")
        });
    }
    match serde_json::from_str::<Value>(&out) {
        Ok(Value::Object(o)) => {
            let code = o.get("code").and_then(Value::as_u64).unwrap_or(0) as u32;
            let msg = o.get("msg").and_then(Value::as_str).unwrap_or_default();
            let details = o.get("details").and_then(Value::as_str).unwrap_or_default();
            let msg = if msg.is_empty() {
                format!("plugin failed ({status}) with an empty error message")
            } else {
                msg.into()
            };
            CniError::with_code(code, msg).with_details(details)
        }
        _ => CniError::internal(format!(
            "plugin failed ({status}) and its error result is not JSON: {:?}",
            out.chars().take(200).collect::<String>()
        )),
    }
}

fn describe(status: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// Execute `bin` with `env` (added to this process's environment) and
/// `stdin`; its stdout on success. Its stderr is passed through to ours.
pub fn invoke(bin: &Path, env: &[(&str, String)], stdin: &[u8]) -> Result<Vec<u8>, CniError> {
    let mut attempt = 0;
    let mut child = loop {
        let spawned = Process::new(bin)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn();
        match spawned {
            Ok(c) => break c,
            // ETXTBSY: the binary is being written (an install in progress); libcni retries too.
            Err(e) if e.raw_os_error() == Some(26) && attempt < 5 => {
                attempt += 1;
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(CniError::internal(format!("failed to execute {}: {e}", bin.display()))),
        }
    };
    let mut pipe = child.stdin.take().expect("stdin is piped");
    let data = stdin.to_vec();
    // Written from a thread: a plugin may print before it has read all of stdin.
    let writer = std::thread::spawn(move || {
        let _ = pipe.write_all(&data);
    });
    let output = child
        .wait_with_output()
        .map_err(|e| CniError::internal(format!("failed to wait for {}: {e}", bin.display())))?;
    let _ = writer.join();
    if !output.stderr.is_empty() {
        let _ = std::io::stderr().write_all(&output.stderr);
    }
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(failure(&describe(&output.status), &output.stdout, &output.stderr))
    }
}

/// The code for a plugin whose stdout on success is unusable.
pub fn bad_output(what: impl std::fmt::Display) -> CniError {
    CniError::new(Code::DecodingFailure, format!("plugin returned an unreadable result: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_like_libcni() {
        let rt = RuntimeConf {
            container_id: "c1".into(),
            netns: "/run/netns/p".into(),
            ifname: "eth0".into(),
            cni_args: vec![("IgnoreUnknown".into(), "1".into()), ("K".into(), "v".into())],
            capability_args: Default::default(),
        };
        let env = plugin_env(Command::Add, Some(&rt), "/a:/b");
        assert_eq!(
            env,
            vec![
                ("CNI_COMMAND", "ADD".to_string()),
                ("CNI_CONTAINERID", "c1".into()),
                ("CNI_NETNS", "/run/netns/p".into()),
                ("CNI_ARGS", "IgnoreUnknown=1;K=v".into()),
                ("CNI_IFNAME", "eth0".into()),
                ("CNI_PATH", "/a:/b".into()),
            ]
        );
        let gc = plugin_env(Command::Gc, None, "/a");
        assert!(gc.iter().filter(|(k, _)| *k != "CNI_COMMAND" && *k != "CNI_PATH").all(|(_, v)| v.is_empty()));
    }

    #[test]
    fn reads_errors_like_libcni() {
        let e = failure("exit code 1", br#"{"code":50,"msg":"not ready","details":"d"}"#, b"");
        assert_eq!((e.code, e.msg.as_str(), e.details.as_str()), (50, "not ready", "d"));
        let e = failure("exit code 2", b"", b"panic: boom\n");
        assert!(e.msg.contains("panic: boom") && e.msg.contains("exit code 2"), "{e}");
        let e = failure("exit code 1", b"garbage", b"");
        assert!(e.msg.contains("not JSON"), "{e}");
    }

    #[test]
    fn missing_plugin_names_binary_and_dirs() {
        let e = find_plugin("nope-plugin", &[PathBuf::from("/nonexistent/a"), PathBuf::from("/nonexistent/b")])
            .unwrap_err();
        assert!(e.msg.contains("\"nope-plugin\"") && e.msg.contains("/nonexistent/a, /nonexistent/b"), "{e}");
        assert!(find_plugin("../x", &[PathBuf::from("/tmp")]).is_err());
    }
}
