//! The host-local configuration: `ipam` keys, capability args and CNI_ARGS
//! folded into one validated value (the reference's `LoadIPAMConfig`).
use std::net::IpAddr;

use serde::Deserialize;
use tern_cni::args::CniArgs;
use tern_cni::config::{decode_value, parse_ip_maybe_cidr};
use tern_cni::{CniError, Code, NetConf, Route};

use crate::range::{canonical, RangeConf, RangeSet};

/// host-local's default `dataDir`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/networks";

/// The `ipam` object as written.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    // Legacy single range at top level.
    #[serde(default)]
    subnet: Option<String>,
    #[serde(default)]
    range_start: Option<String>,
    #[serde(default)]
    range_end: Option<String>,
    #[serde(default)]
    gateway: Option<String>,
    #[serde(default)]
    ranges: Option<Vec<Vec<RangeConf>>>,
    #[serde(default)]
    routes: Option<Vec<Route>>,
    #[serde(default)]
    data_dir: Option<String>,
    #[serde(default)]
    resolv_conf: Option<String>,
}

/// A validated host-local configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLocalConfig {
    /// The network name: the store's directory under `data_dir`.
    pub name: String,
    /// Final order: `runtimeConfig.ipRanges`, then the legacy top-level
    /// range, then `ranges`. The index is the `last_reserved_ip.<N>` suffix.
    pub range_sets: Vec<RangeSet>,
    pub routes: Vec<Route>,
    /// `ipam.dataDir`, `None` for the default.
    pub data_dir: Option<String>,
    pub resolv_conf: Option<String>,
    /// CNI_ARGS `IP`, then `args.cni.ips`, then `runtimeConfig.ips`
    /// (host-local combines them all); deduplicated, prefixes dropped.
    pub requested: Vec<IpAddr>,
}

impl HostLocalConfig {
    pub fn data_dir(&self) -> &str {
        self.data_dir.as_deref().unwrap_or(DEFAULT_DATA_DIR)
    }

    /// Load and validate everything ADD, CHECK and STATUS need.
    pub fn from_conf(conf: &NetConf, args: &CniArgs) -> Result<HostLocalConfig, CniError> {
        let raw: Raw = conf.ipam_options()?;

        // Where each final range set came from, for error messages.
        let mut sources: Vec<(String, Vec<RangeConf>)> = Vec::new();
        if let Some(v) = &conf.runtime_config.ip_ranges {
            let rt: Vec<Vec<RangeConf>> = decode_value(v, "runtimeConfig.ipRanges")?;
            sources.extend(rt.into_iter().enumerate().map(|(i, s)| (format!("runtimeConfig.ipRanges[{i}]"), s)));
        }
        if raw.subnet.as_deref().is_some_and(|s| !s.is_empty()) {
            let legacy = RangeConf {
                subnet: raw.subnet.clone(),
                range_start: raw.range_start.clone(),
                range_end: raw.range_end.clone(),
                gateway: raw.gateway.clone(),
            };
            sources.push(("ipam".to_string(), vec![legacy]));
        }
        for (i, s) in raw.ranges.unwrap_or_default().into_iter().enumerate() {
            sources.push((format!("ipam.ranges[{i}]"), s));
        }
        if sources.is_empty() {
            return Err(CniError::invalid_config("no IP ranges specified (ipam.ranges)"));
        }

        let mut range_sets = Vec::with_capacity(sources.len());
        for (n, (path, confs)) in sources.iter().enumerate() {
            let set = RangeSet::from_conf(confs).map_err(|e| {
                // The legacy range is written flat under `ipam`, not as a list.
                let field = match (e.range, e.field) {
                    (Some(_), Some(f)) if path == "ipam" => format!("ipam.{f}"),
                    (Some(r), Some(f)) => format!("{path}[{r}].{f}"),
                    (Some(_), None) if path == "ipam" => path.clone(),
                    (Some(r), None) => format!("{path}[{r}]"),
                    (None, _) => path.clone(),
                };
                CniError::invalid_config(format!("invalid range set {n}: {} ({field})", e.msg))
            })?;
            range_sets.push(set);
        }

        // Results before 0.3.0 carry one address per family.
        let v4 = range_sets.iter().filter(|s| s.is_ipv4()).count();
        if conf.cni_version.is_legacy_result() && (v4 > 1 || range_sets.len() - v4 > 1) {
            return Err(CniError::invalid_config(format!(
                "CNI version {} does not support more than 1 address per family (cniVersion)",
                conf.cni_version
            )));
        }

        for i in 0..range_sets.len() {
            for j in i + 1..range_sets.len() {
                if range_sets[i].overlaps(&range_sets[j]) {
                    return Err(CniError::invalid_config(format!(
                        "range set {i} overlaps with {j} ({})",
                        sources[j].0
                    )));
                }
            }
        }

        Ok(HostLocalConfig {
            name: conf.name.clone(),
            range_sets,
            routes: raw.routes.unwrap_or_default(),
            data_dir: raw.data_dir.filter(|d| !d.is_empty()),
            resolv_conf: raw.resolv_conf.filter(|r| !r.is_empty()),
            requested: requested_ips(conf, args)?,
        })
    }

    /// Only `ipam.dataDir`, without validating ranges: DEL and GC must work
    /// even after the ranges were edited into something invalid.
    pub fn data_dir_of(conf: &NetConf) -> Result<String, CniError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct DirOnly {
            #[serde(default)]
            data_dir: Option<String>,
        }
        let d: DirOnly = conf.ipam_options()?;
        Ok(d.data_dir.filter(|d| !d.is_empty()).unwrap_or_else(|| DEFAULT_DATA_DIR.to_string()))
    }
}

