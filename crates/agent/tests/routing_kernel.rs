//! Cross-node routing on real kernels: three node namespaces (A and B on one
//! subnet, C behind a router on another), each with one pod namespace, and
//! tern's Router programming VXLAN and direct routes between them.
use std::net::IpAddr;

use tern_agent::routing::{Dataplane, Router, RoutingConfig, VXLAN_DEVICE};
use tern_routing::{Mode, NodeView, Vtep};
use tern_testkit::Netns;

struct Node {
    ns: Netns,
    pod: Netns,
    name: &'static str,
    n: u8,
}

/// A router namespace with two bridged segments, three nodes and a pod each.
struct Cluster {
    _router: Netns,
    nodes: Vec<Node>,
}

fn cluster() -> Cluster {
    let router = Netns::new("trt");
    router.ok("sysctl -qw net.ipv4.ip_forward=1
         ip link add br1 type bridge && ip link set br1 up && ip addr add 192.168.1.1/24 dev br1
         ip link add br2 type bridge && ip link set br2 up && ip addr add 192.168.2.1/24 dev br2");
    let mut nodes = Vec::new();
    for (name, n, seg, host) in [("a", 1u8, 1u8, 11u8), ("b", 2, 1, 12), ("c", 3, 2, 13)] {
        let ns = Netns::new(&format!("tnode{name}"));
        let pod = Netns::new(&format!("tpod{name}"));
        router.ok(&format!(
            "ip link add n{name} type veth peer name eth0 netns {node}
             ip link set n{name} master br{seg} up",
            node = ns.name()
        ));
        ns.ok(&format!(
            "sysctl -qw net.ipv4.ip_forward=1
             ip link set eth0 up && ip addr add 192.168.{seg}.{host}/24 dev eth0
             ip route add default via 192.168.{seg}.1
             ip link add p0 type veth peer name eth0 netns {pod}
             ip link set p0 up && sysctl -qw net.ipv4.conf.p0.proxy_arp=1
             ip route add 10.244.{n}.10/32 dev p0
             ip route add 10.99.0.0/24 via 192.168.{seg}.1",
            pod = pod.name()
        ));
        pod.ok(&format!(
            "ip link set eth0 up && ip addr add 10.244.{n}.10/32 dev eth0 && ip route add default dev eth0"
        ));
        nodes.push(Node { ns, pod, name, n });
    }
    Cluster { _router: router, nodes }
}

fn router(node: &Node, mode: Mode) -> Router {
    node.ns.enter(|| Router::new(node.name, RoutingConfig::new(mode, "eth0")).expect("router"))
}

fn block(n: u8) -> ipnet::IpNet {
    format!("10.244.{n}.0/24").parse().unwrap()
}

fn vtep_ip(n: u8) -> IpAddr {
    format!("10.244.{n}.0").parse().unwrap()
}

/// Every node's view, with a VTEP from `ensure_vtep` on each router.
fn views(nodes: &[Node], routers: &mut [Router]) -> Vec<NodeView> {
    nodes
        .iter()
        .zip(routers.iter_mut())
        .map(|(node, r)| {
            let vtep: Option<Vtep> =
                if r.wants_vxlan() { Some(r.ensure_vtep(&[vtep_ip(node.n)]).unwrap()) } else { None };
            NodeView { name: node.name.into(), underlay: r.underlay(), vtep, blocks: vec![block(node.n)] }
        })
        .collect()
}

fn reconcile_all(nodes: &[Node], routers: &mut [Router], views: &[NodeView]) {
    for (i, r) in routers.iter_mut().enumerate() {
        let rep = r.reconcile(&views[i], views).unwrap();
        assert!(rep.failed.is_empty(), "node {}: {:?}", nodes[i].name, rep.failed);
    }
}

fn ping(from: &Node, to: &Node) -> bool {
    from.pod.sh(&format!("ping -c1 -W2 10.244.{}.10", to.n)).status.success()
}

fn route_line(node: &Node, dst: &str) -> String {
    node.ns.ok(&format!("ip route show {dst}")).trim().to_string()
}

#[test]
fn auto_is_direct_on_the_subnet_and_vxlan_across_then_converges_and_cleans_up() {
    let c = cluster();
    let (a, b, cc) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);
    let mut routers: Vec<Router> = c.nodes.iter().map(|n| router(n, Mode::Auto)).collect();
    let v = views(&c.nodes, &mut routers);
    reconcile_all(&c.nodes, &mut routers, &v);

    // Kernel state on A: B's block direct over the underlay, C's over VXLAN.
    let to_b = route_line(a, "10.244.2.0/24");
    assert!(to_b.contains("via 192.168.1.12 dev eth0") && to_b.contains("proto 84"), "{to_b}");
    let to_c = route_line(a, "10.244.3.0/24");
    assert!(to_c.contains(&format!("via 10.244.3.0 dev {VXLAN_DEVICE}")) && to_c.contains("onlink"), "{to_c}");
    let fdb = a.ns.ok(&format!("bridge fdb show dev {VXLAN_DEVICE}"));
    assert!(fdb.contains("dst 192.168.2.13") && !fdb.contains("192.168.1.12"), "{fdb}");
    let vx = a.ns.ok(&format!("ip -d link show {VXLAN_DEVICE}"));
    assert!(vx.contains("vxlan id 1") && vx.contains("dstport 8472") && vx.contains("nolearning"), "{vx}");
    assert!(vx.contains("mtu 1450"), "underlay 1500 minus 50: {vx}");

    // And by traffic, both ways.
    for (x, y) in [(a, b), (a, cc), (b, cc), (cc, a)] {
        assert!(ping(x, y), "pod {} -> pod {}", x.name, y.name);
    }

    // Converged: a second pass and a fresh router (an agent restart) change nothing.
    let rep = routers[0].reconcile(&v[0], &v).unwrap();
    assert_eq!((rep.added, rep.removed), (0, 0));
    let mut again = router(a, Mode::Auto);
    again.ensure_vtep(&[vtep_ip(1)]).unwrap();
    let rep = again.reconcile(&v[0], &v).unwrap();
    assert_eq!((rep.added, rep.removed), (0, 0), "{rep:?}");

    // C leaves: exactly its route, neighbour and FDB entry go from A.
    let without_c = &v[..2];
    let rep = routers[0].reconcile(&v[0], without_c).unwrap();
    assert_eq!((rep.added, rep.removed), (0, 3), "{rep:?}");
    assert_eq!(route_line(a, "10.244.3.0/24"), "");
    assert!(!a.ns.ok(&format!("bridge fdb show dev {VXLAN_DEVICE}")).contains("192.168.2.13"));
    assert!(!a.ns.ok(&format!("ip neigh show dev {VXLAN_DEVICE}")).contains("10.244.3.0"));
    assert!(ping(a, b));

    // Teardown removes tern's entries and device, and nothing else.
    for r in &mut routers {
        r.teardown().unwrap();
    }
    for n in &c.nodes {
        assert_eq!(n.ns.ok("ip route show proto 84").trim(), "", "node {}", n.name);
        assert!(!n.ns.sh(&format!("ip link show {VXLAN_DEVICE}")).status.success(), "device gone on {}", n.name);
        assert!(route_line(n, "10.99.0.0/24").contains("via"), "foreign route kept on {}", n.name);
        assert!(route_line(n, &format!("10.244.{}.10", n.n)).contains("dev p0"), "pod route kept");
    }
}

