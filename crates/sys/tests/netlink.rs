//! Links, addresses and routes, each test in its own namespaces. Needs root.

mod common;

use std::net::IpAddr;
use std::time::Instant;

use common::TestNs;
use ipnet::IpNet;
use tern_sys::netlink::{format_mac, Family, RouteSpec};
use tern_sys::{Netlink, SysError};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// A link to hang addresses and routes on: a veth pair with both ends in
/// `ns`, both up (so it has carrier). Dummy links would do, but not every
/// kernel has them (this test VM's does not).
fn scratch(nl: &Netlink, t: &TestNs, name: &str) -> tern_sys::LinkInfo {
    let peer = format!("{name}p");
    nl.create_veth(name, &peer, &t.ns, None, None, None).unwrap();
    let l = nl.link(name).unwrap().unwrap();
    let p = nl.link(&peer).unwrap().unwrap();
    nl.set_up(p.index).unwrap();
    nl.set_up(l.index).unwrap();
    l
}

#[test]
fn dummy_if_the_kernel_has_it() {
    let a = TestNs::new();
    let nl = a.nl();
    match nl.create_dummy("tdm0") {
        Ok(d) => {
            assert_eq!(d.kind.as_deref(), Some("dummy"));
            assert_eq!(d.name, "tdm0");
            assert!(nl.create_dummy("tdm0").unwrap_err().is_exists());
            assert!(nl.delete_link("tdm0").unwrap());
        }
        Err(e) => {
            // CONFIG_DUMMY=n: the kernel must say so, nothing else is OK.
            assert_eq!(e.errno(), Some(libc::EOPNOTSUPP), "{e:?}");
            assert!(e.to_string().contains("Unknown device type"), "{e}");
            eprintln!("NOTE: kernel has no dummy links: {e}");
        }
    }
}

#[test]
fn veth_peer_created_in_other_netns() {
    let a = TestNs::new();
    let b = TestNs::new();
    let nla = a.nl();
    let nlb = b.nl();
    let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];

    nla.create_veth("tva", "tvb", &b.ns, Some(1400), Some(mac), Some("tern:owner-1")).unwrap();

    let va = nla.link("tva").unwrap().expect("tva in netns a");
    let vb = nlb.link("tvb").unwrap().expect("tvb in netns b");
    assert!(nla.link("tvb").unwrap().is_none(), "peer must not be in netns a");
    assert!(nlb.link("tva").unwrap().is_none());
    assert_eq!(va.kind.as_deref(), Some("veth"));
    assert_eq!(vb.kind.as_deref(), Some("veth"));
    assert_eq!((va.mtu, vb.mtu), (1400, 1400));
    assert_eq!(vb.mac, Some(mac));
    assert_eq!(va.peer_index, Some(vb.index));
    assert_eq!(vb.peer_index, Some(va.index));
    assert!(!va.up && !vb.up);
    assert_eq!(va.master, None);
    assert_eq!(va.hairpin, None);
    assert_eq!(va.alias.as_deref(), Some("tern:owner-1"));
    assert_eq!(vb.alias, None);
    assert!(nla.links().unwrap().iter().any(|l| l.name == "tva" && l.alias.as_deref() == Some("tern:owner-1")));
    nla.set_alias(va.index, "other").unwrap();
    assert_eq!(nla.link("tva").unwrap().unwrap().alias.as_deref(), Some("other"));
    nla.set_alias(va.index, "").unwrap();
    assert_eq!(nla.link("tva").unwrap().unwrap().alias, None);
    let by_index = nlb.link_by_index(vb.index).unwrap().unwrap();
    assert_eq!(by_index.name, "tvb");
    assert_eq!(format_mac(&by_index.mac.unwrap()), "02:11:22:33:44:55");

    // Host-side name taken.
    let e = nla.create_veth("tva", "tvb2", &b.ns, None, None, None).unwrap_err();
    match &e {
        SysError::Exists(what) => assert!(what.contains("\"tva\""), "{what}"),
        other => panic!("expected Exists, got {other:?}"),
    }
    assert!(nlb.link("tvb2").unwrap().is_none(), "nothing left behind");
    // Peer name taken in the peer namespace.
    let e = nla.create_veth("tva2", "tvb", &b.ns, None, None, None).unwrap_err();
    match &e {
        SysError::Exists(what) => {
            assert!(what.contains("\"tvb\"") && what.contains(b.path.to_str().unwrap()), "{what}")
        }
        other => panic!("expected Exists, got {other:?}"),
    }
    assert_eq!(e.errno(), Some(libc::EEXIST));
    assert!(nla.link("tva2").unwrap().is_none(), "nothing left behind");

    // Bad names never reach the kernel.
    let e = nla.create_veth("a-much-too-long-name", "x", &b.ns, None, None, None).unwrap_err();
    assert!(matches!(e, SysError::Invalid(_)), "{e:?}");
    assert!(nla.link("a-much-too-long-name").unwrap().is_none());

    // Deleting one end removes the pair.
    assert!(nla.delete_link("tva").unwrap());
    assert!(nlb.link("tvb").unwrap().is_none());
    assert!(!nla.delete_link("tva").unwrap());
    assert!(!nla.delete_link_index(va.index).unwrap());
    assert!(nla.link_by_index(va.index).unwrap().is_none());
}

