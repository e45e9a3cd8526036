//! `tern cni`: drive CNI networks the way a container runtime does
//! (a libcni/cnitool equivalent on top of `tern-runner`).
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use tern_cni::args::CniArgs;
use tern_cni::{CniResult, NetConfList};
use tern_runner::{load_network, Error, Runner, RuntimeConf};

#[derive(clap::Subcommand)]
pub enum Command {
    /// ADD: attach a container to a network, cache the result and print it (default output: json).
    Add(AttachArgs),
    /// CHECK an attachment against its cached result (skipped when the network sets disableCheck).
    Check(AttachArgs),
    /// DEL an attachment (reverse order, cached result as prevResult) and remove its cache entry.
    Del(AttachArgs),
    /// STATUS of every plugin of a network (1.1.0); stops at the first error and keeps its code.
    Status(NetArgs),
    /// GC: DEL cached attachments whose netns is gone, then GC every plugin with the rest as valid.
    Gc(NetArgs),
    /// VERSION of every plugin of a network.
    Version(NetArgs),
    /// The cached attachments per network (network, container, ifname, addresses, age).
    List(ListArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Json,
    Table,
}

#[derive(clap::Args)]
pub struct Common {
    /// Where the network configurations are (*.conflist, *.conf, *.json).
    #[arg(long, default_value = "/etc/cni/net.d")]
    conf_dir: PathBuf,
    /// Plugin directories, colon-separated [default: /opt/cni/bin, plus /usr/lib/cni when present].
    #[arg(long)]
    cni_path: Option<String>,
    /// The result cache (libcni's format, under <DIR>/results).
    #[arg(long, default_value = "/var/lib/cni")]
    cache_dir: PathBuf,
    /// Output format [default: json for add, table otherwise].
    #[arg(long, value_enum)]
    output: Option<Output>,
}

#[derive(clap::Args)]
pub struct NetArgs {
    #[command(flatten)]
    common: Common,
    /// The network's name [default: the first network in lexical order of file names].
    #[arg(long)]
    net: Option<String>,
}

#[derive(clap::Args)]
pub struct AttachArgs {
    #[command(flatten)]
    net: NetArgs,
    /// The container's network namespace: a path, or a name under /run/netns. Required for add;
    /// check and del default to the netns in the cache entry.
    #[arg(long)]
    netns: Option<String>,
    /// The container id.
    #[arg(long)]
    id: String,
    /// The interface name inside the container.
    #[arg(long, default_value = "eth0")]
    ifname: String,
    /// CNI_ARGS, 'K=V;K2=V2' (check and del default to the cached ones).
    #[arg(long)]
    args: Option<String>,
    /// A capability arg NAME=JSON, e.g. portMappings='[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]'
    /// (repeatable; check and del default to the cached ones).
    #[arg(long = "cap", value_name = "NAME=JSON")]
    caps: Vec<String>,
}

#[derive(clap::Args)]
pub struct ListArgs {
    /// The result cache.
    #[arg(long, default_value = "/var/lib/cni")]
    cache_dir: PathBuf,
    /// Only this network.
    #[arg(long)]
    net: Option<String>,
    /// Output format [default: table].
    #[arg(long, value_enum)]
    output: Option<Output>,
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Add(a) => add(a),
        Command::Check(a) => check(a),
        Command::Del(a) => del(a),
        Command::Status(a) => status(a),
        Command::Gc(a) => gc(a),
        Command::Version(a) => version(a),
        Command::List(a) => list(a),
    }
}

fn default_cni_path() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from("/opt/cni/bin")];
    if Path::new("/usr/lib/cni").is_dir() {
        dirs.push(PathBuf::from("/usr/lib/cni"));
    }
    dirs
}

fn runner(c: &Common) -> Runner {
    let path = match &c.cni_path {
        Some(p) => p.split(':').filter(|s| !s.is_empty()).map(PathBuf::from).collect(),
        None => default_cni_path(),
    };
    Runner::new(path, &c.cache_dir).with_notes(|n| eprintln!("tern cni: {n}"))
}

