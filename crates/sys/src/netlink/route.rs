//! Routes (`ip route`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteMetric, RouteProtocol, RouteScope,
    RouteType,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};

use super::{KernelError, Netlink};
use crate::error::{Result, SysError};

/// The main routing table.
pub const TABLE_MAIN: u32 = 254;

/// An IP version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn af(self) -> AddressFamily {
        match self {
            Family::V4 => AddressFamily::Inet,
            Family::V6 => AddressFamily::Inet6,
        }
    }

    /// The family of `ip`.
    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// A route to add, replace or delete.
///
/// Added routes get protocol `boot` (as with `ip route add`) and type
/// unicast; the scope is `link` when `scope_link` is set, else `universe`
/// (set `scope_link` for a direct route without gateway to get what
/// `ip route add <dst> dev <if>` does). `table` defaults to main (254).
///
/// For deletion only `dst`, `table` and — when set — `gw`, `oif`, `src` and
/// `metric` are matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
    pub oif: Option<u32>,
    pub scope_link: bool,
    /// Preferred source (`src`, `RTA_PREFSRC`).
    pub src: Option<IpAddr>,
    /// `onlink` (`RTNH_F_ONLINK`): the gateway is reachable on `oif` even
    /// though no address/route covers it.
    pub onlink: bool,
    pub mtu: Option<u32>,
    pub advmss: Option<u32>,
    /// `metric` / priority.
    pub metric: Option<u32>,
    pub table: Option<u32>,
    /// `proto <n>` (`RTPROT_*`): who owns the route. Added routes default to
    /// `boot`; when set on a deletion only a route of that protocol matches.
    pub protocol: Option<u8>,
}

impl RouteSpec {
    /// A route to `dst` with nothing else set. Host bits of `dst` are
    /// cleared when the route is sent.
    pub fn new(dst: IpNet) -> RouteSpec {
        RouteSpec {
            dst,
            gw: None,
            oif: None,
            scope_link: false,
            src: None,
            onlink: false,
            mtu: None,
            advmss: None,
            metric: None,
            table: None,
            protocol: None,
        }
    }

    /// The default route of `family` (`0.0.0.0/0` or `::/0`).
    pub fn default_route(family: Family) -> RouteSpec {
        RouteSpec::new(match family {
            Family::V4 => IpNet::new(Ipv4Addr::UNSPECIFIED.into(), 0).expect("prefix 0"),
            Family::V6 => IpNet::new(Ipv6Addr::UNSPECIFIED.into(), 0).expect("prefix 0"),
        })
    }

    /// `via <gw>`
    pub fn via(mut self, gw: IpAddr) -> Self {
        self.gw = Some(gw);
        self
    }

    /// `dev <oif>`
    pub fn dev(mut self, oif: u32) -> Self {
        self.oif = Some(oif);
        self
    }

    /// `scope link`
    pub fn link_scope(mut self) -> Self {
        self.scope_link = true;
        self
    }

    /// `src <ip>`
    pub fn with_src(mut self, src: IpAddr) -> Self {
        self.src = Some(src);
        self
    }

    /// `onlink`
    pub fn with_onlink(mut self) -> Self {
        self.onlink = true;
        self
    }

    /// `mtu <mtu>`
    pub fn with_mtu(mut self, mtu: u32) -> Self {
        self.mtu = Some(mtu);
        self
    }

    /// `advmss <advmss>`
    pub fn with_advmss(mut self, advmss: u32) -> Self {
        self.advmss = Some(advmss);
        self
    }

    /// `metric <metric>`
    pub fn with_metric(mut self, metric: u32) -> Self {
        self.metric = Some(metric);
        self
    }

    /// `proto <protocol>`
    pub fn with_protocol(mut self, protocol: u8) -> Self {
        self.protocol = Some(protocol);
        self
    }

    /// `table <table>`
    pub fn in_table(mut self, table: u32) -> Self {
        self.table = Some(table);
        self
    }

    /// The IP family of `dst`.
    pub fn family(&self) -> Family {
        Family::of(&self.dst.addr())
    }
}

