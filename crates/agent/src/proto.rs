//! The agent's local API: line-delimited JSON over a unix socket.
//!
//! One request per line, one response line per request, in order, on a
//! connection that stays open as long as the client wants:
//!
//! ```text
//! {"op":"allocate","handle":"<net>/<cid>/<ifname>","pools":["10.244.0.0/16"],
//!  "endpoint":{"containerId":"<cid>","ifname":"eth0","netns":"/run/netns/x","podNamespace":"default","podName":"web-0"}}
//!     -> {"ok":true,"addresses":[{"address":"10.244.7.3","pool":"10.244.0.0/16","block":"10.244.7.0/26"}]}
//! {"op":"release","handle":"<net>/<cid>/<ifname>"}
//!     -> {"ok":true,"known":true,"addresses":[...]}    (known:false: the agent had no such handle)
//! {"op":"get","handle":"<net>/<cid>/<ifname>"}
//!     -> {"ok":true,"known":true,"addresses":[...]}
//! {"op":"status"}
//!     -> {"ok":true,"status":{"node":"n1","store":"etcd http://...","storeReachable":true,...,
//!         "warmFree":3,"warmIPTarget":3,"minimumIPTarget":0,"pendingOps":0,"borrowed":0}}
//! any failure
//!     -> {"ok":false,"error":{"kind":"unavailable","message":"datastore etcd ... unavailable: ..."}}
//! ```
//!
//! `pools` selects among the agent's configured pools (by CIDR); empty or
//! absent means every pool (one address per pool, e.g. one IPv4 and one
//! IPv6). `allocate` is idempotent: a handle that already holds addresses
//! gets the same addresses back (a runtime retrying an ADD). `endpoint`
//! (optional) describes the attachment for its endpoint record
//! ([`crate::endpoints`]), written after the allocation and deleted on release.
//!
//! Error kinds: `unavailable` (the datastore cannot be reached: retry later,
//! CNI code 11), `exhausted` (no free block left in the pool, or the node's
//! block limit is reached), `invalid` (bad request), `internal`.
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    Allocate {
        handle: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pools: Vec<IpNet>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<crate::endpoints::EndpointInfo>,
    },
    Release {
        handle: String,
    },
    Get {
        handle: String,
    },
    Status,
}

/// One allocated address and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub address: IpAddr,
    /// The pool's CIDR (its prefix is the one a plugin puts on the address).
    pub pool: IpNet,
    /// The node's block holding the address.
    pub block: IpNet,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ErrorKind {
    Unavailable,
    Exhausted,
    Invalid,
    Internal,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BlockStatus {
    pub cidr: IpNet,
    pub used: u32,
    pub size: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub node: String,
    pub store: String,
    pub store_reachable: bool,
    /// Why the store is unreachable, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_error: Option<String>,
    pub pools: Vec<IpNet>,
    pub blocks: Vec<BlockStatus>,
    pub handles: usize,
    /// Warm addresses ready for ADDs (all pools).
    #[serde(default)]
    pub warm_free: usize,
    /// The warm pool's targets (per pool).
    #[serde(default, rename = "warmIPTarget")]
    pub warm_ip_target: u32,
    #[serde(default, rename = "minimumIPTarget")]
    pub minimum_ip_target: u32,
    /// Journaled changes not yet written to the store.
    #[serde(default)]
    pub pending_ops: usize,
    /// Addresses held in other nodes' blocks.
    #[serde(default)]
    pub borrowed: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ApiError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<Address>>,
    /// release/get: whether the agent knew the handle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub known: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
}

impl Response {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
        Response { ok: false, error: Some(ApiError { kind, message: message.into() }), ..Default::default() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format() {
        let r: Request = serde_json::from_str(r#"{"op":"allocate","handle":"n/c/eth0"}"#).unwrap();
        assert_eq!(r, Request::Allocate { handle: "n/c/eth0".into(), pools: vec![], endpoint: None });
        let r: Request = serde_json::from_str(r#"{"op":"status"}"#).unwrap();
        assert_eq!(r, Request::Status);
        let e = Response::error(ErrorKind::Unavailable, "down");
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"ok":false,"error":{"kind":"unavailable","message":"down"}}"#
        );
    }
}
