//! The runtime side of CNI (what libcni does for podman and containerd):
//! load a network configuration, run its plugin chain, keep the result cache,
//! and DEL, CHECK, STATUS and GC later from that cache.
//!
//! - [`load_network`]: a network from a config directory (`.conflist`, and
//!   `.conf`/`.json` up-converted).
//! - [`Runner`]: plugin lookup on the CNI path and the list operations
//!   ([`Runner::add`], [`Runner::check`], [`Runner::del`], [`Runner::status`],
//!   [`Runner::gc`], [`Runner::versions`]) over a [`RuntimeConf`].
//! - [`cache`]: libcni's `cniCacheV1` entries, byte-compatible both ways.
//!
//! Behaviour follows the spec and libcni (checklist sections 1.5-1.7 and 2),
//! with these choices where they leave room:
//! - ADD checks that the netns exists and that every plugin binary is on the
//!   CNI path before running anything, refuses an attachment that already
//!   has a cache entry, and after a failed ADD runs DEL of the whole chain in
//!   reverse without `prevResult` (what a runtime does), reporting the ADD
//!   error first.
//! - DEL tolerates a corrupt or empty cache entry (reported through the notes
//!   callback, removed, DEL continues without `prevResult`), continues past
//!   failing plugins and reports all; the entry is removed only when every
//!   plugin succeeded.
//! - With `cniVersions`, the version is the highest candidate every plugin
//!   supports according to its VERSION reply (the spec allows this), so a
//!   list can offer 1.1.0 and still drive plugins that stop at 1.0.0.
//! - ADD/DEL hold a shared lock and GC an exclusive one
//!   (`<cacheDir>/tern-cni.lock`), so GC never runs beside an ADD whose
//!   result is not cached yet (spec: GC is exclusive with ADD/DEL).
//!
//! Pure parts (cache encoding, config selection, environment, error reading,
//! version negotiation) are unit-tested here; the rest runs plugins.
#![forbid(unsafe_code)]

pub mod cache;
mod exec;
mod gojson;
mod load;

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde_json::{Map, Value};
use tern_cni::{Attachment, CniError, CniResult, Command, NetConfList, Version};

pub use cache::{CacheEntry, CacheFile};
pub use load::load_network;

/// One attachment's runtime parameters (libcni's `RuntimeConf`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuntimeConf {
    pub container_id: String,
    /// The netns path (`CNI_NETNS`); may be empty for DEL.
    pub netns: String,
    pub ifname: String,
    /// CNI_ARGS as pairs.
    pub cni_args: Vec<(String, String)>,
    /// Capability args; each plugin gets in `runtimeConfig` those it declares.
    pub capability_args: Map<String, Value>,
}

impl RuntimeConf {
    /// The runtime parameters stored in a cache entry.
    pub fn from_cache(e: &CacheEntry) -> RuntimeConf {
        RuntimeConf {
            container_id: e.container_id.clone(),
            netns: e.netns.clone(),
            ifname: e.if_name.clone(),
            cni_args: e.cni_args.clone(),
            capability_args: e.capability_args.clone(),
        }
    }
}

/// A plugin invocation that failed.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginFailure {
    /// The plugin `type`.
    pub plugin: String,
    pub command: Command,
    /// For GC's DEL of a stale attachment: `<containerID>/<ifname>`.
    pub attachment: Option<String>,
    /// The plugin's error result (or the runner's, e.g. binary not found).
    pub error: CniError,
}

impl fmt::Display for PluginFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(a) = &self.attachment {
            write!(f, "stale attachment {a}: ")?;
        }
        let verb = match self.command {
            Command::Add => "add",
            Command::Del => "delete",
            Command::Check => "check",
            Command::Status => "status",
            Command::Gc => "gc",
            Command::Version => "version",
        };
        write!(f, "plugin type={:?} failed ({verb}): {} [code {}]", self.plugin, self.error, self.error.code)
    }
}

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq)]
pub enum Error {
    /// The network configuration could not be found or read.
    Config(String),
    /// The runtime parameters cannot be used (bad container id or ifname, no
    /// such netns, already attached, a command the version does not have).
    /// Nothing was run.
    Invalid(String),
    /// The result cache could not be read or written.
    Cache(String),
    /// Plugins failed: the operation's failure first, then the others
    /// (the DEL after a failed ADD, the rest of DEL and GC).
    Plugins(Vec<PluginFailure>),
}

