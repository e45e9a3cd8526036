//! tern's eBPF fast path for pod-to-pod traffic: the loader.
//!
//! The datapath is C (`bpf/tern_fastpath.c` at the repository root, compiled
//! by this crate's build script and embedded here). It runs at tc ingress of a
//! fast-path pod's host-side veth and hands packets for another local
//! fast-path pod straight to that pod's interface (`bpf_redirect_peer`),
//! skipping the second veth crossing and the node's forwarding; everything
//! else takes the kernel path unchanged. See the C file for what is and is
//! not redirected.
//!
//! **Host routing** (the agent turns it on: [`FastPath::set_cluster_prefixes`],
//! [`FastPath::set_uplinks`], [`FastPath::attach_uplink`]) extends it across
//! nodes: a pod's packet for a pod of another node leaves straight by the
//! uplink the node's FIB names (`bpf_fib_lookup` + `bpf_redirect`), and the
//! uplink's own program (`tern_uplink`, at its tc ingress) hands packets from
//! other nodes' pods straight to the local pod. Both programs share the
//! instance's maps.
//!
//! # Kernel state
//!
//! * **One program and one endpoint map per node network namespace**,
//!   pinned under `/run/tern/bpf/fastpath-<hash of the object>/<netns
//!   cookie>-<netns inode>/` (`prog`, `tern_endpoints`). The program cannot key a shared
//!   map by namespace: `bpf_get_netns_cookie(skb)` at tc gives the namespace
//!   of the packet's *socket* (the sending pod's) or `init_net`, not the
//!   device's. The cookie (`SO_NETNS_COOKIE`) is never reused, unlike a
//!   namespace's inode number, so a new namespace never finds a dead one's
//!   pins. A new build of the program gets a new directory.
//! * The first ADD of a namespace loads (the verifier runs: tens of ms) and
//!   pins; later ADDs only open the pins. The pins stay while the namespace
//!   lives, even with no pod, so pod churn never pays the load again.
//! * Pins of dead namespaces are swept whenever an instance is loaded and
//!   on GC ([`sweep_dead_namespaces`]): a pin directory goes unless a
//!   namespace bind-mounted under `/run/netns` or of some process has its
//!   inode *and* its cookie (inodes are recycled at once). (A namespace held
//!   only by a file descriptor looks dead: losing its pins is harmless, see
//!   below.) Tests and benchmarks that
//!   throw a node namespace away also call [`unpin_current_netns`] first.
//! * The program is attached to each host veth with a direct-action `cls_bpf`
//!   filter under a `clsact` qdisc (netlink), which belongs to the device:
//!   it goes when the veth goes, whatever happens to the process that made
//!   it. (tcx, the newer attachment, is a BPF link that lives only as long
//!   as a file descriptor or a bpffs pin, i.e. one more object per pod to
//!   leak; aya 0.14 cannot make tcx's link-less attachment.) The attached
//!   filters hold the program and through it the map, so losing the pins
//!   never breaks running pods: the next ADD loads a fresh instance, and
//!   pods of two instances talk through the kernel path.
//! * **Flow cache.** The program remembers each local redirect per CPU
//!   (`tern_flows`) under the generation in `tern_generation`; every change
//!   to the endpoint map here bumps the generation after it, so no decision
//!   outlives the entries it was made from. Packets a remembered redirect
//!   delivers are counted in its slot and handed to the destination's
//!   counter when the slot is reused; [`FastPath::endpoint`] and
//!   [`FastPath::endpoints`] add the slots' pending counts.
//! * Every change (ADD's registration, DEL's removal and unpinning) runs
//!   under one lock file, `/run/tern/fastpath.lock`, so a DEL never unpins
//!   an instance an ADD is registering into.
//!
//! The pins live on a bpffs of tern's own at `/run/tern/bpf`, mounted by the
//! first ADD if it is not there (as Cilium mounts its bpffs), and not on
//! `/sys/fs/bpf`: a plugin started the way `ip netns exec` starts programs
//! (a private mount namespace with a fresh sysfs) sees an empty
//! `/sys/fs/bpf` but the host's `/run`. A plugin whose first ADD runs in
//! such a private namespace mounts a private bpffs that vanishes with it:
//! every ADD then loads an instance of its own, pods of different
//! instances talk through the kernel path, and nothing is left behind.
use std::fmt;
use std::fs::{File, OpenOptions};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use aya::programs::tc::{
    qdisc_add_clsact, NlOptions, SchedClassifier, SchedClassifierLink, TcAttachOptions, TcAttachType, TcError, TcHandle,
};
use aya::programs::{ProgramError, ProgramInfo};
use aya::EbpfLoader;

