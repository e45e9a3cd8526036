//! `tern lab`: a virtual cluster of network namespaces on this machine
//! (crates/lab); this module only parses arguments and prints.
use std::io::IsTerminal;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tern_lab::spec::{Lab, LabSpec};
use tern_lab::state::LabState;
use tern_routing::Mode;

#[derive(clap::Args)]
pub struct Args {
    /// The lab's name: every namespace of it starts with it (labs with different names coexist).
    #[arg(long, global = true, default_value = tern_lab::spec::DEFAULT_NAME)]
    name: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Subcommand)]
pub enum Command {
    /// Bring up a lab (removing any earlier one first): fabric, etcd, nodes with agents, pods.
    Up(UpArgs),
    /// Nodes, agents, pods and their addresses.
    Status(JsonArg),
    /// Run a command inside a lab node or pod (or `external`, `fabric`): tern lab exec n1 -- ip route.
    Exec(ExecArgs),
    /// The connectivity matrix: every pod and node to every pod, node and the external host.
    Test(JsonArg),
    /// Add a node (with pods) to the running lab, or remove one for good.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Restart the agents of the given nodes (all when none is given); pods keep running.
    RestartAgents { nodes: Vec<String> },
    /// Remove the lab: processes, namespaces, files.
    Down,
}

#[derive(clap::Args)]
pub struct UpArgs {
    #[arg(long, default_value_t = 3)]
    nodes: u8,
    /// How nodes reach each other's pods.
    #[arg(long, default_value = "auto")]
    routing: Mode,
    /// Underlay subnets, joined by a router (nodes are split among them in order).
    #[arg(long, default_value_t = 1)]
    subnets: u8,
    #[arg(long, default_value_t = 2)]
    pods_per_node: u8,
    /// kernel: pods and nodes forward through the kernel; ebpf: pods on tern's eBPF fast path and
    /// agents with eBPF host routing between nodes.
    #[arg(long, default_value = "kernel")]
    dataplane: tern_routing::Dataplane,
    /// Dual stack: pods also get an IPv6 address (fd00:10:244::/56), carried between nodes over VXLAN
    /// (needs --routing vxlan: the underlay is IPv4).
    #[arg(long)]
    ipv6: bool,
}

#[derive(clap::Args)]
pub struct JsonArg {
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct ExecArgs {
    /// A node (n1), a pod (n1-p1), `external` or `fabric`.
    target: String,
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

#[derive(clap::Subcommand)]
pub enum NodeCommand {
    /// Add the next node, with pods.
    Add {
        #[arg(long, default_value_t = 1)]
        pods: u8,
    },
    /// Remove a node: DEL its pods, withdraw it from the cluster, delete its namespace.
    Remove { node: String },
}

struct Bar {
    live: bool,
    started: Instant,
}

impl tern_lab::Progress for Bar {
    fn step(&mut self, done: usize, total: usize, what: &str) {
        let width = 24;
        let filled = (done * width).checked_div(total).unwrap_or(width).min(width);
        let line = format!(
            "[{}{}] {done}/{total} {:>4.1}s {what}",
            "#".repeat(filled),
            "-".repeat(width - filled),
            self.started.elapsed().as_secs_f64()
        );
        if self.live {
            eprint!("\r\x1b[K{line}");
            if done == total {
                eprintln!();
            }
        } else if done == total || done == 0 {
            eprintln!("{line}");
        }
    }
}

fn loaded(lab: &Lab) -> Result<LabState> {
    LabState::load(lab)?.with_context(|| format!("no lab {} is up (tern lab up)", lab.name))
}

fn print_status(st: &LabState, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(st)?);
        return Ok(());
    }
    println!(
        "lab: {} nodes, {} subnets, routing {}, dataplane {}{}, etcd {}",
        st.nodes.len(),
        st.spec.subnets,
        st.spec.routing,
        st.spec.dataplane,
        if st.spec.ipv6 { ", dual stack" } else { "" },
        match st.etcd {
            Some(e) if e.alive() => format!("up (pid {})", e.pid),
            _ => "DOWN".into(),
        }
    );
    println!("{:<6} {:<16} {:<8} {:<16}", "node", "underlay", "subnet", "agent");
    for n in &st.nodes {
        let agent = match n.agent {
            Some(a) if a.alive() => format!("up (pid {})", a.pid),
            _ => "DOWN".into(),
        };
        println!("{:<6} {:<16} {:<8} {:<16}", n.name, n.ip, n.subnet, agent);
    }
    println!("{:<8} {:<6} {:<18}", "pod", "node", "addresses");
    for p in &st.pods {
        let ips: Vec<String> = p.ips.iter().map(|i| i.to_string()).collect();
        println!("{:<8} {:<6} {:<18}", p.name, p.node, ips.join(", "));
    }
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    let lab = Lab::new(&args.name).map_err(anyhow::Error::msg)?;
    match args.command {
        Command::Up(a) => {
            let spec = LabSpec {
                nodes: a.nodes,
                subnets: a.subnets,
                pods_per_node: a.pods_per_node,
                routing: a.routing,
                dataplane: a.dataplane,
                ipv6: a.ipv6,
            };
            let tern = std::env::current_exe().context("locating the tern executable")?;
            let mut bar = Bar { live: std::io::stderr().is_terminal(), started: Instant::now() };
            let st = tern_lab::up(&lab, spec, &tern, &mut bar)?;
            print_status(&st, false)
        }
        Command::Status(a) => print_status(&loaded(&lab)?, a.json),
        Command::Exec(a) => {
            let status = tern_lab::exec(&lab, &a.target, &a.argv)?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Command::Test(a) => {
            let st = loaded(&lab)?;
            let report = tern_lab::matrix::run(&st)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            if report.failed > 0 {
                bail!("{} of {} paths failed", report.failed, report.failed + report.passed);
            }
            Ok(())
        }
        Command::Node(NodeCommand::Add { pods }) => print_status(&tern_lab::add_node(&lab, pods)?, false),
        Command::Node(NodeCommand::Remove { node }) => print_status(&tern_lab::remove_node(&lab, &node)?, false),
        Command::RestartAgents { nodes } => {
            let mut st = loaded(&lab)?;
            let names: Vec<String> =
                if nodes.is_empty() { st.nodes.iter().map(|n| n.name.clone()).collect() } else { nodes };
            for n in &names {
                tern_lab::stop_agent(&mut st, n)?;
                tern_lab::start_agent(&mut st, n)?;
            }
            print_status(&st, false)
        }
        Command::Down => {
            let removed = tern_lab::down(&lab)?;
            if removed.is_empty() {
                println!("no lab to remove");
            } else {
                println!("removed: {}", removed.join(", "));
            }
            Ok(())
        }
    }
}
