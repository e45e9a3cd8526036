//! Cluster IPAM block arithmetic: pools cut into fixed-size blocks, the
//! order in which a node tries blocks, and the allocation bitmap of one block.
//!
//! The model is Calico's block affinity: a cluster CIDR (a [`Pool`]) is cut
//! into blocks of one size (default /26 for IPv4, /122 for IPv6); a node
//! claims whole blocks (in the datastore, with compare-and-swap: see
//! `tern-store`), then hands out addresses from its own blocks without asking
//! anyone. This module is the pure part: no I/O, no clock, no randomness.
//!
//! * [`Pool`]: validation (no host bits, block size within the pool and
//!   between [`MIN_BLOCK_HOST_BITS`]..=[`MAX_BLOCK_HOST_BITS`] host bits), block
//!   count, `index <-> block`, `address -> block`.
//! * [`Pool::candidates`]: every block of the pool exactly once, in an order
//!   seeded by the node name. The order is a full-cycle affine permutation
//!   `index(i) = (start + i * stride) mod count` with an odd `stride` (the
//!   block count is a power of two, so every odd stride visits every block),
//!   `start` and `stride` taken from a stable hash of the name (FNV-1a plus
//!   splitmix64, fixed here forever: changing it only changes which free
//!   block a node tries first, never correctness). Nodes therefore start in
//!   different places and walk different paths instead of all contending on
//!   block 0.
//! * [`Bitmap`] / [`Block`]: which addresses of one block are in use:
//!   allocate the lowest free or a specific address, release, utilisation,
//!   emptiness, and a compact JSON form (`{"cidr":"10.0.0.0/26","used":"<hex>"}`).
//!
//! Every address of a block is allocatable, including the block's first and
//! last: pods get /32 (/128) routes, so there is no per-block network or
//! broadcast address. Reserving addresses (for example a tunnel address) is
//! the caller's business: allocate them like any other.
use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::range::to_u128;

/// Default IPv4 block: /26, 64 addresses (Calico's default).
pub const DEFAULT_BLOCK_PREFIX_V4: u8 = 26;
/// Default IPv6 block: /122, 64 addresses (Calico's default).
pub const DEFAULT_BLOCK_PREFIX_V6: u8 = 122;
/// Largest block: 12 host bits, 4096 addresses (/20, /116), as Calico allows.
pub const MAX_BLOCK_HOST_BITS: u8 = 12;
/// Smallest block: one address (/32, /128).
pub const MIN_BLOCK_HOST_BITS: u8 = 0;

/// The default block prefix for the family of `cidr`.
pub fn default_block_prefix(cidr: &IpNet) -> u8 {
    match cidr {
        IpNet::V4(_) => DEFAULT_BLOCK_PREFIX_V4,
        IpNet::V6(_) => DEFAULT_BLOCK_PREFIX_V6,
    }
}

/// Why a pool, block, address or stored bitmap was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlockError {
    /// The CIDR has bits set beyond its prefix (`10.0.0.1/24`).
    HostBits { cidr: IpNet },
    /// The block prefix is outside the pool or the allowed sizes.
    BlockPrefix { cidr: IpNet, block_prefix: u8, reason: String },
    /// The address is not inside the block (or pool).
    NotInBlock { ip: IpAddr, block: IpNet },
    /// A specific address was asked for and is already in use.
    InUse { ip: IpAddr },
    /// Stored allocation data that does not fit the block.
    BadBitmap { reason: String },
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockError::HostBits { cidr } => {
                write!(f, "{cidr} has host bits set (the network is {})", cidr.trunc())
            }
            BlockError::BlockPrefix { cidr, block_prefix, reason } => {
                write!(f, "block size /{block_prefix} does not fit pool {cidr}: {reason}")
            }
            BlockError::NotInBlock { ip, block } => write!(f, "{ip} is not in {block}"),
            BlockError::InUse { ip } => write!(f, "{ip} is already allocated"),
            BlockError::BadBitmap { reason } => write!(f, "bad block allocation data: {reason}"),
        }
    }
}

impl std::error::Error for BlockError {}

fn addr_from_u128(like: &IpNet, v: u128) -> IpAddr {
    match like {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::from(v as u32)),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

fn same_family(net: &IpNet, ip: &IpAddr) -> bool {
    matches!((net, ip), (IpNet::V4(_), IpAddr::V4(_)) | (IpNet::V6(_), IpAddr::V6(_)))
}

fn check_no_host_bits(cidr: &IpNet) -> Result<(), BlockError> {
    if cidr.addr() != cidr.network() {
        return Err(BlockError::HostBits { cidr: *cidr });
    }
    Ok(())
}

/// `2^bits - 1` for bits in 0..=128.
fn low_mask(bits: u32) -> u128 {
    if bits >= 128 {
        u128::MAX
    } else {
        (1u128 << bits) - 1
    }
}

/// A cluster CIDR cut into blocks of one prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pool {
    cidr: IpNet,
    block_prefix: u8,
}

