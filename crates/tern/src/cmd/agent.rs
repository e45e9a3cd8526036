//! `tern agent`: the node agent in the foreground until SIGTERM/SIGINT.
//!
//! Settings come from flags and from an optional JSON file (`--config`)
//! with the same keys in camelCase (see docs/agent.example.json); a flag
//! given on the command line wins over the file. The file is strict: an
//! unknown key or a value of the wrong type is an error naming the key
//! (`gc.intervalSeconds: invalid type: ...`), never silently ignored.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use nix::sys::signal::{SigSet, Signal};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};
use tern_agent::{Agent, AgentConfig, PoolConfig};
use tern_ipam::block::Pool;
use tern_store::{Datastore, DatastoreSpec, EtcdOptions, EtcdStore};

const DEFAULT_DATASTORE: &str = "local:/var/lib/tern/store";
const DEFAULT_LEASE_TTL_SECONDS: u64 = 10;

#[derive(clap::Args)]
pub struct Args {
    /// A JSON file with the same settings as the flags (camelCase keys, see
    /// docs/agent.example.json); flags given here override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// This node's name (the key under /tern/v1/nodes/).
    #[arg(long)]
    node: Option<String>,
    /// Where the cluster's data lives: local:DIR (single node) or etcd:URL[,URL] [default: local:/var/lib/tern/store].
    #[arg(long)]
    datastore: Option<String>,
    /// The unix socket tern-ipam's "cluster" allocator talks to [default: /run/tern/agent.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// A cluster CIDR to allocate pod addresses from (repeat for IPv4 and IPv6); replaces the file's pools.
    #[arg(long = "pool")]
    pools: Vec<String>,
    /// Block prefix length of the pools, in --pool order (default /26 for IPv4, /122 for IPv6).
    #[arg(long = "block-prefix")]
    block_prefixes: Vec<u8>,
    /// At most this many blocks per pool for this node.
    #[arg(long)]
    max_blocks: Option<usize>,
    /// TTL of the node's lease, in seconds: a node whose agent stops renewing disappears after it [default: 10].
    #[arg(long)]
    lease_ttl: Option<u64>,
    /// Where the agent keeps what must survive a restart while the datastore is away (the outage journal)
    /// [default: /var/lib/tern/agent].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Free addresses to keep claimed on the node beyond those in use (AWS VPC CNI's WARM_IP_TARGET).
    #[arg(long, value_name = "N")]
    warm_ip_target: Option<u32>,
    /// Addresses (used + free) the node keeps at least (AWS VPC CNI's MINIMUM_IP_TARGET).
    #[arg(long, value_name = "N")]
    minimum_ip_target: Option<u32>,
    /// Never borrow addresses from other nodes' blocks when the pool has no free block.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    strict_affinity: Option<bool>,
    /// Seconds between garbage-collection rounds (empty blocks, dead nodes' blocks, leaked addresses); 0: never.
    #[arg(long, value_name = "SECONDS")]
    gc_interval: Option<u64>,
    /// Seconds a block stays empty (or its node dead) before it is released.
    #[arg(long, value_name = "SECONDS")]
    block_grace: Option<u64>,
    /// Seconds an address without a live attachment is left before it is freed.
    #[arg(long, value_name = "SECONDS")]
    leak_grace: Option<u64>,
    /// Cross-node routing: vxlan, direct (host-gw) or auto (direct on the node's subnet, VXLAN across);
    /// unset: none (single node).
    #[arg(long, value_name = "MODE")]
    routing: Option<tern_routing::Mode>,
    /// The interface holding the node's underlay address (needed with --routing).
    #[arg(long, value_name = "IF")]
    underlay_interface: Option<String>,
    /// VXLAN network identifier [default: 1].
    #[arg(long)]
    vni: Option<u32>,
    /// VXLAN UDP port [default: 8472].
    #[arg(long)]
    vxlan_port: Option<u16>,
    /// MTU of the VXLAN device [default: the underlay's minus 50 (70 over IPv6)].
    #[arg(long)]
    vxlan_mtu: Option<u32>,
    /// How pod packets cross the node to other nodes: kernel (IP forwarding) or ebpf (tern's eBPF host
    /// routing, for pods attached with "dataplane": "ebpf") [default: kernel].
    #[arg(long, value_name = "DATAPLANE")]
    dataplane: Option<tern_agent::routing::Dataplane>,
    /// Leave the cluster for good and exit: withdraw the node's routing record (every peer drops its
    /// routes to it) and its node record. Needs only --node and --datastore.
    #[arg(long)]
    leave: bool,
}