fn network(a: &NetArgs, what: &str) -> Result<NetConfList> {
    load_network(&a.common.conf_dir, a.net.as_deref()).map_err(|e| anyhow!("{what}: {e}"))
}

/// A netns argument: a path as is, a bare name under /run/netns.
fn netns_path(s: &str) -> String {
    if s.contains('/') {
        s.to_string()
    } else {
        format!("/run/netns/{s}")
    }
}

fn parse_caps(caps: &[String]) -> Result<Map<String, Value>> {
    let mut out = Map::new();
    for c in caps {
        let (name, json) = c.split_once('=').ok_or_else(|| anyhow!("--cap {c:?}: expected NAME=JSON"))?;
        if name.is_empty() {
            bail!("--cap {c:?}: empty capability name");
        }
        let v: Value = serde_json::from_str(json).with_context(|| format!("--cap {name}: the value is not JSON"))?;
        out.insert(name.to_string(), v);
    }
    Ok(out)
}

/// The runtime parameters from the flags; for check/del, what the flags
/// leave out comes from the attachment's cache entry (as a runtime re-sends
/// the ADD's args and capabilities).
fn runtime_conf(a: &AttachArgs, r: &Runner, list: &NetConfList, from_cache: bool) -> Result<RuntimeConf> {
    let cached = if from_cache { r.cached(&list.name, &a.id, &a.ifname) } else { None };
    let netns = match (&a.netns, &cached) {
        (Some(n), _) => netns_path(n),
        (None, Some(e)) => e.netns.clone(),
        (None, None) => String::new(),
    };
    let cni_args = match (&a.args, &cached) {
        (Some(s), _) => CniArgs::parse(s).map_err(|e| anyhow!("--args: {e}"))?.pairs,
        (None, Some(e)) => e.cni_args.clone(),
        (None, None) => Vec::new(),
    };
    let capability_args = match (a.caps.is_empty(), &cached) {
        (false, _) | (true, None) => parse_caps(&a.caps)?,
        (true, Some(e)) => e.capability_args.clone(),
    };
    Ok(RuntimeConf { container_id: a.id.clone(), netns, ifname: a.ifname.clone(), cni_args, capability_args })
}

/// Turn a runner error into the command's error; with an explicit
/// `--output json`, the CNI error object goes to stdout too.
fn fail(e: Error, what: &str, output: Option<Output>) -> anyhow::Error {
    if output == Some(Output::Json) {
        let mut v = json!({ "code": e.code().unwrap_or(999), "msg": e.to_string() });
        if let Error::Plugins(f) = &e {
            v["failures"] = f
                .iter()
                .map(|f| json!({ "plugin": f.plugin, "command": f.command.as_str(), "code": f.error.code, "msg": f.error.msg, "details": f.error.details }))
                .collect();
        }
        println!("{}", serde_json::to_string_pretty(&v).expect("serialises"));
    }
    anyhow!("{what}: {e}")
}

fn add(a: AttachArgs) -> Result<()> {
    let explicit = a.net.common.output;
    let output = explicit.unwrap_or(Output::Json);
    let Some(netns) = &a.netns else { bail!("add: --netns is required") };
    let r = runner(&a.net.common);
    let list = network(&a.net, "add")?;
    let mut rt = runtime_conf(&a, &r, &list, false)?;
    rt.netns = netns_path(netns);
    let added = r.add(&list, &rt).map_err(|e| fail(e, "add", explicit))?;
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&added.to_value()).expect("serialises")),
        Output::Table => print_result(&list.name, &rt, &added.result),
    }
    Ok(())
}