/// The compiled datapath.
const OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/tern_fastpath.o"));
const PROGRAM: &str = "tern_fastpath";
const UPLINK_PROGRAM: &str = "tern_uplink";
const ENDPOINTS: &str = "tern_endpoints";
/// LPM trie of the cluster's pools (host routing's "is this a pod?").
const CLUSTER: &str = "tern_cluster";
/// The uplinks host routing may send to, by ifindex, with a counter.
const UPLINKS: &str = "tern_uplinks";
/// The flow cache's generation (one u64) and the per-CPU cache itself.
const GENERATION: &str = "tern_generation";
const FLOWS: &str = "tern_flows";
/// `TERN_FLOW_SLOTS` and `sizeof(struct tern_flow)` in the C program.
const FLOW_SLOTS: u32 = 256;
const FLOW_LEN: usize = 96;
/// The uplink program's tc filter: a fixed priority and handle, so a
/// restarted agent replaces its filter instead of adding a second one, and
/// the agent finds it to remove it.
pub const UPLINK_PRIORITY: u16 = 0x7e00;
pub const UPLINK_HANDLE: u32 = 0x7e;
/// tern's own bpffs mount. Not /sys/fs/bpf: plugins started like `ip netns
/// exec` does (a private mount namespace with a fresh /sys) would see an
/// empty /sys/fs/bpf there, while /run is the host's.
pub const BPFFS: &str = "/run/tern/bpf";
const BPF_FS_MAGIC: u64 = 0xcafe_4a11;
/// Serialises the one-time load (two first ADDs at once).
const LOAD_LOCK: &str = "/run/tern/fastpath.lock";

/// `TERN_EP_*` in the C program.
const FLAG_FAST: u32 = 1;
const FLAG_ROUTED: u32 = 2;
const KEY_LEN: usize = 20;
const VALUE_LEN: usize = 32;

type Key = [u8; KEY_LEN];
type Value = [u8; VALUE_LEN];

/// Why the fast path could not be used.
#[derive(Debug)]
pub struct Error(String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

fn err(what: impl fmt::Display, e: impl fmt::Display) -> Error {
    Error(format!("eBPF fast path: {what}: {e}"))
}

/// An error of a call that needs the kernel's BPF support, with a hint when
/// the kernel or the caller's privileges are the cause.
fn kernel_err(what: &str, e: impl fmt::Display + fmt::Debug) -> Error {
    let text = format!("{e} ({e:?})");
    let hint = if text.contains("Operation not permitted") || text.contains("EPERM") {
        ": needs CAP_BPF/CAP_SYS_ADMIN and CAP_NET_ADMIN"
    } else if text.contains("Function not implemented") || text.contains("Invalid argument") {
        " (does the kernel have BPF support? the fast path needs CONFIG_BPF_SYSCALL, CONFIG_NET_CLS_BPF and \
         bpf_redirect_peer, Linux 5.10+; without it use \"dataplane\": \"kernel\")"
    } else {
        ""
    };
    Error(format!("eBPF fast path: {what}: {e}{hint}"))
}

/// FNV-1a of the object, so each build of the program pins its own
/// directory. Computed at compile time: a `const fn` called at run time
/// would hash the whole object on every ADD.
const OBJECT_HASH: u64 = object_hash();

const fn object_hash() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < OBJECT.len() {
        h ^= OBJECT[i] as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    h
}

/// Where this build's instances are pinned, one directory per namespace.
pub fn build_dir() -> PathBuf {
    PathBuf::from(format!("{BPFFS}/fastpath-{:012x}", OBJECT_HASH & 0xffff_ffff_ffff))
}

/// Where the instance of the namespace with this cookie and inode is pinned.
pub fn pin_dir(netns_cookie: u64, netns_inode: u64) -> PathBuf {
    build_dir().join(format!("{netns_cookie}-{netns_inode}"))
}

/// The pin directory of the calling thread's namespace.
fn current_dir() -> Result<(u64, PathBuf)> {
    let cookie = current_cookie()?;
    let inode = std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .map_err(|e| err("netns inode", e))?;
    Ok((cookie, pin_dir(cookie, inode)))
}

fn prog_pin(dir: &Path) -> PathBuf {
    dir.join("prog")
}

fn uplink_prog_pin(dir: &Path) -> PathBuf {
    dir.join("uplink")
}

fn map_pin(dir: &Path) -> PathBuf {
    dir.join(ENDPOINTS)
}

/// Every pin of an instance, maps last (what [`unpin_dir`] removes).
fn all_pins(dir: &Path) -> [PathBuf; 7] {
    [
        prog_pin(dir),
        uplink_prog_pin(dir),
        dir.join(CLUSTER),
        dir.join(UPLINKS),
        dir.join(GENERATION),
        dir.join(FLOWS),
        map_pin(dir),
    ]
}

fn current_cookie() -> Result<u64> {
    tern_sys::netns::current_cookie().map_err(|e| err("netns cookie", e))
}

/// How the pod is connected to the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attachment {
    /// Routed: the host veth is the pod's gateway.
    Routed,
    /// On a bridge (by ifindex): pods of one bridge talk at L2.
    Bridged { bridge_ifindex: u32 },
}

