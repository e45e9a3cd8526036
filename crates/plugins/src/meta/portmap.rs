//! tern-portmap: a chained plugin (work in progress).
use tern_cni::{CniError, CniResult};

use crate::skel::{Plugin, Request};

pub struct PortmapPlugin;

impl Plugin for PortmapPlugin {
    fn name(&self) -> &'static str {
        "tern-portmap"
    }
    fn add(&self, _req: &Request) -> Result<CniResult, CniError> {
        Err(CniError::internal("tern-portmap: not implemented"))
    }
    fn del(&self, _req: &Request) -> Result<(), CniError> {
        Err(CniError::internal("tern-portmap: not implemented"))
    }
    fn check(&self, _req: &Request) -> Result<(), CniError> {
        Err(CniError::internal("tern-portmap: not implemented"))
    }
    fn status(&self, _req: &Request) -> Result<(), CniError> {
        Ok(())
    }
    fn gc(&self, _req: &Request) -> Result<(), CniError> {
        Err(CniError::internal("tern-portmap: not implemented"))
    }
}
