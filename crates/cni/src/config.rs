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
use crate::serde_util::{join_path, null_default};
use crate::validate;
use crate::version::{self, Version};

/// The GC key (SPEC main, libcni >= 1.2.0).
pub const VALID_ATTACHMENTS: &str = "cni.dev/valid-attachments";
/// The GC key as the spec-1.1 tag text named it (sent too by libcni >= 1.2.3).
pub const ATTACHMENTS: &str = "cni.dev/attachments";

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
    /// Defaults to `tcp` when absent or `null`.
    #[serde(default = "default_protocol", deserialize_with = "protocol_or_tcp")]
    pub protocol: String,
    #[serde(rename = "hostIP", default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
}

fn default_protocol() -> String {
    "tcp".into()
}

fn protocol_or_tcp<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(default_protocol))
}

/// Traffic shaping (capability `bandwidth`): rates in bit/s, bursts in bits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Bandwidth {
    #[serde(default, deserialize_with = "null_default")]
    pub ingress_rate: u64,
    #[serde(default, deserialize_with = "null_default")]
    pub ingress_burst: u64,
    #[serde(default, deserialize_with = "null_default")]
    pub egress_rate: u64,
    #[serde(default, deserialize_with = "null_default")]
    pub egress_burst: u64,
}

/// Capability arguments delivered by the runtime in `runtimeConfig`
/// (CONVENTIONS.md). `null` values count as absent; capabilities tern does
/// not type are kept in `other`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RuntimeConfig {
    /// `["ip[/prefix]", ...]`; each entry is checked to be an address.
    #[serde(default, deserialize_with = "null_default")]
    pub ips: Vec<String>,
    #[serde(default)]
    pub mac: Option<String>,
    /// Host and container ports are checked to be non-zero.
    #[serde(default, deserialize_with = "null_default")]
    pub port_mappings: Vec<PortMapping>,
    #[serde(default)]
    pub bandwidth: Option<Bandwidth>,
    #[serde(default)]
    pub ip_ranges: Option<Value>,
    #[serde(flatten)]
    pub other: Map<String, Value>,
}

impl RuntimeConfig {
    /// Checks beyond the types: ports are non-zero (CONVENTIONS: "ports must
    /// be > 0") and `ips` entries are addresses with an optional prefix.
    fn validate(&self) -> Result<(), CniError> {
        for (i, pm) in self.port_mappings.iter().enumerate() {
            for (key, port) in [("hostPort", pm.host_port), ("containerPort", pm.container_port)] {
                if port == 0 {
                    let field = format!("runtimeConfig.portMappings[{i}].{key}");
                    return Err(CniError::invalid_config(format!("invalid {field}: port must be 1-65535, got 0"))
                        .with_details(format!("field: {field}")));
                }
            }
        }
        check_ip_list(&self.ips, "runtimeConfig.ips")
    }
}

