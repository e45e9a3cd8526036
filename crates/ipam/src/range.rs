//! host-local ranges and range sets: defaults, validation and the round-robin
//! iterator, following the reference's `backend/allocator` (range.go,
//! range_set.go, allocator.go) quirk for quirk.
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::Deserialize;

/// One range as written in the config. Every field is an optional string so
/// that validation can name the offending field; `""` counts as unset, as it
/// does for Go's `net.IP`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RangeConf {
    #[serde(default)]
    pub subnet: Option<String>,
    #[serde(default)]
    pub range_start: Option<String>,
    #[serde(default)]
    pub range_end: Option<String>,
    #[serde(default)]
    pub gateway: Option<String>,
}

/// A validation failure: the config field (relative to the range) and the
/// reference's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeError {
    pub field: &'static str,
    pub msg: String,
}

fn err(field: &'static str, msg: impl Into<String>) -> RangeError {
    RangeError { field, msg: msg.into() }
}

/// A validated range: every address from `start` to `end` (inclusive) may be
/// handed out, except `gateway`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNet,
    pub start: IpAddr,
    pub end: IpAddr,
    pub gateway: IpAddr,
}

/// The address as an integer, for ordering and stepping within one family.
pub(crate) fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The address `v` in the family of `like`.
fn from_u128(like: IpAddr, v: u128) -> IpAddr {
    match like {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

fn same_family(a: IpAddr, b: IpAddr) -> bool {
    a.is_ipv4() == b.is_ipv4()
}

/// v4-mapped IPv6 addresses become IPv4, as Go's `To4()` canonicalisation does.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn parse_ip(field: &'static str, s: &str) -> Result<IpAddr, RangeError> {
    s.trim().parse::<IpAddr>().map(canonical).map_err(|_| err(field, format!("invalid IP address: {s}")))
}

fn set(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

impl RangeConf {
    /// Fill in defaults and validate, in the reference's order (Range.Canonicalize).
    pub fn canonicalize(&self) -> Result<Range, RangeError> {
        let Some(subnet_s) = set(&self.subnet) else {
            return Err(err("subnet", "missing subnet"));
        };
        let subnet: IpNet =
            subnet_s.trim().parse().map_err(|_| err("subnet", format!("invalid CIDR address: {subnet_s}")))?;
        // /31, /32, /127 and /128 leave nothing once network and gateway are taken.
        if subnet.prefix_len() > subnet.max_prefix_len() - 2 {
            return Err(err("subnet", format!("Network {subnet} too small to allocate from")));
        }
        if subnet.addr() != subnet.network() {
            return Err(err(
                "subnet",
                format!(
                    "Network has host bits set. For a subnet mask of length {} the network address is {}",
                    subnet.prefix_len(),
                    subnet.network()
                ),
            ));
        }
        let network = subnet.network();
        let first = from_u128(network, to_u128(network) + 1);

        let gateway = match set(&self.gateway) {
            None => first,
            Some(s) => {
                let gw = parse_ip("gateway", s)?;
                if !subnet.contains(&gw) {
                    return Err(err("gateway", format!("gateway {gw} not in network {subnet}")));
                }
                gw
            }
        };

        let in_subnet = |field: &'static str, ip: IpAddr| -> Result<IpAddr, RangeError> {
            if !same_family(ip, network) {
                return Err(err(field, format!("IP {ip} is not the same protocol as subnet {subnet}")));
            }
            if !subnet.contains(&ip) {
                return Err(err(field, format!("{ip} not in network {subnet}")));
            }
            Ok(ip)
        };

        // The default start is network+1, which is also the default gateway:
        // the iterator skips the gateway, so the first address handed out is .2.
        let start = match set(&self.range_start) {
            None => first,
            Some(s) => in_subnet("rangeStart", parse_ip("rangeStart", s)?)?,
        };
        let end = match set(&self.range_end) {
            None => last_ip(&subnet),
            Some(s) => {
                let end = in_subnet("rangeEnd", parse_ip("rangeEnd", s)?)?;
                if to_u128(end) < to_u128(start) {
                    return Err(err("rangeEnd", format!("{end} is in network {subnet} but before start {start}")));
                }
                end
            }
        };
        Ok(Range { subnet, start, end, gateway })
    }
}

/// The default rangeEnd: the broadcast minus one for IPv4, the all-ones
/// address for IPv6 (the reference code, not its README).
fn last_ip(subnet: &IpNet) -> IpAddr {
    match subnet {
        IpNet::V4(n) => IpAddr::V4(Ipv4Addr::from(u32::from(n.broadcast()) - 1)),
        IpNet::V6(n) => IpAddr::V6(n.broadcast()),
    }
}

impl Range {
    /// Inside `start..=end` (the reference's `Range.Contains`).
    pub fn contains(&self, ip: IpAddr) -> bool {
        same_family(ip, self.start) && (to_u128(self.start)..=to_u128(self.end)).contains(&to_u128(ip))
    }

    fn overlaps(&self, other: &Range) -> bool {
        same_family(self.start, other.start)
            && to_u128(self.start) <= to_u128(other.end)
            && to_u128(other.start) <= to_u128(self.end)
    }

    /// How many addresses can be handed out (the gateway is never handed out).
    pub fn capacity(&self) -> u128 {
        let n = (to_u128(self.end) - to_u128(self.start)).saturating_add(1);
        if self.contains(self.gateway) {
            n - 1
        } else {
            n
        }
    }
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.start, self.end)
    }
}

