//! Where reservations live: the reference's `backend.Store` interface, an
//! in-memory implementation for tests, and the owner text both share with
//! the on-disk format.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::ops::{Deref, DerefMut};

use tern_cni::CniError;

/// The separator between container id and ifname in a reservation file.
pub const LINE_BREAK: &str = "\r\n";

/// The owner text of a reservation: `<id>\r\n<ifname>`, no trailing newline
/// (byte-exact with host-local; the id is trimmed as the reference does).
pub fn owner_text(id: &str, ifname: &str) -> String {
    format!("{}{LINE_BREAK}{ifname}", id.trim())
}

/// Does stored owner text belong to `id`+`ifname`? Readers compare after
/// trimming, as the reference does.
pub fn owned_by(content: &str, id: &str, ifname: &str) -> bool {
    content.trim() == owner_text(id, ifname)
}

/// Legacy files (older plugins) hold only the container id.
pub fn owned_by_legacy(content: &str, id: &str) -> bool {
    content.trim() == id.trim()
}

/// One reserved address and who holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub ip: IpAddr,
    /// Empty when the file is empty: a reservation whose writer died between
    /// creating and writing it. It belongs to nobody, so DEL never matches
    /// it and only GC reclaims it.
    pub id: String,
    /// `None` for legacy id-only reservations.
    pub ifname: Option<String>,
}

impl Reservation {
    pub fn parse(ip: IpAddr, content: &str) -> Reservation {
        let content = content.trim();
        match content.split_once(LINE_BREAK) {
            Some((id, ifname)) => Reservation { ip, id: id.to_string(), ifname: Some(ifname.to_string()) },
            None => Reservation { ip, id: content.to_string(), ifname: None },
        }
    }

    pub fn is_orphan(&self) -> bool {
        self.id.is_empty()
    }
}

/// The reference's `backend.Store`. Every method except `lock`/`unlock`
/// expects the caller to hold the lock (use [`Locked`]); the allocator takes
/// it per range set, per release and per lookup, like host-local.
pub trait Store {
    fn lock(&mut self) -> Result<(), CniError>;
    fn unlock(&mut self) -> Result<(), CniError>;
    /// Reserve `ip` for `id`+`ifname` and remember it as set
    /// `range_set`'s last reservation. `Ok(false)` when already taken.
    fn reserve(&mut self, id: &str, ifname: &str, ip: IpAddr, range_set: usize) -> Result<bool, CniError>;
    /// The round-robin pointer of `range_set`, if any and readable.
    fn last_reserved(&mut self, range_set: usize) -> Result<Option<IpAddr>, CniError>;
    /// Release everything held by `id`+`ifname`; if nothing matched, whatever
    /// legacy id-only reservations `id` holds. Returns what was freed.
    fn release_by_id(&mut self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError>;
    /// Release one address whoever holds it (rollback and GC, under the lock).
    fn release(&mut self, ip: IpAddr) -> Result<bool, CniError>;
    /// Addresses held by `id`+`ifname` or, legacy, by `id` alone.
    fn get_by_id(&mut self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError>;
    /// Every reservation, for GC and STATUS.
    fn list(&mut self) -> Result<Vec<Reservation>, CniError>;
}

/// Holds a store's lock until dropped.
pub struct Locked<'a, S: Store + ?Sized> {
    store: &'a mut S,
}

impl<'a, S: Store + ?Sized> Locked<'a, S> {
    pub fn new(store: &'a mut S) -> Result<Self, CniError> {
        store.lock()?;
        Ok(Locked { store })
    }
}

impl<S: Store + ?Sized> Deref for Locked<'_, S> {
    type Target = S;
    fn deref(&self) -> &S {
        self.store
    }
}

impl<S: Store + ?Sized> DerefMut for Locked<'_, S> {
    fn deref_mut(&mut self) -> &mut S {
        self.store
    }
}

impl<S: Store + ?Sized> Drop for Locked<'_, S> {
    fn drop(&mut self) {
        // Nothing useful can be done about a failed unlock here; closing the
        // lock fd (or process exit) releases it anyway.
        let _ = self.store.unlock();
    }
}

