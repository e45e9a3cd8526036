//! tern-tuning: sysctls and interface attributes of the pod interface,
//! chained after a main plugin. Keys follow the reference `tuning` plugin.
//!
//! * `sysctl`: a map of keys (`net.ipv4.conf.IFNAME.arp_filter`, or with `/`
//!   separators so interface names may contain dots) to values, written in
//!   the pod's network namespace. The first `IFNAME` of a key becomes
//!   CNI_IFNAME, in ADD and in CHECK alike. Keys must resolve under
//!   `/proc/sys/net`; two keys of one map that resolve to the same file are
//!   rejected.
//! * `mac`, `mtu`, `promisc`, `allmulti`, `txQLen`: attributes of
//!   CNI_IFNAME. The MAC may also come from CNI_ARGS `MAC`, the `mac`
//!   capability (`runtimeConfig.mac`) and `args.cni.mac`, in increasing
//!   precedence; `args.cni.*` override every key, `args.cni.sysctl` per key.
//!
//! The original attributes are saved in `<dataDir>/<containerID>_<ifname>.json`
//! (the reference's format, plus the owner for GC) before anything changes;
//! DEL restores them when the interface is still there and removes the file
//! either way. Sysctls are not restored (as in the reference): the
//! per-interface ones go with the interface.
use std::collections::HashSet;
use std::fmt;
use std::io::Write;
use std::marker::PhantomData;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::de::{Error as _, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use tern_cni::{CniError, CniResult, Code};
use tern_sys::netlink::{format_mac, parse_mac, Mac};
use tern_sys::{sysctl, LinkInfo, NetNs, Netlink, SysError};

use crate::skel::{Plugin, Request};

pub struct TuningPlugin;

/// Where backups go unless `dataDir` says otherwise.
pub const DEFAULT_DATA_DIR: &str = "/run/cni/tern-tuning";

fn sys(op: &str) -> impl Fn(SysError) -> CniError + '_ {
    move |e| CniError::internal(format!("{op}: {e}"))
}

fn invalid(field: &str, msg: impl fmt::Display) -> CniError {
    CniError::invalid_config(format!("{msg} ({field})")).with_details(format!("field: {field}"))
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Keys {
    #[serde(default)]
    data_dir: Option<String>,
    #[serde(default)]
    mac: Option<String>,
    #[serde(default)]
    promisc: Option<bool>,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    allmulti: Option<bool>,
    #[serde(default, rename = "txQLen")]
    tx_qlen: Option<u32>,
    #[serde(default)]
    args: Option<ArgsKey>,
}

#[derive(Debug, Default, Deserialize)]
struct ArgsKey {
    #[serde(default)]
    cni: Option<ArgsCni>,
}

#[derive(Debug, Default, Deserialize)]
struct ArgsCni {
    #[serde(default)]
    mac: Option<String>,
    #[serde(default)]
    promisc: Option<bool>,
    #[serde(default)]
    mtu: Option<u32>,
    #[serde(default)]
    allmulti: Option<bool>,
    #[serde(default, rename = "txQLen")]
    tx_qlen: Option<u32>,
}

fn sysctl_field(args: bool) -> &'static str {
    if args {
        "args.cni.sysctl"
    } else {
        "sysctl"
    }
}

/// A sysctl map as written, in order, refusing a key given twice (the JSON
/// decoder would silently keep the last one). `ARGS` picks the field name
/// errors show.
struct SysctlMap<const ARGS: bool>(Vec<(String, String)>);

impl<'de, const ARGS: bool> Deserialize<'de> for SysctlMap<ARGS> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<const A: bool>(PhantomData<()>);
        impl<'de, const A: bool> Visitor<'de> for V<A> {
            type Value = SysctlMap<A>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a map of sysctl keys to string values ({})", sysctl_field(A))
            }
            fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Self::Value, M::Error> {
                let field = sysctl_field(A);
                let mut out: Vec<(String, String)> = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    let v: String = m
                        .next_value()
                        .map_err(|e| M::Error::custom(format!("{field}.{k}: the value must be a string ({e})")))?;
                    if out.iter().any(|(x, _)| *x == k) {
                        return Err(M::Error::custom(format!("{field}: duplicated sysctl key {k:?}")));
                    }
                    out.push((k, v));
                }
                Ok(SysctlMap(out))
            }
        }
        d.deserialize_map(V::<ARGS>(PhantomData))
    }
}