/// A pool of ranges of one family; one address is allocated per set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSet {
    pub ranges: Vec<Range>,
}

/// A range set failure: which range (if one) and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeSetError {
    pub range: Option<usize>,
    pub field: Option<&'static str>,
    pub msg: String,
}

impl RangeSet {
    /// Validate a set as written (RangeSet.Canonicalize): non-empty, every
    /// range valid, one family, no overlaps.
    pub fn from_conf(confs: &[RangeConf]) -> Result<RangeSet, RangeSetError> {
        if confs.is_empty() {
            return Err(RangeSetError { range: None, field: None, msg: "empty range set".into() });
        }
        let mut ranges: Vec<Range> = Vec::with_capacity(confs.len());
        for (i, c) in confs.iter().enumerate() {
            let r = c.canonicalize().map_err(|e| RangeSetError { range: Some(i), field: Some(e.field), msg: e.msg })?;
            if let Some(r0) = ranges.first() {
                if !same_family(r0.start, r.start) {
                    return Err(RangeSetError { range: Some(i), field: None, msg: "mixed address families".into() });
                }
            }
            if let Some(prev) = ranges.iter().find(|p| p.overlaps(&r)) {
                return Err(RangeSetError {
                    range: Some(i),
                    field: None,
                    msg: format!("subnets {prev} and {r} overlap"),
                });
            }
            ranges.push(r);
        }
        Ok(RangeSet { ranges })
    }

    pub fn is_ipv4(&self) -> bool {
        self.ranges[0].start.is_ipv4()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.range_for(ip).is_some()
    }

    pub fn range_for(&self, ip: IpAddr) -> Option<&Range> {
        self.ranges.iter().find(|r| r.contains(ip))
    }

    pub fn overlaps(&self, other: &RangeSet) -> bool {
        self.ranges.iter().any(|a| other.ranges.iter().any(|b| a.overlaps(b)))
    }

    /// Total addresses that can be handed out, saturating.
    pub fn capacity(&self) -> u128 {
        self.ranges.iter().fold(0u128, |acc, r| acc.saturating_add(r.capacity()))
    }

    /// Round-robin candidates: after `last_reserved` if it lies in the set,
    /// else from the first rangeStart; wraps across ranges, skips gateways,
    /// and stops when back where it began.
    pub fn iter_from(&self, last_reserved: Option<IpAddr>) -> RangeIter<'_> {
        let last = last_reserved.map(canonical).filter(|ip| self.contains(*ip));
        let idx = last.and_then(|ip| self.ranges.iter().position(|r| r.contains(ip))).unwrap_or(0);
        RangeIter { set: self, idx, cur: last, start: None, done: false }
    }
}

impl fmt::Display for RangeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// The reference's `RangeIter`: yields (address, its range).
pub struct RangeIter<'a> {
    set: &'a RangeSet,
    idx: usize,
    cur: Option<IpAddr>,
    /// The first candidate produced; meeting it again means a full lap.
    start: Option<IpAddr>,
    done: bool,
}