/// One address of a local pod, as the datapath sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: IpAddr,
    /// The pod's host-side veth, in the node namespace.
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
    pub attachment: Attachment,
    /// Redirect packets from and to this pod (cleared: the kernel path, e.g.
    /// for pods that tern-firewall isolates).
    pub fast: bool,
    /// Packets the fast path delivered to this pod (read-only: the program
    /// counts them; writing an endpoint resets it).
    pub redirected: u64,
}

fn key(addr: IpAddr) -> Key {
    let mut k = [0u8; KEY_LEN];
    match addr {
        IpAddr::V4(a) => {
            k[0] = 4;
            k[4..8].copy_from_slice(&a.octets());
        }
        IpAddr::V6(a) => {
            k[0] = 6;
            k[4..20].copy_from_slice(&a.octets());
        }
    }
    k
}

fn decode_key(k: &Key) -> Option<IpAddr> {
    match k[0] {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(&k[4..8]).expect("4 bytes"))),
        6 => Some(IpAddr::from(<[u8; 16]>::try_from(&k[4..20]).expect("16 bytes"))),
        _ => None,
    }
}

fn encode(ep: &Endpoint) -> Value {
    let mut v = [0u8; VALUE_LEN];
    let (routed, segment) = match ep.attachment {
        Attachment::Routed => (FLAG_ROUTED, 0),
        Attachment::Bridged { bridge_ifindex } => (0, bridge_ifindex),
    };
    let flags = routed | if ep.fast { FLAG_FAST } else { 0 };
    v[0..4].copy_from_slice(&ep.host_ifindex.to_ne_bytes());
    v[4..8].copy_from_slice(&flags.to_ne_bytes());
    v[8..12].copy_from_slice(&segment.to_ne_bytes());
    v[12..18].copy_from_slice(&ep.pod_mac);
    v[18..24].copy_from_slice(&ep.host_mac);
    v[24..32].copy_from_slice(&ep.redirected.to_ne_bytes());
    v
}

fn decode(addr: IpAddr, v: &Value) -> Endpoint {
    let u32_at = |i: usize| u32::from_ne_bytes(v[i..i + 4].try_into().expect("4 bytes"));
    let flags = u32_at(4);
    let segment = u32_at(8);
    Endpoint {
        addr,
        host_ifindex: u32_at(0),
        pod_mac: v[12..18].try_into().expect("6 bytes"),
        host_mac: v[18..24].try_into().expect("6 bytes"),
        attachment: if flags & FLAG_ROUTED != 0 {
            Attachment::Routed
        } else {
            Attachment::Bridged { bridge_ifindex: segment }
        },
        fast: flags & FLAG_FAST != 0,
        redirected: u64::from_ne_bytes(v[24..32].try_into().expect("8 bytes")),
    }
}

/// The fast path instance of one node network namespace (the calling
/// thread's when it was opened). Holds the fast-path lock while it lives:
/// open it, make the change, drop it.
pub struct FastPath {
    program: Option<SchedClassifier>,
    endpoints: HashMap<MapData, Key, Value>,
    generation: Array<MapData, u64>,
    netns_cookie: u64,
    dir: PathBuf,
    _lock: nix::fcntl::Flock<File>,
}

/// `struct tern_prefix_key` without the prefix length: the family byte,
/// padding, the address.
type PrefixData = [u8; KEY_LEN];
/// `struct tern_uplink`.
type UplinkValue = [u8; 16];

impl FastPath {
    /// Open this namespace's pinned program and map, loading and pinning
    /// them first if this is the namespace's first fast-path pod. What an
    /// ADD calls.
    pub fn open_or_load() -> Result<FastPath> {
        let (cookie, dir) = current_dir()?;
        let lock = lock()?;
        if all_pins(&dir).iter().any(|p| !p.exists()) {
            ensure_bpffs_locked()?;
            // A rare event (a new node namespace): the moment to forget
            // dead ones.
            sweep_locked();
            load_and_pin(&dir)?;
        }
        Self::open_pinned(cookie, dir, true, lock)?
            .ok_or_else(|| Error("eBPF fast path: pins vanished right after loading".into()))
    }

