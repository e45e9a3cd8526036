//! `tern agent`: the node agent in the foreground until SIGTERM/SIGINT.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use nix::sys::signal::{SigSet, Signal};
use tern_agent::{Agent, AgentConfig, PoolConfig};
use tern_ipam::block::Pool;
use tern_store::{Datastore, DatastoreSpec, EtcdOptions, EtcdStore};

#[derive(clap::Args)]
pub struct Args {
    /// This node's name (the key under /tern/v1/nodes/).
    #[arg(long)]
    node: String,
    /// Where the cluster's data lives: local:DIR (single node) or etcd:URL[,URL].
    #[arg(long, default_value = "local:/var/lib/tern/store")]
    datastore: String,
    /// The unix socket tern-ipam's "cluster" allocator talks to.
    #[arg(long, default_value = tern_agent::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// A cluster CIDR to allocate pod addresses from (repeat for IPv4 and IPv6).
    #[arg(long = "pool", required = true)]
    pools: Vec<String>,
    /// Block prefix length of the pools, in --pool order (default /26 for IPv4, /122 for IPv6).
    #[arg(long = "block-prefix")]
    block_prefixes: Vec<u8>,
    /// At most this many blocks per pool for this node.
    #[arg(long)]
    max_blocks: Option<usize>,
    /// TTL of the node's lease, in seconds: a node whose agent stops renewing disappears after it.
    #[arg(long, default_value_t = 10)]
    lease_ttl: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.block_prefixes.len() > args.pools.len() {
        bail!("{} --block-prefix values for {} --pool values", args.block_prefixes.len(), args.pools.len());
    }
    let mut pools = Vec::new();
    for (i, cidr) in args.pools.iter().enumerate() {
        let pool = Pool::parse(cidr, args.block_prefixes.get(i).copied()).map_err(anyhow::Error::msg)?;
        pools.push(PoolConfig { pool, max_blocks: args.max_blocks });
    }
    let spec: DatastoreSpec = args.datastore.parse()?;
    // Block the signals before any thread exists, so every thread inherits
    // the mask and only sigwait below sees them.
    let mut sigs = SigSet::empty();
    sigs.add(Signal::SIGTERM);
    sigs.add(Signal::SIGINT);
    sigs.thread_block().context("blocking SIGTERM/SIGINT")?;
    // Store calls are bounded well below tern-ipam's 2 s wait for the agent,
    // so a down etcd reaches the plugin as the agent's "datastore ...
    // unavailable" (code 11 naming etcd), not as a silent agent.
    let store: Arc<dyn Datastore> = match &spec {
        DatastoreSpec::Etcd(eps) => Arc::new(EtcdStore::connect(
            eps,
            EtcdOptions {
                timeout: Duration::from_millis(1500),
                connect_timeout: Duration::from_secs(1),
                ..EtcdOptions::default()
            },
        )?),
        DatastoreSpec::Local(_) => spec.open()?,
    };
    let mut config = AgentConfig::new(args.node.clone(), store, args.socket.clone(), pools);
    config.lease_ttl = Duration::from_secs(args.lease_ttl.max(1));
    let agent = Agent::start(config).with_context(|| format!("starting the agent of node {}", args.node))?;
    eprintln!(
        "tern agent: node {} ready on {} (datastore {spec}, lease {})",
        args.node,
        args.socket.display(),
        agent.lease().map(|l| l.to_string()).unwrap_or_default()
    );
    let sig = sigs.wait().context("waiting for SIGTERM/SIGINT")?;
    eprintln!("tern agent: {sig}: deregistering node {}", args.node);
    agent.shutdown().context("revoking the node lease")?;
    Ok(())
}
