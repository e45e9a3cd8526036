//! Network namespace handles.
//!
//! A [`NetNs`] is an open file descriptor on an nsfs file (`/proc/<pid>/ns/net`,
//! `/proc/thread-self/ns/net` or a bind mount of one such as
//! `/run/netns/<name>`). Holding the descriptor keeps the namespace alive
//! even if the path goes away.
//!
//! Network namespaces are a per-*thread* attribute: [`NetNs::enter`] moves
//! only the calling thread, and always moves it back.

use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use nix::sys::stat::{fstat, stat};
use nix::sys::statfs::{fstatfs, NSFS_MAGIC};

use crate::error::{Result, SysError};

/// The calling thread's network namespace.
pub const CURRENT_THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// `NS_GET_NSTYPE` from `<linux/nsfs.h>`: `_IO(0xb7, 0x3)`.
const NS_GET_NSTYPE: u32 = 0xb703;

/// An open network namespace.
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    path: PathBuf,
}

impl NetNs {
    /// Open the network namespace at `path`.
    ///
    /// Returns [`SysError::NetnsGone`] when the path does not exist or is not
    /// an nsfs file (e.g. a `/run/netns/<name>` whose bind mount was already
    /// removed), and [`SysError::Invalid`] when it is a namespace of another
    /// type.
    pub fn open(path: impl AsRef<Path>) -> Result<NetNs> {
        let path = path.as_ref();
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(SysError::NetnsGone(path.to_path_buf())),
            Err(e) => return Err(SysError::io("open netns", path.display().to_string(), e)),
        };
        let fd = OwnedFd::from(file);
        let fs = fstatfs(&fd).map_err(|e| SysError::nix("statfs netns", path.display().to_string(), e))?;
        if fs.filesystem_type() != NSFS_MAGIC {
            return Err(SysError::NetnsGone(path.to_path_buf()));
        }
        // SAFETY: `fd` is a valid open descriptor owned by this function for
        // the duration of the call; NS_GET_NSTYPE takes no argument and only
        // returns an integer.
        let nstype = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
        if nstype < 0 {
            return Err(SysError::io(
                "query namespace type of",
                path.display().to_string(),
                std::io::Error::last_os_error(),
            ));
        }
        if nstype != libc::CLONE_NEWNET {
            return Err(SysError::Invalid(format!("{} is not a network namespace", path.display())));
        }
        Ok(NetNs { fd, path: path.to_path_buf() })
    }

    /// The calling thread's current network namespace
    /// (`/proc/thread-self/ns/net`).
    pub fn current() -> Result<NetNs> {
        NetNs::open(CURRENT_THREAD_NETNS)
    }

    /// The path this namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace file descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Duplicate the handle (a second descriptor on the same namespace).
    pub fn try_clone(&self) -> Result<NetNs> {
        let fd = self.fd.try_clone().map_err(|e| SysError::io("dup netns fd", self.path.display().to_string(), e))?;
        Ok(NetNs { fd, path: self.path.clone() })
    }

    /// The namespace's inode number (what `ip netns identify` and
    /// `/proc/<pid>/ns/net -> net:[N]` show).
    pub fn inode(&self) -> Result<u64> {
        let st = fstat(&self.fd).map_err(|e| SysError::nix("stat netns", self.path.display().to_string(), e))?;
        Ok(st.st_ino)
    }

    /// Move the calling thread into this namespace, run `f`, and move the
    /// thread back to the namespace it was in, also when `f` panics.
    ///
    /// Only the calling thread changes namespace. Sockets opened and child
    /// processes spawned by this thread inside `f` belong to this namespace;
    /// `/proc/sys/net` files opened inside `f` refer to it.
    ///
    /// If the thread cannot be moved back, the process is aborted: a thread
    /// silently left in the wrong namespace would corrupt whatever runs on it
    /// next.
    pub fn enter<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let orig = NetNs::current()?;
        setns(self.fd.as_fd(), CloneFlags::CLONE_NEWNET)
            .map_err(|e| SysError::nix("setns into", self.path.display().to_string(), e))?;
        let _restore = RestoreOnDrop(&orig);
        Ok(f())
    }

    /// Whether the calling thread is currently in this namespace (compares
    /// device and inode with `/proc/thread-self/ns/net`).
    pub fn same_as_current(&self) -> Result<bool> {
        let mine = fstat(&self.fd).map_err(|e| SysError::nix("stat netns", self.path.display().to_string(), e))?;
        let cur = stat(CURRENT_THREAD_NETNS).map_err(|e| SysError::nix("stat netns", CURRENT_THREAD_NETNS, e))?;
        Ok(mine.st_dev == cur.st_dev && mine.st_ino == cur.st_ino)
    }
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`,
/// Linux 5.14+): unique while the machine runs and never reused, unlike the
/// namespace's inode number. eBPF programs read the same value with
/// `bpf_get_netns_cookie`, which makes it the key of per-namespace state in
/// maps shared by all namespaces.
pub fn current_cookie() -> Result<u64> {
    /// `<asm-generic/socket.h>` (x86 and arm use the generic values).
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: plain syscalls on a descriptor we own; getsockopt writes at
    // most `len` bytes into `cookie`.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(SysError::nix("socket for the netns cookie", CURRENT_THREAD_NETNS, Errno::last()));
    }
    // SAFETY: fd was just returned by socket() and is owned by nothing else.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: see above.
    let rc = unsafe {
        libc::getsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len)
    };
    if rc != 0 {
        return Err(SysError::nix("getsockopt SO_NETNS_COOKIE", CURRENT_THREAD_NETNS, Errno::last()));
    }
    Ok(cookie)
}

impl AsFd for NetNs {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Moves the current thread back into the wrapped namespace when dropped;
/// aborts the process if that fails.
struct RestoreOnDrop<'a>(&'a NetNs);

impl Drop for RestoreOnDrop<'_> {
    fn drop(&mut self) {
        if let Err(e) = setns(self.0.fd.as_fd(), CloneFlags::CLONE_NEWNET) {
            eprintln!(
                "tern-sys: fatal: cannot move thread back to network namespace {}: {e}; aborting",
                self.0.path.display()
            );
            std::process::abort();
        }
    }
}

/// Create a new, empty network namespace and pin it by bind-mounting it on
/// `path` (like `ip netns add`, which uses `/run/netns/<name>`). The parent
/// directory is created if needed. Fails with [`SysError::Exists`] if `path`
/// exists.
///
/// The calling thread is moved into the new namespace for the duration of the
/// bind mount only; the loopback device of the new namespace is down.
pub fn create(path: impl AsRef<Path>) -> Result<NetNs> {
    let path = path.as_ref();
    let shown = path.display().to_string();
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| SysError::io("create directory", parent.display().to_string(), e))?;
    }
    match OpenOptions::new().write(true).create_new(true).mode(0o444).open(path) {
        Ok(_) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => return Err(SysError::Exists(format!("netns path {shown}"))),
        Err(e) => return Err(SysError::io("create netns mount point", shown, e)),
    }
    let orig = NetNs::current()?;
    let mounted = match unshare(CloneFlags::CLONE_NEWNET) {
        Err(e) => Err(SysError::nix("unshare netns for", shown.clone(), e)),
        Ok(()) => {
            let _restore = RestoreOnDrop(&orig);
            mount(Some(CURRENT_THREAD_NETNS), path, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .map_err(|e| SysError::nix("bind-mount netns on", shown.clone(), e))
        }
    };
    if let Err(e) = mounted {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    NetNs::open(path)
}

/// Unpin a namespace created by [`create`] (or `ip netns add`): lazily
/// unmount `path` and remove the file. The namespace itself lives on while
/// any process or open [`NetNs`] still refers to it. Succeeds if `path` is
/// already gone.
pub fn remove(path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(SysError::nix("unmount netns", path.display().to_string(), e)),
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SysError::io("remove netns file", path.display().to_string(), e)),
    }
}
