//! `LocalStore`: the embedded datastore, a directory on the node.
//!
//! # Layout of the directory
//!
//! ```text
//! DIR/lock                 flock: shared for reads, exclusive for writes
//! DIR/meta                 512-byte record, rewritten in place: store revision, compaction
//!                          point, lease counter, last collection, boot id, checksum
//! DIR/data/<c1>/<c2>/=<cN> one file per key /c1/c2/.../cN: a header line
//!                          (`tern1 <rev> <create rev> <lease> <deleted ms>`), then the value bytes
//! DIR/leases/<id>          one file per lease: TTL, deadline (CLOCK_BOOTTIME ms), boot id, its keys
//! ```
//!
//! Key components are escaped into file names (`%XX` for anything outside
//! `[A-Za-z0-9._:@+,-]`, a leading `.`, and `%` itself; an empty component is
//! `%`), so any key maps to one path and back; the `=` before a value file's
//! name keeps `/a/b` (file `data/a/=b`) apart from `/a/b/c` (dir `data/a/b/`).
//! A component may be at most 250 bytes once escaped.
//!
//! # Guarantees
//!
//! * Every write happens under the exclusive flock; key and lease files are
//!   replaced atomically (temp file, fsync, rename, fsync of the directory),
//!   so readers (under the shared flock) never see half a value and a crash
//!   leaves the old or the new value. With [`LocalOptions::fsync`] (the
//!   default) an acknowledged write survives a power cut.
//! * Revisions are never reused. The store revision in `meta` is updated
//!   before the key file is written (a process crash skips a revision at
//!   worst). `meta` itself is not synced: a power cut can revert or tear it,
//!   so the first access in a new boot (another boot id) or after a torn
//!   record (bad checksum) rebuilds it from the files, continuing above the
//!   highest revision on disk (and, if the record was lost, treating older
//!   history as compacted). A key file left empty by a power cut counts as
//!   absent; a garbled one is [`StoreError::Corrupt`] (naming the key) for
//!   reads and conditional writes, and an unconditional put or delete
//!   replaces it.
//! * Threads and processes (agent, CLI, CNI plugin) may share one directory.
//!   A lock held for more than [`LocalOptions::lock_timeout`] (a hung
//!   process) turns into [`StoreError::Unavailable`], not a hang.
//! * Deletes leave a tombstone (the revision of the delete) for
//!   [`LocalOptions::tombstone_retention`], which is what lets a watch that
//!   starts at an older revision see deletes. Older start revisions are
//!   [`StoreError::Compacted`].
//!
//! # Limits (what etcd does better)
//!
//! * Leases are checked against `CLOCK_BOOTTIME` plus the boot id: a node
//!   reboot expires every lease (its holders died with the boot), wall-clock
//!   jumps change nothing. Expired keys are invisible to reads at once, but
//!   are deleted (and reported to watches) only by the next write or watch
//!   poll that sweeps, so a delete event may come up to one poll interval late.
//! * Watches poll ([`LocalOptions::poll_interval`], 100 ms by default): a
//!   watch delivers the latest state of every changed key in revision order,
//!   but several writes to one key between two polls arrive as one event (the
//!   last), and a put followed by a delete as just the delete. A watch that
//!   stalls longer than the tombstone retention ends with `Compacted`.
//! * One directory, one node: no replication. Each list reads every file
//!   under the prefix, fine for thousands of keys, not for millions.
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::time::{clock_gettime, ClockId};

use crate::error::{Result, StoreError};
use crate::keys::{check_key, check_prefix};
use crate::{Datastore, KeyValue, Lease, LeaseId, Listing, Revision, Watch, WatchEvent};

/// Tuning for [`LocalStore`].
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// fsync files and directories on every write (default true). Off only
    /// for throwaway stores: a power cut could then lose acknowledged writes.
    pub fsync: bool,
    /// How often a watch looks for changes (default 100 ms).
    pub poll_interval: Duration,
    /// How long deletes stay visible to watches starting in the past
    /// (default 5 minutes).
    pub tombstone_retention: Duration,
    /// Longest wait for the directory's lock (default 10 s).
    pub lock_timeout: Duration,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions {
            fsync: true,
            poll_interval: Duration::from_millis(100),
            tombstone_retention: Duration::from_secs(300),
            lock_timeout: Duration::from_secs(10),
        }
    }
}

/// The embedded store. Cheap to clone (clones share nothing but the
/// directory, like two processes would).
#[derive(Debug, Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    data: PathBuf,
    leases: PathBuf,
    opts: LocalOptions,
    boot_id: String,
    tmp_seq: AtomicU64,
}

const META_MAGIC: &str = "tern-local-store 1";
/// The metadata record is rewritten in place, always this many bytes (one sector).
const META_SIZE: usize = 512;
const ENTRY_MAGIC: &str = "tern1";
const LEASE_MAGIC: &str = "tern-lease 1";
const TMP_PREFIX: &str = ".tmp.";
const MAX_ESCAPED: usize = 250;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    rev: Revision,
    compacted: Revision,
    next_lease: i64,
    last_gc_ms: u64,
    /// The boot that last wrote it: another boot means a reboot (maybe a
    /// power cut) happened since, and the record is re-derived from the files.
    boot_id: String,
}

