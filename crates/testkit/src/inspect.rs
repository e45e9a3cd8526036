//! Leak inspection for a node namespace and a host-local style data dir.

use std::path::Path;

use crate::netns::ip_json;
use crate::Netns;

/// Prefix of veths tern has detached and is deleting in the background.
pub const TRASH_PREFIX: &str = "tx";

/// veth links in `ns` whose name starts with `prefix` ("" for all).
///
/// tern's DEL hands the kernel's slow veth unregister to a background reaper
/// after renaming the pair to `tx*`; this first waits (up to 5 s) for those to
/// be gone, so a reaper that fails shows up as a leak here.
pub fn veth_links(ns: &Netns, prefix: &str) -> Vec<String> {
    let trash = || {
        ip_json(ns, &["link", "show", "type", "veth"])
            .iter()
            .any(|l| l["ifname"].as_str().is_some_and(|n| n.starts_with(TRASH_PREFIX)))
    };
    crate::wait_until(std::time::Duration::from_secs(5), || !trash());
    ip_json(ns, &["link", "show", "type", "veth"])
        .iter()
        .filter_map(|l| l["ifname"].as_str())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_owned)
        .collect()
}

/// nftables tables in `ns`, as `"<family> <name>"` (e.g. `"inet tern"`).
pub fn nft_tables(ns: &Netns) -> Vec<String> {
    let out = ns.run(&["nft", "list", "tables"]);
    if !out.status.success() {
        panic!(
            "testkit: `nft list tables` in netns {} failed: {}",
            ns.name(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table "))
        .map(str::to_owned)
        .collect()
}

/// Reservation files in a host-local style directory `data_dir/network`
/// (one file per reserved IP), sorted; excludes `lock` and
/// `last_reserved_ip.*`. Empty if the directory does not exist.
pub fn reservations(data_dir: &Path, network: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(data_dir.join(network)) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n != "lock" && !n.starts_with("last_reserved_ip"))
        .collect();
    v.sort();
    v
}
