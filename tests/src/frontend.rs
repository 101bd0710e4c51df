//! A vhost-user test frontend: the part QEMU plays, reduced to what tests need.
//!
//! [`Frontend::connect`] connects to a vhost-user backend socket, negotiates
//! features with the `vhost` crate's frontend, shares one memfd as guest memory
//! and sets up split virtqueues on it. Tests then drive the queues as a guest
//! driver would — or as a hostile one would, through the raw API.
//!
//! # Guest memory
//!
//! One memfd of [`FrontendOptions::mem_size`] bytes, mapped `MAP_SHARED` here
//! and passed to the backend with `VHOST_USER_SET_MEM_TABLE` as a single
//! region at guest physical address 0. Descriptor addresses are guest
//! physical addresses; the ring addresses sent with `SET_VRING_ADDR` are, as
//! vhost-user requires, *this process's* virtual addresses of the rings.
//!
//! The front of memory holds the rings of every queue (one page-aligned area
//! per queue); the rest is handed out by a bump allocator ([`Frontend::alloc`],
//! [`Frontend::reset_alloc`]). The allocator never frees on its own: long tests
//! call `reset_alloc` between batches, once nothing that was allocated is
//! still in flight.
//!
//! # Queues
//!
//! Each queue is a split virtqueue driven by [`Ring`], this module's own
//! driver. Descriptors come from a free list (lowest index first, so a fresh
//! queue hands out `0, 1, 2…`) and go back to it when the device returns the
//! chain's head in the used ring.
//!
//! * High level: [`Frontend::add_chain`] (+ `kick`) and
//!   [`Frontend::wait_used`] / [`Frontend::poll_used`]; [`Frontend::control`]
//!   does a whole control request.
//! * Raw: [`Frontend::add_raw_chain`] writes descriptors exactly as given,
//!   [`Frontend::write_indirect_table`] writes an indirect table anywhere in
//!   memory, [`Frontend::publish`] puts any head number in the avail ring.
//!
//! # Notifications
//!
//! The frontend always kicks on [`Frontend::kick`] (a spurious kick is always
//! allowed); [`Frontend::needs_kick`] tells whether the device asked for one.
//! When `VIRTIO_RING_F_EVENT_IDX` is negotiated the driver keeps
//! `avail->used_event` equal to the next used index it waits for, so the device
//! should notify for every used buffer; [`Frontend::wait_used`] nevertheless
//! also re-reads the used ring every [`POLL_STEP`], so a device that suppresses
//! (or forgets) a notification costs latency, not a failed test.
//! [`Frontend::notifications`] counts the calls actually received.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::memfd::{memfd_create, MFdFlags};
use thiserror::Error;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserProtocolFeatures,
};
use vhost::vhost_user::{Frontend as VuFrontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryMmap,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

// ---------------------------------------------------------------------------
// Constants
// ---------------------------------------------------------------------------

/// Descriptor flag: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of indirect descriptors.
pub const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Used-ring flag: the device does not want kicks (without EVENT_IDX).
pub const VIRTQ_USED_F_NO_NOTIFY: u16 = 1;
/// Size of one descriptor in the table.
pub const DESC_SIZE: u64 = 16;

/// `VIRTIO_F_VERSION_1` as a feature mask.
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// `VIRTIO_RING_F_INDIRECT_DESC` as a feature mask.
pub const F_INDIRECT_DESC: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
/// `VIRTIO_RING_F_EVENT_IDX` as a feature mask.
pub const F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
/// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30) as a feature mask.
pub const F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Default guest memory size: 32 MiB.
pub const DEFAULT_MEM_SIZE: usize = 32 << 20;
/// Default size of every queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 64;
/// Queues of a virtio-snd device: control, event, tx, rx.
pub const DEFAULT_NUM_QUEUES: usize = 4;
/// How long [`Frontend::connect`] retries by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Frontend::control`] waits for the device's answer.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest single sleep of [`Frontend::wait_used`] before it re-reads the used
/// ring regardless of notifications.
pub const POLL_STEP: Duration = Duration::from_millis(10);
/// Byte written into every device-writable buffer of [`Frontend::add_chain`]
/// before it is published, so a test can tell "the device wrote zeros" from
/// "the device wrote nothing".
pub const POISON: u8 = 0x5a;

const PAGE: u64 = 4096;
const BUFFER_ALIGN: u64 = 8;

// ---------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------

/// What went wrong in the test frontend.
#[derive(Debug, Error)]
pub enum Error {
    /// Could not connect to the backend's socket within the retry time.
    #[error("cannot connect to vhost-user socket {path} within {waited:?}: {source} (is the backend running and listening there?)")]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// How long we retried.
        waited: Duration,
        /// Last connect error.
        source: io::Error,
    },
    /// A vhost-user request failed or the backend answered it with an error.
    #[error("vhost-user {op} failed: {source}")]
    VhostUser {
        /// The request.
        op: &'static str,
        /// What the vhost crate reported.
        source: vhost::Error,
    },
    /// The backend does not offer a feature the frontend cannot do without.
    #[error("backend does not offer {0}, which the test frontend requires")]
    MissingFeature(&'static str),
    /// The backend has fewer queues than [`FrontendOptions::num_queues`].
    #[error("backend reports {have} queues, the frontend was asked to set up {need}")]
    TooFewQueues {
        /// Queues the backend has.
        have: u64,
        /// Queues requested.
        need: usize,
    },
    /// Creating or mapping guest memory failed.
    #[error("setting up guest memory: {0}")]
    MemorySetup(io::Error),
    /// Invalid options.
    #[error("invalid frontend options: {0}")]
    Options(String),
    /// A guest memory access was out of range.
    #[error("guest memory access: {0}")]
    Memory(#[from] GuestMemoryError),
    /// An eventfd or poll operation failed.
    #[error("eventfd: {0}")]
    Io(#[from] io::Error),
    /// The queue index does not exist.
    #[error("queue {queue} does not exist (the frontend set up {count} queues)")]
    NoSuchQueue {
        /// Requested queue.
        queue: usize,
        /// Queues set up.
        count: usize,
    },
    /// A chain needs more free descriptors than the queue has.
    #[error("queue {queue}: the chain needs {needed} descriptors but only {free} are free; wait for used buffers (or forget_chain) first")]
    QueueFull {
        /// Queue.
        queue: usize,
        /// Descriptors needed.
        needed: usize,
        /// Descriptors free.
        free: usize,
    },
    /// A chain without descriptors.
    #[error("a chain needs at least one descriptor")]
    EmptyChain,
    /// More descriptors than a 16-bit `next` can link.
    #[error("{0} descriptors cannot be linked by 16-bit next fields")]
    TooManyDescriptors(usize),
    /// A buffer longer than a descriptor can describe.
    #[error("buffer of {0} bytes does not fit a descriptor's 32-bit length")]
    BufferTooLarge(usize),
    /// The bump allocator is exhausted.
    #[error("out of guest memory: {requested} bytes requested, {available} left; call reset_alloc() between batches or raise FrontendOptions::mem_size")]
    OutOfMemory {
        /// Bytes requested.
        requested: u64,
        /// Bytes left.
        available: u64,
    },
    /// The device put an id in the used ring that is not an in-flight head.
    #[error("queue {queue}: device returned used id {id} (len {len}), which is not the head of any chain in flight")]
    UnknownUsedId {
        /// Queue.
        queue: usize,
        /// The id.
        id: u32,
        /// The length it reported.
        len: u32,
    },
    /// The device moved `used->idx` further than the queue size.
    #[error("queue {queue}: device advanced used idx by {advance} entries, more than the queue size {size}")]
    UsedRingOverrun {
        /// Queue.
        queue: usize,
        /// Entries between our last seen index and the device's.
        advance: u16,
        /// Queue size.
        size: u16,
    },
    /// No used buffer arrived in time.
    #[error("queue {queue}: no used buffer within {waited:?}")]
    Timeout {
        /// Queue.
        queue: usize,
        /// How long we waited.
        waited: Duration,
    },
    /// The device claimed to have written more than the buffer could hold.
    #[error("queue {queue}: device reported used.len {len} for chain {id}, but it only had {capacity} writable bytes")]
    UsedLenTooLarge {
        /// Queue.
        queue: usize,
        /// Chain head.
        id: u32,
        /// Reported length.
        len: u32,
        /// Writable bytes offered.
        capacity: u64,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

fn vu_err(op: &'static str) -> impl FnOnce(vhost::Error) -> Error {
    move |source| Error::VhostUser { op, source }
}

// ---------------------------------------------------------------------------
// Guest memory
// ---------------------------------------------------------------------------

/// Guest memory: one memfd mapped shared at guest physical address 0, with a
/// bump allocator for buffers.
pub struct GuestMem {
    mem: GuestMemoryMmap,
    size: u64,
    alloc_start: u64,
    alloc_next: u64,
}

impl GuestMem {
    /// Create `size` bytes of zeroed guest memory backed by a memfd.
    pub fn new(size: usize) -> Result<Self> {
        if size == 0 {
            return Err(Error::Options("mem_size must not be 0".into()));
        }
        let fd = memfd_create("vsnd-test-guest-ram", MFdFlags::MFD_CLOEXEC)
            .map_err(|e| Error::MemorySetup(e.into()))?;
        let file = File::from(fd);
        file.set_len(size as u64).map_err(Error::MemorySetup)?;
        let mem = GuestMemoryMmap::from_ranges_with_files([(
            GuestAddress(0),
            size,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| Error::MemorySetup(io::Error::other(e)))?;
        Ok(Self {
            mem,
            size: size as u64,
            alloc_start: 0,
            alloc_next: 0,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Copy `data` to guest physical address `gpa`; errors when any byte would
    /// fall outside guest memory.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        self.mem.write_slice(data, GuestAddress(gpa))?;
        Ok(())
    }

    /// Read `len` bytes at guest physical address `gpa`.
    pub fn read(&self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len];
        if len > 0 {
            self.mem.read_slice(&mut v, GuestAddress(gpa))?;
        }
        Ok(v)
    }

    fn read_u16(&self, gpa: u64) -> Result<u16> {
        Ok(self.mem.load::<u16>(GuestAddress(gpa), Ordering::Acquire)?)
    }

    fn write_u16(&self, gpa: u64, v: u16) -> Result<()> {
        Ok(self.mem.store(v, GuestAddress(gpa), Ordering::Release)?)
    }

    /// This process's virtual address of `gpa` (what vhost-user calls a
    /// frontend/user address).
    pub fn host_address(&self, gpa: u64) -> Result<u64> {
        Ok(self.mem.get_host_address(GuestAddress(gpa))? as u64)
    }

    fn regions(&self) -> Result<Vec<VhostUserMemoryRegionInfo>> {
        self.mem
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r).map_err(vu_err("SET_MEM_TABLE"))
            })
            .collect()
    }

    /// Allocate `len` bytes aligned to `align` (a power of two) from the bump
    /// allocator; returns the guest physical address. Contents are whatever
    /// was there before.
    pub fn alloc(&mut self, len: u64, align: u64) -> Result<u64> {
        let align = align.max(1).checked_next_power_of_two().unwrap_or(1 << 63);
        let start = self
            .alloc_next
            .checked_add(align - 1)
            .map(|a| a & !(align - 1));
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(start), Some(end)) if end <= self.size => {
                self.alloc_next = end;
                Ok(start)
            }
            _ => Err(Error::OutOfMemory {
                requested: len,
                available: self.size.saturating_sub(self.alloc_next),
            }),
        }
    }

    /// Forget every allocation made since the rings were placed. Only safe for
    /// the test's intent when nothing allocated is still in flight.
    pub fn reset_alloc(&mut self) {
        self.alloc_next = self.alloc_start;
    }

    /// Bytes the allocator can still hand out.
    pub fn alloc_remaining(&self) -> u64 {
        self.size.saturating_sub(self.alloc_next)
    }

    /// Reserve `len` bytes at the current allocation point permanently
    /// (survives `reset_alloc`); used for rings.
    fn reserve_permanent(&mut self, len: u64, align: u64) -> Result<u64> {
        let gpa = self.alloc(len, align)?;
        self.alloc_start = self.alloc_next;
        Ok(gpa)
    }
}

// ---------------------------------------------------------------------------
// Split virtqueue driver
// ---------------------------------------------------------------------------

/// One descriptor exactly as written to memory (raw API).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RawDesc {
    /// Guest physical address of the buffer (or indirect table).
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// `VIRTQ_DESC_F_*` flags.
    pub flags: u16,
    /// Next descriptor index; see [`Frontend::add_raw_chain`] for how it is
    /// interpreted in the main table.
    pub next: u16,
}

impl RawDesc {
    /// A device-readable descriptor with no successor.
    pub fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }

    /// A device-writable descriptor with no successor.
    pub fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: VIRTQ_DESC_F_WRITE,
            next: 0,
        }
    }

    /// This descriptor, continuing at `next`.
    pub fn then(self, next: u16) -> Self {
        Self {
            flags: self.flags | VIRTQ_DESC_F_NEXT,
            next,
            ..self
        }
    }

    fn to_bytes(self) -> [u8; DESC_SIZE as usize] {
        let mut b = [0u8; DESC_SIZE as usize];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    /// Decode a descriptor from its 16 bytes.
    pub fn from_bytes(b: &[u8; DESC_SIZE as usize]) -> Self {
        let mut a8 = [0u8; 8];
        a8.copy_from_slice(&b[0..8]);
        let mut a4 = [0u8; 4];
        a4.copy_from_slice(&b[8..12]);
        Self {
            addr: u64::from_le_bytes(a8),
            len: u32::from_le_bytes(a4),
            flags: u16::from_le_bytes([b[12], b[13]]),
            next: u16::from_le_bytes([b[14], b[15]]),
        }
    }
}

