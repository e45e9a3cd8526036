//! Links (`ip link`).

use std::os::fd::AsRawFd;

use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use rtnetlink::packet_route::link::{
    InfoBridgePort, InfoData, InfoKind, InfoPortData, InfoPortKind, InfoVeth, LinkAttribute, LinkExtentMask, LinkFlags,
    LinkInfo as NlLinkInfo, LinkMessage,
};
use rtnetlink::packet_route::RouteNetlinkMessage;

use super::{check_ifname, valid_ifname, KernelError, Mac, Netlink};
use crate::error::{Result, SysError};
use crate::netns::NetNs;

/// A network interface as reported by `RTM_GETLINK`.
#[derive(Debug, Clone)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    /// `IFLA_INFO_KIND`: "veth", "bridge", "dummy", ...; `None` for physical
    /// devices and loopback.
    pub kind: Option<String>,
    pub mac: Option<Mac>,
    pub mtu: u32,
    /// Index of the master (bridge, bond, vrf) this link is enslaved to.
    pub master: Option<u32>,
    /// `IFF_UP` (administratively up).
    pub up: bool,
    /// `IFF_PROMISC`.
    pub promisc: bool,
    /// For a veth: the peer's ifindex (`IFLA_LINK`). When the peer lives in
    /// another namespace this index is in *that* namespace.
    pub peer_index: Option<u32>,
    /// When the link is a bridge port: its hairpin mode (`IFLA_BRPORT_MODE`).
    pub hairpin: Option<bool>,
    /// `IFLA_IFALIAS` (`ip link set dev X alias Y`), used to tag links.
    pub alias: Option<String>,
    /// `IFF_ALLMULTI` as set by the user (`ip link set dev X allmulticast on`).
    pub allmulti: bool,
    /// `IFLA_TXQLEN` (`ip link set dev X txqueuelen N`).
    pub txqlen: u32,
    /// For a VXLAN device: its settings.
    pub vxlan: Option<super::VxlanInfo>,
}

