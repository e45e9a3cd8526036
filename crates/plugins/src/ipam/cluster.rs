//! `"allocator": "cluster"`: addresses from the node agent (`tern agent`),
//! which allocates them from the node's blocks of the cluster pools.
//!
//! ```json
//! "ipam": {"type": "tern-ipam", "allocator": "cluster",
//!          "agentSocket": "/run/tern/agent.sock",
//!          "pools": ["10.244.0.0/16", "fd00:244::/56"],
//!          "routes": [{"dst": "0.0.0.0/0"}]}
//! ```
//!
//! * `agentSocket` (default `/run/tern/agent.sock`): the agent's unix socket;
//!   the protocol is `tern_agent::proto` (line-delimited JSON), spoken here
//!   with plain serde_json so the plugin needs nothing of the agent's crate.
//! * `pools` (optional): which of the agent's pools to take one address
//!   from each; absent means every pool the agent serves.
//! * `routes` (optional): copied into the result, as host-local does.
//!
//! The handle of an attachment is `<network>/<containerID>/<ifname>`. ADD
//! also sends the attachment's description for the agent's endpoint record:
//! `CNI_CONTAINERID`, `CNI_IFNAME`, `CNI_NETNS`, and `K8S_POD_NAMESPACE` /
//! `K8S_POD_NAME` from `CNI_ARGS` when the runtime passes them (the
//! `endpoint` of `tern_agent::proto`'s allocate request).
//!
//! Each address is returned with its **pool's** prefix (`10.244.7.3/16`) and
//! no gateway. The node's block (/26 by default) is a routing detail of the
//! cluster (other nodes route the block to this node); inside the pod the
//! address belongs to the cluster network, which is what `tern`'s routed
//! mode wants (it routes the pod's /32 on the host side and gives the pod a
//! default route via a link-local gateway). Bridge-mode networks, which need
//! a gateway on a shared subnet, use host-local.
//!
//! Errors: agent socket missing, refused or silent past the timeout -> code
//! 11 ("tern agent at <path> is not reachable"); the agent's datastore down
//! -> code 11 with the agent's message naming the store; pool exhausted or
//! the node's block limit reached -> 999 with the agent's message. DEL of a
//! handle the agent does not know succeeds (logged to stderr); DEL with the
//! agent down is code 11, so the runtime retries and nothing leaks. STATUS:
//! agent down or its datastore unreachable -> 50.
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use ipnet::IpNet;
use serde_json::{json, Value};
use tern_cni::{CniError, CniResult, Code, IpConfig, Route};

use crate::skel::Request;

pub const DEFAULT_AGENT_SOCKET: &str = "/run/tern/agent.sock";
/// How long one request to the agent may take.
const TIMEOUT: Duration = Duration::from_secs(2);

pub struct ClusterConfig {
    pub socket: String,
    pub pools: Vec<IpNet>,
    pub routes: Vec<Route>,
}

impl ClusterConfig {
    pub fn from_request(req: &Request) -> Result<ClusterConfig, CniError> {
        let ipam = req.conf.ipam.as_ref().ok_or_else(|| CniError::invalid_config("IPAM config missing 'ipam' key"))?;
        let socket = match ipam.get("agentSocket") {
            None | Some(Value::Null) => DEFAULT_AGENT_SOCKET.to_string(),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(other) => {
                return Err(CniError::invalid_config(format!("ipam.agentSocket: expected a path, got {other}")))
            }
        };
        let pools = match ipam.get("pools") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => serde_json::from_value::<Vec<IpNet>>(v.clone())
                .map_err(|e| CniError::invalid_config(format!("ipam.pools: expected a list of CIDRs: {e}")))?,
        };
        let routes = match ipam.get("routes") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => serde_json::from_value::<Vec<Route>>(v.clone())
                .map_err(|e| CniError::invalid_config(format!("ipam.routes: {e}")))?,
        };
        Ok(ClusterConfig { socket, pools, routes })
    }

    fn unreachable(&self, why: impl std::fmt::Display) -> CniError {
        CniError::new(Code::TryAgainLater, format!("tern agent at {} is not reachable: {why}", self.socket))
    }

    /// Sends one request and reads the answer; agent errors become CNI errors.
    fn call(&self, request: Value) -> Result<Value, CniError> {
        let stream = UnixStream::connect(&self.socket).map_err(|e| self.unreachable(e))?;
        let _ = stream.set_read_timeout(Some(TIMEOUT));
        let _ = stream.set_write_timeout(Some(TIMEOUT));
        let mut line = request.to_string();
        line.push('\n');
        (&stream).write_all(line.as_bytes()).map_err(|e| self.unreachable(e))?;
        let mut answer = String::new();
        BufReader::new(&stream).read_line(&mut answer).map_err(|e| self.unreachable(e))?;
        if answer.is_empty() {
            return Err(self.unreachable("it closed the connection without answering"));
        }
        let v: Value = serde_json::from_str(&answer)
            .map_err(|e| CniError::internal(format!("tern agent at {}: bad answer: {e}", self.socket)))?;
        if v["ok"] == Value::Bool(true) {
            return Ok(v);
        }
        let kind = v["error"]["kind"].as_str().unwrap_or("internal");
        let msg = v["error"]["message"].as_str().unwrap_or("unknown error").to_string();
        Err(match kind {
            "unavailable" => CniError::new(Code::TryAgainLater, msg),
            "invalid" => CniError::invalid_config(msg),
            _ => CniError::internal(msg),
        })
    }
}

