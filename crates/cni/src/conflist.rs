//! Network configuration lists (`*.conflist`) and the per-plugin config a
//! runtime derives from them (SPEC section 3, checklist N1-N7, R8, R9).
//!
//! Pure: finding and reading files, executing plugins and caching results
//! belong to the runner.
use serde_json::{Map, Value};

use crate::config::{Attachment, ATTACHMENTS, VALID_ATTACHMENTS};
use crate::error::{CniError, Code};
use crate::result::CniResult;
use crate::validate;
use crate::version::{select_version, Version};

/// A parsed network configuration list.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfList {
    /// The version chosen for this list: the highest known version of
    /// `cniVersion` ∪ `cniVersions` (see [`select_version`]).
    pub cni_version: Version,
    /// `cniVersions` as written (1.1.0), possibly with versions tern does not know.
    pub cni_versions: Vec<String>,
    pub name: String,
    /// If true the runtime must not run CHECK (it reports success).
    pub disable_check: bool,
    /// If true the runtime must not run GC (1.1.0).
    pub disable_gc: bool,
    /// The plugin objects as written, unknown keys included.
    pub plugins: Vec<Map<String, Value>>,
    /// The list bytes as loaded (for `.conf` files: the synthesized list).
    /// libcni stores these, base64-encoded, in the result cache.
    pub raw_bytes: Vec<u8>,
}

fn invalid(msg: String) -> CniError {
    CniError::invalid_config(msg)
}

/// `disableCheck`, `disableGC`, ...: a JSON bool, or the strings "true"/"false"
/// in any case (libcni main). Absent or `null` is false.
fn parse_bool(raw: &Map<String, Value>, key: &str) -> Result<bool, CniError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
        Some(other) => Err(invalid(format!("invalid {key}: expected a boolean or \"true\"/\"false\", got {other}"))),
    }
}

fn opt_string(raw: &Map<String, Value>, key: &str) -> Result<Option<String>, CniError> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(invalid(format!("{key} must be a string, got {other}"))),
    }
}

fn check_plugin(i: usize, p: &Value) -> Result<Map<String, Value>, CniError> {
    let Value::Object(m) = p else {
        return Err(invalid(format!("plugins[{i}] must be an object, got {p}")));
    };
    let field = format!("plugins[{i}].type");
    match m.get("type") {
        None | Some(Value::Null) => return Err(invalid(format!("missing plugin type ({field})"))),
        Some(Value::String(t)) => validate::plugin_type(t, &field)?,
        Some(other) => return Err(invalid(format!("{field} must be a string, got {other}"))),
    }
    match m.get("capabilities") {
        None | Some(Value::Null) => {}
        Some(Value::Object(caps)) => {
            if let Some((k, v)) = caps.iter().find(|(_, v)| !v.is_boolean()) {
                return Err(invalid(format!("plugins[{i}].capabilities.{k} must be a boolean, got {v}")));
            }
        }
        Some(other) => return Err(invalid(format!("plugins[{i}].capabilities must be an object, got {other}"))),
    }
    Ok(m.clone())
}

