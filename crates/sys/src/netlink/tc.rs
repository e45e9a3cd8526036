//! Traffic control (`tc qdisc`, `tc filter`) over rtnetlink: the few qdiscs
//! and filters traffic shaping needs.
//!
//! * a token bucket filter (`tbf`) as a link's root qdisc;
//! * the `ingress` qdisc (`ffff:`) and, under it, a match-all `u32` filter
//!   whose `mirred` action redirects every packet to another link (an ifb),
//!   the standard way to shape what a link *receives*. The same filter can
//!   go under the ingress hook of a `clsact` qdisc someone else made
//!   ([`TC_H_CLSACT_INGRESS`], e.g. the eBPF fast path's), at an explicit
//!   priority so it runs before that qdisc's own filters; it is listed
//!   ([`Netlink::ingress_filters`]) and removed
//!   ([`Netlink::delete_ingress_filter`]) one filter at a time, never with
//!   the qdisc.
//!
//! rtnetlink 0.24 types `ingress`, `u32` and `mirred` but not `tbf`, whose
//! options are sent and read here as raw attributes (`TCA_TBF_PARMS`,
//! `TCA_TBF_RATE64`, `TCA_TBF_BURST`). Rates are in bytes per second, sizes
//! in bytes, as the kernel takes them.

use rtnetlink::packet_core::{DefaultNla, Nla, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST};
use rtnetlink::packet_route::tc::{
    TcAction, TcActionAttribute, TcActionMirror, TcActionMirrorOption, TcActionOption, TcActionType, TcAttribute,
    TcFilterU32, TcFilterU32Option, TcHandle, TcHeader, TcMessage, TcMirror, TcMirrorActionType, TcOption, TcU32Key,
    TcU32Selector, TcU32SelectorFlags,
};
use rtnetlink::packet_route::RouteNetlinkMessage;

use super::{KernelError, Netlink};
use crate::error::{Result, SysError};

/// `TC_H_ROOT`: the parent of a link's root qdisc.
pub const TC_H_ROOT: u32 = 0xFFFF_FFFF;
/// `TC_H_INGRESS`: the parent of the `ingress` (and `clsact`) qdisc.
pub const TC_H_INGRESS: u32 = 0xFFFF_FFF1;
/// Handle of the `ingress` qdisc (`ffff:`).
pub const INGRESS_HANDLE: u32 = 0xFFFF_0000;
/// Handle given to the root tbf (`1:`).
pub const TBF_HANDLE: u32 = 0x0001_0000;
/// The parent of filters on the ingress hook of a `clsact` qdisc
/// (`ffff:fff2`, `TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)`). An `ingress`
/// qdisc takes it too, so it names "what the link receives" for both kinds.
pub const TC_H_CLSACT_INGRESS: u32 = 0xFFFF_FFF2;

const ETH_P_ALL: u16 = 0x0003;
const TC_LINKLAYER_ETHERNET: u8 = 1;
/// The kernel's psched tick is 2^6 ns (`PSCHED_SHIFT`).
const PSCHED_SHIFT: u32 = 6;
const NSEC_PER_SEC: u128 = 1_000_000_000;

const TCA_TBF_PARMS: u16 = 1;
const TCA_TBF_RATE64: u16 = 4;
const TCA_TBF_BURST: u16 = 6;
/// `struct tc_tbf_qopt`: two `tc_ratespec` (12 bytes each), limit, buffer, mtu.
const TBF_QOPT_LEN: usize = 36;

/// Token bucket parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tbf {
    /// Bytes per second.
    pub rate: u64,
    /// Bucket size in bytes.
    pub burst: u32,
    /// Bytes that may wait in the queue.
    pub limit: u32,
}

impl Tbf {
    /// The bucket as a qdisc dump reports it ([`QdiscInfo::tbf_buffer`]):
    /// the time `burst` takes at `rate` in 64 ns ticks, modulo 2^32 (the
    /// dump's field has 32 bits, so buckets over ~275 s wrap).
    pub fn buffer_ticks(&self) -> u32 {
        if self.rate == 0 {
            return u32::MAX;
        }
        let ns = self.burst as u128 * NSEC_PER_SEC / self.rate as u128;
        (ns >> PSCHED_SHIFT) as u32
    }