/// Every requested address, in the reference's order.
fn requested_ips(conf: &NetConf, args: &CniArgs) -> Result<Vec<IpAddr>, CniError> {
    let mut out: Vec<IpAddr> = Vec::new();
    let mut push = |ip: IpAddr| {
        let ip = canonical(ip);
        if !out.contains(&ip) {
            out.push(ip);
        }
    };
    if let Some(v) = args.get("IP").filter(|v| !v.is_empty()) {
        let (ip, _) = parse_ip_maybe_cidr(v.trim())
            .ok_or_else(|| CniError::new(Code::InvalidEnv, format!("cannot understand ip {v:?} (CNI_ARGS IP)")))?;
        push(ip);
    }
    for (field, list) in [("args.cni.ips", conf.args_ips()?), ("runtimeConfig.ips", conf.runtime_config.ips.clone())] {
        for (i, s) in list.iter().enumerate() {
            let (ip, _) = parse_ip_maybe_cidr(s.trim())
                .ok_or_else(|| CniError::invalid_config(format!("cannot understand ip {s:?} ({field}[{i}])")))?;
            push(ip);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_cni::{Command, Version};

    pub(crate) fn conf(json: &str) -> NetConf {
        NetConf::parse(json.as_bytes(), Command::Add, &Version::ALL).unwrap()
    }

    fn load(json: &str) -> Result<HostLocalConfig, CniError> {
        HostLocalConfig::from_conf(&conf(json), &CniArgs::default())
    }

    #[test]
    fn legacy_prepended_and_runtime_first() {
        let c = load(
            r#"{"cniVersion":"1.0.0","name":"n","type":"tern-ipam",
                "runtimeConfig":{"ipRanges":[[{"subnet":"10.3.0.0/24"}]]},
                "ipam":{"subnet":"10.1.0.0/24","ranges":[[{"subnet":"10.2.0.0/24"}]],"dataDir":"/tmp/x"}}"#,
        )
        .unwrap();
        let firsts: Vec<String> = c.range_sets.iter().map(|s| s.ranges[0].subnet.to_string()).collect();
        assert_eq!(firsts, ["10.3.0.0/24", "10.1.0.0/24", "10.2.0.0/24"]);
        assert_eq!(c.data_dir(), "/tmp/x");
    }

    #[test]
    fn errors_name_the_field() {
        let e = load(
            r#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{"ranges":[[{"subnet":"10.0.0.0/24"},{"subnet":"10.1.0.0/24","rangeStart":"10.2.0.1"}]]}}"#,
        )
        .unwrap_err();
        assert_eq!(e.code, 7);
        assert_eq!(e.msg, "invalid range set 0: 10.2.0.1 not in network 10.1.0.0/24 (ipam.ranges[0][1].rangeStart)");

        let e = load(r#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{"ranges":[[{"subnet":"10.6.0.0/31"}]]}}"#)
            .unwrap_err();
        assert_eq!(
            e.msg,
            "invalid range set 0: Network 10.6.0.0/31 too small to allocate from (ipam.ranges[0][0].subnet)"
        );
        let e = load(r#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{"subnet":"10.6.0.0/31"}}"#).unwrap_err();
        assert!(e.msg.ends_with("(ipam.subnet)"), "{}", e.msg);

        let e = load(r#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{}}"#).unwrap_err();
        assert_eq!(e.msg, "no IP ranges specified (ipam.ranges)");

        let e = load(
            r#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{"ranges":[[{"subnet":"10.0.0.0/16"}],[{"subnet":"10.0.5.0/24"}]]}}"#,
        )
        .unwrap_err();
        assert_eq!(e.msg, "range set 0 overlaps with 1 (ipam.ranges[1])");

        let e = load(r#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{"ranges":[[{"subnet":7}]]}}"#).unwrap_err();
        assert!(e.msg.contains("ipam.ranges[0][0].subnet"), "{}", e.msg);
    }

    #[test]
    fn one_per_family_before_0_3_0() {
        let two_v4 = r#""ipam":{"ranges":[[{"subnet":"10.0.0.0/24"}],[{"subnet":"10.1.0.0/24"}]]}"#;
        let e = load(&format!(r#"{{"cniVersion":"0.2.0","name":"n","type":"t",{two_v4}}}"#)).unwrap_err();
        assert_eq!(e.msg, "CNI version 0.2.0 does not support more than 1 address per family (cniVersion)");
        assert!(load(&format!(r#"{{"cniVersion":"0.3.0","name":"n","type":"t",{two_v4}}}"#)).is_ok());
    }

    #[test]
    fn requested_ips_are_combined() {
        let c = conf(
            r#"{"cniVersion":"1.0.0","name":"n","type":"t","args":{"cni":{"ips":["10.0.0.7"]}},
                "runtimeConfig":{"ips":["10.0.0.8/24","10.0.0.7"]},"ipam":{"subnet":"10.0.0.0/24"}}"#,
        );
        let args = CniArgs::parse("IP=10.0.0.6/24").unwrap();
        let h = HostLocalConfig::from_conf(&c, &args).unwrap();
        let want: Vec<IpAddr> = ["10.0.0.6", "10.0.0.7", "10.0.0.8"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(h.requested, want);
        let bad = CniArgs::parse("IP=nope").unwrap();
        assert_eq!(HostLocalConfig::from_conf(&c, &bad).unwrap_err().code, 4);
    }

    #[test]
    fn data_dir_without_validation() {
        let c = conf(r#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{"subnet":"bogus","dataDir":"/d"}}"#);
        assert_eq!(HostLocalConfig::data_dir_of(&c).unwrap(), "/d");
        let c = conf(r#"{"cniVersion":"1.0.0","name":"n","type":"t","ipam":{}}"#);
        assert_eq!(HostLocalConfig::data_dir_of(&c).unwrap(), DEFAULT_DATA_DIR);
    }
}
