//! Off-path veth deletion.
//!
//! Unregistering a veth costs the kernel RCU grace periods: 10–20 ms on the
//! machines we measure, most of a DEL. DEL therefore detaches the pair at once
//! (down, renamed to a trash name, so the attachment's names are free for the
//! next ADD immediately) and hands the unregister to a reaper process that
//! outlives the plugin. The runtime gets its answer in about a millisecond;
//! the kernel does the same work as before.
//!
//! If the reaper cannot be started the deletion happens inline. If it dies,
//! the trash link is found by its `tx` prefix and tern alias and removed by
//! the next GC.
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tern_sys::netlink::{LinkInfo, Netlink};
use tern_sys::SysError;

/// Prefix of veths that are detached and being deleted.
pub const TRASH_PREFIX: &str = "tx";
/// The hidden argument that makes `tern` a reaper.
pub const REAP_ARG: &str = "__reap-links";

fn trash_name() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0) as u64;
    let mix = nanos ^ (u64::from(std::process::id()) << 32) ^ u64::from(COUNTER.fetch_add(1, Ordering::Relaxed));
    format!("{TRASH_PREFIX}{:012x}", mix & 0xffff_ffff_ffff)
}

/// Detach the host end `host_link` (and the pod end, when given) and delete
/// the pair in the background. Returns once the names are free.
pub fn detach_and_delete(
    host: &Netlink,
    host_link: &LinkInfo,
    pod: Option<(&Netlink, &LinkInfo)>,
) -> Result<(), SysError> {
    if let Some((pod_nl, pod_link)) = pod {
        // Best effort: if the pod end cannot be renamed it still goes with the pair.
        if pod_nl.set_down(pod_link.index).is_ok() {
            let _ = pod_nl.set_name(pod_link.index, &trash_name());
        }
    }
    let trash = trash_name();
    host.set_down(host_link.index)?;
    host.set_name(host_link.index, &trash)?;
    let spawned = std::env::current_exe().and_then(|exe| {
        let mut cmd = Command::new(exe);
        cmd.arg0("tern")
            .arg(REAP_ARG)
            .arg(&trash)
            .env_remove("CNI_COMMAND")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Its own process group: a runtime that signals the plugin's group
        // does not take the reaper with it.
        cmd.process_group(0);
        cmd.spawn()
    });
    if spawned.is_err() {
        host.delete_link(&trash)?;
    }
    Ok(())
}

/// The reaper's body: delete the named trash links in this netns.
pub fn reap_main(names: &[String]) -> i32 {
    let Ok(nl) = Netlink::new() else { return 1 };
    let mut code = 0;
    for name in names.iter().filter(|n| n.starts_with(TRASH_PREFIX)) {
        if nl.delete_link(name).is_err() {
            code = 1;
        }
    }
    code
}
