//! tern's CNI plugins.
//!
//! `skel` turns the process environment and stdin into a [`Request`] and a
//! plugin's answer into the spec's stdout and exit code; each plugin only
//! implements [`Plugin`]. `delegate` runs another plugin (IPAM) found on
//! CNI_PATH, or tern-ipam in-process.
pub mod delegate;
pub mod fault;
pub mod ipam;
pub mod meta;
pub mod names;
pub mod pod;
pub mod skel;

pub use skel::{Plugin, Request};

/// Every plugin type the `tern` executable answers to, by file name.
pub fn plugin_by_name(name: &str) -> Option<&'static dyn Plugin> {
    match name {
        "tern" => Some(&pod::PodPlugin),
        "tern-ipam" => Some(&ipam::IpamPlugin),
        "tern-portmap" => Some(&meta::portmap::PortmapPlugin),
        "tern-bandwidth" => Some(&meta::bandwidth::BandwidthPlugin),
        "tern-firewall" => Some(&meta::firewall::FirewallPlugin),
        "tern-tuning" => Some(&meta::tuning::TuningPlugin),
        _ => None,
    }
}

pub const PLUGIN_NAMES: &[&str] =
    &["tern", "tern-ipam", "tern-portmap", "tern-bandwidth", "tern-firewall", "tern-tuning"];
