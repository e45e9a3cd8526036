//! Error results with the spec's codes.
use std::fmt;

use serde::{Deserialize, Serialize};

/// The spec's well-known error codes (SPEC 1.1, "Error").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    IncompatibleVersion = 1,
    UnsupportedField = 2,
    UnknownContainer = 3,
    InvalidEnv = 4,
    Io = 5,
    DecodingFailure = 6,
    InvalidNetworkConfig = 7,
    /// libcni/skel only (not in the spec table): `CNI_NETNS` is the plugin's own netns.
    InvalidNetNs = 8,
    TryAgainLater = 11,
    NotAvailable = 50,
    LimitedConnectivity = 51,
    /// Plugin-specific failures (kernel refused, address exhausted, ...).
    Internal = 999,
}

/// An error result, printed as JSON on stdout with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniError {
    #[serde(rename = "cniVersion", default, skip_serializing_if = "String::is_empty")]
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: Code, msg: impl Into<String>) -> Self {
        CniError { cni_version: String::new(), code: code as u32, msg: msg.into(), details: String::new() }
    }
    pub fn with_code(code: u32, msg: impl Into<String>) -> Self {
        CniError { cni_version: String::new(), code, msg: msg.into(), details: String::new() }
    }
    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }
    pub fn internal(msg: impl Into<String>) -> Self {
        CniError::new(Code::Internal, msg)
    }
    pub fn invalid_config(msg: impl Into<String>) -> Self {
        CniError::new(Code::InvalidNetworkConfig, msg)
    }
    /// Code 2. The spec requires the message to name the key and the value.
    pub fn unsupported_field(key: &str, value: &serde_json::Value) -> Self {
        CniError::new(Code::UnsupportedField, format!("unsupported field {key}: {value}"))
    }
    /// Prefix the message with context, keeping the code.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.msg = format!("{ctx}: {}", self.msg);
        self
    }
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("error result serialises")
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

impl From<Code> for u32 {
    fn from(c: Code) -> u32 {
        c as u32
    }
}
