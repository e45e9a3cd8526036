//! Delegation to an IPAM plugin (SPEC section 4): the delegate gets the same
//! environment with CNI_COMMAND overridden and the complete config on stdin.
//!
//! `tern-ipam` runs in-process: same request, same code, no fork+exec. The
//! observable behaviour (result, errors, on-disk state) is identical to
//! executing the binary; only the cost differs.
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};

use tern_cni::{CniError, CniResult, Code, Command, Version};

use crate::ipam::IpamPlugin;
use crate::skel::{Plugin, Request};

/// The IPAM plugin type named in the config, if IPAM is configured.
pub fn ipam_type(req: &Request) -> Result<Option<String>, CniError> {
    req.conf.ipam_type()
}

pub fn ipam_add(req: &Request) -> Result<Option<CniResult>, CniError> {
    let Some(ty) = ipam_type(req)? else { return Ok(None) };
    if ty == "tern-ipam" {
        return IpamPlugin.add(req).map(Some);
    }
    let out = exec(&ty, Command::Add, req)?;
    let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| {
        CniError::new(Code::DecodingFailure, format!("IPAM plugin {ty:?} returned an unreadable result: {e}"))
    })?;
    CniResult::from_value(&v, req.conf.cni_version).map(Some).map_err(|e| e.context(format!("IPAM plugin {ty:?}")))
}

pub fn ipam_del(req: &Request) -> Result<(), CniError> {
    run_simple(req, Command::Del, |p, r| p.del(r))
}

pub fn ipam_check(req: &Request) -> Result<(), CniError> {
    run_simple(req, Command::Check, |p, r| p.check(r))
}

pub fn ipam_status(req: &Request) -> Result<(), CniError> {
    run_simple(req, Command::Status, |p, r| p.status(r))
}

pub fn ipam_gc(req: &Request) -> Result<(), CniError> {
    run_simple(req, Command::Gc, |p, r| p.gc(r))
}

fn run_simple(
    req: &Request,
    command: Command,
    in_process: impl FnOnce(&IpamPlugin, &Request) -> Result<(), CniError>,
) -> Result<(), CniError> {
    let Some(ty) = ipam_type(req)? else { return Ok(()) };
    if ty == "tern-ipam" {
        // The delegate sees the delegating command (CHECK of the main plugin
        // is a CHECK of IPAM), so the request is reused as is.
        return in_process(&IpamPlugin, req);
    }
    // Reference IPAM plugins predate STATUS and GC and answer them with
    // "missing containerID"; only delegate what the config's version allows
    // and the delegate can be expected to know.
    if matches!(command, Command::Status | Command::Gc) && req.conf.cni_version < Version::V1_1_0 {
        return Ok(());
    }
    exec(&ty, command, req).map(|_| ())
}

/// Find `plugin` on CNI_PATH, naming the directories searched when it is not there.
pub fn find_in_path(plugin: &str, path: &[String]) -> Result<PathBuf, CniError> {
    if path.is_empty() {
        return Err(CniError::new(Code::InvalidEnv, format!("cannot find plugin {plugin:?}: CNI_PATH is empty")));
    }
    for dir in path {
        let candidate = PathBuf::from(dir).join(plugin);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(CniError::internal(format!("failed to find plugin {plugin:?} in path {path:?}")))
}

/// Execute a delegate and return its stdout on success.
fn exec(plugin: &str, command: Command, req: &Request) -> Result<Vec<u8>, CniError> {
    let bin = find_in_path(plugin, &req.env.path)?;
    let mut child = Process::new(&bin)
        .env("CNI_COMMAND", command.as_str())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| CniError::internal(format!("failed to run IPAM plugin {}: {e}", bin.display())))?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let write = stdin.write_all(&req.stdin);
    drop(stdin);
    let output = child
        .wait_with_output()
        .map_err(|e| CniError::internal(format!("failed to wait for IPAM plugin {}: {e}", bin.display())))?;
    write.map_err(|e| CniError::new(Code::Io, format!("failed to write config to IPAM plugin {plugin:?}: {e}")))?;
    if output.status.success() {
        return Ok(output.stdout);
    }
    // The delegate's own error result is passed up with its code.
    match serde_json::from_slice::<CniError>(&output.stdout) {
        Ok(e) => Err(e.context(format!("IPAM plugin {plugin:?}"))),
        Err(_) => Err(CniError::internal(format!(
            "IPAM plugin {plugin:?} failed ({}) without an error result: {}",
            output.status,
            String::from_utf8_lossy(&output.stdout).trim()
        ))),
    }
}