#[derive(Deserialize)]
struct RawSysctls {
    #[serde(default)]
    sysctl: Option<SysctlMap<false>>,
    #[serde(default)]
    args: Option<RawArgs>,
}

#[derive(Deserialize)]
struct RawArgs {
    #[serde(default)]
    cni: Option<RawArgsCni>,
}

#[derive(Deserialize)]
struct RawArgsCni {
    #[serde(default)]
    sysctl: Option<SysctlMap<true>>,
}

/// One sysctl to set: the key as configured and its file under /proc/sys.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sysctl {
    key: String,
    /// `net/...`, slash-separated, IFNAME replaced.
    path: String,
    value: String,
}

/// The settings of one invocation.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tuning {
    data_dir: PathBuf,
    sysctls: Vec<Sysctl>,
    mac: Option<Mac>,
    promisc: Option<bool>,
    mtu: Option<u32>,
    allmulti: Option<bool>,
    tx_qlen: Option<u32>,
}

impl Tuning {
    fn changes_attributes(&self) -> bool {
        self.mac.is_some()
            || self.promisc.is_some()
            || self.mtu.is_some()
            || self.allmulti.is_some()
            || self.tx_qlen.is_some()
    }
}

/// Resolve a sysctl key to its path under /proc/sys: `/`-separated keys are
/// taken as they are (so an interface name may contain dots), otherwise every
/// `.` separates; then the first `IFNAME` becomes `ifname`. Must be a file
/// under `net/`.
fn resolve_key(key: &str, ifname: &str, field: &str) -> Result<String, CniError> {
    let slashed = if key.contains('/') { key.trim_start_matches('/').to_string() } else { key.replace('.', "/") };
    let path = slashed.replacen("IFNAME", ifname, 1);
    let parts: Vec<&str> = path.split('/').collect();
    let bad_part =
        |p: &&str| p.is_empty() || *p == "." || *p == ".." || p.chars().any(|c| c.is_whitespace() || c == '\0');
    if parts.len() < 2 || parts[0] != "net" || parts.iter().any(bad_part) {
        return Err(invalid(field, format!("invalid net sysctl key {key:?}: it must name a file under /proc/sys/net")));
    }
    Ok(path)
}

fn resolve_map(map: Vec<(String, String)>, ifname: &str, field: &str) -> Result<Vec<Sysctl>, CniError> {
    let mut out: Vec<Sysctl> = Vec::new();
    for (key, value) in map {
        let path = resolve_key(&key, ifname, &format!("{field}.{key}"))?;
        if let Some(other) = out.iter().find(|s| s.path == path) {
            return Err(invalid(
                field,
                format!("duplicated sysctl keys: {:?} and {key:?} are the same sysctl ({path})", other.key),
            ));
        }
        out.push(Sysctl { key, path, value });
    }
    Ok(out)
}

fn parse_mac_field(s: &str, field: &str) -> Result<Mac, CniError> {
    let mac = parse_mac(s).ok_or_else(|| invalid(field, format!("invalid MAC address {s:?}")))?;
    if mac[0] & 1 == 1 || mac == [0; 6] {
        return Err(invalid(field, format!("{s:?} is not a unicast MAC address")));
    }
    Ok(mac)
}