impl LinkInfo {
    pub(crate) fn from_msg(m: &LinkMessage) -> LinkInfo {
        let mut li = LinkInfo {
            index: m.header.index,
            name: String::new(),
            kind: None,
            mac: None,
            mtu: 0,
            master: None,
            up: m.header.flags.contains(LinkFlags::Up),
            promisc: m.header.flags.contains(LinkFlags::Promisc),
            peer_index: None,
            hairpin: None,
            alias: None,
            allmulti: m.header.flags.contains(LinkFlags::Allmulti),
            txqlen: 0,
            vxlan: None,
        };
        let mut link = None;
        for a in &m.attributes {
            match a {
                LinkAttribute::IfName(n) => li.name = n.clone(),
                LinkAttribute::Address(b) => li.mac = <Mac>::try_from(b.as_slice()).ok(),
                LinkAttribute::Mtu(v) => li.mtu = *v,
                LinkAttribute::Controller(v) if *v != 0 => li.master = Some(*v),
                LinkAttribute::Link(v) => link = Some(*v),
                LinkAttribute::IfAlias(a) if !a.is_empty() => li.alias = Some(a.clone()),
                LinkAttribute::TxQueueLen(v) => li.txqlen = *v,
                LinkAttribute::LinkInfo(infos) => {
                    let mut bridge_port = false;
                    for i in infos {
                        match i {
                            NlLinkInfo::Kind(k) => li.kind = Some(k.to_string()),
                            NlLinkInfo::Data(InfoData::Vxlan(v)) => li.vxlan = Some(super::VxlanInfo::from_infos(v)),
                            NlLinkInfo::PortKind(InfoPortKind::Bridge) => bridge_port = true,
                            NlLinkInfo::PortData(InfoPortData::BridgePort(opts)) => {
                                bridge_port = true;
                                for o in opts {
                                    if let InfoBridgePort::HairpinMode(h) = o {
                                        li.hairpin = Some(*h);
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    if bridge_port && li.hairpin.is_none() {
                        li.hairpin = Some(false);
                    }
                }
                _ => {}
            }
        }
        if li.kind.as_deref() == Some("veth") {
            li.peer_index = link.filter(|v| *v != 0);
        }
        li
    }
}

fn link_obj(name: &str) -> String {
    format!("link {name:?}")
}

fn index_obj(index: u32) -> String {
    format!("link index {index}")
}

const ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;
const CREATE: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;

fn skip_stats() -> LinkAttribute {
    LinkAttribute::ExtMask(vec![LinkExtentMask::SkipStats])
}

fn first_link(msgs: Vec<RouteNetlinkMessage>) -> Option<LinkInfo> {
    msgs.into_iter().find_map(|m| match m {
        RouteNetlinkMessage::NewLink(l) => Some(LinkInfo::from_msg(&l)),
        _ => None,
    })
}

impl Netlink {
    /// Look a link up by name (one `RTM_GETLINK`, no dump). `None` if it
    /// does not exist (or the name cannot exist).
    pub fn link(&self, name: &str) -> Result<Option<LinkInfo>> {
        if !valid_ifname(name) {
            return Ok(None);
        }
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        m.attributes.push(skip_stats());
        match self.request(RouteNetlinkMessage::GetLink(m), NLM_F_REQUEST) {
            Ok(v) => Ok(first_link(v)),
            Err(KernelError { errno: libc::ENODEV, .. }) => Ok(None),
            Err(e) => Err(e.into_sys(format!("get {}", link_obj(name)))),
        }
    }

    /// Look a link up by index. `None` if it does not exist.
    pub fn link_by_index(&self, index: u32) -> Result<Option<LinkInfo>> {
        if index == 0 {
            return Ok(None);
        }
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(skip_stats());
        match self.request(RouteNetlinkMessage::GetLink(m), NLM_F_REQUEST) {
            Ok(v) => Ok(first_link(v)),
            Err(KernelError { errno: libc::ENODEV, .. }) => Ok(None),
            Err(e) => Err(e.into_sys(format!("get {}", index_obj(index)))),
        }
    }

    /// All links of the namespace.
    pub fn links(&self) -> Result<Vec<LinkInfo>> {
        let mut m = LinkMessage::default();
        m.attributes.push(skip_stats());
        let v = self.dump(RouteNetlinkMessage::GetLink(m)).map_err(|e| e.into_sys("dump links"))?;
        Ok(v.into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(LinkInfo::from_msg(&l)),
                _ => None,
            })
            .collect())
    }

    fn link_after_create(&self, name: &str) -> Result<LinkInfo> {
        self.link(name)?.ok_or_else(|| SysError::NotFound(format!("{} right after creating it", link_obj(name))))
    }

    fn create_simple(&self, name: &str, kind: InfoKind, mtu: Option<u32>) -> Result<LinkInfo> {
        check_ifname(name)?;
        let kind_s = kind.to_string();
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        if let Some(mtu) = mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        m.attributes.push(LinkAttribute::LinkInfo(vec![NlLinkInfo::Kind(kind)]));
        match self.request(RouteNetlinkMessage::NewLink(m), CREATE) {
            Ok(_) => self.link_after_create(name),
            Err(KernelError { errno: libc::EEXIST, .. }) => Err(SysError::Exists(link_obj(name))),
            Err(e) => Err(e.into_sys(format!("create {kind_s} {}", link_obj(name)))),
        }
    }

    /// Create a bridge (down). [`SysError::Exists`] if a link of that name
    /// exists, whatever its type.
    pub fn create_bridge(&self, name: &str, mtu: Option<u32>) -> Result<LinkInfo> {
        self.create_simple(name, InfoKind::Bridge, mtu)
    }

    /// Create a dummy link (down).
    pub fn create_dummy(&self, name: &str) -> Result<LinkInfo> {
        self.create_simple(name, InfoKind::Dummy, None)
    }

    /// Create an ifb (intermediate functional block) link, down, with an
    /// optional alias. [`SysError::Exists`] if a link of that name exists. If
    /// setting the alias fails the link is deleted again.
    pub fn create_ifb(&self, name: &str, mtu: Option<u32>, alias: Option<&str>) -> Result<LinkInfo> {
        let l = self.create_simple(name, InfoKind::Ifb, mtu)?;
        if let Some(alias) = alias {
            if let Err(e) = self.set_alias(l.index, alias) {
                let _ = self.delete_link_index(l.index);
                return Err(e);
            }
            return self.link_after_create(name);
        }
        Ok(l)
    }

    /// Create a veth pair with one request: `name` in this socket's
    /// namespace and `peer_name` directly inside `peer_ns` (the peer carries
    /// `IFLA_NET_NS_FD`). Both ends are down. `mtu` applies to both ends,
    /// `peer_mac` to the peer, `alias` (`IFLA_IFALIAS`) to `name`.
    ///
    /// The kernel creates the pair atomically: on any error nothing is left
    /// behind. If either name is taken the error is [`SysError::Exists`]
    /// naming the one that is.
    ///
    /// The kernel ignores `IFLA_IFALIAS` in a create request, so an alias
    /// costs a second request; if that one fails the pair is deleted again.
    pub fn create_veth(
        &self,
        name: &str,
        peer_name: &str,
        peer_ns: &NetNs,
        mtu: Option<u32>,
        peer_mac: Option<Mac>,
        alias: Option<&str>,
    ) -> Result<()> {
        check_ifname(name)?;
        check_ifname(peer_name)?;
        let mut peer = LinkMessage::default();
        peer.attributes.push(LinkAttribute::IfName(peer_name.to_string()));
        if let Some(mtu) = mtu {
            peer.attributes.push(LinkAttribute::Mtu(mtu));
        }
        if let Some(mac) = peer_mac {
            peer.attributes.push(LinkAttribute::Address(mac.to_vec()));
        }
        peer.attributes.push(LinkAttribute::NetNsFd(peer_ns.fd().as_raw_fd()));

        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        if let Some(mtu) = mtu {
            m.attributes.push(LinkAttribute::Mtu(mtu));
        }
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            NlLinkInfo::Kind(InfoKind::Veth),
            NlLinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
        ]));
        match self.request(RouteNetlinkMessage::NewLink(m), CREATE) {
            Ok(_) => {}
            Err(KernelError { errno: libc::EEXIST, .. }) => {
                // The kernel says EEXIST for either end; find out which.
                return if self.link(name)?.is_some() {
                    Err(SysError::Exists(link_obj(name)))
                } else {
                    Err(SysError::Exists(format!("{} in netns {}", link_obj(peer_name), peer_ns.path().display())))
                };
            }
            Err(e) => {
                return Err(e.into_sys(format!(
                    "create veth {name:?} with peer {peer_name:?} in netns {}",
                    peer_ns.path().display()
                )))
            }
        }
        if let Some(alias) = alias {
            let mut m = LinkMessage::default();
            m.attributes.push(LinkAttribute::IfName(name.to_string()));
            m.attributes.push(LinkAttribute::IfAlias(alias.to_string()));
            if let Err(e) = self.request(RouteNetlinkMessage::SetLink(m), ACK) {
                let _ = self.delete_link(name);
                return Err(e.into_sys(format!("set alias {alias:?} of new veth {}", link_obj(name))));
            }
        }
        Ok(())
    }