/// A buffer the device returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Used {
    /// `used_elem.id`: the head of the returned chain.
    pub id: u32,
    /// `used_elem.len`: bytes the device says it wrote.
    pub len: u32,
    /// The first `min(len, capacity)` bytes of the chain's device-writable
    /// buffers, in chain order.
    pub writable_bytes: Vec<u8>,
}

/// Where a queue's three parts live, in guest physical addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Descriptor table (16 bytes × size, 16-aligned).
    pub desc: u64,
    /// Available ring (flags, idx, ring\[size\], used_event).
    pub avail: u64,
    /// Used ring (flags, idx, ring\[size\] of {id, len}, avail_event).
    pub used: u64,
    /// Bytes from `desc` to the end of the used ring, rounded to a page.
    pub total: u64,
}

impl RingLayout {
    /// Layout of a queue of `size` entries starting at `base` (page aligned).
    /// The parts are laid out back to back: descriptors, avail ring, then the
    /// used ring at the next 64-byte boundary. (Saturating arithmetic: a base
    /// near `u64::MAX` gives addresses the backend will reject, not a panic.)
    pub fn new(base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let desc = base;
        let avail = desc.saturating_add(DESC_SIZE * n);
        let avail_end = avail.saturating_add(6 + 2 * n);
        let used = avail_end.saturating_add(63) & !63;
        let used_len = used.saturating_sub(base).saturating_add(6 + 8 * n);
        let total = used_len.saturating_add(PAGE - 1) & !(PAGE - 1);
        Self {
            desc,
            avail,
            used,
            total,
        }
    }
}

/// A device-writable buffer of a chain: (guest physical address, length).
type Extent = (u64, u32);

struct Chain {
    slots: Vec<u16>,
    writable: Vec<Extent>,
}

/// The driver side of one split virtqueue, operating on a [`GuestMem`].
///
/// Independent of vhost-user so that it can be unit-tested against a device
/// emulated in-process.
pub struct Ring {
    index: usize,
    size: u16,
    layout: RingLayout,
    event_idx: bool,
    free: BTreeSet<u16>,
    next_avail: u16,
    kicked_avail: u16,
    last_used: u16,
    in_flight: HashMap<u16, Chain>,
    backlog: VecDeque<Used>,
}