    /// Open this namespace's pinned map if the fast path was ever loaded in
    /// it (by this build): `None` means there is nothing to clean up (and
    /// costs a `stat`). What DEL, GC and tern-firewall call; never loads.
    pub fn open_existing() -> Result<Option<FastPath>> {
        let (cookie, dir) = current_dir()?;
        if !map_pin(&dir).exists() {
            return Ok(None);
        }
        let lock = lock()?;
        Self::open_pinned(cookie, dir, false, lock)
    }

    fn open_pinned(
        netns_cookie: u64,
        dir: PathBuf,
        with_program: bool,
        lock: nix::fcntl::Flock<File>,
    ) -> Result<Option<FastPath>> {
        let (prog_path, map_path) = (prog_pin(&dir), map_pin(&dir));
        let data = match MapData::from_pin(&map_path) {
            Ok(d) => d,
            // Unpinned by a DEL before we took the lock.
            Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(kernel_err(&format!("open {}", map_path.display()), e)),
        };
        let map = Map::from_map_data(data).map_err(|e| kernel_err("endpoint map", e))?;
        let endpoints = HashMap::try_from(map).map_err(|e| kernel_err("endpoint map", e))?;
        let generation_path = dir.join(GENERATION);
        let generation = MapData::from_pin(&generation_path)
            .map_err(|e| kernel_err(&format!("open {}", generation_path.display()), e))
            .and_then(|d| Map::from_map_data(d).map_err(|e| kernel_err(GENERATION, e)))
            .and_then(|m| Array::try_from(m).map_err(|e| kernel_err(GENERATION, e)))?;
        let program = if with_program {
            // Not SchedClassifier::from_pin: it asks for the program's name
            // in a way that makes aya probe every kernel feature first
            // (about 1.5 ms of test loads, on every ADD).
            let program = ProgramInfo::from_pin(&prog_path)
                .and_then(|info| SchedClassifier::from_program_info(info, PROGRAM.into()));
            match program {
                Ok(p) => Some(p),
                Err(e) => return Err(kernel_err(&format!("open {}", prog_path.display()), e)),
            }
        } else {
            None
        };
        Ok(Some(FastPath { program, endpoints, generation, netns_cookie, dir, _lock: lock }))
    }

    /// The cookie of the node namespace this handle serves.
    pub fn netns_cookie(&self) -> u64 {
        self.netns_cookie
    }

    /// Attach the program at tc ingress of `host_ifname` (a host veth in the
    /// node namespace): a `clsact` qdisc and a direct-action `cls_bpf`
    /// filter, both removed by the kernel with the device.
    pub fn attach(&mut self, host_ifname: &str) -> Result<()> {
        let program = self
            .program
            .as_mut()
            .ok_or_else(|| Error("eBPF fast path: opened without the program (open_or_load attaches)".into()))?;
        ensure_clsact(host_ifname)?;
        let link = program
            .attach_with_options(host_ifname, TcAttachType::Ingress, TcAttachOptions::Netlink(NlOptions::default()))
            .map_err(|e| kernel_err(&format!("attach to {host_ifname} ingress"), e))?;
        // The filter belongs to the device; aya would remove it when the
        // handle is dropped, which is not what a CNI plugin wants.
        let link = program.take_link(link).map_err(|e: ProgramError| err("take the tc link", e))?;
        std::mem::forget(link);
        Ok(())
    }

    fn pinned_map(&self, name: &str) -> Result<Map> {
        let path = self.dir.join(name);
        let data = MapData::from_pin(&path).map_err(|e| kernel_err(&format!("open {}", path.display()), e))?;
        Map::from_map_data(data).map_err(|e| kernel_err(name, e))
    }

    /// Host routing: make the cluster's pools exactly `prefixes` (address,
    /// prefix length). Traffic between addresses inside them is pod-to-pod
    /// and needs no masquerade; nothing outside them is host-routed.
    pub fn set_cluster_prefixes(&mut self, prefixes: &[(IpAddr, u8)]) -> Result<()> {
        let mut trie: LpmTrie<MapData, PrefixData, u32> =
            LpmTrie::try_from(self.pinned_map(CLUSTER)?).map_err(|e| kernel_err(CLUSTER, e))?;
        let want: Vec<LpmKey<PrefixData>> =
            prefixes.iter().map(|&(addr, len)| LpmKey::new(32 + u32::from(len), key(truncate(addr, len)))).collect();
        let have: Vec<LpmKey<PrefixData>> = trie.keys().map_while(|k| k.ok()).collect();
        let same =
            |a: &LpmKey<PrefixData>, b: &LpmKey<PrefixData>| a.prefix_len() == b.prefix_len() && a.data() == b.data();
        for k in have.iter().filter(|k| !want.iter().any(|w| same(w, k))) {
            match trie.remove(k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(kernel_err("remove a cluster prefix", e)),
            }
        }
        for k in &want {
            trie.insert(k, 1, 0).map_err(|e| kernel_err("add a cluster prefix", e))?;
        }
        Ok(())
    }

