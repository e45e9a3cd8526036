//! tern-ipam: host-local compatible and static address management.
//!
//! The IPAM plugin receives the full network config; its own keys live under
//! `ipam`, where `"allocator"` picks `"host-local"` (the default),
//! `"static"` or `"cluster"` (addresses from the node agent, see [`cluster`]). The allocation logic is the pure `tern-ipam` crate; this
//! module adds the disk store, the resolv.conf read and the verbs.
pub mod cluster;
pub mod disk;

use std::net::IpAddr;

use serde_json::Value;
use tern_cni::{CniError, CniResult};
use tern_ipam::{HostLocalConfig, StaticConfig, Store};

use crate::skel::{Plugin, Request};
use disk::DiskStore;

/// CNI_ARGS keys tern-ipam understands (K8S_* and IgnoreUnknown are always
/// accepted). host-local reads `IP`; static reads `IP` and `GATEWAY`.
pub const KNOWN_ARGS: &[&str] = &["IP", "GATEWAY", "MAC"];

pub struct IpamPlugin;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Allocator {
    HostLocal,
    Static,
    Cluster,
}

fn allocator(req: &Request) -> Result<Allocator, CniError> {
    let ipam = req.conf.ipam.as_ref().ok_or_else(|| CniError::invalid_config("IPAM config missing 'ipam' key"))?;
    match ipam.get("allocator") {
        None | Some(Value::Null) => Ok(Allocator::HostLocal),
        Some(Value::String(s)) if s == "host-local" => Ok(Allocator::HostLocal),
        Some(Value::String(s)) if s == "static" => Ok(Allocator::Static),
        Some(Value::String(s)) if s == "cluster" => Ok(Allocator::Cluster),
        Some(other) => Err(CniError::invalid_config(format!(
            "unknown allocator {other}, expected \"host-local\", \"static\" or \"cluster\" (ipam.allocator)"
        ))),
    }
}

fn read_resolv_conf(path: &str) -> Result<tern_cni::Dns, CniError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CniError::internal(format!("failed to read resolvConf {path}: {e} (ipam.resolvConf)")))?;
    Ok(tern_ipam::parse_resolv_conf(&text))
}

/// DEL for callers that want to know what was freed (the main plugin calls
/// this in-process). Idempotent: no state means nothing freed, not an error.
/// The ranges are not validated, so a config edited into something invalid
/// still releases.
pub fn release(req: &Request) -> Result<Vec<IpAddr>, CniError> {
    match allocator(req)? {
        Allocator::Static => Ok(Vec::new()),
        Allocator::Cluster => cluster::release(req),
        Allocator::HostLocal => {
            let data_dir = HostLocalConfig::data_dir_of(&req.conf)?;
            match DiskStore::open_existing(&data_dir, &req.conf.name)? {
                None => Ok(Vec::new()),
                Some(mut store) => tern_ipam::release(&mut store, req.env.container_id(), req.env.ifname()),
            }
        }
    }
}