/// The detached delete returns before the kernel has unregistered the pair
/// (which takes grace periods), and the pair does go, in the namespace that
/// was current on the calling thread, not in the test's own.
#[test]
fn detached_delete_removes_the_pair_in_the_calling_threads_netns() {
    let a = TestNs::new();
    let b = TestNs::new();
    let (nla, nlb) = (a.nl(), b.nl());
    nla.create_veth("tdx", "tdxp", &b.ns, None, None, None).unwrap();
    a.run(|| tern_sys::netlink::delete_link_detached("tdx")).unwrap();
    let gone = |nl: &Netlink, name: &str| nl.link(name).unwrap().is_none();
    let deadline = Instant::now() + std::time::Duration::from_secs(5);
    while !(gone(&nla, "tdx") && gone(&nlb, "tdxp")) && Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert!(gone(&nla, "tdx") && gone(&nlb, "tdxp"), "the pair is still there");
    // A name that is not there, and one the kernel would reject.
    a.run(|| tern_sys::netlink::delete_link_detached("tdx")).unwrap();
    assert!(tern_sys::netlink::delete_link_detached("x".repeat(16).as_str()).is_err());
}

#[test]
fn veth_both_ends_same_netns() {
    let a = TestNs::new();
    let nl = a.nl();
    nl.create_veth("tsa", "tsb", &a.ns, None, None, None).unwrap();
    let x = nl.link("tsa").unwrap().unwrap();
    let y = nl.link("tsb").unwrap().unwrap();
    assert_eq!(x.peer_index, Some(y.index));
    assert!(nl.delete_link_index(y.index).unwrap());
    assert!(nl.link("tsa").unwrap().is_none());
}

