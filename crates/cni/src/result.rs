//! ADD results, held in one canonical (1.1.0) shape and converted to and from
//! every spec version on the wire.
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{CniError, Code};
use crate::serde_util::{decode_at, null_default, opt_ip};
use crate::version::Version;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "String::is_empty")]
    pub mac: String,
    /// 1.1.0 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// The netns path for container interfaces, empty on the host.
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
    /// 1.1.0 only.
    #[serde(
        rename = "socketPath",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub socket_path: String,
    /// 1.1.0 only.
    #[serde(rename = "pciID", default, deserialize_with = "null_default", skip_serializing_if = "String::is_empty")]
    pub pci_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Address with prefix; host bits are kept (`10.1.0.2/24`).
    pub address: IpNet,
    /// `null` and `""` both mean "no gateway" (as Go's `net.IP` decodes them).
    #[serde(default, deserialize_with = "opt_ip", skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces` (0.3.0 and later).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    /// `null` and `""` both mean "no gateway". When absent, the gateway of
    /// the matching address family may be used (see [`CniResult::route_gateway`]).
    #[serde(default, deserialize_with = "opt_ip", skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    /// 1.1.0 only (as are `advmss`, `priority`, `table` and `scope`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    /// 0 global, 253 link, 254 host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

impl Route {
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Route {
        Route { dst, gw, mtu: None, advmss: None, priority: None, table: None, scope: None }
    }

    /// The same route without the 1.1.0-only attributes.
    fn without_1_1_fields(&self) -> Route {
        Route::new(self.dst, self.gw)
    }
}

/// DNS settings, in results and in the config's `dns` key. `null` lists
/// and strings are accepted as empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, deserialize_with = "null_default", skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        self.nameservers.is_empty() && self.domain.is_empty() && self.search.is_empty() && self.options.is_empty()
    }
}

/// A success result in the 1.1.0 model. Older versions are views of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

fn decode_err(what: &str, e: impl std::fmt::Display) -> CniError {
    CniError::new(Code::DecodingFailure, format!("failed to decode {what}: {e}"))
}

/// Decode `v` (which sits at `what` in the result), naming the failing field.
fn decode_result_field<T: serde::de::DeserializeOwned + Default>(v: Option<&Value>, what: &str) -> Result<T, CniError> {
    match v {
        None | Some(Value::Null) => Ok(T::default()),
        Some(v) => decode_at(v, what).map_err(|(field, e)| decode_err(&field, e)),
    }
}

fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "4",
        IpNet::V6(_) => "6",
    }
}

fn same_family(net: &IpNet, ip: &IpAddr) -> bool {
    matches!((net, ip), (IpNet::V4(_), IpAddr::V4(_)) | (IpNet::V6(_), IpAddr::V6(_)))
}

/// Pre-0.3.0 `ip4`/`ip6` entry.
#[derive(Deserialize)]
struct LegacyIpConfig {
    ip: IpNet,
    #[serde(default, deserialize_with = "opt_ip")]
    gateway: Option<IpAddr>,
    #[serde(default, deserialize_with = "null_default")]
    routes: Vec<Route>,
}

impl CniResult {
    /// Parse a result of any version. `fallback` is used when the result
    /// carries no (or an empty) `cniVersion` (libcni's `fixupResultVersion`).
    ///
    /// Errors are code 6 and name the failing field (`ips[0].address`),
    /// except an unknown version, which is code 1.
    pub fn from_value(v: &Value, fallback: Version) -> Result<CniResult, CniError> {
        let obj = v.as_object().ok_or_else(|| decode_err("result", "not a JSON object"))?;
        let version = match obj.get("cniVersion") {
            None | Some(Value::Null) => fallback,
            Some(Value::String(s)) if s.is_empty() => fallback,
            Some(Value::String(s)) => s.parse().map_err(|e: CniError| {
                if e.code == Code::IncompatibleVersion as u32 {
                    CniError::new(Code::IncompatibleVersion, format!("unsupported result cniVersion {s:?}"))
                        .with_details(format!("supported: {:?}", Version::supported_strings()))
                } else {
                    decode_err("cniVersion", e.msg)
                }
            })?,
            Some(other) => return Err(decode_err("cniVersion", format!("expected a string, got {other}"))),
        };
        if version.is_legacy_result() {
            return Self::from_legacy(obj);
        }
        let interfaces: Vec<Interface> = decode_result_field(obj.get("interfaces"), "interfaces")?;
        // The 0.3.x/0.4.0 `ips[].version` key is implied by the address and dropped.
        let ips: Vec<IpConfig> = decode_result_field(obj.get("ips"), "ips")?;
        let routes: Vec<Route> = decode_result_field(obj.get("routes"), "routes")?;
        let dns: Dns = decode_result_field(obj.get("dns"), "dns")?;
        let r = CniResult { interfaces, ips, routes, dns };
        if let Some((i, idx)) = r.bad_interface_index() {
            return Err(decode_err(
                &format!("ips[{i}].interface"),
                format!("index {idx} out of range ({} interfaces)", r.interfaces.len()),
            ));
        }
        Ok(r)
    }