impl<'a> Iterator for RangeIter<'a> {
    type Item = (IpAddr, &'a Range);

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done {
            let mut r = &self.set.ranges[self.idx];
            let cur = match self.cur {
                None => {
                    // Fresh start: rangeStart itself is the first candidate.
                    self.start = Some(r.start);
                    r.start
                }
                Some(c) => {
                    let next = if c == r.end {
                        self.idx = (self.idx + 1) % self.set.ranges.len();
                        r = &self.set.ranges[self.idx];
                        r.start
                    } else {
                        from_u128(c, to_u128(c) + 1)
                    };
                    match self.start {
                        None => self.start = Some(next),
                        Some(s) if s == next => {
                            self.done = true;
                            return None;
                        }
                        Some(_) => {}
                    }
                    next
                }
            };
            self.cur = Some(cur);
            if cur != r.gateway {
                return Some((cur, r));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rc(subnet: &str) -> RangeConf {
        RangeConf { subnet: Some(subnet.into()), ..Default::default() }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_v4_and_v6() {
        let r = rc("10.9.0.0/29").canonicalize().unwrap();
        assert_eq!((r.start, r.end, r.gateway), (ip("10.9.0.1"), ip("10.9.0.6"), ip("10.9.0.1")));
        assert_eq!(r.to_string(), "10.9.0.1-10.9.0.6");
        assert_eq!(r.capacity(), 5);
        let r = rc("fd00:9::/126").canonicalize().unwrap();
        assert_eq!(r.to_string(), "fd00:9::1-fd00:9::3");
        assert_eq!(r.gateway, ip("fd00:9::1"));
    }

    #[test]
    fn too_small_and_host_bits() {
        for n in ["10.6.0.0/31", "10.6.0.0/32", "fd00::/127", "fd00::/128"] {
            let e = rc(n).canonicalize().unwrap_err();
            assert_eq!(e.msg, format!("Network {n} too small to allocate from"));
            assert_eq!(e.field, "subnet");
        }
        let e = rc("10.6.0.5/24").canonicalize().unwrap_err();
        assert!(e.msg.contains("host bits"), "{}", e.msg);
        assert!(rc("10.6.0.0/30").canonicalize().is_ok());
    }

    #[test]
    fn start_end_gateway_checks() {
        let mut c = rc("10.0.0.0/24");
        c.range_start = Some("10.0.1.5".into());
        assert_eq!(c.canonicalize().unwrap_err().field, "rangeStart");
        c.range_start = Some("10.0.0.50".into());
        c.range_end = Some("10.0.0.40".into());
        let e = c.canonicalize().unwrap_err();
        assert_eq!(
            (e.field, e.msg.as_str()),
            ("rangeEnd", "10.0.0.40 is in network 10.0.0.0/24 but before start 10.0.0.50")
        );
        c.range_end = Some("fd00::1".into());
        assert!(c.canonicalize().unwrap_err().msg.contains("same protocol"));
        c.range_end = None;
        c.gateway = Some("10.1.0.1".into());
        assert_eq!(c.canonicalize().unwrap_err().field, "gateway");
        c.gateway = Some("".into());
        assert_eq!(c.canonicalize().unwrap().gateway, ip("10.0.0.1"));
    }

    #[test]
    fn set_rules() {
        assert_eq!(RangeSet::from_conf(&[]).unwrap_err().msg, "empty range set");
        let e = RangeSet::from_conf(&[rc("10.0.0.0/24"), rc("fd00::/64")]).unwrap_err();
        assert_eq!((e.range, e.msg.as_str()), (Some(1), "mixed address families"));
        let e = RangeSet::from_conf(&[rc("10.0.0.0/24"), rc("10.0.0.0/25")]).unwrap_err();
        assert!(e.msg.contains("overlap"), "{}", e.msg);
        // Disjoint ranges inside one subnet are fine.
        let a = RangeConf {
            range_start: Some("10.0.0.10".into()),
            range_end: Some("10.0.0.20".into()),
            ..rc("10.0.0.0/24")
        };
        let b = RangeConf {
            range_start: Some("10.0.0.30".into()),
            range_end: Some("10.0.0.40".into()),
            ..rc("10.0.0.0/24")
        };
        let s = RangeSet::from_conf(&[a, b]).unwrap();
        assert_eq!(s.to_string(), "10.0.0.10-10.0.0.20,10.0.0.30-10.0.0.40");
        assert_eq!(s.capacity(), 22);
    }

    #[test]
    fn iterator_wraps_and_skips_gateway() {
        let s = RangeSet::from_conf(&[rc("10.9.0.0/29")]).unwrap();
        let all: Vec<IpAddr> = s.iter_from(None).map(|(ip, _)| ip).collect();
        assert_eq!(all, ["10.9.0.2", "10.9.0.3", "10.9.0.4", "10.9.0.5", "10.9.0.6"].map(ip));
        let from4: Vec<IpAddr> = s.iter_from(Some(ip("10.9.0.4"))).map(|(ip, _)| ip).collect();
        assert_eq!(from4, ["10.9.0.5", "10.9.0.6", "10.9.0.2", "10.9.0.3", "10.9.0.4"].map(ip));
        // A pointer outside the set is ignored.
        assert_eq!(s.iter_from(Some(ip("10.8.0.4"))).next().unwrap().0, ip("10.9.0.2"));
    }

    #[test]
    fn iterator_across_ranges() {
        let a = RangeConf {
            range_start: Some("10.0.0.10".into()),
            range_end: Some("10.0.0.11".into()),
            ..rc("10.0.0.0/24")
        };
        let b =
            RangeConf { range_start: Some("10.0.1.1".into()), range_end: Some("10.0.1.2".into()), ..rc("10.0.1.0/24") };
        let s = RangeSet::from_conf(&[a, b]).unwrap();
        let all: Vec<IpAddr> = s.iter_from(Some(ip("10.0.0.11"))).map(|(ip, _)| ip).collect();
        // 10.0.1.1 is the second range's gateway.
        assert_eq!(all, ["10.0.1.2", "10.0.0.10", "10.0.0.11"].map(ip));
    }

    #[test]
    fn iterator_with_nothing_but_gateway() {
        let c =
            RangeConf { range_start: Some("10.0.0.1".into()), range_end: Some("10.0.0.1".into()), ..rc("10.0.0.0/24") };
        let s = RangeSet::from_conf(&[c]).unwrap();
        assert_eq!(s.iter_from(None).count(), 0);
        assert_eq!(s.iter_from(Some(ip("10.0.0.1"))).count(), 0);
        assert_eq!(s.capacity(), 0);
    }
}