impl Pool {
    /// Validates `cidr` (no host bits) and the block prefix (default
    /// [`default_block_prefix`]): at least the pool's prefix, and 0..=12 host
    /// bits. A pool of more than 2^127 blocks (only `::/0` with /128 blocks)
    /// is refused too.
    pub fn new(cidr: IpNet, block_prefix: Option<u8>) -> Result<Pool, BlockError> {
        check_no_host_bits(&cidr)?;
        let block_prefix = block_prefix.unwrap_or_else(|| default_block_prefix(&cidr));
        let max = cidr.max_prefix_len();
        let bad = |reason: String| Err(BlockError::BlockPrefix { cidr, block_prefix, reason });
        if block_prefix > max {
            return bad(format!("the longest prefix is /{max}"));
        }
        if block_prefix < cidr.prefix_len() {
            return bad("a block cannot be larger than its pool".into());
        }
        let host_bits = max - block_prefix;
        if !(MIN_BLOCK_HOST_BITS..=MAX_BLOCK_HOST_BITS).contains(&host_bits) {
            return bad(format!(
                "blocks hold 1 to {} addresses (/{} to /{max})",
                1u32 << MAX_BLOCK_HOST_BITS,
                max - MAX_BLOCK_HOST_BITS
            ));
        }
        if block_prefix - cidr.prefix_len() > 127 {
            return bad("more than 2^127 blocks".into());
        }
        Ok(Pool { cidr, block_prefix })
    }

    /// Parses `cidr` (e.g. `"10.244.0.0/16"`) and validates as [`Pool::new`].
    pub fn parse(cidr: &str, block_prefix: Option<u8>) -> Result<Pool, String> {
        let net: IpNet = cidr.trim().parse().map_err(|_| format!("invalid CIDR: {cidr}"))?;
        Pool::new(net, block_prefix).map_err(|e| e.to_string())
    }

    pub fn cidr(&self) -> IpNet {
        self.cidr
    }

    pub fn block_prefix(&self) -> u8 {
        self.block_prefix
    }

    pub fn is_ipv4(&self) -> bool {
        matches!(self.cidr, IpNet::V4(_))
    }

    /// Addresses per block (1..=4096).
    pub fn block_size(&self) -> u32 {
        1u32 << (self.cidr.max_prefix_len() - self.block_prefix)
    }

    fn index_bits(&self) -> u32 {
        (self.block_prefix - self.cidr.prefix_len()) as u32
    }

    fn host_bits(&self) -> u32 {
        (self.cidr.max_prefix_len() - self.block_prefix) as u32
    }

    /// Number of blocks: `2^(block_prefix - pool prefix)`, at most 2^127.
    pub fn block_count(&self) -> u128 {
        1u128 << self.index_bits()
    }

    /// The `index`-th block in address order, if `index < block_count()`.
    pub fn block_at(&self, index: u128) -> Option<IpNet> {
        if index >= self.block_count() {
            return None;
        }
        let base = to_u128(self.cidr.network()) + (index << self.host_bits());
        Some(IpNet::new(addr_from_u128(&self.cidr, base), self.block_prefix).expect("valid prefix"))
    }

    /// The index of `block` if it is one of this pool's blocks (same size,
    /// aligned, inside).
    pub fn index_of(&self, block: &IpNet) -> Option<u128> {
        if block.prefix_len() != self.block_prefix || block.addr() != block.network() {
            return None;
        }
        if !same_family(&self.cidr, &block.addr()) || !self.cidr.contains(&block.addr()) {
            return None;
        }
        Some((to_u128(block.addr()) - to_u128(self.cidr.network())) >> self.host_bits())
    }

    /// Whether `block` is one of this pool's blocks.
    pub fn has_block(&self, block: &IpNet) -> bool {
        self.index_of(block).is_some()
    }

    /// The block of this pool that holds `ip`, if the pool holds `ip`.
    pub fn block_of(&self, ip: IpAddr) -> Option<IpNet> {
        let ip = ip.to_canonical();
        if !same_family(&self.cidr, &ip) || !self.cidr.contains(&ip) {
            return None;
        }
        let base = to_u128(ip) & !low_mask(self.host_bits());
        Some(IpNet::new(addr_from_u128(&self.cidr, base), self.block_prefix).expect("valid prefix"))
    }

