//! Deleting a link without waiting for the kernel to finish.
//!
//! Unregistering a veth waits for RCU grace periods: 10–20 ms, most of a CNI
//! DEL. [`delete_link_detached`] sends the `RTM_DELLINK` from a forked child
//! that outlives the caller, so the caller returns at once while the kernel
//! does the same work as before.
//!
//! A fork without exec, rather than starting a helper executable: the child
//! needs one netlink request, and an exec would cost the caller the wait for
//! it and the machine a process start-up (about 1 ms of CPU per DEL).
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use rtnetlink::packet_core::{NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::packet_route::RouteNetlinkMessage;

use crate::error::{Result, SysError};

/// `NLMSG_ERROR`: the kernel's ack (error 0) or error reply.
const NLMSG_ERROR: u16 = 2;

/// Delete the link named `name` in the calling thread's network namespace
/// from a child process, without waiting for it. Returns once the child exists;
/// an error means no child was started and nothing was sent, so the caller
/// can delete inline instead.
///
/// The child is in its own process group (a runtime that signals the
/// caller's group does not take it along), has stdin/stdout/stderr on
/// `/dev/null` and no other descriptor of the caller's (a runtime reading
/// the caller's stdout to EOF, or a file lock, is not held up by it). Its
/// exit status is not collected by the caller, which is meant to be a
/// short-lived plugin process: it is re-parented when the caller exits. A
/// failed deletion is not reported; the link stays and the caller's
/// garbage collection must find it.
pub fn delete_link_detached(name: &str) -> Result<()> {
    if !super::valid_ifname(name) {
        return Err(SysError::Invalid(format!("interface name {name:?}")));
    }
    let request = del_link_request(name);
    // SAFETY: plain socket(2); the result is checked before use.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if raw < 0 {
        return Err(SysError::io("open", "netlink route socket", std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor owned by nothing else.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let devnull = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| SysError::io("open", "/dev/null", e))?;
    // SAFETY: the child runs only `child_main`, which makes async-signal-safe
    // system calls on memory prepared before the fork, and `_exit`s; it never
    // returns into Rust code that might touch locks held by other threads.
    match unsafe { libc::fork() } {
        -1 => Err(SysError::io("fork", "link deletion", std::io::Error::last_os_error())),
        0 => child_main(socket.as_raw_fd(), devnull.as_raw_fd(), &request),
        _ => Ok(()),
    }
}

/// `RTM_DELLINK` for the link named `name`, asking for an ack.
fn del_link_request(name: &str) -> Vec<u8> {
    let mut link = LinkMessage::default();
    link.attributes.push(LinkAttribute::IfName(name.to_string()));
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    header.sequence_number = 1;
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::from(RouteNetlinkMessage::DelLink(link)));
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.serialize(&mut buf);
    buf
}

/// The child: descriptors set up, the request sent, the ack read, `_exit`.
/// Exit status 0 when the kernel acked or the link was already gone.
fn child_main(socket: RawFd, devnull: RawFd, request: &[u8]) -> ! {
    // SAFETY: only async-signal-safe system calls on valid descriptors and
    // on buffers owned by this stack frame or prepared before the fork.
    unsafe {
        libc::setpgid(0, 0);
        // Move both out of the way of 0..=3 before rearranging.
        let sock = libc::fcntl(socket, libc::F_DUPFD, 64);
        let null = libc::fcntl(devnull, libc::F_DUPFD, 64);
        if sock < 0 || null < 0 {
            libc::_exit(2);
        }
        for fd in 0..3 {
            libc::dup2(null, fd);
        }
        libc::dup2(sock, 3);
        libc::syscall(libc::SYS_close_range, 4u32, u32::MAX, 0u32);
        let sent = libc::send(3, request.as_ptr().cast(), request.len(), 0);
        if sent != request.len() as isize {
            libc::_exit(1);
        }
        let mut reply = [0u8; 1024];
        loop {
            let n = libc::recv(3, reply.as_mut_ptr().cast(), reply.len(), 0);
            if n < 0 && *libc::__errno_location() == libc::EINTR {
                continue;
            }
            libc::_exit(match ack_status(&reply[..n.max(0) as usize]) {
                Some(0) | Some(libc::ENODEV) => 0,
                _ => 1,
            });
        }
    }
}

/// The positive errno of the first message when it is an `NLMSG_ERROR`
/// (0 for an ack); `None` for anything else.
fn ack_status(reply: &[u8]) -> Option<i32> {
    let kind = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
    if kind != NLMSG_ERROR {
        return None;
    }
    let error = i32::from_ne_bytes(reply.get(16..20)?.try_into().ok()?);
    Some(-error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_is_a_del_link_for_the_name_with_ack() {
        let buf = del_link_request("tx0123");
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len());
        assert_eq!(u16::from_ne_bytes(buf[4..6].try_into().unwrap()), libc::RTM_DELLINK);
        let flags = u16::from_ne_bytes(buf[6..8].try_into().unwrap());
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK);
        // After the 16-byte header and the 16-byte ifinfomsg (index 0): IFLA_IFNAME.
        assert_eq!(i32::from_ne_bytes(buf[20..24].try_into().unwrap()), 0);
        assert_eq!(u16::from_ne_bytes(buf[34..36].try_into().unwrap()), libc::IFLA_IFNAME);
        assert_eq!(&buf[36..43], b"tx0123\0");
    }

    #[test]
    fn ack_status_reads_errors_and_acks() {
        let mut reply = vec![0u8; 36];
        reply[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
        assert_eq!(ack_status(&reply), Some(0));
        reply[16..20].copy_from_slice(&(-libc::ENODEV).to_ne_bytes());
        assert_eq!(ack_status(&reply), Some(libc::ENODEV));
        reply[4..6].copy_from_slice(&16u16.to_ne_bytes());
        assert_eq!(ack_status(&reply), None);
        assert_eq!(ack_status(&[]), None);
    }
}