impl Error {
    /// The CNI error code of the first plugin failure (e.g. 50/51 for STATUS).
    pub fn code(&self) -> Option<u32> {
        match self {
            Error::Plugins(f) => f.first().map(|f| f.error.code),
            _ => None,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(m) | Error::Invalid(m) | Error::Cache(m) => f.write_str(m),
            Error::Plugins(v) if v.len() == 1 => write!(f, "{}", v[0]),
            Error::Plugins(v) => {
                write!(f, "{}", v[0])?;
                for other in &v[1..] {
                    write!(f, "\n  also: {other}")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for Error {}

/// A successful ADD.
#[derive(Debug, Clone, PartialEq)]
pub struct Added {
    /// The final result (the last plugin's).
    pub result: CniResult,
    /// The version the last plugin answered in (the list's, for conforming plugins).
    pub version: Version,
}

impl Added {
    /// The result as JSON in its version.
    pub fn to_value(&self) -> Value {
        self.result.to_value_lossy(self.version)
    }
}

/// What GC did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GcSummary {
    /// `disableGC` was set: nothing ran.
    pub disabled: bool,
    /// Cached attachments whose netns was gone, deleted first.
    pub deleted: Vec<Attachment>,
    /// The attachments sent to the plugins as still valid.
    pub valid: Vec<Attachment>,
    /// Whether GC was sent to the plugins (version 1.1.0 and later).
    pub plugins_called: bool,
}

/// One plugin's VERSION reply.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginVersions {
    /// The plugin `type`.
    pub plugin: String,
    /// Where it was found.
    pub path: Option<PathBuf>,
    /// `supportedVersions`, or why they are unknown.
    pub supported: Result<Vec<String>, CniError>,
}

/// An attachment found in the cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedAttachment {
    pub file: PathBuf,
    pub entry: CacheEntry,
    /// When the entry was written (the file's mtime).
    pub modified: Option<SystemTime>,
}

/// The cache's contents.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Listing {
    /// Valid `cniCacheV1` entries, in file name order.
    pub attachments: Vec<CachedAttachment>,
    /// Files that are not (legacy, corrupt, unreadable), with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// Runs network configuration lists the way a container runtime does.
pub struct Runner {
    /// Directories searched for plugin binaries, in order (`CNI_PATH`).
    pub cni_path: Vec<PathBuf>,
    /// libcni's cache dir: entries live in `<cache_dir>/results/`.
    pub cache_dir: PathBuf,
    notes: Box<dyn Fn(&str)>,
}

impl fmt::Debug for Runner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runner").field("cni_path", &self.cni_path).field("cache_dir", &self.cache_dir).finish()
    }
}

/// Plugin index, binary (or why there is none).
type Binaries = Vec<Result<PathBuf, CniError>>;

impl Runner {
    pub fn new(cni_path: Vec<PathBuf>, cache_dir: impl Into<PathBuf>) -> Runner {
        Runner { cni_path, cache_dir: cache_dir.into(), notes: Box::new(|_| {}) }
    }

    /// Receive the notes operations make besides succeeding or failing
    /// (a corrupt cache entry removed, CHECK skipped, a version negotiated).
    pub fn with_notes(mut self, f: impl Fn(&str) + 'static) -> Runner {
        self.notes = Box::new(f);
        self
    }

    fn note(&self, msg: &str) {
        (self.notes)(msg)
    }

    /// The cache file of an attachment.
    pub fn cache_file(&self, network: &str, container_id: &str, ifname: &str) -> PathBuf {
        self.cache_dir.join(cache::RESULTS_DIR).join(cache::file_name(network, container_id, ifname))
    }

    /// The `cniCacheV1` entry of an attachment, if there is a readable one.
    pub fn cached(&self, network: &str, container_id: &str, ifname: &str) -> Option<CacheEntry> {
        let bytes = fs::read(self.cache_file(network, container_id, ifname)).ok()?;
        match CacheFile::parse(&bytes) {
            Ok(CacheFile::V1(e)) => Some(*e),
            _ => None,
        }
    }

