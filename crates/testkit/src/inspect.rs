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

/// The elements of every set and map in nftables table `family name` in
/// `ns`, as (key, owner comment); empty when the table does not exist. Map
/// elements give their key; concatenated keys are rendered as JSON.
pub fn nft_elements(ns: &Netns, family: &str, table: &str) -> Vec<(String, String)> {
    let out = ns.run(&["nft", "-j", "list", "table", family, table]);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("No such file or directory"), "nft list table {family} {table}: {err}");
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nft -j output");
    let mut elems = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(set) = item.get("map").or_else(|| item.get("set")) else { continue };
        for e in set["elem"].as_array().into_iter().flatten() {
            let key = match e.as_array() {
                Some(pair) => &pair[0],
                None => e,
            };
            let inner = key.get("elem").unwrap_or(key);
            let val = inner.get("val").unwrap_or(inner);
            let comment = inner["comment"].as_str().unwrap_or_default().to_string();
            elems.push((val.as_str().map(str::to_owned).unwrap_or_else(|| val.to_string()), comment));
        }
    }
    elems
}
