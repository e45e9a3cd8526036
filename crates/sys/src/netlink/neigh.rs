//! Neighbours (`ip neigh`): ARP / NDP entries.

use std::net::IpAddr;

use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState};
use rtnetlink::packet_route::route::RouteType;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::{format_mac, KernelError, Mac, Netlink};
use crate::error::{Result, SysError};

/// A neighbour entry as read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NeighbourInfo {
    pub index: u32,
    pub ip: IpAddr,
    pub mac: Option<Mac>,
    /// `NUD_PERMANENT`
    pub permanent: bool,
}

fn neigh_msg(index: u32, ip: IpAddr) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.ifindex = index;
    m.header.kind = RouteType::Unspec;
    let (family, addr) = match ip {
        IpAddr::V4(v) => (AddressFamily::Inet, NeighbourAddress::Inet(v)),
        IpAddr::V6(v) => (AddressFamily::Inet6, NeighbourAddress::Inet6(v)),
    };
    m.header.family = family;
    m.attributes.push(NeighbourAttribute::Destination(addr));
    m
}

impl Netlink {
    /// `ip neigh replace <ip> lladdr <mac> dev <index> nud permanent`: pin a
    /// neighbour. Idempotent (replaces an existing entry for `ip`).
    pub fn add_neighbour(&self, index: u32, ip: IpAddr, mac: Mac) -> Result<()> {
        let mut m = neigh_msg(index, ip);
        m.header.state = NeighbourState::Permanent;
        m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        match self.request(RouteNetlinkMessage::NewNeighbour(m), flags) {
            Ok(_) => Ok(()),
            Err(KernelError { errno: libc::ENODEV, .. }) => Err(SysError::NotFound(format!("link index {index}"))),
            Err(e) => Err(e.into_sys(format!("add neighbour {ip} lladdr {} on link index {index}", format_mac(&mac)))),
        }
    }

    /// `ip neigh del <ip> dev <index>`; `false` if there was no entry.
    pub fn del_neighbour(&self, index: u32, ip: IpAddr) -> Result<bool> {
        let m = neigh_msg(index, ip);
        match self.request(RouteNetlinkMessage::DelNeighbour(m), NLM_F_REQUEST | NLM_F_ACK) {
            Ok(_) => Ok(true),
            Err(KernelError { errno: libc::ENOENT | libc::ENODEV, .. }) => Ok(false),
            Err(e) => Err(e.into_sys(format!("delete neighbour {ip} on link index {index}"))),
        }
    }

    /// IPv4 and IPv6 neighbour entries, of one link or of all.
    pub fn neighbours(&self, index: Option<u32>) -> Result<Vec<NeighbourInfo>> {
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut m = NeighbourMessage::default();
            m.header.family = family;
            if let Some(i) = index {
                // Strict dumps filter on NDA_IFINDEX (the header's must be 0).
                m.attributes.push(NeighbourAttribute::IfIndex(i));
            }
            let v = match self.dump(RouteNetlinkMessage::GetNeighbour(m)) {
                Ok(v) => v,
                Err(KernelError { errno: libc::ENODEV, .. }) if index.is_some() => {
                    return Err(SysError::NotFound(format!("link index {}", index.unwrap_or(0))))
                }
                Err(e) => return Err(e.into_sys("dump neighbours")),
            };
            for msg in v {
                let RouteNetlinkMessage::NewNeighbour(n) = msg else { continue };
                if index.is_some_and(|i| i != n.header.ifindex) {
                    continue;
                }
                let mut ip = None;
                let mut mac = None;
                for a in &n.attributes {
                    match a {
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => ip = Some(IpAddr::V4(*v)),
                        NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => ip = Some(IpAddr::V6(*v)),
                        NeighbourAttribute::LinkLayerAddress(b) => mac = <Mac>::try_from(b.as_slice()).ok(),
                        _ => {}
                    }
                }
                if let Some(ip) = ip {
                    out.push(NeighbourInfo {
                        index: n.header.ifindex,
                        ip,
                        mac,
                        permanent: n.header.state == NeighbourState::Permanent,
                    });
                }
            }
        }
        Ok(out)
    }
}