impl NetConfList {
    /// Parse a `.conflist`. Not JSON or not an object: code 6. A bad `name`,
    /// `cniVersion(s)`, `disableCheck`/`disableGC`, an empty or missing
    /// `plugins`, or a plugin without a valid `type`: code 7, naming the key.
    /// An unknown `cniVersion` without a known alternative in `cniVersions`:
    /// code 1.
    pub fn parse(bytes: &[u8]) -> Result<NetConfList, CniError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| CniError::new(Code::DecodingFailure, format!("error parsing configuration list: {e}")))?;
        let Value::Object(raw) = value else {
            return Err(CniError::new(Code::DecodingFailure, "error parsing configuration list: not a JSON object"));
        };

        let name = opt_string(&raw, "name")?.unwrap_or_default();
        validate::network_name(&name)?;

        let cni_version = opt_string(&raw, "cniVersion")?;
        let cni_versions: Vec<String> = match raw.get("cniVersions") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(invalid(format!("cniVersions[{i}] must be a string, got {other}"))),
                })
                .collect::<Result<_, _>>()?,
            Some(other) => return Err(invalid(format!("cniVersions must be a list of strings, got {other}"))),
        };
        let chosen = select_version(cni_version.as_deref(), &cni_versions)?;

        let disable_check = parse_bool(&raw, "disableCheck")?;
        let disable_gc = parse_bool(&raw, "disableGC")?;

        let plugins = match raw.get("plugins") {
            None | Some(Value::Null) => return Err(invalid("missing plugins (plugins)".into())),
            Some(Value::Array(a)) if a.is_empty() => return Err(invalid("no plugins in list (plugins)".into())),
            Some(Value::Array(a)) => a.iter().enumerate().map(|(i, p)| check_plugin(i, p)).collect::<Result<_, _>>()?,
            Some(other) => return Err(invalid(format!("plugins must be a list, got {other}"))),
        };

        Ok(NetConfList {
            cni_version: chosen,
            cni_versions,
            name,
            disable_check,
            disable_gc,
            plugins,
            raw_bytes: bytes.to_vec(),
        })
    }

    /// Up-convert a single-plugin `.conf`/`.json` file to a one-element list,
    /// as libcni's `ConfListFromConf` does: the list takes the file's `name`
    /// and `cniVersion`, and the whole file object becomes `plugins[0]`.
    pub fn from_single_conf(bytes: &[u8]) -> Result<NetConfList, CniError> {
        let value: Value = serde_json::from_slice(bytes)
            .map_err(|e| CniError::new(Code::DecodingFailure, format!("error parsing configuration: {e}")))?;
        let Value::Object(conf) = value else {
            return Err(CniError::new(Code::DecodingFailure, "error parsing configuration: not a JSON object"));
        };
        match conf.get("type") {
            None | Some(Value::Null) => return Err(invalid("missing plugin type (type)".into())),
            Some(Value::String(t)) => validate::plugin_type(t, "type")?,
            Some(other) => return Err(invalid(format!("type must be a string, got {other}"))),
        }
        let mut list = Map::new();
        for key in ["cniVersion", "name"] {
            if let Some(v) = conf.get(key) {
                list.insert(key.into(), v.clone());
            }
        }
        list.insert("plugins".into(), Value::Array(vec![Value::Object(conf)]));
        NetConfList::parse(&serde_json::to_vec(&list).expect("list serialises"))
    }

    /// `plugins[index].type`.
    pub fn plugin_type(&self, index: usize) -> &str {
        self.plugins[index].get("type").and_then(Value::as_str).unwrap_or_default()
    }

    /// The capabilities `plugins[index]` declares `true`, in file order.
    pub fn capabilities(&self, index: usize) -> Vec<String> {
        match self.plugins[index].get("capabilities") {
            Some(Value::Object(caps)) => {
                caps.iter().filter(|(_, v)| v.as_bool() == Some(true)).map(|(k, _)| k.clone()).collect()
            }
            _ => Vec::new(),
        }
    }

    /// The config `plugins[index]` receives on stdin for ADD, DEL, CHECK and
    /// STATUS (R8/R9):
    ///
    /// - `cniVersion` (the chosen version) and `name` (the list's) are set.
    /// - `runtimeConfig` holds each capability the plugin declares `true`
    ///   that `runtime_config` supplies. It is not set when that is empty (as
    ///   libcni), so STATUS, which has none, passes an empty map.
    /// - `prevResult` is `prev_result` rendered in the list's version. Pass
    ///   `None` for the first ADD (and STATUS): any `prevResult` in the file
    ///   is then removed.
    /// - `capabilities` and all other keys pass through unchanged, except
    ///   the runtime-reserved `cni.dev/*` keys, which are removed.
    ///
    /// Panics if `index` is out of range.
    pub fn plugin_request(
        &self,
        index: usize,
        runtime_config: &Map<String, Value>,
        prev_result: Option<&CniResult>,
    ) -> Vec<u8> {
        let mut conf = self.base_request(index);
        let mut rc = Map::new();
        for cap in self.capabilities(index) {
            if let Some(v) = runtime_config.get(&cap) {
                rc.insert(cap, v.clone());
            }
        }
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        match prev_result {
            Some(p) => {
                conf.insert("prevResult".into(), p.to_value_lossy(self.cni_version));
            }
            None => {
                conf.remove("prevResult");
            }
        }
        serde_json::to_vec(&conf).expect("config serialises")
    }

    /// The config `plugins[index]` receives for GC: the plugin object with
    /// `cniVersion`, `name` and the still-valid attachments under both
    /// `cni.dev/valid-attachments` and `cni.dev/attachments` (as libcni
    /// >= 1.2.3 sends them). No `prevResult`, no injected `runtimeConfig`.
    ///
    /// Panics if `index` is out of range.
    pub fn gc_request(&self, index: usize, valid_attachments: &[Attachment]) -> Vec<u8> {
        let mut conf = self.base_request(index);
        conf.remove("prevResult");
        let list = serde_json::to_value(valid_attachments).expect("attachments serialise");
        conf.insert(VALID_ATTACHMENTS.into(), list.clone());
        conf.insert(ATTACHMENTS.into(), list);
        serde_json::to_vec(&conf).expect("config serialises")
    }

    fn base_request(&self, index: usize) -> Map<String, Value> {
        let mut conf = self.plugins[index].clone();
        conf.retain(|k, _| !k.starts_with("cni.dev/"));
        conf.insert("cniVersion".into(), Value::String(self.cni_version.as_str().into()));
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIST: &str = r#"{"cniVersion":"1.0.0","cniVersions":["0.4.0","1.1.0","7.0.0"],"name":"net","disableCheck":"TRUE",
        "plugins":[{"type":"bridge","ipam":{"type":"host-local"},"cni.dev/x":1,"prevResult":{}},
                   {"type":"portmap","capabilities":{"portMappings":true,"mac":false},"snat":true}]}"#;

    #[test]
    fn parses_and_derives_requests() {
        let l = NetConfList::parse(LIST.as_bytes()).unwrap();
        assert_eq!(l.cni_version, Version::V1_1_0);
        assert!(l.disable_check && !l.disable_gc);
        assert_eq!(l.capabilities(1), vec!["portMappings".to_string()]);
        let rc = json!({"portMappings":[{"hostPort":80,"containerPort":8080}],"mac":"c2:00:00:00:00:01"});
        let rc = rc.as_object().unwrap();

        let first: Value = serde_json::from_slice(&l.plugin_request(0, rc, None)).unwrap();
        assert_eq!(first, json!({"type":"bridge","ipam":{"type":"host-local"},"cniVersion":"1.1.0","name":"net"}));

        let prev = CniResult::default();
        let second: Value = serde_json::from_slice(&l.plugin_request(1, rc, Some(&prev))).unwrap();
        assert_eq!(
            second,
            json!({"type":"portmap","capabilities":{"portMappings":true,"mac":false},"snat":true,"cniVersion":"1.1.0","name":"net",
                   "runtimeConfig":{"portMappings":[{"hostPort":80,"containerPort":8080}]},"prevResult":{"cniVersion":"1.1.0","dns":{}}})
        );

        let gc: Value =
            serde_json::from_slice(&l.gc_request(0, &[Attachment { container_id: "c".into(), ifname: "eth0".into() }]))
                .unwrap();
        assert_eq!(gc["cni.dev/valid-attachments"], json!([{"containerID":"c","ifname":"eth0"}]));
        assert_eq!(gc["cni.dev/attachments"], gc["cni.dev/valid-attachments"]);
        assert!(gc.get("cni.dev/x").is_none() && gc.get("prevResult").is_none());
    }

    #[test]
    fn single_conf_up_converts() {
        let conf = br#"{"cniVersion":"0.4.0","name":"n","type":"bridge","bridge":"cni0"}"#;
        let l = NetConfList::from_single_conf(conf).unwrap();
        assert_eq!(l.cni_version, Version::V0_4_0);
        assert_eq!(l.plugins.len(), 1);
        assert_eq!(Value::Object(l.plugins[0].clone()), serde_json::from_slice::<Value>(conf).unwrap());
        let raw: Value = serde_json::from_slice(&l.raw_bytes).unwrap();
        assert_eq!(raw["plugins"][0]["bridge"], "cni0");
        assert_eq!(NetConfList::from_single_conf(br#"{"name":"n"}"#).unwrap_err().code, 7);
    }
}
