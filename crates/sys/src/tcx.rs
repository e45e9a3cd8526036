//! tcx: BPF programs on a device's tc hooks without a qdisc (Linux 6.6+).
//!
//! Attached with `BPF_PROG_ATTACH` and no BPF link, a tcx program belongs to
//! the device like a tc filter does: it stays when the process that attached
//! it exits and goes when the device goes, so a CNI plugin leaves nothing to
//! clean up. (A tcx *link* would live only while a file descriptor or a
//! bpffs pin holds it; aya 0.14 makes only links.) tcx programs run before
//! the classic qdisc filters of the same hook, which run next when the
//! program returns `TC_ACT_UNSPEC` (`TCX_NEXT`).
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
/// `enum bpf_attach_type` (uapi since 6.6; Debian 12's headers predate it).
const BPF_TCX_INGRESS: u32 = 46;
const BPF_TCX_EGRESS: u32 = 47;

/// Which of the device's hooks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

/// The `BPF_PROG_ATTACH`/`DETACH` part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_ifindex: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
    relative_fd: u32,
    expected_revision: u64,
}

fn bpf(cmd: libc::c_long, attr: &ProgAttachAttr) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised prefix of `union bpf_attr` for
    // this command and we pass its exact size; the kernel only reads it.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, attr as *const ProgAttachAttr, std::mem::size_of::<ProgAttachAttr>())
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn attr(ifindex: u32, prog: BorrowedFd<'_>, hook: Hook) -> ProgAttachAttr {
    ProgAttachAttr {
        target_ifindex: ifindex,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: match hook {
            Hook::Ingress => BPF_TCX_INGRESS,
            Hook::Egress => BPF_TCX_EGRESS,
        },
        ..Default::default()
    }
}

/// Appends `prog` to the device's tcx hook (the device's namespace is the
/// calling thread's). `EEXIST`: that program is attached there already;
/// `EINVAL`: the kernel has no tcx.
pub fn attach(ifindex: u32, prog: BorrowedFd<'_>, hook: Hook) -> io::Result<()> {
    bpf(BPF_PROG_ATTACH, &attr(ifindex, prog, hook))
}

/// Removes `prog` from the device's tcx hook. `ENOENT`: it was not there.
pub fn detach(ifindex: u32, prog: BorrowedFd<'_>, hook: Hook) -> io::Result<()> {
    bpf(BPF_PROG_DETACH, &attr(ifindex, prog, hook))
}