    /// Every block of the pool exactly once, in an order seeded by `seed`
    /// (the node name): deterministic for one seed, different across seeds.
    /// Lazy: taking the first few of a huge IPv6 pool costs nothing.
    pub fn candidates(&self, seed: &str) -> Candidates {
        let mask = low_mask(self.index_bits());
        let mut h = SplitMix(fnv1a64(seed.as_bytes()));
        let start = (((h.next() as u128) << 64) | h.next() as u128) & mask;
        let stride = ((((h.next() as u128) << 64) | h.next() as u128) | 1) & mask;
        Candidates { pool: *self, start, stride, mask, next: 0, count: self.block_count() }
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (blocks /{})", self.cidr, self.block_prefix)
    }
}

/// The block of prefix `block_prefix` that holds `ip` (any pool), or `None`
/// when the prefix is longer than the family allows.
pub fn block_containing(ip: IpAddr, block_prefix: u8) -> Option<IpNet> {
    IpNet::new(ip.to_canonical(), block_prefix).ok().map(|n| n.trunc())
}

/// FNV-1a, 64 bit: stable across platforms and Rust versions (unlike std's
/// hasher), so a node's block order never changes between releases.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// splitmix64: spreads the FNV hash into several well-mixed words.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// See [`Pool::candidates`].
#[derive(Debug, Clone)]
pub struct Candidates {
    pool: Pool,
    start: u128,
    stride: u128,
    mask: u128,
    next: u128,
    count: u128,
}

impl Candidates {
    /// The pool index of the `i`-th candidate.
    fn index(&self, i: u128) -> u128 {
        self.start.wrapping_add(i.wrapping_mul(self.stride)) & self.mask
    }
}

impl Iterator for Candidates {
    type Item = IpNet;

    fn next(&mut self) -> Option<IpNet> {
        if self.next >= self.count {
            return None;
        }
        let idx = self.index(self.next);
        self.next += 1;
        self.pool.block_at(idx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.count - self.next;
        let n = usize::try_from(left).unwrap_or(usize::MAX);
        (n, usize::try_from(left).ok())
    }
}

/// Which ordinals (offsets from the block's first address) are in use.
/// At most 4096 bits.
#[derive(Clone, PartialEq, Eq)]
pub struct Bitmap {
    size: u32,
    words: Vec<u64>,
}

impl fmt::Debug for Bitmap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bitmap({}/{} used: {})", self.used(), self.size, self.ranges_text())
    }
}

impl Bitmap {
    /// An empty bitmap of `size` ordinals. Panics unless `1 <= size <= 4096`
    /// (the caller derives sizes from validated prefixes).
    pub fn new(size: u32) -> Bitmap {
        assert!(
            (1..=1u32 << MAX_BLOCK_HOST_BITS).contains(&size),
            "bitmap size {size} out of range 1..={}",
            1u32 << MAX_BLOCK_HOST_BITS
        );
        Bitmap { size, words: vec![0; size.div_ceil(64) as usize] }
    }

    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn get(&self, ord: u32) -> bool {
        ord < self.size && self.words[(ord / 64) as usize] & (1u64 << (ord % 64)) != 0
    }

    /// Marks `ord` used; true if it was free. Panics if out of range.
    pub fn set(&mut self, ord: u32) -> bool {
        assert!(ord < self.size, "ordinal {ord} out of range (size {})", self.size);
        let w = &mut self.words[(ord / 64) as usize];
        let bit = 1u64 << (ord % 64);
        let was_free = *w & bit == 0;
        *w |= bit;
        was_free
    }

    /// Marks `ord` free; true if it was used. Out of range: false.
    pub fn clear(&mut self, ord: u32) -> bool {
        if ord >= self.size {
            return false;
        }
        let w = &mut self.words[(ord / 64) as usize];
        let bit = 1u64 << (ord % 64);
        let was_used = *w & bit != 0;
        *w &= !bit;
        was_used
    }

    pub fn used(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }

    pub fn free(&self) -> u32 {
        self.size - self.used()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    pub fn is_full(&self) -> bool {
        self.used() == self.size
    }

    /// Fraction in use, 0.0..=1.0.
    pub fn utilisation(&self) -> f64 {
        self.used() as f64 / self.size as f64
    }

    /// The lowest free ordinal.
    pub fn lowest_free(&self) -> Option<u32> {
        for (i, w) in self.words.iter().enumerate() {
            if *w != u64::MAX {
                let ord = i as u32 * 64 + w.trailing_ones();
                return (ord < self.size).then_some(ord);
            }
        }
        None
    }

    /// Takes the lowest free ordinal.
    pub fn allocate_lowest(&mut self) -> Option<u32> {
        let ord = self.lowest_free()?;
        self.set(ord);
        Some(ord)
    }

    /// Used ordinals, ascending.
    pub fn iter_used(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(i, w)| {
            let mut w = *w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some(i as u32 * 64 + b)
            })
        })
    }

    /// Used ordinals as inclusive runs, ascending.
    pub fn ranges(&self) -> Vec<(u32, u32)> {
        let mut out: Vec<(u32, u32)> = Vec::new();
        for ord in self.iter_used() {
            match out.last_mut() {
                Some((_, end)) if *end + 1 == ord => *end = ord,
                _ => out.push((ord, ord)),
            }
        }
        out
    }

    /// `0-3,7,9-10` (empty string when nothing is used).
    pub fn ranges_text(&self) -> String {
        let parts: Vec<String> =
            self.ranges().iter().map(|(a, b)| if a == b { a.to_string() } else { format!("{a}-{b}") }).collect();
        parts.join(",")
    }

    /// Lowercase hex, one byte per 8 ordinals, byte `j` holding ordinals
    /// `8j..8j+8` with ordinal `8j` in its lowest bit: ordinal 0 alone is
    /// `"01..."`, ordinals 0-7 `"ff..."`. `ceil(size/8)*2` characters (16 for
    /// a /26, 1024 for 4096 addresses).
    pub fn to_hex(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let nbytes = self.size.div_ceil(8) as usize;
        let mut s = String::with_capacity(nbytes * 2);
        for j in 0..nbytes {
            let byte = (self.words[j / 8] >> ((j % 8) * 8)) as u8;
            s.push(HEX[(byte >> 4) as usize] as char);
            s.push(HEX[(byte & 0xf) as usize] as char);
        }
        s
    }

    /// Parses [`Bitmap::to_hex`] for a bitmap of `size` ordinals: the length
    /// must match and no bit beyond `size` may be set.
    pub fn from_hex(size: u32, hex: &str) -> Result<Bitmap, BlockError> {
        if !(1..=1u32 << MAX_BLOCK_HOST_BITS).contains(&size) {
            return Err(BlockError::BadBitmap { reason: format!("size {size} out of range") });
        }
        let nbytes = size.div_ceil(8) as usize;
        if hex.len() != nbytes * 2 {
            return Err(BlockError::BadBitmap {
                reason: format!("{} hex digits for {size} addresses, expected {}", hex.len(), nbytes * 2),
            });
        }
        let mut bm = Bitmap::new(size);
        let digits = hex.as_bytes();
        for j in 0..nbytes {
            let hi = hex_val(digits[2 * j]);
            let lo = hex_val(digits[2 * j + 1]);
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(BlockError::BadBitmap { reason: format!("not hex: {hex:?}") });
            };
            let byte = (hi << 4 | lo) as u64;
            bm.words[j / 8] |= byte << ((j % 8) * 8);
        }
        let last = size % 64;
        if last != 0 && bm.words[bm.words.len() - 1] >> last != 0 {
            return Err(BlockError::BadBitmap { reason: format!("bits set beyond {size} addresses") });
        }
        Ok(bm)
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// One block and its allocations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    cidr: IpNet,
    bitmap: Bitmap,
}

impl Block {
    /// An empty block. `cidr` must have no host bits and hold 1..=4096 addresses.
    pub fn new(cidr: IpNet) -> Result<Block, BlockError> {
        check_no_host_bits(&cidr)?;
        let host_bits = cidr.max_prefix_len() - cidr.prefix_len();
        if host_bits > MAX_BLOCK_HOST_BITS {
            return Err(BlockError::BlockPrefix {
                cidr,
                block_prefix: cidr.prefix_len(),
                reason: format!("blocks hold at most {} addresses", 1u32 << MAX_BLOCK_HOST_BITS),
            });
        }
        Ok(Block { cidr, bitmap: Bitmap::new(1u32 << host_bits) })
    }

    /// A block with the given allocations (sizes must agree).
    pub fn with_bitmap(cidr: IpNet, bitmap: Bitmap) -> Result<Block, BlockError> {
        let mut b = Block::new(cidr)?;
        if bitmap.size() != b.bitmap.size() {
            return Err(BlockError::BadBitmap {
                reason: format!("{} addresses of allocation data for {cidr} ({})", bitmap.size(), b.bitmap.size()),
            });
        }
        b.bitmap = bitmap;
        Ok(b)
    }