fn print_result(network: &str, rt: &RuntimeConf, r: &CniResult) {
    println!("network {network}, container {}, {} in {}", rt.container_id, rt.ifname, rt.netns);
    let mut rows = vec![vec!["KIND".to_string(), "NAME/ADDRESS".into(), "DETAIL".into()]];
    for i in &r.interfaces {
        let place = if i.sandbox.is_empty() { "host".to_string() } else { format!("sandbox {}", i.sandbox) };
        rows.push(vec!["interface".into(), i.name.clone(), format!("{} {place}", i.mac)]);
    }
    for ip in &r.ips {
        let gw = ip.gateway.map(|g| format!("gateway {g}")).unwrap_or_default();
        let on = ip.interface.and_then(|i| r.interfaces.get(i)).map(|i| format!(" on {}", i.name)).unwrap_or_default();
        rows.push(vec!["ip".into(), ip.address.to_string(), format!("{gw}{on}").trim().to_string()]);
    }
    for rt in &r.routes {
        rows.push(vec!["route".into(), rt.dst.to_string(), rt.gw.map(|g| format!("via {g}")).unwrap_or_default()]);
    }
    if !r.dns.nameservers.is_empty() {
        rows.push(vec!["dns".into(), r.dns.nameservers.join(","), r.dns.search.join(",")]);
    }
    print_table(&rows);
}

fn check(a: AttachArgs) -> Result<()> {
    let explicit = a.net.common.output;
    let output = explicit.unwrap_or(Output::Table);
    let r = runner(&a.net.common);
    let list = network(&a.net, "check")?;
    let rt = runtime_conf(&a, &r, &list, true)?;
    r.check(&list, &rt).map_err(|e| fail(e, "check", explicit))?;
    if output == Output::Table {
        println!("CHECK ok: network {}, container {}, {}", list.name, rt.container_id, rt.ifname);
    }
    Ok(())
}

fn del(a: AttachArgs) -> Result<()> {
    let explicit = a.net.common.output;
    let output = explicit.unwrap_or(Output::Table);
    let r = runner(&a.net.common);
    let list = network(&a.net, "del")?;
    let rt = runtime_conf(&a, &r, &list, true)?;
    r.del(&list, &rt).map_err(|e| fail(e, "del", explicit))?;
    if output == Output::Table {
        println!("DEL ok: network {}, container {}, {}", list.name, rt.container_id, rt.ifname);
    }
    Ok(())
}

fn status(a: NetArgs) -> Result<()> {
    let explicit = a.common.output;
    let output = explicit.unwrap_or(Output::Table);
    let r = runner(&a.common);
    let list = network(&a, "status")?;
    r.status(&list).map_err(|e| fail(e, "status", explicit))?;
    if output == Output::Table {
        println!("STATUS ok: network {} ({} plugins)", list.name, list.plugins.len());
    }
    Ok(())
}

fn gc(a: NetArgs) -> Result<()> {
    let explicit = a.common.output;
    let output = explicit.unwrap_or(Output::Table);
    let r = runner(&a.common);
    let list = network(&a, "gc")?;
    let s = r.gc(&list).map_err(|e| fail(e, "gc", explicit))?;
    let ids =
        |v: &[tern_cni::Attachment]| v.iter().map(|a| format!("{}/{}", a.container_id, a.ifname)).collect::<Vec<_>>();
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "network": list.name, "disabled": s.disabled, "deleted": s.deleted, "valid": s.valid,
                "pluginsCalled": s.plugins_called,
            }))
            .expect("serialises")
        ),
        Output::Table if s.disabled => println!("GC skipped: network {} sets disableGC", list.name),
        Output::Table => {
            println!("GC ok: network {}", list.name);
            println!("  deleted (netns gone): {}", none_or(ids(&s.deleted)));
            println!("  valid: {}", none_or(ids(&s.valid)));
        }
    }
    Ok(())
}

fn none_or(v: Vec<String>) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