pub fn handle_of(req: &Request) -> String {
    format!("{}/{}/{}", req.conf.name, req.env.container_id(), req.env.ifname())
}

fn ips_of(answer: &Value) -> Result<Vec<IpConfig>, CniError> {
    let bad = |what: &str| CniError::internal(format!("tern agent: bad address in answer: {what}"));
    let mut out = Vec::new();
    for a in answer["addresses"].as_array().map(|v| v.as_slice()).unwrap_or_default() {
        let ip: IpAddr = a["address"].as_str().and_then(|s| s.parse().ok()).ok_or_else(|| bad("address"))?;
        let pool: IpNet = a["pool"].as_str().and_then(|s| s.parse().ok()).ok_or_else(|| bad("pool"))?;
        let address = IpNet::new(ip, pool.prefix_len()).map_err(|_| bad("prefix"))?;
        out.push(IpConfig { address, gateway: None, interface: None });
    }
    Ok(out)
}

/// The `endpoint` of an allocate request (absent values left out).
pub fn endpoint_of(req: &Request) -> Value {
    let mut e = json!({"containerId": req.env.container_id(), "ifname": req.env.ifname()});
    let optional = [
        ("netns", req.env.netns.as_deref()),
        ("podNamespace", req.env.args.get("K8S_POD_NAMESPACE")),
        ("podName", req.env.args.get("K8S_POD_NAME")),
    ];
    for (key, value) in optional {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            e[key] = Value::String(v.to_string());
        }
    }
    e
}

pub fn add(req: &Request) -> Result<CniResult, CniError> {
    let cfg = ClusterConfig::from_request(req)?;
    let answer = cfg.call(json!({
        "op": "allocate", "handle": handle_of(req), "pools": cfg.pools, "endpoint": endpoint_of(req),
    }))?;
    let ips = ips_of(&answer)?;
    if ips.is_empty() {
        return Err(CniError::internal(format!("tern agent at {} allocated no address", cfg.socket)));
    }
    Ok(CniResult { interfaces: Vec::new(), ips, routes: cfg.routes, dns: Default::default() })
}

/// Frees the attachment's addresses; the ones freed.
pub fn release(req: &Request) -> Result<Vec<IpAddr>, CniError> {
    let cfg = ClusterConfig::from_request(req)?;
    let handle = handle_of(req);
    let answer = cfg.call(json!({"op": "release", "handle": handle}))?;
    if answer["known"] == Value::Bool(false) {
        eprintln!("tern-ipam: the tern agent holds no addresses for {handle}: nothing to release");
    }
    Ok(ips_of(&answer)?.into_iter().map(|c| c.address.addr()).collect())
}

pub fn check(req: &Request, prev: &CniResult) -> Result<(), CniError> {
    let cfg = ClusterConfig::from_request(req)?;
    let handle = handle_of(req);
    let answer = cfg.call(json!({"op": "get", "handle": handle}))?;
    let held: Vec<IpAddr> = ips_of(&answer)?.into_iter().map(|c| c.address.addr()).collect();
    if held.is_empty() {
        return Err(CniError::internal(format!("tern agent holds no addresses for {handle}")));
    }
    for ip in &held {
        if !prev.ips.iter().any(|p| p.address.addr() == *ip) {
            return Err(CniError::internal(format!("address {ip} of {handle} is missing from prevResult")));
        }
    }
    for p in &prev.ips {
        if !held.contains(&p.address.addr()) {
            return Err(CniError::internal(format!(
                "prevResult address {} is not held by {handle} (the agent has {})",
                p.address,
                held.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    Ok(())
}

pub fn status(req: &Request) -> Result<(), CniError> {
    let cfg = ClusterConfig::from_request(req)?;
    let answer = cfg.call(json!({"op": "status"})).map_err(|e| CniError::new(Code::NotAvailable, e.msg))?;
    if answer["status"]["storeReachable"] != Value::Bool(true) {
        let why = answer["status"]["storeError"].as_str().unwrap_or("datastore unreachable");
        return Err(CniError::new(Code::NotAvailable, format!("tern agent at {}: {why}", cfg.socket)));
    }
    Ok(())
}
