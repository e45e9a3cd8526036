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
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Version::ALL
            .iter()
            .copied()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                if is_semver(s) {
                    CniError::new(Code::IncompatibleVersion, "incompatible CNI versions").with_details(
                        format!(
                            "config is {:?}, plugin supports {:?}",
                            s,
                            Version::supported_strings()
                        ),
                    )
                } else {
                    CniError::new(
                        Code::DecodingFailure,
                        format!("invalid cniVersion {s:?}: not a semantic version"),
                    )
                }
            })
    }
}

fn is_semver(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
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
    }
}
