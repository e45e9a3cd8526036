//! tern-ipam: host-local compatible and static address management.
use tern_cni::{CniError, CniResult};

use crate::skel::{Plugin, Request};

pub struct IpamPlugin;

impl Plugin for IpamPlugin {
    fn name(&self) -> &'static str {
        "tern-ipam"
    }
    fn add(&self, _req: &Request) -> Result<CniResult, CniError> {
        Err(CniError::internal("not implemented"))
    }
    fn del(&self, _req: &Request) -> Result<(), CniError> {
        Err(CniError::internal("not implemented"))
    }
    fn check(&self, _req: &Request) -> Result<(), CniError> {
        Err(CniError::internal("not implemented"))
    }
    fn status(&self, _req: &Request) -> Result<(), CniError> {
        Err(CniError::internal("not implemented"))
    }
    fn gc(&self, _req: &Request) -> Result<(), CniError> {
        Err(CniError::internal("not implemented"))
    }
}