fn load(req: &Request) -> Result<Tuning, CniError> {
    let keys: Keys = req.conf.options()?;
    // From stdin itself: the decoded config has already lost duplicate keys.
    let raw: RawSysctls = serde_json::from_slice(&req.stdin).map_err(|e| {
        let field = sysctl_field(e.to_string().contains(sysctl_field(true)));
        invalid(field, format!("invalid {field}: {e}"))
    })?;
    let ifname = req.env.ifname();
    let args = keys.args.and_then(|a| a.cni).unwrap_or_default();

    // Config, then args.cni.sysctl overriding key by key (by the file they name).
    let mut sysctls = resolve_map(raw.sysctl.map(|m| m.0).unwrap_or_default(), ifname, "sysctl")?;
    let extra = raw.args.and_then(|a| a.cni).and_then(|c| c.sysctl).map(|m| m.0).unwrap_or_default();
    for s in resolve_map(extra, ifname, "args.cni.sysctl")? {
        match sysctls.iter_mut().find(|have| have.path == s.path) {
            Some(have) => *have = s,
            None => sysctls.push(s),
        }
    }

    // MAC: config < CNI_ARGS MAC < runtimeConfig.mac < args.cni.mac.
    let mac_src = [
        (args.mac.as_deref(), "args.cni.mac"),
        (req.conf.runtime_config.mac.as_deref(), "runtimeConfig.mac"),
        (req.env.args.get("MAC"), "CNI_ARGS MAC"),
        (keys.mac.as_deref(), "mac"),
    ]
    .into_iter()
    .find_map(|(m, field)| m.filter(|m| !m.is_empty()).map(|m| (m, field)));
    let mac = mac_src.map(|(m, field)| parse_mac_field(m, field)).transpose()?;

    let mtu = args.mtu.or(keys.mtu).filter(|&m| m != 0);
    if let Some(m) = mtu {
        if m < 68 {
            let field = if args.mtu.is_some() { "args.cni.mtu" } else { "mtu" };
            return Err(invalid(field, format!("invalid mtu {m}: must be at least 68")));
        }
    }
    Ok(Tuning {
        data_dir: PathBuf::from(keys.data_dir.filter(|d| !d.is_empty()).unwrap_or_else(|| DEFAULT_DATA_DIR.into())),
        sysctls,
        mac,
        promisc: args.promisc.or(keys.promisc),
        mtu,
        allmulti: args.allmulti.or(keys.allmulti),
        tx_qlen: args.tx_qlen.or(keys.tx_qlen),
    })
}

// ---------------------------------------------------------------------------
// Backup
// ---------------------------------------------------------------------------

/// The original attributes, in the reference plugin's file format (which
/// ignores the owner fields tern adds for GC).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Backup {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    promisc: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    allmulti: Option<bool>,
    #[serde(default, rename = "txQLen", skip_serializing_if = "Option::is_none")]
    tx_qlen: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    network: String,
    #[serde(default, rename = "containerID", skip_serializing_if = "String::is_empty")]
    container_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    ifname: String,
}

/// The dataDir alone, for DEL and GC: they must work whatever else the
/// configuration says (a DEL after an ADD that failed on a bad key).
fn data_dir(req: &Request) -> PathBuf {
    let d = req.conf.raw.get("dataDir").and_then(|d| d.as_str()).filter(|d| !d.is_empty());
    PathBuf::from(d.unwrap_or(DEFAULT_DATA_DIR))
}

fn backup_path(dir: &Path, container_id: &str, ifname: &str) -> PathBuf {
    dir.join(format!("{container_id}_{ifname}.json"))
}

fn write_backup(path: &Path, b: &Backup) -> Result<(), CniError> {
    let io = |op: &str, p: &Path, e: std::io::Error| CniError::new(Code::Io, format!("{op} {}: {e}", p.display()));
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io("failed to create the tuning dataDir", dir, e))?;
    let tmp = path.with_extension("json.tmp");
    let data = serde_json::to_vec_pretty(b).expect("backup serialises");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io("failed to write", &tmp, e))?;
    f.write_all(&data).and_then(|_| f.sync_all()).map_err(|e| io("failed to write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("failed to write", path, e))
}

fn remove_file(path: &Path) -> Result<(), CniError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(CniError::new(Code::Io, format!("failed to remove {}: {e}", path.display()))),
    }
}

/// Put back what a backup holds; every attribute is tried.
fn restore(nl: &Netlink, index: u32, b: &Backup) -> Vec<CniError> {
    let mut errors = Vec::new();
    let mut run = |what: &str, r: Result<(), SysError>| {
        if let Err(e) = r {
            errors.push(CniError::internal(format!("failed to restore {what}: {e}")));
        }
    };
    if let Some(mac) = parse_mac(&b.mac) {
        run("mac", nl.set_mac(index, mac));
    }
    if let Some(mtu) = b.mtu.filter(|&m| m != 0) {
        run("mtu", nl.set_mtu(index, mtu));
    }
    if let Some(p) = b.promisc {
        run("promisc", nl.set_promisc(index, p));
    }
    if let Some(a) = b.allmulti {
        run("allmulti", nl.set_allmulti(index, a));
    }
    if let Some(q) = b.tx_qlen {
        run("txQLen", nl.set_txqlen(index, q));
    }
    errors
}

// ---------------------------------------------------------------------------
// The plugin
// ---------------------------------------------------------------------------

