//! Spec versions and what each allows.
use std::fmt;
use std::str::FromStr;

use crate::error::{CniError, Code};

/// Every spec version tern speaks, oldest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Version {
    V0_1_0,
    V0_2_0,
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl Version {
    pub const ALL: [Version; 7] = [
        Version::V0_1_0,
        Version::V0_2_0,
        Version::V0_3_0,
        Version::V0_3_1,
        Version::V0_4_0,
        Version::V1_0_0,
        Version::V1_1_0,
    ];
    pub const LATEST: Version = Version::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            Version::V0_1_0 => "0.1.0",
            Version::V0_2_0 => "0.2.0",
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
            Version::V1_1_0 => "1.1.0",
        }
    }

    /// A missing or empty version means 0.1.0 (libcni `DecodeVersion`).
    pub fn parse_or_default(s: Option<&str>) -> Result<Version, CniError> {
        match s {
            None | Some("") => Ok(Version::V0_1_0),
            Some(v) => v.parse(),
        }
    }

    pub fn supports_check(self) -> bool {
        self >= Version::V0_4_0
    }
    pub fn supports_gc_and_status(self) -> bool {
        self >= Version::V1_1_0
    }
    /// Results before 0.3.0 carry at most one address per family (`ip4`/`ip6`).
    pub fn is_legacy_result(self) -> bool {
        self < Version::V0_3_0
    }
    /// DEL carries prevResult from 0.4.0.
    pub fn has_prev_result_on_del(self) -> bool {
        self >= Version::V0_4_0
    }

    pub fn supported_strings() -> Vec<&'static str> {
        Version::ALL.iter().map(|v| v.as_str()).collect()
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Version {
    type Err = CniError;
    /// An unknown but well-formed version is code 1 ("incompatible CNI
    /// versions"); anything that is not `MAJOR.MINOR.PATCH` is code 6.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Version::ALL.iter().copied().find(|v| v.as_str() == s).ok_or_else(|| {
            if is_semver(s) {
                incompatible(s, &Version::ALL)
            } else {
                CniError::new(Code::DecodingFailure, format!("invalid cniVersion {s:?}: not a semantic version"))
            }
        })
    }
}

/// The error a plugin gives for a config version it does not support
/// (reference skel wording: code 1, details naming both sides).
pub fn incompatible(config: &str, supported: &[Version]) -> CniError {
    CniError::new(Code::IncompatibleVersion, "incompatible CNI versions").with_details(format!(
        "config is {:?}, plugin supports {:?}",
        config,
        supported.iter().map(|v| v.as_str()).collect::<Vec<_>>()
    ))
}

fn is_semver(s: &str) -> bool {
    semver_triple(s).is_some()
}

fn semver_triple(s: &str) -> Option<(u64, u64, u64)> {
    let mut parts = s.split('.');
    let mut next = || -> Option<u64> {
        let p = parts.next()?;
        if p.is_empty() || !p.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        p.parse().ok()
    };
    let triple = (next()?, next()?, next()?);
    parts.next().is_none().then_some(triple)
}

/// The runtime's version choice for a network configuration list (SPEC-1.1
/// "cniVersions"): the highest of `cniVersion` ∪ `cniVersions` among the
/// versions tern implements. Entries tern does not know (for example a
/// future `"1.2.0"`) are skipped, as libcni skips versions above its own.
///
/// - Nothing given (no or empty `cniVersion`, no `cniVersions`): 0.1.0 (C1).
/// - An entry that is not `MAJOR.MINOR.PATCH`: code 6, naming the key.
/// - No known version at all: code 1 (the plugin-side wording), naming the key.
pub fn select_version(cni_version: Option<&str>, cni_versions: &[String]) -> Result<Version, CniError> {
    let single = cni_version.filter(|s| !s.is_empty());
    let mut best: Option<Version> = None;
    let mut consider = |s: &str, field: &str| -> Result<(), CniError> {
        if semver_triple(s).is_none() {
            return Err(CniError::new(Code::DecodingFailure, format!("invalid {field} {s:?}: not a semantic version")));
        }
        if let Some(v) = Version::ALL.iter().copied().find(|v| v.as_str() == s) {
            best = best.max(Some(v));
        }
        Ok(())
    };
    for (i, s) in cni_versions.iter().enumerate() {
        consider(s, &format!("cniVersions[{i}]"))?;
    }
    if let Some(s) = single {
        consider(s, "cniVersion")?;
    }
    match best {
        Some(v) => Ok(v),
        None if single.is_none() && cni_versions.is_empty() => Ok(Version::V0_1_0),
        None => {
            let given: Vec<&str> = single.into_iter().chain(cni_versions.iter().map(String::as_str)).collect();
            let mut e = incompatible(given[0], &Version::ALL);
            e.msg = format!("incompatible CNI versions: none of cniVersion/cniVersions {given:?} is supported");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_version() {
        for v in Version::ALL {
            assert_eq!(v.as_str().parse::<Version>().unwrap(), v);
        }
    }

    #[test]
    fn empty_means_0_1_0() {
        assert_eq!(Version::parse_or_default(Some("")).unwrap(), Version::V0_1_0);
        assert_eq!(Version::parse_or_default(None).unwrap(), Version::V0_1_0);
    }

    #[test]
    fn unknown_semver_is_code_1_and_garbage_is_code_6() {
        assert_eq!("2.0.0".parse::<Version>().unwrap_err().code, 1);
        assert_eq!("banana".parse::<Version>().unwrap_err().code, 6);
        assert_eq!("1.0".parse::<Version>().unwrap_err().code, 6);
        assert_eq!("1.0.0.0".parse::<Version>().unwrap_err().code, 6);
        assert_eq!("1.+0.0".parse::<Version>().unwrap_err().code, 6);
    }

    #[test]
    fn select_version_picks_highest_known() {
        let l = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(select_version(Some("0.4.0"), &l(&["1.0.0", "9.9.9"])).unwrap(), Version::V1_0_0);
        assert_eq!(select_version(None, &[]).unwrap(), Version::V0_1_0);
        assert_eq!(select_version(Some("9.0.0"), &[]).unwrap_err().code, 1);
        assert_eq!(select_version(None, &l(&["x"])).unwrap_err().code, 6);
    }
}
