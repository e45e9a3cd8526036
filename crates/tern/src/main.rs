//! The `tern` executable. Started under a plugin's name (`tern`, `tern-ipam`,
//! ...) with CNI_COMMAND set, it is that CNI plugin; otherwise it is the
//! command-line tool. This file only dispatches.
use std::path::Path;

mod cmd;

fn main() {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let invoked_as = Path::new(&argv0).file_name().and_then(|n| n.to_str()).unwrap_or("tern").to_string();
    let cni_command = std::env::var("CNI_COMMAND").map(|c| !c.is_empty()).unwrap_or(false);

    if let Some(plugin) = tern_plugins::plugin_by_name(&invoked_as) {
        // `tern` without CNI_COMMAND is the CLI; other plugin names print
        // their "about" text as the reference plugins do.
        if cni_command || invoked_as != "tern" {
            std::process::exit(tern_plugins::skel::main(plugin));
        }
    }
    std::process::exit(cmd::run());
}
