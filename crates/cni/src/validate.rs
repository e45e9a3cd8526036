//! Identifier rules shared by libcni and the reference skel.
use crate::error::{CniError, Code};

/// `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`
fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

pub fn container_id(id: &str) -> Result<(), CniError> {
    if id.is_empty() {
        return Err(CniError::new(Code::UnknownContainer, "missing containerID (CNI_CONTAINERID)"));
    }
    if !is_identifier(id) {
        return Err(
            CniError::new(Code::InvalidEnv, "invalid characters in containerID (CNI_CONTAINERID)").with_details(id)
        );
    }
    Ok(())
}

/// Linux interface names: 1..=15 bytes, not `.`/`..`, no `/`, `:` or whitespace.
pub fn interface_name(name: &str) -> Result<(), CniError> {
    let bad = |msg: &str| Err(CniError::new(Code::InvalidEnv, format!("{msg} (CNI_IFNAME)")).with_details(name));
    if name.is_empty() {
        return bad("interface name is empty");
    }
    if name.len() > 15 {
        return bad("interface name is too long");
    }
    if name == "." || name == ".." {
        return bad("interface name is . or ..");
    }
    if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        return bad("interface name contains / or : or whitespace");
    }
    Ok(())
}

pub fn network_name(name: &str) -> Result<(), CniError> {
    if name.is_empty() {
        return Err(CniError::new(Code::InvalidNetworkConfig, "missing network name (name)"));
    }
    if !is_identifier(name) {
        return Err(CniError::new(Code::InvalidNetworkConfig, "invalid characters found in network name (name)")
            .with_details(name));
    }
    Ok(())
}

/// A plugin `type` (the binary name looked up in CNI_PATH): non-empty, no
/// path separator, not `.` or `..` (libcni `FindInPath`). `field` names the
/// key in messages (`type`, `ipam.type`, `plugins[1].type`).
pub fn plugin_type(t: &str, field: &str) -> Result<(), CniError> {
    if t.is_empty() {
        return Err(CniError::new(Code::InvalidNetworkConfig, format!("missing plugin type ({field})")));
    }
    if t.contains('/') || t.contains('\\') || t == "." || t == ".." || t.contains('\0') {
        return Err(CniError::new(
            Code::InvalidNetworkConfig,
            format!("invalid plugin type {t:?}: must be a plain file name, without path separators ({field})"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(container_id("abc-1.2_x").is_ok());
        assert_eq!(container_id("").unwrap_err().code, 3);
        assert_eq!(container_id("-bad").unwrap_err().code, 4);
        assert_eq!(container_id("bad/id").unwrap_err().code, 4);
        assert_eq!(interface_name("0123456789abcdef").unwrap_err().code, 4);
        assert!(interface_name("0123456789abcde").is_ok());
        assert_eq!(interface_name("a b").unwrap_err().code, 4);
        assert_eq!(network_name("bad net").unwrap_err().code, 7);
        assert!(plugin_type("bridge", "type").is_ok());
        for bad in ["", ".", "..", "a/b", "a\\b"] {
            assert_eq!(plugin_type(bad, "type").unwrap_err().code, 7, "{bad:?}");
        }
    }
}
