//! A synchronous rtnetlink client.
//!
//! [`Netlink`] owns one `NETLINK_ROUTE` socket and a tokio current-thread
//! runtime that drives it. Each method is one (or, for lookups after a
//! create, two) request/response round trips on the calling thread: no
//! threads, no `ip` processes.
//!
//! The socket belongs to the network namespace that was current on the
//! calling thread when it was created ([`Netlink::new`]) or to an explicit
//! one ([`Netlink::in_netns`]); it keeps operating on that namespace whatever
//! thread later uses it.
//!
//! The methods must not be called from inside an async context (they
//! `block_on` their own runtime); use `spawn_blocking` there.

mod addr;
mod detached;
mod link;
mod neigh;
mod route;
mod tc;
mod vxlan;

use std::num::NonZeroI32;

use futures::StreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::AsyncSocket;

use crate::error::{Result, SysError};
use crate::netns::NetNs;

pub use self::detached::delete_link_detached;
pub use self::link::LinkInfo;
pub use self::neigh::NeighbourInfo;
pub use self::route::{Family, RouteInfo, RouteSpec};
pub use self::tc::{IngressFilter, TC_H_CLSACT_INGRESS};
pub use self::tc::{QdiscInfo, Tbf, INGRESS_HANDLE, TBF_HANDLE, TC_H_INGRESS, TC_H_ROOT};
pub use self::vxlan::{FdbEntry, VxlanInfo, VxlanSpec};

/// An Ethernet hardware address.
pub type Mac = [u8; 6];

/// `aa:bb:cc:dd:ee:ff`, lower-case.
pub fn format_mac(m: &Mac) -> String {
    format!("{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
}

/// Parse `aa:bb:cc:dd:ee:ff` (or with `-` separators, any case).
pub fn parse_mac(s: &str) -> Option<Mac> {
    let sep = if s.contains('-') { '-' } else { ':' };
    let mut out = [0u8; 6];
    let mut n = 0;
    for part in s.split(sep) {
        if n == 6 || part.len() != 2 {
            return None;
        }
        out[n] = u8::from_str_radix(part, 16).ok()?;
        n += 1;
    }
    (n == 6).then_some(out)
}

/// The longest interface name the kernel accepts (`IFNAMSIZ - 1`).
pub const MAX_IFNAME_LEN: usize = 15;

/// Whether `name` is acceptable to the kernel as an interface name.
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
}

pub(crate) fn check_ifname(name: &str) -> Result<()> {
    if valid_ifname(name) {
        Ok(())
    } else {
        Err(SysError::Invalid(format!(
            "interface name {name:?} (must be 1-{MAX_IFNAME_LEN} bytes, no '/', ':' or whitespace)"
        )))
    }
}

/// A netlink route socket bound to the namespace it was created in.
pub struct Netlink {
    handle: rtnetlink::Handle,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").finish_non_exhaustive()
    }
}

/// An error reply from the kernel.
#[derive(Debug, Clone)]
pub(crate) struct KernelError {
    /// Positive errno.
    pub errno: i32,
    /// Extended ack message, if the kernel sent one.
    pub ext: Option<String>,
}

impl KernelError {
    /// Convert to [`SysError::Netlink`], naming the operation.
    pub(crate) fn into_sys(self, op: impl Into<String>) -> SysError {
        let e = nix::errno::Errno::from_raw(self.errno);
        let desc = errno_desc(self.errno);
        let mut msg = String::with_capacity(desc.len() + 32);
        let mut chars = desc.chars();
        if let Some(c) = chars.next() {
            msg.extend(c.to_lowercase());
            msg.push_str(chars.as_str());
        }
        msg.push_str(&format!(" ({e:?})"));
        if let Some(ext) = self.ext {
            msg.push_str(": ");
            msg.push_str(&ext);
        }
        SysError::Netlink { op: op.into(), errno: self.errno, msg }
    }
}

