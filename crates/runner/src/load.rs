//! Finding a network configuration in a directory (libcni `LoadConfList`,
//! checklist 2.1).
//!
//! - `*.conflist` files are lists; `*.conf` and `*.json` files are single
//!   plugin configs, up-converted to a one-plugin list (a `.conf` that holds a
//!   `plugins` key is read as a list).
//! - By name: the first `.conflist` (in lexical order of file names) whose
//!   `name` matches, else the first `.conf`/`.json`, as libcni.
//! - Without a name: the first network file in lexical order of file names,
//!   whatever its extension (what containerd and CRI-O do for the default network).
use std::path::{Path, PathBuf};

use serde_json::Value;
use tern_cni::NetConfList;

use crate::Error;

/// The network file kinds, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    List,
    Single,
}

fn kind_of(file_name: &str) -> Option<Kind> {
    match Path::new(file_name).extension()?.to_str()? {
        "conflist" => Some(Kind::List),
        "conf" | "json" => Some(Kind::Single),
        _ => None,
    }
}

/// Parse one network file's bytes.
pub fn parse_file(file_name: &str, bytes: &[u8]) -> Result<NetConfList, String> {
    let is_list = match kind_of(file_name) {
        Some(Kind::List) => true,
        Some(Kind::Single) => {
            serde_json::from_slice::<Value>(bytes).ok().and_then(|v| v.get("plugins").cloned()).is_some()
        }
        None => return Err(format!("{file_name}: not a .conflist, .conf or .json file")),
    };
    let parsed = if is_list { NetConfList::parse(bytes) } else { NetConfList::from_single_conf(bytes) };
    parsed
        .map(|mut list| {
            if !is_list {
                list.raw_bytes = up_converted_bytes(bytes);
            }
            list
        })
        .map_err(|e| {
            if e.code == tern_cni::Code::IncompatibleVersion as u32 {
                // The details name "the plugin"; here the runner is the one that cannot use the version.
                format!("{file_name}: {} (tern supports {})", e.msg, tern_cni::Version::supported_strings().join(", "))
            } else {
                format!("{file_name}: {e}")
            }
        })
}

/// The list bytes libcni's `ConfListFromConf` makes of a single-plugin
/// config (and caches): a Go map, so keys sorted at every level, with
/// `cniVersion` and `name` always present.
fn up_converted_bytes(conf: &[u8]) -> Vec<u8> {
    let conf: Value = serde_json::from_slice(conf).unwrap_or_default();
    let field = |k: &str| conf.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let list = serde_json::json!({ "cniVersion": field("cniVersion"), "name": field("name"), "plugins": [conf] });
    crate::gojson::encode(&list).into_bytes()
}

/// The `name` of a network file, read leniently (without validating the rest).
fn name_of(bytes: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(bytes).ok()?.get("name")?.as_str().map(str::to_string)
}

/// Pick the network from `files` (file name, bytes), pure. `dir` only names
/// the directory in messages.
pub fn select(files: &[(String, Vec<u8>)], name: Option<&str>, dir: &str) -> Result<NetConfList, String> {
    let mut files: Vec<&(String, Vec<u8>)> = files.iter().filter(|(f, _)| kind_of(f).is_some()).collect();
    files.sort_by(|a, b| a.0.cmp(&b.0));
    if files.is_empty() {
        return Err(format!("no network configurations (*.conflist, *.conf, *.json) found in {dir}"));
    }
    let Some(name) = name else {
        let (file, bytes) = files[0];
        return parse_file(file, bytes);
    };
    for kind in [Kind::List, Kind::Single] {
        for (file, bytes) in files.iter().filter(|(f, _)| kind_of(f) == Some(kind)) {
            if name_of(bytes).as_deref() == Some(name) {
                return parse_file(file, bytes);
            }
        }
    }
    let mut known: Vec<String> = files.iter().filter_map(|(_, b)| name_of(b)).collect();
    known.sort();
    known.dedup();
    Err(format!(
        "no network named {name:?} in {dir} (networks there: {})",
        if known.is_empty() { "none readable".to_string() } else { known.join(", ") }
    ))
}

/// Load network `name` (or the default network) from `conf_dir`.
pub fn load_network(conf_dir: &Path, name: Option<&str>) -> Result<NetConfList, Error> {
    let dir = conf_dir.display().to_string();
    let rd = std::fs::read_dir(conf_dir).map_err(|e| Error::Config(format!("cannot read {dir}: {e}")))?;
    let mut files = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::Config(format!("cannot read {dir}: {e}")))?;
        let Ok(file) = entry.file_name().into_string() else { continue };
        if kind_of(&file).is_none() {
            continue;
        }
        let path: PathBuf = entry.path();
        if !path.is_file() {
            continue;
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        files.push((file, bytes));
    }
    select(&files, name, &dir).map_err(Error::Config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str, body: &str) -> (String, Vec<u8>) {
        (name.to_string(), body.as_bytes().to_vec())
    }

    #[test]
    fn picks_by_name_and_by_order() {
        let files = vec![
            f("20-b.conflist", r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"x"}]}"#),
            f("10-a.conf", r#"{"cniVersion":"1.0.0","name":"a","type":"y"}"#),
            f("30-a.conflist", r#"{"cniVersion":"0.4.0","name":"a","plugins":[{"type":"z"}]}"#),
            f("05-bad.conflist", r#"{"cniVersion":"9.9.9","name":"bad","plugins":[{"type":"z"}]}"#),
            f("README", "not a network"),
        ];
        // Default: the first file in lexical order, whatever it holds.
        assert!(select(&files, None, "d").unwrap_err().contains("05-bad.conflist"));
        assert_eq!(select(&files[..3], None, "d").unwrap().plugins[0]["type"], "y");
        // By name: conflists first.
        assert_eq!(select(&files, Some("a"), "d").unwrap().plugin_type(0), "z");
        assert_eq!(select(&files, Some("b"), "d").unwrap().plugin_type(0), "x");
        let err = select(&files, Some("nope"), "/etc/cni/net.d").unwrap_err();
        assert!(err.contains("\"nope\"") && err.contains("/etc/cni/net.d") && err.contains("a, b, bad"), "{err}");
        assert!(select(&[], None, "d").unwrap_err().contains("no network configurations"));
    }

    #[test]
    fn single_conf_is_up_converted() {
        let files = vec![f("a.json", r#"{"cniVersion":"1.0.0","name":"a","type":"y","k":1}"#)];
        let l = select(&files, Some("a"), "d").unwrap();
        assert_eq!(l.plugins.len(), 1);
        assert_eq!(l.plugins[0]["k"], 1);
        // The bytes libcni caches for it.
        assert_eq!(
            String::from_utf8(l.raw_bytes).unwrap(),
            r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"cniVersion":"1.0.0","k":1,"name":"a","type":"y"}]}"#
        );
    }
}
