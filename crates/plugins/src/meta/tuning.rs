//! tern-tuning: a chained plugin (work in progress).
use tern_cni::{CniError, CniResult};

use crate::skel::{Plugin, Request};

pub struct TuningPlugin;

impl Plugin for TuningPlugin {
    fn name(&self) -> &'static str {
        "tern-tuning"
    }
    fn add(&self, _req: &Request) -> Result<CniResult, CniError> {
        Err(CniError::internal("tern-tuning: not implemented"))
    }
    fn del(&self, _req: &Request) -> Result<(), CniError> {
        Err(CniError::internal("tern-tuning: not implemented"))
    }
    fn check(&self, _req: &Request) -> Result<(), CniError> {
        Err(CniError::internal("tern-tuning: not implemented"))
    }
    fn status(&self, _req: &Request) -> Result<(), CniError> {
        Ok(())
    }
    fn gc(&self, _req: &Request) -> Result<(), CniError> {
        Err(CniError::internal("tern-tuning: not implemented"))
    }
}