/// The `--config` file. Every key optional; see [`parse_config`] for how
/// errors name the key.
#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    pub node: Option<String>,
    pub datastore: Option<String>,
    pub socket: Option<PathBuf>,
    pub pools: Option<Vec<FilePool>>,
    pub max_blocks: Option<usize>,
    pub lease_ttl_seconds: Option<u64>,
    pub state_dir: Option<PathBuf>,
    #[serde(alias = "warmIPTarget")]
    pub warm_ip_target: Option<u32>,
    #[serde(alias = "minimumIPTarget")]
    pub minimum_ip_target: Option<u32>,
    pub strict_affinity: Option<bool>,
    pub gc: Option<FileGc>,
    pub routing: Option<FileRouting>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FilePool {
    /// Required; optional here only so that a missing one is reported by name.
    pub cidr: Option<String>,
    pub block_prefix: Option<u8>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileGc {
    pub interval_seconds: Option<u64>,
    pub block_grace_seconds: Option<u64>,
    pub leak_grace_seconds: Option<u64>,
}

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileRouting {
    pub mode: Option<tern_routing::Mode>,
    pub underlay_interface: Option<String>,
    pub vni: Option<u32>,
    pub port: Option<u16>,
    pub mtu: Option<u32>,
    pub resync_seconds: Option<u64>,
    pub dataplane: Option<tern_agent::routing::Dataplane>,
}

/// Decodes `obj` into `T` one key at a time, so that a bad value is
/// reported with its key path (serde_json's own messages only say where in
/// the text). `T` has only optional fields, so `{key: value}` alone decodes.
fn decode_keys<T: DeserializeOwned + Default>(path: &str, value: &Value) -> anyhow::Result<T> {
    let Value::Object(obj) = value else {
        let what = if path.is_empty() { "the file" } else { path };
        bail!("{what}: expected a JSON object, got {value}");
    };
    for (k, v) in obj {
        let one: Map<String, Value> = [(k.clone(), v.clone())].into_iter().collect();
        let key = if path.is_empty() { k.clone() } else { format!("{path}.{k}") };
        if let Err(e) = serde_json::from_value::<T>(Value::Object(one)) {
            let msg = e.to_string();
            if msg.starts_with("unknown field") {
                bail!("unknown key {key:?}: {msg}");
            }
            bail!("{key}: {msg}");
        }
    }
    serde_json::from_value(value.clone()).map_err(|e| anyhow!("{}: {e}", if path.is_empty() { "config" } else { path }))
}

/// Parses the text of a `--config` file; errors name the offending key.
pub fn parse_config(text: &str) -> anyhow::Result<FileConfig> {
    let value: Value = serde_json::from_str(text).context("not valid JSON")?;
    // Nested objects first, so their errors carry the full path.
    if let Value::Object(obj) = &value {
        if let Some(pools) = obj.get("pools") {
            let Value::Array(items) = pools else { bail!("pools: expected a list of {{\"cidr\", \"blockPrefix\"}}") };
            for (i, item) in items.iter().enumerate() {
                let p: FilePool = decode_keys(&format!("pools[{i}]"), item)?;
                if p.cidr.is_none() {
                    bail!("pools[{i}].cidr: missing");
                }
            }
        }
        if let Some(gc) = obj.get("gc") {
            decode_keys::<FileGc>("gc", gc)?;
        }
        if let Some(r) = obj.get("routing") {
            decode_keys::<FileRouting>("routing", r)?;
        }
    }
    decode_keys("", &value)
}

/// Everything the agent runs with, flags and file merged.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub node: String,
    pub datastore: String,
    pub socket: PathBuf,
    /// (cidr, block prefix)
    pub pools: Vec<(String, Option<u8>)>,
    pub max_blocks: Option<usize>,
    pub lease_ttl: Duration,
    pub state_dir: Option<PathBuf>,
    pub warm_ip_target: Option<u32>,
    pub minimum_ip_target: Option<u32>,
    pub strict_affinity: Option<bool>,
    pub gc_interval: Option<Duration>,
    pub block_grace: Option<Duration>,
    pub leak_grace: Option<Duration>,
    pub routing: Option<tern_agent::routing::RoutingConfig>,
}

