//! Traffic control and the link attributes tern-tuning needs, each test in
//! its own namespace. Needs root.

mod common;

use std::process::Command;

use common::TestNs;
use tern_sys::netlink::{INGRESS_HANDLE, TBF_HANDLE, TC_H_INGRESS, TC_H_ROOT};
use tern_sys::{Netlink, Tbf};

fn veth(nl: &Netlink, t: &TestNs, name: &str) -> tern_sys::LinkInfo {
    let peer = format!("{name}p");
    nl.create_veth(name, &peer, &t.ns, None, None, None).unwrap();
    nl.link(name).unwrap().unwrap()
}

/// `tc <args>` inside the namespace, stdout.
fn tc(t: &TestNs, args: &[&str]) -> String {
    let ns = t.path.to_str().unwrap();
    let out = Command::new("nsenter").arg(format!("--net={ns}")).arg("tc").args(args).output().expect("run tc");
    assert!(out.status.success(), "tc {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tbf_ingress_and_redirect() {
    let t = TestNs::new();
    let nl = t.nl();
    let v = veth(&nl, &t, "tcv0");
    let ifb = nl.create_ifb("tcifb0", Some(1400), Some("tern:net/c/eth0")).unwrap();
    assert_eq!(ifb.kind.as_deref(), Some("ifb"));
    assert_eq!(ifb.mtu, 1400);
    assert_eq!(ifb.alias.as_deref(), Some("tern:net/c/eth0"));
    assert!(nl.create_ifb("tcifb0", None, None).unwrap_err().is_exists());

    // No qdisc of ours yet: the root is the default one.
    assert!(nl.qdiscs(v.index).unwrap().iter().all(|q| q.kind != "tbf"));

    let want = Tbf { rate: 3_000_000, burst: 32_768, limit: 107_768 };
    nl.add_root_tbf(v.index, &want).unwrap();
    assert!(nl.add_root_tbf(v.index, &want).unwrap_err().is_exists());
    let qs = nl.qdiscs(v.index).unwrap();
    let root = qs.iter().find(|q| q.is_root()).expect("root qdisc");
    assert_eq!(root.kind, "tbf");
    assert_eq!(root.handle, TBF_HANDLE);
    let got = root.tbf.expect("tbf parameters");
    assert_eq!((got.rate, got.limit), (want.rate, want.limit));
    assert!(got.burst.abs_diff(want.burst) <= 2, "{got:?}");
    let shown = tc(&t, &["qdisc", "show", "dev", "tcv0"]);
    assert!(shown.contains("tbf 1: root") && shown.contains("rate 24Mbit"), "{shown}");

    // A rate above 4 GB/s goes through TCA_TBF_RATE64.
    let big = Tbf { rate: 6_000_000_000, burst: 1_000_000, limit: 2_000_000 };
    nl.add_root_tbf(ifb.index, &big).unwrap();
    let got = nl.qdiscs(ifb.index).unwrap().into_iter().find(|q| q.is_root()).unwrap().tbf.unwrap();
    assert_eq!(got.rate, big.rate);
    nl.delete_qdisc(ifb.index, TC_H_ROOT, TBF_HANDLE).unwrap();

    // Kubernetes asks for 2^31-1 bit buckets: at 1 Mbit/s that is ~2100 s of
    // bucket, whose tick count wraps in the dump; `matches` still agrees.
    let huge = Tbf { rate: 125_000, burst: 268_435_455, limit: 268_438_580 };
    nl.add_root_tbf(ifb.index, &huge).unwrap();
    let q = nl.qdiscs(ifb.index).unwrap().into_iter().find(|q| q.is_root()).unwrap();
    assert!(huge.matches(&q.tbf.unwrap(), q.tbf_buffer.unwrap()), "{q:?}");
    assert!(!Tbf { burst: 1_000_000, ..huge }.matches(&q.tbf.unwrap(), q.tbf_buffer.unwrap()));
    let q = nl.qdiscs(v.index).unwrap().into_iter().find(|q| q.is_root()).unwrap();
    assert!(want.matches(&q.tbf.unwrap(), q.tbf_buffer.unwrap()), "{q:?}");
    assert!(!Tbf { burst: 30_000, ..want }.matches(&q.tbf.unwrap(), q.tbf_buffer.unwrap()));

    assert_eq!(nl.ingress_redirects(v.index).unwrap(), Vec::<u32>::new());
    nl.add_ingress_qdisc(v.index).unwrap();
    assert!(nl.add_ingress_qdisc(v.index).unwrap_err().is_exists());
    nl.add_ingress_redirect(v.index, ifb.index).unwrap();
    assert_eq!(nl.ingress_redirects(v.index).unwrap(), vec![ifb.index]);
    let filters = tc(&t, &["filter", "show", "dev", "tcv0", "ingress"]);
    assert!(filters.contains("Egress Redirect to device tcifb0"), "{filters}");
    assert!(nl.qdiscs(v.index).unwrap().iter().any(|q| q.is_ingress() && q.kind == "ingress"));

    assert!(nl.delete_qdisc(v.index, TC_H_INGRESS, INGRESS_HANDLE).unwrap());
    assert!(!nl.delete_qdisc(v.index, TC_H_INGRESS, INGRESS_HANDLE).unwrap());
    assert!(nl.delete_qdisc(v.index, TC_H_ROOT, TBF_HANDLE).unwrap());
    assert!(!nl.delete_qdisc(v.index, TC_H_ROOT, TBF_HANDLE).unwrap());
    assert!(nl.qdiscs(v.index).unwrap().iter().all(|q| q.kind != "tbf" && !q.is_ingress()));
    assert_eq!(nl.ingress_redirects(v.index).unwrap(), Vec::<u32>::new());
    assert!(!nl.delete_qdisc(9999, TC_H_ROOT, TBF_HANDLE).unwrap());
}

#[test]
fn allmulti_and_txqlen() {
    let t = TestNs::new();
    let nl = t.nl();
    let v = veth(&nl, &t, "tcv1");
    assert!(!v.allmulti);
    assert_eq!(v.txqlen, 1000);
    nl.set_allmulti(v.index, true).unwrap();
    nl.set_txqlen(v.index, 42).unwrap();
    let l = nl.link("tcv1").unwrap().unwrap();
    assert!(l.allmulti);
    assert_eq!(l.txqlen, 42);
    nl.set_allmulti(v.index, false).unwrap();
    assert!(!nl.link("tcv1").unwrap().unwrap().allmulti);
}
