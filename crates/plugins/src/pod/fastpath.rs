//! The `tern` plugin's side of the eBPF fast path (`"dataplane": "ebpf"`):
//! registering a pod's addresses with the datapath in `tern-bpf`, and
//! removing them again on DEL, GC and a failed ADD.
//!
//! The instance (program and endpoint map) is the node namespace's, the
//! namespace the plugin runs in. Entries are keyed by address and name the
//! pod's host veth by ifindex and MAC, so DEL and GC find them from the
//! kernel alone. The tc filter belongs to the host veth and goes with it:
//! entries are the only per-pod state to clean. The instance stays pinned
//! while the node namespace lives (see `tern_bpf`).
//!
//! Every ADD, whatever its dataplane, removes a leftover entry of the
//! addresses it was given (a dead pod's, whose DEL never ran): the address
//! may come back to a pod of the kernel dataplane, which such an entry would
//! otherwise capture.
use std::collections::HashSet;
use std::net::IpAddr;

use tern_bpf::{Attachment, Endpoint, FastPath};
use tern_cni::{CniError, IpConfig};
use tern_sys::netlink::{LinkInfo, Mac, Netlink};

fn fail(e: impl std::fmt::Display) -> CniError {
    CniError::internal(e.to_string())
}

/// Attach the program to the pod's host veth and register its addresses.
pub fn register(hv: &LinkInfo, pod_mac: Option<Mac>, bridge: Option<u32>, ips: &[IpConfig]) -> Result<(), CniError> {
    let host_mac = hv.mac.ok_or_else(|| CniError::internal("host veth has no MAC"))?;
    let pod_mac = pod_mac.ok_or_else(|| CniError::internal("pod interface has no MAC"))?;
    let mut fp = FastPath::open_or_load().map_err(fail)?;
    fp.attach(&hv.name).map_err(fail)?;
    for ip in ips {
        fp.add_endpoint(&Endpoint {
            addr: ip.address.addr(),
            host_ifindex: hv.index,
            host_mac,
            pod_mac,
            attachment: match bridge {
                Some(bridge_ifindex) => Attachment::Bridged { bridge_ifindex },
                None => Attachment::Routed,
            },
            fast: true,
            redirected: 0,
        })
        .map_err(fail)?;
    }
    Ok(())
}

/// A kernel-dataplane ADD: drop leftover entries of its addresses. Costs a
/// `stat` when the fast path was never used on this machine.
pub fn forget_addresses(ips: &[IpConfig]) -> Result<(), CniError> {
    let Some(mut fp) = FastPath::open_existing().map_err(fail)? else { return Ok(()) };
    for ip in ips {
        fp.remove_endpoint(ip.address.addr()).map_err(fail)?;
    }
    Ok(())
}

/// DEL (and a failed ADD): the entries of this attachment's host veth; when
/// the veth is already gone, every entry of this node whose veth is gone.
pub fn remove_for_veth(host_veth: &str) -> Result<(), CniError> {
    let Some(mut fp) = FastPath::open_existing().map_err(fail)? else { return Ok(()) };
    let nl = Netlink::new().map_err(fail)?;
    match nl.link(host_veth).map_err(fail)? {
        Some(hv) => fp.remove_endpoints(|e| e.host_ifindex == hv.index).map(drop).map_err(fail),
        None => sweep(&mut fp, &nl),
    }
}

/// GC: every entry of this node whose host veth no longer exists, and the
/// pins of node namespaces that no longer exist.
pub fn remove_stale() -> Result<(), CniError> {
    tern_bpf::sweep_dead_namespaces().map_err(fail)?;
    let Some(mut fp) = FastPath::open_existing().map_err(fail)? else { return Ok(()) };
    let nl = Netlink::new().map_err(fail)?;
    sweep(&mut fp, &nl)
}

fn sweep(fp: &mut FastPath, nl: &Netlink) -> Result<(), CniError> {
    // (ifindex, MAC): an ifindex alone could have been reused by a new link.
    let live: HashSet<(u32, Mac)> =
        nl.links().map_err(fail)?.into_iter().filter_map(|l| l.mac.map(|m| (l.index, m))).collect();
    fp.remove_endpoints(|e| !live.contains(&(e.host_ifindex, e.host_mac))).map(drop).map_err(fail)
}

/// tern-firewall: take the pod with these addresses off the fast path, so
/// its traffic in both directions crosses the node's forward chain. Nothing
/// to do when the fast path was never used on this machine.
pub fn bypass_off(addrs: &[IpAddr]) -> Result<(), CniError> {
    let Some(mut fp) = FastPath::open_existing().map_err(fail)? else { return Ok(()) };
    fp.set_policy_bypass(addrs, false).map(drop).map_err(fail)
}

/// tern-firewall's CHECK: the addresses that are still on the fast path.
pub fn still_fast(addrs: &[IpAddr]) -> Result<Vec<IpAddr>, CniError> {
    let Some(fp) = FastPath::open_existing().map_err(fail)? else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for &a in addrs {
        if fp.is_fast(a).map_err(fail)? {
            out.push(a);
        }
    }
    Ok(out)
}