fn open_netns(req: &Request) -> Result<NetNs, CniError> {
    let path = req.env.netns.as_deref().unwrap_or_default();
    NetNs::open(path)
        .map_err(|e| CniError::new(Code::InvalidEnv, format!("failed to open netns {path:?} (CNI_NETNS): {e}")))
}

fn pod_link(nl: &Netlink, req: &Request) -> Result<LinkInfo, CniError> {
    let ifname = req.env.ifname();
    nl.link(ifname).map_err(sys("pod interface"))?.ok_or_else(|| {
        CniError::internal(format!(
            "interface {ifname} not found in {} (CNI_IFNAME)",
            req.env.netns.as_deref().unwrap_or_default()
        ))
    })
}

fn prev_result(req: &Request) -> Result<&CniResult, CniError> {
    req.conf.prev_result.as_ref().ok_or_else(|| {
        CniError::invalid_config("must be called as a chained plugin: required prevResult missing (prevResult)")
    })
}

/// Write the sysctls in `ns`. Returns the values they had (path, value), for
/// an undo; on failure, the ones already written are put back.
fn apply_sysctls(ns: &NetNs, sysctls: &[Sysctl]) -> Result<Vec<(String, String)>, CniError> {
    ns.enter(|| {
        let mut old: Vec<(String, String)> = Vec::new();
        for s in sysctls {
            let r = sysctl::read(&s.path).and_then(|before| sysctl::write(&s.path, &s.value).map(|_| before));
            match r {
                Ok(before) => old.push((s.path.clone(), before)),
                Err(e) => {
                    restore_sysctls(&old);
                    return Err(CniError::internal(format!("failed to set sysctl {} ({}): {e}", s.key, s.path)));
                }
            }
        }
        Ok(old)
    })
    .map_err(sys("pod netns"))?
}

/// Put sysctls back, last first (inside the pod netns).
fn restore_sysctls(old: &[(String, String)]) {
    for (path, v) in old.iter().rev() {
        let _ = sysctl::write(path, v);
    }
}

/// Set the attributes; the first failure is returned.
fn apply_attributes(nl: &Netlink, index: u32, t: &Tuning) -> Result<(), CniError> {
    if let Some(mac) = t.mac {
        nl.set_mac(index, mac).map_err(sys(&format!("failed to set mac {}", format_mac(&mac))))?;
    }
    if let Some(p) = t.promisc {
        nl.set_promisc(index, p).map_err(sys("failed to set promisc"))?;
    }
    if let Some(mtu) = t.mtu {
        nl.set_mtu(index, mtu).map_err(sys(&format!("failed to set mtu {mtu}")))?;
    }
    if let Some(a) = t.allmulti {
        nl.set_allmulti(index, a).map_err(sys("failed to set allmulti"))?;
    }
    if let Some(q) = t.tx_qlen {
        nl.set_txqlen(index, q).map_err(sys(&format!("failed to set txQLen {q}")))?;
    }
    Ok(())
}

fn join_errors(mut errors: Vec<CniError>) -> Result<(), CniError> {
    match errors.len() {
        0 => Ok(()),
        1 => Err(errors.remove(0)),
        _ => Err(CniError::internal(errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))),
    }
}

/// Whitespace-insensitive comparison (the kernel prints some multi-value
/// sysctls with tabs).
fn same_value(a: &str, b: &str) -> bool {
    a.split_whitespace().eq(b.split_whitespace())
}