/// An in-memory store with the disk store's semantics, for tests.
#[derive(Debug, Default, Clone)]
pub struct MemStore {
    /// ip -> owner text, exactly as a file would hold it.
    pub files: BTreeMap<IpAddr, String>,
    pub last: BTreeMap<usize, IpAddr>,
    locked: bool,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }

    fn assert_locked(&self) {
        assert!(self.locked, "store used without holding its lock");
    }

    fn release_matching(&mut self, matches: impl Fn(&str) -> bool) -> Vec<IpAddr> {
        let ips: Vec<IpAddr> = self.files.iter().filter(|(_, c)| matches(c)).map(|(ip, _)| *ip).collect();
        for ip in &ips {
            self.files.remove(ip);
        }
        ips
    }
}

impl Store for MemStore {
    fn lock(&mut self) -> Result<(), CniError> {
        assert!(!self.locked, "lock taken twice");
        self.locked = true;
        Ok(())
    }
    fn unlock(&mut self) -> Result<(), CniError> {
        self.locked = false;
        Ok(())
    }
    fn reserve(&mut self, id: &str, ifname: &str, ip: IpAddr, range_set: usize) -> Result<bool, CniError> {
        self.assert_locked();
        if self.files.contains_key(&ip) {
            return Ok(false);
        }
        self.files.insert(ip, owner_text(id, ifname));
        self.last.insert(range_set, ip);
        Ok(true)
    }
    fn last_reserved(&mut self, range_set: usize) -> Result<Option<IpAddr>, CniError> {
        self.assert_locked();
        Ok(self.last.get(&range_set).copied())
    }
    fn release_by_id(&mut self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
        self.assert_locked();
        let freed = self.release_matching(|c| owned_by(c, id, ifname));
        if !freed.is_empty() {
            return Ok(freed);
        }
        Ok(self.release_matching(|c| owned_by_legacy(c, id)))
    }
    fn release(&mut self, ip: IpAddr) -> Result<bool, CniError> {
        self.assert_locked();
        Ok(self.files.remove(&ip).is_some())
    }
    fn get_by_id(&mut self, id: &str, ifname: &str) -> Result<Vec<IpAddr>, CniError> {
        self.assert_locked();
        Ok(self
            .files
            .iter()
            .filter(|(_, c)| owned_by(c, id, ifname) || owned_by_legacy(c, id))
            .map(|(ip, _)| *ip)
            .collect())
    }
    fn list(&mut self) -> Result<Vec<Reservation>, CniError> {
        self.assert_locked();
        Ok(self.files.iter().map(|(ip, c)| Reservation::parse(*ip, c)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_format_and_parse() {
        assert_eq!(owner_text(" ctr1 ", "eth0"), "ctr1\r\neth0");
        assert!(owned_by("ctr1\r\neth0\n", "ctr1", "eth0"));
        assert!(!owned_by("ctr1\r\neth1", "ctr1", "eth0"));
        assert!(owned_by_legacy("ctr1\n", "ctr1"));
        let ip: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(Reservation::parse(ip, "a\r\neth0").ifname.as_deref(), Some("eth0"));
        assert_eq!(Reservation::parse(ip, "a").ifname, None);
        assert!(Reservation::parse(ip, "").is_orphan());
    }

    #[test]
    fn release_prefers_ifname_then_legacy() {
        let mut s = MemStore::new();
        let a: IpAddr = "10.0.0.2".parse().unwrap();
        let b: IpAddr = "10.0.0.3".parse().unwrap();
        s.files.insert(a, "ctr\r\neth0".into());
        s.files.insert(b, "ctr".into());
        let mut l = Locked::new(&mut s).unwrap();
        assert_eq!(l.get_by_id("ctr", "eth0").unwrap(), vec![a, b]);
        assert_eq!(l.release_by_id("ctr", "eth0").unwrap(), vec![a]);
        assert_eq!(l.release_by_id("ctr", "eth0").unwrap(), vec![b]);
        assert!(l.release_by_id("ctr", "eth0").unwrap().is_empty());
    }
}
