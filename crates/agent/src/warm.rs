//! The warm pool's settings and the reconciler thread.
//!
//! Semantics as AWS VPC CNI names them, per pool (an IPv4 and an IPv6 pool
//! each keep their own):
//! * `warmIPTarget`: free addresses kept ready beyond those pods use;
//! * `minimumIPTarget`: addresses (used + free) the node keeps at least.
//!
//! The pool keeps `max(warmIPTarget, minimumIPTarget - used)` free
//! addresses, reserved in the node's own blocks under
//! `@warm/<node>/<address>` ([`WARM_HANDLE_PREFIX`]: CNI network names start
//! with `[a-zA-Z0-9]`, so no pod handle can look like one). Surplus warm
//! addresses (after releases, or lowered targets) are given back. Warm
//! addresses never borrow from other nodes' blocks.
//!
//! The reconciler ([`spawn`]) runs [`NodeIpam::reconcile`] when an ADD or
//! DEL asks for it and otherwise every few seconds; while the store is down
//! it checks twice a second whether it is back, and after a failed round it
//! retries every second.
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde::Deserialize;

use crate::ipam::NodeIpam;

/// Handles of warm addresses start with this (`@warm/<node>/<address>`);
/// the leak collector leaves them alone on live nodes.
pub const WARM_HANDLE_PREFIX: &str = "@warm/";

/// The node's warm pool targets; both 0 (the default): no warm pool, every
/// ADD is a synchronous write to the store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WarmConfig {
    /// Free addresses kept ready beyond those in use.
    #[serde(default, rename = "warmIPTarget")]
    pub warm_ip_target: u32,
    /// Addresses (used + free) the node keeps at least.
    #[serde(default, rename = "minimumIPTarget")]
    pub minimum_ip_target: u32,
}

impl WarmConfig {
    /// Free addresses wanted in a pool where pods use `used`.
    pub fn free_wanted(&self, used: u32) -> u32 {
        self.warm_ip_target.max(self.minimum_ip_target.saturating_sub(used))
    }

    pub fn enabled(&self) -> bool {
        self.warm_ip_target > 0 || self.minimum_ip_target > 0
    }
}

/// Idle wait between rounds.
const IDLE: Duration = Duration::from_secs(5);
/// Wait after a round that left work (store down, pending ops, pool short).
const RETRY: Duration = Duration::from_millis(500);

/// Starts the reconciler; it ends after [`NodeIpam::stop_background`].
pub fn spawn(ipam: Arc<NodeIpam>) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("tern-agent-warm".into())
        .spawn(move || run(&ipam))
        .expect("spawn reconciler thread")
}

fn run(ipam: &NodeIpam) {
    let mut wait = Duration::ZERO; // a first round at once: replay the journal
    let mut last_error: Option<String> = None;
    while ipam.wait_kick(wait) {
        match ipam.reconcile() {
            Ok(settled) => {
                last_error = None;
                wait = if settled { IDLE } else { RETRY };
            }
            Err(e) => {
                if last_error.as_deref() != Some(&e.message) {
                    eprintln!(
                        "tern agent: node {}: reconciling IPAM failed ({} pending): {e}",
                        ipam.node(),
                        ipam.pending()
                    );
                }
                last_error = Some(e.message);
                wait = RETRY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let c: WarmConfig = serde_json::from_str(r#"{"warmIPTarget":3,"minimumIPTarget":10}"#).unwrap();
        assert_eq!(c, WarmConfig { warm_ip_target: 3, minimum_ip_target: 10 });
        assert_eq!(c.free_wanted(0), 10);
        assert_eq!(c.free_wanted(8), 3);
        assert_eq!(c.free_wanted(20), 3);
        assert!(!WarmConfig::default().enabled());
        let e = serde_json::from_str::<WarmConfig>(r#"{"warmIpTarget":3}"#).unwrap_err().to_string();
        assert!(e.contains("warmIpTarget"), "{e}");
    }
}