/// strerror(3) text, e.g. "Operation not supported" (nix's table says
/// "operation not supported on transport endpoint" for EOPNOTSUPP).
fn errno_desc(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno).to_string();
    match s.rfind(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

type KResult<T> = std::result::Result<T, KernelError>;

const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;

/// Find `NLMSGERR_ATTR_MSG` in the TLVs that start at `off` in `buf`.
fn ext_ack_msg(buf: &[u8], mut off: usize) -> Option<String> {
    off = (off + 3) & !3;
    while off + 4 <= buf.len() {
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & 0x3fff;
        if len < 4 || off + len > buf.len() {
            break;
        }
        if ty == NLMSGERR_ATTR_MSG {
            let s = &buf[off + 4..off + len];
            let s = s.split(|b| *b == 0).next().unwrap_or(&[]);
            let s = String::from_utf8_lossy(s).trim().to_string();
            return (!s.is_empty()).then_some(s);
        }
        off += (len + 3) & !3;
    }
    None
}

/// The extended ack text of an `NLMSG_ERROR` payload (everything after the
/// error code).
fn error_ext_ack(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let off = if flags & NLM_F_CAPPED != 0 {
        16
    } else {
        // The whole request is echoed back; its nlmsg_len tells its size.
        let b = payload.get(0..4)?;
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize
    };
    ext_ack_msg(payload, off)
}

fn errno_of(code: NonZeroI32) -> i32 {
    code.get().checked_abs().unwrap_or(libc::EIO)
}

impl Netlink {
    /// Open a socket in the calling thread's current network namespace.
    pub fn new() -> Result<Netlink> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|e| SysError::io("create runtime for", "netlink socket", e))?;
        let (mut conn, handle, _) = {
            // The tokio socket registers with the runtime's reactor.
            let _guard = rt.enter();
            rtnetlink::new_connection().map_err(|e| SysError::io("open", "netlink route socket", e))?
        };
        {
            let sock = conn.socket_mut().socket_mut();
            // Extended ack gives the kernel's explanation of EINVAL & co;
            // capped acks keep error replies small; strict checking makes
            // the kernel filter dumps (routes by table, addresses by link).
            let set = sock
                .set_ext_ack(true)
                .and_then(|_| sock.set_cap_ack(true))
                .and_then(|_| sock.set_netlink_get_strict_chk(true));
            set.map_err(|e| SysError::io("setsockopt", "netlink route socket", e))?;
        }
        // Dump errors arrive in NLMSG_DONE; have them forwarded to us.
        conn.set_forward_done(true);
        rt.spawn(conn);
        Ok(Netlink { handle, rt })
    }

    /// Open a socket in `ns`: enter it on the calling thread, create the
    /// socket, and come back. The socket stays bound to `ns`.
    pub fn in_netns(ns: &NetNs) -> Result<Netlink> {
        ns.enter(Netlink::new)?
    }

    /// Send one request and collect the replies. Returns the inner messages
    /// and whether the kernel flagged the dump as interrupted.
    fn exchange(&self, msg: RouteNetlinkMessage, flags: u16) -> KResult<(Vec<RouteNetlinkMessage>, bool)> {
        let mut req = NetlinkMessage::from(msg);
        req.header.flags = flags;
        let mut handle = self.handle.clone();
        self.rt.block_on(async move {
            let mut stream = handle
                .request(req)
                .map_err(|_| KernelError { errno: libc::EPIPE, ext: Some("netlink connection closed".into()) })?;
            let mut out = Vec::new();
            let mut intr = false;
            while let Some(m) = stream.next().await {
                let (hdr, payload) = m.into_parts();
                if hdr.flags & NLM_F_DUMP_INTR != 0 {
                    intr = true;
                }
                match payload {
                    NetlinkPayload::InnerMessage(inner) => out.push(inner),
                    NetlinkPayload::Error(e) => {
                        if let Some(code) = e.code {
                            return Err(KernelError {
                                errno: errno_of(code),
                                ext: error_ext_ack(hdr.flags, &e.header),
                            });
                        }
                    }
                    NetlinkPayload::Done(d) => {
                        if let Some(code) = NonZeroI32::new(d.code) {
                            return Err(KernelError { errno: errno_of(code), ext: ext_ack_msg(&d.extended_ack, 0) });
                        }
                    }
                    NetlinkPayload::Overrun(_) => {
                        return Err(KernelError { errno: libc::ENOBUFS, ext: Some("netlink overrun".into()) })
                    }
                    _ => {}
                }
            }
            Ok((out, intr))
        })
    }

    /// A request answered by an ack (or by one message, for a GET).
    fn request(&self, msg: RouteNetlinkMessage, flags: u16) -> KResult<Vec<RouteNetlinkMessage>> {
        self.exchange(msg, flags).map(|(v, _)| v)
    }

    /// A dump; retried when the kernel reports it was interrupted by a
    /// concurrent change.
    fn dump(&self, msg: RouteNetlinkMessage) -> KResult<Vec<RouteNetlinkMessage>> {
        const ATTEMPTS: usize = 5;
        for _ in 1..ATTEMPTS {
            let (v, intr) = self.exchange(msg.clone(), NLM_F_REQUEST | NLM_F_DUMP)?;
            if !intr {
                return Ok(v);
            }
        }
        let (v, intr) = self.exchange(msg, NLM_F_REQUEST | NLM_F_DUMP)?;
        if intr {
            return Err(KernelError {
                errno: libc::EINTR,
                ext: Some(format!("dump interrupted {ATTEMPTS} times by concurrent changes")),
            });
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Netlink>();
    }

    #[test]
    fn mac_roundtrip() {
        let m = [0x02, 0x42, 0xac, 0x11, 0x00, 0x0f];
        assert_eq!(format_mac(&m), "02:42:ac:11:00:0f");
        assert_eq!(parse_mac("02:42:AC:11:00:0f"), Some(m));
        assert_eq!(parse_mac("02-42-ac-11-00-0f"), Some(m));
        assert_eq!(parse_mac("02:42:ac:11:00"), None);
        assert_eq!(parse_mac("02:42:ac:11:00:0f:00"), None);
        assert_eq!(parse_mac("2:42:ac:11:00:0f"), None);
        assert_eq!(parse_mac("zz:42:ac:11:00:0f"), None);
        assert_eq!(parse_mac(""), None);
    }

    #[test]
    fn ifnames() {
        assert!(valid_ifname("eth0"));
        assert!(valid_ifname("veth0123456789a"));
        assert!(!valid_ifname("veth0123456789ab"));
        assert!(!valid_ifname(""));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname("a b"));
    }

    #[test]
    fn ext_ack_parsing() {
        // capped error: 16-byte header, then one NLMSGERR_ATTR_MSG
        let mut p = vec![0u8; 16];
        let text = b"Nexthop has invalid gateway\0";
        let len = (4 + text.len()) as u16;
        p.extend_from_slice(&len.to_ne_bytes());
        p.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        p.extend_from_slice(text);
        assert_eq!(error_ext_ack(NLM_F_CAPPED | NLM_F_ACK_TLVS, &p).as_deref(), Some("Nexthop has invalid gateway"));
        assert_eq!(error_ext_ack(NLM_F_CAPPED, &p), None);
        let e = KernelError { errno: libc::ENETUNREACH, ext: Some("x".into()) }.into_sys("add route");
        assert_eq!(e.to_string(), "add route: network is unreachable (ENETUNREACH): x");
        assert_eq!(e.errno(), Some(libc::ENETUNREACH));
    }
}