    /// Every readable `cniCacheV1` entry (with non-empty ifName and
    /// networkName, as libcni's `GetCachedAttachments`), and what was skipped.
    pub fn attachments(&self) -> Result<Listing, Error> {
        let dir = self.cache_dir.join(cache::RESULTS_DIR);
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Listing::default()),
            Err(e) => return Err(Error::Cache(format!("cannot read {}: {e}", dir.display()))),
        };
        let mut names: Vec<String> = rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect();
        names.sort();
        let mut listing = Listing::default();
        for name in names.into_iter().filter(|n| !n.starts_with('.')) {
            let file = dir.join(&name);
            let parsed = fs::read(&file).map_err(|e| e.to_string()).and_then(|b| CacheFile::parse(&b));
            match parsed {
                Ok(CacheFile::V1(entry)) if !entry.if_name.is_empty() && !entry.network_name.is_empty() => {
                    let modified = fs::metadata(&file).and_then(|m| m.modified()).ok();
                    listing.attachments.push(CachedAttachment { file, entry: *entry, modified });
                }
                Ok(CacheFile::V1(_)) => listing.skipped.push((file, "entry without ifName or networkName".into())),
                Ok(CacheFile::Legacy(_)) => listing.skipped.push((file, "legacy entry (result only)".into())),
                Err(e) => listing.skipped.push((file, e)),
            }
        }
        Ok(listing)
    }

    /// ADD: run the chain in order, each plugin getting the previous result
    /// as `prevResult`, cache the final result and return it.
    pub fn add(&self, list: &NetConfList, rt: &RuntimeConf) -> Result<Added, Error> {
        validate(rt)?;
        if rt.netns.is_empty() {
            return Err(Error::Invalid("ADD needs a netns".into()));
        }
        if !Path::new(&rt.netns).exists() {
            return Err(Error::Invalid(format!("netns {} does not exist", rt.netns)));
        }
        let _lock = self.lock(false)?;
        let file = self.cache_file(&list.name, &rt.container_id, &rt.ifname);
        if file.exists() {
            return Err(Error::Invalid(format!(
                "container {:?} is already attached to network {:?} as {} (cache entry {}): DEL it first",
                rt.container_id,
                list.name,
                rt.ifname,
                file.display()
            )));
        }
        let list = self.negotiate(list);
        let bins = self.binaries(&list);
        let missing: Vec<PluginFailure> = bins
            .iter()
            .enumerate()
            .filter_map(|(i, b)| b.as_ref().err().map(|e| failure(&list, i, Command::Add, e.clone())))
            .collect();
        if !missing.is_empty() {
            return Err(Error::Plugins(missing));
        }
        let path_env = exec::cni_path_env(&self.cni_path);
        let env = exec::plugin_env(Command::Add, Some(rt), &path_env);
        let mut prev: Option<(CniResult, Version)> = None;
        for (i, bin) in bins.iter().enumerate() {
            let bin = bin.as_ref().expect("checked above");
            let stdin = list.plugin_request(i, &rt.capability_args, prev.as_ref().map(|p| &p.0));
            let out = exec::invoke(bin, &env, &stdin).and_then(|out| parse_result(&out, list.cni_version));
            match out {
                Ok(r) => prev = Some(r),
                Err(e) => {
                    let mut failures = vec![failure(&list, i, Command::Add, e)];
                    failures.extend(self.del_chain(&list, &bins, rt, None));
                    return Err(Error::Plugins(failures));
                }
            }
        }
        let (result, version) = prev.expect("a list has at least one plugin");
        let entry = CacheEntry {
            container_id: rt.container_id.clone(),
            config: list.raw_bytes.clone(),
            if_name: rt.ifname.clone(),
            network_name: list.name.clone(),
            netns: rt.netns.clone(),
            cni_args: rt.cni_args.clone(),
            capability_args: rt.capability_args.clone(),
            result: Some(result.to_value_lossy(version)),
        };
        if let Err(e) = write_entry(&file, &entry) {
            let mut msg =
                format!("failed to write the cache entry {}: {e}; the attachment was deleted again", file.display());
            for f in self.del_chain(&list, &bins, rt, None) {
                msg.push_str(&format!("\n  also: {f}"));
            }
            return Err(Error::Cache(msg));
        }
        Ok(Added { result, version })
    }

    /// CHECK: every plugin in order with the cached result as `prevResult`.
    /// Succeeds without running anything when the list sets `disableCheck`.
    pub fn check(&self, list: &NetConfList, rt: &RuntimeConf) -> Result<(), Error> {
        validate(rt)?;
        let list = self.negotiate(list);
        if !list.cni_version.supports_check() {
            return Err(Error::Invalid(format!(
                "configuration version {:?} does not support the CHECK command",
                list.cni_version.as_str()
            )));
        }
        if list.disable_check {
            self.note(&format!("network {:?} sets disableCheck: CHECK skipped", list.name));
            return Ok(());
        }
        if rt.netns.is_empty() {
            return Err(Error::Invalid("CHECK needs a netns (none given, none in the cache entry)".into()));
        }
        if !Path::new(&rt.netns).exists() {
            return Err(Error::Invalid(format!("netns {} does not exist", rt.netns)));
        }
        let file = self.cache_file(&list.name, &rt.container_id, &rt.ifname);
        let prev = match read_file(&file) {
            Ok(None) => {
                return Err(Error::Cache(format!(
                "no cached result for container {:?} on network {:?} ({} missing): it was not added, or was deleted",
                rt.container_id,
                list.name,
                file.display()
            )))
            }
            Ok(Some(f)) => f.decoded_result(),
            Err(e) => Err(e),
        }
        .map_err(|e| Error::Cache(format!("cache entry {}: {e}", file.display())))?;
        let path_env = exec::cni_path_env(&self.cni_path);
        let env = exec::plugin_env(Command::Check, Some(rt), &path_env);
        for (i, bin) in self.binaries(&list).into_iter().enumerate() {
            let res = bin
                .and_then(|bin| exec::invoke(&bin, &env, &list.plugin_request(i, &rt.capability_args, prev.as_ref())));
            if let Err(e) = res {
                return Err(Error::Plugins(vec![failure(&list, i, Command::Check, e)]));
            }
        }
        Ok(())
    }

    /// DEL: every plugin in reverse order with the cached result as
    /// `prevResult` (0.4.0 and later), continuing past failures. The cache
    /// entry is removed when all succeeded.
    pub fn del(&self, list: &NetConfList, rt: &RuntimeConf) -> Result<(), Error> {
        validate(rt)?;
        let _lock = self.lock(false)?;
        let list = self.negotiate(list);
        self.del_locked(&list, rt)
    }

    fn del_locked(&self, list: &NetConfList, rt: &RuntimeConf) -> Result<(), Error> {
        let file = self.cache_file(&list.name, &rt.container_id, &rt.ifname);
        let mut prev = None;
        if list.cni_version.has_prev_result_on_del() {
            match read_file(&file).and_then(|f| f.map(|f| f.decoded_result()).transpose()) {
                Ok(None) => self.note(&format!(
                    "no cached result for container {:?} on network {:?}: DEL runs without prevResult",
                    rt.container_id, list.name
                )),
                Ok(Some(r)) => prev = r,
                Err(e) => {
                    self.note(&format!(
                        "cache entry {} is unusable ({e}): removed, DEL continues without prevResult",
                        file.display()
                    ));
                    let _ = fs::remove_file(&file);
                }
            }
        }
        let failures = self.del_chain(list, &self.binaries(list), rt, prev.as_ref());
        if !failures.is_empty() {
            return Err(Error::Plugins(failures));
        }
        match fs::remove_file(&file) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::Cache(format!("DEL succeeded but the cache entry {} stays: {e}", file.display()))),
        }
    }

    /// DEL of every plugin in reverse order; the failures.
    fn del_chain(
        &self,
        list: &NetConfList,
        bins: &Binaries,
        rt: &RuntimeConf,
        prev: Option<&CniResult>,
    ) -> Vec<PluginFailure> {
        let path_env = exec::cni_path_env(&self.cni_path);
        let env = exec::plugin_env(Command::Del, Some(rt), &path_env);
        let mut failures = Vec::new();
        for i in (0..list.plugins.len()).rev() {
            let res = bins[i].clone().and_then(|bin| {
                exec::invoke(&bin, &env, &list.plugin_request(i, &rt.capability_args, prev)).map(|_| ())
            });
            if let Err(e) = res {
                failures.push(failure(list, i, Command::Del, e));
            }
        }
        failures
    }

    /// STATUS (1.1.0): every plugin in order, stopping at the first error,
    /// whose code (50, 51, ...) is kept. Before 1.1.0 nothing runs.
    pub fn status(&self, list: &NetConfList) -> Result<(), Error> {
        let list = self.negotiate(list);
        if !list.cni_version.supports_gc_and_status() {
            self.note(&format!(
                "network {:?} uses version {}: STATUS exists from 1.1.0, nothing to ask",
                list.name, list.cni_version
            ));
            return Ok(());
        }
        let path_env = exec::cni_path_env(&self.cni_path);
        let env = exec::plugin_env(Command::Status, None, &path_env);
        for (i, bin) in self.binaries(&list).into_iter().enumerate() {
            let res = bin.and_then(|bin| exec::invoke(&bin, &env, &list.plugin_request(i, &Map::new(), None)));
            if let Err(e) = res {
                return Err(Error::Plugins(vec![failure(&list, i, Command::Status, e)]));
            }
        }
        Ok(())
    }

    /// GC: the cached attachments of this network are the valid ones, except
    /// those whose netns no longer exists, which get a DEL first; then GC
    /// goes to every plugin (unless `disableGC`, or before 1.1.0), and all
    /// failures are reported.
    pub fn gc(&self, list: &NetConfList) -> Result<GcSummary, Error> {
        if list.disable_gc {
            self.note(&format!("network {:?} sets disableGC: GC skipped", list.name));
            return Ok(GcSummary { disabled: true, ..Default::default() });
        }
        let _lock = self.lock(true)?;
        let list = self.negotiate(list);
        let mut summary = GcSummary::default();
        let mut failures = Vec::new();
        for a in self.attachments()?.attachments.into_iter().filter(|a| a.entry.network_name == list.name) {
            let e = &a.entry;
            let id = Attachment { container_id: e.container_id.clone(), ifname: e.if_name.clone() };
            if e.netns.is_empty() || Path::new(&e.netns).exists() {
                summary.valid.push(id);
                continue;
            }
            self.note(&format!("{}/{}: netns {} is gone, deleting the attachment", e.container_id, e.if_name, e.netns));
            match self.del_locked(&list, &RuntimeConf::from_cache(e)) {
                Ok(()) => summary.deleted.push(id),
                Err(err) => {
                    let tag = format!("{}/{}", e.container_id, e.if_name);
                    match err {
                        Error::Plugins(fs) => failures.extend(fs.into_iter().map(|mut f| {
                            f.attachment = Some(tag.clone());
                            f
                        })),
                        other => failures.push(PluginFailure {
                            plugin: String::new(),
                            command: Command::Del,
                            attachment: Some(tag),
                            error: CniError::internal(other.to_string()),
                        }),
                    }
                }
            }
        }
        if list.cni_version.supports_gc_and_status() {
            summary.plugins_called = true;
            let path_env = exec::cni_path_env(&self.cni_path);
            let env = exec::plugin_env(Command::Gc, None, &path_env);
            for (i, bin) in self.binaries(&list).into_iter().enumerate() {
                let res = bin.and_then(|bin| exec::invoke(&bin, &env, &list.gc_request(i, &summary.valid)));
                if let Err(e) = res {
                    failures.push(failure(&list, i, Command::Gc, e));
                }
            }
        } else {
            self.note(&format!(
                "network {:?} uses version {}: GC exists from 1.1.0, only stale attachments were deleted",
                list.name, list.cni_version
            ));
        }
        if failures.is_empty() {
            Ok(summary)
        } else {
            Err(Error::Plugins(failures))
        }
    }

    /// VERSION of every plugin of the list, asked in the list's version.
    pub fn versions(&self, list: &NetConfList) -> Vec<PluginVersions> {
        let path_env = exec::cni_path_env(&self.cni_path);
        let env = exec::plugin_env(Command::Version, None, &path_env);
        let stdin = serde_json::json!({ "cniVersion": list.cni_version.as_str() }).to_string();
        self.binaries(list)
            .into_iter()
            .enumerate()
            .map(|(i, bin)| PluginVersions {
                plugin: list.plugin_type(i).to_string(),
                path: bin.as_ref().ok().cloned(),
                supported: bin.and_then(|b| match exec::invoke(&b, &env, stdin.as_bytes()) {
                    Ok(out) => parse_versions(&out),
                    // libcni: a plugin that predates VERSION supports 0.1.0.
                    Err(e) if e.msg.contains("unknown CNI_COMMAND: VERSION") => Ok(vec!["0.1.0".into()]),
                    Err(e) => Err(e),
                }),
            })
            .collect()
    }

    /// The list at the version to use: with `cniVersions`, the highest
    /// candidate all plugins support (plugins whose VERSION fails do not
    /// constrain); otherwise as parsed.
    fn negotiate(&self, list: &NetConfList) -> NetConfList {
        let mut list = list.clone();
        let candidates = candidates(&list);
        if candidates.len() < 2 {
            return list;
        }
        let supported: Vec<Option<Vec<String>>> = self.versions(&list).into_iter().map(|v| v.supported.ok()).collect();
        if let Some(v) = negotiate(&candidates, &supported) {
            if v != list.cni_version {
                self.note(&format!(
                    "network {:?}: using version {v}, the highest of {:?} all its plugins support",
                    list.name,
                    candidates.iter().map(|c| c.as_str()).collect::<Vec<_>>()
                ));
                list.cni_version = v;
            }
        }
        list
    }

    fn binaries(&self, list: &NetConfList) -> Binaries {
        (0..list.plugins.len()).map(|i| exec::find_plugin(list.plugin_type(i), &self.cni_path)).collect()
    }

    /// The runner's lock: shared for ADD/DEL, exclusive for GC.
    fn lock(&self, exclusive: bool) -> Result<File, Error> {
        let err =
            |e: std::io::Error| Error::Cache(format!("cannot lock the cache dir {}: {e}", self.cache_dir.display()));
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.cache_dir).map_err(err)?;
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.cache_dir.join("tern-cni.lock"))
            .map_err(err)?;
        if exclusive {
            f.lock().map_err(err)?;
        } else {
            f.lock_shared().map_err(err)?;
        }
        Ok(f)
    }
}

