//! The per-plugin network configuration a plugin reads on stdin.
//!
//! Common keys are typed; the whole object is kept so plugin-specific keys
//! can be decoded by the plugin (with the offending field named on error) and
//! unknown keys pass through untouched to delegates.
use std::net::IpAddr;

use ipnet::IpNet;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::env::Command;
use crate::error::{CniError, Code};
use crate::result::{CniResult, Dns};
use crate::validate;
use crate::version::Version;

/// One entry of `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// A port mapping (capability `portMappings`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    #[serde(rename = "hostPort")]
    pub host_port: u16,
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: String,
    #[serde(rename = "hostIP", default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

fn default_protocol() -> String {
    "tcp".into()
}

/// Traffic shaping (capability `bandwidth`): rates in bit/s, bursts in bits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    #[serde(default)]
    pub ingress_rate: u64,
    #[serde(default)]
    pub ingress_burst: u64,
    #[serde(default)]
    pub egress_rate: u64,
    #[serde(default)]
    pub egress_burst: u64,
}

/// Capability arguments delivered by the runtime in `runtimeConfig`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    #[serde(default)]
    pub ips: Vec<String>,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    #[serde(default)]
    pub bandwidth: Option<Bandwidth>,
    #[serde(default)]
    pub ip_ranges: Option<Value>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: Version,
    pub name: String,
    pub plugin_type: String,
    /// The `ipam` object, if any (`{}` means "no IPAM").
    pub ipam: Option<Map<String, Value>>,
    pub dns: Option<Dns>,
    pub runtime_config: RuntimeConfig,
    pub prev_result: Option<CniResult>,
    /// GC only: the attachments to keep (`cni.dev/valid-attachments`, or the
    /// older `cni.dev/attachments`).
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The whole object as received.
    pub raw: Map<String, Value>,
}

impl NetConf {
    /// Decode stdin for `command`, checking the version against `supported`.
    pub fn parse(bytes: &[u8], command: Command, supported: &[Version]) -> Result<NetConf, CniError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| CniError::new(Code::DecodingFailure, format!("error unmarshall network config: {e}")))?;
        let Value::Object(raw) = value else {
            return Err(CniError::new(Code::DecodingFailure, "error unmarshall network config: not a JSON object"));
        };

        let cni_version = match raw.get("cniVersion") {
            None | Some(Value::Null) => Version::V0_1_0,
            Some(Value::String(s)) => Version::parse_or_default(Some(s))?,
            Some(other) => {
                return Err(CniError::invalid_config(format!("cniVersion must be a string, got {other}")))
            }
        };
        if !supported.contains(&cni_version) {
            return Err(CniError::new(Code::IncompatibleVersion, "incompatible CNI versions").with_details(format!(
                "config is {:?}, plugin supports {:?}",
                cni_version.as_str(),
                supported.iter().map(|v| v.as_str()).collect::<Vec<_>>()
            )));
        }
        match command {
            Command::Check if !cni_version.supports_check() => {
                return Err(CniError::new(Code::IncompatibleVersion, "config version does not allow CHECK"))
            }
            Command::Gc if !cni_version.supports_gc_and_status() => {
                return Err(CniError::new(Code::IncompatibleVersion, "config version does not allow GC"))
            }
            Command::Status if !cni_version.supports_gc_and_status() => {
                return Err(CniError::new(Code::IncompatibleVersion, "config version does not allow STATUS"))
            }
            _ => {}
        }

        let name = match raw.get("name") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(CniError::invalid_config(format!("name must be a string, got {other}"))),
        };
        validate::network_name(&name)?;

        let plugin_type = match raw.get("type") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            None | Some(Value::Null) | Some(Value::String(_)) => {
                return Err(CniError::invalid_config("missing plugin type (type)"))
            }
            Some(other) => return Err(CniError::invalid_config(format!("type must be a string, got {other}"))),
        };
        if plugin_type.contains('/') || plugin_type.contains('\\') {
            return Err(CniError::invalid_config(format!("invalid plugin type {plugin_type:?}: contains a path separator (type)")));
        }

        let ipam = match raw.get("ipam") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m.clone()),
            Some(other) => return Err(CniError::invalid_config(format!("ipam must be an object, got {other}"))),
        };
        let dns = decode_field::<Dns>(&raw, "dns")?;
        let runtime_config = decode_field::<RuntimeConfig>(&raw, "runtimeConfig")?.unwrap_or_default();

        let prev_result = match raw.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v) => Some(CniResult::from_value(v, cni_version).map_err(|e| e.context("prevResult"))?),
        };

        let valid_attachments = match (raw.get("cni.dev/valid-attachments"), raw.get("cni.dev/attachments")) {
            (Some(v), _) if !v.is_null() => Some(decode_value(v, "cni.dev/valid-attachments")?),
            (_, Some(v)) if !v.is_null() => Some(decode_value(v, "cni.dev/attachments")?),
            _ => None,
        };

        Ok(NetConf { cni_version, name, plugin_type, ipam, dns, runtime_config, prev_result, valid_attachments, raw })
    }

    /// Decode plugin-specific keys from the whole object. Errors are code 7
    /// and name the offending field path.
    pub fn options<T: DeserializeOwned>(&self) -> Result<T, CniError> {
        decode_map(&self.raw, "")
    }

    /// Decode the `ipam` object into `T`.
    pub fn ipam_options<T: DeserializeOwned>(&self) -> Result<T, CniError> {
        let m = self.ipam.clone().ok_or_else(|| CniError::invalid_config("IPAM config missing 'ipam' key"))?;
        decode_map(&m, "ipam.")
    }

    /// The `ipam.type`, when IPAM is configured (an empty `ipam: {}` is "none").
    pub fn ipam_type(&self) -> Result<Option<String>, CniError> {
        let Some(m) = &self.ipam else { return Ok(None) };
        if m.is_empty() {
            return Ok(None);
        }
        match m.get("type") {
            Some(Value::String(s)) if !s.is_empty() && !s.contains('/') => Ok(Some(s.clone())),
            _ => Err(CniError::invalid_config("ipam.type must be a plugin name (ipam.type)")),
        }
    }

    /// `args.cni.ips`, the conventional per-attachment address request.
    pub fn args_ips(&self) -> Result<Vec<String>, CniError> {
        match self.raw.get("args").and_then(|a| a.get("cni")).and_then(|c| c.get("ips")) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(v) => decode_value(v, "args.cni.ips"),
        }
    }

    /// The config re-encoded with `prevResult` replaced, for the next plugin
    /// or a delegate.
    pub fn with_prev_result(&self, prev: Option<&CniResult>) -> Result<Vec<u8>, CniError> {
        let mut raw = self.raw.clone();
        match prev {
            Some(p) => {
                raw.insert("prevResult".into(), p.to_value(self.cni_version)?);
            }
            None => {
                raw.remove("prevResult");
            }
        }
        Ok(serde_json::to_vec(&raw).expect("config serialises"))
    }
}