#[test]
fn bridge_master_hairpin_and_link_settings() {
    let a = TestNs::new();
    let b = TestNs::new();
    let nl = a.nl();

    let br = nl.create_bridge("tbr0", Some(1450)).unwrap();
    assert_eq!(br.kind.as_deref(), Some("bridge"));
    assert_eq!(br.name, "tbr0");
    assert!(!br.up);
    let e = nl.create_bridge("tbr0", None).unwrap_err();
    assert!(e.is_exists(), "{e:?}");
    assert_eq!(e.to_string(), "link \"tbr0\" already exists");

    nl.create_veth("tvh", "tvc", &b.ns, Some(1450), None, None).unwrap();
    let vh = nl.link("tvh").unwrap().unwrap();
    nl.set_master(vh.index, br.index).unwrap();
    let vh = nl.link("tvh").unwrap().unwrap();
    assert_eq!(vh.master, Some(br.index));
    assert_eq!(vh.hairpin, Some(false));

    nl.set_hairpin(vh.index, true).unwrap();
    assert_eq!(nl.link("tvh").unwrap().unwrap().hairpin, Some(true));
    nl.set_hairpin(vh.index, false).unwrap();
    assert_eq!(nl.link_by_index(vh.index).unwrap().unwrap().hairpin, Some(false));
    nl.set_hairpin(vh.index, true).unwrap();

    nl.set_up(br.index).unwrap();
    nl.set_up(vh.index).unwrap();
    assert!(nl.link("tbr0").unwrap().unwrap().up);
    let vh2 = nl.link("tvh").unwrap().unwrap();
    assert!(vh2.up);
    assert_eq!(vh2.hairpin, Some(true));
    nl.set_down(vh.index).unwrap();
    assert!(!nl.link("tvh").unwrap().unwrap().up);

    nl.set_mtu(vh.index, 1300).unwrap();
    let mac = [0x02, 0, 0, 0, 0, 0x42];
    nl.set_mac(vh.index, mac).unwrap();
    let vh3 = nl.link("tvh").unwrap().unwrap();
    assert_eq!((vh3.mtu, vh3.mac), (1300, Some(mac)));

    let all = nl.links().unwrap();
    let names: Vec<&str> = all.iter().map(|l| l.name.as_str()).collect();
    assert!(names.contains(&"lo") && names.contains(&"tbr0") && names.contains(&"tvh"), "{names:?}");
    assert_eq!(all.len(), 3, "{names:?}");

    // Detach: no master, no bridge port data.
    nl.set_master(vh.index, 0).unwrap();
    let vh4 = nl.link("tvh").unwrap().unwrap();
    assert_eq!((vh4.master, vh4.hairpin), (None, None));
    // Hairpin on a non-port is an error.
    let e = nl.set_hairpin(vh.index, true).unwrap_err();
    assert!(matches!(e, SysError::Netlink { .. }), "{e:?}");
    eprintln!("hairpin on non-port: {e}");

    // Promisc and rename (renaming needs the link down).
    nl.create_veth("tdm0", "tdm0p", &a.ns, None, None, None).unwrap();
    let d = nl.link("tdm0").unwrap().unwrap();
    nl.set_promisc(d.index, true).unwrap();
    assert!(nl.link("tdm0").unwrap().unwrap().promisc);
    nl.set_promisc(d.index, false).unwrap();
    assert!(!nl.link("tdm0").unwrap().unwrap().promisc);
    nl.set_name(d.index, "tdm1").unwrap();
    assert!(nl.link("tdm0").unwrap().is_none());
    assert_eq!(nl.link("tdm1").unwrap().unwrap().index, d.index);
    let e = nl.set_name(d.index, "tvh").unwrap_err();
    assert!(e.is_exists(), "{e:?}");

    // Operations on a missing index.
    let e = nl.set_up(999_999).unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    assert_eq!(e.to_string(), "link index 999999 not found");
    let e = nl.set_mtu(999_999, 1500).unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
}

#[test]
fn move_link_to_netns() {
    let a = TestNs::new();
    let b = TestNs::new();
    let (nla, nlb) = (a.nl(), b.nl());
    nla.create_veth("tmv0", "tmv0p", &a.ns, None, None, None).unwrap();
    let d = nla.link("tmv0").unwrap().unwrap();
    nla.set_netns(d.index, &b.ns).unwrap();
    assert!(nla.link("tmv0").unwrap().is_none());
    assert!(nlb.link("tmv0").unwrap().is_some());
}

