//! `/proc/sys` access.
//!
//! Keys are accepted as `net.ipv4.ip_forward` or `net/ipv4/ip_forward`. A key
//! containing a `/` is used verbatim; otherwise every `.` becomes a `/`.
//! Interface names may contain dots (`eth0.100`), so keys naming such an
//! interface must be given in the slash form:
//! `net/ipv4/conf/eth0.100/forwarding`.
//!
//! `/proc/sys/net` shows the network namespace of the calling **thread** at
//! the time the file is opened, so to read or write a sysctl of another
//! namespace call these functions inside [`crate::netns::NetNs::enter`].

use std::io::Write;
use std::path::PathBuf;

use crate::error::{Result, SysError};

/// The `/proc/sys` path for `key`.
pub fn path(key: &str) -> PathBuf {
    let key = key.trim_start_matches('/');
    let rel = if key.contains('/') { key.to_string() } else { key.replace('.', "/") };
    PathBuf::from("/proc/sys").join(rel)
}

/// Read a sysctl; the value is trimmed.
pub fn read(key: &str) -> Result<String> {
    let p = path(key);
    std::fs::read_to_string(&p)
        .map(|s| s.trim().to_string())
        .map_err(|e| SysError::io("read sysctl", p.display().to_string(), e))
}

/// Write a sysctl (a single `write(2)` of `value`, no trailing newline).
pub fn write(key: &str, value: &str) -> Result<()> {
    let p = path(key);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .map_err(|e| SysError::io("open sysctl", p.display().to_string(), e))?;
    f.write_all(value.as_bytes())
        .map_err(|e| SysError::io(format!("write {value:?} to sysctl"), p.display().to_string(), e))
}

#[cfg(test)]
mod tests {
    use super::path;
    use std::path::Path;

    #[test]
    fn key_forms() {
        assert_eq!(path("net.ipv4.ip_forward"), Path::new("/proc/sys/net/ipv4/ip_forward"));
        assert_eq!(path("net/ipv4/ip_forward"), Path::new("/proc/sys/net/ipv4/ip_forward"));
        assert_eq!(path("net/ipv4/conf/eth0.100/forwarding"), Path::new("/proc/sys/net/ipv4/conf/eth0.100/forwarding"));
        assert_eq!(path("/net/core/somaxconn"), Path::new("/proc/sys/net/core/somaxconn"));
    }
}