impl Ring {
    /// A ring of `size` entries laid out by `layout` (memory must be zeroed).
    pub fn new(index: usize, size: u16, layout: RingLayout, event_idx: bool) -> Self {
        Self {
            index,
            size,
            layout,
            event_idx,
            free: (0..size).collect(),
            next_avail: 0,
            kicked_avail: 0,
            last_used: 0,
            in_flight: HashMap::new(),
            backlog: VecDeque::new(),
        }
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Where the ring lives.
    pub fn layout(&self) -> RingLayout {
        self.layout
    }

    /// Free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    /// Chains added and not yet returned (nor forgotten).
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Our shadow of `avail->idx`.
    pub fn avail_idx(&self) -> u16 {
        self.next_avail
    }

    /// The next used index we expect.
    pub fn last_used_idx(&self) -> u16 {
        self.last_used
    }

    fn take_slots(&mut self, n: usize) -> Result<Vec<u16>> {
        if n == 0 {
            return Err(Error::EmptyChain);
        }
        if n > self.free.len() {
            return Err(Error::QueueFull {
                queue: self.index,
                needed: n,
                free: self.free.len(),
            });
        }
        Ok((0..n).filter_map(|_| self.free.pop_first()).collect())
    }

    fn write_desc(&self, mem: &GuestMem, slot: u16, d: RawDesc) -> Result<()> {
        mem.write(
            self.layout.desc + DESC_SIZE * u64::from(slot),
            &d.to_bytes(),
        )
    }

    /// Read back descriptor `slot` of the table.
    pub fn read_desc(&self, mem: &GuestMem, slot: u16) -> Result<RawDesc> {
        let b = mem.read(
            self.layout.desc + DESC_SIZE * u64::from(slot),
            DESC_SIZE as usize,
        )?;
        let mut a = [0u8; DESC_SIZE as usize];
        a.copy_from_slice(&b);
        Ok(RawDesc::from_bytes(&a))
    }

    /// Allocate buffers for `readable` (copied in) and `writable` (filled with
    /// [`POISON`]); returns descriptors without NEXT links.
    fn make_buffers(
        mem: &mut GuestMem,
        readable: &[&[u8]],
        writable: &[u32],
    ) -> Result<(Vec<RawDesc>, Vec<Extent>)> {
        let mut descs = Vec::with_capacity(readable.len() + writable.len());
        for r in readable {
            let len = u32::try_from(r.len()).map_err(|_| Error::BufferTooLarge(r.len()))?;
            let gpa = mem.alloc(u64::from(len), BUFFER_ALIGN)?;
            mem.write(gpa, r)?;
            descs.push(RawDesc::readable(gpa, len));
        }
        let mut wr = Vec::with_capacity(writable.len());
        for &len in writable {
            let gpa = mem.alloc(u64::from(len), BUFFER_ALIGN)?;
            mem.write(gpa, &vec![POISON; len as usize])?;
            descs.push(RawDesc::writable(gpa, len));
            wr.push((gpa, len));
        }
        Ok((descs, wr))
    }

    /// Add a well-formed chain: one descriptor per readable slice, then one per
    /// writable length; publishes it. Returns the head.
    pub fn add_chain(
        &mut self,
        mem: &mut GuestMem,
        readable: &[&[u8]],
        writable: &[u32],
    ) -> Result<u16> {
        let n = readable.len() + writable.len();
        if n == 0 {
            return Err(Error::EmptyChain);
        }
        if n > self.free.len() {
            return Err(Error::QueueFull {
                queue: self.index,
                needed: n,
                free: self.free.len(),
            });
        }
        let (descs, wr) = Self::make_buffers(mem, readable, writable)?;
        let slots = self.take_slots(n)?;
        for (i, (d, &slot)) in descs.iter().zip(&slots).enumerate() {
            let d = match slots.get(i + 1) {
                Some(&next) => d.then(next),
                None => *d,
            };
            self.write_desc(mem, slot, d)?;
        }
        let head = slots[0];
        self.in_flight.insert(
            head,
            Chain {
                slots,
                writable: wr,
            },
        );
        self.publish(mem, head)?;
        Ok(head)
    }

    /// Like [`Ring::add_chain`], but the buffers are described by an indirect
    /// table and the chain takes one ring descriptor. Requires the device to
    /// have negotiated `VIRTIO_RING_F_INDIRECT_DESC`.
    pub fn add_chain_indirect(
        &mut self,
        mem: &mut GuestMem,
        readable: &[&[u8]],
        writable: &[u32],
    ) -> Result<u16> {
        let n = readable.len() + writable.len();
        if n == 0 {
            return Err(Error::EmptyChain);
        }
        if n > usize::from(u16::MAX) {
            return Err(Error::TooManyDescriptors(n));
        }
        if self.free.is_empty() {
            return Err(Error::QueueFull {
                queue: self.index,
                needed: 1,
                free: 0,
            });
        }
        let (descs, wr) = Self::make_buffers(mem, readable, writable)?;
        let table: Vec<RawDesc> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                if i + 1 < n {
                    d.then((i + 1) as u16)
                } else {
                    *d
                }
            })
            .collect();
        let table_gpa = write_indirect_table(mem, &table)?;
        let table_len = u32::try_from(DESC_SIZE * n as u64)
            .map_err(|_| Error::BufferTooLarge(n * DESC_SIZE as usize))?;
        let slots = self.take_slots(1)?;
        let head = slots[0];
        self.write_desc(
            mem,
            head,
            RawDesc {
                addr: table_gpa,
                len: table_len,
                flags: VIRTQ_DESC_F_INDIRECT,
                next: 0,
            },
        )?;
        self.in_flight.insert(
            head,
            Chain {
                slots,
                writable: wr,
            },
        );
        self.publish(mem, head)?;
        Ok(head)
    }

    /// Write `descs` into free table slots exactly as given, except `next`:
    /// a `next` smaller than `descs.len()` is an index into `descs` and is
    /// translated to that descriptor's slot (on a fresh queue slot `i` is
    /// descriptor `i`, so the translation is the identity); any other value is
    /// written verbatim (e.g. `u16::MAX` or the queue size for "out of range").
    /// Flags are written verbatim: set `VIRTQ_DESC_F_NEXT` yourself. Does not
    /// publish. Returns the slot of `descs[0]`, the head.
    pub fn add_raw_chain(&mut self, mem: &mut GuestMem, descs: &[RawDesc]) -> Result<u16> {
        let slots = self.take_slots(descs.len())?;
        for (d, &slot) in descs.iter().zip(&slots) {
            let next = slots.get(usize::from(d.next)).copied().unwrap_or(d.next);
            self.write_desc(mem, slot, RawDesc { next, ..*d })?;
        }
        let writable = descs
            .iter()
            .filter(|d| d.flags & VIRTQ_DESC_F_WRITE != 0 && d.flags & VIRTQ_DESC_F_INDIRECT == 0)
            .map(|d| (d.addr, d.len))
            .collect();
        let head = slots[0];
        self.in_flight.insert(head, Chain { slots, writable });
        Ok(head)
    }

    /// Return the descriptors of an in-flight chain to the free list without
    /// the device returning it (for chains a test never published, or that
    /// the device rightly dropped). Returns whether `head` was in flight.
    pub fn forget_chain(&mut self, head: u16) -> bool {
        match self.in_flight.remove(&head) {
            Some(c) => {
                self.free.extend(c.slots);
                true
            }
            None => false,
        }
    }

    /// Put `head` (any value) in the next avail ring entry and advance
    /// `avail->idx`.
    pub fn publish(&mut self, mem: &GuestMem, head: u16) -> Result<()> {
        let slot = u64::from(self.next_avail % self.size.max(1));
        mem.write(self.layout.avail + 4 + 2 * slot, &head.to_le_bytes())?;
        self.next_avail = self.next_avail.wrapping_add(1);
        // Release: the descriptors and the ring entry are visible before idx.
        mem.write_u16(self.layout.avail + 2, self.next_avail)?;
        Ok(())
    }

    /// Whether the device asked to be notified about what was published since
    /// the last [`Ring::mark_kicked`] (`avail_event` with EVENT_IDX, the
    /// used ring's NO_NOTIFY flag without).
    pub fn needs_kick(&self, mem: &GuestMem) -> Result<bool> {
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event = mem.read_u16(self.layout.used + 4 + 8 * u64::from(self.size))?;
            let new = self.next_avail;
            let old = self.kicked_avail;
            Ok(new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old))
        } else {
            Ok(mem.read_u16(self.layout.used)? & VIRTQ_USED_F_NO_NOTIFY == 0)
        }
    }

    /// Record that the device was notified of everything published so far.
    pub fn mark_kicked(&mut self) {
        self.kicked_avail = self.next_avail;
    }

    /// With EVENT_IDX, ask for a notification when the next used entry
    /// arrives (`avail->used_event = last_used`). No-op otherwise.
    pub fn arm_notification(&self, mem: &GuestMem) -> Result<()> {
        if self.event_idx {
            mem.write_u16(
                self.layout.avail + 4 + 2 * u64::from(self.size),
                self.last_used,
            )?;
            fence(Ordering::SeqCst);
        }
        Ok(())
    }

    /// Read `avail->used_event` (what we last asked for).
    pub fn used_event(&self, mem: &GuestMem) -> Result<u16> {
        mem.read_u16(self.layout.avail + 4 + 2 * u64::from(self.size))
    }

    /// Take the next used entry if the device produced one.
    pub fn poll_used(&mut self, mem: &GuestMem) -> Result<Option<Used>> {
        if let Some(u) = self.backlog.pop_front() {
            return Ok(Some(u));
        }
        let used_idx = mem.read_u16(self.layout.used + 2)?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        let advance = used_idx.wrapping_sub(self.last_used);
        if advance > self.size {
            return Err(Error::UsedRingOverrun {
                queue: self.index,
                advance,
                size: self.size,
            });
        }
        let elem = self.layout.used + 4 + 8 * u64::from(self.last_used % self.size.max(1));
        let b = mem.read(elem, 8)?;
        let id = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let len = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        self.last_used = self.last_used.wrapping_add(1);
        self.arm_notification(mem)?;

        let chain = u16::try_from(id)
            .ok()
            .and_then(|h| self.in_flight.remove(&h));
        let Some(chain) = chain else {
            return Err(Error::UnknownUsedId {
                queue: self.index,
                id,
                len,
            });
        };
        self.free.extend(chain.slots.iter().copied());
        let mut remaining = len as usize;
        let mut writable_bytes = Vec::new();
        for &(gpa, cap) in &chain.writable {
            if remaining == 0 {
                break;
            }
            let take = remaining.min(cap as usize);
            // Raw chains may describe buffers outside memory: skip those.
            if let Ok(bytes) = mem.read(gpa, take) {
                writable_bytes.extend_from_slice(&bytes);
            }
            remaining -= take;
        }
        Ok(Some(Used {
            id,
            len,
            writable_bytes,
        }))
    }

    /// Writable capacity of an in-flight chain, `None` if not in flight.
    pub fn writable_capacity(&self, head: u16) -> Option<u64> {
        self.in_flight
            .get(&head)
            .map(|c| c.writable.iter().map(|&(_, l)| u64::from(l)).sum())
    }

    /// Put entries back so that the next `poll_used` returns them first, in
    /// the given order.
    fn unpoll(&mut self, entries: Vec<Used>) {
        for u in entries.into_iter().rev() {
            self.backlog.push_front(u);
        }
    }
}

