//! `tern status`: the node's view, from its agent's socket.
//!
//! Asks the agent (`{"op":"status"}`, see `tern_agent::proto`) and prints
//! whether it answers (with its pid from the socket's peer credentials and
//! its uptime from /proc), whether its datastore is reachable, the node's
//! blocks with their use, the pods (handles) it knows, and whatever else
//! the agent reports (warm pool, endpoints). Fields this binary does not
//! know are printed as they come, so an agent newer than the CLI still shows
//! everything.
//!
//! Exit status: 0 when the agent answers and its datastore is reachable;
//! 1 otherwise, with a message saying which of the two is down.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::{json, Value};
use tern_store::DatastoreSpec;

/// Longer than the agent's own store timeout (1.5 s), so a slow store shows
/// up as "unreachable" in the answer rather than as a silent agent.
const TIMEOUT: Duration = Duration::from_secs(4);

/// Status fields printed in their own lines; everything else is printed generically.
const KNOWN: [&str; 12] = [
    "node",
    "store",
    "storeReachable",
    "storeError",
    "pools",
    "blocks",
    "handles",
    "warmFree",
    "warmIPTarget",
    "minimumIPTarget",
    "pendingOps",
    "borrowed",
];

#[derive(clap::Args)]
pub struct Args {
    /// The agent's socket.
    #[arg(long, default_value = tern_agent::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Where to read the node's endpoint records (local:DIR or etcd:URL[,URL]); default: the agent's datastore.
    #[arg(long)]
    datastore: Option<String>,
}

/// The agent's datastore as a spec: its description is `etcd URL[,URL]` or `local DIR`.
fn spec_of(describe: &str) -> Option<DatastoreSpec> {
    let (kind, rest) = describe.split_once(' ')?;
    format!("{kind}:{rest}").parse().ok()
}

/// The endpoint records of `node` in the store (pods with namespace, name,
/// interface and addresses).
fn read_endpoints(spec: &DatastoreSpec, node: &str) -> anyhow::Result<Vec<Value>> {
    let store = super::agent::open_store(spec)?;
    let (records, _undecodable) = tern_agent::endpoints::list(&*store)?;
    let mut out = Vec::new();
    for r in records.into_iter().map(|v| v.value).filter(|r| r.node == node) {
        out.push(serde_json::to_value(&r)?);
    }
    Ok(out)
}

/// What we learnt about the agent process itself.
struct AgentProcess {
    pid: Option<i32>,
    uptime: Option<Duration>,
}

fn ask_status(socket: &Path) -> anyhow::Result<(Value, AgentProcess)> {
    let mut conn = UnixStream::connect(socket).context("connecting")?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    conn.set_write_timeout(Some(TIMEOUT))?;
    let pid = nix::sys::socket::getsockopt(&conn, nix::sys::socket::sockopt::PeerCredentials).ok().map(|c| c.pid());
    conn.write_all(b"{\"op\":\"status\"}\n").context("sending the status request")?;
    let mut line = String::new();
    BufReader::new(&conn).read_line(&mut line).context("reading the answer")?;
    if line.is_empty() {
        bail!("the agent closed the connection without answering");
    }
    let resp: Value = serde_json::from_str(&line).with_context(|| format!("not an agent answer: {line:?}"))?;
    if resp["ok"] != json!(true) {
        let msg = resp["error"]["message"].as_str().unwrap_or("no message");
        bail!("the agent refused the status request: {msg}");
    }
    let status = resp.get("status").cloned().ok_or_else(|| anyhow!("the agent's answer has no status: {line:?}"))?;
    Ok((status, AgentProcess { pid, uptime: pid.and_then(process_uptime) }))
}

