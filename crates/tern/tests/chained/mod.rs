//! Helpers for the tests of the chained plugins (tern-portmap,
//! tern-firewall): a node with every plugin, a "client" namespace wired to
//! the node by a veth, traffic through a host port (listen on one address,
//! connect to another), and nftables element listings.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tern_testkit::*;

use crate::common::Node;

pub const PLUGINS: &[&str] = &["tern", "tern-ipam", "tern-portmap", "tern-firewall"];

/// A [`Node`] whose plugin directory has the chained plugins too.
pub fn chain_node() -> Node {
    Node {
        ns: Netns::new("tcnode"),
        plugins: Plugins::with_names(Path::new(env!("CARGO_BIN_EXE_tern")), PLUGINS),
        data: TempDir::new(),
        network: unique("tcnet"),
        bridge: unique_short("tcbr"),
    }
}

/// A namespace standing for another host, on a veth to the node:
/// 192.168.<k>.2/24 and fd77:<k>::2/64, the node side .1 / ::1, which is
/// also the client's default gateway (so pods can reach it).
pub struct Client {
    pub ns: Netns,
    pub ip4: IpAddr,
    pub ip6: IpAddr,
    pub node_ip4: IpAddr,
    pub node_ip6: IpAddr,
    /// The node side of the veth.
    pub node_if: String,
}

pub fn connect_client(node: &Netns, k: u8) -> Client {
    let ns = Netns::new("tclient");
    ns.ok(&format!("ip link add cl0 type veth peer name up0 netns {}", node.name()));
    ns.ok(&format!(
        "ip addr add 192.168.{k}.2/24 dev cl0 && ip -6 addr add fd77:{k}::2/64 dev cl0 nodad && ip link set cl0 up \
         && ip route add default via 192.168.{k}.1 && ip -6 route add default via fd77:{k}::1"
    ));
    node.ok(&format!(
        "ip addr add 192.168.{k}.1/24 dev up0 && ip -6 addr add fd77:{k}::1/64 dev up0 nodad && ip link set up0 up"
    ));
    Client {
        ns,
        ip4: format!("192.168.{k}.2").parse().unwrap(),
        ip6: format!("fd77:{k}::2").parse().unwrap(),
        node_ip4: format!("192.168.{k}.1").parse().unwrap(),
        node_ip6: format!("fd77:{k}::1").parse().unwrap(),
        node_if: "up0".into(),
    }
}

/// The config of a chained plugin: `cniVersion` 1.1.0, the network's name,
/// `type`, then `extra`'s keys; `prevResult` when given.
pub fn meta_conf(network: &str, plugin: &str, extra: Value, prev: Option<&Value>) -> String {
    let mut c = json!({ "cniVersion": "1.1.0", "name": network, "type": plugin });
    for (k, v) in extra.as_object().expect("extra is an object") {
        c[k] = v.clone();
    }
    if let Some(p) = prev {
        c["prevResult"] = p.clone();
    }
    c.to_string()
}

/// `runtimeConfig.portMappings` for a config.
pub fn mappings(list: Value) -> Value {
    json!({ "capabilities": {"portMappings": true}, "runtimeConfig": { "portMappings": list } })
}

/// The config of a GC of `network` keeping `valid` (container ids, eth0).
pub fn gc_conf(network: &str, plugin: &str, valid: &[&str]) -> String {
    let att: Vec<Value> = valid.iter().map(|c| json!({"containerID": c, "ifname": "eth0"})).collect();
    meta_conf(network, plugin, json!({ "cni.dev/valid-attachments": att }), None)
}

/// Runs a chained plugin in `node` for `cid` (eth0).
pub fn run_meta(node: &Node, plugin: &str, command: &str, cid: &str, pod: Option<&Netns>, conf: &str) -> PluginRun {
    let path = pod.map(|p| p.path());
    exec_plugin(&node.ns, &node.plugins, plugin, command, cid, path.as_deref(), "eth0", "", conf)
}

/// One element of a set or map: its set, key as nft prints it in JSON, value
/// (maps), and comment.
#[derive(Debug, Clone, PartialEq)]
pub struct Elem {
    pub set: String,
    pub key: String,
    pub value: String,
    pub comment: String,
}

/// Elements of every set and map of `table`, or `None` without the table.
pub fn table_elements(ns: &Netns, family: &str, table: &str) -> Option<Vec<Elem>> {
    let out = ns.run(&["nft", "-j", "list", "table", family, table]);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("No such file or directory"), "nft list table {family} {table}: {err}");
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("nft -j output");
    let mut elems = Vec::new();
    for item in v["nftables"].as_array().into_iter().flatten() {
        let Some(set) = item.get("set").or_else(|| item.get("map")) else { continue };
        for e in set["elem"].as_array().into_iter().flatten() {
            let (k, val) = match e.as_array() {
                Some(pair) if pair.len() == 2 => (&pair[0], pair[1].to_string()),
                _ => (e, String::new()),
            };
            let inner = k.get("elem").unwrap_or(k);
            let key = inner.get("val").unwrap_or(inner);
            let key = match key.get("concat").and_then(Value::as_array) {
                Some(parts) => parts.iter().map(plain).collect::<Vec<_>>().join(" . "),
                None => plain(key),
            };
            elems.push(Elem {
                set: set["name"].as_str().unwrap_or_default().to_string(),
                key,
                value: val,
                comment: inner["comment"].as_str().unwrap_or_default().to_string(),
            });
        }
    }
    Some(elems)
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// What a server saw of one connection.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    /// The peer address the server saw (after any NAT).
    pub peer: IpAddr,
}

