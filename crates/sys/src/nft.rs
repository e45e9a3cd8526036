//! nftables, through the `nft` binary.
//!
//! `nft` runs in the network namespace of the **thread** that spawns it: a
//! child process inherits the namespaces of the thread that forked it, not of
//! the process' main thread. To act on another namespace call these
//! functions inside [`crate::netns::NetNs::enter`].
//!
//! The binary is looked up once: `$PATH` first, then `/usr/sbin`, `/sbin`,
//! `/usr/bin`, `/usr/local/sbin` (CNI plugins are often run with a minimal
//! `PATH`).

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use nix::sys::memfd::{memfd_create, MFdFlags};

use crate::error::{Result, SysError};

const FALLBACK_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/usr/local/sbin", "/bin"];

/// The `nft` binary that will be run.
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let from_path =
            std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default();
        from_path
            .into_iter()
            .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
            .map(|d| d.join("nft"))
            .find(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("nft"))
    })
}

/// Run an nft script (`nft -f -`) in the calling thread's network namespace.
/// The script is passed through a memfd, so it may be of any size. Errors
/// carry nft's stderr.
pub fn run(script: &str) -> Result<()> {
    let fd = memfd_create("tern-nft-script", MFdFlags::MFD_CLOEXEC)
        .map_err(|e| SysError::nix("create memfd for", "nft script", e))?;
    let mut file = std::fs::File::from(fd);
    file.write_all(script.as_bytes())
        .and_then(|_| file.seek(SeekFrom::Start(0)).map(drop))
        .map_err(|e| SysError::io("write", "nft script memfd", e))?;
    let out = spawn(&["-f", "-"], Stdio::from(file))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(command_error(&["-f", "-"], &out))
    }
}

/// Run `nft -j <args>` and parse its output as JSON, e.g.
/// `list_json(&["list", "table", "inet", "tern"])`.
///
/// Returns `Ok(None)` when nft reports that the table / chain / set does not
/// exist (`No such file or directory`).
pub fn list_json(args: &[&str]) -> Result<Option<serde_json::Value>> {
    let mut full = Vec::with_capacity(args.len() + 1);
    full.push("-j");
    full.extend_from_slice(args);
    let out = spawn(&full, Stdio::null())?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(command_error(&full, &out));
    }
    let v = serde_json::from_slice(&out.stdout).map_err(|e| SysError::Command {
        cmd: cmdline(&full),
        status: "exit status 0".into(),
        stderr: format!("cannot parse json output: {e}"),
    })?;
    Ok(Some(v))
}

fn spawn(args: &[&str], stdin: Stdio) -> Result<Output> {
    Command::new(binary())
        .args(args)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| SysError::io("spawn", binary().display().to_string(), e))
}

fn cmdline(args: &[&str]) -> String {
    let mut s = String::from("nft");
    for a in args {
        s.push(' ');
        s.push_str(a);
    }
    s
}

fn command_error(args: &[&str], out: &Output) -> SysError {
    SysError::Command {
        cmd: cmdline(args),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    }
}
