//! What a running lab is made of, saved in `/run/tern/lab/state.json`
//! after every step, so `tern lab down` (or the next `tern lab up` after a
//! crash) can remove exactly what the lab made, and end exactly the
//! processes it started.
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::proc::ProcRef;
use crate::spec::{Lab, LabSpec};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeState {
    pub index: u8,
    pub name: String,
    pub netns: String,
    pub subnet: u8,
    pub ip: Ipv4Addr,
    #[serde(default)]
    pub agent: Option<ProcRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodState {
    pub name: String,
    pub node: String,
    pub netns: String,
    pub container_id: String,
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabState {
    pub lab: Lab,
    pub spec: LabSpec,
    /// The tern executable the lab runs (agents, `tern cni`).
    pub tern: PathBuf,
    #[serde(default)]
    pub etcd: Option<ProcRef>,
    #[serde(default)]
    pub nodes: Vec<NodeState>,
    #[serde(default)]
    pub pods: Vec<PodState>,
}

pub fn state_path(lab: &Lab) -> PathBuf {
    lab.run_dir().join("state.json")
}

pub fn node_dir(lab: &Lab, node: &str) -> PathBuf {
    lab.run_dir().join("nodes").join(node)
}

pub fn agent_socket(lab: &Lab, node: &str) -> PathBuf {
    node_dir(lab, node).join("agent.sock")
}

impl LabState {
    /// The saved state, `None` when no lab is recorded.
    pub fn load(lab: &Lab) -> Result<Option<LabState>> {
        let path = state_path(lab);
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| format!("parsing {}", path.display()))?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the state atomically (temp file + rename).
    pub fn save(&self) -> Result<()> {
        let path = state_path(&self.lab);
        write_atomic(&path, &serde_json::to_vec_pretty(self).expect("state serialises"))
    }

    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name || n.netns == name)
    }

    pub fn pod(&self, name: &str) -> Option<&PodState> {
        self.pods.iter().find(|p| p.name == name || p.netns == name)
    }
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}