fn decode_field<T: DeserializeOwned>(raw: &Map<String, Value>, key: &str) -> Result<Option<T>, CniError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => decode_value(v, key).map(Some),
    }
}

/// Decode `v`, naming `key` and the path inside it on failure (code 7).
pub fn decode_value<T: DeserializeOwned>(v: &Value, key: &str) -> Result<T, CniError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." || path.is_empty() { key.to_string() } else { format!("{key}.{path}") };
        CniError::invalid_config(format!("invalid {field}: {}", e.inner())).with_details(format!("field: {field}"))
    })
}

fn decode_map<T: DeserializeOwned>(m: &Map<String, Value>, prefix: &str) -> Result<T, CniError> {
    let v = Value::Object(m.clone());
    serde_path_to_error::deserialize(&v).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { prefix.trim_end_matches('.').to_string() } else { format!("{prefix}{path}") };
        CniError::invalid_config(format!("invalid {field}: {}", e.inner())).with_details(format!("field: {field}"))
    })
}

/// Parse an address with or without prefix ("10.0.0.5" or "10.0.0.5/24").
pub fn parse_ip_maybe_cidr(s: &str) -> Option<(IpAddr, Option<u8>)> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Some((net.addr(), Some(net.prefix_len())));
    }
    s.parse::<IpAddr>().ok().map(|ip| (ip, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_unknown_fields_and_names_bad_ones() {
        #[derive(Deserialize)]
        #[allow(dead_code)]
        struct Opts {
            #[serde(default)]
            mtu: Option<u32>,
        }
        let c = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"tern","zzz":1,"mtu":"big"}"#, Command::Add, &Version::ALL).unwrap();
        assert_eq!(c.raw["zzz"], 1);
        let err = c.options::<Opts>().err().unwrap();
        assert_eq!(err.code, 7);
        assert!(err.msg.contains("mtu"), "{}", err.msg);
    }

    #[test]
    fn accepts_both_gc_keys() {
        let c = NetConf::parse(
            br#"{"cniVersion":"1.1.0","name":"n","type":"t","cni.dev/attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
            Command::Gc,
            &Version::ALL,
        )
        .unwrap();
        assert_eq!(c.valid_attachments.unwrap().len(), 1);
    }
}