    fn from_legacy(obj: &Map<String, Value>) -> Result<CniResult, CniError> {
        let mut r = CniResult::default();
        for (key, v4) in [("ip4", true), ("ip6", false)] {
            let Some(ipc) = obj.get(key).filter(|v| !v.is_null()) else { continue };
            let ipc: LegacyIpConfig = decode_at(ipc, key).map_err(|(field, e)| decode_err(&field, e))?;
            if matches!(ipc.ip, IpNet::V4(_)) != v4 {
                return Err(decode_err(
                    &format!("{key}.ip"),
                    format!("{} is not an IPv{} address", ipc.ip, if v4 { 4 } else { 6 }),
                ));
            }
            r.ips.push(IpConfig { address: ipc.ip, gateway: ipc.gateway, interface: None });
            r.routes.extend(ipc.routes);
        }
        r.dns = decode_result_field(obj.get("dns"), "dns")?;
        Ok(r)
    }

    /// The first `ips[i]` whose `interface` does not index `interfaces`.
    fn bad_interface_index(&self) -> Option<(usize, usize)> {
        self.ips
            .iter()
            .enumerate()
            .find_map(|(i, ip)| ip.interface.filter(|&idx| idx >= self.interfaces.len()).map(|idx| (i, idx)))
    }

    /// Render in `version`. Fields a version cannot carry are dropped (the
    /// 1.1.0-only interface and route attributes below 1.1.0; interfaces and
    /// `ips[].interface` below 0.3.0). A result that cannot be expressed is
    /// an error: more than one address of a family before 0.3.0 (code 1, as
    /// host-local and static refuse it), or an `ips[].interface` that does
    /// not index `interfaces` (code 999, a plugin bug).
    pub fn to_value(&self, version: Version) -> Result<Value, CniError> {
        if version.is_legacy_result() {
            for (v4, n) in [(true, 4), (false, 6)] {
                if self.ips.iter().filter(|ip| matches!(ip.address, IpNet::V4(_)) == v4).count() > 1 {
                    return Err(CniError::new(
                        Code::IncompatibleVersion,
                        format!("cannot convert result to version {version}: more than one IPv{n} address (ips)"),
                    ));
                }
            }
        } else if let Some((i, idx)) = self.bad_interface_index() {
            return Err(CniError::internal(format!(
                "invalid result: ips[{i}].interface index {idx} out of range ({} interfaces)",
                self.interfaces.len()
            )));
        }
        Ok(self.to_value_lossy(version))
    }

    /// Render in `version` the way libcni's converters do, never failing:
    /// before 0.3.0 only the first address of each family is kept (with the
    /// routes of that family), and interface indexes are not checked.
    /// For a runtime re-encoding a stored result; plugins use [`to_value`](Self::to_value).
    pub fn to_value_lossy(&self, version: Version) -> Value {
        if version.is_legacy_result() {
            return self.to_legacy(version);
        }
        let mut out = Map::new();
        out.insert("cniVersion".into(), json!(version.as_str()));
        let pre_1_1 = version < Version::V1_1_0;
        if !self.interfaces.is_empty() {
            let ifs: Vec<Value> = self
                .interfaces
                .iter()
                .map(|i| {
                    let mut i = i.clone();
                    if pre_1_1 {
                        i.mtu = None;
                        i.socket_path.clear();
                        i.pci_id.clear();
                    }
                    // Go's `omitempty` drops a zero MTU.
                    i.mtu = i.mtu.filter(|&m| m != 0);
                    serde_json::to_value(i).expect("interface serialises")
                })
                .collect();
            out.insert("interfaces".into(), Value::Array(ifs));
        }
        if !self.ips.is_empty() {
            let ips: Vec<Value> = self
                .ips
                .iter()
                .map(|ip| {
                    let mut v = serde_json::to_value(ip).expect("ip serialises");
                    if version < Version::V1_0_0 {
                        let m = v.as_object_mut().expect("object");
                        let mut with_version = Map::new();
                        with_version.insert("version".into(), json!(family(&ip.address)));
                        with_version.extend(std::mem::take(m));
                        v = Value::Object(with_version);
                    }
                    v
                })
                .collect();
            out.insert("ips".into(), Value::Array(ips));
        }
        if !self.routes.is_empty() {
            out.insert("routes".into(), Value::Array(self.routes.iter().map(|r| route_value(r, pre_1_1)).collect()));
        }
        out.insert("dns".into(), serde_json::to_value(&self.dns).expect("dns serialises"));
        Value::Object(out)
    }

