//! Addresses (`ip address`).

use std::net::IpAddr;

use ipnet::IpNet;
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use rtnetlink::packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::{KernelError, Netlink};
use crate::error::{Result, SysError};

fn addr_obj(index: u32, addr: &IpNet) -> String {
    format!("address {addr} on link index {index}")
}

/// The request message for `addr` on `index` (without flags).
fn addr_msg(index: u32, addr: &IpNet) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.index = index;
    m.header.prefix_len = addr.prefix_len();
    match addr {
        IpNet::V4(n) => {
            m.header.family = AddressFamily::Inet;
            let ip = n.addr();
            m.header.scope = if ip.is_loopback() { AddressScope::Host } else { AddressScope::Universe };
            m.attributes.push(AddressAttribute::Local(IpAddr::V4(ip)));
            m.attributes.push(AddressAttribute::Address(IpAddr::V4(ip)));
        }
        IpNet::V6(n) => {
            m.header.family = AddressFamily::Inet6;
            m.attributes.push(AddressAttribute::Address(IpAddr::V6(n.addr())));
        }
    }
    m
}

impl Netlink {
    /// Addresses as `(ifindex, address/prefix)`, of one link or of all links.
    /// IPv4 and IPv6; [`SysError::NotFound`] if `index` does not exist.
    pub fn addresses(&self, index: Option<u32>) -> Result<Vec<(u32, IpNet)>> {
        let mut m = AddressMessage::default();
        if let Some(i) = index {
            // Filtered by the kernel (the socket uses strict checking).
            m.header.index = i;
        }
        let v = match self.dump(RouteNetlinkMessage::GetAddress(m)) {
            Ok(v) => v,
            Err(KernelError { errno: libc::ENODEV, .. }) if index.is_some() => {
                return Err(SysError::NotFound(format!("link index {}", index.unwrap_or(0))))
            }
            Err(e) => {
                return Err(e.into_sys(match index {
                    Some(i) => format!("dump addresses of link index {i}"),
                    None => "dump addresses".to_string(),
                }))
            }
        };
        let mut out = Vec::new();
        for msg in v {
            let RouteNetlinkMessage::NewAddress(a) = msg else {
                continue;
            };
            if index.is_some_and(|i| i != a.header.index) {
                continue;
            }
            let mut local = None;
            let mut address = None;
            for attr in &a.attributes {
                match attr {
                    AddressAttribute::Local(ip) => local = Some(*ip),
                    AddressAttribute::Address(ip) => address = Some(*ip),
                    _ => {}
                }
            }
            // IFA_LOCAL is the local address; IFA_ADDRESS is the peer on
            // point-to-point links (and equals IFA_LOCAL otherwise).
            let Some(ip) = local.or(address) else {
                continue;
            };
            let ok_family = matches!(
                (a.header.family, ip),
                (AddressFamily::Inet, IpAddr::V4(_)) | (AddressFamily::Inet6, IpAddr::V6(_))
            );
            if !ok_family {
                continue;
            }
            if let Ok(net) = IpNet::new(ip, a.header.prefix_len) {
                out.push((a.header.index, net));
            }
        }
        Ok(out)
    }

    /// `ip address add <addr> dev <index> [nodad]`. For IPv4 the broadcast
    /// address is set as `ip ... brd +` would. [`SysError::Exists`] if the
    /// address is already there.
    pub fn add_address(&self, index: u32, addr: IpNet, nodad: bool) -> Result<()> {
        let mut m = addr_msg(index, &addr);
        if let IpNet::V4(n) = addr {
            if n.prefix_len() < 31 {
                m.attributes.push(AddressAttribute::Broadcast(n.broadcast()));
            }
        }
        if nodad {
            m.header.flags = AddressHeaderFlags::Nodad;
            m.attributes.push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        match self.request(RouteNetlinkMessage::NewAddress(m), flags) {
            Ok(_) => Ok(()),
            Err(KernelError { errno: libc::EEXIST, .. }) => Err(SysError::Exists(addr_obj(index, &addr))),
            Err(KernelError { errno: libc::ENODEV, .. }) => Err(SysError::NotFound(format!("link index {index}"))),
            Err(e) => Err(e.into_sys(format!("add {}", addr_obj(index, &addr)))),
        }
    }

    /// `ip address del <addr> dev <index>`; `false` if the address (or the
    /// link) was not there. The prefix length must match.
    pub fn del_address(&self, index: u32, addr: IpNet) -> Result<bool> {
        let m = addr_msg(index, &addr);
        match self.request(RouteNetlinkMessage::DelAddress(m), NLM_F_REQUEST | NLM_F_ACK) {
            Ok(_) => Ok(true),
            Err(KernelError { errno: libc::EADDRNOTAVAIL | libc::ENODEV | libc::ENOENT, .. }) => Ok(false),
            Err(e) => Err(e.into_sys(format!("delete {}", addr_obj(index, &addr)))),
        }
    }
}
