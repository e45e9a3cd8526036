//! The command-line tool: one module per subcommand.
use clap::{Parser, Subcommand};

mod agent;
mod bench;
mod cni;
mod install;
mod ipam;
mod lab;
mod status;

#[derive(Parser)]
#[command(name = "tern", version, about = "tern: a Kubernetes network stack (CNI plugins, and the tools around them)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Copy this executable into a CNI bin directory and link every plugin name to it.
    Install(install::Args),
    /// Print the plugin names and the CNI versions they support.
    Plugins,
    /// Run CNI networks like a container runtime does (libcni/cnitool equivalent).
    #[command(subcommand)]
    Cni(cni::Command),
    /// Measure tern against native veth and the reference plugins (`bench cni`, `bench datapath`), in throwaway namespaces.
    Bench(bench::Args),
    /// Run the node agent (node lease, cluster IPAM for tern-ipam's "cluster" allocator) until SIGTERM.
    Agent(agent::Args),
    /// The node's view from its agent: agent health, datastore reachability, blocks, pods.
    Status(status::Args),
    /// Cluster IPAM in the datastore: `ipam show` (blocks per node, leak candidates), `ipam gc`.
    #[command(subcommand)]
    Ipam(ipam::Command),
    /// A virtual cluster on this machine: `lab up`, `lab test` (connectivity matrix), `lab exec`, `lab down`.
    Lab(lab::Args),
}

pub fn run() -> i32 {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Install(args) => install::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Status(args) => status::run(args),
        Command::Ipam(cmd) => ipam::run(cmd),
        Command::Lab(cmd) => lab::run(cmd),
        Command::Cni(cmd) => cni::run(cmd),
        Command::Plugins => {
            for name in tern_plugins::PLUGIN_NAMES {
                let p = tern_plugins::plugin_by_name(name).expect("listed plugin exists");
                let versions: Vec<&str> = p.supported_versions().iter().map(|v| v.as_str()).collect();
                println!("{name}\t{}", versions.join(","));
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("tern: {e:#}");
            1
        }
    }
}