    /// 0.1.0/0.2.0: `ip4`/`ip6` with the routes of that family; routes of a
    /// family without an address are dropped (as libcni does).
    fn to_legacy(&self, version: Version) -> Value {
        let mut out = Map::new();
        out.insert("cniVersion".into(), json!(version.as_str()));
        for (key, v4) in [("ip4", true), ("ip6", false)] {
            let Some(ip) = self.ips.iter().find(|ip| matches!(ip.address, IpNet::V4(_)) == v4) else { continue };
            let mut ipc = Map::new();
            ipc.insert("ip".into(), json!(ip.address.to_string()));
            if let Some(gw) = ip.gateway {
                ipc.insert("gateway".into(), json!(gw.to_string()));
            }
            let routes: Vec<Value> = self
                .routes
                .iter()
                .filter(|r| matches!(r.dst, IpNet::V4(_)) == v4)
                .map(|r| route_value(r, true))
                .collect();
            if !routes.is_empty() {
                ipc.insert("routes".into(), Value::Array(routes));
            }
            out.insert(key.into(), Value::Object(ipc));
        }
        out.insert("dns".into(), serde_json::to_value(&self.dns).expect("dns serialises"));
        Value::Object(out)
    }

    pub fn to_json_string(&self, version: Version) -> Result<String, CniError> {
        Ok(serde_json::to_string(&self.to_value(version)?).expect("value serialises"))
    }

    /// Index of the interface named `ifname` inside a sandbox, if any.
    pub fn sandbox_interface(&self, ifname: &str) -> Option<usize> {
        self.interfaces.iter().position(|i| i.name == ifname && !i.sandbox.is_empty())
    }

    /// The gateway to use for `route`: its own `gw`, or else the first
    /// `ips[].gateway` of the same address family (SPEC "routes": "if
    /// omitted, a default gateway is assumed"), or none (on-link).
    pub fn route_gateway(&self, route: &Route) -> Option<IpAddr> {
        route.gw.or_else(|| self.ips.iter().filter_map(|ip| ip.gateway).find(|gw| same_family(&route.dst, gw)))
    }
}

fn route_value(r: &Route, pre_1_1: bool) -> Value {
    let r = if pre_1_1 { r.without_1_1_fields() } else { r.clone() };
    serde_json::to_value(r).expect("route serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "aa:bb:cc:dd:ee:ff".into(),
                mtu: Some(1500),
                sandbox: "/run/netns/x".into(),
                ..Default::default()
            }],
            ips: vec![
                IpConfig {
                    address: "10.1.0.2/24".parse().unwrap(),
                    gateway: Some("10.1.0.1".parse().unwrap()),
                    interface: Some(0),
                },
                IpConfig {
                    address: "fd00::2/64".parse().unwrap(),
                    gateway: Some("fd00::1".parse().unwrap()),
                    interface: Some(0),
                },
            ],
            routes: vec![Route { mtu: Some(1400), ..Route::new("0.0.0.0/0".parse().unwrap(), None) }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn round_trip_through_every_modern_version() {
        for v in [Version::V0_3_0, Version::V0_3_1, Version::V0_4_0, Version::V1_0_0, Version::V1_1_0] {
            let val = sample().to_value(v).unwrap();
            let back = CniResult::from_value(&val, Version::V0_1_0).unwrap();
            let mut expect = sample();
            if v < Version::V1_1_0 {
                expect.interfaces[0].mtu = None;
                expect.routes[0].mtu = None;
            }
            assert_eq!(back, expect, "version {v}");
        }
    }

    #[test]
    fn pre_1_0_ips_carry_version() {
        let val = sample().to_value(Version::V0_4_0).unwrap();
        assert_eq!(val["ips"][0]["version"], "4");
        assert_eq!(val["ips"][1]["version"], "6");
        let val = sample().to_value(Version::V1_0_0).unwrap();
        assert!(val["ips"][0].get("version").is_none());
    }

    #[test]
    fn legacy_shape() {
        let val = sample().to_value(Version::V0_2_0).unwrap();
        assert_eq!(val["ip4"]["ip"], "10.1.0.2/24");
        assert_eq!(val["ip6"]["gateway"], "fd00::1");
        let back = CniResult::from_value(&val, Version::V0_1_0).unwrap();
        assert_eq!(back.ips.len(), 2);
        let mut two_v4 = sample();
        two_v4.ips[1].address = "10.2.0.2/24".parse().unwrap();
        assert!(two_v4.to_value(Version::V0_2_0).is_err());
    }
}
