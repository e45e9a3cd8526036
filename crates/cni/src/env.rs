//! The CNI_* environment: which command, for which attachment.
//!
//! libcni sets every variable on every call, empty when unused, so an empty
//! value means "unset" throughout.
use std::fmt;

use crate::args::CniArgs;
use crate::error::{CniError, Code};
use crate::validate;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Command, CniError> {
        Ok(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            other => return Err(CniError::new(Code::InvalidEnv, format!("unknown CNI_COMMAND: {other}"))),
        })
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated CNI environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    pub command: Command,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: CniArgs,
    pub path: Vec<String>,
}

impl Env {
    /// Parse from a lookup function (`std::env::var` in the binary, a map in tests).
    ///
    /// Follows the reference skel: the container id, netns and ifname are
    /// required for ADD and CHECK; container id and ifname for DEL. CNI_PATH is
    /// optional here (the spec says so); delegation reports its absence itself.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
        let var = |k: &str| get(k).filter(|v| !v.is_empty());
        let command = match var("CNI_COMMAND") {
            Some(c) => Command::parse(&c)?,
            None => return Err(CniError::new(Code::InvalidEnv, "required env variables [CNI_COMMAND] missing")),
        };
        let container_id = var("CNI_CONTAINERID");
        let netns = var("CNI_NETNS");
        let ifname = var("CNI_IFNAME");

        let (need_id, need_netns, need_ifname) = match command {
            Command::Add | Command::Check => (true, true, true),
            Command::Del => (true, false, true),
            Command::Status | Command::Gc | Command::Version => (false, false, false),
        };
        if need_id && container_id.is_none() {
            // libcni and the spec's conformance notes: an empty container id is code 3.
            return Err(CniError::new(Code::UnknownContainer, "missing containerID (CNI_CONTAINERID)"));
        }
        let mut missing = Vec::new();
        if need_netns && netns.is_none() {
            missing.push("CNI_NETNS");
        }
        if need_ifname && ifname.is_none() {
            missing.push("CNI_IFNAME");
        }
        if !missing.is_empty() {
            return Err(CniError::new(
                Code::InvalidEnv,
                format!("required env variables [{}] missing", missing.join(",")),
            ));
        }
        if need_id {
            if let Some(id) = &container_id {
                validate::container_id(id)?;
            }
        }
        if need_ifname {
            if let Some(ifn) = &ifname {
                validate::interface_name(ifn)?;
            }
        }
        let args = match var("CNI_ARGS") {
            Some(a) => CniArgs::parse(&a)?,
            None => CniArgs::default(),
        };
        let path = var("CNI_PATH")
            .map(|p| p.split(':').filter(|s| !s.is_empty()).map(str::to_string).collect())
            .unwrap_or_default();
        Ok(Env { command, container_id, netns, ifname, args, path })
    }

    pub fn container_id(&self) -> &str {
        self.container_id.as_deref().unwrap_or_default()
    }
    pub fn ifname(&self) -> &str {
        self.ifname.as_deref().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Env::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn empty_values_are_unset() {
        let e =
            env(&[("CNI_COMMAND", "GC"), ("CNI_CONTAINERID", ""), ("CNI_NETNS", ""), ("CNI_PATH", "/a::/b")]).unwrap();
        assert_eq!(e.container_id, None);
        assert_eq!(e.path, vec!["/a", "/b"]);
    }

    #[test]
    fn missing_vars_are_named() {
        let err = env(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "c")]).unwrap_err();
        assert_eq!(err.code, 4);
        assert_eq!(err.msg, "required env variables [CNI_NETNS,CNI_IFNAME] missing");
    }

    #[test]
    fn del_needs_no_netns() {
        let e = env(&[("CNI_COMMAND", "DEL"), ("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "eth0")]).unwrap();
        assert_eq!(e.netns, None);
    }
}