impl std::fmt::Display for RouteSpec {
    /// `ip route`-like: `10.0.0.0/24 via 10.0.0.1 dev #3 table 254`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.dst.trunc())?;
        if let Some(gw) = self.gw {
            write!(f, " via {gw}")?;
        }
        if let Some(oif) = self.oif {
            write!(f, " dev #{oif}")?;
        }
        if let Some(src) = self.src {
            write!(f, " src {src}")?;
        }
        if let Some(m) = self.metric {
            write!(f, " metric {m}")?;
        }
        if let Some(t) = self.table {
            write!(f, " table {t}")?;
        }
        if let Some(p) = self.protocol {
            write!(f, " proto {p}")?;
        }
        if self.onlink {
            write!(f, " onlink")?;
        }
        Ok(())
    }
}

/// A route as read from the kernel.
///
/// Multipath routes are reported with `gw` and `oif` unset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteInfo {
    pub dst: IpNet,
    pub gw: Option<IpAddr>,
    pub oif: Option<u32>,
    /// `RT_SCOPE_*`: 0 universe, 253 link, 254 host.
    pub scope: u8,
    pub table: u32,
    /// Preferred source (`RTA_PREFSRC`).
    pub src: Option<IpAddr>,
    pub metric: Option<u32>,
    pub mtu: Option<u32>,
    /// `RTPROT_*`: 2 kernel, 3 boot, 4 static, ...
    pub proto: u8,
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

impl RouteInfo {
    fn from_msg(m: &RouteMessage) -> Option<RouteInfo> {
        let h = &m.header;
        let unspec: IpAddr = match h.address_family {
            AddressFamily::Inet => Ipv4Addr::UNSPECIFIED.into(),
            AddressFamily::Inet6 => Ipv6Addr::UNSPECIFIED.into(),
            _ => return None,
        };
        let mut dst_ip = unspec;
        let mut r = RouteInfo {
            dst: IpNet::new(unspec, 0).ok()?,
            gw: None,
            oif: None,
            scope: u8::from(h.scope),
            table: u32::from(h.table),
            src: None,
            metric: None,
            mtu: None,
            proto: u8::from(h.protocol),
        };
        for a in &m.attributes {
            match a {
                RouteAttribute::Destination(d) => {
                    if let Some(ip) = route_addr(d) {
                        dst_ip = ip;
                    }
                }
                RouteAttribute::Gateway(g) => r.gw = route_addr(g),
                RouteAttribute::Oif(i) => r.oif = Some(*i),
                RouteAttribute::PrefSource(s) => r.src = route_addr(s),
                RouteAttribute::Priority(p) => r.metric = Some(*p),
                RouteAttribute::Table(t) => r.table = *t,
                RouteAttribute::Metrics(ms) => {
                    for metric in ms {
                        if let RouteMetric::Mtu(v) = metric {
                            r.mtu = Some(*v);
                        }
                    }
                }
                _ => {}
            }
        }
        r.dst = IpNet::new(dst_ip, h.destination_prefix_length).ok()?;
        Some(r)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Purpose {
    Add,
    Delete,
}

fn route_msg(r: &RouteSpec, purpose: Purpose) -> Result<RouteMessage> {
    let dst = r.dst.trunc();
    let family = r.family();
    for (what, ip) in [("gateway", r.gw), ("source", r.src)] {
        if let Some(ip) = ip {
            if Family::of(&ip) != family {
                return Err(SysError::Invalid(format!("route {r}: {what} {ip} is not of the destination's family")));
            }
        }
    }
    let mut m = RouteMessage::default();
    let h = &mut m.header;
    h.address_family = family.af();
    h.destination_prefix_length = dst.prefix_len();
    let table = r.table.unwrap_or(TABLE_MAIN);
    h.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    match purpose {
        Purpose::Add => {
            h.protocol = r.protocol.map(RouteProtocol::from).unwrap_or(RouteProtocol::Boot);
            h.scope = if r.scope_link { RouteScope::Link } else { RouteScope::Universe };
            h.kind = RouteType::Unicast;
            if r.onlink {
                h.flags |= RouteFlags::Onlink;
            }
        }
        Purpose::Delete => {
            // Match any scope and type, and any protocol unless one is
            // given, like `ip route del`.
            h.protocol = r.protocol.map(RouteProtocol::from).unwrap_or(RouteProtocol::Unspec);
            h.scope = RouteScope::NoWhere;
            h.kind = RouteType::Unspec;
        }
    }
    m.attributes.push(RouteAttribute::Table(table));
    if dst.prefix_len() > 0 {
        m.attributes.push(RouteAttribute::Destination(dst.addr().into()));
    }
    if let Some(gw) = r.gw {
        m.attributes.push(RouteAttribute::Gateway(gw.into()));
    }
    if let Some(oif) = r.oif {
        m.attributes.push(RouteAttribute::Oif(oif));
    }
    if let Some(src) = r.src {
        m.attributes.push(RouteAttribute::PrefSource(src.into()));
    }
    if let Some(metric) = r.metric {
        m.attributes.push(RouteAttribute::Priority(metric));
    }
    if purpose == Purpose::Add {
        let mut metrics = Vec::new();
        if let Some(mtu) = r.mtu {
            metrics.push(RouteMetric::Mtu(mtu));
        }
        if let Some(advmss) = r.advmss {
            metrics.push(RouteMetric::Advmss(advmss));
        }
        if !metrics.is_empty() {
            m.attributes.push(RouteAttribute::Metrics(metrics));
        }
    }
    Ok(m)
}

impl Netlink {
    /// Routes of the main table (254) of `family`.
    pub fn routes(&self, family: Family) -> Result<Vec<RouteInfo>> {
        self.routes_in_table(family, Some(TABLE_MAIN))
    }

    /// Routes of one table, or of all tables (`None`, which includes the
    /// `local` table). Filtered by the kernel; cached/exception routes are
    /// not included.
    pub fn routes_in_table(&self, family: Family, table: Option<u32>) -> Result<Vec<RouteInfo>> {
        let mut m = RouteMessage::default();
        m.header.address_family = family.af();
        if let Some(t) = table {
            m.header.table = u8::try_from(t).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
            m.attributes.push(RouteAttribute::Table(t));
        }
        let v = self.dump(RouteNetlinkMessage::GetRoute(m)).map_err(|e| {
            e.into_sys(match table {
                Some(t) => format!("dump {family:?} routes of table {t}"),
                None => format!("dump {family:?} routes"),
            })
        })?;
        Ok(v.iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => RouteInfo::from_msg(r),
                _ => None,
            })
            .filter(|r| table.is_none_or(|t| r.table == t))
            .collect())
    }