#[test]
fn addresses_v4_v6_nodad() {
    let a = TestNs::new();
    let nl = a.nl();
    let d = scratch(&nl, &a, "tad0");

    nl.add_address(d.index, net("10.9.0.2/24"), false).unwrap();
    nl.add_address(d.index, net("2001:db8:9::2/64"), true).unwrap();
    nl.add_address(d.index, net("2001:db8:9::3/64"), false).unwrap();

    let addrs = nl.addresses(Some(d.index)).unwrap();
    assert!(addrs.contains(&(d.index, net("10.9.0.2/24"))), "{addrs:?}");
    assert!(addrs.contains(&(d.index, net("2001:db8:9::2/64"))), "{addrs:?}");
    assert!(addrs.iter().all(|(i, _)| *i == d.index));
    let all = nl.addresses(None).unwrap();
    assert!(all.contains(&(d.index, net("10.9.0.2/24"))));

    // nodad: the address is usable at once (not tentative), unlike ::3.
    let out = a.run(|| std::process::Command::new("ip").args(["-6", "addr", "show", "dev", "tad0"]).output().unwrap());
    let text = String::from_utf8_lossy(&out.stdout);
    let line2 = text.lines().find(|l| l.contains("2001:db8:9::2/64")).expect(&text);
    assert!(line2.contains("nodad") && !line2.contains("tentative"), "{text}");
    let line3 = text.lines().find(|l| l.contains("2001:db8:9::3/64")).expect(&text);
    assert!(!line3.contains("nodad"), "{text}");
    // The v4 broadcast is set like `brd +`.
    let out = a.run(|| std::process::Command::new("ip").args(["-4", "addr", "show", "dev", "tad0"]).output().unwrap());
    assert!(String::from_utf8_lossy(&out.stdout).contains("brd 10.9.0.255"));

    let e = nl.add_address(d.index, net("10.9.0.2/24"), false).unwrap_err();
    assert!(e.is_exists(), "{e:?}");
    assert_eq!(e.to_string(), format!("address 10.9.0.2/24 on link index {} already exists", d.index));
    let e = nl.add_address(d.index, net("2001:db8:9::2/64"), true).unwrap_err();
    assert!(e.is_exists(), "{e:?}");

    assert!(nl.del_address(d.index, net("10.9.0.2/24")).unwrap());
    assert!(!nl.del_address(d.index, net("10.9.0.2/24")).unwrap());
    assert!(nl.del_address(d.index, net("2001:db8:9::2/64")).unwrap());
    assert!(!nl.del_address(d.index, net("2001:db8:9::2/64")).unwrap());
    assert!(!nl.del_address(999_999, net("10.9.0.2/24")).unwrap());
    let addrs = nl.addresses(Some(d.index)).unwrap();
    assert!(!addrs.iter().any(|(_, n)| *n == net("10.9.0.2/24") || *n == net("2001:db8:9::2/64")));

    let e = nl.addresses(Some(999_999)).unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    let e = nl.add_address(999_999, net("10.9.0.2/24"), false).unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
}