/// How long process `pid` has been running (from /proc/<pid>/stat's start
/// time, in clock ticks after boot, and /proc/uptime).
fn process_uptime(pid: i32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces): state is field 3, starttime field 22.
    let rest = &stat[stat.rfind(')')? + 1..];
    let start_ticks: f64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64;
    let boot_uptime: f64 = std::fs::read_to_string("/proc/uptime").ok()?.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_secs_f64((boot_uptime - start_ticks / ticks).max(0.0)))
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let socket = args.socket.display().to_string();
    let (status, process) = match ask_status(&args.socket) {
        Ok(x) => x,
        Err(e) => {
            let reason = format!("{e:#}");
            if args.json {
                let out = json!({"socket": socket, "agent": {"answering": false, "error": reason}});
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                println!("agent       not answering on {socket}: {reason}");
            }
            bail!("the agent is not answering on {socket}: {reason}");
        }
    };
    let reachable = status["storeReachable"].as_bool().unwrap_or(false);
    let store = status["store"].as_str().unwrap_or("?").to_string();
    let store_error = status["storeError"].as_str().unwrap_or("no reason given").to_string();
    // The pods as the datastore records them (only when the agent reaches it).
    let endpoints: Option<Result<Vec<Value>, String>> = reachable.then(|| {
        let spec = match &args.datastore {
            Some(s) => s.parse::<DatastoreSpec>().map_err(|e| format!("--datastore: {e}"))?,
            None => spec_of(&store).ok_or_else(|| format!("cannot open the agent's datastore {store:?}"))?,
        };
        read_endpoints(&spec, status["node"].as_str().unwrap_or_default()).map_err(|e| format!("{e:#}"))
    });
    if args.json {
        let out = json!({
            "socket": socket,
            "agent": {
                "answering": true,
                "pid": process.pid,
                "uptimeSeconds": process.uptime.map(|d| d.as_secs()),
            },
            "status": status,
            "endpoints": endpoints.as_ref().and_then(|e| e.as_ref().ok()),
            "endpointsError": endpoints.as_ref().and_then(|e| e.as_ref().err()),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_text(&socket, &status, &process);
        print_endpoints(endpoints.as_ref());
    }
    if !reachable {
        bail!("the datastore {store} is unreachable: {store_error}");
    }
    Ok(())
}

fn print_text(socket: &str, status: &Value, process: &AgentProcess) {
    let mut agent = format!("answering on {socket}");
    match (process.pid, process.uptime) {
        (Some(pid), Some(up)) => agent.push_str(&format!(" (pid {pid}, up {})", human_duration(up))),
        (Some(pid), None) => agent.push_str(&format!(" (pid {pid})")),
        _ => {}
    }
    println!("agent       {agent}");
    println!("node        {}", status["node"].as_str().unwrap_or("?"));
    let store = status["store"].as_str().unwrap_or("?");
    if status["storeReachable"].as_bool().unwrap_or(false) {
        println!("datastore   {store}: reachable");
    } else {
        println!("datastore   {store}: UNREACHABLE: {}", status["storeError"].as_str().unwrap_or("no reason given"));
    }
    let list = |v: &Value| -> String {
        v.as_array()
            .map(|a| a.iter().map(|x| x.as_str().unwrap_or("?").to_string()).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    };
    println!("pools       {}", list(&status["pools"]));
    let blocks = status["blocks"].as_array().cloned().unwrap_or_default();
    let (mut used_all, mut size_all) = (0u64, 0u64);
    for b in &blocks {
        used_all += b["used"].as_u64().unwrap_or(0);
        size_all += b["size"].as_u64().unwrap_or(0);
    }
    println!("blocks      {} ({used_all}/{size_all} addresses used{})", blocks.len(), percent(used_all, size_all));
    let width = blocks.iter().map(|b| b["cidr"].as_str().unwrap_or("?").len()).max().unwrap_or(0);
    for b in &blocks {
        let (used, size) = (b["used"].as_u64().unwrap_or(0), b["size"].as_u64().unwrap_or(0));
        let pct = if size == 0 { 0.0 } else { used as f64 * 100.0 / size as f64 };
        let use_ = format!("{used}/{size}");
        println!("  {:<width$}  {use_:>9}  {pct:5.1}%", b["cidr"].as_str().unwrap_or("?"));
    }
    println!("pods        {} attachments (handles)", status["handles"]);
    if status.get("warmFree").is_some() {
        println!(
            "warm pool   {} free addresses ready (warmIPTarget {}, minimumIPTarget {})",
            status["warmFree"], status["warmIPTarget"], status["minimumIPTarget"]
        );
    }
    if let Some(n) = status["borrowed"].as_u64().filter(|n| *n > 0) {
        println!("borrowed    {n} addresses in other nodes' blocks");
    }
    if let Some(n) = status["pendingOps"].as_u64().filter(|n| *n > 0) {
        println!("journal     {n} changes not yet written to the datastore");
    }
    // What a newer agent reports on top (warm pool, endpoints, ...), as it comes.
    if let Value::Object(obj) = status {
        for (k, v) in obj.iter().filter(|(k, _)| !KNOWN.contains(&k.as_str())) {
            match v {
                Value::Array(items) => {
                    println!("{k:<11} {}", items.len());
                    for item in items {
                        println!("  {}", compact(item));
                    }
                }
                other => println!("{k:<11} {}", compact(other)),
            }
        }
    }
}

fn print_endpoints(endpoints: Option<&Result<Vec<Value>, String>>) {
    match endpoints {
        None => {}
        Some(Err(e)) => println!("endpoints   not read: {e}"),
        Some(Ok(list)) => {
            println!("endpoints   {} records in the datastore", list.len());
            for r in list {
                let pod = match (r["podNamespace"].as_str(), r["podName"].as_str()) {
                    (Some(ns), Some(name)) => format!("{ns}/{name}"),
                    _ => format!("container {}", r["containerId"].as_str().unwrap_or("?")),
                };
                let addrs: Vec<&str> =
                    r["addresses"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
                println!("  {pod:<30} {:<6} {}", r["interface"].as_str().unwrap_or(""), addrs.join(" "));
            }
        }
    }
}

fn compact(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(o) => o.iter().map(|(k, v)| format!("{k}={}", compact(v))).collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    }
}

fn percent(used: u64, size: u64) -> String {
    if size == 0 {
        String::new()
    } else {
        format!(", {:.1}%", used as f64 * 100.0 / size as f64)
    }
}
