//! libcni's result cache (checklist 2.4), byte-compatible in both directions.
//!
//! One file per attachment, `<cacheDir>/results/<network>-<containerID>-<ifname>`,
//! holding one JSON object with no trailing newline:
//!
//! ```text
//! {"kind":"cniCacheV1","containerId":..,"config":<base64 of the conflist bytes>,"ifName":..,
//!  "networkName":..,"netns":..,"cniArgs":[[k,v],..],"capabilityArgs":{..},"result":{..}}
//! ```
//!
//! `netns`, `cniArgs`, `capabilityArgs` and `result` are left out when empty
//! (Go's `omitempty`); `capabilityArgs` and `result` are Go maps, so their keys
//! are sorted at every level. A file that is not such an object, or whose
//! `kind` is not `cniCacheV1`, is a legacy cache holding only the result.
//!
//! The encoding and decoding here are pure; [`crate::Runner`] does the file I/O.
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use serde_json::{Map, Value};
use tern_cni::{CniResult, Version};

use crate::gojson;

/// The `kind` of a current cache entry.
pub const KIND: &str = "cniCacheV1";

/// The subdirectory of the cache dir that holds the entries.
pub const RESULTS_DIR: &str = "results";

/// One attachment's cache entry (libcni's `cachedInfo`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CacheEntry {
    pub container_id: String,
    /// The network configuration list as loaded, byte for byte.
    pub config: Vec<u8>,
    pub if_name: String,
    pub network_name: String,
    /// The netns path given to ADD (libcni >= 1.2.0 writes it; older entries lack it).
    pub netns: String,
    /// CNI_ARGS as pairs.
    pub cni_args: Vec<(String, String)>,
    /// Every capability arg the runtime passed (not only the consumed ones).
    pub capability_args: Map<String, Value>,
    /// The final ADD result, in the version the last plugin returned.
    pub result: Option<Value>,
}

/// What a cache file holds.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheFile {
    /// A `cniCacheV1` entry.
    V1(Box<CacheEntry>),
    /// A legacy entry: the file is the result itself.
    Legacy(Value),
}

/// The file name of an entry: `<network>-<containerID>-<ifname>`.
pub fn file_name(network: &str, container_id: &str, ifname: &str) -> String {
    format!("{network}-{container_id}-{ifname}")
}