fn check_ip_list(ips: &[String], key: &str) -> Result<(), CniError> {
    for (i, ip) in ips.iter().enumerate() {
        if parse_ip_maybe_cidr(ip).is_none() {
            let field = format!("{key}[{i}]");
            return Err(CniError::invalid_config(format!("invalid {field}: {ip:?} is not an IP address"))
                .with_details(format!("field: {field}")));
        }
    }
    Ok(())
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
    ///
    /// Error codes follow the reference skel and SPEC "Error": 6 for input
    /// that is not a JSON object or a `cniVersion`/`prevResult` that cannot be
    /// decoded, 1 for a version the plugin does not support (or one too old
    /// for CHECK, GC or STATUS), 7 for a bad network configuration. Messages
    /// name the offending key (`runtimeConfig.portMappings[0].hostPort`).
    pub fn parse(bytes: &[u8], command: Command, supported: &[Version]) -> Result<NetConf, CniError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| CniError::new(Code::DecodingFailure, format!("error unmarshall network config: {e}")))?;
        let Value::Object(raw) = value else {
            return Err(CniError::new(Code::DecodingFailure, "error unmarshall network config: not a JSON object"));
        };

        let cni_version = match raw.get("cniVersion") {
            None | Some(Value::Null) => Version::V0_1_0,
            Some(Value::String(s)) => match Version::parse_or_default(Some(s)) {
                Ok(v) => v,
                Err(e) if e.code == Code::IncompatibleVersion as u32 => {
                    return Err(version::incompatible(s, supported))
                }
                Err(e) => return Err(e),
            },
            Some(other) => return Err(CniError::invalid_config(format!("cniVersion must be a string, got {other}"))),
        };
        if !supported.contains(&cni_version) {
            return Err(version::incompatible(cni_version.as_str(), supported));
        }
        let too_old = |verb: &str, min: Version| {
            CniError::new(Code::IncompatibleVersion, format!("config version does not allow {verb}"))
                .with_details(format!("cniVersion is {:?}, {verb} needs {min} or later", cni_version.as_str()))
        };
        match command {
            Command::Check if !cni_version.supports_check() => return Err(too_old("CHECK", Version::V0_4_0)),
            Command::Gc if !cni_version.supports_gc_and_status() => return Err(too_old("GC", Version::V1_1_0)),
            Command::Status if !cni_version.supports_gc_and_status() => return Err(too_old("STATUS", Version::V1_1_0)),
            _ => {}
        }

        let name = match raw.get("name") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(CniError::invalid_config(format!("name must be a string, got {other}"))),
        };
        validate::network_name(&name)?;

        let plugin_type = match raw.get("type") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(CniError::invalid_config(format!("type must be a string, got {other}"))),
        };
        validate::plugin_type(&plugin_type, "type")?;

        let ipam = match raw.get("ipam") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m.clone()),
            Some(other) => return Err(CniError::invalid_config(format!("ipam must be an object, got {other}"))),
        };
        let dns = decode_field::<Dns>(&raw, "dns")?;
        let runtime_config = decode_field::<RuntimeConfig>(&raw, "runtimeConfig")?.unwrap_or_default();
        runtime_config.validate()?;

        let prev_result = match raw.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v) => Some(CniResult::from_value(v, cni_version).map_err(|e| e.context("prevResult"))?),
        };

        // GC only. libcni 1.2.0-1.2.2 send `cni.dev/valid-attachments`, >= 1.2.3
        // send it and the spec-1.1 tag's `cni.dev/attachments` with the same
        // value. The corrected name wins when both are present.
        let valid_attachments = if command == Command::Gc {
            match (raw.get(VALID_ATTACHMENTS), raw.get(ATTACHMENTS)) {
                (Some(v), _) if !v.is_null() => Some(decode_value(v, VALID_ATTACHMENTS)?),
                (_, Some(v)) if !v.is_null() => Some(decode_value(v, ATTACHMENTS)?),
                _ => None,
            }
        } else {
            None
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
        decode_map(&m, "ipam")
    }

    /// The `ipam.type`, when IPAM is configured (an empty `ipam: {}` is "none").
    pub fn ipam_type(&self) -> Result<Option<String>, CniError> {
        let Some(m) = &self.ipam else { return Ok(None) };
        if m.is_empty() {
            return Ok(None);
        }
        match m.get("type") {
            Some(Value::String(s)) => validate::plugin_type(s, "ipam.type").map(|()| Some(s.clone())),
            None | Some(Value::Null) => Err(CniError::invalid_config("missing plugin type (ipam.type)")),
            Some(other) => Err(CniError::invalid_config(format!("ipam.type must be a string, got {other}"))),
        }
    }

    /// `args.cni.ips`, the conventional per-attachment address request.
    /// Each entry must be an address with an optional prefix (code 7).
    pub fn args_ips(&self) -> Result<Vec<String>, CniError> {
        match self.raw.get("args").and_then(|a| a.get("cni")).and_then(|c| c.get("ips")) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(v) => {
                let ips: Vec<String> = decode_value(v, "args.cni.ips")?;
                check_ip_list(&ips, "args.cni.ips")?;
                Ok(ips)
            }
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
        let field = join_path(key, &e.path().to_string());
        CniError::invalid_config(format!("invalid {field}: {}", e.inner())).with_details(format!("field: {field}"))
    })
}

fn decode_map<T: DeserializeOwned>(m: &Map<String, Value>, prefix: &str) -> Result<T, CniError> {
    let v = Value::Object(m.clone());
    serde_path_to_error::deserialize(&v).map_err(|e| {
        let path = e.path().to_string();
        let mut field = join_path(prefix, &path);
        if field.is_empty() {
            field = "(config)".into();
        }
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
        let c = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"n","type":"tern","zzz":1,"mtu":"big"}"#,
            Command::Add,
            &Version::ALL,
        )
        .unwrap();
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
