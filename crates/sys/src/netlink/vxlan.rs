//! VXLAN devices and their forwarding database (`ip link add type vxlan`,
//! `bridge fdb`), for tern's cross-node overlay.
//!
//! tern's VXLAN device runs with learning off: every remote tunnel endpoint
//! is an explicit FDB entry (`<vtep mac> dst <underlay ip>`) next to a
//! permanent neighbour, both programmed by the agent from the datastore, so
//! nothing is flooded and nothing is learnt from the wire.
use std::net::IpAddr;

use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST};
use rtnetlink::packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo as NlLinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::RouteType;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::{check_ifname, format_mac, KernelError, LinkInfo, Mac, Netlink};
use crate::error::{Result, SysError};

/// A VXLAN device to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanSpec {
    pub name: String,
    pub vni: u32,
    /// UDP destination (and listening) port.
    pub port: u16,
    /// The underlay address outer packets leave from.
    pub local: IpAddr,
    /// The underlay link (`dev`), so the device follows that link.
    pub underlay_index: Option<u32>,
    pub mtu: Option<u32>,
    pub mac: Option<Mac>,
}

/// A VXLAN device's settings as the kernel reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanInfo {
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub local: Option<IpAddr>,
    pub underlay_index: Option<u32>,
    pub learning: Option<bool>,
}

/// One entry of a device's forwarding database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdbEntry {
    pub index: u32,
    pub mac: Mac,
    /// `dst`: the remote tunnel endpoint (VXLAN entries only).
    pub dst: Option<IpAddr>,
    pub permanent: bool,
}

fn fdb_msg(index: u32, mac: Mac, dst: Option<IpAddr>) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Bridge;
    m.header.ifindex = index;
    m.header.kind = RouteType::Unspec;
    // NTF_SELF: the entry belongs to the VXLAN device itself, not to a
    // bridge it is a port of.
    m.header.flags = NeighbourFlags::Own;
    m.attributes.push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    if let Some(ip) = dst {
        m.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(v) => NeighbourAddress::Inet(v),
            IpAddr::V6(v) => NeighbourAddress::Inet6(v),
        }));
    }
    m
}

impl VxlanInfo {
    pub(crate) fn from_infos(infos: &[InfoVxlan]) -> VxlanInfo {
        let mut v = VxlanInfo { vni: None, port: None, local: None, underlay_index: None, learning: None };
        for i in infos {
            match i {
                InfoVxlan::Id(id) => v.vni = Some(*id),
                InfoVxlan::Port(p) => v.port = Some(*p),
                InfoVxlan::Local(a) => v.local = Some(IpAddr::V4(*a)),
                InfoVxlan::Local6(a) => v.local = Some(IpAddr::V6(*a)),
                InfoVxlan::Link(l) if *l != 0 => v.underlay_index = Some(*l),
                InfoVxlan::Learning(l) => v.learning = Some(*l),
                _ => {}
            }
        }
        v
    }
}

impl Netlink {
    /// `ip link add NAME type vxlan id VNI dstport PORT local IP [dev UNDERLAY] nolearning`
    /// (down). [`SysError::Exists`] if a link of that name exists.
    pub fn create_vxlan(&self, spec: &VxlanSpec) -> Result<LinkInfo> {
        check_ifname(&spec.name)?;
        let mut data = vec![InfoVxlan::Id(spec.vni), InfoVxlan::Port(spec.port), InfoVxlan::Learning(false)];
        match spec.local {
            IpAddr::V4(a) => data.push(InfoVxlan::Local(a)),
            IpAddr::V6(a) => data.push(InfoVxlan::Local6(a)),
        }
        if let Some(i) = spec.underlay_index {
            data.push(InfoVxlan::Link(i));
        }
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(spec.name.clone()));
        if let Some(mtu) = spec.mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(mac) = spec.mac {
            m.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            NlLinkInfo::Kind(InfoKind::Vxlan),
            NlLinkInfo::Data(InfoData::Vxlan(data)),
        ]));
        let what = format!("create vxlan {:?} (vni {}, port {}, local {})", spec.name, spec.vni, spec.port, spec.local);
        match self.request(RouteNetlinkMessage::NewLink(m), NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL) {
            Ok(_) => {}
            Err(KernelError { errno: libc::EEXIST, .. }) => {
                return Err(SysError::Exists(format!(
                    "link {:?} (or another vxlan with vni {} and port {})",
                    spec.name, spec.vni, spec.port
                )))
            }
            Err(e) => return Err(e.into_sys(what)),
        }
        self.link(&spec.name)?
            .ok_or_else(|| SysError::NotFound(format!("link {:?} right after creating it", spec.name)))
    }

    /// `bridge fdb replace MAC dev INDEX dst DST self permanent`. Idempotent.
    pub fn add_fdb(&self, index: u32, mac: Mac, dst: IpAddr) -> Result<()> {
        let mut m = fdb_msg(index, mac, Some(dst));
        m.header.state = NeighbourState::Permanent;
        let flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE;
        match self.request(RouteNetlinkMessage::NewNeighbour(m), flags) {
            Ok(_) => Ok(()),
            Err(KernelError { errno: libc::ENODEV, .. }) => Err(SysError::NotFound(format!("link index {index}"))),
            Err(e) => Err(e.into_sys(format!("add fdb {} dst {dst} on link index {index}", format_mac(&mac)))),
        }
    }

    /// `bridge fdb del MAC dev INDEX dst DST self`; `false` if there was no
    /// such entry.
    pub fn del_fdb(&self, index: u32, mac: Mac, dst: IpAddr) -> Result<bool> {
        let m = fdb_msg(index, mac, Some(dst));
        match self.request(RouteNetlinkMessage::DelNeighbour(m), NLM_F_REQUEST | NLM_F_ACK) {
            Ok(_) => Ok(true),
            Err(KernelError { errno: libc::ENOENT | libc::ENODEV, .. }) => Ok(false),
            Err(e) => Err(e.into_sys(format!("delete fdb {} dst {dst} on link index {index}", format_mac(&mac)))),
        }
    }

    /// The FDB entries of one device (`bridge fdb show dev X`).
    pub fn fdb(&self, index: u32) -> Result<Vec<FdbEntry>> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.attributes.push(NeighbourAttribute::IfIndex(index));
        let msgs = match self.dump(RouteNetlinkMessage::GetNeighbour(m)) {
            Ok(v) => v,
            Err(KernelError { errno: libc::ENODEV, .. }) => {
                return Err(SysError::NotFound(format!("link index {index}")))
            }
            Err(e) => return Err(e.into_sys("dump fdb")),
        };
        let mut out = Vec::new();
        for msg in msgs {
            let RouteNetlinkMessage::NewNeighbour(n) = msg else { continue };
            if n.header.ifindex != index {
                continue;
            }
            let mut mac = None;
            let mut dst = None;
            for a in &n.attributes {
                match a {
                    NeighbourAttribute::LinkLayerAddress(b) => mac = <Mac>::try_from(b.as_slice()).ok(),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(v)) => dst = Some(IpAddr::V4(*v)),
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(v)) => dst = Some(IpAddr::V6(*v)),
                    // AF_BRIDGE messages carry NDA_DST as raw bytes.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                        dst = match b.len() {
                            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
                            _ => None,
                        }
                    }
                    _ => {}
                }
            }
            if let Some(mac) = mac {
                out.push(FdbEntry { index, mac, dst, permanent: n.header.state == NeighbourState::Permanent });
            }
        }
        Ok(out)
    }
}
