//! The lab's shape as pure data: names and addresses of every namespace,
//! derived from `--nodes`, `--subnets` and `--pods-per-node`.
//!
//! ```text
//!  tern-lab (fabric: the segments' bridges, the router, etcd)
//!   seg1 10.10.1.1/24 ── eth0 of tern-lab-n1 10.10.1.11, tern-lab-n2 10.10.1.12, ...
//!   seg2 10.10.2.1/24 ── eth0 of the nodes of subnet 2
//!   ext0 203.0.113.1/24 ── eth0 of tern-lab-ext 203.0.113.10 (the "external" host)
//!  pods: tern-lab-n1-p1, ... attached by `tern cni` inside their node
//! ```
//!
//! The fabric has no route to the cluster CIDR, so pod traffic reaches the
//! external host only through the node's masquerade.
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};
use tern_routing::{Dataplane, Mode};

/// The default lab's name; others (`tern lab --name X`, used by tests that
/// run side by side) differ only in their namespaces' names and files.
pub const DEFAULT_NAME: &str = "tern-lab";

/// One lab: the name every namespace of it starts with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lab {
    pub name: String,
}

impl Default for Lab {
    fn default() -> Lab {
        Lab { name: DEFAULT_NAME.into() }
    }
}

impl Lab {
    /// Names are short and plain so every derived name stays valid.
    pub fn new(name: &str) -> Result<Lab, String> {
        let ok = !name.is_empty()
            && name.len() <= 16
            && name.starts_with(|c: char| c.is_ascii_lowercase())
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            return Err(format!("lab name {name:?}: 1 to 16 of a-z, 0-9, '-', starting with a letter"));
        }
        Ok(Lab { name: name.into() })
    }

    /// The fabric namespace: segments, router, etcd.
    pub fn fabric(&self) -> String {
        self.name.clone()
    }

    /// The external host's namespace.
    pub fn external(&self) -> String {
        format!("{}-ext", self.name)
    }

    pub fn node_netns(&self, i: u8) -> String {
        format!("{}-n{i}", self.name)
    }

    pub fn pod_netns(&self, node: u8, p: u8) -> String {
        format!("{}-n{node}-p{p}", self.name)
    }

    /// Whether a namespace name belongs to this lab.
    pub fn owns_netns(&self, ns: &str) -> bool {
        ns == self.name
            || ns.strip_prefix(&format!("{}-", self.name)).is_some_and(|rest| {
                rest == "ext"
                    || (rest.starts_with('n') && rest[1..].chars().all(|c| c.is_ascii_digit() || c == '-' || c == 'p'))
            })
    }

    /// The lab's files: state, etcd data, per-node agent sockets, caches, logs.
    pub fn run_dir(&self) -> std::path::PathBuf {
        std::path::PathBuf::from("/run/tern/labs").join(&self.name)
    }
}
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const BLOCK_PREFIX: u8 = 26;
/// The IPv6 pool of a dual-stack lab (`--ipv6`), cut into /122 blocks.
pub const CLUSTER_CIDR6: &str = "fd00:10:244::/56";
pub const BLOCK_PREFIX6: u8 = 122;
pub const ETCD_PORT: u16 = 2379;
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const EXTERNAL_GW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
pub const MAX_NODES: u8 = 200;
pub const MAX_SUBNETS: u8 = 8;
pub const MAX_PODS_PER_NODE: u8 = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabSpec {
    pub nodes: u8,
    pub subnets: u8,
    pub pods_per_node: u8,
    pub routing: Mode,
    /// `ebpf`: pods on tern's eBPF fast path, agents with eBPF host routing.
    #[serde(default)]
    pub dataplane: Dataplane,
    /// Dual stack: pods also get an address of [`CLUSTER_CIDR6`], carried
    /// between nodes over VXLAN (the underlay is IPv4).
    #[serde(default)]
    pub ipv6: bool,
}

impl LabSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.nodes == 0 || self.nodes > MAX_NODES {
            return Err(format!("--nodes {}: expected 1 to {MAX_NODES}", self.nodes));
        }
        if self.subnets == 0 || self.subnets > MAX_SUBNETS {
            return Err(format!("--subnets {}: expected 1 to {MAX_SUBNETS}", self.subnets));
        }
        if self.subnets > self.nodes {
            return Err(format!("--subnets {} is more than --nodes {}", self.subnets, self.nodes));
        }
        if self.pods_per_node > MAX_PODS_PER_NODE {
            return Err(format!("--pods-per-node {}: at most {MAX_PODS_PER_NODE}", self.pods_per_node));
        }
        if self.ipv6 && self.routing != Mode::Vxlan {
            return Err(format!(
                "--ipv6 needs --routing vxlan, not {}: the lab's underlay is IPv4, so direct routes cannot carry \
                 IPv6 blocks",
                self.routing
            ));
        }
        Ok(())
    }
}