impl Settings {
    /// Flags over file over defaults.
    fn merge(args: Args, file: FileConfig) -> anyhow::Result<Settings> {
        let node =
            args.node.or(file.node).ok_or_else(|| anyhow!("no node name: give --node or \"node\" in --config"))?;
        let pools: Vec<(String, Option<u8>)> = if !args.pools.is_empty() {
            if args.block_prefixes.len() > args.pools.len() {
                bail!("{} --block-prefix values for {} --pool values", args.block_prefixes.len(), args.pools.len());
            }
            args.pools.iter().enumerate().map(|(i, c)| (c.clone(), args.block_prefixes.get(i).copied())).collect()
        } else {
            if !args.block_prefixes.is_empty() {
                bail!("--block-prefix needs --pool (the file's pools carry their own blockPrefix)");
            }
            file.pools.unwrap_or_default().into_iter().map(|p| (p.cidr.unwrap_or_default(), p.block_prefix)).collect()
        };
        if pools.is_empty() {
            bail!("no pool: give --pool CIDR or \"pools\": [{{\"cidr\": ...}}] in --config");
        }
        let lease = args.lease_ttl.or(file.lease_ttl_seconds).unwrap_or(DEFAULT_LEASE_TTL_SECONDS);
        if lease == 0 {
            bail!("the lease TTL (--lease-ttl / leaseTtlSeconds) must be at least 1 second");
        }
        let gc = file.gc.unwrap_or_default();
        let fr = file.routing.unwrap_or_default();
        let routing = match args.routing.or(fr.mode) {
            None if args.dataplane.or(fr.dataplane).is_some() => {
                bail!("the dataplane (--dataplane / routing.dataplane) is for cross-node routing: give --routing too")
            }
            None => None,
            Some(mode) => {
                let underlay = args.underlay_interface.or(fr.underlay_interface).ok_or_else(|| {
                    anyhow!("routing {mode} needs the underlay interface: --underlay-interface or routing.underlayInterface")
                })?;
                let mut r = tern_agent::routing::RoutingConfig::new(mode, underlay);
                r.vni = args.vni.or(fr.vni).unwrap_or(r.vni);
                r.port = args.vxlan_port.or(fr.port).unwrap_or(r.port);
                r.mtu = args.vxlan_mtu.or(fr.mtu);
                r.dataplane = args.dataplane.or(fr.dataplane).unwrap_or_default();
                if let Some(secs) = fr.resync_seconds {
                    r.resync = Duration::from_secs(secs.max(1));
                }
                Some(r)
            }
        };
        let secs = |flag: Option<u64>, file: Option<u64>| flag.or(file).map(Duration::from_secs);
        let s = Settings {
            node,
            datastore: args.datastore.or(file.datastore).unwrap_or_else(|| DEFAULT_DATASTORE.into()),
            socket: args.socket.or(file.socket).unwrap_or_else(|| tern_agent::DEFAULT_SOCKET.into()),
            pools,
            max_blocks: args.max_blocks.or(file.max_blocks),
            lease_ttl: Duration::from_secs(lease),
            state_dir: args.state_dir.or(file.state_dir),
            warm_ip_target: args.warm_ip_target.or(file.warm_ip_target),
            minimum_ip_target: args.minimum_ip_target.or(file.minimum_ip_target),
            strict_affinity: args.strict_affinity.or(file.strict_affinity),
            gc_interval: secs(args.gc_interval, gc.interval_seconds),
            block_grace: secs(args.block_grace, gc.block_grace_seconds),
            leak_grace: secs(args.leak_grace, gc.leak_grace_seconds),
            routing,
        };
        Ok(s)
    }

    fn from_args(mut args: Args) -> anyhow::Result<Settings> {
        let file = match args.config.take() {
            Some(path) => read_config(&path)?,
            None => FileConfig::default(),
        };
        Settings::merge(args, file)
    }
}

fn read_config(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the config file {}", path.display()))?;
    parse_config(&text).with_context(|| format!("config file {}", path.display()))
}

/// Opens the store for a long-running process. Store calls are bounded
/// well below tern-ipam's 2 s wait for the agent, so a down etcd reaches the
/// plugin as the agent's "datastore ... unavailable" (code 11 naming etcd),
/// not as a silent agent.
pub(crate) fn open_store(spec: &DatastoreSpec) -> anyhow::Result<Arc<dyn Datastore>> {
    Ok(match spec {
        DatastoreSpec::Etcd(eps) => Arc::new(EtcdStore::connect(
            eps,
            EtcdOptions {
                timeout: Duration::from_millis(1500),
                connect_timeout: Duration::from_secs(1),
                ..EtcdOptions::default()
            },
        )?),
        DatastoreSpec::Local(_) => spec.open()?,
    })
}