    /// Host routing: the devices (by ifindex) pod packets may be sent out
    /// of and whose ingress [`Self::attach_uplink`] serves; exactly these.
    /// Counters of devices that stay are kept.
    pub fn set_uplinks(&mut self, ifindexes: &[u32]) -> Result<()> {
        let mut map: HashMap<MapData, u32, UplinkValue> =
            HashMap::try_from(self.pinned_map(UPLINKS)?).map_err(|e| kernel_err(UPLINKS, e))?;
        let have: Vec<u32> = map.keys().map_while(|k| k.ok()).collect();
        for i in have.iter().filter(|i| !ifindexes.contains(i)) {
            match map.remove(i) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(kernel_err("remove an uplink", e)),
            }
        }
        for i in ifindexes.iter().filter(|i| !have.contains(i)) {
            map.insert(*i, [0u8; 16], 0).map_err(|e| kernel_err("add an uplink", e))?;
        }
        Ok(())
    }

    /// Host routing: the registered uplinks with the number of pod packets
    /// sent out of each (approximate: a statistic).
    pub fn uplinks(&self) -> Result<Vec<(u32, u64)>> {
        let map: HashMap<MapData, u32, UplinkValue> =
            HashMap::try_from(self.pinned_map(UPLINKS)?).map_err(|e| kernel_err(UPLINKS, e))?;
        let mut out: Vec<(u32, u64)> = map
            .iter()
            .map_while(|kv| kv.ok())
            .map(|(i, v)| (i, u64::from_ne_bytes(v[8..16].try_into().expect("8 bytes"))))
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Host routing: attach the uplink program at tc ingress of `ifname`
    /// (the underlay device, tern's VXLAN device). A fixed filter priority
    /// and handle: attaching again (an agent restart, a new build) replaces
    /// the program in place, no packet sees no filter.
    pub fn attach_uplink(&mut self, ifname: &str) -> Result<()> {
        let path = uplink_prog_pin(&self.dir);
        let mut program = ProgramInfo::from_pin(&path)
            .and_then(|info| SchedClassifier::from_program_info(info, UPLINK_PROGRAM.into()))
            .map_err(|e| kernel_err(&format!("open {}", path.display()), e))?;
        ensure_clsact(ifname)?;
        let options = || NlOptions { priority: UPLINK_PRIORITY, handle: TcHandle::from(UPLINK_HANDLE), classid: None };
        let link = match program.attach_with_options(ifname, TcAttachType::Ingress, TcAttachOptions::Netlink(options()))
        {
            Ok(link) => link,
            Err(ProgramError::TcError(TcError::NetlinkError(e))) if e.raw_os_error() == Some(nix::libc::EEXIST) => {
                let o = options();
                let existing = SchedClassifierLink::attached(ifname, TcAttachType::Ingress, o.priority, o.handle, None)
                    .map_err(|e| err(format!("{ifname} ingress filter"), e))?;
                program
                    .attach_to_link(existing)
                    .map_err(|e| kernel_err(&format!("replace the filter on {ifname} ingress"), e))?
            }
            Err(e) => return Err(kernel_err(&format!("attach to {ifname} ingress"), e)),
        };
        // The filter belongs to the device (see `attach`).
        let link = program.take_link(link).map_err(|e: ProgramError| err("take the tc link", e))?;
        std::mem::forget(link);
        Ok(())
    }

    /// Register (or replace) one address of a local pod.
    pub fn add_endpoint(&mut self, ep: &Endpoint) -> Result<()> {
        self.endpoints
            .insert(key(ep.addr), encode(ep), 0)
            .map_err(|e| kernel_err(&format!("register {}", ep.addr), e))?;
        self.invalidate_flows()
    }

    /// The entry of `addr` in this namespace, its counter including what
    /// the flow cache has not handed over yet.
    pub fn endpoint(&self, addr: IpAddr) -> Result<Option<Endpoint>> {
        let Some(mut ep) = self.stored_endpoint(addr)? else { return Ok(None) };
        ep.redirected += pending_for(&self.pending_hits()?, &key(addr));
        Ok(Some(ep))
    }

    /// The entry of `addr` as stored, counter without the flow cache's share.
    fn stored_endpoint(&self, addr: IpAddr) -> Result<Option<Endpoint>> {
        match self.endpoints.get(&key(addr), 0) {
            Ok(v) => Ok(Some(decode(addr, &v))),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(kernel_err(&format!("look up {addr}"), e)),
        }
    }

    /// Whether `addr` has an entry with the fast flag (cheaper than
    /// [`Self::endpoint`]: no counters).
    pub fn is_fast(&self, addr: IpAddr) -> Result<bool> {
        Ok(self.stored_endpoint(addr)?.is_some_and(|e| e.fast))
    }

    /// Every entry of this namespace (counters as in [`Self::endpoint`]).
    pub fn endpoints(&self) -> Result<Vec<Endpoint>> {
        let pending = self.pending_hits()?;
        let mut out = self.stored_endpoints();
        for ep in &mut out {
            ep.redirected += pending_for(&pending, &key(ep.addr));
        }
        Ok(out)
    }

    /// Every entry as stored, counters without the flow cache's share.
    fn stored_endpoints(&self) -> Vec<Endpoint> {
        let mut out = Vec::new();
        for k in self.endpoints.keys() {
            // An entry removed while we iterate ends the walk early at worst.
            let Ok(k) = k else { break };
            let Some(addr) = decode_key(&k) else { continue };
            if let Ok(v) = self.endpoints.get(&k, 0) {
                out.push(decode(addr, &v));
            }
        }
        out
    }

    /// Remove the entry of `addr` in this namespace, if any.
    pub fn remove_endpoint(&mut self, addr: IpAddr) -> Result<()> {
        match self.endpoints.remove(&key(addr)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(kernel_err(&format!("remove {addr}"), e)),
        }
        self.invalidate_flows()
    }

    /// A new generation: every remembered redirect is forgotten. Called
    /// after each change to the endpoint map (under the lock, so the
    /// read-modify-write is ours alone).
    fn invalidate_flows(&mut self) -> Result<()> {
        let current = self.generation.get(&0, 0).map_err(|e| kernel_err(GENERATION, e))?;
        self.generation.set(0, current.wrapping_add(1).max(1), 0).map_err(|e| kernel_err(GENERATION, e))
    }

    /// Packets remembered redirects delivered that are not yet in their
    /// destination's counter: (destination key, count) of the current
    /// generation's flows, over every CPU.
    fn pending_hits(&self) -> Result<Vec<(Key, u64)>> {
        let current = self.generation.get(&0, 0).map_err(|e| kernel_err(GENERATION, e))?;
        let path = self.dir.join(FLOWS);
        let flows: PerCpuArray<MapData, [u8; FLOW_LEN]> = MapData::from_pin(&path)
            .map_err(|e| kernel_err(&format!("open {}", path.display()), e))
            .and_then(|d| Map::from_map_data(d).map_err(|e| kernel_err(FLOWS, e)))
            .and_then(|m| PerCpuArray::try_from(m).map_err(|e| kernel_err(FLOWS, e)))?;
        let mut out = Vec::new();
        for slot in 0..FLOW_SLOTS {
            let values = flows.get(&slot, 0).map_err(|e| kernel_err(FLOWS, e))?;
            for flow in values.iter() {
                let generation = u64::from_ne_bytes(flow[0..8].try_into().expect("8 bytes"));
                let hits = u64::from_ne_bytes(flow[8..16].try_into().expect("8 bytes"));
                if generation == current && hits > 0 {
                    // struct tern_flow: generation, hits, ifindex, target, src, dst.
                    out.push((flow[44..64].try_into().expect("20 bytes"), hits));
                }
            }
        }
        Ok(out)
    }

    /// Remove the entries of this namespace that `doomed` selects; returns
    /// how many went.
    pub fn remove_endpoints(&mut self, doomed: impl Fn(&Endpoint) -> bool) -> Result<usize> {
        let victims: Vec<IpAddr> = self.stored_endpoints().into_iter().filter(|e| doomed(e)).map(|e| e.addr).collect();
        for addr in &victims {
            self.remove_endpoint(*addr)?;
        }
        Ok(victims.len())
    }

    /// Take the pod with these addresses off the fast path (`fast: false`,
    /// its packets in both directions go through the node's kernel path and
    /// its netfilter hooks) or put it back. Addresses without an entry are
    /// skipped; returns how many entries changed.
    pub fn set_policy_bypass(&mut self, addrs: &[IpAddr], fast: bool) -> Result<usize> {
        let mut changed = 0;
        for &addr in addrs {
            let Some(mut ep) = self.stored_endpoint(addr)? else { continue };
            if ep.fast != fast {
                ep.fast = fast;
                ep.redirected = 0;
                self.add_endpoint(&ep)?;
                changed += 1;
            }
        }
        Ok(changed)
    }
}

