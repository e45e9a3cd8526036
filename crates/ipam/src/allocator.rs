//! The host-local allocator over any [`Store`]: ADD, DEL, CHECK, STATUS and
//! GC semantics, with the reference's messages.
use std::net::IpAddr;

use ipnet::IpNet;
use tern_cni::config::Attachment;
use tern_cni::{CniError, CniResult, Code, IpConfig};

use crate::config::HostLocalConfig;
use crate::range::{Range, RangeSet};
use crate::store::{Locked, Reservation, Store};

fn ip_config(ip: IpAddr, r: &Range) -> IpConfig {
    let address = IpNet::new(ip, r.subnet.prefix_len()).expect("prefix comes from a valid subnet");
    IpConfig { address, gateway: Some(r.gateway), interface: None }
}

/// Allocate one address per range set for `id`+`ifname`.
///
/// Requested addresses (CNI_ARGS, args, runtimeConfig) are taken first, each
/// by the set that contains it; other sets allocate round-robin. The lock is
/// held per range set, as in the reference. If a set fails, the addresses
/// this call reserved in earlier sets are released; the round-robin pointers
/// are not rolled back (neither are the reference's).
pub fn allocate<S: Store + ?Sized>(
    store: &mut S,
    cfg: &HostLocalConfig,
    id: &str,
    ifname: &str,
) -> Result<Vec<IpConfig>, CniError> {
    let mut requested = cfg.requested.clone();
    let mut out: Vec<IpConfig> = Vec::with_capacity(cfg.range_sets.len());
    for (idx, set) in cfg.range_sets.iter().enumerate() {
        let want = requested.iter().position(|ip| set.contains(*ip)).map(|i| requested.remove(i));
        let got = {
            let mut locked = Locked::new(&mut *store)?;
            allocate_in_set(&mut *locked, set, idx, id, ifname, want)
        };
        match got {
            Ok(ipc) => out.push(ipc),
            Err(e) => {
                rollback(store, &out, id, ifname);
                return Err(e.context(format_args!("failed to allocate for range {idx}")));
            }
        }
    }
    if !requested.is_empty() {
        rollback(store, &out, id, ifname);
        let list: Vec<String> = requested.iter().map(IpAddr::to_string).collect();
        return Err(CniError::internal(format!("failed to allocate all requested IPs: {}", list.join(" "))));
    }
    Ok(out)
}

/// One range set, lock held (the reference's `IPAllocator.Get`).
fn allocate_in_set<S: Store + ?Sized>(
    store: &mut S,
    set: &RangeSet,
    idx: usize,
    id: &str,
    ifname: &str,
    want: Option<IpAddr>,
) -> Result<IpConfig, CniError> {
    if let Some(ip) = want {
        let r = set.range_for(ip).expect("requested IP was matched to this set");
        if ip == r.gateway {
            return Err(CniError::internal(format!("requested ip {ip} is subnet's gateway")));
        }
        if !store.reserve(id, ifname, ip, idx)? {
            return Err(CniError::internal(format!("requested IP address {ip} is not available in range set {set}")));
        }
        return Ok(ip_config(ip, r));
    }

    // The spec forbids two ADDs for one attachment; refuse rather than hand
    // out a second address from the same set.
    if let Some(ip) = store.get_by_id(id, ifname)?.into_iter().find(|ip| set.contains(*ip)) {
        return Err(CniError::internal(format!(
            "{ip} has been allocated to {id}, duplicate allocation is not allowed"
        )));
    }

    // A pointer outside the set (ranges edited) just restarts at rangeStart.
    let last = store.last_reserved(idx)?;
    for (ip, r) in set.iter_from(last) {
        if store.reserve(id, ifname, ip, idx)? {
            return Ok(ip_config(ip, r));
        }
    }
    Err(CniError::internal(format!("no IP addresses available in range set: {set}")))
}

/// Release what this ADD reserved. The reference releases everything held by
/// id+ifname instead, which would also free an earlier ADD's addresses; here
/// only this call's addresses go, and only if still ours (the lock was
/// dropped between sets, so a concurrent DEL may have freed and someone else
/// re-taken them). Best effort: the ADD is failing anyway.
fn rollback<S: Store + ?Sized>(store: &mut S, done: &[IpConfig], id: &str, ifname: &str) {
    if done.is_empty() {
        return;
    }
    let Ok(mut locked) = Locked::new(store) else {
        return;
    };
    let Ok(held) = locked.get_by_id(id, ifname) else {
        return;
    };
    for ipc in done {
        let ip = ipc.address.addr();
        if held.contains(&ip) {
            let _ = locked.release(ip);
        }
    }
}

