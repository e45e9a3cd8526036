//! `tern ipam show` and `tern ipam gc`: cluster IPAM as the datastore holds
//! it, read (and collected) directly, without an agent.
//!
//! `show` lists the pools, the live nodes (`/tern/v1/nodes/`, keys that
//! disappear with their node's lease), every block with its owner and use,
//! and the leak candidates a collection would consider (a dry run of the
//! collector). `gc` runs one collection round cluster-wide, as an agent's
//! collector does (`tern_agent::gc::run_once`), and prints what it freed;
//! `--dry-run` only reports.
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, Context};
use serde_json::{json, Value};
use tern_agent::gc::GcConfig;
use tern_store::ipam::{list_blocks, list_pools};
use tern_store::{keys, Datastore, DatastoreSpec, StoreError};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Blocks per node with their use, live nodes, pools and leak candidates.
    Show(ShowArgs),
    /// Run one garbage-collection round cluster-wide (empty blocks, dead nodes' blocks, leaked addresses).
    Gc(GcArgs),
}

#[derive(clap::Args)]
pub struct StoreArgs {
    /// The cluster's datastore: local:DIR or etcd:URL[,URL].
    #[arg(long, default_value = "local:/var/lib/tern/store")]
    datastore: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ShowArgs {
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(clap::Args)]
pub struct GcArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Report what would be freed, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Seconds a block stays empty (or its node dead) before it is released [default: the agent's].
    #[arg(long, value_name = "SECONDS")]
    block_grace: Option<u64>,
    /// Seconds an address without a live attachment is left before it is freed [default: the agent's].
    #[arg(long, value_name = "SECONDS")]
    leak_grace: Option<u64>,
}

pub fn run(cmd: Command) -> anyhow::Result<()> {
    match cmd {
        Command::Show(a) => show(a),
        Command::Gc(a) => gc(a),
    }
}

fn open(spec: &str) -> anyhow::Result<(DatastoreSpec, std::sync::Arc<dyn Datastore>)> {
    let spec: DatastoreSpec = spec.parse().context("--datastore")?;
    let store = super::agent::open_store(&spec)?;
    Ok((spec, store))
}

/// Store errors say whether the store is down, so the message does too.
fn store_err(spec: &DatastoreSpec, e: StoreError) -> anyhow::Error {
    if e.is_unavailable() {
        anyhow!("the datastore {spec} is unreachable: {e}")
    } else {
        anyhow!("datastore {spec}: {e}")
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn utilisation(used: u64, size: u64) -> f64 {
    if size == 0 {
        0.0
    } else {
        (used as f64 * 1000.0 / size as f64).round() / 10.0
    }
}

/// The cluster's IPAM as JSON (the `--json` output of `show`).
fn snapshot(spec: &DatastoreSpec, store: &dyn Datastore) -> anyhow::Result<Value> {
    let e = |err| store_err(spec, err);
    let pools = list_pools(store).map_err(e)?;
    let node_kvs = store.list(keys::NODES).map_err(e)?;
    let blocks = list_blocks(store).map_err(e)?;
    let mut nodes: BTreeMap<String, Value> = BTreeMap::new();
    for kv in &node_kvs.kvs {
        let Some(name) = keys::name_under(keys::NODES, &kv.key) else { continue };
        // Agent-defined JSON: shown as stored (older or newer agents may differ).
        let record: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
        let started = record["startedAt"].as_u64();
        nodes.insert(
            name.to_string(),
            json!({
                "name": name,
                "alive": true,
                "agentPid": record["agentPid"],
                "startedAt": started,
                "uptimeSeconds": started.map(|s| unix_now().saturating_sub(s)),
                "pools": record["pools"],
            }),
        );
    }
    let mut per_node: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut block_rows = Vec::new();
    for b in &blocks {
        let (used, size) = (b.value.block.used() as u64, b.value.block.size() as u64);
        let owner = &b.value.node;
        let entry = per_node.entry(owner.clone()).or_default();
        entry.0 += 1;
        entry.1 += used;
        entry.2 += size;
        block_rows.push(json!({
            "cidr": b.value.cidr().to_string(),
            "node": owner,
            "nodeAlive": nodes.contains_key(owner),
            "used": used,
            "size": size,
            "utilisation": utilisation(used, size),
            "claimedAt": b.value.claimed_at,
        }));
    }
    let by_node: serde_json::Map<String, Value> = per_node
        .iter()
        .map(|(n, (count, used, size))| {
            (
                n.clone(),
                json!({"alive": nodes.contains_key(n), "blocks": count, "used": used, "size": size,
                       "utilisation": utilisation(*used, *size)}),
            )
        })
        .collect();
    let (leaks, waiting) =
        leak_candidates(store).map_err(|e| e.context(format!("datastore {spec}: dry-run collection")))?;
    Ok(json!({
        "datastore": spec.to_string(),
        "pools": pools.iter().map(|p| json!({"cidr": p.cidr.to_string(), "blockPrefix": p.block_prefix})).collect::<Vec<_>>(),
        "nodes": nodes.into_values().collect::<Vec<_>>(),
        "blocks": block_rows,
        "byNode": by_node,
        "leakCandidates": leaks,
        "idleBlocks": waiting,
    }))
}

fn show(args: ShowArgs) -> anyhow::Result<()> {
    let (spec, store) = open(&args.store.datastore)?;
    let snap = snapshot(&spec, &*store)?;
    if args.store.json {
        println!("{}", serde_json::to_string_pretty(&snap)?);
        return Ok(());
    }
    println!("datastore  {}", snap["datastore"].as_str().unwrap_or("?"));
    let pools: Vec<String> = snap["pools"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| format!("{} (blocks /{})", p["cidr"].as_str().unwrap_or("?"), p["blockPrefix"]))
        .collect();
    println!("pools      {}", if pools.is_empty() { "none recorded".to_string() } else { pools.join(", ") });
    let nodes = snap["nodes"].as_array().cloned().unwrap_or_default();
    println!("nodes      {} alive", nodes.len());
    for n in &nodes {
        let mut line = format!("  {}", n["name"].as_str().unwrap_or("?"));
        if let Some(pid) = n["agentPid"].as_u64() {
            line.push_str(&format!("  agent pid {pid}"));
        }
        if let Some(up) = n["uptimeSeconds"].as_u64() {
            line.push_str(&format!(", up {up}s"));
        }
        println!("{line}");
    }
    let blocks = snap["blocks"].as_array().cloned().unwrap_or_default();
    println!("blocks     {}", blocks.len());
    let mut rows = vec![["node".to_string(), "block".into(), "used".into(), "util".into(), "".into()]];
    for (node, s) in snap["byNode"].as_object().into_iter().flatten() {
        for b in blocks.iter().filter(|b| b["node"].as_str() == Some(node)) {
            rows.push([
                node.clone(),
                b["cidr"].as_str().unwrap_or("?").to_string(),
                format!("{}/{}", b["used"], b["size"]),
                format!("{:.1}%", b["utilisation"].as_f64().unwrap_or(0.0)),
                if s["alive"] == json!(true) { String::new() } else { "node not alive".into() },
            ]);
        }
    }
    if rows.len() > 1 {
        print_rows(&rows);
    }
    match &snap["leakCandidates"] {
        Value::Array(a) if a.is_empty() => println!("leak candidates: none"),
        Value::Array(a) => {
            println!("leak candidates: {}", a.len());
            for c in a {
                println!("  {c}");
            }
        }
        other => println!("leak candidates: {other}"),
    }
    if let Some(idle) = snap["idleBlocks"].as_array().filter(|a| !a.is_empty()) {
        println!("idle blocks (released after the grace period): {}", idle.len());
        for b in idle {
            println!("  {b}");
        }
    }
    Ok(())
}

fn print_rows(rows: &[[String; 5]]) {
    let w: Vec<usize> = (0..5).map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0)).collect();
    for r in rows {
        let line = format!(
            "  {:<w0$}  {:<w1$}  {:>w2$}  {:>w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3]
        );
        println!("{}", line.trim_end());
    }
}

fn gc(args: GcArgs) -> anyhow::Result<()> {
    let (spec, store) = open(&args.store.datastore)?;
    // A first read tells "unreachable" apart from a collector error.
    store.list(keys::NODES).map_err(|e| store_err(&spec, e))?;
    let grace = (args.block_grace.map(Duration::from_secs), args.leak_grace.map(Duration::from_secs));
    let report = collect(&*store, args.dry_run, grace).with_context(|| format!("collecting in {spec}"))?;
    if args.store.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({"datastore": spec.to_string(), "dryRun": args.dry_run, "report": report})
            )?
        );
    } else {
        println!("datastore  {spec}{}", if args.dry_run { " (dry run: nothing changed)" } else { "" });
        match &report {
            Value::Object(o) => {
                for (k, v) in o {
                    match v {
                        Value::Array(items) => {
                            println!("{k}: {}", items.len());
                            for i in items {
                                println!("  {i}");
                            }
                        }
                        other => println!("{k}: {other}"),
                    }
                }
            }
            other => println!("{other}"),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// The collector (tern_agent::gc).

/// What a dry-run collection would consider leaked (nothing is written, not
/// even the collector's marks), and the idle blocks waiting for release.
fn leak_candidates(store: &dyn Datastore) -> anyhow::Result<(Value, Value)> {
    let report = tern_agent::gc::run_once(store, None, &GcConfig::default(), true)?;
    Ok((serde_json::to_value(&report.leak_candidates)?, serde_json::to_value(&report.blocks_waiting)?))
}

/// One collection round; the report as JSON.
fn collect(store: &dyn Datastore, dry_run: bool, grace: (Option<Duration>, Option<Duration>)) -> anyhow::Result<Value> {
    let mut cfg = GcConfig::default();
    if let Some(d) = grace.0 {
        cfg.block_grace = d;
    }
    if let Some(d) = grace.1 {
        cfg.leak_grace = d;
    }
    let report = tern_agent::gc::run_once(store, None, &cfg, dry_run)?;
    Ok(serde_json::to_value(&report)?)
}