/// What the metadata file holds.
#[derive(Debug)]
enum MetaState {
    Missing,
    /// Torn or garbled (a power cut while it was rewritten).
    Invalid,
    Valid(Meta),
}

/// One key file.
#[derive(Debug, Clone)]
struct Entry {
    rev: Revision,
    create_rev: Revision,
    lease: i64,
    /// Wall-clock ms of the delete; 0 for a live key.
    deleted_ms: u64,
    value: Vec<u8>,
}

impl Entry {
    fn is_tombstone(&self) -> bool {
        self.deleted_ms != 0
    }
}

#[derive(Debug, Clone)]
struct LeaseFile {
    ttl_secs: i64,
    deadline_ms: u64,
    boot_id: String,
    keys: Vec<String>,
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn boot_ms() -> u64 {
    let ts = clock_gettime(ClockId::CLOCK_BOOTTIME).expect("CLOCK_BOOTTIME");
    ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000
}

fn read_boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

fn escape_component(c: &str) -> String {
    if c.is_empty() {
        return "%".into();
    }
    let mut out = String::with_capacity(c.len());
    for (i, b) in c.bytes().enumerate() {
        let safe = b.is_ascii_alphanumeric() || b"_:@+,-".contains(&b) || (b == b'.' && i > 0);
        if safe {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn unescape_component(s: &str) -> Option<String> {
    if s == "%" {
        return Some(String::new());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn parse_meta(bytes: &[u8]) -> Option<Meta> {
    // "...\nsum <fnv1a64 of everything before this line>\n", then padding.
    let text = std::str::from_utf8(bytes).ok()?;
    let at = text.find("\nsum ")? + 1;
    let (body, rest) = text.split_at(at);
    let sum = rest.strip_prefix("sum ")?.split('\n').next()?;
    if u64::from_str_radix(sum, 16).ok()? != fnv1a64(body.as_bytes()) {
        return None;
    }
    let mut lines = body.lines();
    if lines.next()? != META_MAGIC {
        return None;
    }
    let mut m = Meta { rev: 0, compacted: 0, next_lease: 0, last_gc_ms: 0, boot_id: String::new() };
    for line in lines {
        let (k, v) = line.split_once(' ').unwrap_or((line, ""));
        match k {
            "rev" => m.rev = v.parse().ok()?,
            "compacted" => m.compacted = v.parse().ok()?,
            "next_lease" => m.next_lease = v.parse().ok()?,
            "last_gc" => m.last_gc_ms = v.parse().ok()?,
            "boot" => m.boot_id = v.to_string(),
            _ => {}
        }
    }
    (m.next_lease > 0).then_some(m)
}

fn render_meta(m: &Meta) -> Vec<u8> {
    let body = format!(
        "{META_MAGIC}\nrev {}\ncompacted {}\nnext_lease {}\nlast_gc {}\nboot {}\n",
        m.rev, m.compacted, m.next_lease, m.last_gc_ms, m.boot_id
    );
    let mut out = format!("{body}sum {:016x}\n", fnv1a64(body.as_bytes())).into_bytes();
    assert!(out.len() <= META_SIZE, "metadata record too long");
    out.resize(META_SIZE, b' ');
    out
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

fn parse_entry(bytes: &[u8]) -> std::result::Result<Entry, String> {
    let nl = bytes.iter().position(|b| *b == b'\n').ok_or("no header line")?;
    let header = std::str::from_utf8(&bytes[..nl]).map_err(|_| "header is not UTF-8")?;
    let f: Vec<&str> = header.split(' ').collect();
    if f.len() != 5 || f[0] != ENTRY_MAGIC {
        return Err(format!("bad header {header:?}"));
    }
    let num = |s: &str| s.parse::<i64>().map_err(|_| format!("bad number {s:?} in header"));
    Ok(Entry {
        rev: num(f[1])?,
        create_rev: num(f[2])?,
        lease: num(f[3])?,
        deleted_ms: num(f[4])? as u64,
        value: bytes[nl + 1..].to_vec(),
    })
}

fn render_entry(e: &Entry) -> Vec<u8> {
    let mut out = format!("{ENTRY_MAGIC} {} {} {} {}\n", e.rev, e.create_rev, e.lease, e.deleted_ms).into_bytes();
    out.extend_from_slice(&e.value);
    out
}

fn parse_lease(text: &str) -> Option<LeaseFile> {
    let mut lines = text.lines();
    if lines.next()? != LEASE_MAGIC {
        return None;
    }
    let mut l = LeaseFile { ttl_secs: 0, deadline_ms: 0, boot_id: String::new(), keys: Vec::new() };
    for line in lines {
        let (k, v) = line.split_once(' ')?;
        match k {
            "ttl" => l.ttl_secs = v.parse().ok()?,
            "deadline" => l.deadline_ms = v.parse().ok()?,
            "boot" => l.boot_id = v.to_string(),
            "key" => l.keys.push(v.to_string()),
            _ => {}
        }
    }
    (l.ttl_secs > 0).then_some(l)
}

fn render_lease(l: &LeaseFile) -> String {
    let mut s = format!("{LEASE_MAGIC}\nttl {}\ndeadline {}\nboot {}\n", l.ttl_secs, l.deadline_ms, l.boot_id);
    for k in &l.keys {
        s.push_str("key ");
        s.push_str(k);
        s.push('\n');
    }
    s
}

/// Holds the directory's lock (released on drop, with the file).
struct LockGuard {
    _file: File,
}

/// An exclusive-lock write transaction.
struct Tx<'a> {
    store: &'a LocalStore,
    meta: Meta,
    _lock: LockGuard,
}

impl Tx<'_> {
    /// The next revision (strictly above `at_least`), persisted in `meta`
    /// before any key file is written with it.
    fn next_rev(&mut self, at_least: Revision) -> Result<Revision> {
        self.meta.rev = self.meta.rev.max(at_least) + 1;
        self.store.write_meta(&self.meta)?;
        Ok(self.meta.rev)
    }

    /// Tombstones the live keys of an expired or revoked lease (one revision
    /// for all of them, as etcd does) and removes the lease file.
    fn end_lease(&mut self, id: i64, lease: Option<&LeaseFile>) -> Result<()> {
        let s = self.store;
        let mut victims = Vec::new();
        for key in lease.map(|l| l.keys.as_slice()).unwrap_or_default() {
            let Ok(path) = s.key_path(key) else { continue };
            if let Some(e) = s.read_entry_lenient(key, &path)? {
                if !e.is_tombstone() && e.lease == id {
                    victims.push((path, e));
                }
            }
        }
        if !victims.is_empty() {
            let max = victims.iter().map(|(_, e)| e.rev).max().unwrap_or(0);
            let rev = self.next_rev(max)?;
            for (path, _) in victims {
                s.write_entry(&path, &tombstone(rev))?;
            }
        }
        let lp = s.lease_path(id);
        match fs::remove_file(&lp) {
            Ok(()) => s.sync_dir(&s.inner.leases),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(s.io_err("remove", &lp, e)),
        }
    }

    /// Ends every expired lease.
    fn sweep_leases(&mut self) -> Result<()> {
        let now = boot_ms();
        for (id, lease) in self.store.read_leases()? {
            let expired = match &lease {
                Some(l) => !self.store.lease_alive(l, now),
                None => true, // unreadable: treat as expired
            };
            if expired {
                self.end_lease(id, lease.as_ref())?;
            }
        }
        Ok(())
    }

    /// Drops old tombstones and stray temp files, deletes keys whose lease is
    /// gone (in case a lease file was lost), prunes empty directories.
    fn gc(&mut self) -> Result<()> {
        let s = self.store;
        let now_ms = wall_ms();
        let retention = s.inner.opts.tombstone_retention.as_millis() as u64;
        let mut files = Vec::new();
        s.walk("", &mut |key, path| files.push((key, path)))?;
        let leases: HashMap<i64, Option<LeaseFile>> = s.read_leases()?.into_iter().collect();
        let now_boot = boot_ms();
        let mut orphans = Vec::new();
        let mut expired = Vec::new();
        for (key, path) in files {
            let Some(e) = s.read_entry_lenient(&key, &path)? else {
                if fs::metadata(&path).is_ok_and(|m| m.len() == 0) {
                    s.remove(&path)?; // a create lost to a power cut
                }
                continue;
            };
            if e.is_tombstone() {
                if e.deleted_ms + retention <= now_ms {
                    expired.push((path, e.rev));
                }
            } else if e.lease != 0
                && !leases.get(&e.lease).is_some_and(|l| l.as_ref().is_some_and(|l| s.lease_alive(l, now_boot)))
            {
                orphans.push((path, e.rev));
            }
        }
        // Record the new compaction point before the history goes, so no
        // crash can leave a watch believing it saw every delete.
        if let Some(max) = expired.iter().map(|(_, r)| *r).max() {
            self.meta.compacted = self.meta.compacted.max(max);
            s.write_meta(&self.meta)?;
            for (path, _) in &expired {
                s.remove(path)?;
            }
        }
        if !orphans.is_empty() {
            let max = orphans.iter().map(|(_, r)| *r).max().unwrap_or(0);
            let rev = self.next_rev(max)?;
            for (path, _) in orphans {
                s.write_entry(&path, &tombstone(rev))?;
            }
        }
        s.prune(&s.inner.data, true)?;
        self.meta.last_gc_ms = now_ms;
        s.write_meta(&self.meta)
    }
}

fn tombstone(rev: Revision) -> Entry {
    Entry { rev, create_rev: 0, lease: 0, deleted_ms: wall_ms().max(1), value: Vec::new() }
}

impl LocalStore {
    /// Opens (creating if needed) the store in `dir` with default options.
    pub fn open(dir: impl AsRef<Path>) -> Result<LocalStore> {
        LocalStore::open_with(dir, LocalOptions::default())
    }

    pub fn open_with(dir: impl AsRef<Path>, opts: LocalOptions) -> Result<LocalStore> {
        let root = dir.as_ref().to_path_buf();
        let inner = Inner {
            data: root.join("data"),
            leases: root.join("leases"),
            root,
            opts,
            boot_id: read_boot_id(),
            tmp_seq: AtomicU64::new(0),
        };
        let s = LocalStore { inner: Arc::new(inner) };
        for d in [&s.inner.root, &s.inner.data, &s.inner.leases] {
            fs::create_dir_all(d).map_err(|e| s.io_err("create", d, e))?;
        }
        let tx = s.write_tx_raw()?;
        drop(tx);
        Ok(s)
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn io_err(&self, what: &str, path: &Path, e: io::Error) -> StoreError {
        StoreError::Unavailable { store: self.describe(), detail: format!("{what} {}: {e}", path.display()) }
    }

    fn lock(&self, exclusive: bool) -> Result<LockGuard> {
        let path = self.inner.root.join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| self.io_err("open", &path, e))?;
        let deadline = Instant::now() + self.inner.opts.lock_timeout;
        // Short pauses: flock has no queue, so a waiter that sleeps long
        // keeps losing to busy neighbours.
        let mut pause = Duration::from_micros(50);
        loop {
            let r = if exclusive { file.try_lock() } else { file.try_lock_shared() };
            match r {
                Ok(()) => return Ok(LockGuard { _file: file }),
                Err(fs::TryLockError::WouldBlock) => {
                    if Instant::now() >= deadline {
                        return Err(StoreError::Unavailable {
                            store: self.describe(),
                            detail: format!(
                                "{} is locked by another process for more than {:?}",
                                path.display(),
                                self.inner.opts.lock_timeout
                            ),
                        });
                    }
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(2));
                }
                Err(fs::TryLockError::Error(e)) => return Err(self.io_err("lock", &path, e)),
            }
        }
    }

    fn meta_path(&self) -> PathBuf {
        self.inner.root.join("meta")
    }

    fn read_meta(&self) -> Result<MetaState> {
        let path = self.meta_path();
        match fs::read(&path) {
            Ok(bytes) if bytes.is_empty() => Ok(MetaState::Invalid),
            Ok(bytes) => Ok(parse_meta(&bytes).map(MetaState::Valid).unwrap_or(MetaState::Invalid)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(MetaState::Missing),
            Err(e) => Err(self.io_err("read", &path, e)),
        }
    }

    /// Rewrites the fixed-size record in place: no rename, no fsync. Every
    /// reader and writer holds the lock, so nobody sees it half written; a
    /// power cut can tear or revert it, which the next boot detects (boot id,
    /// checksum) and repairs from the files ([`LocalStore::recover_meta`]).
    fn write_meta(&self, m: &Meta) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let path = self.meta_path();
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| self.io_err("open", &path, e))?;
        f.write_all_at(&render_meta(m), 0).map_err(|e| self.io_err("write", &path, e))
    }

    /// The current metadata, under a shared lock that the caller keeps while
    /// it reads keys. Repairs the metadata first if it needs it.
    fn read_view(&self) -> Result<(LockGuard, Meta)> {
        loop {
            let lock = self.lock(false)?;
            if let MetaState::Valid(m) = self.read_meta()? {
                if m.boot_id == self.inner.boot_id {
                    return Ok((lock, m));
                }
            }
            drop(lock);
            drop(self.write_tx_raw()?);
        }
    }

    /// New metadata for a store that has none, a torn one, or one from an
    /// earlier boot: the revision continues above every revision on disk
    /// (writes after the last metadata update may have reached the disk
    /// without it), lease ids continue above every lease file.
    fn recover_meta(&self, old: Option<Meta>) -> Result<Meta> {
        let mut max_rev = 0;
        let mut files = Vec::new();
        self.walk("", &mut |k, p| files.push((k, p)))?;
        for (key, path) in files {
            if let Ok(Some(e)) = self.read_entry(&key, &path) {
                max_rev = max_rev.max(e.rev);
            }
        }
        let max_lease = self.read_leases()?.iter().map(|(id, _)| *id).max().unwrap_or(0);
        let fresh_lease = || {
            // Varying start: a wiped and recreated store does not hand out ids an old client still holds.
            ((boot_ms() ^ (wall_ms() << 8) ^ std::process::id() as u64) & 0x0fff_ffff_ffff) as i64 + 1
        };
        Ok(match old {
            Some(m) => Meta {
                rev: m.rev.max(max_rev),
                compacted: m.compacted,
                next_lease: m.next_lease.max(max_lease + 1),
                last_gc_ms: m.last_gc_ms,
                boot_id: self.inner.boot_id.clone(),
            },
            None => Meta {
                rev: max_rev,
                // History before a lost record is unknown: older watches must relist.
                compacted: max_rev,
                next_lease: fresh_lease().max(max_lease + 1),
                last_gc_ms: wall_ms(),
                boot_id: self.inner.boot_id.clone(),
            },
        })
    }

    fn sync_dir(&self, dir: &Path) -> Result<()> {
        if self.inner.opts.fsync {
            File::open(dir).and_then(|d| d.sync_all()).map_err(|e| self.io_err("fsync", dir, e))?;
        }
        Ok(())
    }

    /// Temp file in the same directory, fsync, rename over `path`, fsync the directory.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let dir = path.parent().expect("store paths have a parent");
        let n = self.inner.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!("{TMP_PREFIX}{}.{n}", std::process::id()));
        let write = |tmp: &Path| -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(tmp)?;
            f.write_all(bytes)?;
            if self.inner.opts.fsync {
                f.sync_data()?;
            }
            Ok(())
        };
        if let Err(e) = write(&tmp) {
            let _ = fs::remove_file(&tmp);
            if e.kind() == io::ErrorKind::NotFound {
                // The directory was pruned or never made: create it and retry once.
                fs::create_dir_all(dir).map_err(|e| self.io_err("create", dir, e))?;
                write(&tmp).map_err(|e| {
                    let _ = fs::remove_file(&tmp);
                    self.io_err("write", &tmp, e)
                })?;
            } else {
                return Err(self.io_err("write", &tmp, e));
            }
        }
        fs::rename(&tmp, path).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            self.io_err("rename", path, e)
        })?;
        self.sync_dir(dir)
    }

    fn remove(&self, path: &Path) -> Result<()> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io_err("remove", path, e)),
        }
    }

    /// Removes empty directories below `dir` (and `dir` itself unless `keep`).
    fn prune(&self, dir: &Path, keep: bool) -> Result<bool> {
        let mut empty = true;
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(self.io_err("read", dir, e)),
        };
        for ent in rd {
            let ent = ent.map_err(|e| self.io_err("read", dir, e))?;
            let name = ent.file_name();
            let name = name.to_string_lossy();
            let ft = ent.file_type().map_err(|e| self.io_err("stat", &ent.path(), e))?;
            if name.starts_with(TMP_PREFIX) {
                // Under the exclusive lock nobody is writing: a leftover of a crash.
                self.remove(&ent.path())?;
            } else if ft.is_dir() {
                if !self.prune(&ent.path(), false)? {
                    empty = false;
                }
            } else {
                empty = false;
            }
        }
        if empty && !keep {
            let _ = fs::remove_dir(dir);
        }
        Ok(empty)
    }

    fn key_path(&self, key: &str) -> Result<PathBuf> {
        check_key(key)?;
        let comps: Vec<&str> = key[1..].split('/').collect();
        let mut p = self.inner.data.clone();
        for (i, c) in comps.iter().enumerate() {
            let esc = escape_component(c);
            if esc.len() > MAX_ESCAPED {
                return Err(StoreError::Invalid(format!("key {key:?}: component too long for the local store")));
            }
            if i + 1 == comps.len() {
                p.push(format!("={esc}"));
            } else {
                p.push(esc);
            }
        }
        Ok(p)
    }

    fn lease_path(&self, id: i64) -> PathBuf {
        self.inner.leases.join(id.to_string())
    }

    fn read_entry(&self, key: &str, path: &Path) -> Result<Option<Entry>> {
        match fs::read(path) {
            // Only a power cut makes an empty file (a created file whose data
            // never reached the disk): the write did not happen.
            Ok(bytes) if bytes.is_empty() => Ok(None),
            Ok(bytes) => parse_entry(&bytes).map(Some).map_err(|d| StoreError::corrupt(key, d)),
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory => Ok(None),
            Err(e) => Err(self.io_err("read", path, e)),
        }
    }

    /// Like `read_entry`, but a garbled file counts as absent: for
    /// housekeeping and watches, which must not stop at one bad file (reads
    /// of that key still report it as Corrupt).
    fn read_entry_lenient(&self, key: &str, path: &Path) -> Result<Option<Entry>> {
        match self.read_entry(key, path) {
            Err(StoreError::Corrupt { .. }) => Ok(None),
            r => r,
        }
    }

    fn write_entry(&self, path: &Path, e: &Entry) -> Result<()> {
        self.write_atomic(path, &render_entry(e))
    }

    fn read_lease(&self, id: i64) -> Result<Option<LeaseFile>> {
        let path = self.lease_path(id);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(parse_lease(&text)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err("read", &path, e)),
        }
    }

    /// Every lease file: id and contents (`None` if unreadable).
    fn read_leases(&self) -> Result<Vec<(i64, Option<LeaseFile>)>> {
        let dir = &self.inner.leases;
        let mut out = Vec::new();
        let rd = fs::read_dir(dir).map_err(|e| self.io_err("read", dir, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| self.io_err("read", dir, e))?;
            let name = ent.file_name();
            let Some(id) = name.to_str().and_then(|n| n.parse::<i64>().ok()) else { continue };
            out.push((id, self.read_lease(id)?));
        }
        Ok(out)
    }

    fn lease_alive(&self, l: &LeaseFile, now_boot_ms: u64) -> bool {
        l.boot_id == self.inner.boot_id && l.deadline_ms > now_boot_ms
    }

    /// Whether lease `id` is alive, memoised in `cache` for one read.
    fn alive_cached(&self, id: i64, cache: &mut HashMap<i64, bool>, now: u64) -> Result<bool> {
        if let Some(a) = cache.get(&id) {
            return Ok(*a);
        }
        let a = self.read_lease(id)?.is_some_and(|l| self.lease_alive(&l, now));
        cache.insert(id, a);
        Ok(a)
    }

    /// A live entry as a KeyValue (tombstones and keys of dead leases: None).
    fn live(&self, key: &str, e: Entry, cache: &mut HashMap<i64, bool>, now: u64) -> Result<Option<KeyValue>> {
        if e.is_tombstone() || (e.lease != 0 && !self.alive_cached(e.lease, cache, now)?) {
            return Ok(None);
        }
        Ok(Some(KeyValue {
            key: key.to_string(),
            value: e.value,
            revision: e.rev,
            create_revision: e.create_rev,
            lease: (e.lease != 0).then_some(LeaseId(e.lease)),
        }))
    }

    /// Calls `f(key, path)` for every key file whose key starts with `prefix`.
    fn walk(&self, prefix: &str, f: &mut dyn FnMut(String, PathBuf)) -> Result<()> {
        // Descend to the deepest directory the prefix names completely.
        let mut dir = self.inner.data.clone();
        let mut dir_key = String::from("/");
        if let Some(rest) = prefix.strip_prefix('/') {
            let comps: Vec<&str> = rest.split('/').collect();
            for c in &comps[..comps.len() - 1] {
                dir.push(escape_component(c));
                dir_key.push_str(c);
                dir_key.push('/');
            }
        }
        self.walk_dir(&dir, &dir_key, prefix, f)
    }

    fn walk_dir(&self, dir: &Path, dir_key: &str, prefix: &str, f: &mut dyn FnMut(String, PathBuf)) -> Result<()> {
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.kind() == io::ErrorKind::NotADirectory => return Ok(()),
            Err(e) => return Err(self.io_err("read", dir, e)),
        };
        for ent in rd {
            let ent = ent.map_err(|e| self.io_err("read", dir, e))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with(TMP_PREFIX) {
                continue;
            }
            if let Some(file) = name.strip_prefix('=') {
                let Some(c) = unescape_component(file) else { continue };
                let key = format!("{dir_key}{c}");
                if key.starts_with(prefix) {
                    f(key, ent.path());
                }
            } else {
                let Some(c) = unescape_component(name) else { continue };
                let sub = format!("{dir_key}{c}/");
                if (sub.starts_with(prefix) || prefix.starts_with(&sub))
                    && ent.file_type().map_err(|e| self.io_err("stat", &ent.path(), e))?.is_dir()
                {
                    self.walk_dir(&ent.path(), &sub, prefix, f)?;
                }
            }
        }
        Ok(())
    }

    /// Takes the exclusive lock and reads (initialises, repairs) the metadata.
    fn write_tx_raw(&self) -> Result<Tx<'_>> {
        let lock = self.lock(true)?;
        let meta = match self.read_meta()? {
            MetaState::Valid(m) if m.boot_id == self.inner.boot_id => m,
            state => {
                let m = self.recover_meta(match state {
                    MetaState::Valid(m) => Some(m),
                    _ => None,
                })?;
                self.write_meta(&m)?;
                m
            }
        };
        Ok(Tx { store: self, meta, _lock: lock })
    }

    /// A write transaction with housekeeping done: expired leases ended and,
    /// when due, tombstones collected.
    fn write_tx(&self) -> Result<Tx<'_>> {
        let mut tx = self.write_tx_raw()?;
        tx.sweep_leases()?;
        let half = self.inner.opts.tombstone_retention.as_millis() as u64 / 2;
        if wall_ms().saturating_sub(tx.meta.last_gc_ms) >= half {
            tx.gc()?;
        }
        Ok(tx)
    }

    /// Whether a lease has expired or collection is due, without locking.
    fn housekeeping_due(&self) -> Result<bool> {
        let now = boot_ms();
        for (_, l) in self.read_leases()? {
            if !l.is_some_and(|l| self.lease_alive(&l, now)) {
                return Ok(true);
            }
        }
        let half = self.inner.opts.tombstone_retention.as_millis() as u64 / 2;
        Ok(match self.read_meta()? {
            MetaState::Valid(m) => m.boot_id != self.inner.boot_id || wall_ms().saturating_sub(m.last_gc_ms) >= half,
            _ => true,
        })
    }

    /// Runs housekeeping now (what writes and watch polls do when it is due).
    pub fn housekeeping(&self) -> Result<()> {
        self.write_tx().map(drop)
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<i64> {
        let Some(LeaseId(id)) = lease else { return Ok(0) };
        match self.read_lease(id)? {
            Some(l) if self.lease_alive(&l, boot_ms()) => Ok(id),
            _ => Err(StoreError::LeaseNotFound(id)),
        }
    }

    /// The live entry at `path`, if any.
    fn current(&self, key: &str, path: &Path) -> Result<Option<Entry>> {
        let Some(e) = self.read_entry(key, path)? else { return Ok(None) };
        if e.is_tombstone() {
            return Ok(Some(e));
        }
        if e.lease != 0 && !self.read_lease(e.lease)?.is_some_and(|l| self.lease_alive(&l, boot_ms())) {
            // Expired between the sweep and now: absent, at its old revision.
            return Ok(Some(Entry { deleted_ms: 1, ..e }));
        }
        Ok(Some(e))
    }

    /// The write shared by put, create and compare-and-swap, under `tx`.
    fn write_key(
        &self,
        tx: &mut Tx<'_>,
        key: &str,
        path: &Path,
        cur: Option<&Entry>,
        value: &[u8],
        lease: i64,
    ) -> Result<Revision> {
        let live = cur.filter(|e| !e.is_tombstone());
        let rev = tx.next_rev(cur.map(|e| e.rev).unwrap_or(0))?;
        let create_rev = live.map(|e| e.create_rev).unwrap_or(rev);
        self.write_entry(path, &Entry { rev, create_rev, lease, deleted_ms: 0, value: value.to_vec() })?;
        if lease != 0 {
            let mut l = self.read_lease(lease)?.ok_or(StoreError::LeaseNotFound(lease))?;
            if !l.keys.iter().any(|k| k == key) {
                l.keys.push(key.to_string());
                self.write_atomic(&self.lease_path(lease), render_lease(&l).as_bytes())?;
            }
        }
        Ok(rev)
    }

    fn conditional(
        &self,
        key: &str,
        expect: Expect,
        value: Option<&[u8]>,
        lease: Option<LeaseId>,
    ) -> Result<Option<Revision>> {
        let path = self.key_path(key)?;
        let mut tx = self.write_tx()?;
        let lease = self.check_lease(lease)?;
        // A garbled file fails conditional writes (Corrupt), but an
        // unconditional put or delete replaces it: that is the repair.
        let (cur, garbled) = match self.current(key, &path) {
            Err(StoreError::Corrupt { .. }) if matches!(expect, Expect::Any) => (None, true),
            r => (r?, false),
        };
        let live = cur.as_ref().filter(|e| !e.is_tombstone());
        match (expect, live) {
            (Expect::Any, _) => {}
            (Expect::Absent, Some(e)) => return Err(StoreError::Conflict { key: key.into(), current: e.rev }),
            (Expect::Absent, None) => {}
            (Expect::Revision(_), None) => return Err(StoreError::NotFound { key: key.into() }),
            (Expect::Revision(r), Some(e)) if e.rev != r => {
                return Err(StoreError::Conflict { key: key.into(), current: e.rev })
            }
            (Expect::Revision(_), Some(_)) => {}
        }
        match value {
            Some(v) => self.write_key(&mut tx, key, &path, cur.as_ref(), v, lease).map(Some),
            None => {
                let at_least = match live {
                    Some(e) => e.rev,
                    None if garbled => 0,
                    None => return Ok(None),
                };
                let rev = tx.next_rev(at_least)?;
                self.write_entry(&path, &tombstone(rev))?;
                Ok(Some(rev))
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Expect {
    Any,
    Absent,
    Revision(Revision),
}

fn ttl_secs(ttl: Duration) -> Result<i64> {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    if secs == 0 || secs > i64::MAX as u64 / 1000 {
        return Err(StoreError::Invalid(format!("lease TTL {ttl:?}: must be at least 1 s")));
    }
    Ok(secs as i64)
}

impl Datastore for LocalStore {
    fn describe(&self) -> String {
        format!("local {}", self.inner.root.display())
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let path = self.key_path(key)?;
        let _lock = self.lock(false)?;
        let Some(e) = self.read_entry(key, &path)? else { return Ok(None) };
        self.live(key, e, &mut HashMap::new(), boot_ms())
    }

    fn list(&self, prefix: &str) -> Result<Listing> {
        check_prefix(prefix)?;
        let (_lock, meta) = self.read_view()?;
        let mut files = Vec::new();
        self.walk(prefix, &mut |k, p| files.push((k, p)))?;
        let mut cache = HashMap::new();
        let now = boot_ms();
        let mut kvs = Vec::new();
        for (key, path) in files {
            if let Some(e) = self.read_entry(&key, &path)? {
                if let Some(kv) = self.live(&key, e, &mut cache, now)? {
                    kvs.push(kv);
                }
            }
        }
        kvs.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Listing { kvs, revision: meta.rev })
    }

    fn put(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision> {
        Ok(self.conditional(key, Expect::Any, Some(value), lease)?.expect("a put writes"))
    }

    fn create(&self, key: &str, value: &[u8], lease: Option<LeaseId>) -> Result<Revision> {
        Ok(self.conditional(key, Expect::Absent, Some(value), lease)?.expect("a create writes"))
    }

    fn compare_and_swap(
        &self,
        key: &str,
        expected: Revision,
        value: &[u8],
        lease: Option<LeaseId>,
    ) -> Result<Revision> {
        Ok(self.conditional(key, Expect::Revision(expected), Some(value), lease)?.expect("a swap writes"))
    }

    fn delete(&self, key: &str) -> Result<bool> {
        Ok(self.conditional(key, Expect::Any, None, None)?.is_some())
    }

    fn delete_if_revision(&self, key: &str, expected: Revision) -> Result<()> {
        self.conditional(key, Expect::Revision(expected), None, None).map(drop)
    }

    fn grant_lease(&self, ttl: Duration) -> Result<Lease> {
        let secs = ttl_secs(ttl)?;
        let mut tx = self.write_tx()?;
        let id = tx.meta.next_lease;
        tx.meta.next_lease += 1;
        self.write_meta(&tx.meta)?;
        let l = LeaseFile {
            ttl_secs: secs,
            deadline_ms: boot_ms() + secs as u64 * 1000,
            boot_id: self.inner.boot_id.clone(),
            keys: Vec::new(),
        };
        self.write_atomic(&self.lease_path(id), render_lease(&l).as_bytes())?;
        Ok(Lease { id: LeaseId(id), ttl: Duration::from_secs(secs as u64) })
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let _tx = self.write_tx()?; // sweeps: an expired lease is gone after this
        let mut l = self.read_lease(lease.0)?.ok_or(StoreError::LeaseNotFound(lease.0))?;
        l.deadline_ms = boot_ms() + l.ttl_secs as u64 * 1000;
        self.write_atomic(&self.lease_path(lease.0), render_lease(&l).as_bytes())?;
        Ok(Duration::from_secs(l.ttl_secs as u64))
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let mut tx = self.write_tx()?;
        let Some(l) = self.read_lease(lease.0)? else { return Ok(()) };
        tx.end_lease(lease.0, Some(&l))
    }

    fn watch(&self, prefix: &str, start: Option<Revision>) -> Result<Watch> {
        check_prefix(prefix)?;
        let (lock, meta) = self.read_view()?;
        drop(lock);
        let cursor = match start {
            Some(s) if s <= meta.compacted => {
                return Err(StoreError::Compacted { requested: s, compacted: meta.compacted })
            }
            Some(s) => s - 1,
            None => meta.rev,
        };
        let (tx, rx) = mpsc::channel();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let poller = Poller { store: self.clone(), prefix: prefix.to_string(), cursor, stop: stop_rx, tx };
        let thread = std::thread::Builder::new()
            .name("tern-store-watch".into())
            .spawn(move || poller.run())
            .map_err(|e| StoreError::Unavailable { store: self.describe(), detail: format!("watch thread: {e}") })?;
        Ok(Watch::new(rx, Box::new(StopOnDrop { stop: Some(stop_tx), thread: Some(thread) })))
    }
}

/// Dropping the watch wakes the poller and waits for it to finish (at most
/// one poll), so nothing touches the directory after the watch is gone.
struct StopOnDrop {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Poller {
    store: LocalStore,
    prefix: String,
    cursor: Revision,
    /// Disconnected when the watch is dropped.
    stop: mpsc::Receiver<()>,
    tx: mpsc::Sender<Result<WatchEvent>>,
}

impl Poller {
    fn run(mut self) {
        let interval = self.store.inner.opts.poll_interval;
        loop {
            match self.poll() {
                Ok(events) => {
                    for ev in events {
                        if self.tx.send(Ok(ev)).is_err() {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = self.tx.send(Err(e));
                    return;
                }
            }
            match self.stop.recv_timeout(interval) {
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        }
    }

    fn poll(&mut self) -> Result<Vec<WatchEvent>> {
        let s = &self.store;
        if s.housekeeping_due()? {
            s.housekeeping()?;
        }
        let (_lock, meta) = s.read_view()?;
        if meta.compacted > self.cursor {
            return Err(StoreError::Compacted { requested: self.cursor + 1, compacted: meta.compacted });
        }
        if meta.rev <= self.cursor {
            return Ok(Vec::new());
        }
        let mut files = Vec::new();
        s.walk(&self.prefix, &mut |k, p| files.push((k, p)))?;
        let mut cache = HashMap::new();
        let now = boot_ms();
        let mut events = Vec::new();
        for (key, path) in files {
            let Some(e) = s.read_entry_lenient(&key, &path)? else { continue };
            if e.rev <= self.cursor {
                continue;
            }
            if e.is_tombstone() {
                events.push(WatchEvent::Delete { key, revision: e.rev });
            } else if let Some(kv) = s.live(&key, e, &mut cache, now)? {
                events.push(WatchEvent::Put(kv));
            }
        }
        events.sort_by(|a, b| a.revision().cmp(&b.revision()).then_with(|| a.key().cmp(b.key())));
        self.cursor = meta.rev;
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_roundtrips() {
        for c in ["", "a", "10.0.0.0-26", "fd00::40-122", ".hidden", "..", "a b", "%", "=x", "ünï", "a.b", "x/y"] {
            let e = escape_component(c);
            assert!(!e.starts_with('.') && !e.starts_with('=') && !e.contains('/'), "{c:?} -> {e:?}");
            assert_eq!(unescape_component(&e).as_deref(), Some(c), "{c:?} -> {e:?}");
        }
        assert_eq!(escape_component("10.0.0.0-26"), "10.0.0.0-26");
        assert_eq!(escape_component(".x"), "%2Ex");
        assert_eq!(unescape_component("%4"), None);
    }

    #[test]
    fn formats_roundtrip() {
        let m = Meta { rev: 7, compacted: 3, next_lease: 99, last_gc_ms: 5, boot_id: "b-1".into() };
        let bytes = render_meta(&m);
        assert_eq!(bytes.len(), META_SIZE);
        assert_eq!(parse_meta(&bytes), Some(m));
        // Torn or garbled records are detected.
        assert_eq!(parse_meta(&bytes[..40]), None);
        let mut flipped = bytes.clone();
        flipped[25] ^= 1;
        assert_eq!(parse_meta(&flipped), None);
        let e = Entry { rev: 5, create_rev: 2, lease: 9, deleted_ms: 0, value: b"a\nb".to_vec() };
        let back = parse_entry(&render_entry(&e)).unwrap();
        assert_eq!((back.rev, back.create_rev, back.lease, back.value), (5, 2, 9, b"a\nb".to_vec()));
        assert!(parse_entry(b"junk").is_err());
        assert!(parse_entry(b"tern1 x 1 1 0\n").is_err());
        let l = LeaseFile { ttl_secs: 2, deadline_ms: 10, boot_id: "b".into(), keys: vec!["/a".into(), "/b c".into()] };
        let lb = parse_lease(&render_lease(&l)).unwrap();
        assert_eq!(lb.keys, l.keys);
        assert_eq!(ttl_secs(Duration::from_millis(1500)).unwrap(), 2);
        assert!(ttl_secs(Duration::ZERO).is_err());
    }
}
