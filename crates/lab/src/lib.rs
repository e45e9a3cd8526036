//! `tern lab`: a virtual multi-node cluster made of network namespaces on
//! one machine, with tern's real parts: Debian's etcd, one `tern agent` per
//! node doing cluster IPAM and cross-node routing, pods attached with
//! `tern cni`, and a connectivity matrix ([`matrix`]).
//!
//! Layout and addresses: [`spec`]. Namespaces and links: [`fabric`]. The
//! lab's processes: [`proc`]. What exists is recorded in [`state`] after
//! every step, so `down` removes exactly that, and `up` after a crash first
//! removes the remains of the earlier lab.
//!
//! Safety: nothing is added to the machine's root namespace (links are
//! created inside lab namespaces), traffic only flows between lab
//! namespaces, and only processes recorded by pid and start time are
//! signalled.
pub mod fabric;
pub mod matrix;
pub mod proc;
pub mod spec;
pub mod state;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::proc::{spawn_in, wait_ready};
use crate::spec::{Lab, LabSpec};
use crate::state::{agent_socket, node_dir, write_atomic, LabState, NodeState, PodState};

/// Lab network name in every node's CNI configuration.
pub const NETWORK: &str = "lab";

/// Progress of long steps, for the CLI's progress bar.
pub trait Progress {
    fn step(&mut self, done: usize, total: usize, what: &str);
}

/// Tests kill `tern lab up` at a named step (`TERN_TEST_LAB_KILL_AT=etcd`,
/// `node n2`, `pod n1-p1`: the step about to start) with SIGKILL, to prove a
/// crashed lab is cleaned up by the next `up`.
fn crash_point(step: &str) {
    if std::env::var("TERN_TEST_LAB_KILL_AT").is_ok_and(|v| v == step) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}

/// No progress output.
pub struct Quiet;
impl Progress for Quiet {
    fn step(&mut self, _: usize, _: usize, _: &str) {}
}

fn bin_dir(lab: &Lab) -> PathBuf {
    lab.run_dir().join("bin")
}

/// The plugins' directory: links named after every plugin type to the tern
/// executable (it dispatches on its name).
fn install_plugins(lab: &Lab, tern: &Path) -> Result<()> {
    let dir = bin_dir(lab);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for name in ["tern", "tern-ipam", "tern-portmap", "tern-bandwidth", "tern-firewall", "tern-tuning"] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(tern, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(())
}

fn etcd_bin() -> &'static str {
    "/usr/bin/etcd"
}

/// Removes every trace of a lab: its processes (by recorded pid and start
/// time), its namespaces (by name prefix: also those of a lab whose state
/// file was lost), and its files. Returns what it removed, for messages.
pub fn down(lab: &Lab) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    if let Ok(Some(st)) = LabState::load(lab) {
        for n in &st.nodes {
            if let Some(a) = n.agent {
                if a.alive() {
                    a.stop(Duration::from_secs(3));
                    removed.push(format!("agent of {} (pid {})", n.name, a.pid));
                }
            }
        }
        if let Some(e) = st.etcd {
            if e.alive() {
                e.stop(Duration::from_secs(5));
                removed.push(format!("etcd (pid {})", e.pid));
            }
        }
    }
    for ns in fabric::lab_namespaces(lab) {
        fabric::remove_netns(&ns)?;
        removed.push(format!("netns {ns}"));
    }
    let dir = lab.run_dir();
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        removed.push(dir.display().to_string());
    }
    Ok(removed)
}