/// `--leave`: the node leaves the cluster for good.
fn leave(mut args: Args) -> anyhow::Result<()> {
    let file = match args.config.take() {
        Some(path) => read_config(&path)?,
        None => FileConfig::default(),
    };
    let node = args.node.or(file.node).ok_or_else(|| anyhow!("no node name: give --node or \"node\" in --config"))?;
    let spec: DatastoreSpec = args.datastore.or(file.datastore).unwrap_or_else(|| DEFAULT_DATASTORE.into()).parse()?;
    let store = open_store(&spec)?;
    let withdrawn = tern_agent::routing::withdraw(&*store, &node).context("withdrawing the routing record")?;
    let deregistered = store.delete(&tern_store::keys::node(&node)?).context("deleting the node record")?;
    eprintln!(
        "tern agent: node {node} left the cluster (routing record {}, node record {})",
        if withdrawn { "withdrawn" } else { "absent" },
        if deregistered { "deleted" } else { "absent" }
    );
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.leave {
        return leave(args);
    }
    let s = Settings::from_args(args)?;
    let mut pools = Vec::new();
    for (cidr, prefix) in &s.pools {
        let pool = Pool::parse(cidr, *prefix).map_err(|e| anyhow!("pool {cidr}: {e}"))?;
        pools.push(PoolConfig { pool, max_blocks: s.max_blocks });
    }
    let spec: DatastoreSpec = s.datastore.parse()?;
    // Block the signals before any thread exists, so every thread inherits
    // the mask and only sigwait below sees them.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGTERM);
    sigs.add(Signal::SIGINT);
    sigs.thread_block().context("blocking SIGTERM/SIGINT")?;
    let store = open_store(&spec)?;
    let mut config = AgentConfig::new(s.node.clone(), store, s.socket.clone(), pools);
    config.lease_ttl = s.lease_ttl;
    apply_extra_settings(&mut config, &s);
    let agent = Agent::start(config).with_context(|| format!("starting the agent of node {}", s.node))?;
    eprintln!(
        "tern agent: node {} ready on {} (datastore {spec}, lease {})",
        s.node,
        s.socket.display(),
        agent.lease().map(|l| l.to_string()).unwrap_or_default()
    );
    let sig = sigs.wait().context("waiting for SIGTERM/SIGINT")?;
    eprintln!("tern agent: {sig}: deregistering node {}", s.node);
    agent.shutdown().context("revoking the node lease")?;
    Ok(())
}