    fn route_change(&self, r: &RouteSpec, flags: u16, verb: &str) -> Result<()> {
        let m = route_msg(r, Purpose::Add)?;
        match self.request(RouteNetlinkMessage::NewRoute(m), flags) {
            Ok(_) => Ok(()),
            Err(KernelError { errno: libc::EEXIST, .. }) => Err(SysError::Exists(format!("route {r}"))),
            Err(e) => Err(e.into_sys(format!("{verb} route {r}"))),
        }
    }

    /// `ip route add`; [`SysError::Exists`] if an identical route is there.
    pub fn add_route(&self, r: &RouteSpec) -> Result<()> {
        self.route_change(r, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL, "add")
    }

    /// `ip route replace`
    pub fn replace_route(&self, r: &RouteSpec) -> Result<()> {
        self.route_change(r, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE, "replace")
    }

    /// `ip route del`; `false` if no such route.
    pub fn del_route(&self, r: &RouteSpec) -> Result<bool> {
        let m = route_msg(r, Purpose::Delete)?;
        match self.request(RouteNetlinkMessage::DelRoute(m), NLM_F_REQUEST | NLM_F_ACK) {
            Ok(_) => Ok(true),
            Err(KernelError { errno: libc::ESRCH, .. }) => Ok(false),
            Err(e) => Err(e.into_sys(format!("delete route {r}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_display_and_msg() {
        let r = RouteSpec::new("10.1.2.3/24".parse().unwrap()).via("10.1.2.1".parse().unwrap()).dev(3).with_metric(100);
        assert_eq!(r.to_string(), "10.1.2.0/24 via 10.1.2.1 dev #3 metric 100");
        let m = route_msg(&r, Purpose::Add).unwrap();
        assert_eq!(m.header.destination_prefix_length, 24);
        assert!(m.attributes.contains(&RouteAttribute::Destination(RouteAddress::Inet("10.1.2.0".parse().unwrap()))));
        let bad = RouteSpec::new("10.0.0.0/8".parse().unwrap()).via("fe80::1".parse().unwrap());
        assert!(matches!(route_msg(&bad, Purpose::Add), Err(SysError::Invalid(_))));
        let d = RouteSpec::default_route(Family::V6);
        assert_eq!(d.dst.to_string(), "::/0");
        let m = route_msg(&d.in_table(1000), Purpose::Delete).unwrap();
        assert_eq!(m.header.table, 0);
        assert!(m.attributes.contains(&RouteAttribute::Table(1000)));
    }
}