/// Brings a lab up: fabric, etcd, nodes with agents, pods. A previous lab
/// (running or crashed) is removed first.
pub fn up(names: &Lab, lab: LabSpec, tern: &Path, progress: &mut dyn Progress) -> Result<LabState> {
    lab.validate().map_err(anyhow::Error::msg)?;
    if !Path::new(etcd_bin()).exists() {
        bail!("{} is missing: install Debian's etcd-server (the README's setup does)", etcd_bin());
    }
    down(names).context("removing the remains of an earlier lab")?;
    let total = 2 + lab.nodes as usize * (1 + lab.pods_per_node as usize);
    let mut done = 0;
    progress.step(done, total, "fabric");
    install_plugins(names, tern)?;
    let mut st = LabState {
        lab: names.clone(),
        spec: lab,
        tern: tern.to_path_buf(),
        etcd: None,
        nodes: Vec::new(),
        pods: Vec::new(),
    };
    st.save()?;
    let fabric_ns = fabric::build_fabric(names, &lab)?;
    done += 1;
    progress.step(done, total, "etcd");
    crash_point("etcd");
    start_etcd(&mut st, &fabric_ns)?;
    done += 1;
    for i in 1..=lab.nodes {
        progress.step(done, total, &format!("node {}", spec::node_name(i)));
        crash_point(&format!("node {}", spec::node_name(i)));
        add_node_inner(&mut st, &fabric_ns, i)?;
        done += 1;
    }
    for i in 1..=lab.nodes {
        for p in 1..=lab.pods_per_node {
            progress.step(done, total, &format!("pod {}", spec::pod_name(i, p)));
            crash_point(&format!("pod {}", spec::pod_name(i, p)));
            add_pod(&mut st, i, p)?;
            done += 1;
        }
    }
    progress.step(total, total, "ready");
    Ok(st)
}