/// The warm pool, state directory, affinity and GC settings: given ones
/// replace the agent's defaults.
fn apply_extra_settings(config: &mut AgentConfig, s: &Settings) {
    if let Some(dir) = &s.state_dir {
        config.state_dir = dir.clone();
    }
    if let Some(n) = s.warm_ip_target {
        config.warm.warm_ip_target = n;
    }
    if let Some(n) = s.minimum_ip_target {
        config.warm.minimum_ip_target = n;
    }
    if let Some(b) = s.strict_affinity {
        config.strict_affinity = b;
    }
    if let Some(d) = s.gc_interval {
        config.gc.interval = d;
    }
    if let Some(d) = s.block_grace {
        config.gc.block_grace = d;
    }
    if let Some(d) = s.leak_grace {
        config.gc.leak_grace = d;
    }
    config.routing = s.routing.clone();
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn args(argv: &[&str]) -> Args {
        Cli::parse_from(std::iter::once("agent").chain(argv.iter().copied())).args
    }

    #[test]
    fn file_keys_and_aliases() {
        let f = parse_config(
            r#"{"node":"n1","datastore":"etcd:http://127.0.0.1:2379","socket":"/run/x.sock",
                "pools":[{"cidr":"10.244.0.0/16","blockPrefix":26},{"cidr":"fd00::/48"}],
                "maxBlocks":4,"leaseTtlSeconds":5,"stateDir":"/var/lib/tern/agent",
                "warmIPTarget":3,"minimumIpTarget":8,"strictAffinity":true,
                "gc":{"intervalSeconds":30,"blockGraceSeconds":300,"leakGraceSeconds":60}}"#,
        )
        .unwrap();
        assert_eq!(f.node.as_deref(), Some("n1"));
        assert_eq!(f.warm_ip_target, Some(3));
        assert_eq!(f.minimum_ip_target, Some(8));
        assert_eq!(f.pools.as_ref().unwrap()[0].block_prefix, Some(26));
        assert_eq!(f.gc.as_ref().unwrap().leak_grace_seconds, Some(60));
        let example = include_str!("../../../../docs/agent.example.json");
        parse_config(example).expect("docs/agent.example.json parses");
    }

    #[test]
    fn errors_name_the_key() {
        let e = |t: &str| format!("{:#}", parse_config(t).unwrap_err());
        assert!(e(r#"{"nodee":"x"}"#).contains("\"nodee\""), "{}", e(r#"{"nodee":"x"}"#));
        assert!(e(r#"{"maxBlocks":"many"}"#).starts_with("maxBlocks:"), "{}", e(r#"{"maxBlocks":"many"}"#));
        assert!(e(r#"{"gc":{"intervalSeconds":-1}}"#).starts_with("gc.intervalSeconds:"));
        assert!(e(r#"{"gc":{"interval":1}}"#).contains("gc.interval"));
        assert!(e(r#"{"pools":[{"cidr":"10.0.0.0/8","blockPrefix":"x"}]}"#).starts_with("pools[0].blockPrefix:"));
        assert!(e(r#"{"pools":[{"blockPrefix":26}]}"#).starts_with("pools[0].cidr: missing"));
        assert!(e(r#"{"pools":[{"cidr":"10.0.0.0/8","size":1}]}"#).contains("pools[0].size"));
        assert!(e(r#"{"pools":"10.0.0.0/8"}"#).starts_with("pools:"));
        assert!(e(r#"[1]"#).contains("expected a JSON object"));
        assert!(e(r#"{"strictAffinity":"yes"}"#).starts_with("strictAffinity:"));
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse_config(
            r#"{"node":"file-node","pools":[{"cidr":"10.1.0.0/16","blockPrefix":28}],"leaseTtlSeconds":7,
                "warmIpTarget":2,"gc":{"intervalSeconds":9}}"#,
        )
        .unwrap();
        let s = Settings::merge(args(&["--node", "flag-node", "--warm-ip-target", "5"]), file.clone()).unwrap();
        assert_eq!(s.node, "flag-node");
        assert_eq!(s.pools, vec![("10.1.0.0/16".to_string(), Some(28))]);
        assert_eq!(s.lease_ttl, Duration::from_secs(7));
        assert_eq!(s.warm_ip_target, Some(5));
        assert_eq!(s.gc_interval, Some(Duration::from_secs(9)));
        assert_eq!(s.datastore, DEFAULT_DATASTORE);
        let s =
            Settings::merge(args(&["--pool", "10.2.0.0/16", "--strict-affinity", "--gc-interval", "3"]), file).unwrap();
        assert_eq!(s.pools, vec![("10.2.0.0/16".to_string(), None)]);
        assert_eq!(s.strict_affinity, Some(true));
        assert_eq!(s.gc_interval, Some(Duration::from_secs(3)));
        assert!(Settings::merge(args(&["--node", "n"]), FileConfig::default()).is_err(), "no pool");
        assert!(Settings::merge(args(&["--pool", "10.0.0.0/8"]), FileConfig::default()).is_err(), "no node");
    }

    #[test]
    fn dataplane_from_flag_or_file_and_only_with_routing() {
        use tern_agent::routing::Dataplane;
        let base = ["--node", "n", "--pool", "10.0.0.0/8"];
        let with = |extra: &[&str], file: &str| {
            let mut a = base.to_vec();
            a.extend_from_slice(extra);
            Settings::merge(args(&a), parse_config(file).unwrap())
        };
        let routing = |s: Settings| s.routing.expect("routing").dataplane;
        assert_eq!(
            routing(with(&["--routing", "direct", "--underlay-interface", "eth0"], "{}").unwrap()),
            Dataplane::Kernel
        );
        let file = r#"{"routing":{"mode":"vxlan","underlayInterface":"eth0","dataplane":"ebpf"}}"#;
        assert_eq!(routing(with(&[], file).unwrap()), Dataplane::Ebpf);
        assert_eq!(routing(with(&["--dataplane", "kernel"], file).unwrap()), Dataplane::Kernel);
        let e = with(&["--dataplane", "ebpf"], "{}").unwrap_err().to_string();
        assert!(e.contains("--routing"), "{e}");
        let e = format!("{:#}", parse_config(r#"{"routing":{"dataplane":"xdp"}}"#).unwrap_err());
        assert!(e.starts_with("routing.dataplane:"), "{e}");
    }
}