fn validate(rt: &RuntimeConf) -> Result<(), Error> {
    tern_cni::validate::container_id(&rt.container_id).map_err(|e| Error::Invalid(e.to_string()))?;
    tern_cni::validate::interface_name(&rt.ifname).map_err(|e| Error::Invalid(e.to_string()))?;
    Ok(())
}

fn failure(list: &NetConfList, index: usize, command: Command, error: CniError) -> PluginFailure {
    PluginFailure { plugin: list.plugin_type(index).to_string(), command, attachment: None, error }
}

/// An ADD result: its version (the fallback when it has none, as libcni's
/// `fixupResultVersion`) and its content.
fn parse_result(out: &[u8], fallback: Version) -> Result<(CniResult, Version), CniError> {
    let v: Value = serde_json::from_slice(out).map_err(exec::bad_output)?;
    let version = match v.get("cniVersion").and_then(Value::as_str) {
        None | Some("") => fallback,
        Some(s) => s.parse().map_err(|e: CniError| e.context("result cniVersion"))?,
    };
    let r = CniResult::from_value(&v, fallback).map_err(|e| e.context("plugin result"))?;
    Ok((r, version))
}

/// A VERSION reply's supported versions (libcni: without
/// `supportedVersions`, a 0.2.0 reply means 0.1.0 and 0.2.0).
fn parse_versions(out: &[u8]) -> Result<Vec<String>, CniError> {
    let v: Value = serde_json::from_slice(out).map_err(exec::bad_output)?;
    match (v.get("supportedVersions"), v.get("cniVersion").and_then(Value::as_str)) {
        (Some(Value::Array(a)), _) => Ok(a.iter().filter_map(Value::as_str).map(str::to_string).collect()),
        (None, Some("0.2.0")) => Ok(vec!["0.1.0".into(), "0.2.0".into()]),
        _ => Err(exec::bad_output("VERSION reply without supportedVersions")),
    }
}