#[test]
fn vxlan_everywhere_and_direct_refuses_the_far_subnet() {
    let c = cluster();
    let (a, b, cc) = (&c.nodes[0], &c.nodes[1], &c.nodes[2]);
    let mut routers: Vec<Router> = c.nodes.iter().map(|n| router(n, Mode::Vxlan)).collect();
    let v = views(&c.nodes, &mut routers);
    reconcile_all(&c.nodes, &mut routers, &v);
    assert!(route_line(a, "10.244.2.0/24").contains(VXLAN_DEVICE));
    for (x, y) in [(a, b), (a, cc), (cc, b)] {
        assert!(ping(x, y), "vxlan: pod {} -> pod {}", x.name, y.name);
    }

    // Switching A and B to direct: B's route is replaced, C is reported, not black-holed.
    let mut direct: Vec<Router> = c.nodes[..2].iter().map(|n| router(n, Mode::Direct)).collect();
    let mut dv = v.clone();
    dv[0].vtep = None;
    dv[1].vtep = None;
    for (i, r) in direct.iter_mut().enumerate() {
        let rep = r.reconcile(&dv[i], &dv).unwrap();
        assert!(rep.failed.is_empty(), "{:?}", rep.failed);
        assert_eq!(rep.unroutable.len(), 1, "{:?}", rep.unroutable);
        assert!(rep.unroutable[0].contains("node c") && rep.unroutable[0].contains("192.168.1.0/24"));
    }
    assert!(route_line(a, "10.244.2.0/24").contains("via 192.168.1.12 dev eth0"));
    assert_eq!(route_line(a, "10.244.3.0/24"), "", "no route to the unroutable node");
    assert!(ping(a, b));
    for r in direct.iter_mut().chain(routers.iter_mut()) {
        r.teardown().unwrap();
    }
}

