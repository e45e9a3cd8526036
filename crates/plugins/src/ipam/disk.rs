//! The host-local on-disk store, byte-exact with the reference (plugins
//! v1.1.1) so tern-ipam and Go's host-local can share one `dataDir`:
//!
//! - directory `<dataDir>/<network>/` (0755);
//! - one file per reserved address, named by its canonical text
//!   (`10.9.0.2`, `fd00:9::2`), holding `<id>\r\n<ifname>` with no trailing
//!   newline, created with `O_CREAT|O_EXCL` (EEXIST = taken);
//! - `last_reserved_ip.<N>`: the round-robin pointer of range set N;
//! - `lock`: an empty file (0750) locked with flock(2) `LOCK_EX` around each
//!   allocation (per range set), release and lookup, the reference's
//!   granularity. flock, not fcntl locks: that is what Go's host-local uses,
//!   and flock locks belong to the open file description, so every
//!   `DiskStore` (even two in one process) excludes the others.
//!
//! Crash safety: the owner text is written through the `O_EXCL` fd at once.
//! A kill between create and write leaves an empty file; it belongs to
//! nobody, so DEL never matches it, it keeps its address taken (nothing can
//! tell a crashed writer from a live one without the lock), and GC, which
//! runs under the lock when no writer can be mid-way, reclaims it.
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg, OFlag};
use nix::sys::stat::Mode;
use tern_cni::CniError;
use tern_ipam::store::{owned_by, owned_by_legacy, owner_text, Reservation, Store};

const LAST_IP_PREFIX: &str = "last_reserved_ip.";
const LOCK_FILE: &str = "lock";
/// File modes of plugins v1.1.1 (main uses 0600 for data files).
const DATA_MODE: u32 = 0o644;
const LOCK_MODE: u32 = 0o750;
const DIR_MODE: u32 = 0o755;

fn io_err(what: &str, path: &Path, e: impl std::fmt::Display) -> CniError {
    CniError::internal(format!("failed to {what} {}: {e}", path.display()))
}

enum LockState {
    Unlocked(File),
    Locked(Flock<File>),
    /// Only reachable if unlocking failed; the fd is gone, and so is the lock.
    Closed,
}

pub struct DiskStore {
    dir: PathBuf,
    lock: LockState,
}

impl DiskStore {
    /// Open (creating if needed) the store of `network` under `data_dir`.
    pub fn open(data_dir: impl AsRef<Path>, network: &str) -> Result<DiskStore, CniError> {
        let dir = data_dir.as_ref().join(network);
        DirBuilder::new().recursive(true).mode(DIR_MODE).create(&dir).map_err(|e| io_err("create", &dir, e))?;
        Self::open_dir(dir)
    }

