//! `tern install`: one binary on disk, one link per plugin type.
use std::fs;
use std::os::unix::fs::symlink;
use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args)]
pub struct Args {
    /// Where container runtimes look for CNI plugins.
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let dir = &args.cni_bin_dir;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let me = std::env::current_exe().context("locating the running executable")?;
    let target = dir.join("tern");
    // Copy to a temporary name and rename, so a runtime never executes a
    // half-written binary and a running plugin keeps its old inode.
    let tmp = dir.join(".tern.install");
    if me.canonicalize().ok() != target.canonicalize().ok() {
        fs::copy(&me, &tmp).with_context(|| format!("copying {} to {}", me.display(), tmp.display()))?;
        fs::rename(&tmp, &target).with_context(|| format!("installing {}", target.display()))?;
    }
    for name in tern_plugins::PLUGIN_NAMES.iter().filter(|n| **n != "tern") {
        let link = dir.join(name);
        let _ = fs::remove_file(&link);
        symlink("tern", &link).with_context(|| format!("linking {}", link.display()))?;
    }
    println!("installed tern and {} into {}", tern_plugins::PLUGIN_NAMES[1..].join(", "), dir.display());
    Ok(())
}