impl CacheEntry {
    /// The bytes libcni writes for this entry.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = String::from("{");
        out.push_str(&format!(r#""kind":{}"#, gojson::encode_str(KIND)));
        out.push_str(&format!(r#","containerId":{}"#, gojson::encode_str(&self.container_id)));
        out.push_str(&format!(r#","config":"{}""#, BASE64.encode(&self.config)));
        out.push_str(&format!(r#","ifName":{}"#, gojson::encode_str(&self.if_name)));
        out.push_str(&format!(r#","networkName":{}"#, gojson::encode_str(&self.network_name)));
        if !self.netns.is_empty() {
            out.push_str(&format!(r#","netns":{}"#, gojson::encode_str(&self.netns)));
        }
        if !self.cni_args.is_empty() {
            let pairs: Vec<String> = self
                .cni_args
                .iter()
                .map(|(k, v)| format!("[{},{}]", gojson::encode_str(k), gojson::encode_str(v)))
                .collect();
            out.push_str(&format!(r#","cniArgs":[{}]"#, pairs.join(",")));
        }
        if !self.capability_args.is_empty() {
            out.push_str(&format!(
                r#","capabilityArgs":{}"#,
                gojson::encode(&Value::Object(self.capability_args.clone()))
            ));
        }
        match &self.result {
            // Go's omitempty drops a nil or empty map.
            Some(Value::Object(m)) if m.is_empty() => {}
            None | Some(Value::Null) => {}
            Some(r) => out.push_str(&format!(r#","result":{}"#, gojson::encode(r))),
        }
        out.push('}');
        out.into_bytes()
    }
}

impl CacheFile {
    /// Decode a cache file as libcni does: a `cniCacheV1` object, else a
    /// legacy result-only file. Anything else (empty, not JSON, not an
    /// object, a result that does not decode) is an error: the entry is corrupt.
    pub fn parse(bytes: &[u8]) -> Result<CacheFile, String> {
        let value: Result<Value, _> = serde_json::from_slice(bytes);
        if let Ok(Value::Object(obj)) = &value {
            if obj.get("kind").and_then(Value::as_str) == Some(KIND) {
                if let Ok(entry) = decode_v1(obj) {
                    return Ok(CacheFile::V1(Box::new(entry)));
                }
            }
        }
        match value {
            Err(e) if bytes.iter().all(u8::is_ascii_whitespace) => Err(format!("empty cache file ({e})")),
            Err(e) => Err(format!("not JSON: {e}")),
            Ok(v @ Value::Object(_)) => {
                // A legacy entry must at least be a readable result.
                CniResult::from_value(&v, Version::V0_1_0)
                    .map_err(|e| format!("neither a {KIND} entry nor a result: {e}"))?;
                Ok(CacheFile::Legacy(v))
            }
            Ok(other) => Err(format!("not a JSON object: {}", truncate(&other.to_string(), 60))),
        }
    }

    /// The result this file holds (the entry's, or the legacy file itself).
    pub fn result(&self) -> Option<&Value> {
        match self {
            CacheFile::V1(e) => e.result.as_ref().filter(|v| !v.is_null()),
            CacheFile::Legacy(v) => Some(v),
        }
    }

    /// The result decoded, as libcni reads it before converting it to the
    /// list's version for `prevResult` (a result without `cniVersion` is
    /// 0.1.0). `None` if the entry has no result.
    pub fn decoded_result(&self) -> Result<Option<CniResult>, String> {
        self.result()
            .map(|v| CniResult::from_value(v, Version::V0_1_0).map_err(|e| format!("cached result is unreadable: {e}")))
            .transpose()
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}...", s.chars().take(n).collect::<String>())
    }
}

/// Go's `json.Unmarshal` into `cachedInfo`: missing keys are zero values,
/// `null` is a zero value, a wrong type is an error.
fn decode_v1(obj: &Map<String, Value>) -> Result<CacheEntry, String> {
    let string = |key: &str| -> Result<String, String> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("{key} is not a string")),
        }
    };
    let config = match obj.get("config") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => BASE64.decode(s).map_err(|e| format!("config is not base64: {e}"))?,
        Some(_) => return Err("config is not a string".into()),
    };
    let cni_args = match obj.get("cniArgs") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(pairs)) => pairs
            .iter()
            .map(|p| match p.as_array().map(Vec::as_slice) {
                Some([Value::String(k), Value::String(v), ..]) => Ok((k.clone(), v.clone())),
                _ => Err(format!("cniArgs entry {p} is not a [key, value] pair")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("cniArgs is not a list".into()),
    };
    let capability_args = match obj.get("capabilityArgs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err("capabilityArgs is not an object".into()),
    };
    let result = match obj.get("result") {
        None | Some(Value::Null) => None,
        Some(v @ Value::Object(_)) => Some(v.clone()),
        Some(_) => return Err("result is not an object".into()),
    };
    Ok(CacheEntry {
        container_id: string("containerId")?,
        config,
        if_name: string("ifName")?,
        network_name: string("networkName")?,
        netns: string("netns")?,
        cni_args,
        capability_args,
        result,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> CacheEntry {
        CacheEntry {
            container_id: "ctrA".into(),
            config: br#"{"cniVersion":"1.0.0","name":"harnet","plugins":[{"type":"bridge"}]}"#.to_vec(),
            if_name: "eth0".into(),
            network_name: "harnet".into(),
            netns: "/run/netns/a".into(),
            cni_args: vec![("IgnoreUnknown".into(), "1".into()), ("K8S_POD_NAME".into(), "p1".into())],
            capability_args: json!({"portMappings":[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}],"mac":"c2:11:22:33:44:55"})
                .as_object()
                .unwrap()
                .clone(),
            result: Some(json!({"cniVersion":"1.0.0","ips":[{"address":"10.66.0.2/24","gateway":"10.66.0.1"}],"dns":{}})),
        }
    }

    #[test]
    fn encodes_like_libcni() {
        let bytes = sample().encode();
        let expected = concat!(
            r#"{"kind":"cniCacheV1","containerId":"ctrA","#,
            r#""config":"eyJjbmlWZXJzaW9uIjoiMS4wLjAiLCJuYW1lIjoiaGFybmV0IiwicGx1Z2lucyI6W3sidHlwZSI6ImJyaWRnZSJ9XX0=","#,
            r#""ifName":"eth0","networkName":"harnet","netns":"/run/netns/a","#,
            r#""cniArgs":[["IgnoreUnknown","1"],["K8S_POD_NAME","p1"]],"#,
            r#""capabilityArgs":{"mac":"c2:11:22:33:44:55","portMappings":[{"containerPort":80,"hostPort":8080,"protocol":"tcp"}]},"#,
            r#""result":{"cniVersion":"1.0.0","dns":{},"ips":[{"address":"10.66.0.2/24","gateway":"10.66.0.1"}]}}"#
        );
        assert_eq!(String::from_utf8(bytes.clone()).unwrap(), expected);
        assert_eq!(CacheFile::parse(&bytes).unwrap(), CacheFile::V1(Box::new(sample())));
    }

    #[test]
    fn omits_empty_fields() {
        let e = CacheEntry {
            container_id: "c".into(),
            config: b"{}".to_vec(),
            if_name: "eth0".into(),
            network_name: "n".into(),
            ..Default::default()
        };
        assert_eq!(
            String::from_utf8(e.encode()).unwrap(),
            r#"{"kind":"cniCacheV1","containerId":"c","config":"e30=","ifName":"eth0","networkName":"n"}"#
        );
    }

    #[test]
    fn reads_legacy_and_rejects_corrupt() {
        let legacy = br#"{"cniVersion":"0.3.1","ips":[{"version":"4","address":"10.1.0.2/24"}],"dns":{}}"#;
        let f = CacheFile::parse(legacy).unwrap();
        assert!(matches!(f, CacheFile::Legacy(_)));
        let r = f.decoded_result().unwrap().unwrap();
        assert_eq!(r.ips[0].address.to_string(), "10.1.0.2/24");
        // A wrong kind makes the file a legacy result (an empty 0.1.0 one here, as in libcni).
        assert!(matches!(CacheFile::parse(br#"{"kind":"other","containerId":"c"}"#), Ok(CacheFile::Legacy(_))));
        assert!(CacheFile::parse(b"").unwrap_err().contains("empty"));
        assert!(CacheFile::parse(b"{\"kind\":\"cniCa").is_err());
        assert!(CacheFile::parse(b"[1]").is_err());
        assert!(CacheFile::parse(br#"{"cniVersion":"1.0.0","ips":[{"address":"nope"}]}"#).is_err());
    }

    #[test]
    fn v1_without_optional_fields() {
        let f = CacheFile::parse(
            br#"{"kind":"cniCacheV1","containerId":"c","config":null,"ifName":"eth0","networkName":"n"}"#,
        )
        .unwrap();
        assert_eq!(f.decoded_result().unwrap(), None);
        let CacheFile::V1(e) = f else { panic!("not v1") };
        assert!(e.result.is_none() && e.netns.is_empty() && e.config.is_empty());
    }
}