    pub fn cidr(&self) -> IpNet {
        self.cidr
    }

    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.ordinal(ip).is_some()
    }

    /// The offset of `ip` from the block's first address.
    pub fn ordinal(&self, ip: IpAddr) -> Option<u32> {
        let ip = ip.to_canonical();
        if !same_family(&self.cidr, &ip) || !self.cidr.contains(&ip) {
            return None;
        }
        Some((to_u128(ip) - to_u128(self.cidr.network())) as u32)
    }

    /// The address at offset `ord` (panics when `ord >= size`).
    pub fn addr(&self, ord: u32) -> IpAddr {
        assert!(ord < self.bitmap.size(), "ordinal {ord} outside {}", self.cidr);
        addr_from_u128(&self.cidr, to_u128(self.cidr.network()) + ord as u128)
    }

    /// Takes the lowest free address.
    pub fn allocate(&mut self) -> Option<IpAddr> {
        self.bitmap.allocate_lowest().map(|o| self.addr(o))
    }

    /// Takes `ip` (a requested address).
    pub fn allocate_ip(&mut self, ip: IpAddr) -> Result<(), BlockError> {
        let ord = self.ordinal(ip).ok_or(BlockError::NotInBlock { ip, block: self.cidr })?;
        if !self.bitmap.set(ord) {
            return Err(BlockError::InUse { ip });
        }
        Ok(())
    }

    /// Frees `ip`; `Ok(false)` when it was already free.
    pub fn release(&mut self, ip: IpAddr) -> Result<bool, BlockError> {
        let ord = self.ordinal(ip).ok_or(BlockError::NotInBlock { ip, block: self.cidr })?;
        Ok(self.bitmap.clear(ord))
    }

    pub fn is_allocated(&self, ip: IpAddr) -> bool {
        self.ordinal(ip).is_some_and(|o| self.bitmap.get(o))
    }

    pub fn size(&self) -> u32 {
        self.bitmap.size()
    }

    pub fn used(&self) -> u32 {
        self.bitmap.used()
    }

    pub fn free(&self) -> u32 {
        self.bitmap.free()
    }

    pub fn is_empty(&self) -> bool {
        self.bitmap.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.bitmap.is_full()
    }

    pub fn utilisation(&self) -> f64 {
        self.bitmap.utilisation()
    }

    /// Allocated addresses, ascending.
    pub fn allocated(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.bitmap.iter_used().map(|o| self.addr(o))
    }
}

/// The stored form: `{"cidr":"10.0.0.0/26","used":"0300000000000000"}`.
#[derive(Serialize, Deserialize)]
struct BlockWire {
    cidr: IpNet,
    used: String,
}

