//! The single error type of `tern-sys`.

use std::path::PathBuf;

/// Every fallible operation in this crate returns this error.
///
/// Messages are lower-case and name the operation and the object (interface
/// name or index, address, path) so they can be surfaced verbatim in a CNI
/// error result.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    /// The object (a link, an address, a route...) does not exist. The
    /// string describes the object, e.g. `link index 7`.
    #[error("{0} not found")]
    NotFound(String),

    /// The object already exists. The string describes the object, e.g.
    /// `link "veth1234" in netns /run/netns/x`.
    #[error("{0} already exists")]
    Exists(String),

    /// The network namespace path does not exist (any more), or is not a
    /// network namespace.
    #[error("network namespace {} does not exist", .0.display())]
    NetnsGone(PathBuf),

    /// The kernel rejected a netlink request. `errno` is positive; `msg` is
    /// the errno description plus the kernel's extended ack text, if any.
    #[error("{op}: {msg}")]
    Netlink { op: String, errno: i32, msg: String },

    /// A system call on a file (or a namespace file descriptor) failed.
    #[error("{op} {path}: {source}")]
    Io {
        op: String,
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// An external command (only `nft`) failed.
    #[error("command `{cmd}` failed ({status}): {stderr}")]
    Command { cmd: String, status: String, stderr: String },

    /// The caller passed something the kernel would reject anyway (an
    /// over-long interface name, mixed address families...).
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// `std::result::Result` specialised to [`SysError`].
pub type Result<T> = std::result::Result<T, SysError>;

impl SysError {
    /// The errno this error corresponds to, when there is one.
    ///
    /// `NotFound` maps to `ENOENT`, `Exists` to `EEXIST`, `NetnsGone` to
    /// `ENOENT`, `Invalid` to `EINVAL`; `Netlink` and `Io` report the errno
    /// the kernel returned. `Command` has none.
    pub fn errno(&self) -> Option<i32> {
        match self {
            SysError::NotFound(_) | SysError::NetnsGone(_) => Some(libc::ENOENT),
            SysError::Exists(_) => Some(libc::EEXIST),
            SysError::Netlink { errno, .. } => Some(*errno),
            SysError::Io { source, .. } => source.raw_os_error(),
            SysError::Command { .. } => None,
            SysError::Invalid(_) => Some(libc::EINVAL),
        }
    }

    /// True for [`SysError::NotFound`] and [`SysError::NetnsGone`].
    pub fn is_not_found(&self) -> bool {
        matches!(self, SysError::NotFound(_) | SysError::NetnsGone(_))
    }

    /// True for [`SysError::Exists`].
    pub fn is_exists(&self) -> bool {
        matches!(self, SysError::Exists(_))
    }

    pub(crate) fn io(op: impl Into<String>, path: impl Into<String>, source: std::io::Error) -> Self {
        SysError::Io { op: op.into(), path: path.into(), source }
    }

    pub(crate) fn nix(op: impl Into<String>, path: impl Into<String>, errno: nix::errno::Errno) -> Self {
        SysError::io(op, path, std::io::Error::from_raw_os_error(errno as i32))
    }
}