    /// Whether a dumped tbf (`reported`, with its raw `buffer` ticks) is this
    /// one: same rate and limit, and the same bucket up to the kernel's
    /// rounding.
    pub fn matches(&self, reported: &Tbf, buffer: u32) -> bool {
        let want = self.buffer_ticks();
        // The kernel's rate arithmetic is exact to 2^-31; ticks truncate.
        let full = (self.burst as u128 * NSEC_PER_SEC / self.rate.max(1) as u128) >> PSCHED_SHIFT;
        let slack = 2 + (full / 1_000_000) as u64;
        let diff = want.wrapping_sub(buffer).min(buffer.wrapping_sub(want));
        reported.rate == self.rate && reported.limit == self.limit && diff as u64 <= slack
    }
}

/// A qdisc as reported by `RTM_GETQDISC`.
#[derive(Debug, Clone)]
pub struct QdiscInfo {
    pub ifindex: u32,
    pub handle: u32,
    pub parent: u32,
    /// "tbf", "ingress", "clsact", "noqueue", ...
    pub kind: String,
    /// A tbf's parameters as the kernel reports them. The kernel keeps the
    /// bucket as a time, so `burst` is recomputed from it and may differ
    /// from the configured size by rounding (at most `rate` x 64 ns + 1), or
    /// entirely for buckets over ~275 s (see [`Tbf::buffer_ticks`]); compare
    /// with [`Tbf::matches`].
    pub tbf: Option<Tbf>,
    /// A tbf's bucket as reported: 64 ns ticks, modulo 2^32.
    pub tbf_buffer: Option<u32>,
}

impl QdiscInfo {
    /// The link's root qdisc.
    pub fn is_root(&self) -> bool {
        self.parent == TC_H_ROOT
    }

    /// The link's `ingress` or `clsact` qdisc.
    pub fn is_ingress(&self) -> bool {
        self.parent == TC_H_INGRESS
    }
}

/// A filter on a link's ingress hook (under an `ingress` qdisc or a
/// `clsact`'s ingress), as reported by `RTM_GETTFILTER`. A `u32` filter
/// shows up as several entries of one priority (the classifier, its hash
/// table, each key); the ones with actions have their own handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngressFilter {
    pub ifindex: u32,
    /// 1 runs first.
    pub priority: u16,
    /// Host order (`ETH_P_ALL` is 3).
    pub protocol: u16,
    pub handle: u32,
    /// "u32", "bpf", "matchall", ...
    pub kind: String,
    /// The link a `mirred` action of this entry redirects or mirrors packets
    /// to (the index is kept after that link is deleted).
    pub redirect_to: Option<u32>,
}

const CREATE: u16 = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
const ACK: u16 = NLM_F_REQUEST | NLM_F_ACK;

fn dev(ifindex: u32) -> String {
    format!("link index {ifindex}")
}

fn tc_message(ifindex: u32, parent: u32, handle: u32, info: u32, attributes: Vec<TcAttribute>) -> TcMessage {
    let header = TcHeader {
        index: ifindex as i32,
        parent: TcHandle::from(parent),
        handle: TcHandle::from(handle),
        info,
        ..Default::default()
    };
    TcMessage::from_parts(header, attributes)
}

/// `struct tc_ratespec` for `rate` bytes/s (saturated; `TCA_TBF_RATE64`
/// carries larger rates).
fn ratespec(rate: u64) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[1] = TC_LINKLAYER_ETHERNET;
    b[8..12].copy_from_slice(&(rate.min(u32::MAX as u64) as u32).to_ne_bytes());
    b
}

