//! The static allocator: addresses come from the config, CNI_ARGS, `args` or
//! `runtimeConfig`; nothing is stored (the reference's `static` plugin).
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;
use tern_cni::args::CniArgs;
use tern_cni::{CniError, CniResult, Code, Dns, IpConfig, NetConf, Route};

#[derive(Debug, Deserialize)]
struct AddressRaw {
    address: String,
    #[serde(default)]
    gateway: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct Raw {
    #[serde(default)]
    addresses: Option<Vec<AddressRaw>>,
    #[serde(default)]
    routes: Option<Vec<Route>>,
    #[serde(default)]
    dns: Option<Dns>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticConfig {
    /// Address with prefix (host bits kept) and optional gateway.
    pub addresses: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

fn cidr(s: &str, err: impl FnOnce() -> CniError) -> Result<IpNet, CniError> {
    s.trim().parse::<IpNet>().map_err(|_| err())
}

fn addr(address: IpNet) -> IpConfig {
    IpConfig { address, gateway: None, interface: None }
}

impl StaticConfig {
    /// Sources, lowest priority first: `ipam.addresses`, plus CNI_ARGS `IP`
    /// (appended) with `GATEWAY` applied to each address whose subnet
    /// contains it; `args.cni.ips` replaces all that; `runtimeConfig.ips`
    /// replaces everything.
    pub fn from_conf(conf: &NetConf, args: &CniArgs) -> Result<StaticConfig, CniError> {
        let raw: Raw = conf.ipam_options()?;
        let mut addresses = Vec::new();
        for (i, a) in raw.addresses.unwrap_or_default().iter().enumerate() {
            let mut ipc = addr(cidr(&a.address, || {
                CniError::invalid_config(format!(
                    "the 'address' field is expected to be in CIDR notation, got: '{}' (ipam.addresses[{i}].address)",
                    a.address
                ))
            })?);
            if let Some(gw) = a.gateway.as_deref().filter(|g| !g.is_empty()) {
                ipc.gateway = Some(gw.trim().parse().map_err(|_| {
                    CniError::invalid_config(format!("invalid gateway address: {gw} (ipam.addresses[{i}].gateway)"))
                })?);
            }
            addresses.push(ipc);
        }

        if let Some(ips) = args.get("IP").filter(|v| !v.is_empty()) {
            for item in ips.split(',') {
                addresses.push(addr(cidr(item, || {
                    CniError::new(
                        Code::InvalidEnv,
                        format!(
                            "the 'ip' field is expected to be in CIDR notation, got: '{}' (CNI_ARGS IP)",
                            item.trim()
                        ),
                    )
                })?));
            }
        }
        if let Some(gws) = args.get("GATEWAY").filter(|v| !v.is_empty()) {
            for item in gws.split(',') {
                let gw: IpAddr = item.trim().parse().map_err(|_| {
                    CniError::new(Code::InvalidEnv, format!("invalid gateway address: {item} (CNI_ARGS GATEWAY)"))
                })?;
                for a in addresses.iter_mut().filter(|a| a.address.contains(&gw)) {
                    a.gateway = Some(gw);
                }
            }
        }

        for (field, list) in
            [("args.cni.ips", conf.args_ips()?), ("runtimeConfig.ips", conf.runtime_config.ips.clone())]
        {
            if list.is_empty() {
                continue;
            }
            addresses = list
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    cidr(s, || {
                        CniError::invalid_config(format!(
                            "an entry in the 'ips' field is NOT in CIDR notation, got: '{s}' ({field}[{i}])"
                        ))
                    })
                    .map(addr)
                })
                .collect::<Result<_, _>>()?;
        }

        let v4 = addresses.iter().filter(|a| a.address.addr().is_ipv4()).count();
        if conf.cni_version.is_legacy_result() && (v4 > 1 || addresses.len() - v4 > 1) {
            return Err(CniError::invalid_config(format!(
                "CNI version {} does not support more than 1 address per family (cniVersion)",
                conf.cni_version
            )));
        }

        Ok(StaticConfig { addresses, routes: raw.routes.unwrap_or_default(), dns: raw.dns.unwrap_or_default() })
    }

    /// The ADD result (abbreviated: no interfaces).
    pub fn result(&self) -> CniResult {
        CniResult {
            interfaces: Vec::new(),
            ips: self.addresses.clone(),
            routes: self.routes.clone(),
            dns: self.dns.clone(),
        }
    }

    /// CHECK: every configured address is in `prev` with the same prefix and,
    /// when configured, the same gateway.
    pub fn check(&self, prev: &CniResult) -> Result<(), CniError> {
        for want in &self.addresses {
            let Some(got) = prev.ips.iter().find(|p| p.address.addr() == want.address.addr()) else {
                return Err(CniError::internal(format!("static: address {} missing from prevResult", want.address)));
            };
            if got.address != want.address || (want.gateway.is_some() && got.gateway != want.gateway) {
                return Err(CniError::internal(format!(
                    "static: Failed to match addr {} (prevResult has {}{})",
                    want.address,
                    got.address,
                    got.gateway.map(|g| format!(" gateway {g}")).unwrap_or_default()
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_cni::{Command, Version};

    fn load(json: &str, args: &str) -> Result<StaticConfig, CniError> {
        let conf = NetConf::parse(json.as_bytes(), Command::Add, &Version::ALL).unwrap();
        StaticConfig::from_conf(&conf, &CniArgs::parse(args).unwrap())
    }

    fn addrs(c: &StaticConfig) -> Vec<String> {
        c.addresses.iter().map(|a| a.address.to_string()).collect()
    }

    const BASE: &str = r#""cniVersion":"1.0.0","name":"n","type":"tern-ipam""#;

    #[test]
    fn config_then_cni_args() {
        let c = load(
            &format!(
                r#"{{{BASE},"ipam":{{"allocator":"static","addresses":[{{"address":"10.0.0.5/24","gateway":"10.0.0.1"}}],
                "routes":[{{"dst":"0.0.0.0/0"}}],"dns":{{"nameservers":["1.1.1.1"]}}}}}}"#
            ),
            "IP=10.1.0.5/24, fd00::5/64;GATEWAY=fd00::1",
        )
        .unwrap();
        assert_eq!(addrs(&c), ["10.0.0.5/24", "10.1.0.5/24", "fd00::5/64"]);
        assert_eq!(c.addresses[0].gateway, Some("10.0.0.1".parse().unwrap()));
        assert_eq!(c.addresses[1].gateway, None);
        assert_eq!(c.addresses[2].gateway, Some("fd00::1".parse().unwrap()));
        let r = c.result();
        assert_eq!(r.routes.len(), 1);
        assert_eq!(r.dns.nameservers, ["1.1.1.1"]);
        assert!(r.interfaces.is_empty());
    }

    #[test]
    fn args_and_runtime_config_replace() {
        let j = format!(
            r#"{{{BASE},"args":{{"cni":{{"ips":["10.2.0.5/24"]}}}},"ipam":{{"addresses":[{{"address":"10.0.0.5/24"}}]}}}}"#
        );
        assert_eq!(addrs(&load(&j, "IP=10.1.0.5/24").unwrap()), ["10.2.0.5/24"]);
        let j = format!(
            r#"{{{BASE},"args":{{"cni":{{"ips":["10.2.0.5/24"]}}}},"runtimeConfig":{{"ips":["10.3.0.5/24"]}},"ipam":{{}}}}"#
        );
        assert_eq!(addrs(&load(&j, "").unwrap()), ["10.3.0.5/24"]);
    }

    #[test]
    fn cidr_required() {
        let e = load(&format!(r#"{{{BASE},"ipam":{{"addresses":[{{"address":"10.0.0.5"}}]}}}}"#), "").unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("expected to be in CIDR notation") && e.msg.contains("ipam.addresses[0].address"));
        let e = load(&format!(r#"{{{BASE},"runtimeConfig":{{"ips":["10.0.0.5"]}},"ipam":{{}}}}"#), "").unwrap_err();
        assert!(e.msg.contains("NOT in CIDR notation") && e.msg.contains("runtimeConfig.ips[0]"), "{}", e.msg);
        let e = load(&format!(r#"{{{BASE},"ipam":{{}}}}"#), "IP=10.0.0.1").unwrap_err();
        assert_eq!(e.code, 4);
    }

    #[test]
    fn one_per_family_before_0_3_0() {
        let j = r#"{"cniVersion":"0.2.0","name":"n","type":"t","ipam":{"addresses":[{"address":"10.0.0.5/24"},{"address":"10.1.0.5/24"}]}}"#;
        assert!(load(j, "").unwrap_err().msg.contains("does not support more than 1 address per family"));
        let j = r#"{"cniVersion":"0.2.0","name":"n","type":"t","ipam":{"addresses":[{"address":"10.0.0.5/24"},{"address":"fd00::5/64"}]}}"#;
        assert!(load(j, "").is_ok());
    }

    #[test]
    fn check_compares_addresses_and_gateways() {
        let c = load(
            &format!(r#"{{{BASE},"ipam":{{"addresses":[{{"address":"10.0.0.5/24","gateway":"10.0.0.1"}}]}}}}"#),
            "",
        )
        .unwrap();
        c.check(&c.result()).unwrap();
        let mut other = c.result();
        other.ips[0].gateway = Some("10.0.0.254".parse().unwrap());
        assert!(c.check(&other).unwrap_err().msg.contains("10.0.0.5/24"));
        other.ips.clear();
        assert!(c.check(&other).unwrap_err().msg.contains("missing"));
    }
}
