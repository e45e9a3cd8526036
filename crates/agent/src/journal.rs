//! The node-local journal: IPAM changes the agent has answered but not yet
//! written to the datastore.
//!
//! Two kinds of operation wait here ([`Op`]): a warm address handed to a pod
//! (the store still names the warm handle) and a release answered while the
//! store was unreachable (the store still names the pod's handle). The
//! reconciler ([`crate::warm`]) applies them in order and drops each once its
//! compare-and-swap has landed. Applying is idempotent (an op checks what
//! the block says before changing it), so an op replayed after a crash
//! between its write and its removal changes nothing twice.
//!
//! The file is `<state dir>/ipam-<node>.journal`, JSON
//! (`{"version":1,"node":"n1","ops":[...]}`), rewritten whole on every change:
//! a temp file, fsync, rename, fsync of the directory. An answer is sent
//! only after its op is on disk, so a killed agent loses nothing it
//! promised. No file means no pending op; none is written while nothing is
//! pending and nothing ever was.
use std::fs::{self, File};
use std::io::{self, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

const VERSION: u32 = 1;

/// One address of an op: the block holding it (the node's own, or another
/// node's for a borrowed address) and the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Held {
    pub block: IpNet,
    pub address: IpAddr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Op {
    /// `address`, reserved in the store under the warm handle `warm`, now
    /// belongs to `handle`.
    Assign { handle: String, warm: String, block: IpNet, address: IpAddr },
    /// `handle` let go of `addresses`; each is freed if the store still
    /// names `handle` for it.
    Release { handle: String, addresses: Vec<Held> },
}

impl Op {
    pub fn addresses(&self) -> Vec<Held> {
        match self {
            Op::Assign { block, address, .. } => vec![Held { block: *block, address: *address }],
            Op::Release { addresses, .. } => addresses.clone(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct JournalFile {
    version: u32,
    node: String,
    ops: Vec<Op>,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {err}")]
    Io { path: PathBuf, err: io::Error },
    #[error("journal {path}: {detail}")]
    Bad { path: PathBuf, detail: String },
}

/// The pending ops, in memory and (with a directory) on disk.
#[derive(Debug)]
pub struct Journal {
    /// `None`: memory only (a NodeIpam without a state directory).
    path: Option<PathBuf>,
    node: String,
    ops: Vec<Op>,
}

impl Journal {
    /// A journal that is never written to disk.
    pub fn in_memory(node: &str) -> Journal {
        Journal { path: None, node: node.to_string(), ops: Vec::new() }
    }

    /// Reads `<dir>/ipam-<node>.journal` (absent: empty). The directory is
    /// created on the first write, not here.
    pub fn open(dir: &Path, node: &str) -> Result<Journal, JournalError> {
        let path = dir.join(format!("ipam-{node}.journal"));
        let ops = match fs::read(&path) {
            Ok(bytes) => {
                let f: JournalFile = serde_json::from_slice(&bytes)
                    .map_err(|e| JournalError::Bad { path: path.clone(), detail: e.to_string() })?;
                if f.version != VERSION {
                    return Err(JournalError::Bad {
                        path,
                        detail: format!("version {} (this agent reads version {VERSION})", f.version),
                    });
                }
                if f.node != node {
                    return Err(JournalError::Bad {
                        path,
                        detail: format!("belongs to node {:?}, not {node:?}", f.node),
                    });
                }
                f.ops
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(err) => return Err(JournalError::Io { path, err }),
        };
        Ok(Journal { path: Some(path), node: node.to_string(), ops })
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn ops(&self) -> &[Op] {
        &self.ops
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether a pending op concerns `address`.
    pub fn mentions(&self, address: IpAddr) -> bool {
        self.ops.iter().any(|op| op.addresses().iter().any(|h| h.address == address))
    }

    /// Appends `ops` durably; on a write error nothing is appended.
    pub fn push(&mut self, ops: Vec<Op>) -> Result<(), JournalError> {
        let before = self.ops.len();
        self.ops.extend(ops);
        if let Err(e) = self.persist() {
            self.ops.truncate(before);
            return Err(e);
        }
        Ok(())
    }

    /// Drops the first op if it is still `op` (it was applied). A failed
    /// write only means the op is applied again after a restart, which
    /// changes nothing.
    pub fn complete(&mut self, op: &Op) -> Result<(), JournalError> {
        if self.ops.first() == Some(op) {
            self.ops.remove(0);
            return self.persist();
        }
        Ok(())
    }

    fn persist(&self) -> Result<(), JournalError> {
        let Some(path) = &self.path else { return Ok(()) };
        let io_err = |err| JournalError::Io { path: path.clone(), err };
        let dir = path.parent().expect("journal path has a directory");
        fs::create_dir_all(dir).map_err(io_err)?;
        let file = JournalFile { version: VERSION, node: self.node.clone(), ops: self.ops.clone() };
        let bytes = serde_json::to_vec(&file).expect("journal serialises");
        let tmp = path.with_extension("journal.tmp");
        {
            let mut f = File::create(&tmp).map_err(io_err)?;
            f.write_all(&bytes).map_err(io_err)?;
            f.sync_all().map_err(io_err)?;
        }
        fs::rename(&tmp, path).map_err(io_err)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(io_err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_testkit::TempDir;

    #[test]
    fn survives_reopen_and_refuses_foreign_or_bad_files() {
        let dir = TempDir::new();
        let state = dir.join("state");
        let mut j = Journal::open(&state, "n1").unwrap();
        assert!(j.is_empty());
        assert!(!state.exists(), "nothing written while nothing is pending");
        let held = Held { block: "10.0.0.0/26".parse().unwrap(), address: "10.0.0.3".parse().unwrap() };
        let assign = Op::Assign {
            handle: "net/c1/eth0".into(),
            warm: "@warm/n1/10.0.0.3".into(),
            block: held.block,
            address: held.address,
        };
        let release = Op::Release { handle: "net/c0/eth0".into(), addresses: vec![held] };
        j.push(vec![assign.clone(), release.clone()]).unwrap();
        let again = Journal::open(&state, "n1").unwrap();
        assert_eq!(again.ops(), [assign.clone(), release.clone()]);
        assert!(again.mentions(held.address));
        // Only the first op completes.
        j.complete(&release).unwrap();
        assert_eq!(j.len(), 2);
        j.complete(&assign).unwrap();
        assert_eq!(Journal::open(&state, "n1").unwrap().ops(), [release]);

        // A journal copied from another node is refused.
        std::fs::copy(state.join("ipam-n1.journal"), state.join("ipam-n2.journal")).unwrap();
        let e = Journal::open(&state, "n2").unwrap_err().to_string();
        assert!(e.contains("belongs to node \"n1\""), "{e}");
        std::fs::write(state.join("ipam-n3.journal"), b"{oops").unwrap();
        let e = Journal::open(&state, "n3").unwrap_err().to_string();
        assert!(e.contains("ipam-n3.journal"), "{e}");
    }
}