    /// Open the store only if its directory exists: DEL, GC and CHECK have
    /// nothing to do (and should create nothing) when there is no state.
    pub fn open_existing(data_dir: impl AsRef<Path>, network: &str) -> Result<Option<DiskStore>, CniError> {
        let dir = data_dir.as_ref().join(network);
        match fs::metadata(&dir) {
            Ok(m) if m.is_dir() => Self::open_dir(dir).map(Some),
            Ok(_) => Err(io_err("open", &dir, "not a directory")),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("open", &dir, e)),
        }
    }

    fn open_dir(dir: PathBuf) -> Result<DiskStore, CniError> {
        // O_CREAT|O_RDONLY like go-filemutex; std refuses create without write.
        let path = dir.join(LOCK_FILE);
        let fd = nix::fcntl::open(
            &path,
            OFlag::O_CREAT | OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(LOCK_MODE),
        )
        .map_err(|e| io_err("open", &path, e))?;
        Ok(DiskStore { dir, lock: LockState::Unlocked(File::from(fd)) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn ip_path(&self, ip: IpAddr) -> PathBuf {
        // Rust prints IPv6 in RFC 5952 form, as Go's net.IP.String does;
        // v4-mapped addresses were canonicalised to IPv4 before getting here.
        self.dir.join(ip.to_string())
    }

    /// Every address file and its content. Other names (`lock`,
    /// `last_reserved_ip.*`, anything foreign) are skipped; unreadable files
    /// too, since a concurrent release may remove them (the reference eats
    /// these errors as well).
    fn scan(&self) -> Result<Vec<(IpAddr, PathBuf, String)>, CniError> {
        let entries = fs::read_dir(&self.dir).map_err(|e| io_err("read", &self.dir, e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(ip) = name.to_str().and_then(|n| n.parse::<IpAddr>().ok()) else {
                continue;
            };
            if !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let path = entry.path();
            if let Ok(content) = fs::read_to_string(&path) {
                out.push((ip, path, content));
            }
        }
        out.sort_by_key(|(ip, _, _)| *ip);
        Ok(out)
    }

    fn remove_matching(&self, matches: impl Fn(&str) -> bool) -> Result<Vec<IpAddr>, CniError> {
        let mut freed = Vec::new();
        for (ip, path, content) in self.scan()? {
            if matches(&content) {
                match fs::remove_file(&path) {
                    Ok(()) => freed.push(ip),
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("remove", &path, e)),
                }
            }
        }
        Ok(freed)
    }
}

impl Store for DiskStore {
    fn lock(&mut self) -> Result<(), CniError> {
        let mut file = match std::mem::replace(&mut self.lock, LockState::Closed) {
            LockState::Unlocked(f) => f,
            held @ LockState::Locked(_) => {
                self.lock = held;
                return Err(CniError::internal("store lock taken twice"));
            }
            LockState::Closed => return Err(CniError::internal("store lock file is closed")),
        };
        loop {
            match Flock::lock(file, FlockArg::LockExclusive) {
                Ok(l) => {
                    self.lock = LockState::Locked(l);
                    return Ok(());
                }
                Err((f, Errno::EINTR)) => file = f,
                Err((f, e)) => {
                    self.lock = LockState::Unlocked(f);
                    return Err(io_err("lock", &self.dir.join(LOCK_FILE), e));
                }
            }
        }
    }

    fn unlock(&mut self) -> Result<(), CniError> {
        match std::mem::replace(&mut self.lock, LockState::Closed) {
            LockState::Locked(l) => match l.unlock() {
                Ok(f) => {
                    self.lock = LockState::Unlocked(f);
                    Ok(())
                }
                // Dropping the Flock unlocks again and closes the fd, which
                // releases the lock in any case.
                Err((_, e)) => Err(io_err("unlock", &self.dir.join(LOCK_FILE), e)),
            },
            other => {
                self.lock = other;
                Ok(())
            }
        }
    }

    fn reserve(&mut self, id: &str, ifname: &str, ip: IpAddr, range_set: usize) -> Result<bool, CniError> {
        let path = self.ip_path(ip);
        let mut f = match OpenOptions::new().read(true).write(true).create_new(true).mode(DATA_MODE).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(io_err("create", &path, e)),
        };
        if let Err(e) = f.write_all(owner_text(id, ifname).as_bytes()) {
            let _ = fs::remove_file(&path);
            return Err(io_err("write", &path, e));
        }
        drop(f);
        // The pointer only steers round-robin; the reservation is already
        // made, so failing the ADD over it would only leak the address.
        let last = self.dir.join(format!("{LAST_IP_PREFIX}{range_set}"));
        let _ = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(DATA_MODE)
            .open(&last)
            .and_then(|mut f| f.write_all(ip.to_string().as_bytes()));
        Ok(true)
    }

    fn last_reserved(&mut self, range_set: usize) -> Result<Option<IpAddr>, CniError> {
        let path = self.dir.join(format!("{LAST_IP_PREFIX}{range_set}"));
        match fs::read_to_string(&path) {
            // A torn or foreign pointer just restarts round-robin.
            Ok(s) => Ok(s.trim().parse::<IpAddr>().ok().map(|ip| ip.to_canonical())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path, e)),
        }
    }

    fn release_by_id(&mut self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
        let freed = self.remove_matching(|c| owned_by(c, id, ifname))?;
        if !freed.is_empty() {
            return Ok(freed);
        }
        // Files written by older plugins hold the id alone.
        self.remove_matching(|c| owned_by_legacy(c, id))
    }

    fn release(&mut self, ip: IpAddr) -> Result<bool, CniError> {
        let path = self.ip_path(ip);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("remove", &path, e)),
        }
    }

    fn get_by_id(&mut self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
        Ok(self
            .scan()?
            .into_iter()
            .filter(|(_, _, c)| owned_by(c, id, ifname) || owned_by_legacy(c, id))
            .map(|(ip, _, _)| ip)
            .collect())
    }

    fn list(&mut self) -> Result<Vec<Reservation>, CniError> {
        Ok(self.scan()?.into_iter().map(|(ip, _, c)| Reservation::parse(ip, &c)).collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tern_cni::args::CniArgs;
    use tern_cni::config::Attachment;
    use tern_cni::{Command, NetConf, Version};
    use tern_ipam::{allocate, gc, release, HostLocalConfig, Locked};

    /// A unique directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let n = N.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!("tern-ipam-{tag}-{}-{n}", std::process::id()));
            let _ = fs::remove_dir_all(&p);
            fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn cfg(ipam: &str) -> HostLocalConfig {
        let json = format!(r#"{{"cniVersion":"1.0.0","name":"net","type":"tern-ipam","ipam":{ipam}}}"#);
        let conf = NetConf::parse(json.as_bytes(), Command::Add, &Version::ALL).unwrap();
        HostLocalConfig::from_conf(&conf, &CniArgs::default()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const DUAL: &str = r#"{"ranges":[[{"subnet":"10.9.0.0/29"}],[{"subnet":"fd00:9::/126"}]]}"#;

    #[test]
    fn on_disk_format_is_byte_exact() {
        let t = TempDir::new("format");
        let mut s = DiskStore::open(&t.0, "net").unwrap();
        allocate(&mut s, &cfg(DUAL), "ctr1", "eth0").unwrap();
        let dir = t.0.join("net");
        assert_eq!(fs::read(dir.join("10.9.0.2")).unwrap(), b"ctr1\r\neth0");
        assert_eq!(fs::read(dir.join("fd00:9::2")).unwrap(), b"ctr1\r\neth0");
        assert_eq!(fs::read(dir.join("last_reserved_ip.0")).unwrap(), b"10.9.0.2");
        assert_eq!(fs::read(dir.join("last_reserved_ip.1")).unwrap(), b"fd00:9::2");
        let lock = fs::metadata(dir.join("lock")).unwrap();
        assert_eq!(lock.len(), 0);
        // 0750 less whatever the umask removes.
        assert_eq!(lock.permissions().mode() & 0o777 & !LOCK_MODE, 0);
        let data = fs::metadata(dir.join("10.9.0.2")).unwrap();
        assert_eq!(data.permissions().mode() & 0o777 & !DATA_MODE, 0);
        let mut names: Vec<String> =
            fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["10.9.0.2", "fd00:9::2", "last_reserved_ip.0", "last_reserved_ip.1", "lock"]);
    }

    /// Appendix A through the disk store, including the pointer left at a
    /// rolled-back address.
    #[test]
    fn appendix_a_on_disk() {
        let t = TempDir::new("appa");
        let c = cfg(DUAL);
        let mut s = DiskStore::open(&t.0, "net").unwrap();
        allocate(&mut s, &c, "ctr1", "eth0").unwrap();
        allocate(&mut s, &c, "ctr2", "eth0").unwrap();
        let e = allocate(&mut s, &c, "ctr3", "eth0").unwrap_err();
        assert_eq!(
            e.msg,
            "failed to allocate for range 1: no IP addresses available in range set: fd00:9::1-fd00:9::3"
        );
        let dir = t.0.join("net");
        assert!(!dir.join("10.9.0.4").exists());
        assert_eq!(fs::read(dir.join("last_reserved_ip.0")).unwrap(), b"10.9.0.4");
        assert_eq!(release(&mut s, "ctr1", "eth0").unwrap(), vec![ip("10.9.0.2"), ip("fd00:9::2")]);
        let r = allocate(&mut s, &c, "ctr4", "eth0").unwrap();
        let got: Vec<String> = r.iter().map(|i| i.address.to_string()).collect();
        assert_eq!(got, ["10.9.0.5/29", "fd00:9::2/126"]);
    }

    #[test]
    fn reads_reference_written_files() {
        let t = TempDir::new("legacy");
        let dir = t.0.join("net");
        fs::create_dir_all(&dir).unwrap();
        // As Go's host-local (and older versions) write them.
        fs::write(dir.join("10.0.0.2"), "ctrA\r\neth0").unwrap();
        fs::write(dir.join("10.0.0.3"), "ctrB").unwrap();
        fs::write(dir.join("10.0.0.4"), "ctrB\r\neth0").unwrap();
        fs::write(dir.join("last_reserved_ip.0"), "10.0.0.4").unwrap();
        let mut s = DiskStore::open_existing(&t.0, "net").unwrap().unwrap();
        let mut l = Locked::new(&mut s).unwrap();
        assert_eq!(l.last_reserved(0).unwrap(), Some(ip("10.0.0.4")));
        assert_eq!(l.get_by_id("ctrB", "eth0").unwrap(), vec![ip("10.0.0.3"), ip("10.0.0.4")]);
        // id+ifname matches first; the legacy file only goes when nothing did.
        assert_eq!(l.release_by_id("ctrB", "eth0").unwrap(), vec![ip("10.0.0.4")]);
        assert_eq!(l.release_by_id("ctrB", "eth0").unwrap(), vec![ip("10.0.0.3")]);
        assert!(l.release_by_id("ctrB", "eth0").unwrap().is_empty());
        assert_eq!(l.list().unwrap(), vec![Reservation::parse(ip("10.0.0.2"), "ctrA\r\neth0")]);
        drop(l);
        assert!(DiskStore::open_existing(&t.0, "other").unwrap().is_none());
        assert!(!t.0.join("other").exists());
    }

    /// A writer killed between create and write leaves an empty file: DEL
    /// ignores it, allocation skips it, GC reclaims it.
    #[test]
    fn empty_file_is_reclaimed_by_gc_only() {
        let t = TempDir::new("orphan");
        let c = cfg(r#"{"subnet":"10.0.0.0/29"}"#);
        let mut s = DiskStore::open(&t.0, "net").unwrap();
        File::create(t.0.join("net/10.0.0.2")).unwrap();
        assert!(release(&mut s, "ctr", "eth0").unwrap().is_empty());
        let r = allocate(&mut s, &c, "ctr", "eth0").unwrap();
        assert_eq!(r[0].address.to_string(), "10.0.0.3/29");
        let keep = [Attachment { container_id: "ctr".into(), ifname: "eth0".into() }];
        assert_eq!(gc(&mut s, &keep).unwrap(), vec![ip("10.0.0.2")]);
        assert!(t.0.join("net/10.0.0.3").exists());
        assert!(t.0.join("net/lock").exists() && t.0.join("net/last_reserved_ip.0").exists());
    }

    /// Each thread opens its own store (its own lock fd), as separate
    /// processes would.
    #[test]
    fn concurrent_threads_get_distinct_addresses() {
        let t = TempDir::new("threads");
        let c = cfg(DUAL.replace("/29", "/24").replace("/126", "/120").as_str());
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let (dir, c) = (t.0.clone(), c.clone());
                std::thread::spawn(move || {
                    let mut got = Vec::new();
                    for j in 0..4 {
                        let mut s = DiskStore::open(&dir, "net").unwrap();
                        got.extend(allocate(&mut s, &c, &format!("ctr-{i}-{j}"), "eth0").unwrap());
                    }
                    got
                })
            })
            .collect();
        let mut all: Vec<IpAddr> =
            handles.into_iter().flat_map(|h| h.join().unwrap()).map(|ipc| ipc.address.addr()).collect();
        assert_eq!(all.len(), 128);
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 128, "an address was handed out twice");
        let files = fs::read_dir(t.0.join("net")).unwrap().count();
        assert_eq!(files, 128 + 3);
    }

    /// Two stores in one process exclude each other (flock is per open file).
    #[test]
    fn lock_excludes_other_store() {
        let t = TempDir::new("lock");
        let mut a = DiskStore::open(&t.0, "net").unwrap();
        let b = DiskStore::open(&t.0, "net").unwrap();
        a.lock().unwrap();
        let LockState::Unlocked(f) = &b.lock else { panic!() };
        let f2 = f.try_clone().unwrap();
        assert!(Flock::lock(f2, FlockArg::LockExclusiveNonblock).is_err());
        a.unlock().unwrap();
        let f3 = f.try_clone().unwrap();
        assert!(Flock::lock(f3, FlockArg::LockExclusiveNonblock).is_ok());
    }
}
