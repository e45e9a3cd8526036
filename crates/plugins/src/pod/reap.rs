//! Off-path veth deletion.
//!
//! Unregistering a veth costs the kernel RCU grace periods: 10–20 ms on the
//! machines we measure, most of a DEL. DEL therefore detaches the pair at once
//! (down, renamed to a trash name, so the attachment's names are free for the
//! next ADD immediately) and hands the unregister to a forked child that
//! outlives the plugin ([`tern_sys::netlink::delete_link_detached`]). The
//! runtime gets its answer in about two milliseconds; the kernel does the
//! same work as before.
//!
//! If the child cannot be started the deletion happens inline. If it dies,
//! the trash link is found by its `tx` prefix and tern alias and removed by
//! the next GC.
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tern_sys::netlink::{self, LinkInfo, Netlink};
use tern_sys::SysError;

/// Prefix of veths that are detached and being deleted.
pub const TRASH_PREFIX: &str = "tx";

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
    // By the trash name, unique to this DEL: whatever happens meanwhile, the
    // child cannot delete another link. `host` is a socket of the calling
    // thread's netns, where the child's socket is opened too.
    if netlink::delete_link_detached(&trash).is_err() {
        host.delete_link(&trash)?;
    }
    Ok(())
}