fn start_etcd(st: &mut LabState, fabric_ns: &tern_sys::NetNs) -> Result<()> {
    let dir = st.lab.run_dir().join("etcd");
    std::fs::create_dir_all(&dir)?;
    let client = spec::etcd_url();
    let peer = "http://127.0.0.1:2380".to_string();
    let argv: Vec<String> = [
        etcd_bin(),
        "--name",
        "lab",
        "--data-dir",
        &dir.join("data").display().to_string(),
        "--listen-client-urls",
        &client,
        "--advertise-client-urls",
        &client,
        "--listen-peer-urls",
        &peer,
        "--initial-advertise-peer-urls",
        &peer,
        "--initial-cluster",
        &format!("lab={peer}"),
        "--logger=zap",
        "--log-outputs=stderr",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = dir.join("etcd.log");
    let p = spawn_in(&st.lab.fabric(), &argv, &log)?;
    st.etcd = Some(p);
    st.save()?;
    let addr = std::net::SocketAddr::new(IpAddr::V4(spec::gateway(1)), spec::ETCD_PORT);
    wait_ready(&p, "etcd", &log, Duration::from_secs(20), || {
        fabric_ns
            .enter(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
            .unwrap_or(false)
    })
}

fn agent_argv(st: &LabState, node: &NodeState) -> Vec<String> {
    let dir = node_dir(&st.lab, &node.name);
    let mut argv = vec![
        st.tern.display().to_string(),
        "agent".into(),
        "--node".into(),
        node.name.clone(),
        "--datastore".into(),
        format!("etcd:{}", spec::etcd_url()),
        "--socket".into(),
        agent_socket(&st.lab, &node.name).display().to_string(),
        "--state-dir".into(),
        dir.join("agent").display().to_string(),
        "--pool".into(),
        spec::CLUSTER_CIDR.into(),
        "--block-prefix".into(),
        spec::BLOCK_PREFIX.to_string(),
        "--lease-ttl".into(),
        "5".into(),
        "--routing".into(),
        st.spec.routing.to_string(),
        "--underlay-interface".into(),
        "eth0".into(),
        "--dataplane".into(),
        st.spec.dataplane.to_string(),
    ];
    if st.spec.ipv6 {
        argv.extend([
            "--pool".into(),
            spec::CLUSTER_CIDR6.into(),
            "--block-prefix".into(),
            spec::BLOCK_PREFIX6.to_string(),
        ]);
    }
    argv
}

/// Starts (or restarts) node `name`'s agent and waits until it answers.
pub fn start_agent(st: &mut LabState, name: &str) -> Result<()> {
    let idx = st.nodes.iter().position(|n| n.name == name).with_context(|| format!("no lab node {name}"))?;
    let node = st.nodes[idx].clone();
    if let Some(a) = node.agent {
        if a.alive() {
            bail!("the agent of node {name} is running (pid {})", a.pid);
        }
    }
    let dir = node_dir(&st.lab, &node.name);
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("agent.log");
    let p = spawn_in(&node.netns, &agent_argv(st, &node), &log)?;
    st.nodes[idx].agent = Some(p);
    st.save()?;
    let sock = agent_socket(&st.lab, &node.name);
    wait_ready(&p, &format!("the agent of node {name}"), &log, Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    })
}

/// Stops node `name`'s agent (SIGTERM: it deregisters; routes and pods stay).
pub fn stop_agent(st: &mut LabState, name: &str) -> Result<()> {
    let node = st.node(name).with_context(|| format!("no lab node {name}"))?.clone();
    if let Some(a) = node.agent {
        a.stop(Duration::from_secs(5));
    }
    Ok(())
}

fn add_node_inner(st: &mut LabState, fabric_ns: &tern_sys::NetNs, i: u8) -> Result<()> {
    let lab = st.spec;
    let node = NodeState {
        index: i,
        name: spec::node_name(i),
        netns: st.lab.node_netns(i),
        subnet: spec::subnet_of(&lab, i),
        ip: spec::node_ip(&lab, i),
        agent: None,
    };
    st.nodes.push(node.clone());
    st.save()?;
    fabric::build_node(&st.lab, &lab, fabric_ns, i)?;
    let dir = node_dir(&st.lab, &node.name);
    let conf = json!({
        "cniVersion": "1.1.0",
        "name": NETWORK,
        "plugins": [{
            "type": "tern",
            "mode": "routed",
            "mtu": pod_mtu(lab.routing),
            "dataplane": lab.dataplane.to_string(),
            "ipam": {"type": "tern-ipam", "allocator": "cluster", "agentSocket": agent_socket(&st.lab, &node.name)}
        }]
    });
    write_atomic(&dir.join("net.d").join("10-lab.conflist"), &serde_json::to_vec_pretty(&conf)?)?;
    start_agent(st, &node.name)
}

/// Pods leave room for the VXLAN header whenever it may be used.
fn pod_mtu(routing: tern_routing::Mode) -> u32 {
    match routing {
        tern_routing::Mode::Direct => 1500,
        _ => tern_routing::vxlan_mtu(1500, false),
    }
}

/// Adds node `n<max+1>` with `pods` pods to a running lab.
pub fn add_node(lab: &Lab, pods: u8) -> Result<LabState> {
    let mut st = LabState::load(lab)?.context("no lab is up (tern lab up)")?;
    let i = st.nodes.iter().map(|n| n.index).max().unwrap_or(0) + 1;
    if i > spec::MAX_NODES {
        bail!("the lab has {} nodes already", spec::MAX_NODES);
    }
    let fabric_ns = tern_sys::NetNs::open(fabric::netns_path(&lab.fabric()))?;
    add_node_inner(&mut st, &fabric_ns, i)?;
    for p in 1..=pods {
        add_pod(&mut st, i, p)?;
    }
    Ok(st)
}

/// Removes a node for good: its pods (DEL), its agent, its routing record
/// (every other node drops its routes), its namespace.
pub fn remove_node(lab: &Lab, name: &str) -> Result<LabState> {
    let mut st = LabState::load(lab)?.context("no lab is up (tern lab up)")?;
    let node = st.node(name).with_context(|| format!("no lab node {name}"))?.clone();
    let pods: Vec<String> = st.pods.iter().filter(|p| p.node == node.name).map(|p| p.name.clone()).collect();
    for p in pods {
        del_pod(&mut st, &p)?;
    }
    // The agent leaves the cluster: it deregisters and withdraws its routes.
    let out = run_tern_in(
        &st,
        &node.netns,
        &["agent", "--leave", "--node", &node.name, "--datastore", &format!("etcd:{}", spec::etcd_url())],
    );
    stop_agent(&mut st, &node.name)?;
    if let Err(e) = out {
        eprintln!("tern lab: node {}: leaving the cluster: {e:#}", node.name);
    }
    fabric::remove_netns(&node.netns)?;
    let fabric_ns = tern_sys::NetNs::open(fabric::netns_path(&lab.fabric()))?;
    let nl = tern_sys::Netlink::in_netns(&fabric_ns)?;
    let _ = nl.delete_link(&node.name);
    let _ = std::fs::remove_dir_all(node_dir(lab, &node.name));
    st.nodes.retain(|n| n.name != node.name);
    st.save()?;
    Ok(st)
}

/// Runs the lab's tern executable inside `netns`; its stdout on success.
fn run_tern_in(st: &LabState, netns: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(&st.tern)
        .args(args)
        .output()
        .with_context(|| format!("running tern {} in netns {netns}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "tern {} in netns {netns} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn cni_args<'a>(dir: &'a str, bin: &'a str, cache: &'a str) -> Vec<&'a str> {
    vec!["--conf-dir", dir, "--cni-path", bin, "--cache-dir", cache, "--net", NETWORK]
}

/// Attaches pod `p` of node `i` through `tern cni add` inside the node.
pub fn add_pod(st: &mut LabState, i: u8, p: u8) -> Result<()> {
    let node = st.nodes.iter().find(|n| n.index == i).with_context(|| format!("no lab node n{i}"))?.clone();
    let name = spec::pod_name(i, p);
    let netns = st.lab.pod_netns(i, p);
    fabric::create_netns(&netns)?;
    st.pods.push(PodState {
        name: name.clone(),
        node: node.name.clone(),
        netns: netns.clone(),
        container_id: name.clone(),
        ips: vec![],
    });
    st.save()?;
    let dir = node_dir(&st.lab, &node.name);
    let (conf, bin, cache) = (
        dir.join("net.d").display().to_string(),
        bin_dir(&st.lab).display().to_string(),
        dir.join("cni").display().to_string(),
    );
    let k8s = format!("K8S_POD_NAMESPACE=lab;K8S_POD_NAME={name}");
    let mut args = vec!["cni", "add"];
    args.extend(cni_args(&conf, &bin, &cache));
    args.extend(["--netns", &netns, "--id", &name, "--args", &k8s, "--output", "json"]);
    let out = run_tern_in(st, &node.netns, &args)?;
    let result: serde_json::Value = serde_json::from_str(&out).with_context(|| format!("pod {name}: result {out}"))?;
    let ips: Vec<IpAddr> = result["ips"]
        .as_array()
        .map(|a| a.iter().filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok()).collect())
        .unwrap_or_default();
    if let Some(pod) = st.pods.iter_mut().find(|x| x.name == name) {
        pod.ips = ips;
    }
    st.save()
}

/// Detaches a pod (`tern cni del`) and removes its namespace.
pub fn del_pod(st: &mut LabState, name: &str) -> Result<()> {
    let pod = st.pod(name).with_context(|| format!("no lab pod {name}"))?.clone();
    if let Some(node) = st.node(&pod.node).cloned() {
        let dir = node_dir(&st.lab, &node.name);
        let (conf, bin, cache) = (
            dir.join("net.d").display().to_string(),
            bin_dir(&st.lab).display().to_string(),
            dir.join("cni").display().to_string(),
        );
        let mut args = vec!["cni", "del"];
        args.extend(cni_args(&conf, &bin, &cache));
        args.extend(["--id", &pod.container_id]);
        run_tern_in(st, &node.netns, &args)?;
    }
    fabric::remove_netns(&pod.netns)?;
    st.pods.retain(|p| p.name != pod.name);
    st.save()
}

/// Runs `argv` inside a lab node or pod (by name or namespace name), with
/// the caller's stdio; its exit status.
pub fn exec(lab: &Lab, target: &str, argv: &[String]) -> Result<std::process::ExitStatus> {
    let st = LabState::load(lab)?.context("no lab is up (tern lab up)")?;
    let netns = match (st.node(target), st.pod(target)) {
        (Some(n), _) => n.netns.clone(),
        (None, Some(p)) => p.netns.clone(),
        _ if target == "external" || target == lab.external() => lab.external(),
        _ if target == "fabric" || target == lab.fabric() => lab.fabric(),
        _ => bail!("no lab node or pod {target:?} (see tern lab status)"),
    };
    if argv.is_empty() {
        bail!("nothing to run: tern lab exec {target} -- CMD [ARGS]");
    }
    Command::new("ip").args(["netns", "exec", &netns]).args(argv).status().context("running ip netns exec")
}

/// Waits until `f` holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