fn tbf_options(t: &Tbf) -> Vec<TcOption> {
    let mut qopt = Vec::with_capacity(TBF_QOPT_LEN);
    qopt.extend_from_slice(&ratespec(t.rate));
    qopt.extend_from_slice(&[0u8; 12]); // no peak rate
    qopt.extend_from_slice(&t.limit.to_ne_bytes());
    // Ignored by the kernel next to TCA_TBF_BURST; what a dump will show.
    qopt.extend_from_slice(&t.buffer_ticks().to_ne_bytes());
    qopt.extend_from_slice(&0u32.to_ne_bytes()); // mtu: only with a peak rate
    let mut opts = vec![TcOption::Other(DefaultNla::new(TCA_TBF_PARMS, qopt))];
    if t.rate > u32::MAX as u64 {
        opts.push(TcOption::Other(DefaultNla::new(TCA_TBF_RATE64, t.rate.to_ne_bytes().to_vec())));
    }
    // The bucket in bytes: the kernel derives the time from it exactly.
    opts.push(TcOption::Other(DefaultNla::new(TCA_TBF_BURST, t.burst.to_ne_bytes().to_vec())));
    opts
}

/// Walk the netlink attributes in `buf`: (type, value).
fn nlas(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= buf.len() {
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & 0x3fff;
        if len < 4 || off + len > buf.len() {
            break;
        }
        out.push((ty, &buf[off + 4..off + len]));
        off += (len + 3) & !3;
    }
    out
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Decode a tbf's `TCA_OPTIONS` (the nested attributes, as raw bytes), with
/// the raw bucket ticks.
fn parse_tbf(options: &[u8]) -> Option<(Tbf, u32)> {
    let mut qopt = None;
    let mut rate64 = None;
    for (ty, v) in nlas(options) {
        match ty {
            TCA_TBF_PARMS if v.len() >= TBF_QOPT_LEN => qopt = Some(v),
            TCA_TBF_RATE64 if v.len() >= 8 => {
                rate64 = Some(u64::from_ne_bytes(v[..8].try_into().expect("8 bytes")));
            }
            _ => {}
        }
    }
    let q = qopt?;
    let rate = rate64.unwrap_or(u32_at(q, 8) as u64);
    let limit = u32_at(q, 24);
    let ticks = u32_at(q, 28);
    let buffer_ns = (ticks as u128) << PSCHED_SHIFT;
    let burst = (buffer_ns * rate as u128).div_ceil(NSEC_PER_SEC).min(u32::MAX as u128) as u32;
    Some((Tbf { rate, burst, limit }, ticks))
}

/// The raw value of the (single, unparsed) `TCA_OPTIONS` of a qdisc kind
/// rtnetlink does not know.
fn raw_options(attrs: &[TcAttribute]) -> Option<Vec<u8>> {
    attrs.iter().find_map(|a| match a {
        TcAttribute::Options(opts) => opts.iter().find_map(|o| match o {
            TcOption::Other(nla) => {
                let mut buf = vec![0u8; nla.value_len()];
                nla.emit_value(&mut buf);
                Some(buf)
            }
            _ => None,
        }),
        _ => None,
    })
}

impl Netlink {
    /// The qdiscs of link `ifindex` (root, ingress, and any children).
    pub fn qdiscs(&self, ifindex: u32) -> Result<Vec<QdiscInfo>> {
        let req = tc_message(ifindex, 0, 0, 0, Vec::new());
        let msgs = self
            .dump(RouteNetlinkMessage::GetQueueDiscipline(req))
            .map_err(|e| e.into_sys(format!("dump qdiscs of {}", dev(ifindex))))?;
        let mut out = Vec::new();
        for m in msgs {
            let RouteNetlinkMessage::NewQueueDiscipline(m) = m else { continue };
            if m.header.index as u32 != ifindex {
                continue;
            }
            let kind = m
                .attributes
                .iter()
                .find_map(|a| match a {
                    TcAttribute::Kind(k) => Some(k.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            let tbf = if kind == "tbf" { raw_options(&m.attributes).as_deref().and_then(parse_tbf) } else { None };
            out.push(QdiscInfo {
                ifindex,
                handle: m.header.handle.into(),
                parent: m.header.parent.into(),
                kind,
                tbf: tbf.map(|(t, _)| t),
                tbf_buffer: tbf.map(|(_, b)| b),
            });
        }
        Ok(out)
    }

    /// `tc qdisc add dev <ifindex> root handle 1: tbf rate .. burst .. limit ..`.
    /// [`SysError::Exists`] if the link already has a root qdisc of its own
    /// (the default `noqueue`/`pfifo_fast` does not count).
    pub fn add_root_tbf(&self, ifindex: u32, tbf: &Tbf) -> Result<()> {
        if tbf.rate == 0 || tbf.burst == 0 || tbf.limit == 0 {
            return Err(SysError::Invalid(format!("tbf with a zero rate, burst or limit: {tbf:?}")));
        }
        let attrs = vec![TcAttribute::Kind("tbf".into()), TcAttribute::Options(tbf_options(tbf))];
        let m = tc_message(ifindex, TC_H_ROOT, TBF_HANDLE, 0, attrs);
        self.tc_create(RouteNetlinkMessage::NewQueueDiscipline(m), ifindex, "root tbf")
    }

    /// `tc qdisc add dev <ifindex> handle ffff: ingress`. [`SysError::Exists`]
    /// if the link has an `ingress` or `clsact` qdisc already.
    pub fn add_ingress_qdisc(&self, ifindex: u32) -> Result<()> {
        let m = tc_message(ifindex, TC_H_INGRESS, INGRESS_HANDLE, 0, vec![TcAttribute::Kind("ingress".into())]);
        self.tc_create(RouteNetlinkMessage::NewQueueDiscipline(m), ifindex, "ingress qdisc")
    }

    fn tc_create(&self, msg: RouteNetlinkMessage, ifindex: u32, what: &str) -> Result<()> {
        match self.request(msg, CREATE) {
            Ok(_) => Ok(()),
            Err(KernelError { errno: libc::EEXIST, .. }) => {
                Err(SysError::Exists(format!("{what} on {}", dev(ifindex))))
            }
            Err(KernelError { errno: libc::ENODEV, .. }) => Err(SysError::NotFound(dev(ifindex))),
            Err(e) => Err(e.into_sys(format!("add {what} to {}", dev(ifindex)))),
        }
    }

    /// `tc qdisc del dev <ifindex> parent <parent> handle <handle>`; `false`
    /// if the link or the qdisc does not exist.
    pub fn delete_qdisc(&self, ifindex: u32, parent: u32, handle: u32) -> Result<bool> {
        // The kernel answers EINVAL ("Invalid handle") both for a handle that
        // is not there and for a bad request: look first.
        let present = match self.qdiscs(ifindex) {
            Ok(qs) => qs.iter().any(|q| q.parent == parent && q.handle == handle),
            Err(SysError::Netlink { errno: libc::ENODEV, .. }) => false,
            Err(e) => return Err(e),
        };
        if !present {
            return Ok(false);
        }
        let m = tc_message(ifindex, parent, handle, 0, Vec::new());
        match self.request(RouteNetlinkMessage::DelQueueDiscipline(m), ACK) {
            Ok(_) => Ok(true),
            Err(KernelError { errno: libc::ENODEV | libc::ENOENT, .. }) => Ok(false),
            Err(e) => Err(e.into_sys(format!("delete qdisc {handle:#x} (parent {parent:#x}) of {}", dev(ifindex)))),
        }
    }

    /// `tc filter add dev <ifindex> parent ffff: protocol all u32 match u32 0 0
    /// action mirred egress redirect dev <to>`: everything `ifindex` receives
    /// goes out of `to` instead. Needs the ingress qdisc.
    pub fn add_ingress_redirect(&self, ifindex: u32, to: u32) -> Result<()> {
        self.add_ingress_redirect_at(ifindex, to, INGRESS_HANDLE, 0)
    }

    /// [`Netlink::add_ingress_redirect`] under `parent` ([`INGRESS_HANDLE`],
    /// or [`TC_H_CLSACT_INGRESS`] for a `clsact` qdisc) at `priority` (`0`:
    /// the kernel picks one). A lower priority runs first: under a `clsact`
    /// whose direct-action BPF filter would otherwise decide the packet's
    /// fate, the redirect needs one below that filter's. Fails when a filter
    /// of another kind or protocol has that priority.
    pub fn add_ingress_redirect_at(&self, ifindex: u32, to: u32, parent: u32, priority: u16) -> Result<()> {
        let mut sel = TcU32Selector::default();
        sel.flags = TcU32SelectorFlags::Terminal;
        sel.nkeys = 1;
        sel.keys = vec![TcU32Key::default()];
        let mut mirror = TcMirror::default();
        mirror.generic.action = TcActionType::Stolen;
        mirror.eaction = TcMirrorActionType::EgressRedir;
        mirror.ifindex = to;
        let mut action = TcAction::default();
        action.attributes = vec![
            TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(mirror))]),
        ];
        let options = vec![
            TcOption::U32(TcFilterU32Option::Selector(sel)),
            TcOption::U32(TcFilterU32Option::Action(vec![action])),
        ];
        let attrs = vec![TcAttribute::Kind(TcFilterU32::KIND.to_string()), TcAttribute::Options(options)];
        let m = tc_message(ifindex, parent, 0, filter_info(priority, ETH_P_ALL), attrs);
        match self.request(RouteNetlinkMessage::NewTrafficFilter(m), CREATE) {
            Ok(_) => Ok(()),
            Err(KernelError { errno: libc::ENODEV, .. }) => Err(SysError::NotFound(dev(ifindex))),
            Err(e) => Err(e.into_sys(format!(
                "add redirect filter (priority {priority}) from {} to {}",
                dev(ifindex),
                dev(to)
            ))),
        }
    }

    /// The links that filters on the ingress hook of `ifindex` (under an
    /// `ingress` or a `clsact` qdisc) redirect or mirror packets to
    /// (`mirred` actions); empty without either qdisc.
    pub fn ingress_redirects(&self, ifindex: u32) -> Result<Vec<u32>> {
        Ok(self.ingress_filters(ifindex)?.into_iter().filter_map(|f| f.redirect_to).collect())
    }

    /// Every filter entry on the ingress hook of `ifindex`, under an
    /// `ingress` or a `clsact` qdisc; empty without either (or without the
    /// link).
    pub fn ingress_filters(&self, ifindex: u32) -> Result<Vec<IngressFilter>> {
        let m = tc_message(ifindex, TC_H_CLSACT_INGRESS, 0, 0, Vec::new());
        let msgs = match self.dump(RouteNetlinkMessage::GetTrafficFilter(m)) {
            Ok(v) => v,
            Err(KernelError { errno: libc::ENODEV | libc::ENOENT | libc::EINVAL, .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e.into_sys(format!("dump ingress filters of {}", dev(ifindex)))),
        };
        let mut out = Vec::new();
        for m in msgs {
            let RouteNetlinkMessage::NewTrafficFilter(m) = m else { continue };
            if m.header.index as u32 != ifindex {
                continue;
            }
            let mut kind = String::new();
            let mut redirect_to = None;
            for a in &m.attributes {
                match a {
                    TcAttribute::Kind(k) => kind = k.clone(),
                    TcAttribute::Options(opts) => {
                        for o in opts {
                            let TcOption::U32(TcFilterU32Option::Action(actions)) = o else { continue };
                            for aa in actions.iter().flat_map(|act| &act.attributes) {
                                let TcActionAttribute::Options(aopts) = aa else { continue };
                                for ao in aopts {
                                    if let TcActionOption::Mirror(TcActionMirrorOption::Parms(p)) = ao {
                                        redirect_to = Some(p.ifindex);
                                    }
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            out.push(IngressFilter {
                ifindex,
                priority: (m.header.info >> 16) as u16,
                protocol: u16::from_be((m.header.info & 0xFFFF) as u16),
                handle: m.header.handle.into(),
                kind,
                redirect_to,
            });
        }
        Ok(out)
    }

    /// `tc filter del dev <ifindex> parent ffff:fff2 prio .. handle .. <kind>`:
    /// exactly this entry of [`Netlink::ingress_filters`] (the kernel drops
    /// the classifier with its last filter), never the qdisc or the other
    /// filters. `false` if it (or the link) is gone.
    pub fn delete_ingress_filter(&self, filter: &IngressFilter) -> Result<bool> {
        // Priority 0 or handle 0 would delete every filter of the hook, or of
        // the priority.
        if filter.priority == 0 || filter.handle == 0 || filter.kind.is_empty() {
            return Err(SysError::Invalid(format!("not a single filter: {filter:?}")));
        }
        let present = self
            .ingress_filters(filter.ifindex)?
            .iter()
            .any(|f| f.priority == filter.priority && f.handle == filter.handle && f.kind == filter.kind);
        if !present {
            return Ok(false);
        }
        let info = filter_info(filter.priority, filter.protocol);
        let attrs = vec![TcAttribute::Kind(filter.kind.clone())];
        let m = tc_message(filter.ifindex, TC_H_CLSACT_INGRESS, filter.handle, info, attrs);
        match self.request(RouteNetlinkMessage::DelTrafficFilter(m), ACK) {
            Ok(_) => Ok(true),
            Err(KernelError { errno: libc::ENODEV | libc::ENOENT, .. }) => Ok(false),
            Err(e) => Err(e.into_sys(format!(
                "delete {} filter {:#x} (priority {}) of {}",
                filter.kind,
                filter.handle,
                filter.priority,
                dev(filter.ifindex)
            ))),
        }
    }
}

/// A filter's `tcm_info`: priority << 16 | protocol in network order.
fn filter_info(priority: u16, protocol: u16) -> u32 {
    (priority as u32) << 16 | protocol.to_be() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_info_packs_priority_and_protocol() {
        let info = filter_info(1, ETH_P_ALL);
        assert_eq!(info >> 16, 1);
        assert_eq!(u16::from_be((info & 0xFFFF) as u16), ETH_P_ALL);
        // What the original add_ingress_redirect sent: the kernel picks.
        assert_eq!(filter_info(0, ETH_P_ALL), ETH_P_ALL.to_be() as u32);
    }

    #[test]
    fn tbf_options_round_trip() {
        for t in [
            Tbf { rate: 3_000_000, burst: 32_768, limit: 107_768 },
            Tbf { rate: 1, burst: 1, limit: 1 },
            Tbf { rate: 10_000_000_000, burst: 4_000_000_000, limit: u32::MAX },
            // A bucket of ~2100 s: the reported ticks wrap.
            Tbf { rate: 125_000, burst: 268_435_455, limit: 268_438_580 },
        ] {
            let mut raw = Vec::new();
            for o in tbf_options(&t) {
                let TcOption::Other(nla) = o else { panic!("raw nla expected") };
                let len = 4 + nla.value_len();
                raw.extend_from_slice(&(len as u16).to_ne_bytes());
                raw.extend_from_slice(&nla.kind().to_ne_bytes());
                let mut v = vec![0u8; nla.value_len()];
                nla.emit_value(&mut v);
                raw.extend_from_slice(&v);
                raw.resize((raw.len() + 3) & !3, 0);
            }
            let (back, ticks) = parse_tbf(&raw).expect("parses");
            assert!(t.matches(&back, ticks), "{t:?} -> {back:?} {ticks}");
            assert!(!Tbf { burst: t.burst / 2 + 1, ..t }.matches(&back, ticks) || t.burst < 4);
            assert_eq!(back.rate, t.rate);
            assert_eq!(back.limit, t.limit);
            // The bucket goes through a 64 ns tick: off by at most rate x 64 ns.
            if t.buffer_ticks() < u32::MAX / 2 {
                let slack = (t.rate as u128 * 64).div_ceil(NSEC_PER_SEC) as u32 + 1;
                assert!(back.burst.abs_diff(t.burst) <= slack, "{t:?} -> {back:?}");
            }
        }
    }
}
