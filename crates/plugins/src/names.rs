//! Names of kernel objects tern creates. Deterministic, so DEL and GC can find
//! them without state.
use sha2::{Digest, Sha256};

/// Prefix of every host-side veth tern creates.
pub const HOST_VETH_PREFIX: &str = "tn";

/// Host-side veth name for an attachment: `tn` + 12 hex characters of
/// sha256(containerID, ifname); 14 bytes, under the kernel's 15.
pub fn host_veth(container_id: &str, ifname: &str) -> String {
    let mut h = Sha256::new();
    h.update(container_id.as_bytes());
    h.update([0u8]);
    h.update(ifname.as_bytes());
    let digest = h.finalize();
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{HOST_VETH_PREFIX}{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_stable_and_distinct() {
        let a = host_veth("ctr1", "eth0");
        assert_eq!(a.len(), 14);
        assert_eq!(a, host_veth("ctr1", "eth0"));
        assert_ne!(a, host_veth("ctr1", "eth1"));
        assert_ne!(a, host_veth("ctr2", "eth0"));
        assert_ne!(host_veth("ab", "c"), host_veth("a", "bc"));
    }
}

fn short_hash(parts: &[&str], bytes: usize) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    h.finalize().iter().take(bytes).map(|b| format!("{b:02x}")).collect()
}

/// The network part of an owner tag: the name itself when short, else a hash.
pub fn network_tag(network: &str) -> String {
    if network.len() <= 48 {
        network.to_string()
    } else {
        format!("#{}", short_hash(&[network], 6))
    }
}

/// The attachment part of an owner tag.
pub fn attachment_tag(container_id: &str, ifname: &str) -> String {
    if container_id.len() + ifname.len() < 78 {
        format!("{container_id}/{ifname}")
    } else {
        format!("#{}", short_hash(&[container_id, ifname], 8))
    }
}

/// Marks kernel objects (nftables elements, link aliases) with the attachment
/// that owns them, so DEL and GC find them without state. Readable when the
/// identifiers are short, hashed otherwise; always under nftables' 128-byte
/// comment limit.
pub fn owner_tag(network: &str, container_id: &str, ifname: &str) -> String {
    format!("{}/{}", network_tag(network), attachment_tag(container_id, ifname))
}

/// Splits an owner tag into (network tag, attachment tag).
pub fn split_owner_tag(tag: &str) -> Option<(&str, &str)> {
    tag.split_once('/')
}

#[cfg(test)]
mod tag_tests {
    use super::*;

    #[test]
    fn tags_fit_and_split() {
        let long = "c".repeat(200);
        for (n, c) in [("net", "ctr"), (long.as_str(), long.as_str())] {
            let t = owner_tag(n, c, "eth0");
            assert!(t.len() <= 128, "{t}");
            let (nt, at) = split_owner_tag(&t).unwrap();
            assert_eq!(nt, network_tag(n));
            assert_eq!(at, attachment_tag(c, "eth0"));
        }
        assert_eq!(owner_tag("net", "ctr", "eth0"), "net/ctr/eth0");
    }
}