/// The sum of the pending counts (see `FastPath::pending_hits`) of `k`.
fn pending_for(pending: &[(Key, u64)], k: &Key) -> u64 {
    pending.iter().filter(|(pk, _)| pk == k).map(|(_, n)| n).sum()
}

/// A `clsact` qdisc on `ifname`, added unless it is there.
fn ensure_clsact(ifname: &str) -> Result<()> {
    match qdisc_add_clsact(ifname) {
        Ok(()) => Ok(()),
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(nix::libc::EEXIST) => Ok(()),
        Err(e) => Err(kernel_err(&format!("clsact qdisc on {ifname}"), e)),
    }
}

/// `addr` with the bits past `len` cleared.
fn truncate(addr: IpAddr, len: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(len.min(32))).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(len.min(128))).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    }
}

/// Mount tern's bpffs on [`BPFFS`] unless it is there. The first ADD does
/// it; tests call it from the host's mount namespace before starting
/// plugins in private ones.
pub fn ensure_bpffs() -> Result<()> {
    // Under the load lock: two processes that both found it unmounted would
    // otherwise both mount, and the second mount would hide the first one's
    // pins.
    let _lock = lock()?;
    ensure_bpffs_locked()
}

fn ensure_bpffs_locked() -> Result<()> {
    std::fs::create_dir_all(BPFFS).map_err(|e| err(format!("create {BPFFS}"), e))?;
    let is_bpffs =
        |p: &str| nix::sys::statfs::statfs(p).map(|s| s.filesystem_type().0 as u64 == BPF_FS_MAGIC).unwrap_or(false);
    if is_bpffs(BPFFS) {
        return Ok(());
    }
    match nix::mount::mount(Some("bpf"), BPFFS, Some("bpf"), nix::mount::MsFlags::empty(), Some("mode=0700")) {
        Ok(()) => Ok(()),
        // Mounted by a process that does not take the lock.
        Err(_) if is_bpffs(BPFFS) => Ok(()),
        Err(e) => Err(err(format!("mount bpffs on {BPFFS}"), e)),
    }
}