impl Plugin for TuningPlugin {
    fn name(&self) -> &'static str {
        "tern-tuning"
    }

    fn add(&self, req: &Request) -> Result<CniResult, CniError> {
        let t = load(req)?;
        let prev = prev_result(req)?;
        let ns = open_netns(req)?;
        let nl = Netlink::in_netns(&ns).map_err(sys("netlink in the pod netns"))?;
        let link = pod_link(&nl, req)?;

        let old_sysctls = apply_sysctls(&ns, &t.sysctls)?;
        let undo_sysctls = || {
            let _ = ns.enter(|| restore_sysctls(&old_sysctls));
        };

        if t.changes_attributes() {
            let backup = Backup {
                mac: if t.mac.is_some() {
                    link.mac.as_ref().map(format_mac).unwrap_or_default()
                } else {
                    String::new()
                },
                promisc: t.promisc.map(|_| link.promisc),
                mtu: t.mtu.map(|_| link.mtu),
                allmulti: t.allmulti.map(|_| link.allmulti),
                tx_qlen: t.tx_qlen.map(|_| link.txqlen),
                network: req.conf.name.clone(),
                container_id: req.env.container_id().to_string(),
                ifname: req.env.ifname().to_string(),
            };
            let path = backup_path(&t.data_dir, req.env.container_id(), req.env.ifname());
            if let Err(e) = write_backup(&path, &backup) {
                undo_sysctls();
                return Err(e);
            }
            if let Err(e) = apply_attributes(&nl, link.index, &t) {
                let _ = restore(&nl, link.index, &backup);
                let _ = remove_file(&path);
                undo_sysctls();
                return Err(e);
            }
        }

        let mut result = prev.clone();
        if let Some(mac) = t.mac {
            for i in result.interfaces.iter_mut().filter(|i| i.name == req.env.ifname() && !i.sandbox.is_empty()) {
                i.mac = format_mac(&mac);
            }
        }
        Ok(result)
    }

    /// Restores the saved attributes when the interface is still there, and
    /// removes the backup either way. Needs neither prevResult nor the netns.
    fn del(&self, req: &Request) -> Result<(), CniError> {
        let path = backup_path(&data_dir(req), req.env.container_id(), req.env.ifname());
        let backup: Option<Backup> = match std::fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data).ok(),
            Err(_) => None,
        };
        let mut errors = Vec::new();
        if let Some(b) = &backup {
            let link = req
                .env
                .netns
                .as_deref()
                .and_then(|p| NetNs::open(p).ok())
                .and_then(|ns| Netlink::in_netns(&ns).ok())
                .and_then(|nl| nl.link(req.env.ifname()).ok().flatten().map(|l| (nl, l)));
            if let Some((nl, l)) = link {
                errors.extend(restore(&nl, l.index, b));
            }
        }
        if let Err(e) = remove_file(&path) {
            errors.push(e);
        }
        join_errors(errors)
    }

    fn check(&self, req: &Request) -> Result<(), CniError> {
        let t = load(req)?;
        prev_result(req)?;
        let ns = open_netns(req)?;
        let nl = Netlink::in_netns(&ns).map_err(sys("netlink in the pod netns"))?;
        let link = pod_link(&nl, req)?;
        let ifname = req.env.ifname();

        let mismatch = ns
            .enter(|| -> Result<Option<String>, CniError> {
                for s in &t.sysctls {
                    let have = sysctl::read(&s.path).map_err(|e| {
                        CniError::internal(format!("failed to read sysctl {} ({}): {e}", s.key, s.path))
                    })?;
                    if !same_value(&have, &s.value) {
                        return Ok(Some(format!(
                            "sysctl {} ({}) is {have:?}, configured {:?}",
                            s.key,
                            s.path.replace('/', "."),
                            s.value
                        )));
                    }
                }
                Ok(None)
            })
            .map_err(sys("pod netns"))??;
        if let Some(m) = mismatch {
            return Err(CniError::internal(m));
        }
        let fail = |what: &str, have: String, want: String| {
            Err(CniError::internal(format!("{ifname}: {what} is {have}, configured {want}")))
        };
        if let Some(mac) = t.mac {
            if link.mac != Some(mac) {
                let have = link.mac.as_ref().map(format_mac).unwrap_or_default();
                return fail("mac", have, format_mac(&mac));
            }
        }
        if let Some(p) = t.promisc {
            if link.promisc != p {
                return fail("promisc", link.promisc.to_string(), p.to_string());
            }
        }
        if let Some(mtu) = t.mtu {
            if link.mtu != mtu {
                return fail("mtu", link.mtu.to_string(), mtu.to_string());
            }
        }
        if let Some(a) = t.allmulti {
            if link.allmulti != a {
                return fail("allmulti", link.allmulti.to_string(), a.to_string());
            }
        }
        if let Some(q) = t.tx_qlen {
            if link.txqlen != q {
                return fail("txQLen", link.txqlen.to_string(), q.to_string());
            }
        }
        Ok(())
    }

    fn status(&self, req: &Request) -> Result<(), CniError> {
        load(req).map(drop)
    }

    /// Removes the backups this network wrote for attachments not listed.
    fn gc(&self, req: &Request) -> Result<(), CniError> {
        let dir = data_dir(req);
        let valid = req.conf.valid_attachments.as_ref().ok_or_else(|| {
            CniError::invalid_config("GC needs the list of valid attachments (cni.dev/valid-attachments)")
        })?;
        let keep: HashSet<(&str, &str)> = valid.iter().map(|a| (a.container_id.as_str(), a.ifname.as_str())).collect();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(CniError::new(Code::Io, format!("failed to read {}: {e}", dir.display()))),
        };
        let mut errors = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let Some(b) = std::fs::read(&path).ok().and_then(|d| serde_json::from_slice::<Backup>(&d).ok()) else {
                continue;
            };
            let ours = b.network == req.conf.name && !b.container_id.is_empty();
            // Only the file this attachment's name maps to: never one renamed by hand.
            let named = path == backup_path(&dir, &b.container_id, &b.ifname);
            if ours && named && !keep.contains(&(b.container_id.as_str(), b.ifname.as_str())) {
                if let Err(e) = remove_file(&path) {
                    errors.push(e);
                }
            }
        }
        join_errors(errors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_resolve_under_net() {
        assert_eq!(
            resolve_key("net.ipv4.conf.IFNAME.arp_filter", "eth0", "f").unwrap(),
            "net/ipv4/conf/eth0/arp_filter"
        );
        assert_eq!(
            resolve_key("net/ipv4/conf/IFNAME/arp_filter", "eth0.1", "f").unwrap(),
            "net/ipv4/conf/eth0.1/arp_filter"
        );
        // Dots in the interface name survive the dot form too: IFNAME is replaced last.
        assert_eq!(resolve_key("net.ipv4.conf.IFNAME.arp_filter", "e.1", "f").unwrap(), "net/ipv4/conf/e.1/arp_filter");
        // Only the first IFNAME.
        assert_eq!(resolve_key("net.IFNAME.IFNAME", "x", "f").unwrap(), "net/x/IFNAME");
        assert_eq!(resolve_key("/net/core/somaxconn", "x", "f").unwrap(), "net/core/somaxconn");
        for bad in ["kernel.pid_max", "net", "net/../kernel/x", "net/ipv4//x", "vm.swappiness", "net/./x", ""] {
            let e = resolve_key(bad, "eth0", "sysctl.k").unwrap_err();
            assert_eq!(e.code, 7, "{bad}");
            assert!(e.msg.contains("(sysctl.k)"), "{}", e.msg);
        }
    }

    #[test]
    fn same_file_twice_is_rejected() {
        let m = vec![
            ("net.ipv4.conf.IFNAME.arp_filter".to_string(), "1".to_string()),
            ("net/ipv4/conf/eth0/arp_filter".to_string(), "0".to_string()),
        ];
        let e = resolve_map(m, "eth0", "sysctl").unwrap_err();
        assert_eq!(e.code, 7);
        assert!(e.msg.contains("duplicated sysctl keys"), "{}", e.msg);
    }

    #[test]
    fn literal_duplicates_are_rejected() {
        let r: Result<RawSysctls, _> = serde_json::from_str(r#"{"sysctl":{"net.a":"1","net.a":"2"}}"#);
        assert!(r.err().unwrap().to_string().contains("sysctl: duplicated sysctl key \"net.a\""));
        let r: Result<RawSysctls, _> = serde_json::from_str(r#"{"args":{"cni":{"sysctl":{"net.a":"1","net.a":"1"}}}}"#);
        assert!(r.err().unwrap().to_string().contains("args.cni.sysctl: duplicated"));
        let r: RawSysctls =
            serde_json::from_str(r#"{"sysctl":{"net.a":"1","net.b":"2"},"args":{"cni":{"x":1}}}"#).unwrap();
        assert_eq!(r.sysctl.unwrap().0.len(), 2);
        let r: Result<RawSysctls, _> = serde_json::from_str(r#"{"sysctl":{"net.a":1}}"#);
        assert!(r.err().unwrap().to_string().contains("must be a string"));
    }

    #[test]
    fn backup_format_is_the_references() {
        let b = Backup { mac: "02:00:00:00:00:01".into(), mtu: Some(1500), ..Default::default() };
        let v: serde_json::Value = serde_json::to_value(&b).unwrap();
        assert_eq!(v, serde_json::json!({"mac": "02:00:00:00:00:01", "mtu": 1500}));
        let r: Backup = serde_json::from_str(r#"{"mac":"6a:00:00:00:00:01","promisc":true,"txQLen":5}"#).unwrap();
        assert_eq!((r.promisc, r.tx_qlen), (Some(true), Some(5)));
    }
}