/// A TCP listener on `listen` inside `server`; a client inside `client`
/// connects to `connect` (e.g. a host port on the node) and exchanges a
/// token. `Some` with what the server saw if the echo came back within
/// `timeout`.
pub fn tcp_via(
    client: &Netns,
    server: &Netns,
    listen: SocketAddr,
    connect: SocketAddr,
    timeout: Duration,
) -> Option<Seen> {
    let listener = server.enter(|| bind_retry(|| TcpListener::bind(listen)));
    let listener = listener.unwrap_or_else(|e| panic!("listen on {listen} in {}: {e}", server.name()));
    listener.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Option<IpAddr>>> = Arc::new(Mutex::new(None));
    let srv = {
        let (stop, seen) = (stop.clone(), seen.clone());
        thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, peer)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                        let mut line = String::new();
                        if BufReader::new(&s).read_line(&mut line).is_ok() {
                            *seen.lock().unwrap() = Some(peer.ip().to_canonical());
                            let _ = (&s).write_all(line.as_bytes());
                        }
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        })
    };
    let token = format!("{}\n", unique("tok"));
    let ok = client.enter(|| {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if let Ok(s) = TcpStream::connect_timeout(&connect, left) {
                let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(500))));
                let mut back = String::new();
                let echoed =
                    (&s).write_all(token.as_bytes()).is_ok() && BufReader::new(&s).read_line(&mut back).is_ok();
                return echoed && back == token;
            }
            thread::sleep(Duration::from_millis(50));
        }
    });
    stop.store(true, Ordering::Relaxed);
    let _ = srv.join();
    let peer = *seen.lock().unwrap();
    if ok {
        peer.map(|peer| Seen { peer })
    } else {
        None
    }
}

/// [`tcp_via`] with a 3 s timeout; panics (naming `what`) unless it works.
pub fn tcp_must(what: &str, client: &Netns, server: &Netns, listen: SocketAddr, connect: SocketAddr) -> Seen {
    tcp_via(client, server, listen, connect, Duration::from_secs(3))
        .unwrap_or_else(|| panic!("{what}: no TCP connection {} -> {connect} (listening on {listen})", client.name()))
}

/// [`tcp_via`] with a 1 s timeout; panics (naming `what`) if it works.
pub fn tcp_must_not(what: &str, client: &Netns, server: &Netns, listen: SocketAddr, connect: SocketAddr) {
    if let Some(seen) = tcp_via(client, server, listen, connect, Duration::from_secs(1)) {
        panic!("{what}: {} reached {connect} (listening on {listen}) but should not: {seen:?}", client.name());
    }
}

/// UDP: a socket on `listen` inside `server` echoes one datagram; the client
/// sends to `connect`. `Some(peer)` if the echo came back within `timeout`.
pub fn udp_via(
    client: &Netns,
    server: &Netns,
    listen: SocketAddr,
    connect: SocketAddr,
    timeout: Duration,
) -> Option<IpAddr> {
    let sock = server.enter(|| bind_retry(|| UdpSocket::bind(listen))).expect("bind udp");
    sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Option<IpAddr>>> = Arc::new(Mutex::new(None));
    let srv = {
        let (stop, seen) = (stop.clone(), seen.clone());
        thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    *seen.lock().unwrap() = Some(peer.ip().to_canonical());
                    let _ = sock.send_to(&buf[..n], peer);
                }
            }
        })
    };
    let token = unique("udp");
    let ok = client.enter(|| {
        let any: SocketAddr = if connect.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
        let s = UdpSocket::bind(any).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            let _ = s.send_to(token.as_bytes(), connect);
            match s.recv_from(&mut buf) {
                Ok((n, _)) if &buf[..n] == token.as_bytes() => return true,
                _ => {}
            }
        }
        false
    });
    stop.store(true, Ordering::Relaxed);
    let _ = srv.join();
    let peer = *seen.lock().unwrap();
    if ok {
        peer
    } else {
        None
    }
}

fn bind_retry<T>(f: impl Fn() -> std::io::Result<T>) -> std::io::Result<T> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match f() {
            // Not yet usable (IPv6 DAD), or a socket of the previous
            // exchange on the same address still closing.
            Err(e)
                if matches!(e.kind(), ErrorKind::AddrNotAvailable | ErrorKind::AddrInUse)
                    && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(50))
            }
            r => return r,
        }
    }
}

pub fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// A sysctl of `ns` (`net/ipv4/...` form).
pub fn sysctl_in(ns: &Netns, key: &str) -> String {
    ns.ok(&format!("cat /proc/sys/{key}")).trim().to_string()
}