/// The versions a list offers: those of `cniVersion` ∪ `cniVersions` tern knows.
fn candidates(list: &NetConfList) -> Vec<Version> {
    let single = serde_json::from_slice::<Value>(&list.raw_bytes)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_string));
    let mut out: Vec<Version> =
        single.iter().chain(list.cni_versions.iter()).filter_map(|s| s.parse::<Version>().ok()).collect();
    out.sort();
    out.dedup();
    out
}

/// The highest of `candidates` in every known `supported` list. Pure.
fn negotiate(candidates: &[Version], supported: &[Option<Vec<String>>]) -> Option<Version> {
    candidates.iter().copied().filter(|c| supported.iter().flatten().all(|s| s.iter().any(|v| v == c.as_str()))).max()
}

/// A cache file: `None` if there is none.
fn read_file(path: &Path) -> Result<Option<CacheFile>, String> {
    match fs::read(path) {
        Ok(bytes) => CacheFile::parse(&bytes).map(Some),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// Write an entry as libcni does (directories 0700, file 0600), through a
/// temporary file renamed into place so a crash never leaves half an entry.
fn write_entry(path: &Path, entry: &CacheEntry) -> std::io::Result<()> {
    let dir = path.parent().expect("cache files live in a directory");
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let name = path.file_name().expect("file name").to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        f.write_all(&entry.encode())?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_the_highest_common_version() {
        let c = [Version::V0_4_0, Version::V1_0_0, Version::V1_1_0];
        let reference = Some(vec!["0.3.1".to_string(), "0.4.0".into(), "1.0.0".into()]);
        let tern = Some(Version::ALL.iter().map(|v| v.as_str().to_string()).collect::<Vec<_>>());
        assert_eq!(negotiate(&c, &[tern.clone(), None]), Some(Version::V1_1_0));
        assert_eq!(negotiate(&c, &[tern, reference]), Some(Version::V1_0_0));
        assert_eq!(negotiate(&c, &[Some(vec!["0.1.0".into()])]), None);
    }

    #[test]
    fn candidates_come_from_both_keys() {
        let l = NetConfList::parse(
            br#"{"cniVersion":"0.4.0","cniVersions":["1.0.0","1.1.0","9.0.0"],"name":"n","plugins":[{"type":"x"}]}"#,
        )
        .unwrap();
        assert_eq!(candidates(&l), vec![Version::V0_4_0, Version::V1_0_0, Version::V1_1_0]);
    }

    #[test]
    fn results_keep_their_version() {
        let (r, v) = parse_result(br#"{"ips":[{"address":"10.0.0.2/24"}]}"#, Version::V1_0_0).unwrap();
        assert_eq!((r.ips.len(), v), (1, Version::V1_0_0));
        let (_, v) = parse_result(br#"{"cniVersion":"0.4.0","dns":{}}"#, Version::V1_0_0).unwrap();
        assert_eq!(v, Version::V0_4_0);
        assert!(parse_result(b"nope", Version::V1_0_0).is_err());
        assert_eq!(parse_versions(br#"{"cniVersion":"0.2.0"}"#).unwrap(), ["0.1.0", "0.2.0"]);
    }

    #[test]
    fn failures_read_well() {
        let f = PluginFailure {
            plugin: "portmap".into(),
            command: Command::Del,
            attachment: Some("c/eth0".into()),
            error: CniError::internal("boom"),
        };
        assert_eq!(f.to_string(), r#"stale attachment c/eth0: plugin type="portmap" failed (delete): boom [code 999]"#);
        let e = Error::Plugins(vec![f.clone(), f]);
        assert_eq!(e.code(), Some(999));
        assert!(e.to_string().contains("\n  also: "));
    }
}