fn version(a: NetArgs) -> Result<()> {
    let output = a.common.output.unwrap_or(Output::Table);
    let r = runner(&a.common);
    let list = network(&a, "version")?;
    let versions = r.versions(&list);
    match output {
        Output::Json => {
            let v: Vec<Value> = versions
                .iter()
                .map(|p| match &p.supported {
                    Ok(s) => json!({"type": p.plugin, "path": p.path, "supportedVersions": s}),
                    Err(e) => json!({"type": p.plugin, "path": p.path, "error": e}),
                })
                .collect();
            let out = json!({"network": list.name, "cniVersion": list.cni_version.as_str(), "plugins": v});
            println!("{}", serde_json::to_string_pretty(&out).expect("serialises"));
        }
        Output::Table => {
            println!("network {}: cniVersion {}", list.name, list.cni_version);
            let mut rows = vec![vec!["PLUGIN".to_string(), "PATH".into(), "SUPPORTS".into(), "VERSIONS".into()]];
            for p in &versions {
                let path = p.path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into());
                let (ok, vs) = match &p.supported {
                    Ok(s) => (if s.iter().any(|v| v == list.cni_version.as_str()) { "yes" } else { "NO" }, s.join(",")),
                    Err(e) => ("?", e.to_string()),
                };
                rows.push(vec![p.plugin.clone(), path, ok.into(), vs]);
            }
            print_table(&rows);
        }
    }
    if versions.iter().any(|p| p.supported.is_err()) {
        bail!("version: some plugins could not be asked");
    }
    Ok(())
}

fn age(t: Option<SystemTime>) -> String {
    let Some(d) = t.and_then(|t| SystemTime::now().duration_since(t).ok()) else { return "-".into() };
    let s = d.as_secs();
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

fn addresses(result: Option<&Value>) -> Vec<String> {
    let Some(r) = result else { return Vec::new() };
    let mut out: Vec<String> =
        r["ips"].as_array().into_iter().flatten().filter_map(|ip| ip["address"].as_str().map(str::to_string)).collect();
    for k in ["ip4", "ip6"] {
        if let Some(a) = r[k]["ip"].as_str() {
            out.push(a.to_string());
        }
    }
    out
}

fn list(a: ListArgs) -> Result<()> {
    let output = a.output.unwrap_or(Output::Table);
    let r = Runner::new(Vec::new(), &a.cache_dir);
    let listing = r.attachments().map_err(|e| anyhow!("list: {e}"))?;
    let entries: Vec<_> =
        listing.attachments.iter().filter(|c| a.net.as_deref().is_none_or(|n| c.entry.network_name == n)).collect();
    match output {
        Output::Json => {
            let v: Vec<Value> = entries
                .iter()
                .map(|c| {
                    let age = c.modified.and_then(|t| SystemTime::now().duration_since(t).ok()).map(|d| d.as_secs());
                    json!({
                        "network": c.entry.network_name, "containerId": c.entry.container_id,
                        "ifName": c.entry.if_name, "netns": c.entry.netns,
                        "addresses": addresses(c.entry.result.as_ref()), "ageSeconds": age,
                        "file": c.file,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v).expect("serialises"));
        }
        Output::Table => {
            let mut rows = vec![vec![
                "NETWORK".to_string(),
                "CONTAINER".into(),
                "IFNAME".into(),
                "NETNS".into(),
                "ADDRESSES".into(),
                "AGE".into(),
            ]];
            let mut sorted = entries.clone();
            sorted.sort_by(|x, y| {
                (&x.entry.network_name, &x.entry.container_id, &x.entry.if_name).cmp(&(
                    &y.entry.network_name,
                    &y.entry.container_id,
                    &y.entry.if_name,
                ))
            });
            for c in sorted {
                let e = &c.entry;
                let addrs = addresses(e.result.as_ref());
                rows.push(vec![
                    e.network_name.clone(),
                    e.container_id.clone(),
                    e.if_name.clone(),
                    if e.netns.is_empty() { "-".into() } else { e.netns.clone() },
                    if addrs.is_empty() { "-".into() } else { addrs.join(",") },
                    age(c.modified),
                ]);
            }
            if rows.len() == 1 {
                println!("no cached attachments in {}", a.cache_dir.join("results").display());
            } else {
                print_table(&rows);
            }
        }
    }
    for (file, why) in &listing.skipped {
        eprintln!("tern cni list: skipped {}: {why}", file.display());
    }
    Ok(())
}

fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().map(|r| r.get(c).map_or(0, |s| s.chars().count())).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| if i + 1 == r.len() { s.clone() } else { format!("{s:<w$}", w = widths[i]) })
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}
