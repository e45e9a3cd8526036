//! ADD results, held in one canonical (1.1.0) shape and converted to and from
//! every spec version on the wire.
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{CniError, Code};
use crate::version::Version;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub sandbox: String,
    #[serde(rename = "socketPath", default, skip_serializing_if = "String::is_empty")]
    pub socket_path: String,
    #[serde(rename = "pciID", default, skip_serializing_if = "String::is_empty")]
    pub pci_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: IpNet,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

impl Route {
    pub fn new(dst: IpNet, gw: Option<IpAddr>) -> Route {
        Route { dst, gw, mtu: None, advmss: None, priority: None, table: None, scope: None }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub domain: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
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

fn family(net: &IpNet) -> &'static str {
    match net {
        IpNet::V4(_) => "4",
        IpNet::V6(_) => "6",
    }
}

impl CniResult {
    /// Parse a result of any version. `fallback` is used when the result
    /// carries no `cniVersion` (libcni's `fixupResultVersion`).
    pub fn from_value(v: &Value, fallback: Version) -> Result<CniResult, CniError> {
        let obj = v.as_object().ok_or_else(|| decode_err("result", "not a JSON object"))?;
        let version = match obj.get("cniVersion").and_then(Value::as_str) {
            Some("") | None => fallback,
            Some(s) => s.parse()?,
        };
        if version.is_legacy_result() {
            return Self::from_legacy(obj);
        }
        let field = |k: &str| obj.get(k).cloned().unwrap_or(Value::Null);
        let interfaces: Vec<Interface> = opt_list(field("interfaces"), "interfaces")?;
        // 0.3.x/0.4.0 `version` keys are dropped by serde (unknown field).
        let ips: Vec<IpConfig> = opt_list(field("ips"), "ips")?;
        let routes: Vec<Route> = opt_list(field("routes"), "routes")?;
        let dns: Dns = match field("dns") {
            Value::Null => Dns::default(),
            d => serde_json::from_value(d).map_err(|e| decode_err("dns", e))?,
        };
        for ip in &ips {
            if let Some(i) = ip.interface {
                if i >= interfaces.len() {
                    return Err(decode_err("ips", format!("interface index {i} out of range")));
                }
            }
        }
        Ok(CniResult { interfaces, ips, routes, dns })
    }

    fn from_legacy(obj: &Map<String, Value>) -> Result<CniResult, CniError> {
        let mut r = CniResult::default();
        for key in ["ip4", "ip6"] {
            let Some(ipc) = obj.get(key).filter(|v| !v.is_null()) else { continue };
            let address: IpNet = serde_json::from_value(ipc.get("ip").cloned().unwrap_or(Value::Null))
                .map_err(|e| decode_err(&format!("{key}.ip"), e))?;
            let gateway: Option<IpAddr> = serde_json::from_value(ipc.get("gateway").cloned().unwrap_or(Value::Null))
                .map_err(|e| decode_err(&format!("{key}.gateway"), e))?;
            r.ips.push(IpConfig { address, gateway, interface: None });
            let routes: Vec<Route> =
                opt_list(ipc.get("routes").cloned().unwrap_or(Value::Null), &format!("{key}.routes"))?;
            r.routes.extend(routes);
        }
        if let Some(d) = obj.get("dns").filter(|v| !v.is_null()) {
            r.dns = serde_json::from_value(d.clone()).map_err(|e| decode_err("dns", e))?;
        }
        Ok(r)
    }

    /// Render in `version`. Fields a version cannot carry are dropped; a
    /// result that cannot be expressed (two addresses of one family before
    /// 0.3.0) is an error, as in libcni.
    pub fn to_value(&self, version: Version) -> Result<Value, CniError> {
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
        Ok(Value::Object(out))
    }

    fn to_legacy(&self, version: Version) -> Result<Value, CniError> {
        let mut out = Map::new();
        out.insert("cniVersion".into(), json!(version.as_str()));
        for (key, v4) in [("ip4", true), ("ip6", false)] {
            let mut of_family = self.ips.iter().filter(|ip| matches!(ip.address, IpNet::V4(_)) == v4);
            let Some(ip) = of_family.next() else { continue };
            if of_family.next().is_some() {
                return Err(CniError::new(
                    Code::IncompatibleVersion,
                    format!("cannot convert result to version {version}: more than one IPv{} address", if v4 { 4 } else { 6 }),
                ));
            }
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
        Ok(Value::Object(out))
    }

    pub fn to_json_string(&self, version: Version) -> Result<String, CniError> {
        Ok(serde_json::to_string(&self.to_value(version)?).expect("value serialises"))
    }

    /// Index of the interface named `ifname` inside a sandbox, if any.
    pub fn sandbox_interface(&self, ifname: &str) -> Option<usize> {
        self.interfaces.iter().position(|i| i.name == ifname && !i.sandbox.is_empty())
    }
}

fn route_value(r: &Route, pre_1_1: bool) -> Value {
    let mut r = r.clone();
    if pre_1_1 {
        r.mtu = None;
        r.advmss = None;
        r.priority = None;
        r.table = None;
        r.scope = None;
    }
    serde_json::to_value(r).expect("route serialises")
}

fn opt_list<T: serde::de::DeserializeOwned>(v: Value, what: &str) -> Result<Vec<T>, CniError> {
    match v {
        Value::Null => Ok(Vec::new()),
        v => serde_json::from_value(v).map_err(|e| decode_err(what, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![Interface { name: "eth0".into(), mac: "aa:bb:cc:dd:ee:ff".into(), mtu: Some(1500), sandbox: "/run/netns/x".into(), ..Default::default() }],
            ips: vec![
                IpConfig { address: "10.1.0.2/24".parse().unwrap(), gateway: Some("10.1.0.1".parse().unwrap()), interface: Some(0) },
                IpConfig { address: "fd00::2/64".parse().unwrap(), gateway: Some("fd00::1".parse().unwrap()), interface: Some(0) },
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