#[test]
fn ebpf_host_routing_is_programmed_repaired_and_torn_down() {
    let c = cluster();
    let a = &c.nodes[0];
    let mut cfg = RoutingConfig::new(Mode::Auto, "eth0");
    cfg.dataplane = Dataplane::Ebpf;
    let mut r = a.ns.enter(|| Router::new(a.name, cfg).expect("router"));
    let vtep = a.ns.enter(|| r.ensure_vtep(&[vtep_ip(1)]).unwrap());
    a.ns.enter(|| r.enable_host_routing(&["10.244.0.0/16".parse().unwrap()]).unwrap());
    let filters = |dev: &str| {
        a.ns.ok(&format!("tc filter show dev {dev} ingress")).lines().filter(|l| l.contains("tern_uplink")).count()
    };
    let uplinks = |r: &Router| {
        let mut names: Vec<String> =
            a.ns.enter(|| r.host_routing_uplinks().unwrap()).into_iter().map(|u| u.0).collect();
        names.sort();
        names
    };
    assert_eq!((filters("eth0"), filters(VXLAN_DEVICE)), (1, 1));
    assert_eq!(uplinks(&r), ["eth0", VXLAN_DEVICE]);

    // Every reconcile re-applies it: still one filter per uplink.
    let v = NodeView { name: a.name.into(), underlay: r.underlay(), vtep: Some(vtep), blocks: vec![block(1)] };
    for _ in 0..2 {
        let rep = a.ns.enter(|| r.reconcile(&v, std::slice::from_ref(&v)).unwrap());
        assert!(rep.failed.is_empty(), "{:?}", rep.failed);
    }
    assert_eq!((filters("eth0"), filters(VXLAN_DEVICE)), (1, 1));

    // The VXLAN device re-created behind the agent's back: the next
    // reconcile serves the new device and forgets the old one.
    let old = a.ns.ok(&format!("cat /sys/class/net/{VXLAN_DEVICE}/ifindex"));
    a.ns.ok(&format!("ip link del {VXLAN_DEVICE}"));
    a.ns.enter(|| r.ensure_vtep(&[vtep_ip(1)]).unwrap());
    let rep = a.ns.enter(|| r.reconcile(&v, std::slice::from_ref(&v)).unwrap());
    assert!(rep.failed.is_empty(), "{:?}", rep.failed);
    assert_ne!(a.ns.ok(&format!("cat /sys/class/net/{VXLAN_DEVICE}/ifindex")), old);
    assert_eq!((filters("eth0"), filters(VXLAN_DEVICE)), (1, 1));
    assert_eq!(uplinks(&r), ["eth0", VXLAN_DEVICE]);

    // An agent restarted with the kernel dataplane turns host routing off.
    let mut kernel = a.ns.enter(|| Router::new(a.name, RoutingConfig::new(Mode::Auto, "eth0")).expect("router"));
    a.ns.enter(|| kernel.enable_host_routing(&["10.244.0.0/16".parse().unwrap()]).unwrap());
    assert_eq!((filters("eth0"), filters(VXLAN_DEVICE)), (0, 0));
    let left = a.ns.enter(|| tern_bpf::FastPath::open_existing().unwrap().unwrap().uplinks().unwrap());
    assert!(left.is_empty(), "{left:?}");

    // Teardown detaches the uplink program and empties the maps; the
    // underlay keeps its clsact (other filters may use it).
    a.ns.enter(|| r.enable_host_routing(&["10.244.0.0/16".parse().unwrap()]).unwrap());
    assert_eq!((filters("eth0"), filters(VXLAN_DEVICE)), (1, 1));
    a.ns.enter(|| r.teardown().unwrap());
    assert_eq!(filters("eth0"), 0);
    let left = a.ns.enter(|| tern_bpf::FastPath::open_existing().unwrap().unwrap().uplinks().unwrap());
    assert!(left.is_empty(), "{left:?}");
    a.ns.enter(|| tern_bpf::unpin_current_netns().unwrap());
}
