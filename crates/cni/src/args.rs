//! CNI_ARGS: `K=V;K2=V2` (deprecated by the spec in favour of `args`, still
//! sent by every Kubernetes runtime).
use crate::error::{CniError, Code};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pairs: Vec<(String, String)>,
}

impl CniArgs {
    /// Each pair must split into exactly two parts, as libcni's `LoadArgs` requires.
    pub fn parse(s: &str) -> Result<CniArgs, CniError> {
        let mut pairs = Vec::new();
        for item in s.split(';').filter(|p| !p.is_empty()) {
            let mut kv = item.split('=');
            match (kv.next(), kv.next(), kv.next()) {
                (Some(k), Some(v), None) if !k.is_empty() => pairs.push((k.to_string(), v.to_string())),
                _ => return Err(CniError::new(Code::InvalidEnv, format!("ARGS: invalid pair {item:?} (CNI_ARGS)"))),
            }
        }
        Ok(CniArgs { pairs })
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    pub fn ignore_unknown(&self) -> bool {
        self.get("IgnoreUnknown").is_some_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
    }

    /// Reject keys this plugin does not know unless `IgnoreUnknown` is set.
    /// The K8S_* keys every Kubernetes runtime sends are always accepted.
    pub fn check_known(&self, known: &[&str]) -> Result<(), CniError> {
        if let Some(v) = self.get("IgnoreUnknown") {
            // libcni's UnmarshallableBool: 1/0/true/false, case-insensitive.
            let valid = ["1", "0", "true", "false"].iter().any(|b| v.eq_ignore_ascii_case(b));
            if !valid {
                return Err(CniError::new(
                    Code::InvalidEnv,
                    format!("ARGS: invalid boolean {v:?} for IgnoreUnknown (CNI_ARGS)"),
                ));
            }
        }
        if self.ignore_unknown() {
            return Ok(());
        }
        let unknown: Vec<String> = self
            .pairs
            .iter()
            .filter(|(k, _)| k != "IgnoreUnknown" && !known.contains(&k.as_str()) && !k.starts_with("K8S_"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(Code::InvalidEnv, format!("ARGS: unknown args {unknown:?} (CNI_ARGS)")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let a = CniArgs::parse("IgnoreUnknown=1;K8S_POD_NAME=p;IP=10.0.0.5").unwrap();
        assert_eq!(a.get("IP"), Some("10.0.0.5"));
        assert!(a.ignore_unknown());
        assert!(CniArgs::parse("A=b=c").is_err());
        assert!(CniArgs::parse("novalue").is_err());
        let strict = CniArgs::parse("FOO=1").unwrap();
        assert!(strict.check_known(&["IP"]).is_err());
        assert!(CniArgs::parse("FOO=1;IgnoreUnknown=true").unwrap().check_known(&[]).is_ok());
        assert!(CniArgs::parse("FOO=1;IgnoreUnknown=TRUE").unwrap().check_known(&[]).is_ok());
        assert!(CniArgs::parse("FOO=1;IgnoreUnknown=0").unwrap().check_known(&[]).is_err());
        assert_eq!(CniArgs::parse("IgnoreUnknown=yes").unwrap().check_known(&[]).unwrap_err().code, 4);
    }
}