/// DEL: free everything `id`+`ifname` holds (legacy id-only if nothing
/// matched). Missing reservations are not an error.
pub fn release<S: Store + ?Sized>(store: &mut S, id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
    Locked::new(store)?.release_by_id(id, ifname)
}

/// CHECK's lookup: the addresses `id`+`ifname` holds.
pub fn find<S: Store + ?Sized>(store: &mut S, id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
    Locked::new(store)?.get_by_id(id, ifname)
}

/// CHECK: the attachment holds a reservation, every reserved address is in
/// `prev`, and every `prev` address inside our range sets is reserved by it
/// with the set's prefix. (The reference only checks that some reservation
/// exists.)
pub fn check(
    cfg: &HostLocalConfig,
    reserved: &[IpAddr],
    prev: &CniResult,
    id: &str,
    ifname: &str,
) -> Result<(), CniError> {
    if reserved.is_empty() {
        return Err(CniError::internal(format!("tern-ipam: Failed to find address added by container {id}")));
    }
    for ip in reserved {
        if !prev.ips.iter().any(|p| p.address.addr() == *ip) {
            return Err(CniError::internal(format!(
                "address {ip} reserved for {id}/{ifname} is missing from prevResult"
            )));
        }
    }
    for p in &prev.ips {
        let ip = p.address.addr();
        let Some(r) = cfg.range_sets.iter().find_map(|s| s.range_for(ip)) else {
            continue;
        };
        if !reserved.contains(&ip) {
            return Err(CniError::internal(format!(
                "address {} in prevResult is not reserved for {id}/{ifname}",
                p.address
            )));
        }
        // A host prefix is how L3 (routed) plugins present the address.
        let host_prefix = p.address.prefix_len() == p.address.max_prefix_len();
        if p.address.prefix_len() != r.subnet.prefix_len() && !host_prefix {
            return Err(CniError::internal(format!(
                "address {} in prevResult does not match subnet {}",
                p.address, r.subnet
            )));
        }
    }
    Ok(())
}

/// STATUS: code 50 when some range set has no address left. Orphaned
/// (empty) reservations still occupy their address until GC.
pub fn status(cfg: &HostLocalConfig, reservations: &[Reservation]) -> Result<(), CniError> {
    for set in &cfg.range_sets {
        let used =
            reservations.iter().filter(|r| set.range_for(r.ip).is_some_and(|range| range.gateway != r.ip)).count()
                as u128;
        if used >= set.capacity() {
            return Err(CniError::new(Code::NotAvailable, format!("no IP addresses available in range set: {set}")));
        }
    }
    Ok(())
}

/// Which reservations GC frees: those whose (id, ifname) is not in `valid`;
/// legacy id-only ones unless the id appears at all (DEL would free them by
/// id alone too); orphans (no owner) always. An empty `valid` frees all.
pub fn gc_victims(reservations: &[Reservation], valid: &[Attachment]) -> Vec<IpAddr> {
    reservations
        .iter()
        .filter(|r| {
            if r.is_orphan() {
                return true;
            }
            let keep = match &r.ifname {
                Some(ifname) => valid.iter().any(|a| a.container_id == r.id && &a.ifname == ifname),
                None => valid.iter().any(|a| a.container_id == r.id),
            };
            !keep
        })
        .map(|r| r.ip)
        .collect()
}