impl Serialize for Block {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        BlockWire { cidr: self.cidr, used: self.bitmap.to_hex() }.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Block {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Block, D::Error> {
        let w = BlockWire::deserialize(d)?;
        let block = Block::new(w.cidr).map_err(serde::de::Error::custom)?;
        let bitmap = Bitmap::from_hex(block.size(), &w.used).map_err(serde::de::Error::custom)?;
        Block::with_bitmap(w.cidr, bitmap).map_err(serde::de::Error::custom)
    }
}

/// Groups addresses by the pool block that holds them (addresses outside
/// the pool are left out). Handy for "which blocks are in use".
pub fn group_by_block(pool: &Pool, ips: impl IntoIterator<Item = IpAddr>) -> BTreeMap<IpNet, Vec<IpAddr>> {
    let mut out: BTreeMap<IpNet, Vec<IpAddr>> = BTreeMap::new();
    for ip in ips {
        if let Some(b) = pool.block_of(ip) {
            out.entry(b).or_default().push(ip);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A small deterministic generator for the property loops.
    struct Rng(SplitMix);
    impl Rng {
        fn new(seed: u64) -> Rng {
            Rng(SplitMix(seed))
        }
        fn below(&mut self, n: u64) -> u64 {
            self.0.next() % n
        }
    }

    #[test]
    fn defaults_and_counts() {
        let p = Pool::new(net("10.244.0.0/16"), None).unwrap();
        assert_eq!(p.block_prefix(), 26);
        assert_eq!(p.block_size(), 64);
        assert_eq!(p.block_count(), 1024);
        let p6 = Pool::new(net("fd00:10::/64"), None).unwrap();
        assert_eq!(p6.block_prefix(), 122);
        assert_eq!(p6.block_size(), 64);
        assert_eq!(p6.block_count(), 1u128 << 58);
        let p6big = Pool::new(net("fd00::/8"), None).unwrap();
        assert_eq!(p6big.block_count(), 1u128 << 114);
        // A pool that is one block.
        let one = Pool::new(net("10.0.0.0/26"), None).unwrap();
        assert_eq!(one.block_count(), 1);
        assert_eq!(one.candidates("n").collect::<Vec<_>>(), vec![net("10.0.0.0/26")]);
    }

    #[test]
    fn pool_validation() {
        assert!(matches!(Pool::new(net("10.0.0.1/16"), None), Err(BlockError::HostBits { .. })));
        assert!(matches!(Pool::new(net("10.0.0.0/28"), None), Err(BlockError::BlockPrefix { .. })));
        assert!(matches!(Pool::new(net("10.0.0.0/16"), Some(19)), Err(BlockError::BlockPrefix { .. })));
        assert!(matches!(Pool::new(net("10.0.0.0/16"), Some(33)), Err(BlockError::BlockPrefix { .. })));
        assert!(matches!(Pool::new(net("fd00::/64"), Some(115)), Err(BlockError::BlockPrefix { .. })));
        assert!(matches!(Pool::new(net("::/0"), Some(128)), Err(BlockError::BlockPrefix { .. })));
        assert!(Pool::new(net("::/1"), Some(128)).is_ok());
        assert!(Pool::new(net("10.0.0.0/16"), Some(20)).is_ok());
        assert!(Pool::new(net("10.0.0.0/16"), Some(32)).is_ok());
        assert!(Pool::new(net("fd00::/64"), Some(116)).is_ok());
        assert!(Pool::parse("10.0.0.0/33", None).is_err());
        assert!(Pool::parse(" 10.0.0.0/24 ", Some(28)).is_ok());
        let msg = Pool::new(net("10.0.0.1/16"), None).unwrap_err().to_string();
        assert!(msg.contains("10.0.0.0/16"), "{msg}");
    }

    #[test]
    fn block_at_index_of_block_of() {
        let p = Pool::new(net("10.1.0.0/20"), None).unwrap();
        assert_eq!(p.block_at(0), Some(net("10.1.0.0/26")));
        assert_eq!(p.block_at(1), Some(net("10.1.0.64/26")));
        assert_eq!(p.block_at(63), Some(net("10.1.15.192/26")));
        assert_eq!(p.block_at(64), None);
        assert_eq!(p.block_of(ip("10.1.15.255")), Some(net("10.1.15.192/26")));
        assert_eq!(p.block_of(ip("10.1.16.0")), None);
        assert_eq!(p.block_of(ip("fd00::1")), None);
        assert_eq!(p.block_of(ip("::ffff:10.1.0.70")), Some(net("10.1.0.64/26")));
        assert_eq!(p.index_of(&net("10.1.0.64/26")), Some(1));
        assert_eq!(p.index_of(&net("10.1.0.64/27")), None);
        assert_eq!(p.index_of(&net("10.2.0.0/26")), None);
        assert_eq!(p.index_of(&net("fd00::/122")), None);

        let p6 = Pool::new(net("fd00:1::/112"), None).unwrap();
        assert_eq!(p6.block_at(1), Some(net("fd00:1::40/122")));
        assert_eq!(p6.block_of(ip("fd00:1::ffff")), Some(net("fd00:1::ffc0/122")));
        assert_eq!(block_containing(ip("10.9.8.77"), 26), Some(net("10.9.8.64/26")));
        assert_eq!(block_containing(ip("10.9.8.77"), 33), None);
    }

    #[test]
    fn property_index_roundtrip_and_lookup() {
        let mut rng = Rng::new(7);
        for (cidr, bp) in [("10.0.0.0/16", 26u8), ("10.128.0.0/9", 24), ("fd00:a::/96", 122), ("192.168.0.0/24", 32)] {
            let p = Pool::new(net(cidr), Some(bp)).unwrap();
            for _ in 0..500 {
                let idx = (rng.0.next() as u128) % p.block_count();
                let b = p.block_at(idx).unwrap();
                assert_eq!(p.index_of(&b), Some(idx));
                assert!(p.cidr().contains(&b));
                // Every address of the block maps back to it.
                let off = rng.below(p.block_size() as u64) as u128;
                let a = addr_from_u128(&b, to_u128(b.network()) + off);
                assert_eq!(p.block_of(a), Some(b));
                let blk = Block::new(b).unwrap();
                assert_eq!(blk.ordinal(a), Some(off as u32));
                assert_eq!(blk.addr(off as u32), a);
            }
        }
    }

    #[test]
    fn property_candidates_are_a_permutation() {
        for (cidr, bp) in [("10.0.0.0/20", 26u8), ("10.0.0.0/24", 26), ("10.0.0.0/26", 26), ("fd00::/112", 122)] {
            let p = Pool::new(net(cidr), Some(bp)).unwrap();
            for n in 0..200 {
                let node = format!("node-{n}");
                let all: Vec<IpNet> = p.candidates(&node).collect();
                assert_eq!(all.len() as u128, p.block_count(), "{cidr} {node}");
                let set: HashSet<IpNet> = all.iter().copied().collect();
                assert_eq!(set.len(), all.len(), "{cidr} {node}: a block repeated");
                assert!(set.iter().all(|b| p.has_block(b)));
                // Deterministic.
                assert_eq!(p.candidates(&node).take(5).collect::<Vec<_>>(), all[..all.len().min(5)].to_vec());
            }
        }
    }

    #[test]
    fn candidates_spread_nodes_apart() {
        let p = Pool::new(net("10.0.0.0/16"), None).unwrap();
        let firsts: HashSet<IpNet> = (0..100).map(|n| p.candidates(&format!("node-{n}")).next().unwrap()).collect();
        // 100 nodes over 1024 blocks: a handful of collisions at most, never all on one.
        assert!(firsts.len() > 90, "first choices too clustered: {}", firsts.len());
        assert!(!firsts.contains(&net("10.0.0.0/26")) || firsts.len() > 1);
        // A huge IPv6 pool: the first candidate is immediate and lies inside.
        let p6 = Pool::new(net("fd00::/48"), None).unwrap();
        let b = p6.candidates("node-a").next().unwrap();
        assert!(p6.has_block(&b));
        assert_ne!(b, p6.candidates("node-b").next().unwrap());
        // The hash is fixed: this value must never change between releases.
        assert_eq!(fnv1a64(b"node-a"), 0xe697_1cc2_2078_cb53);
        const PINNED: [&str; 3] = ["10.0.18.0/26", "10.0.254.192/26", "10.0.235.128/26"];
        let first: Vec<IpNet> = p.candidates("node-a").take(3).collect();
        assert_eq!(first, PINNED.iter().map(|s| net(s)).collect::<Vec<_>>());
    }

    #[test]
    fn bitmap_basics() {
        let mut b = Bitmap::new(64);
        assert!(b.is_empty());
        assert_eq!(b.lowest_free(), Some(0));
        assert_eq!(b.allocate_lowest(), Some(0));
        assert_eq!(b.allocate_lowest(), Some(1));
        assert!(b.set(5));
        assert!(!b.set(5));
        assert_eq!(b.allocate_lowest(), Some(2));
        assert_eq!(b.used(), 4);
        assert_eq!(b.ranges_text(), "0-2,5");
        assert!(b.clear(1));
        assert!(!b.clear(1));
        assert!(!b.clear(64));
        assert_eq!(b.allocate_lowest(), Some(1));
        assert_eq!(b.to_hex(), "2700000000000000");
        for _ in 0..60 {
            b.allocate_lowest().unwrap();
        }
        assert!(b.is_full());
        assert_eq!(b.allocate_lowest(), None);
        assert_eq!(b.utilisation(), 1.0);
        assert_eq!(b.to_hex(), "ffffffffffffffff");

        let mut one = Bitmap::new(1);
        assert_eq!(one.to_hex(), "00");
        assert_eq!(one.allocate_lowest(), Some(0));
        assert_eq!(one.allocate_lowest(), None);
        assert_eq!(one.to_hex(), "01");

        let mut odd = Bitmap::new(8);
        for _ in 0..8 {
            odd.allocate_lowest().unwrap();
        }
        assert_eq!(odd.allocate_lowest(), None);
    }

    #[test]
    fn bitmap_hex_errors() {
        assert!(Bitmap::from_hex(64, "00").is_err());
        assert!(Bitmap::from_hex(64, "zz00000000000000").is_err());
        assert!(Bitmap::from_hex(4, "10").is_err(), "bit 4 beyond size 4");
        assert!(Bitmap::from_hex(4, "0f").is_ok());
        assert!(Bitmap::from_hex(0, "").is_err());
        assert!(Bitmap::from_hex(8192, "").is_err());
        assert_eq!(Bitmap::from_hex(16, "FF01").unwrap().used(), 9);
    }

    #[test]
    fn property_bitmap_matches_a_model() {
        let mut rng = Rng::new(42);
        for size in [1u32, 2, 7, 8, 63, 64, 65, 128, 1000, 4096] {
            let mut bm = Bitmap::new(size);
            let mut model = vec![false; size as usize];
            for _ in 0..3000 {
                match rng.below(4) {
                    0 => {
                        let got = bm.allocate_lowest();
                        let want = model.iter().position(|u| !u);
                        assert_eq!(got, want.map(|w| w as u32), "size {size}");
                        if let Some(w) = want {
                            model[w] = true;
                        }
                    }
                    1 => {
                        let o = rng.below(size as u64) as u32;
                        assert_eq!(bm.set(o), !model[o as usize]);
                        model[o as usize] = true;
                    }
                    _ => {
                        let o = rng.below(size as u64) as u32;
                        assert_eq!(bm.clear(o), model[o as usize]);
                        model[o as usize] = false;
                    }
                }
                let used = model.iter().filter(|u| **u).count() as u32;
                assert_eq!(bm.used(), used);
                assert_eq!(bm.is_empty(), used == 0);
                assert_eq!(bm.is_full(), used == size);
            }
            let want: Vec<u32> = (0..size).filter(|o| model[*o as usize]).collect();
            assert_eq!(bm.iter_used().collect::<Vec<_>>(), want);
            let back = Bitmap::from_hex(size, &bm.to_hex()).unwrap();
            assert_eq!(back, bm);
            let flat: Vec<u32> = bm.ranges().iter().flat_map(|(a, b)| *a..=*b).collect();
            assert_eq!(flat, want);
        }
    }

    #[test]
    fn block_allocate_release() {
        let mut b = Block::new(net("10.0.0.64/30")).unwrap();
        assert_eq!(b.size(), 4);
        assert_eq!(b.allocate(), Some(ip("10.0.0.64")));
        assert_eq!(b.allocate_ip(ip("10.0.0.66")), Ok(()));
        assert_eq!(b.allocate_ip(ip("10.0.0.66")), Err(BlockError::InUse { ip: ip("10.0.0.66") }));
        assert!(matches!(b.allocate_ip(ip("10.0.0.68")), Err(BlockError::NotInBlock { .. })));
        assert!(matches!(b.allocate_ip(ip("fd00::1")), Err(BlockError::NotInBlock { .. })));
        assert_eq!(b.allocate(), Some(ip("10.0.0.65")));
        assert_eq!(b.allocate(), Some(ip("10.0.0.67")));
        assert_eq!(b.allocate(), None);
        assert!(b.is_full());
        assert_eq!(b.release(ip("10.0.0.65")), Ok(true));
        assert_eq!(b.release(ip("10.0.0.65")), Ok(false));
        assert!(!b.is_allocated(ip("10.0.0.65")));
        assert!(b.is_allocated(ip("10.0.0.66")));
        assert_eq!(b.allocated().collect::<Vec<_>>(), vec![ip("10.0.0.64"), ip("10.0.0.66"), ip("10.0.0.67")]);
        assert_eq!(b.utilisation(), 0.75);
        for a in [ip("10.0.0.64"), ip("10.0.0.66"), ip("10.0.0.67")] {
            b.release(a).unwrap();
        }
        assert!(b.is_empty());

        let mut b6 = Block::new(net("fd00::40/122")).unwrap();
        assert_eq!(b6.allocate(), Some(ip("fd00::40")));
        assert_eq!(b6.allocate_ip(ip("fd00::7f")), Ok(()));
        assert_eq!(b6.used(), 2);
        assert!(Block::new(net("10.0.0.0/19")).is_err());
        assert!(Block::new(net("10.0.0.1/26")).is_err());
        assert!(Block::with_bitmap(net("10.0.0.0/26"), Bitmap::new(32)).is_err());
    }

    #[test]
    fn block_json() {
        let mut b = Block::new(net("10.0.0.0/26")).unwrap();
        b.allocate().unwrap();
        b.allocate().unwrap();
        b.allocate_ip(ip("10.0.0.63")).unwrap();
        let s = serde_json::to_string(&b).unwrap();
        assert_eq!(s, r#"{"cidr":"10.0.0.0/26","used":"0300000000000080"}"#);
        let back: Block = serde_json::from_str(&s).unwrap();
        assert_eq!(back, b);
        // Wrong length, bad prefix, host bits: refused with a reason.
        let e = serde_json::from_str::<Block>(r#"{"cidr":"10.0.0.0/26","used":"03"}"#).unwrap_err().to_string();
        assert!(e.contains("hex digits"), "{e}");
        assert!(serde_json::from_str::<Block>(r#"{"cidr":"10.0.0.0/16","used":""}"#).is_err());
        assert!(serde_json::from_str::<Block>(r#"{"cidr":"10.0.0.1/26","used":"0000000000000000"}"#).is_err());
        let b6 = Block::new(net("fd00::/122")).unwrap();
        let s6 = serde_json::to_string(&b6).unwrap();
        assert_eq!(s6, r#"{"cidr":"fd00::/122","used":"0000000000000000"}"#);
    }

    #[test]
    fn property_random_block_ops_stay_inside() {
        let mut rng = Rng::new(99);
        let p = Pool::new(net("10.8.0.0/22"), Some(28)).unwrap();
        for _ in 0..200 {
            let cidr = p.block_at(rng.below(p.block_count() as u64) as u128).unwrap();
            let mut b = Block::new(cidr).unwrap();
            let mut seen = HashSet::new();
            while let Some(a) = b.allocate() {
                assert_eq!(p.block_of(a), Some(cidr));
                assert!(seen.insert(a), "{a} handed out twice");
            }
            assert_eq!(seen.len() as u32, b.size());
            let victim = b.addr(rng.below(b.size() as u64) as u32);
            assert_eq!(b.release(victim), Ok(true));
            assert_eq!(b.allocate(), Some(victim), "lowest free is the one released");
        }
    }

    #[test]
    fn grouping() {
        let p = Pool::new(net("10.0.0.0/24"), None).unwrap();
        let g = group_by_block(&p, [ip("10.0.0.1"), ip("10.0.0.70"), ip("10.0.0.2"), ip("10.9.0.0")]);
        assert_eq!(g.len(), 2);
        assert_eq!(g[&net("10.0.0.0/26")], vec![ip("10.0.0.1"), ip("10.0.0.2")]);
    }
}