    /// Delete a link by name; `false` if it did not exist.
    pub fn delete_link(&self, name: &str) -> Result<bool> {
        if !valid_ifname(name) {
            return Ok(false);
        }
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.request(RouteNetlinkMessage::DelLink(m), ACK) {
            Ok(_) => Ok(true),
            Err(KernelError { errno: libc::ENODEV, .. }) => Ok(false),
            Err(e) => Err(e.into_sys(format!("delete {}", link_obj(name)))),
        }
    }

    /// Delete a link by index; `false` if it did not exist.
    pub fn delete_link_index(&self, index: u32) -> Result<bool> {
        if index == 0 {
            return Ok(false);
        }
        let mut m = LinkMessage::default();
        m.header.index = index;
        match self.request(RouteNetlinkMessage::DelLink(m), ACK) {
            Ok(_) => Ok(true),
            Err(KernelError { errno: libc::ENODEV, .. }) => Ok(false),
            Err(e) => Err(e.into_sys(format!("delete {}", index_obj(index)))),
        }
    }

    /// `RTM_SETLINK` on `index`; ENODEV becomes [`SysError::NotFound`].
    fn setlink(&self, what: &str, mut m: LinkMessage, index: u32) -> Result<()> {
        m.header.index = index;
        match self.request(RouteNetlinkMessage::SetLink(m), ACK) {
            Ok(_) => Ok(()),
            Err(KernelError { errno: libc::ENODEV, .. }) => Err(SysError::NotFound(index_obj(index))),
            Err(e) => Err(e.into_sys(format!("set {what} of {}", index_obj(index)))),
        }
    }