/// GC: release every reservation not backed by a valid attachment, under one
/// lock so nothing is allocated between the listing and the removal.
pub fn gc<S: Store + ?Sized>(store: &mut S, valid: &[Attachment]) -> Result<Vec<IpAddr>, CniError> {
    let mut locked = Locked::new(store)?;
    let victims = gc_victims(&locked.list()?, valid);
    let mut freed = Vec::with_capacity(victims.len());
    for ip in victims {
        if locked.release(ip)? {
            freed.push(ip);
        }
    }
    Ok(freed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;
    use tern_cni::args::CniArgs;
    use tern_cni::{Command, NetConf, Version};

    fn cfg(ipam: &str) -> HostLocalConfig {
        cfg_args(ipam, "")
    }

    fn cfg_args(ipam: &str, args: &str) -> HostLocalConfig {
        let json = format!(r#"{{"cniVersion":"1.0.0","name":"net","type":"tern-ipam","ipam":{ipam}}}"#);
        let conf = NetConf::parse(json.as_bytes(), Command::Add, &Version::ALL).unwrap();
        HostLocalConfig::from_conf(&conf, &CniArgs::parse(args).unwrap()).unwrap()
    }

    fn addrs(v: &[IpConfig]) -> Vec<String> {
        v.iter().map(|c| c.address.to_string()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const DUAL: &str = r#"{"ranges":[[{"subnet":"10.9.0.0/29"}],[{"subnet":"fd00:9::/126"}]]}"#;

    /// Appendix A: the observed host-local sequence.
    #[test]
    fn appendix_a_dual_stack_vector() {
        let c = cfg(DUAL);
        let mut s = MemStore::new();
        let r1 = allocate(&mut s, &c, "ctr1", "eth0").unwrap();
        assert_eq!(addrs(&r1), ["10.9.0.2/29", "fd00:9::2/126"]);
        assert_eq!(r1[0].gateway, Some(ip("10.9.0.1")));
        assert_eq!(r1[1].gateway, Some(ip("fd00:9::1")));
        assert_eq!(r1[0].interface, None);
        let r2 = allocate(&mut s, &c, "ctr2", "eth0").unwrap();
        assert_eq!(addrs(&r2), ["10.9.0.3/29", "fd00:9::3/126"]);

        let e = allocate(&mut s, &c, "ctr3", "eth0").unwrap_err();
        assert_eq!(e.code, 999);
        assert_eq!(
            e.msg,
            "failed to allocate for range 1: no IP addresses available in range set: fd00:9::1-fd00:9::3"
        );
        // The v4 address was rolled back, the pointer was not.
        assert!(!s.files.contains_key(&ip("10.9.0.4")));
        assert_eq!(s.last[&0], ip("10.9.0.4"));

        assert_eq!(release(&mut s, "ctr1", "eth0").unwrap(), vec![ip("10.9.0.2"), ip("fd00:9::2")]);
        let r4 = allocate(&mut s, &c, "ctr4", "eth0").unwrap();
        assert_eq!(addrs(&r4), ["10.9.0.5/29", "fd00:9::2/126"]);
    }

    #[test]
    fn exhaustion_message_with_range_start() {
        let c = cfg(r#"{"ranges":[[{"subnet":"10.9.0.0/29","rangeStart":"10.9.0.2"}]]}"#);
        let mut s = MemStore::new();
        for i in 0..5 {
            allocate(&mut s, &c, &format!("c{i}"), "eth0").unwrap();
        }
        let e = allocate(&mut s, &c, "c9", "eth0").unwrap_err();
        assert_eq!(e.msg, "failed to allocate for range 0: no IP addresses available in range set: 10.9.0.2-10.9.0.6");
        assert_eq!(e.code, 999);
    }

    #[test]
    fn round_robin_wraps_and_reuses_freed() {
        let c = cfg(r#"{"subnet":"10.0.0.0/29"}"#);
        let mut s = MemStore::new();
        let mut got = Vec::new();
        for i in 0..5 {
            got.push(addrs(&allocate(&mut s, &c, &format!("c{i}"), "eth0").unwrap())[0].clone());
        }
        assert_eq!(got, ["10.0.0.2/29", "10.0.0.3/29", "10.0.0.4/29", "10.0.0.5/29", "10.0.0.6/29"]);
        release(&mut s, "c1", "eth0").unwrap();
        release(&mut s, "c3", "eth0").unwrap();
        // After .6 the iterator wraps, skips the gateway .1 and the taken .2.
        assert_eq!(addrs(&allocate(&mut s, &c, "x", "eth0").unwrap()), ["10.0.0.3/29"]);
        assert_eq!(addrs(&allocate(&mut s, &c, "y", "eth0").unwrap()), ["10.0.0.5/29"]);
    }

    #[test]
    fn duplicate_allocation_refused() {
        let c = cfg(r#"{"subnet":"10.0.0.0/24"}"#);
        let mut s = MemStore::new();
        allocate(&mut s, &c, "ctr", "eth0").unwrap();
        let e = allocate(&mut s, &c, "ctr", "eth0").unwrap_err();
        assert_eq!(
            e.msg,
            "failed to allocate for range 0: 10.0.0.2 has been allocated to ctr, duplicate allocation is not allowed"
        );
        // Another interface of the same container is a different attachment.
        assert_eq!(addrs(&allocate(&mut s, &c, "ctr", "net1").unwrap()), ["10.0.0.3/24"]);
    }

    #[test]
    fn requested_ips() {
        let c = cfg_args(DUAL, "IP=10.9.0.5");
        let mut s = MemStore::new();
        assert_eq!(addrs(&allocate(&mut s, &c, "a", "eth0").unwrap()), ["10.9.0.5/29", "fd00:9::2/126"]);
        let e = allocate(&mut s, &c, "b", "eth0").unwrap_err();
        assert_eq!(
            e.msg,
            "failed to allocate for range 0: requested IP address 10.9.0.5 is not available in range set 10.9.0.1-10.9.0.6"
        );
        let c = cfg_args(DUAL, "IP=10.9.0.1");
        let e = allocate(&mut s, &c, "b", "eth0").unwrap_err();
        assert_eq!(e.msg, "failed to allocate for range 0: requested ip 10.9.0.1 is subnet's gateway");
        let c = cfg_args(DUAL, "IP=10.10.0.1");
        let e = allocate(&mut s, &c, "b", "eth0").unwrap_err();
        assert_eq!(e.msg, "failed to allocate all requested IPs: 10.10.0.1");
        // Rolled back: b holds nothing.
        assert!(find(&mut s, "b", "eth0").unwrap().is_empty());
    }

    #[test]
    fn rollback_keeps_earlier_add() {
        let c = cfg(DUAL);
        let mut s = MemStore::new();
        allocate(&mut s, &c, "a", "eth0").unwrap();
        // v4 requested (fresh) then v6 duplicate: only the fresh v4 goes.
        let c2 = cfg_args(DUAL, "IP=10.9.0.6");
        assert!(allocate(&mut s, &c2, "a", "eth0").is_err());
        assert_eq!(find(&mut s, "a", "eth0").unwrap(), vec![ip("10.9.0.2"), ip("fd00:9::2")]);
    }

    #[test]
    fn check_against_prev_result() {
        let c = cfg(DUAL);
        let mut s = MemStore::new();
        let ips = allocate(&mut s, &c, "a", "eth0").unwrap();
        let prev = CniResult { ips: ips.clone(), ..Default::default() };
        let held = find(&mut s, "a", "eth0").unwrap();
        check(&c, &held, &prev, "a", "eth0").unwrap();

        let e = check(&c, &[], &prev, "zz", "eth0").unwrap_err();
        assert_eq!(e.msg, "tern-ipam: Failed to find address added by container zz");
        let partial = CniResult { ips: ips[..1].to_vec(), ..Default::default() };
        let e = check(&c, &held, &partial, "a", "eth0").unwrap_err();
        assert!(e.msg.contains("fd00:9::2"), "{}", e.msg);
        let mut other = prev.clone();
        other.ips[0].address = "10.9.0.3/29".parse().unwrap();
        let e = check(&c, &held, &other, "a", "eth0").unwrap_err();
        assert!(e.msg.contains("10.9.0.2") || e.msg.contains("10.9.0.3"), "{}", e.msg);
    }

    #[test]
    fn status_reports_exhaustion() {
        let c = cfg(r#"{"subnet":"10.0.0.0/30"}"#);
        let mut s = MemStore::new();
        s.lock().unwrap();
        assert!(status(&c, &s.list().unwrap()).is_ok());
        s.unlock().unwrap();
        allocate(&mut s, &c, "a", "eth0").unwrap();
        s.lock().unwrap();
        let e = status(&c, &s.list().unwrap()).unwrap_err();
        assert_eq!((e.code, e.msg.as_str()), (50, "no IP addresses available in range set: 10.0.0.1-10.0.0.2"));
    }

    #[test]
    fn gc_rules() {
        let mut s = MemStore::new();
        s.files.insert(ip("10.0.0.2"), "keep\r\neth0".into());
        s.files.insert(ip("10.0.0.3"), "keep\r\neth1".into());
        s.files.insert(ip("10.0.0.4"), "keep".into());
        s.files.insert(ip("10.0.0.5"), "gone".into());
        s.files.insert(ip("10.0.0.6"), "".into());
        s.files.insert(ip("10.0.0.7"), "gone\r\neth0".into());
        let valid = vec![Attachment { container_id: "keep".into(), ifname: "eth0".into() }];
        let freed = gc(&mut s, &valid).unwrap();
        assert_eq!(freed, ["10.0.0.3", "10.0.0.5", "10.0.0.6", "10.0.0.7"].map(ip));
        assert_eq!(s.files.keys().copied().collect::<Vec<_>>(), ["10.0.0.2", "10.0.0.4"].map(ip));
        assert_eq!(gc(&mut s, &[]).unwrap().len(), 2);
        assert!(s.files.is_empty());
    }

    #[test]
    fn orphan_is_never_released_by_del() {
        let mut s = MemStore::new();
        s.files.insert(ip("10.0.0.2"), "".into());
        assert!(release(&mut s, "ctr", "eth0").unwrap().is_empty());
        // And it still occupies its address.
        let c = cfg(r#"{"subnet":"10.0.0.0/24"}"#);
        assert_eq!(addrs(&allocate(&mut s, &c, "ctr", "eth0").unwrap()), ["10.0.0.3/24"]);
    }
}
