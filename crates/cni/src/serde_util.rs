//! Small serde helpers shared by configs and results.
//!
//! Go's encoding/json (libcni, the reference plugins) decodes `null` into a
//! zero value and an empty string into a nil `net.IP`. Other producers of
//! CNI JSON rely on that, so tern accepts the same inputs.
use std::net::IpAddr;

use serde::de::{DeserializeOwned, Error as _};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// `null` (or a missing field, together with `#[serde(default)]`) becomes
/// `T::default()`.
pub(crate) fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// An optional IP address where `null` and `""` both mean "none".
pub(crate) fn opt_ip<'de, D>(d: D) -> Result<Option<IpAddr>, D::Error>
where
    D: Deserializer<'de>,
{
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| D::Error::custom(format!("invalid IP address {s:?}"))),
    }
}

/// Join a field name and a serde_path_to_error path: `ips` + `[0].address`
/// gives `ips[0].address`, `dns` + `nameservers` gives `dns.nameservers`.
pub(crate) fn join_path(prefix: &str, path: &str) -> String {
    match (prefix.is_empty(), path) {
        (_, "." | "") => prefix.to_string(),
        (true, p) => p.to_string(),
        (false, p) if p.starts_with('[') => format!("{prefix}{p}"),
        (false, p) => format!("{prefix}.{p}"),
    }
}

/// Deserialize `v`, returning the failing field path (joined onto `prefix`)
/// and serde's message on error.
pub(crate) fn decode_at<T: DeserializeOwned>(v: &Value, prefix: &str) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(v).map_err(|e| (join_path(prefix, &e.path().to_string()), e.inner().to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_paths() {
        assert_eq!(join_path("ips", "[0].address"), "ips[0].address");
        assert_eq!(join_path("dns", "nameservers"), "dns.nameservers");
        assert_eq!(join_path("dns", "."), "dns");
        assert_eq!(join_path("", "mtu"), "mtu");
    }
}