fn lock() -> Result<nix::fcntl::Flock<File>> {
    let path = Path::new(LOAD_LOCK);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(format!("create {}", dir.display()), e))?;
    }
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| err(format!("open {LOAD_LOCK}"), e))?;
    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| err(format!("lock {LOAD_LOCK}"), e))
}

/// Load the object (the verifier runs here), creating or reusing the pinned
/// map, and pin the program. Called with the lock held.
fn load_and_pin(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| err(format!("create {}", dir.display()), e))?;
    let (map_path, cluster_path, uplinks_path) = (map_pin(dir), dir.join(CLUSTER), dir.join(UPLINKS));
    let (generation_path, flows_path) = (dir.join(GENERATION), dir.join(FLOWS));
    let mut ebpf = EbpfLoader::new()
        .map_pin_path(ENDPOINTS, map_path.as_path())
        .map_pin_path(CLUSTER, cluster_path.as_path())
        .map_pin_path(UPLINKS, uplinks_path.as_path())
        .map_pin_path(GENERATION, generation_path.as_path())
        .map_pin_path(FLOWS, flows_path.as_path())
        .load(OBJECT)
        .map_err(|e| kernel_err("load the program", e))?;
    for (name, pin) in [(PROGRAM, prog_pin(dir)), (UPLINK_PROGRAM, uplink_prog_pin(dir))] {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| Error(format!("eBPF fast path: the object has no program {name}")))?
            .try_into()
            .map_err(|e| kernel_err("program type", e))?;
        program.load().map_err(|e| kernel_err(&format!("load {name} (verifier)"), e))?;
        // A program pin without its maps (someone removed a map) is
        // replaced: the program must use the pinned maps.
        let _ = std::fs::remove_file(&pin);
        program.pin(&pin).map_err(|e| kernel_err(&format!("pin {}", pin.display()), e))?;
    }
    Ok(())
}

fn unpin_dir(dir: &Path) -> Result<()> {
    for p in all_pins(dir) {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(format!("remove {}", p.display()), e)),
        }
    }
    let _ = std::fs::remove_dir(dir);
    // The build directory goes with its last namespace (fails while not empty).
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(())
}

/// Remove the pins of the calling thread's namespace, whatever the map
/// holds: for tearing down a node namespace whose pods were not all deleted
/// (tests, benchmarks). Attached filters keep their instance alive until
/// their veths go.
pub fn unpin_current_netns() -> Result<()> {
    let (_, dir) = current_dir()?;
    let _lock = lock()?;
    unpin_dir(&dir)
}