#[test]
fn routes_add_list_del() {
    let a = TestNs::new();
    let nl = a.nl();
    let d = scratch(&nl, &a, "trt0");
    nl.add_address(d.index, net("10.9.0.2/24"), false).unwrap();
    nl.add_address(d.index, net("2001:db8:9::2/64"), true).unwrap();

    // Plain gateway route.
    let r = RouteSpec::new(net("10.20.0.0/16")).via(ip("10.9.0.1")).dev(d.index);
    nl.add_route(&r).unwrap();
    let found =
        nl.routes(Family::V4).unwrap().into_iter().find(|x| x.dst == net("10.20.0.0/16")).expect("route listed");
    assert_eq!(found.gw, Some(ip("10.9.0.1")));
    assert_eq!(found.oif, Some(d.index));
    assert_eq!((found.scope, found.table, found.proto), (0, 254, 3));
    let e = nl.add_route(&r).unwrap_err();
    assert!(e.is_exists(), "{e:?}");
    nl.replace_route(&r.clone().with_mtu(1300).with_advmss(1260).with_src(ip("10.9.0.2"))).unwrap();
    let found = nl.routes(Family::V4).unwrap().into_iter().find(|x| x.dst == net("10.20.0.0/16")).unwrap();
    assert_eq!((found.mtu, found.src), (Some(1300), Some(ip("10.9.0.2"))));
    assert!(nl.del_route(&r).unwrap());
    assert!(!nl.del_route(&r).unwrap());

    // Host bits in dst are cleared.
    nl.add_route(&RouteSpec::new(net("10.21.3.4/16")).via(ip("10.9.0.1"))).unwrap();
    assert!(nl.routes(Family::V4).unwrap().iter().any(|x| x.dst == net("10.21.0.0/16")));
    assert!(nl.del_route(&RouteSpec::new(net("10.21.0.0/16"))).unwrap());

    // Unreachable gateway without onlink is rejected with the kernel's reason.
    let bad = RouteSpec::default_route(Family::V4).via(ip("169.254.1.1")).dev(d.index);
    let e = nl.add_route(&bad).unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENETUNREACH), "{e:?}");
    eprintln!("unreachable gateway: {e}");

    // Calico-style: link-local gateway made reachable with onlink.
    let v4def = bad.clone().with_onlink();
    nl.add_route(&v4def).unwrap();
    let def = nl.routes(Family::V4).unwrap().into_iter().find(|x| x.dst.prefix_len() == 0).expect("default route");
    assert_eq!((def.gw, def.oif), (Some(ip("169.254.1.1")), Some(d.index)));
    assert!(nl.del_route(&RouteSpec::default_route(Family::V4)).unwrap());

    // IPv6 default via a link-local gateway (needs the device), and onlink.
    let v6def = RouteSpec::default_route(Family::V6).via(ip("fe80::1")).dev(d.index).with_metric(1024);
    nl.add_route(&v6def).unwrap();
    let def6 = nl.routes(Family::V6).unwrap().into_iter().find(|x| x.dst.prefix_len() == 0).expect("v6 default route");
    assert_eq!((def6.gw, def6.oif, def6.metric), (Some(ip("fe80::1")), Some(d.index), Some(1024)));
    assert!(nl.del_route(&v6def).unwrap());
    assert!(!nl.del_route(&v6def).unwrap());
    let v6onlink = RouteSpec::new(net("2001:db8:77::/48")).via(ip("2001:db8:ff::1")).dev(d.index).with_onlink();
    nl.add_route(&v6onlink).unwrap();
    assert!(nl.routes(Family::V6).unwrap().iter().any(|x| x.dst == net("2001:db8:77::/48")));
    assert!(nl.del_route(&v6onlink).unwrap());

    // Direct route, scope link.
    let direct = RouteSpec::new(net("10.40.0.0/24")).dev(d.index).link_scope();
    nl.add_route(&direct).unwrap();
    let found = nl.routes(Family::V4).unwrap().into_iter().find(|x| x.dst == net("10.40.0.0/24")).unwrap();
    assert_eq!((found.scope, found.gw), (253, None));
    assert!(nl.del_route(&direct).unwrap());

    // Another table: not in routes(), in routes_in_table().
    let t = RouteSpec::new(net("10.50.0.0/24")).via(ip("10.9.0.1")).in_table(1000);
    nl.add_route(&t).unwrap();
    assert!(!nl.routes(Family::V4).unwrap().iter().any(|x| x.dst == net("10.50.0.0/24")));
    let in_t = nl.routes_in_table(Family::V4, Some(1000)).unwrap();
    assert_eq!(in_t.len(), 1, "{in_t:?}");
    assert_eq!(in_t[0].table, 1000);
    assert!(nl
        .routes_in_table(Family::V4, None)
        .unwrap()
        .iter()
        .any(|x| x.dst == net("10.50.0.0/24") && x.table == 1000));
    // Deleting without the table looks in main only.
    assert!(!nl.del_route(&RouteSpec::new(net("10.50.0.0/24"))).unwrap());
    assert!(nl.del_route(&t).unwrap());
    assert!(nl.routes_in_table(Family::V4, Some(1000)).unwrap().is_empty());
    assert!(!nl.del_route(&RouteSpec::new(net("10.50.0.0/24")).in_table(4242)).unwrap());

    // Connected routes show up with proto kernel.
    let conn = nl.routes(Family::V4).unwrap();
    assert!(conn.iter().any(|x| x.dst == net("10.9.0.0/24") && x.proto == 2 && x.scope == 253), "{conn:?}");

    // Mixed families never reach the kernel.
    let e = nl.add_route(&RouteSpec::new(net("10.0.0.0/8")).via(ip("fe80::1"))).unwrap_err();
    assert!(matches!(e, SysError::Invalid(_)), "{e:?}");
}