/// The subnet (1-based) node `i` (1-based) sits on: nodes are split into
/// `subnets` contiguous groups, so with 3 nodes and 2 subnets n1 and n2
/// share subnet 1 and n3 is alone behind the router.
pub fn subnet_of(spec: &LabSpec, i: u8) -> u8 {
    let per = spec.nodes.div_ceil(spec.subnets);
    ((i - 1) / per + 1).min(spec.subnets)
}

pub fn node_name(i: u8) -> String {
    format!("n{i}")
}

pub fn pod_name(node: u8, p: u8) -> String {
    format!("n{node}-p{p}")
}

/// The router's address on subnet `s`.
pub fn gateway(s: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 10, s, 1)
}

pub fn subnet(s: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 10, s, 0), 24).expect("/24")
}

/// Node `i`'s underlay address (`10.10.<subnet>.<10+i>`).
pub fn node_ip(spec: &LabSpec, i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 10, subnet_of(spec, i), 10u8.saturating_add(i))
}

/// Where etcd listens: the router's leg on subnet 1, reachable from every
/// node over the lab's underlay.
pub fn etcd_url() -> String {
    format!("http://{}:{ETCD_PORT}", gateway(1))
}

pub fn cluster_cidr() -> IpNet {
    CLUSTER_CIDR.parse().expect("cluster CIDR")
}

pub fn cluster_cidr6() -> IpNet {
    CLUSTER_CIDR6.parse().expect("cluster CIDR")
}

/// Whether `ip` is a lab address (the underlay, the external segment or
/// the cluster CIDR): the lab only ever sends to these.
pub fn is_lab_address(ip: IpAddr) -> bool {
    let IpAddr::V4(v) = ip else { return cluster_cidr6().contains(&ip) };
    let o = v.octets();
    (o[0] == 10 && o[1] == 10) || (o[0] == 203 && o[1] == 0 && o[2] == 113) || cluster_cidr().contains(&ip)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nodes: u8, subnets: u8) -> LabSpec {
        LabSpec { nodes, subnets, pods_per_node: 2, routing: Mode::Auto, dataplane: Dataplane::Kernel, ipv6: false }
    }

    #[test]
    fn nodes_split_into_contiguous_subnets() {
        let s = spec(3, 2);
        assert_eq!((1..=3).map(|i| subnet_of(&s, i)).collect::<Vec<_>>(), vec![1, 1, 2]);
        let s = spec(4, 2);
        assert_eq!((1..=4).map(|i| subnet_of(&s, i)).collect::<Vec<_>>(), vec![1, 1, 2, 2]);
        let s = spec(3, 1);
        assert!((1..=3).all(|i| subnet_of(&s, i) == 1));
        assert_eq!(node_ip(&spec(3, 2), 3), Ipv4Addr::new(10, 10, 2, 13));
        // A fourth node added to a 3-node, 2-subnet lab lands on the last subnet.
        assert_eq!(subnet_of(&spec(3, 2), 4), 2);
    }

    #[test]
    fn validation_names_the_flag() {
        assert!(spec(0, 1).validate().unwrap_err().contains("--nodes"));
        assert!(spec(2, 3).validate().unwrap_err().contains("--subnets"));
        assert!(LabSpec { pods_per_node: 99, ..spec(2, 1) }.validate().unwrap_err().contains("--pods-per-node"));
        assert!(LabSpec { ipv6: true, ..spec(2, 1) }.validate().unwrap_err().contains("--routing vxlan"));
        assert!(LabSpec { ipv6: true, routing: Mode::Vxlan, ..spec(2, 1) }.validate().is_ok());
        assert!(is_lab_address("fd00:10:244:1::5".parse().unwrap()) && !is_lab_address("fd00:1::5".parse().unwrap()));
        assert!(spec(3, 2).validate().is_ok());
    }

    #[test]
    fn lab_addresses_only() {
        assert!(is_lab_address("10.10.2.13".parse().unwrap()));
        assert!(is_lab_address("10.244.3.7".parse().unwrap()));
        assert!(is_lab_address(EXTERNAL_IP.into()));
        assert!(!is_lab_address("8.8.8.8".parse().unwrap()));
        assert!(!is_lab_address("10.11.0.1".parse().unwrap()));
        let lab = Lab::default();
        assert_eq!(lab.node_netns(2), "tern-lab-n2");
        assert_eq!(lab.pod_netns(2, 1), "tern-lab-n2-p1");
        assert!(lab.owns_netns("tern-lab") && lab.owns_netns("tern-lab-n2-p1") && lab.owns_netns("tern-lab-ext"));
        assert!(!lab.owns_netns("tern-labx") && !lab.owns_netns("tern-lab-other"));
        assert!(Lab::new("t1-x").is_ok());
        assert!(Lab::new("Bad").is_err() && Lab::new("").is_err() && Lab::new("a/b").is_err());
    }
}