/// Where the calling thread's namespace's instance is (or would be) pinned.
pub fn current_pin_dir() -> Result<PathBuf> {
    Ok(current_dir()?.1)
}

/// Whether the calling thread's namespace has a pinned instance.
pub fn is_pinned_in_current_netns() -> Result<bool> {
    Ok(current_dir()?.1.exists())
}

/// Remove the pins of namespaces that no longer exist, of every build;
/// returns how many instances were unpinned. Cheap when nothing is pinned.
pub fn sweep_dead_namespaces() -> Result<usize> {
    let pinned_any = std::fs::read_dir(BPFFS)
        .map(|d| d.flatten().any(|e| e.file_name().to_string_lossy().starts_with("fastpath-")))
        .unwrap_or(false);
    if !pinned_any {
        return Ok(0);
    }
    let _lock = lock()?;
    Ok(sweep_locked())
}

/// Every namespace we can name, by inode, with a path to open it: bind
/// mounts under /run/netns and the namespaces of all processes.
fn live_netns_paths() -> std::collections::HashMap<u64, PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let mut live = std::collections::HashMap::new();
    let mut add = |p: PathBuf| {
        if let Ok(m) = std::fs::metadata(&p) {
            live.entry(m.ino()).or_insert(p);
        }
    };
    if let Ok(dir) = std::fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            add(e.path());
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if e.file_name().to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
                add(e.path().join("ns/net"));
            }
        }
    }
    live
}

/// Whether the namespace of an instance directory (`<cookie>-<inode>`) is
/// alive. Namespace inodes are recycled at once (the lowest free number), so
/// an inode in use is checked against the cookie, which never is.
fn instance_alive(name: &str, live: &std::collections::HashMap<u64, PathBuf>) -> bool {
    let Some((cookie, inode)) = name.split_once('-') else { return true };
    let (Ok(cookie), Ok(inode)) = (cookie.parse::<u64>(), inode.parse::<u64>()) else { return true };
    let Some(path) = live.get(&inode) else { return false };
    // Unknown (cannot enter, vanished meanwhile): keep, the next sweep decides.
    match tern_sys::netns::NetNs::open(path).and_then(|ns| ns.enter(tern_sys::netns::current_cookie)) {
        Ok(Ok(c)) => c == cookie,
        _ => true,
    }
}

fn sweep_locked() -> usize {
    let Ok(builds) = std::fs::read_dir(BPFFS) else { return 0 };
    let mut live = None;
    let mut swept = 0;
    for build in builds.flatten() {
        if !build.file_name().to_string_lossy().starts_with("fastpath-") {
            continue;
        }
        let Ok(instances) = std::fs::read_dir(build.path()) else { continue };
        for inst in instances.flatten() {
            let name = inst.file_name().to_string_lossy().into_owned();
            let live = live.get_or_insert_with(live_netns_paths);
            if !instance_alive(&name, live) && unpin_dir(&inst.path()).is_ok() {
                swept += 1;
            }
        }
        let _ = std::fs::remove_dir(build.path());
    }
    swept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_and_value_round_trip() {
        let ep = Endpoint {
            addr: "fd00::5".parse().unwrap(),
            host_ifindex: 7,
            host_mac: [2, 0, 0, 0, 0, 1],
            pod_mac: [2, 0, 0, 0, 0, 2],
            attachment: Attachment::Bridged { bridge_ifindex: 3 },
            fast: true,
            redirected: 9,
        };
        assert_eq!(decode(ep.addr, &encode(&ep)), ep);
        let routed = Endpoint { attachment: Attachment::Routed, fast: false, ..ep.clone() };
        assert_eq!(decode(routed.addr, &encode(&routed)), routed);
        let k = key("10.1.2.3".parse().unwrap());
        assert_eq!(decode_key(&k), Some("10.1.2.3".parse().unwrap()));
        assert_eq!(&k[..8], &[4, 0, 0, 0, 10, 1, 2, 3]);
        assert!(k[8..].iter().all(|b| *b == 0));
        let k6 = key("fd00::1".parse().unwrap());
        assert_eq!(decode_key(&k6), Some("fd00::1".parse().unwrap()));
    }

    #[test]
    fn object_is_embedded_and_names_the_program() {
        assert!(OBJECT.starts_with(b"\x7fELF"));
        assert!(OBJECT.windows(PROGRAM.len()).any(|w| w == PROGRAM.as_bytes()));
        assert!(pin_dir(7, 9).starts_with(BPFFS) && pin_dir(7, 9).ends_with("7-9"));
    }
}