#[test]
fn socket_stays_in_its_netns_across_threads() {
    let a = TestNs::new();
    let nl = a.nl();
    nl.create_bridge("tth0", None).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            // This thread is in the root namespace; the socket is not.
            assert!(nl.link("tth0").unwrap().is_some());
        });
    });
    // A socket opened here (root namespace) does not see it. Read-only.
    let root = Netlink::new().unwrap();
    assert!(root.link("tth0").unwrap().is_none());
}

/// The budget of a CNI ADD: open two sockets, create a veth into the pod
/// namespace, address it, route, bring up; then DEL.
#[test]
fn add_del_sequence_is_fast() {
    let host = TestNs::new();
    let pod = TestNs::new();
    let t0 = Instant::now();
    let nh = Netlink::in_netns(&host.ns).unwrap();
    let np = Netlink::in_netns(&pod.ns).unwrap();
    let t_open = t0.elapsed();
    nh.create_veth("tvfast", "eth0", &pod.ns, Some(1450), None, Some("tern:x")).unwrap();
    let h = nh.link("tvfast").unwrap().unwrap();
    nh.set_up(h.index).unwrap();
    let p = np.link("eth0").unwrap().unwrap();
    np.add_address(p.index, net("10.77.0.5/32"), false).unwrap();
    np.set_up(p.index).unwrap();
    np.add_route(&RouteSpec::new(net("169.254.1.1/32")).dev(p.index).link_scope()).unwrap();
    np.add_route(&RouteSpec::default_route(Family::V4).via(ip("169.254.1.1")).dev(p.index)).unwrap();
    nh.add_route(&RouteSpec::new(net("10.77.0.5/32")).dev(h.index).link_scope()).unwrap();
    let t_add = t0.elapsed();
    assert!(nh.delete_link("tvfast").unwrap());
    let total = t0.elapsed();
    eprintln!("open 2 sockets: {t_open:?}, add: {t_add:?}, add+del: {total:?}");
    assert!(total.as_millis() < 500, "add+del took {total:?}");
}

#[test]
fn neighbours_pinned() {
    let a = TestNs::new();
    let nl = a.nl();
    let d = scratch(&nl, &a, "tnb0");
    let mac = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x01];
    nl.add_neighbour(d.index, ip("169.254.1.1"), mac).unwrap();
    nl.add_neighbour(d.index, ip("169.254.1.1"), mac).unwrap(); // idempotent
    nl.add_neighbour(d.index, ip("fe80::1"), mac).unwrap();
    let n = nl.neighbours(Some(d.index)).unwrap();
    for want in ["169.254.1.1", "fe80::1"] {
        let e = n.iter().find(|x| x.ip == ip(want)).unwrap_or_else(|| panic!("{want} in {n:?}"));
        assert_eq!((e.index, e.mac, e.permanent), (d.index, Some(mac), true));
    }
    assert!(nl.neighbours(None).unwrap().iter().any(|x| x.ip == ip("fe80::1")));
    // Replacing changes the MAC.
    let mac2 = [0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0x02];
    nl.add_neighbour(d.index, ip("169.254.1.1"), mac2).unwrap();
    let n = nl.neighbours(Some(d.index)).unwrap();
    assert!(n.iter().any(|x| x.ip == ip("169.254.1.1") && x.mac == Some(mac2)));

    assert!(nl.del_neighbour(d.index, ip("169.254.1.1")).unwrap());
    assert!(!nl.del_neighbour(d.index, ip("169.254.1.1")).unwrap());
    assert!(nl.del_neighbour(d.index, ip("fe80::1")).unwrap());
    let e = nl.add_neighbour(999_999, ip("169.254.1.1"), mac).unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
}