impl Plugin for IpamPlugin {
    fn name(&self) -> &'static str {
        "tern-ipam"
    }

    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        req.env.args.check_known(KNOWN_ARGS)?;
        match allocator(req)? {
            Allocator::Static => Ok(StaticConfig::from_conf(&req.conf, &req.env.args)?.result()),
            Allocator::Cluster => cluster::add(req),
            Allocator::HostLocal => {
                let cfg = HostLocalConfig::from_conf(&req.conf, &req.env.args)?;
                // Read before allocating, so a bad path reserves nothing.
                let dns = match &cfg.resolv_conf {
                    Some(path) => read_resolv_conf(path)?,
                    None => Default::default(),
                };
                let mut store = DiskStore::open(cfg.data_dir(), &cfg.name)?;
                let ips = tern_ipam::allocate(&mut store, &cfg, req.env.container_id(), req.env.ifname())?;
                Ok(CniResult { interfaces: Vec::new(), ips, routes: cfg.routes.clone(), dns })
            }
        }
    }

    /// CNI_ARGS are not checked: DEL must not fail where ADD succeeded.
    fn del(&self, req: &Request) -> Result<(), CniError> {
        release(req).map(|_| ())
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        req.env.args.check_known(KNOWN_ARGS)?;
        let prev = req
            .conf
            .prev_result
            .as_ref()
            .ok_or_else(|| CniError::invalid_config("Required prevResult missing (prevResult)"))?;
        let (id, ifname) = (req.env.container_id(), req.env.ifname());
        match allocator(req)? {
            Allocator::Static => StaticConfig::from_conf(&req.conf, &req.env.args)?.check(prev),
            Allocator::Cluster => cluster::check(req, prev),
            Allocator::HostLocal => {
                let cfg = HostLocalConfig::from_conf(&req.conf, &req.env.args)?;
                let reserved = match DiskStore::open_existing(cfg.data_dir(), &cfg.name)? {
                    Some(mut store) => tern_ipam::find(&mut store, id, ifname)?,
                    None => Vec::new(),
                };
                tern_ipam::check(&cfg, &reserved, prev, id, ifname)
            }
        }
    }

    /// host-local: code 50 when some range set is full. Static: always ready.
    fn status(&self, req: &Request) -> Result<(), CniError> {
        match allocator(req)? {
            Allocator::Static => Ok(()),
            Allocator::Cluster => cluster::status(req),
            Allocator::HostLocal => {
                let cfg = HostLocalConfig::from_conf(&req.conf, &req.env.args)?;
                let reservations = match DiskStore::open_existing(cfg.data_dir(), &cfg.name)? {
                    Some(mut store) => tern_ipam::Locked::new(&mut store)?.list()?,
                    None => Vec::new(),
                };
                tern_ipam::status(&cfg, &reservations)
            }
        }
    }

    /// Release every reservation whose attachment is not in the valid list
    /// (an empty list releases everything). Without any list there is
    /// nothing to go by, so nothing is released.
    fn gc(&self, req: &Request) -> Result<(), CniError> {
        // cluster: the agent's leak collector owns garbage collection.
        if matches!(allocator(req)?, Allocator::Static | Allocator::Cluster) {
            return Ok(());
        }
        let Some(valid) = &req.conf.valid_attachments else {
            return Ok(());
        };
        let data_dir = HostLocalConfig::data_dir_of(&req.conf)?;
        if let Some(mut store) = DiskStore::open_existing(&data_dir, &req.conf.name)? {
            tern_ipam::gc(&mut store, valid)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::disk::tests::TempDir;
    use super::*;
    use std::collections::HashMap;
    use tern_cni::{Env, NetConf};

    fn req(cmd: &str, id: &str, args: &str, conf: &str) -> Request {
        let vars: HashMap<&str, &str> = [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", args),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
        .into_iter()
        .collect();
        let env = Env::from_lookup(|k| vars.get(k).map(|v| v.to_string())).unwrap();
        let conf_parsed = NetConf::parse(conf.as_bytes(), env.command, IpamPlugin.supported_versions()).unwrap();
        Request { env, conf: conf_parsed, stdin: conf.as_bytes().to_vec() }
    }

    fn host_local(dir: &TempDir) -> String {
        format!(
            r#"{{"cniVersion":"1.1.0","name":"net1","type":"tern","ipam":{{"type":"tern-ipam",
                "dataDir":"{}","ranges":[[{{"subnet":"10.9.0.0/29"}}],[{{"subnet":"fd00:9::/126"}}]],
                "routes":[{{"dst":"0.0.0.0/0"}}]}}}}"#,
            dir.0.display()
        )
    }

    #[test]
    fn add_check_del_gc_status_host_local() {
        let t = TempDir::new("plugin");
        let conf = host_local(&t);
        let r = IpamPlugin.add(&req("ADD", "ctr1", "IgnoreUnknown=1;K8S_POD_NAME=p", &conf)).unwrap();
        assert!(r.interfaces.is_empty());
        assert_eq!(r.ips.len(), 2);
        assert!(r.ips.iter().all(|ip| ip.interface.is_none()));
        assert_eq!(r.routes.len(), 1);
        let json = r.to_value(tern_cni::Version::V1_0_0).unwrap();
        assert_eq!(json["dns"], serde_json::json!({}));

        // CHECK with the result as prevResult passes; with another address fails.
        let mut with_prev: serde_json::Value = serde_json::from_str(&conf).unwrap();
        with_prev["prevResult"] = json.clone();
        IpamPlugin.check(&req("CHECK", "ctr1", "", &with_prev.to_string())).unwrap();
        with_prev["prevResult"]["ips"][0]["address"] = "10.9.0.3/29".into();
        let e = IpamPlugin.check(&req("CHECK", "ctr1", "", &with_prev.to_string())).unwrap_err();
        assert!(e.msg.contains("10.9.0."), "{}", e.msg);

        IpamPlugin.add(&req("ADD", "ctr2", "", &conf)).unwrap();
        let e = IpamPlugin.status(&req("STATUS", "", "", &conf)).unwrap_err();
        assert_eq!(e.code, 50);
        assert_eq!(e.msg, "no IP addresses available in range set: fd00:9::1-fd00:9::3");

        // GC keeping only ctr2 frees ctr1's pair.
        let mut gc_conf: serde_json::Value = serde_json::from_str(&conf).unwrap();
        gc_conf["cni.dev/valid-attachments"] = serde_json::json!([{"containerID":"ctr2","ifname":"eth0"}]);
        IpamPlugin.gc(&req("GC", "", "", &gc_conf.to_string())).unwrap();
        IpamPlugin.status(&req("STATUS", "", "", &conf)).unwrap();
        assert!(release(&req("DEL", "ctr1", "", &conf)).unwrap().is_empty());

        let freed = release(&req("DEL", "ctr2", "", &conf)).unwrap();
        assert_eq!(freed.len(), 2);
        IpamPlugin.del(&req("DEL", "ctr2", "", &conf)).unwrap();
    }

    #[test]
    fn del_without_state_succeeds() {
        let t = TempDir::new("nostate");
        let conf = host_local(&t);
        IpamPlugin.del(&req("DEL", "ctr1", "", &conf)).unwrap();
        assert!(!t.0.join("net1").exists());
    }

    #[test]
    fn unknown_args_rejected_unless_ignored() {
        let t = TempDir::new("args");
        let conf = host_local(&t);
        let e = IpamPlugin.add(&req("ADD", "c", "FOO=1", &conf)).unwrap_err();
        assert_eq!(e.code, 4);
        IpamPlugin.add(&req("ADD", "c", "FOO=1;IgnoreUnknown=1;IP=10.9.0.6", &conf)).unwrap();
        let e = IpamPlugin.add(&req("ADD", "d", "IP=10.9.0.6", &conf)).unwrap_err();
        assert!(e.msg.contains("10.9.0.6"), "{}", e.msg);
    }

    #[test]
    fn resolv_conf_feeds_dns() {
        let t = TempDir::new("resolv");
        let path = t.0.join("resolv.conf");
        std::fs::write(&path, "nameserver 10.0.0.10\nsearch a.example\n").unwrap();
        let conf = host_local(&t)
            .replace(r#""type":"tern-ipam","#, &format!(r#""type":"tern-ipam","resolvConf":"{}","#, path.display()));
        let r = IpamPlugin.add(&req("ADD", "c", "", &conf)).unwrap();
        assert_eq!(r.dns.nameservers, ["10.0.0.10"]);
        assert_eq!(r.dns.search, ["a.example"]);
        let missing = conf.replace("resolv.conf", "nope.conf");
        assert!(IpamPlugin.add(&req("ADD", "d", "", &missing)).is_err());
        // Nothing was reserved for the failed ADD.
        assert!(release(&req("DEL", "d", "", &missing)).unwrap().is_empty());
    }

    #[test]
    fn static_allocator() {
        let conf = r#"{"cniVersion":"1.0.0","name":"s","type":"tern","ipam":{"type":"tern-ipam","allocator":"static",
            "addresses":[{"address":"10.0.0.5/24","gateway":"10.0.0.1"}],"dns":{"nameservers":["1.1.1.1"]}}}"#;
        let r = IpamPlugin.add(&req("ADD", "c", "GATEWAY=10.0.0.254", conf)).unwrap();
        assert_eq!(r.ips[0].address.to_string(), "10.0.0.5/24");
        assert_eq!(r.ips[0].gateway, Some("10.0.0.254".parse().unwrap()));
        assert_eq!(r.dns.nameservers, ["1.1.1.1"]);
        IpamPlugin.del(&req("DEL", "c", "", conf)).unwrap();
        let e = IpamPlugin.add(&req("ADD", "c", "", &conf.replace("static", "magic"))).unwrap_err();
        assert_eq!(e.code, 7);
    }
}
