//! `tern cni`: drive CNI networks the way a container runtime does.
use anyhow::{bail, Result};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Placeholder until the runner lands.
    Version,
}

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Version => bail!("tern cni: not implemented yet"),
    }
}