    fn set_flag(&self, what: &str, index: u32, flag: LinkFlags, on: bool) -> Result<()> {
        let mut m = LinkMessage::default();
        if on {
            m.header.flags = flag;
        }
        m.header.change_mask = flag;
        self.setlink(what, m, index)
    }

    /// `ip link set dev <index> up`
    pub fn set_up(&self, index: u32) -> Result<()> {
        self.set_flag("up", index, LinkFlags::Up, true)
    }

    /// `ip link set dev <index> down`
    pub fn set_down(&self, index: u32) -> Result<()> {
        self.set_flag("down", index, LinkFlags::Up, false)
    }

    /// `ip link set dev <index> promisc on|off`
    pub fn set_promisc(&self, index: u32, on: bool) -> Result<()> {
        self.set_flag("promisc", index, LinkFlags::Promisc, on)
    }

    /// `ip link set dev <index> allmulticast on|off`
    pub fn set_allmulti(&self, index: u32, on: bool) -> Result<()> {
        self.set_flag("allmulticast", index, LinkFlags::Allmulti, on)
    }

    /// `ip link set dev <index> txqueuelen <qlen>`
    pub fn set_txqlen(&self, index: u32, qlen: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::TxQueueLen(qlen));
        self.setlink(&format!("txqueuelen {qlen}"), m, index)
    }

    /// `ip link set dev <index> mtu <mtu>`
    pub fn set_mtu(&self, index: u32, mtu: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::Mtu(mtu));
        self.setlink(&format!("mtu {mtu}"), m, index)
    }

    /// `ip link set dev <index> address <mac>`
    pub fn set_mac(&self, index: u32, mac: Mac) -> Result<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::Address(mac.to_vec()));
        self.setlink(&format!("mac {}", super::format_mac(&mac)), m, index)
    }

    /// `ip link set dev <index> master <master>`; `master == 0` detaches
    /// (`nomaster`).
    pub fn set_master(&self, index: u32, master: u32) -> Result<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::Controller(master));
        self.setlink(&format!("master (index {master})"), m, index)
    }

    /// `ip link set dev <index> alias <alias>`; an empty alias removes it.
    pub fn set_alias(&self, index: u32, alias: &str) -> Result<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfAlias(alias.to_string()));
        self.setlink(&format!("alias {alias:?}"), m, index)
    }

    /// `ip link set dev <index> name <name>` (the link must be down).
    pub fn set_name(&self, index: u32, name: &str) -> Result<()> {
        check_ifname(name)?;
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::IfName(name.to_string()));
        match self.setlink(&format!("name {name:?}"), m, index) {
            Err(SysError::Netlink { errno: libc::EEXIST, .. }) => Err(SysError::Exists(link_obj(name))),
            r => r,
        }
    }

    /// `ip link set dev <index> netns <ns>`: move the link to another
    /// namespace (it keeps its name and is brought down).
    pub fn set_netns(&self, index: u32, ns: &NetNs) -> Result<()> {
        let mut m = LinkMessage::default();
        m.attributes.push(LinkAttribute::NetNsFd(ns.fd().as_raw_fd()));
        match self.setlink(&format!("netns {}", ns.path().display()), m, index) {
            Err(SysError::Netlink { errno: libc::EEXIST, .. }) => Err(SysError::Exists(format!(
                "a link with the name of {} in netns {}",
                index_obj(index),
                ns.path().display()
            ))),
            r => r,
        }
    }

    /// `ip link set dev <index> type bridge_slave hairpin on|off`: the
    /// bridge port's `IFLA_BRPORT_MODE`, sent as `IFLA_INFO_SLAVE_DATA` in an
    /// `RTM_NEWLINK` on the existing link. The link must be a bridge port.
    pub fn set_hairpin(&self, index: u32, on: bool) -> Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        m.attributes.push(LinkAttribute::LinkInfo(vec![
            NlLinkInfo::PortKind(InfoPortKind::Bridge),
            NlLinkInfo::PortData(InfoPortData::BridgePort(vec![InfoBridgePort::HairpinMode(on)])),
        ]));
        match self.request(RouteNetlinkMessage::NewLink(m), ACK) {
            Ok(_) => Ok(()),
            Err(KernelError { errno: libc::ENODEV, .. }) => Err(SysError::NotFound(index_obj(index))),
            Err(e) => Err(e.into_sys(format!(
                "set hairpin {} for {} (must be a bridge port)",
                if on { "on" } else { "off" },
                index_obj(index)
            ))),
        }
    }
}