/// Write `descs` verbatim (including `next`) as an indirect descriptor table
/// in freshly allocated memory; returns its guest physical address.
pub fn write_indirect_table(mem: &mut GuestMem, descs: &[RawDesc]) -> Result<u64> {
    let bytes: Vec<u8> = descs.iter().flat_map(|d| d.to_bytes()).collect();
    let gpa = mem.alloc(bytes.len() as u64, DESC_SIZE)?;
    mem.write(gpa, &bytes)?;
    Ok(gpa)
}

// ---------------------------------------------------------------------------
// The frontend
// ---------------------------------------------------------------------------

/// How [`Frontend::connect`] sets things up.
#[derive(Debug, Clone)]
pub struct FrontendOptions {
    /// Guest memory size in bytes.
    pub mem_size: usize,
    /// Size of every queue.
    pub queue_size: u16,
    /// How many queues to set up (virtio-snd has 4).
    pub num_queues: usize,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX` when the backend offers it.
    pub event_idx: bool,
    /// Negotiate `VIRTIO_RING_F_INDIRECT_DESC` when the backend offers it.
    pub indirect_desc: bool,
    /// Extra virtio feature bits to acknowledge verbatim, offered or not (for
    /// tests of how a backend treats features it never offered).
    pub extra_features: u64,
    /// Bytes of device config to read with `GET_CONFIG` at offset 0.
    pub config_size: u32,
    /// How long to retry connecting while the backend starts.
    pub connect_timeout: Duration,
}

impl Default for FrontendOptions {
    fn default() -> Self {
        Self {
            mem_size: DEFAULT_MEM_SIZE,
            queue_size: DEFAULT_QUEUE_SIZE,
            num_queues: DEFAULT_NUM_QUEUES,
            event_idx: false,
            indirect_desc: false,
            extra_features: 0,
            config_size: 16,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

struct Queue {
    ring: Ring,
    kick: EventFd,
    call: EventFd,
    notifications: u64,
}

impl Queue {
    fn new(ring: Ring) -> Result<Self> {
        Ok(Self {
            ring,
            kick: EventFd::new(EFD_NONBLOCK)?,
            call: EventFd::new(EFD_NONBLOCK)?,
            notifications: 0,
        })
    }

    /// See [`Frontend::wait_used`].
    fn wait_used(&mut self, mem: &GuestMem, timeout: Duration) -> Result<Option<Used>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(u) = self.ring.poll_used(mem)? {
                return Ok(Some(u));
            }
            // Ask for a notification, then look again: an entry that landed
            // before used_event was written may not be notified.
            self.ring.arm_notification(mem)?;
            if let Some(u) = self.ring.poll_used(mem)? {
                return Ok(Some(u));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            self.wait_call((deadline - now).min(POLL_STEP))?;
        }
    }

    /// Count pending notifications without blocking.
    fn drain_call(&mut self) -> Result<()> {
        match self.call.read() {
            Ok(n) => self.notifications += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Block until the call eventfd fires or `timeout` passes, then count.
    fn wait_call(&mut self, timeout: Duration) -> Result<()> {
        let ms = u16::try_from(timeout.as_millis().max(1)).unwrap_or(u16::MAX);
        {
            // SAFETY: the eventfd is owned by `self` and outlives this borrow,
            // which ends with this block.
            let fd = unsafe { BorrowedFd::borrow_raw(self.call.as_raw_fd()) };
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(Error::Io(e.into())),
            }
        }
        self.drain_call()
    }
}

/// A connected vhost-user frontend with guest memory and live queues.
///
/// Dropping it closes the socket, which is how a VM disconnects.
pub struct Frontend {
    // Field order is drop order: the socket closes first.
    vu: VuFrontend,
    mem: GuestMem,
    queues: Vec<Queue>,
    features: u64,
    backend_features: u64,
    protocol_features: VhostUserProtocolFeatures,
    config: Vec<u8>,
    path: PathBuf,
}

fn connect_with_retry(path: &Path, timeout: Duration) -> Result<UnixStream> {
    let start = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) => {
                let retriable = matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                );
                if !retriable || start.elapsed() >= timeout {
                    return Err(Error::Connect {
                        path: path.to_path_buf(),
                        waited: start.elapsed(),
                        source: e,
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Frontend {
    /// Connect to the backend listening on `path` (retrying for
    /// `opts.connect_timeout` while it starts) and bring the device up:
    ///
    /// `SET_OWNER`, `GET_FEATURES`, `GET_PROTOCOL_FEATURES`,
    /// `SET_PROTOCOL_FEATURES` (CONFIG | MQ | REPLY_ACK ∩ offered; with
    /// REPLY_ACK every later request waits for the backend's ack),
    /// `SET_FEATURES`, `GET_QUEUE_NUM` (with MQ), `GET_CONFIG`,
    /// `SET_MEM_TABLE`, then per queue `SET_VRING_NUM`, `SET_VRING_ADDR`,
    /// `SET_VRING_BASE(0)`, `SET_VRING_CALL`, `SET_VRING_KICK`,
    /// `SET_VRING_ENABLE(1)`.
    pub fn connect(path: impl AsRef<Path>, opts: FrontendOptions) -> Result<Self> {
        let path = path.as_ref();
        if opts.queue_size == 0 {
            return Err(Error::Options("queue_size must not be 0".into()));
        }
        if opts.num_queues == 0 {
            return Err(Error::Options("num_queues must not be 0".into()));
        }
        let stream = connect_with_retry(path, opts.connect_timeout)?;
        Self::from_stream(stream, path, opts)
    }

    /// Like [`Frontend::connect`], on a stream that is already connected to
    /// the backend at `path` (for callers that time the connect itself).
    pub fn from_stream(stream: UnixStream, path: &Path, opts: FrontendOptions) -> Result<Self> {
        if opts.queue_size == 0 {
            return Err(Error::Options("queue_size must not be 0".into()));
        }
        if opts.num_queues == 0 {
            return Err(Error::Options("num_queues must not be 0".into()));
        }
        let mut vu = VuFrontend::from_stream(stream, opts.num_queues as u64);

        vu.set_owner().map_err(vu_err("SET_OWNER"))?;
        let offered = vu.get_features().map_err(vu_err("GET_FEATURES"))?;
        if offered & F_PROTOCOL_FEATURES == 0 {
            return Err(Error::MissingFeature("VHOST_USER_F_PROTOCOL_FEATURES"));
        }
        if offered & F_VERSION_1 == 0 {
            return Err(Error::MissingFeature("VIRTIO_F_VERSION_1"));
        }
        let offered_pf = vu
            .get_protocol_features()
            .map_err(vu_err("GET_PROTOCOL_FEATURES"))?;
        let pf = offered_pf
            & (VhostUserProtocolFeatures::CONFIG
                | VhostUserProtocolFeatures::MQ
                | VhostUserProtocolFeatures::REPLY_ACK);
        vu.set_protocol_features(pf)
            .map_err(vu_err("SET_PROTOCOL_FEATURES"))?;
        if pf.contains(VhostUserProtocolFeatures::REPLY_ACK) {
            // The vhost crate only waits for an ack on requests that carry
            // NEED_REPLY; requests that have a reply of their own ignore it.
            vu.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        }

        let mut features = F_VERSION_1 | F_PROTOCOL_FEATURES;
        if opts.event_idx {
            features |= offered & F_EVENT_IDX;
        }
        if opts.indirect_desc {
            features |= offered & F_INDIRECT_DESC;
        }
        features |= opts.extra_features;
        vu.set_features(features).map_err(vu_err("SET_FEATURES"))?;

        if pf.contains(VhostUserProtocolFeatures::MQ) {
            let have = vu.get_queue_num().map_err(vu_err("GET_QUEUE_NUM"))?;
            if have < opts.num_queues as u64 {
                return Err(Error::TooFewQueues {
                    have,
                    need: opts.num_queues,
                });
            }
        }

        let config = if pf.contains(VhostUserProtocolFeatures::CONFIG) && opts.config_size > 0 {
            let buf = vec![0u8; opts.config_size as usize];
            let (_, payload) = vu
                .get_config(0, opts.config_size, VhostUserConfigFlags::empty(), &buf)
                .map_err(vu_err("GET_CONFIG"))?;
            payload
        } else {
            Vec::new()
        };

        let mut mem = GuestMem::new(opts.mem_size)?;
        let event_idx = features & F_EVENT_IDX != 0;
        let ring_bytes = RingLayout::new(0, opts.queue_size).total;
        let mut rings = Vec::with_capacity(opts.num_queues);
        for i in 0..opts.num_queues {
            let base = mem.reserve_permanent(ring_bytes, PAGE)?;
            rings.push(Ring::new(
                i,
                opts.queue_size,
                RingLayout::new(base, opts.queue_size),
                event_idx,
            ));
        }
        vu.set_mem_table(&mem.regions()?)
            .map_err(vu_err("SET_MEM_TABLE"))?;

        let mut queues = Vec::with_capacity(opts.num_queues);
        for (i, ring) in rings.into_iter().enumerate() {
            let l = ring.layout();
            vu.set_vring_num(i, opts.queue_size)
                .map_err(vu_err("SET_VRING_NUM"))?;
            let addrs = VringConfigData {
                queue_max_size: opts.queue_size,
                queue_size: opts.queue_size,
                flags: 0,
                desc_table_addr: mem.host_address(l.desc)?,
                used_ring_addr: mem.host_address(l.used)?,
                avail_ring_addr: mem.host_address(l.avail)?,
                log_addr: None,
            };
            vu.set_vring_addr(i, &addrs)
                .map_err(vu_err("SET_VRING_ADDR"))?;
            vu.set_vring_base(i, 0).map_err(vu_err("SET_VRING_BASE"))?;
            let queue = Queue::new(ring)?;
            vu.set_vring_call(i, &queue.call)
                .map_err(vu_err("SET_VRING_CALL"))?;
            vu.set_vring_kick(i, &queue.kick)
                .map_err(vu_err("SET_VRING_KICK"))?;
            vu.set_vring_enable(i, true)
                .map_err(vu_err("SET_VRING_ENABLE"))?;
            queues.push(queue);
        }

        Ok(Self {
            vu,
            mem,
            queues,
            features,
            backend_features: offered,
            protocol_features: pf,
            config,
            path: path.to_path_buf(),
        })
    }

    /// Close the connection (same as dropping).
    pub fn disconnect(self) {}

    /// The socket path we connected to.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Virtio features acknowledged with `SET_FEATURES`.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Virtio features the backend offered.
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// Protocol features acknowledged.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    /// The device config bytes read at connect time (empty without CONFIG).
    pub fn config_bytes(&self) -> &[u8] {
        &self.config
    }

    /// Read `size` config bytes at `offset` now.
    pub fn get_config(&mut self, offset: u32, size: u32) -> Result<Vec<u8>> {
        let buf = vec![0u8; size as usize];
        let (_, payload) = self
            .vu
            .get_config(offset, size, VhostUserConfigFlags::empty(), &buf)
            .map_err(vu_err("GET_CONFIG"))?;
        Ok(payload)
    }

    /// A request/reply round trip (`GET_FEATURES`), to check that the backend
    /// is still there.
    pub fn ping(&mut self) -> Result<u64> {
        self.vu.get_features().map_err(vu_err("GET_FEATURES"))
    }

    /// Stop queue `q` the vhost-user way (`GET_VRING_BASE`); returns the
    /// backend's next avail index. The queue is unusable afterwards.
    pub fn get_vring_base(&mut self, q: usize) -> Result<u32> {
        self.queue(q)?;
        self.vu.get_vring_base(q).map_err(vu_err("GET_VRING_BASE"))
    }

    /// The underlying vhost-user connection, for protocol-level tests.
    pub fn vhost_user(&mut self) -> &mut VuFrontend {
        &mut self.vu
    }

    // --- memory -----------------------------------------------------------

    /// Guest memory.
    pub fn mem(&self) -> &GuestMem {
        &self.mem
    }

    /// Guest memory size in bytes.
    pub fn mem_size(&self) -> u64 {
        self.mem.size()
    }

    /// Write `data` at guest physical address `gpa`.
    pub fn write_mem(&self, gpa: u64, data: &[u8]) -> Result<()> {
        self.mem.write(gpa, data)
    }

    /// Read `len` bytes at guest physical address `gpa`.
    pub fn read_mem(&self, gpa: u64, len: usize) -> Result<Vec<u8>> {
        self.mem.read(gpa, len)
    }

    /// Allocate `len` bytes (8-aligned) from the bump allocator.
    pub fn alloc(&mut self, len: u64) -> Result<u64> {
        self.mem.alloc(len, BUFFER_ALIGN)
    }

    /// Allocate and fill a buffer with `data`; returns its address.
    pub fn alloc_bytes(&mut self, data: &[u8]) -> Result<u64> {
        let gpa = self.mem.alloc(data.len() as u64, BUFFER_ALIGN)?;
        self.mem.write(gpa, data)?;
        Ok(gpa)
    }

    /// Reset the bump allocator (rings are kept). Do this only when nothing
    /// allocated since is still in flight.
    pub fn reset_alloc(&mut self) {
        self.mem.reset_alloc();
    }

    /// Bytes the allocator can still hand out.
    pub fn alloc_remaining(&self) -> u64 {
        self.mem.alloc_remaining()
    }

    /// Write an indirect descriptor table verbatim; returns its address.
    pub fn write_indirect_table(&mut self, descs: &[RawDesc]) -> Result<u64> {
        write_indirect_table(&mut self.mem, descs)
    }

    // --- queues -----------------------------------------------------------

    fn queue(&self, q: usize) -> Result<&Queue> {
        let count = self.queues.len();
        self.queues
            .get(q)
            .ok_or(Error::NoSuchQueue { queue: q, count })
    }

    fn queue_mut(&mut self, q: usize) -> Result<(&mut Queue, &mut GuestMem)> {
        let count = self.queues.len();
        let queue = self
            .queues
            .get_mut(q)
            .ok_or(Error::NoSuchQueue { queue: q, count })?;
        Ok((queue, &mut self.mem))
    }

    /// Number of queues set up.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The driver state of queue `q` (layout, counters, descriptor reads).
    pub fn ring(&self, q: usize) -> Result<&Ring> {
        Ok(&self.queue(q)?.ring)
    }

    /// Add a chain to queue `q`: each `readable` slice becomes one
    /// device-readable descriptor (copied into fresh guest memory), each
    /// `writable` length one device-writable descriptor (filled with
    /// [`POISON`]). The chain is published; call [`Frontend::kick`] to notify.
    /// Returns the head descriptor index.
    pub fn add_chain(&mut self, q: usize, readable: &[&[u8]], writable: &[u32]) -> Result<u16> {
        let (queue, mem) = self.queue_mut(q)?;
        queue.ring.add_chain(mem, readable, writable)
    }

    /// [`Frontend::add_chain`] through one indirect descriptor (negotiate
    /// `indirect_desc` for a device to accept it).
    pub fn add_chain_indirect(
        &mut self,
        q: usize,
        readable: &[&[u8]],
        writable: &[u32],
    ) -> Result<u16> {
        let (queue, mem) = self.queue_mut(q)?;
        queue.ring.add_chain_indirect(mem, readable, writable)
    }

    /// Raw API: write `descs` into free descriptor slots of queue `q` exactly
    /// as given — addresses, lengths and flags verbatim — and return the head
    /// slot. Not published: call [`Frontend::publish`].
    ///
    /// `next` values smaller than `descs.len()` index into `descs` and are
    /// translated to the slot that descriptor landed in (so `next: 0` on the
    /// last descriptor loops back to the head; on a fresh queue slot `i` holds
    /// `descs[i]`). Other values are written verbatim (`u16::MAX`, or the queue
    /// size, for "out of range"). A chain longer than the queue can be made
    /// with a loop or with an indirect table.
    ///
    /// When the device returns the head, `Used::writable_bytes` gathers from
    /// the descriptors with `VIRTQ_DESC_F_WRITE` (and not INDIRECT) in slice
    /// order, skipping any outside guest memory.
    pub fn add_raw_chain(&mut self, q: usize, descs: &[RawDesc]) -> Result<u16> {
        let (queue, mem) = self.queue_mut(q)?;
        queue.ring.add_raw_chain(mem, descs)
    }

    /// Raw API: put `head` (any value, in flight or not, even out of range)
    /// into queue `q`'s avail ring and advance `avail->idx`.
    ///
    /// Publishing a head twice is allowed: the first time the device returns
    /// it frees its descriptors, a second return is then reported as
    /// [`Error::UnknownUsedId`] (or, if a new chain reused the slot meanwhile,
    /// taken as that chain's return — hostile tests should not add chains
    /// until the duplicates are accounted for).
    pub fn publish(&mut self, q: usize, head: u16) -> Result<()> {
        let (queue, mem) = self.queue_mut(q)?;
        queue.ring.publish(mem, head)
    }

    /// Free the descriptors of a chain the device will not return.
    pub fn forget_chain(&mut self, q: usize, head: u16) -> Result<bool> {
        let (queue, _) = self.queue_mut(q)?;
        Ok(queue.ring.forget_chain(head))
    }

    /// Free descriptors of queue `q`.
    pub fn free_descriptors(&self, q: usize) -> Result<usize> {
        Ok(self.queue(q)?.ring.free_descriptors())
    }

    /// Chains in flight on queue `q`.
    pub fn in_flight(&self, q: usize) -> Result<usize> {
        Ok(self.queue(q)?.ring.in_flight())
    }

    /// Notify the device that queue `q` has new buffers (always kicks).
    pub fn kick(&mut self, q: usize) -> Result<()> {
        let (queue, _) = self.queue_mut(q)?;
        fence(Ordering::SeqCst);
        queue.kick.write(1)?;
        queue.ring.mark_kicked();
        Ok(())
    }

    /// Whether the device asked to be kicked for what was published since
    /// the last kick (EVENT_IDX `avail_event`, or the NO_NOTIFY flag).
    pub fn needs_kick(&self, q: usize) -> Result<bool> {
        self.queue(q)?.ring.needs_kick(&self.mem)
    }

    /// Kick only if [`Frontend::needs_kick`]; returns whether it kicked.
    pub fn kick_if_needed(&mut self, q: usize) -> Result<bool> {
        if self.needs_kick(q)? {
            self.kick(q)?;
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// `n` separate kick writes on queue `q`, as fast as possible.
    pub fn kick_storm(&mut self, q: usize, n: u64) -> Result<()> {
        for _ in 0..n {
            self.kick(q)?;
        }
        Ok(())
    }

    /// Read and count pending call notifications of queue `q` without
    /// blocking; returns the total counted since connect.
    pub fn notifications(&mut self, q: usize) -> Result<u64> {
        let (queue, _) = self.queue_mut(q)?;
        queue.drain_call()?;
        Ok(queue.notifications)
    }

    /// Take the next used buffer of queue `q` if there is one.
    pub fn poll_used(&mut self, q: usize) -> Result<Option<Used>> {
        let (queue, mem) = self.queue_mut(q)?;
        queue.ring.poll_used(mem)
    }

    /// Wait up to `timeout` for the next used buffer of queue `q`.
    ///
    /// Blocks on the call eventfd in steps of at most [`POLL_STEP`] and
    /// re-reads the used ring after every step, so it works whether or not
    /// the device notifies. With EVENT_IDX it first sets `used_event` so the
    /// device should notify. `Ok(None)` on timeout.
    pub fn wait_used(&mut self, q: usize, timeout: Duration) -> Result<Option<Used>> {
        let (queue, mem) = self.queue_mut(q)?;
        queue.wait_used(mem, timeout)
    }

    /// Block until the call eventfd of any queue in `queues` fires or
    /// `timeout` passes (nanosecond resolution), then count the
    /// notifications. With EVENT_IDX it first asks for a notification on
    /// each queue. Take the buffers with [`Frontend::poll_used`]; a call that
    /// came before this wait is still pending, so nothing is missed.
    pub fn wait_calls(&mut self, queues: &[usize], timeout: Duration) -> Result<()> {
        for &q in queues {
            let (queue, mem) = self.queue_mut(q)?;
            queue.ring.arm_notification(mem)?;
        }
        {
            let mut fds = Vec::with_capacity(queues.len());
            for &q in queues {
                let fd = self.queue(q)?.call.as_raw_fd();
                // SAFETY: the eventfd is owned by `self.queues` and outlives
                // this borrow, which ends with this block.
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                fds.push(PollFd::new(fd, PollFlags::POLLIN));
            }
            let ts = nix::sys::time::TimeSpec::from_duration(timeout);
            match nix::poll::ppoll(&mut fds, Some(ts), None) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(Error::Io(e.into())),
            }
        }
        for &q in queues {
            self.queue_mut(q)?.0.drain_call()?;
        }
        Ok(())
    }

    /// Send one control request on queue 0 with a `response_len`-byte
    /// writable buffer and wait up to [`CONTROL_TIMEOUT`] for its return.
    /// Returns exactly the bytes the device reports having written
    /// (`used.len`). Other chains returned meanwhile stay queued for
    /// `poll_used`/`wait_used`.
    pub fn control(&mut self, request: &[u8], response_len: u32) -> Result<Vec<u8>> {
        const Q: usize = 0;
        let head = self.add_chain(Q, &[request], &[response_len])?;
        self.kick(Q)?;
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        let mut others = Vec::new();
        let result = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.wait_used(Q, left) {
                Ok(Some(u)) if u.id == u32::from(head) => {
                    if u.len > response_len {
                        break Err(Error::UsedLenTooLarge {
                            queue: Q,
                            id: u.id,
                            len: u.len,
                            capacity: u64::from(response_len),
                        });
                    }
                    break Ok(u.writable_bytes);
                }
                Ok(Some(other)) => others.push(other),
                Ok(None) => {
                    break Err(Error::Timeout {
                        queue: Q,
                        waited: CONTROL_TIMEOUT,
                    })
                }
                Err(e) => break Err(e),
            }
        };
        if let Ok((queue, _)) = self.queue_mut(Q) {
            queue.ring.unpoll(others);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal in-process device: walks chains (direct or indirect),
    /// gathers the readable bytes, writes `reply(readable)` into the writable
    /// buffers and pushes a used entry.
    struct FakeDevice {
        layout: RingLayout,
        size: u16,
        next_avail: u16,
        used_idx: u16,
    }

    impl FakeDevice {
        fn new(ring: &Ring) -> Self {
            Self {
                layout: ring.layout(),
                size: ring.size(),
                next_avail: 0,
                used_idx: 0,
            }
        }

        fn desc_at(mem: &GuestMem, table: u64, i: u16) -> RawDesc {
            let b = mem.read(table + DESC_SIZE * u64::from(i), 16).unwrap();
            RawDesc::from_bytes(&b.try_into().unwrap())
        }

        /// Returns (head, descriptors walked) for each processed chain.
        fn process(
            &mut self,
            mem: &GuestMem,
            reply: impl Fn(&[u8]) -> Vec<u8>,
        ) -> Vec<(u16, Vec<RawDesc>)> {
            let mut out = Vec::new();
            let avail_idx = mem.read_u16(self.layout.avail + 2).unwrap();
            while self.next_avail != avail_idx {
                let slot = u64::from(self.next_avail % self.size);
                let head = u16::from_le_bytes(
                    mem.read(self.layout.avail + 4 + 2 * slot, 2)
                        .unwrap()
                        .try_into()
                        .unwrap(),
                );
                self.next_avail = self.next_avail.wrapping_add(1);
                let mut walked = Vec::new();
                let (mut table, mut i) = (self.layout.desc, head);
                loop {
                    let d = Self::desc_at(mem, table, i);
                    if d.flags & VIRTQ_DESC_F_INDIRECT != 0 {
                        table = d.addr;
                        i = 0;
                        continue;
                    }
                    walked.push(d);
                    assert!(walked.len() <= 1024, "loop in chain");
                    if d.flags & VIRTQ_DESC_F_NEXT == 0 {
                        break;
                    }
                    i = d.next;
                }
                let readable: Vec<u8> = walked
                    .iter()
                    .filter(|d| d.flags & VIRTQ_DESC_F_WRITE == 0)
                    .flat_map(|d| mem.read(d.addr, d.len as usize).unwrap())
                    .collect();
                let answer = reply(&readable);
                let mut written = 0usize;
                for d in walked.iter().filter(|d| d.flags & VIRTQ_DESC_F_WRITE != 0) {
                    let take = (answer.len() - written).min(d.len as usize);
                    mem.write(d.addr, &answer[written..written + take]).unwrap();
                    written += take;
                }
                self.push_used(mem, u32::from(head), written as u32);
                out.push((head, walked));
            }
            out
        }

        fn push_used(&mut self, mem: &GuestMem, id: u32, len: u32) {
            let elem = self.layout.used + 4 + 8 * u64::from(self.used_idx % self.size);
            let mut b = id.to_le_bytes().to_vec();
            b.extend_from_slice(&len.to_le_bytes());
            mem.write(elem, &b).unwrap();
            self.used_idx = self.used_idx.wrapping_add(1);
            mem.write_u16(self.layout.used + 2, self.used_idx).unwrap();
        }
    }

    fn setup(size: u16, event_idx: bool) -> (GuestMem, Ring) {
        let mut mem = GuestMem::new(1 << 20).unwrap();
        let layout = RingLayout::new(0, size);
        let base = mem.reserve_permanent(layout.total, PAGE).unwrap();
        (
            mem,
            Ring::new(0, size, RingLayout::new(base, size), event_idx),
        )
    }

    #[test]
    fn layout_is_aligned_and_disjoint() {
        for size in [1u16, 4, 64, 256, 1024] {
            let l = RingLayout::new(8192, size);
            assert_eq!(l.desc % 16, 0);
            assert_eq!(l.avail % 2, 0);
            assert_eq!(l.used % 4, 0);
            assert!(l.avail >= l.desc + 16 * u64::from(size));
            assert!(l.used >= l.avail + 6 + 2 * u64::from(size));
            assert!(8192 + l.total >= l.used + 6 + 8 * u64::from(size));
            assert_eq!(l.total % PAGE, 0);
        }
    }

    #[test]
    fn add_chain_writes_linked_descriptors_and_publishes() {
        let (mut mem, mut ring) = setup(8, false);
        let head = ring
            .add_chain(&mut mem, &[b"abc", b"defg"], &[8, 2])
            .unwrap();
        assert_eq!(head, 0);
        let d: Vec<RawDesc> = (0..4).map(|i| ring.read_desc(&mem, i).unwrap()).collect();
        assert_eq!(d[0].flags, VIRTQ_DESC_F_NEXT);
        assert_eq!((d[0].len, d[0].next), (3, 1));
        assert_eq!(mem.read(d[0].addr, 3).unwrap(), b"abc");
        assert_eq!((d[1].len, d[1].next, d[1].flags), (4, 2, VIRTQ_DESC_F_NEXT));
        assert_eq!(d[2].flags, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE);
        assert_eq!(mem.read(d[2].addr, 8).unwrap(), vec![POISON; 8]);
        assert_eq!(d[3].flags, VIRTQ_DESC_F_WRITE);
        assert_eq!(mem.read_u16(ring.layout().avail + 2).unwrap(), 1);
        assert_eq!(mem.read_u16(ring.layout().avail + 4).unwrap(), 0);
        assert_eq!(ring.free_descriptors(), 4);
    }

    #[test]
    fn used_buffer_returns_written_bytes_and_frees_descriptors() {
        let (mut mem, mut ring) = setup(8, false);
        let mut dev = FakeDevice::new(&ring);
        let head = ring.add_chain(&mut mem, &[b"hello"], &[3, 4]).unwrap();
        assert!(ring.poll_used(&mem).unwrap().is_none());
        dev.process(&mem, |r| r.iter().rev().copied().collect());
        let u = ring.poll_used(&mem).unwrap().unwrap();
        assert_eq!(u.id, u32::from(head));
        assert_eq!(u.len, 5);
        assert_eq!(u.writable_bytes, b"olleh");
        assert_eq!(ring.free_descriptors(), 8);
        assert_eq!(ring.in_flight(), 0);
        assert!(ring.poll_used(&mem).unwrap().is_none());
    }

    #[test]
    fn queue_full_then_descriptors_are_reused() {
        let (mut mem, mut ring) = setup(4, false);
        let mut dev = FakeDevice::new(&ring);
        let a = ring.add_chain(&mut mem, &[b"a"], &[1]).unwrap();
        let b = ring.add_chain(&mut mem, &[b"b"], &[1]).unwrap();
        assert_eq!((a, b), (0, 2));
        assert!(matches!(
            ring.add_chain(&mut mem, &[b"c"], &[]),
            Err(Error::QueueFull {
                needed: 1,
                free: 0,
                ..
            })
        ));
        dev.process(&mem, |r| r.to_vec());
        assert_eq!(ring.poll_used(&mem).unwrap().unwrap().writable_bytes, b"a");
        assert_eq!(ring.poll_used(&mem).unwrap().unwrap().writable_bytes, b"b");
        let c = ring
            .add_chain(&mut mem, &[b"c", b"d", b"e", b"f"], &[])
            .unwrap();
        assert_eq!(c, 0);
        assert_eq!(ring.free_descriptors(), 0);
    }

    #[test]
    fn indices_wrap_around_u16() {
        let (mut mem, mut ring) = setup(4, true);
        let mut dev = FakeDevice::new(&ring);
        for i in 0..70_000u32 {
            mem.reset_alloc();
            let req = i.to_le_bytes();
            ring.add_chain(&mut mem, &[&req], &[4]).unwrap();
            dev.process(&mem, |r| r.to_vec());
            let u = ring.poll_used(&mem).unwrap().unwrap();
            assert_eq!(u.writable_bytes, req);
            assert_eq!(ring.used_event(&mem).unwrap(), ring.last_used_idx());
        }
        assert_eq!(ring.avail_idx(), (70_000u32 % 65_536) as u16);
        assert_eq!(ring.free_descriptors(), 4);
    }

    #[test]
    fn raw_chain_translates_small_next_and_keeps_others() {
        let (mut mem, mut ring) = setup(8, false);
        // Occupy slots 0..2 so the raw chain lands elsewhere.
        ring.add_chain(&mut mem, &[b"x", b"y"], &[]).unwrap();
        let descs = [
            RawDesc::readable(0x10_0000_0000, 4).then(1), // outside memory
            RawDesc::readable(0x2000, 0).then(0),         // zero length, loops to head
            RawDesc::writable(0x3000, 8).then(u16::MAX),  // out of range next
        ];
        let head = ring.add_raw_chain(&mut mem, &descs).unwrap();
        assert_eq!(head, 2);
        assert_eq!(ring.read_desc(&mem, 2).unwrap(), descs[0].then(3));
        assert_eq!(ring.read_desc(&mem, 3).unwrap(), descs[1].then(2));
        assert_eq!(ring.read_desc(&mem, 4).unwrap(), descs[2]);
        // Not published until asked.
        assert_eq!(mem.read_u16(ring.layout().avail + 2).unwrap(), 1);
        ring.publish(&mem, head).unwrap();
        ring.publish(&mem, 1000).unwrap();
        assert_eq!(mem.read_u16(ring.layout().avail + 2).unwrap(), 3);
        assert_eq!(mem.read_u16(ring.layout().avail + 4 + 2 * 2).unwrap(), 1000);
        assert!(ring.forget_chain(head));
        assert!(!ring.forget_chain(head));
        assert_eq!(ring.free_descriptors(), 6);
    }

    #[test]
    fn raw_chain_writable_bytes_are_gathered() {
        let (mut mem, mut ring) = setup(8, false);
        let mut dev = FakeDevice::new(&ring);
        let buf = mem.alloc(16, 8).unwrap();
        mem.write(buf, b"ping").unwrap();
        let out = mem.alloc(16, 8).unwrap();
        let head = ring
            .add_raw_chain(
                &mut mem,
                &[
                    RawDesc::readable(buf, 4).then(1),
                    RawDesc::writable(out, 16),
                ],
            )
            .unwrap();
        ring.publish(&mem, head).unwrap();
        dev.process(&mem, |_| b"pong".to_vec());
        let u = ring.poll_used(&mem).unwrap().unwrap();
        assert_eq!((u.id, u.len), (u32::from(head), 4));
        assert_eq!(u.writable_bytes, b"pong");
    }

    #[test]
    fn indirect_chain_uses_one_slot() {
        let (mut mem, mut ring) = setup(4, false);
        let mut dev = FakeDevice::new(&ring);
        let head = ring
            .add_chain_indirect(&mut mem, &[b"12", b"34"], &[2, 2])
            .unwrap();
        assert_eq!(ring.free_descriptors(), 3);
        let d = ring.read_desc(&mem, head).unwrap();
        assert_eq!((d.flags, d.len), (VIRTQ_DESC_F_INDIRECT, 64));
        let walked = dev.process(&mem, |r| r.iter().map(|b| b + 1).collect());
        assert_eq!(walked[0].1.len(), 4);
        let u = ring.poll_used(&mem).unwrap().unwrap();
        assert_eq!(u.writable_bytes, b"2345");
        assert_eq!(ring.free_descriptors(), 4);
    }

    #[test]
    fn indirect_table_is_written_verbatim() {
        let (mut mem, _) = setup(4, false);
        let t = [RawDesc {
            addr: 1,
            len: 2,
            flags: 0xffff,
            next: 7,
        }];
        let gpa = write_indirect_table(&mut mem, &t).unwrap();
        assert_eq!(gpa % 16, 0);
        let b: [u8; 16] = mem.read(gpa, 16).unwrap().try_into().unwrap();
        assert_eq!(RawDesc::from_bytes(&b), t[0]);
    }

    #[test]
    fn unknown_and_overrun_used_entries_are_errors() {
        let (mut mem, mut ring) = setup(4, false);
        let mut dev = FakeDevice::new(&ring);
        dev.push_used(&mem, 3, 0);
        assert!(matches!(
            ring.poll_used(&mem),
            Err(Error::UnknownUsedId { id: 3, .. })
        ));
        ring.add_chain(&mut mem, &[b"a"], &[]).unwrap();
        for _ in 0..5 {
            dev.push_used(&mem, 0, 0);
        }
        assert!(matches!(
            ring.poll_used(&mem),
            Err(Error::UsedRingOverrun { advance: 5, .. })
        ));
    }

    #[test]
    fn event_idx_kick_decision() {
        let (mut mem, mut ring) = setup(8, true);
        let avail_event = ring.layout().used + 4 + 8 * 8;
        ring.add_chain(&mut mem, &[b"a"], &[]).unwrap();
        // Device wants a kick when avail idx passes 0: yes for 0 -> 1.
        assert!(ring.needs_kick(&mem).unwrap());
        ring.mark_kicked();
        mem.write_u16(avail_event, 5).unwrap();
        ring.add_chain(&mut mem, &[b"b"], &[]).unwrap();
        assert!(!ring.needs_kick(&mem).unwrap());
        for _ in 0..4 {
            ring.add_chain(&mut mem, &[b"c"], &[]).unwrap();
        }
        // avail idx went 1 -> 6, crossing 5.
        assert!(ring.needs_kick(&mem).unwrap());
    }

    #[test]
    fn no_notify_flag_without_event_idx() {
        let (mut mem, mut ring) = setup(8, false);
        ring.add_chain(&mut mem, &[b"a"], &[]).unwrap();
        assert!(ring.needs_kick(&mem).unwrap());
        mem.write_u16(ring.layout().used, VIRTQ_USED_F_NO_NOTIFY)
            .unwrap();
        assert!(!ring.needs_kick(&mem).unwrap());
        ring.arm_notification(&mem).unwrap();
        assert_eq!(ring.used_event(&mem).unwrap(), 0);
    }

    #[test]
    fn memory_bounds_and_allocator() {
        let mut mem = GuestMem::new(64 << 10).unwrap();
        assert!(mem.write(64 << 10, b"x").is_err());
        assert!(mem.write((64 << 10) - 1, b"xy").is_err());
        assert!(mem.read(u64::MAX, 1).is_err());
        mem.write((64 << 10) - 1, b"z").unwrap();
        let a = mem.alloc(3, 8).unwrap();
        let b = mem.alloc(1, 8).unwrap();
        assert_eq!((a, b), (0, 8));
        assert!(matches!(
            mem.alloc(64 << 10, 8),
            Err(Error::OutOfMemory { .. })
        ));
        assert!(matches!(
            mem.alloc(u64::MAX, 8),
            Err(Error::OutOfMemory { .. })
        ));
        mem.reset_alloc();
        assert_eq!(mem.alloc(1, 1).unwrap(), 0);
    }

    #[test]
    fn wait_used_without_notification_falls_back_to_polling() {
        let (mut mem, ring) = setup(8, true);
        let mut dev = FakeDevice::new(&ring);
        let mut queue = Queue::new(ring).unwrap();
        queue.ring.add_chain(&mut mem, &[b"quiet"], &[8]).unwrap();
        std::thread::scope(|s| {
            let mem = &mem;
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                dev.process(mem, |r| r.to_vec()); // never signals the call fd
            });
            let u = queue
                .wait_used(mem, Duration::from_secs(5))
                .unwrap()
                .unwrap();
            assert_eq!(u.writable_bytes, b"quiet");
        });
        assert_eq!(queue.notifications, 0);
        assert_eq!(queue.ring.used_event(&mem).unwrap(), 1);
    }

    #[test]
    fn wait_used_wakes_on_call_and_times_out() {
        let (mut mem, ring) = setup(8, false);
        let mut dev = FakeDevice::new(&ring);
        let mut queue = Queue::new(ring).unwrap();
        let t = Instant::now();
        assert!(queue
            .wait_used(&mem, Duration::from_millis(30))
            .unwrap()
            .is_none());
        assert!(t.elapsed() >= Duration::from_millis(30));
        queue.ring.add_chain(&mut mem, &[b"loud"], &[4]).unwrap();
        let call = queue.call.try_clone().unwrap();
        std::thread::scope(|s| {
            let mem = &mem;
            s.spawn(move || {
                dev.process(mem, |r| r.to_vec());
                call.write(1).unwrap();
            });
            let u = queue
                .wait_used(mem, Duration::from_secs(5))
                .unwrap()
                .unwrap();
            assert_eq!(u.writable_bytes, b"loud");
        });
        queue.drain_call().unwrap();
        assert_eq!(queue.notifications, 1);
    }

    #[test]
    fn empty_chains_are_refused() {
        let (mut mem, mut ring) = setup(4, false);
        assert!(matches!(
            ring.add_chain(&mut mem, &[], &[]),
            Err(Error::EmptyChain)
        ));
        assert!(matches!(
            ring.add_raw_chain(&mut mem, &[]),
            Err(Error::EmptyChain)
        ));
    }
}
