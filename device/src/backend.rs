//! The vhost-user backend: moves guest buffers between the virtqueues and
//! the broker. One worker thread handles all four queues, the broker
//! channel and the pacing timer, so there is no locking between them.
//!
//! The device paces the guest: from START on, a playback buffer goes back
//! to the guest when the stream's real-time clock has advanced by its
//! length (its bytes then go to the broker, which plays them), and a
//! capture buffer is filled when its length has come due — with silence by
//! the device itself while input is off or the backend has no source, and
//! otherwise with what the broker answers. One timer wake-up per period
//! serves both directions; the broker wakes only for batches of playback
//! and for capture requests while a real source is on. The broker meters
//! both directions against its own clock, so a rogue device gains nothing
//! by running fast.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::Duration;

use log::{debug, error, info, warn};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};
use vsnd_ipc::{
    BrokerMsg, Channel, ChannelError, DeviceMsg, Direction, GateState, Pacing, PcmParams,
    MAX_BUFFER_BYTES, MAX_PCM_CHUNK, MAX_PENDING_CAPTURE, MAX_QUEUED_PLAYBACK_BYTES,
};

use crate::control::{stream_direction, SndModel, JACKS};
use crate::sg::{split_chain, Chain, Sg};
use crate::virtio_snd::*;
use vsnd_ipc::lifecycle::PcmState;

/// Event id of the broker channel on the worker's epoll (ids up to
/// NUM_QUEUES are reserved by vhost-user-backend).
pub const BROKER_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Event id of the pacing timer on the worker's epoll.
pub const TIMER_EVENT: u16 = NUM_QUEUES as u16 + 2;

/// Largest virtqueue the device accepts.
const MAX_QUEUE_SIZE: usize = 256;

/// Control requests are at most 24 bytes; read no more than this.
const MAX_CONTROL_REQUEST: usize = 64;

/// Jack events waiting for an event buffer from the guest.
const MAX_EVENT_BACKLOG: usize = 64;

/// Broker messages handled per wakeup before the queues get a turn.
const MAX_BROKER_BATCH: usize = 256;

/// Playback bytes the guest may have waiting at the device; past this the
/// guest gets IO_ERR (the broker's own, larger, limit is never reached).
const MAX_DEVICE_QUEUED_PLAYBACK: u64 = (MAX_QUEUED_PLAYBACK_BYTES / 2) as u64;

/// Pending transfers per queue; a guest that re-publishes heads it has not
/// got back cannot grow the lists past this.
const MAX_PENDING_TX: usize = 1024;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

struct PendingTx {
    head: u16,
    bytes: u64,
    /// The whole readable part: the transfer header, then the PCM bytes,
    /// read when the buffer is consumed.
    readable: Sg,
    writable: Sg,
}

struct PendingRx {
    buffer: u64,
    head: u16,
    len: u32,
    written: u32,
    writable: Sg,
    /// The broker was asked for its data (the buffer is due and waits for
    /// the answer).
    asked: bool,
}

/// The real-time clock of one running stream, on CLOCK_MONOTONIC.
#[derive(Debug, Clone, Copy)]
struct StreamClock {
    anchor: Duration,
    /// Bytes accounted since `anchor`.
    done: u64,
}

impl StreamClock {
    fn new(now: Duration) -> Self {
        StreamClock {
            anchor: now,
            done: 0,
        }
    }

    /// Bytes due by `now` and not yet accounted.
    fn due(&self, now: Duration, p: &PcmParams) -> u64 {
        p.bytes_in(now.saturating_sub(self.anchor))
            .saturating_sub(self.done)
    }

    /// When `more` bytes beyond those accounted will be due.
    fn when(&self, more: u64, p: &PcmParams) -> Duration {
        self.anchor
            .saturating_add(p.time_for(self.done.saturating_add(more)))
    }
}

/// CLOCK_MONOTONIC now, the clock of the timer and of both streams.
fn monotonic() -> Duration {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => Duration::new(
            u64::try_from(ts.tv_sec()).unwrap_or(0),
            u32::try_from(ts.tv_nsec()).unwrap_or(0),
        ),
        // Cannot fail for CLOCK_MONOTONIC; a zero time only delays pacing.
        Err(_) => Duration::ZERO,
    }
}

fn dir_index(d: Direction) -> usize {
    match d {
        Direction::Output => 0,
        Direction::Input => 1,
    }
}

/// The virtio-snd device.
pub struct SndBackend {
    mem: Option<Mem>,
    event_idx: bool,
    model: SndModel,
    gate: GateState,
    pacing: Pacing,
    broker: Channel,
    next_buffer: u64,
    tx_pending: VecDeque<PendingTx>,
    tx_queued_bytes: u64,
    rx_pending: VecDeque<PendingRx>,
    event_buffers: VecDeque<(u16, Sg)>,
    event_backlog: VecDeque<[u8; EVENT_SIZE]>,
    to_signal: [bool; NUM_QUEUES],
    /// Transfer queues whose kicks are off: the stream runs and has a
    /// deadline, at which the device looks at the queue anyway.
    kicks_off: [bool; NUM_QUEUES],
    /// Per direction (output, input): the clock while the stream runs.
    clocks: [Option<StreamClock>; 2],
    /// Consumed playback not yet sent to the broker.
    played: Vec<u8>,
    timer: TimerFd,
    /// What the timer is set to; `None` when disarmed.
    armed: Option<Duration>,
    /// The timer fired and has not been set since (it stays readable).
    timer_fired: bool,
    scratch: Vec<u8>,
    exit: (EventConsumer, EventNotifier),
}

impl SndBackend {
    /// A device answering the guest from `model`, talking to the broker on
    /// `broker` (hello already exchanged), pacing as the broker asked.
    pub fn new(
        model: SndModel,
        gate: GateState,
        pacing: Pacing,
        broker: Channel,
    ) -> io::Result<Self> {
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        // A stream handed over running (a test or fuzz harness builds the
        // model directly) runs its clock from now.
        let running = |d| model.stream(d).state() == PcmState::Running;
        let clocks = [Direction::Output, Direction::Input]
            .map(|d| running(d).then(|| StreamClock::new(monotonic())));
        Ok(SndBackend {
            mem: None,
            event_idx: false,
            model,
            gate,
            pacing,
            broker,
            next_buffer: 0,
            tx_pending: VecDeque::new(),
            tx_queued_bytes: 0,
            rx_pending: VecDeque::new(),
            event_buffers: VecDeque::new(),
            event_backlog: VecDeque::new(),
            to_signal: [false; NUM_QUEUES],
            kicks_off: [false; NUM_QUEUES],
            clocks,
            played: Vec::new(),
            timer,
            armed: None,
            timer_fired: false,
            scratch: Vec::new(),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
        })
    }

    /// The pacing timer's descriptor, for the worker's epoll
    /// ([`TIMER_EVENT`]).
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_fd().as_raw_fd()
    }

    fn send(&self, msg: &DeviceMsg) {
        match self.broker.send(msg) {
            Ok(()) => {}
            Err(ChannelError::Closed) => broker_gone("the broker closed the channel"),
            Err(e) => broker_gone(&e.to_string()),
        }
    }

    fn next_id(&mut self) -> u64 {
        let id = self.next_buffer;
        self.next_buffer = self.next_buffer.wrapping_add(1);
        id
    }

    /// Return a chain to the guest; the queue is signalled once per wakeup.
    fn complete(&mut self, vrings: &[VringRwLock], q: u16, head: u16, len: u32) {
        let Some(vring) = vrings.get(usize::from(q)) else {
            return;
        };
        match vring.add_used(head, len) {
            Ok(()) => {
                if let Some(s) = self.to_signal.get_mut(usize::from(q)) {
                    *s = true;
                }
            }
            Err(e) => debug!("queue {q}: add_used({head}, {len}) failed: {e}"),
        }
    }

    fn signal_all(&mut self, vrings: &[VringRwLock]) {
        for (q, vring) in vrings.iter().enumerate() {
            if !std::mem::take(&mut self.to_signal[q.min(NUM_QUEUES - 1)]) {
                continue;
            }
            if !matches!(vring.needs_notification(), Ok(false)) {
                if let Err(e) = vring.signal_used_queue() {
                    debug!("queue {q}: signal failed: {e}");
                }
            }
        }
    }

    /// Process a kicked queue, honouring EVENT_IDX: after re-enabling
    /// notifications, re-check for buffers that arrived meanwhile, so no
    /// queue is ever left with unseen buffers.
    ///
    /// A ring the device cannot pop from although its index says buffers
    /// are waiting (an available index more than a queue ahead, a ring
    /// outside guest memory) would make that re-check true forever: after
    /// two rounds in a row that popped nothing, the device waits for the
    /// next kick instead of spinning.
    fn process_queue(&mut self, q: u16, vrings: &[VringRwLock]) {
        let Some(vring) = vrings.get(usize::from(q)) else {
            return;
        };
        // A ring the frontend stopped (or has not started) is not touched:
        // not even its avail_event. A transfer queue's `kicks_off` stays
        // as it is, so that it is looked at again once it runs.
        if !vring.get_ref().get_queue().ready() || !vring.get_ref().is_enabled() {
            return;
        }
        let mut idle_rounds = 0u8;
        loop {
            if self.event_idx {
                let _ = vring.disable_notification();
            }
            if self.drain_queue(q, vrings) == 0 {
                idle_rounds = idle_rounds.saturating_add(1);
            } else {
                idle_rounds = 0;
            }
            if !self.event_idx {
                break;
            }
            let off = self.has_deadline(q);
            if let Some(k) = self.kicks_off.get_mut(usize::from(q)) {
                *k = off;
            }
            if off {
                // Not re-enabled: the guest stops kicking this queue while
                // its stream has a deadline, when the device drains the
                // queue anyway.
                break;
            }
            match vring.enable_notification() {
                Ok(true) if idle_rounds < 2 => continue,
                Ok(true) => {
                    debug!("queue {q}: the available ring cannot be used; waiting for a kick");
                    break;
                }
                _ => break,
            }
        }
    }

    /// Whether transfer queue `q`'s stream runs and has a buffer coming
    /// due, so that the timer will wake the device for it.
    fn has_deadline(&self, q: u16) -> bool {
        match q {
            TX_QUEUE => self.tx_deadline().is_some(),
            RX_QUEUE => self.rx_deadline().is_some(),
            _ => false,
        }
    }

    /// Transfer queues whose kicks are off but whose stream no longer has a
    /// deadline: kicks on again (and what came meanwhile is taken).
    fn rearm_kicks(&mut self, vrings: &[VringRwLock]) {
        for q in [TX_QUEUE, RX_QUEUE] {
            if self.kicks_off.get(usize::from(q)) == Some(&true) && !self.has_deadline(q) {
                self.process_queue(q, vrings);
            }
        }
    }

    /// Take what the guest published on transfer queues whose kicks are
    /// off.
    fn drain_quiet(&mut self, vrings: &[VringRwLock]) {
        for q in [TX_QUEUE, RX_QUEUE] {
            if self.kicks_off.get(usize::from(q)) == Some(&true) {
                self.process_queue(q, vrings);
            }
        }
    }

    /// Pop every available chain of queue `q`; returns how many.
    fn drain_queue(&mut self, q: u16, vrings: &[VringRwLock]) -> usize {
        let Some(vring) = vrings.get(usize::from(q)) else {
            return 0;
        };
        let Some(atomic) = self.mem.clone() else {
            return 0;
        };
        let mem = atomic.memory();
        let mut count = 0usize;
        loop {
            let popped = vring
                .get_mut()
                .get_queue_mut()
                .iter(&*mem)
                .ok()
                .and_then(|mut it| it.next());
            let Some(chain) = popped else { break count };
            count = count.saturating_add(1);
            let head = chain.head_index();
            let parts = match split_chain(chain) {
                Ok(c) => c,
                Err(e) => {
                    debug!("queue {q}: dropping chain {head}: {e}");
                    self.complete(vrings, q, head, 0);
                    continue;
                }
            };
            match q {
                CONTROL_QUEUE => self.control(&mem, vrings, head, &parts),
                EVENT_QUEUE => self.hold_event_buffer(&mem, vrings, head, parts),
                TX_QUEUE => self.tx(&mem, vrings, head, parts),
                RX_QUEUE => self.rx(&mem, vrings, head, parts),
                _ => self.complete(vrings, q, head, 0),
            }
        }
    }

    fn control(&mut self, mem: &GuestMemoryMmap, vrings: &[VringRwLock], head: u16, c: &Chain) {
        let n = c.readable.len().min(MAX_CONTROL_REQUEST as u64) as usize;
        let mut buf = [0u8; MAX_CONTROL_REQUEST];
        let req: &[u8] = match buf.get_mut(..n) {
            Some(r) => match c.readable.read_at(mem, 0, r) {
                Ok(()) => r,
                Err(_) => &[],
            },
            None => &[],
        };
        let room = usize::try_from(c.writable.len()).unwrap_or(usize::MAX);
        if room < HDR_SIZE {
            debug!("control: response buffer of {room} bytes cannot hold a status");
            return self.complete(vrings, CONTROL_QUEUE, head, 0);
        }
        // A request whose answer cannot be written is not carried out: the
        // guest could not know whether it took effect.
        if c.writable.write_at(mem, 0, &[0u8; HDR_SIZE]).is_err() {
            debug!("control: response buffer outside guest memory; request ignored");
            return self.complete(vrings, CONTROL_QUEUE, head, 0);
        }
        let outcome = self.model.handle(req, room);
        let len = match c.writable.write_at(mem, 0, &outcome.response) {
            Ok(()) => outcome.response.len() as u32,
            Err(_) => 0,
        };
        // Tell the broker before answering, so that a START it hears about
        // always precedes the guest's reaction to the answer.
        if let Some(effect) = outcome.effect {
            debug!("control: {effect:?}");
            // What the guest's clock consumed before a STOP or RELEASE
            // reaches the broker before it.
            if matches!(
                effect,
                DeviceMsg::Stop {
                    direction: Direction::Output
                } | DeviceMsg::Release {
                    direction: Direction::Output
                }
            ) {
                self.flush_played();
            }
            self.send(&effect);
            match effect {
                DeviceMsg::Start { direction } => {
                    self.clocks[dir_index(direction)] = Some(StreamClock::new(monotonic()));
                }
                DeviceMsg::Stop { direction } => self.clocks[dir_index(direction)] = None,
                DeviceMsg::Release { direction } => {
                    self.clocks[dir_index(direction)] = None;
                    self.complete_all(direction, mem, vrings);
                }
                _ => {}
            }
        }
        self.complete(vrings, CONTROL_QUEUE, head, len);
    }

    fn hold_event_buffer(
        &mut self,
        mem: &GuestMemoryMmap,
        vrings: &[VringRwLock],
        head: u16,
        c: Chain,
    ) {
        if c.writable.len() < EVENT_SIZE as u64 {
            return self.complete(vrings, EVENT_QUEUE, head, 0);
        }
        // A driver never has more buffers outstanding than the queue has
        // entries; one that publishes the same head again and again would
        // otherwise grow this list without bound. Past that, the buffer goes
        // straight back, empty.
        let limit = vrings
            .get(usize::from(EVENT_QUEUE))
            .map_or(MAX_QUEUE_SIZE, |v| {
                usize::from(v.get_ref().get_queue().size())
            });
        if self.event_buffers.len() >= limit {
            debug!("event: {limit} buffers already held; returning chain {head} unused");
            return self.complete(vrings, EVENT_QUEUE, head, 0);
        }
        // Held until there is something to report; never spun on.
        self.event_buffers.push_back((head, c.writable));
        self.flush_events(mem, vrings);
    }

    fn queue_event(&mut self, ev: [u8; EVENT_SIZE]) {
        if self.event_backlog.len() >= MAX_EVENT_BACKLOG {
            self.event_backlog.pop_front();
        }
        self.event_backlog.push_back(ev);
    }

    fn flush_events(&mut self, mem: &GuestMemoryMmap, vrings: &[VringRwLock]) {
        while !self.event_backlog.is_empty() {
            let Some((head, sg)) = self.event_buffers.pop_front() else {
                break;
            };
            let Some(ev) = self.event_backlog.pop_front() else {
                break;
            };
            let len = if sg.write_at(mem, 0, &ev).is_ok() {
                EVENT_SIZE as u32
            } else {
                0
            };
            self.complete(vrings, EVENT_QUEUE, head, len);
        }
    }

    /// Complete a transfer at once with only a status (no data).
    fn refuse(
        &mut self,
        mem: &GuestMemoryMmap,
        vrings: &[VringRwLock],
        q: u16,
        head: u16,
        w: &Sg,
        st: Status,
    ) {
        let len = write_status(mem, w, st, 0).map_or(0, |()| PCM_STATUS_SIZE as u32);
        self.complete(vrings, q, head, len);
    }

    /// Read and check the transfer header: the stream must exist, have this
    /// queue's direction, and accept transfers.
    fn xfer_check(&self, mem: &GuestMemoryMmap, c: &Chain, want: Direction) -> Result<(), Status> {
        let mut hdr = [0u8; PCM_XFER_SIZE];
        if c.readable.read_at(mem, 0, &mut hdr).is_err() {
            return Err(Status::BadMsg);
        }
        match stream_direction(u32::from_le_bytes(hdr)) {
            Some(d) if d == want && self.model.stream(d).accepts_transfers() => Ok(()),
            _ => Err(Status::BadMsg),
        }
    }

    fn tx(&mut self, mem: &GuestMemoryMmap, vrings: &[VringRwLock], head: u16, c: Chain) {
        if c.writable.len() < PCM_STATUS_SIZE as u64 {
            debug!("tx: chain {head} has no room for a status");
            return self.complete(vrings, TX_QUEUE, head, 0);
        }
        if let Err(st) = self.xfer_check(mem, &c, Direction::Output) {
            return self.refuse(mem, vrings, TX_QUEUE, head, &c.writable, st);
        }
        let payload = c.readable.len().saturating_sub(PCM_XFER_SIZE as u64);
        if payload > u64::from(MAX_BUFFER_BYTES) {
            return self.refuse(mem, vrings, TX_QUEUE, head, &c.writable, Status::BadMsg);
        }
        if self.tx_pending.len() >= MAX_PENDING_TX
            || self.tx_queued_bytes.saturating_add(payload) > MAX_DEVICE_QUEUED_PLAYBACK
        {
            warn!("tx: too much playback queued; refusing a buffer");
            return self.refuse(mem, vrings, TX_QUEUE, head, &c.writable, Status::IoErr);
        }
        if self.tx_pending.is_empty() {
            self.restart_if_starved(Direction::Output);
        }
        self.tx_queued_bytes = self.tx_queued_bytes.saturating_add(payload);
        self.tx_pending.push_back(PendingTx {
            head,
            bytes: payload,
            readable: c.readable,
            writable: c.writable,
        });
    }

    /// A running stream whose queue ran dry has underrun: the time that
    /// passed with nothing queued is gone. Its clock restarts, so that the
    /// new buffer is paced from now instead of returned at once.
    fn restart_if_starved(&mut self, d: Direction) {
        let Some(params) = self.model.stream(d).params().copied() else {
            return;
        };
        let now = monotonic();
        if let Some(clock) = self.clocks[dir_index(d)].as_mut() {
            if clock.due(now, &params) > 0 {
                debug!("{d}: underrun; the stream clock restarts");
                *clock = StreamClock::new(now);
            }
        }
    }

    fn rx(&mut self, mem: &GuestMemoryMmap, vrings: &[VringRwLock], head: u16, c: Chain) {
        if c.writable.len() < PCM_STATUS_SIZE as u64 {
            debug!("rx: chain {head} has no room for a status");
            return self.complete(vrings, RX_QUEUE, head, 0);
        }
        if let Err(st) = self.xfer_check(mem, &c, Direction::Input) {
            return self.refuse(mem, vrings, RX_QUEUE, head, &c.writable, st);
        }
        let len = c.writable.len() - PCM_STATUS_SIZE as u64;
        if len > u64::from(MAX_BUFFER_BYTES) {
            return self.refuse(mem, vrings, RX_QUEUE, head, &c.writable, Status::BadMsg);
        }
        if self.rx_pending.len() >= MAX_PENDING_CAPTURE {
            warn!("rx: {MAX_PENDING_CAPTURE} buffers already pending; refusing a buffer");
            return self.refuse(mem, vrings, RX_QUEUE, head, &c.writable, Status::IoErr);
        }
        if self.rx_pending.iter().all(|p| p.asked) {
            self.restart_if_starved(Direction::Input);
        }
        let buffer = self.next_id();
        self.rx_pending.push_back(PendingRx {
            buffer,
            head,
            len: len as u32,
            written: 0,
            writable: c.writable,
            asked: false,
        });
    }

    /// RELEASE, or a queue that stopped: every pending buffer of the stream
    /// goes back to the guest now, as the spec requires.
    fn complete_all(&mut self, d: Direction, mem: &GuestMemoryMmap, vrings: &[VringRwLock]) {
        match d {
            Direction::Output => {
                self.tx_queued_bytes = 0;
                while let Some(p) = self.tx_pending.pop_front() {
                    self.finish_tx(p, Status::Ok, 0, mem, vrings);
                }
            }
            Direction::Input => {
                while let Some(p) = self.rx_pending.pop_front() {
                    self.finish_rx(p, mem, vrings);
                }
            }
        }
    }

    fn finish_tx(
        &mut self,
        p: PendingTx,
        st: Status,
        latency: u32,
        mem: &GuestMemoryMmap,
        vrings: &[VringRwLock],
    ) {
        let len =
            write_status(mem, &p.writable, st, latency).map_or(0, |()| PCM_STATUS_SIZE as u32);
        self.complete(vrings, TX_QUEUE, p.head, len);
    }

    fn finish_rx(&mut self, p: PendingRx, mem: &GuestMemoryMmap, vrings: &[VringRwLock]) {
        let len = write_status(mem, &p.writable, Status::Ok, 0)
            .map_or(0, |()| p.written.saturating_add(PCM_STATUS_SIZE as u32));
        self.complete(vrings, RX_QUEUE, p.head, len);
    }

    /// Return the playback buffers and fill, or ask the broker for, the
    /// capture buffers that the streams' clocks have made due by now.
    fn pace(&mut self, vrings: &[VringRwLock]) {
        let Some(atomic) = self.mem.clone() else {
            return;
        };
        let mem = atomic.memory();
        let now = monotonic();
        self.pace_output(&mem, vrings, now);
        self.pace_input(&mem, vrings, now);
    }

    fn pace_output(&mut self, mem: &GuestMemoryMmap, vrings: &[VringRwLock], now: Duration) {
        let Some(params) = self.model.stream(Direction::Output).params().copied() else {
            return;
        };
        let Some(mut clock) = self.clocks[0] else {
            return;
        };
        while let Some(front) = self.tx_pending.front() {
            if !self.pacing.unpaced && clock.due(now, &params) < front.bytes {
                break;
            }
            let Some(p) = self.tx_pending.pop_front() else {
                break;
            };
            clock.done = clock.done.saturating_add(p.bytes);
            self.tx_queued_bytes = self.tx_queued_bytes.saturating_sub(p.bytes);
            // The bytes are read now, when the guest's clock consumes them.
            let at = self.played.len();
            self.played
                .resize(at.saturating_add(usize::try_from(p.bytes).unwrap_or(0)), 0);
            let read = match self.played.get_mut(at..) {
                Some(dst) => p.readable.read_at(mem, PCM_XFER_SIZE as u64, dst).is_ok(),
                None => false,
            };
            let st = if read {
                Status::Ok
            } else {
                self.played.truncate(at);
                Status::BadMsg
            };
            let latency = u32::try_from(self.tx_queued_bytes).unwrap_or(u32::MAX);
            self.finish_tx(p, st, latency, mem, vrings);
        }
        self.clocks[0] = Some(clock);
        let batch = if self.pacing.playback_batch_ms == 0 {
            0
        } else {
            let bytes = params.bytes_per_second() * u64::from(self.pacing.playback_batch_ms) / 1000;
            usize::try_from(bytes)
                .unwrap_or(usize::MAX)
                .min(MAX_PCM_CHUNK)
        };
        if self.played.len() >= batch || self.tx_pending.is_empty() {
            self.flush_played();
        }
    }

    fn pace_input(&mut self, mem: &GuestMemoryMmap, vrings: &[VringRwLock], now: Duration) {
        let Some(params) = self.model.stream(Direction::Input).params().copied() else {
            return;
        };
        let Some(mut clock) = self.clocks[1] else {
            return;
        };
        // Without a host source, or while input is off, the answer would be
        // silence: the device writes it itself. Buffers the broker was
        // asked for come first (answers arrive in order), so a buffer
        // behind one of them is asked for too, to stay in order.
        let silent = !self.pacing.host_capture || !self.gate.input;
        let mut i = 0;
        while let Some(p) = self.rx_pending.get(i) {
            if p.asked {
                i += 1;
                continue;
            }
            if !self.pacing.unpaced && clock.due(now, &params) < u64::from(p.len) {
                break;
            }
            clock.done = clock.done.saturating_add(u64::from(p.len));
            if silent && i == 0 {
                let Some(mut p) = self.rx_pending.pop_front() else {
                    break;
                };
                let mut data = std::mem::take(&mut self.scratch);
                data.clear();
                data.resize(p.len as usize, 0);
                params.format.fill_silence(&mut data);
                if p.writable.write_at(mem, 0, &data).is_ok() {
                    p.written = p.len;
                }
                self.scratch = data;
                self.finish_rx(p, mem, vrings);
            } else {
                let (buffer, len) = (p.buffer, p.len);
                if let Some(p) = self.rx_pending.get_mut(i) {
                    p.asked = true;
                }
                self.send(&DeviceMsg::Capture { buffer, len });
                i += 1;
            }
        }
        self.clocks[1] = Some(clock);
    }

    /// Send the consumed playback to the broker.
    fn flush_played(&mut self) {
        for chunk in self.played.chunks(MAX_PCM_CHUNK) {
            self.send(&DeviceMsg::Playback {
                data: chunk.to_vec(),
            });
        }
        self.played.clear();
    }

    /// When the front playback buffer comes due, if the stream runs.
    fn tx_deadline(&self) -> Option<Duration> {
        if self.pacing.unpaced {
            return None;
        }
        let clock = self.clocks[0]?;
        let params = self.model.stream(Direction::Output).params()?;
        let front = self.tx_pending.front()?;
        Some(clock.when(front.bytes, params))
    }

    /// When the first capture buffer not yet asked for comes due, if the
    /// stream runs.
    fn rx_deadline(&self) -> Option<Duration> {
        if self.pacing.unpaced {
            return None;
        }
        let clock = self.clocks[1]?;
        let params = self.model.stream(Direction::Input).params()?;
        let first = self.rx_pending.iter().find(|p| !p.asked)?;
        Some(clock.when(u64::from(first.len), params))
    }

    /// Set the timer to the earliest deadline, or disarm it.
    fn arm_timer(&mut self) {
        let next = match (self.tx_deadline(), self.rx_deadline()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if next == self.armed && !self.timer_fired {
            return;
        }
        let set = match next {
            // A zero expiration would disarm the timer instead.
            Some(at) => self.timer.set(
                Expiration::OneShot(TimeSpec::from_duration(at.max(Duration::from_nanos(1)))),
                TimerSetTimeFlags::TFD_TIMER_ABSTIME,
            ),
            None => self.timer.unset(),
        };
        if let Err(e) = set {
            error!("cannot set the pacing timer: {e}");
        }
        self.armed = next;
        self.timer_fired = false;
    }

    /// Read what the broker sent and complete buffers accordingly.
    fn broker_event(&mut self, evset: EventSet, vrings: &[VringRwLock]) {
        let mem = self.mem.as_ref().map(|m| m.memory());
        for _ in 0..MAX_BROKER_BATCH {
            let msg = match self.broker.try_recv::<BrokerMsg>() {
                Ok(m) => m,
                Err(ChannelError::WouldBlock) => break,
                Err(ChannelError::Closed) => broker_gone("the broker closed the channel"),
                Err(e) => broker_gone(&format!("bad message from the broker: {e}")),
            };
            let Some(mem) = mem.as_deref() else {
                match msg {
                    // No guest yet (the device waits for its VM, or the VM
                    // has not set up memory): nothing to notify, but the
                    // jacks it will read must be the flags as they are now.
                    BrokerMsg::Gate(gate) => {
                        self.gate = gate;
                        self.model.set_gate(gate);
                    }
                    other => debug!("broker message before guest memory was set: {other:?}"),
                }
                continue;
            };
            self.broker_msg(msg, mem, vrings);
        }
        if evset.intersects(EventSet::HANG_UP | EventSet::ERROR) && !evset.contains(EventSet::IN) {
            broker_gone("the broker hung up");
        }
    }

    fn broker_msg(&mut self, msg: BrokerMsg, mem: &GuestMemoryMmap, vrings: &[VringRwLock]) {
        match msg {
            BrokerMsg::CaptureData { buffer, last, data } => {
                let Some(p) = self.rx_pending.iter_mut().find(|p| p.buffer == buffer) else {
                    return; // released meanwhile
                };
                let room = p.len.saturating_sub(p.written) as usize;
                let n = data.len().min(room);
                if let Some(bytes) = data.get(..n) {
                    if p.writable
                        .write_at(mem, u64::from(p.written), bytes)
                        .is_ok()
                    {
                        p.written = p.written.saturating_add(n as u32);
                    }
                }
                if last {
                    if let Some(pos) = self.rx_pending.iter().position(|p| p.buffer == buffer) {
                        if let Some(p) = self.rx_pending.remove(pos) {
                            self.finish_rx(p, mem, vrings);
                        }
                    }
                }
            }
            BrokerMsg::Gate(gate) => self.set_gate(gate, mem, vrings),
            BrokerMsg::Hello { .. } => warn!("ignoring a second hello from the broker"),
        }
    }

    fn set_gate(&mut self, gate: GateState, mem: &GuestMemoryMmap, vrings: &[VringRwLock]) {
        for (jack, dir) in JACKS.iter().enumerate() {
            if gate.get(*dir) != self.gate.get(*dir) {
                let code = if gate.get(*dir) {
                    EVT_JACK_CONNECTED
                } else {
                    EVT_JACK_DISCONNECTED
                };
                info!(
                    "{dir} jack {}",
                    if gate.get(*dir) {
                        "connected"
                    } else {
                        "disconnected"
                    }
                );
                self.queue_event(event(code, jack as u32));
            }
        }
        self.gate = gate;
        self.model.set_gate(gate);
        self.flush_events(mem, vrings);
    }

    /// A queue was stopped by the frontend (device reset, VM shutdown): its
    /// buffers are gone, and so is the stream it carried.
    fn queue_stopped(&mut self, q: u16) {
        // Its notifications may have been left off (EVENT_IDX) and cannot be
        // turned on while it is stopped: look at it at the next event once
        // it runs again, which turns them on.
        if let Some(k) = self.kicks_off.get_mut(usize::from(q)) {
            *k = true;
        }
        let dir = match q {
            TX_QUEUE => Direction::Output,
            RX_QUEUE => Direction::Input,
            EVENT_QUEUE => {
                self.event_buffers.clear();
                return;
            }
            _ => return,
        };
        match dir {
            Direction::Output => {
                self.flush_played();
                self.tx_pending.clear();
                self.tx_queued_bytes = 0;
            }
            Direction::Input => self.rx_pending.clear(),
        }
        self.clocks[dir_index(dir)] = None;
        // Walk the broker's copy of the stream along legal transitions to
        // Released, so both sides agree again.
        match self.model.reset_stream(dir) {
            PcmState::Running => {
                self.send(&DeviceMsg::Stop { direction: dir });
                self.send(&DeviceMsg::Release { direction: dir });
            }
            PcmState::Prepared | PcmState::Stopped => {
                self.send(&DeviceMsg::Release { direction: dir })
            }
            PcmState::Initial | PcmState::ParamsSet | PcmState::Released => {}
        }
    }
}

fn write_status(
    mem: &GuestMemoryMmap,
    writable: &Sg,
    st: Status,
    latency: u32,
) -> Result<(), crate::sg::ChainError> {
    let off = writable
        .len()
        .checked_sub(PCM_STATUS_SIZE as u64)
        .ok_or(crate::sg::ChainError::OutOfRange)?;
    writable.write_at(mem, off, &pcm_status(st, latency))
}

fn broker_gone(why: &str) -> ! {
    error!("{why}; the device stops");
    std::process::exit(1);
}

impl VhostUserBackendMut for SndBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let cfg = self.model.config();
        (0..size)
            .map(|i| {
                let at = u64::from(offset) + u64::from(i);
                usize::try_from(at)
                    .ok()
                    .and_then(|a| cfg.get(a))
                    .copied()
                    .unwrap_or(0)
            })
            .collect()
    }

    fn update_memory(&mut self, mem: Mem) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        Some((self.exit.0.try_clone().ok()?, self.exit.1.try_clone().ok()?))
    }

    fn stop_vring(&mut self, queue_index: u32) -> io::Result<()> {
        if let Ok(q) = u16::try_from(queue_index) {
            debug!("queue {q} stopped by the frontend");
            self.queue_stopped(q);
        }
        Ok(())
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        match device_event {
            CONTROL_QUEUE => {
                // Transfers the guest published before this request are
                // seen before it, kicks or not.
                self.drain_quiet(vrings);
                self.process_queue(CONTROL_QUEUE, vrings)
            }
            q @ (EVENT_QUEUE | TX_QUEUE | RX_QUEUE) => self.process_queue(q, vrings),
            BROKER_EVENT => {
                self.drain_quiet(vrings);
                self.broker_event(evset, vrings)
            }
            TIMER_EVENT => {
                self.timer_fired = true;
                // Both transfer queues, kicks off or not: what the guest
                // published is queued before the clocks take their due.
                self.process_queue(TX_QUEUE, vrings);
                self.process_queue(RX_QUEUE, vrings);
            }
            other => debug!("unexpected event {other}"),
        }
        self.pace(vrings);
        // Kicks back on where no deadline is left to look at the queue.
        self.rearm_kicks(vrings);
        self.signal_all(vrings);
        self.arm_timer();
        // Never an error: an error would end the worker thread.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::sync::mpsc;
    use std::time::Duration;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vsnd_ipc::SampleFormat;

    /// Entries per test queue.
    const QUEUE_SIZE: u16 = 16;
    /// One period of 48 kHz stereo S16 (or U16): 10 ms, 480 frames.
    const PERIOD: u32 = 1920;
    const PERIOD_TIME: Duration = Duration::from_millis(10);
    /// How long a test waits for something that is due long before (the
    /// machine may be loaded; this is no timing claim).
    const PATIENCE: Duration = Duration::from_secs(3);
    /// Where the guest's transfer buffers live (above the four queues).
    const DATA_START: u64 = 0x1000;
    /// virtio-snd wire codes used by the tests.
    const FMT_S16: u8 = 5;
    const FMT_U16: u8 = 6;
    const RATE_48000: u8 = 7;
    const VIRTQ_DESC_F_NEXT: u16 = 1;
    const VIRTQ_DESC_F_WRITE: u16 = 2;

    fn caps() -> vsnd_ipc::Capabilities {
        vsnd_ipc::Capabilities {
            formats: vec![SampleFormat::S16, SampleFormat::U16],
            rates: vec![48_000],
            channels_min: 1,
            channels_max: 2,
        }
    }

    /// A backend on 64 KiB of guest memory with its four queues (16
    /// entries) at 0x0, 0x400, 0x800, 0xc00 and EVENT_IDX negotiated; the
    /// broker end of the channel is returned so the device never sees it
    /// gone.
    fn backend() -> (SndBackend, Vec<VringRwLock>, GuestMemoryMmap, Channel) {
        let gate = gate(true, false);
        backend_with(SndModel::new(&caps(), gate), gate, paced())
    }

    /// [`backend`] with a given model, gate and pacing.
    fn backend_with(
        model: SndModel,
        gate: GateState,
        pacing: Pacing,
    ) -> (SndBackend, Vec<VringRwLock>, GuestMemoryMmap, Channel) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let (dev, broker) = vsnd_ipc::socketpair().unwrap();
        let mut b = SndBackend::new(model, gate, pacing, Channel::new(dev)).unwrap();
        b.set_event_idx(true);
        b.update_memory(atomic.clone()).unwrap();
        let vrings = (0..NUM_QUEUES as u64)
            .map(|q| {
                let v = VringRwLock::new(atomic.clone(), QUEUE_SIZE).unwrap();
                v.set_queue_size(QUEUE_SIZE);
                v.set_queue_info(q * 0x400, q * 0x400 + 0x100, q * 0x400 + 0x200)
                    .unwrap();
                v.set_queue_event_idx(true);
                v.set_queue_ready(true);
                v.set_enabled(true);
                v
            })
            .collect();
        (b, vrings, mem, Channel::new(broker))
    }

    fn le32s(fields: &[u32]) -> Vec<u8> {
        fields.iter().flat_map(|f| f.to_le_bytes()).collect()
    }

    /// A model whose `streams` (wire id, virtio format code) were set to
    /// 48 kHz stereo with 10 ms periods, prepared and started, as the guest
    /// would with control requests.
    fn running_model(gate: GateState, streams: &[(u32, u8)]) -> SndModel {
        let mut m = SndModel::new(&caps(), gate);
        for &(stream, format) in streams {
            let mut set_params = le32s(&[R_PCM_SET_PARAMS, stream, 4 * PERIOD, PERIOD, 0]);
            set_params.extend_from_slice(&[2, format, RATE_48000, 0]);
            for req in [
                set_params,
                le32s(&[R_PCM_PREPARE, stream]),
                le32s(&[R_PCM_START, stream]),
            ] {
                let o = m.handle(&req, 64);
                assert_eq!(
                    o.response,
                    (Status::Ok as u32).to_le_bytes(),
                    "setting up stream {stream}: request {:#x} was refused",
                    le32(&req, 0)
                );
            }
        }
        m
    }

    fn paced() -> Pacing {
        Pacing {
            unpaced: false,
            playback_batch_ms: 0,
            host_capture: true,
        }
    }

    fn gate(output: bool, input: bool) -> GateState {
        GateState { output, input }
    }

    /// One transfer the test guest made available.
    struct Xfer {
        head: u16,
        /// The PCM bytes (TX: read by the device; RX: written by it).
        data: GuestAddress,
        status: GuestAddress,
    }

    /// The guest side of the queues: writes descriptor chains and the
    /// available ring, reads the used ring, as a virtio driver would.
    struct Guest {
        mem: GuestMemoryMmap,
        next_desc: [u16; NUM_QUEUES],
        next_data: u64,
    }

    impl Guest {
        fn new(mem: &GuestMemoryMmap) -> Self {
            Guest {
                mem: mem.clone(),
                next_desc: [0; NUM_QUEUES],
                next_data: DATA_START,
            }
        }

        fn base(q: u16) -> u64 {
            u64::from(q) * 0x400
        }

        /// Guest memory for a buffer of `len` bytes, filled with `fill`.
        fn alloc(&mut self, len: u32, fill: u8) -> GuestAddress {
            let at = GuestAddress(self.next_data);
            self.next_data = (self.next_data + u64::from(len) + 15) & !15;
            assert!(self.next_data <= 0x1_0000, "test guest memory exhausted");
            self.mem.write_slice(&vec![fill; len as usize], at).unwrap();
            at
        }

        /// Chain `parts` (address, length, device-writable) and make the
        /// chain available on queue `q` (no kick: the test decides).
        fn publish(&mut self, q: u16, parts: &[(GuestAddress, u32, bool)]) -> u16 {
            let table = Self::base(q);
            let head = self.next_desc[usize::from(q)];
            for (i, &(addr, len, writable)) in parts.iter().enumerate() {
                let idx = head + i as u16;
                assert!(idx < QUEUE_SIZE, "test queue {q} out of descriptors");
                let d = table + u64::from(idx) * 16;
                let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
                if i + 1 < parts.len() {
                    flags |= VIRTQ_DESC_F_NEXT;
                }
                self.mem.write_obj(addr.0, GuestAddress(d)).unwrap();
                self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
                self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
                self.mem.write_obj(idx + 1, GuestAddress(d + 14)).unwrap();
            }
            self.next_desc[usize::from(q)] = head + parts.len() as u16;
            let avail = table + 0x100;
            let idx = self.avail_idx(q);
            let slot = avail + 4 + 2 * u64::from(idx % QUEUE_SIZE);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.mem
                .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
                .unwrap();
            head
        }

        /// A playback buffer as the Linux driver builds it: transfer
        /// header, PCM bytes, device-writable status.
        fn tx(&mut self, payload: &[u8]) -> Xfer {
            let hdr = self.alloc(PCM_XFER_SIZE as u32, 0);
            self.mem.write_obj(0u32, hdr).unwrap(); // stream 0: output
            let len = payload.len() as u32;
            let data = self.alloc(len, 0);
            self.mem.write_slice(payload, data).unwrap();
            let status = self.alloc(PCM_STATUS_SIZE as u32, 0xee);
            let head = self.publish(
                TX_QUEUE,
                &[
                    (hdr, PCM_XFER_SIZE as u32, false),
                    (data, len, false),
                    (status, PCM_STATUS_SIZE as u32, true),
                ],
            );
            Xfer { head, data, status }
        }

        /// A capture buffer of `len` bytes, pre-filled with a pattern no
        /// format uses as silence.
        fn rx(&mut self, len: u32) -> Xfer {
            let hdr = self.alloc(PCM_XFER_SIZE as u32, 0);
            self.mem.write_obj(1u32, hdr).unwrap(); // stream 1: input
            let data = self.alloc(len, 0x55);
            let status = self.alloc(PCM_STATUS_SIZE as u32, 0xee);
            let head = self.publish(
                RX_QUEUE,
                &[
                    (hdr, PCM_XFER_SIZE as u32, false),
                    (data, len, true),
                    (status, PCM_STATUS_SIZE as u32, true),
                ],
            );
            Xfer { head, data, status }
        }

        fn avail_idx(&self, q: u16) -> u16 {
            self.mem
                .read_obj(GuestAddress(Self::base(q) + 0x100 + 2))
                .unwrap()
        }

        /// How many buffers the device has returned on queue `q`.
        fn used_idx(&self, q: u16) -> u16 {
            self.mem
                .read_obj(GuestAddress(Self::base(q) + 0x200 + 2))
                .unwrap()
        }

        /// The `i`th used element of queue `q`: (head, written length).
        fn used(&self, q: u16, i: u16) -> (u32, u32) {
            let e = Self::base(q) + 0x200 + 4 + 8 * u64::from(i % QUEUE_SIZE);
            (
                self.mem.read_obj(GuestAddress(e)).unwrap(),
                self.mem.read_obj(GuestAddress(e + 4)).unwrap(),
            )
        }

        /// With EVENT_IDX, whether the driver would notify the device after
        /// making one more buffer available now: `vring_need_event(
        /// avail_event, idx + 1, idx)`, true exactly when the device's
        /// `avail_event` equals the current available index.
        fn would_kick(&self, q: u16) -> bool {
            let avail_event: u16 = self
                .mem
                .read_obj(GuestAddress(
                    Self::base(q) + 0x200 + 4 + 8 * u64::from(QUEUE_SIZE),
                ))
                .unwrap();
            avail_event == self.avail_idx(q)
        }

        /// The status code the device wrote into a transfer.
        fn status(&self, x: &Xfer) -> u32 {
            self.mem.read_obj(x.status).unwrap()
        }

        fn read(&self, at: GuestAddress, len: u32) -> Vec<u8> {
            let mut v = vec![0u8; len as usize];
            self.mem.read_slice(&mut v, at).unwrap();
            v
        }
    }

    /// Everything the device has sent the broker so far.
    /// The only capture buffer, `x`, came back whole: its used element
    /// counts all its PCM bytes and the status, and the status is OK.
    fn assert_rx_returned(g: &Guest, x: &Xfer, what: &str) {
        assert_eq!(
            g.used_idx(RX_QUEUE),
            1,
            "{what}: the capture buffer was not returned"
        );
        assert_eq!(
            g.used(RX_QUEUE, 0),
            (u32::from(x.head), PERIOD + PCM_STATUS_SIZE as u32),
            "{what}: used element (head, len): all PCM bytes and the status written"
        );
        assert_eq!(g.status(x), Status::Ok as u32, "{what}: status");
    }

    fn broker_msgs(broker: &mut Channel) -> Vec<DeviceMsg> {
        let mut v = Vec::new();
        loop {
            match broker.try_recv::<DeviceMsg>() {
                Ok(m) => v.push(m),
                Err(ChannelError::WouldBlock) => return v,
                Err(e) => panic!("the broker end could not read the device's message: {e}"),
            }
        }
    }

    /// The PCM bytes of the `Playback` messages among `msgs`, in order.
    fn played(msgs: &[DeviceMsg]) -> Vec<u8> {
        msgs.iter()
            .filter_map(|m| match m {
                DeviceMsg::Playback { data } => Some(data.clone()),
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// A distinct, recognisable payload for buffer `n`.
    fn payload(n: u8) -> Vec<u8> {
        (0..PERIOD)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(n.wrapping_mul(31)) | 1)
            .collect()
    }

    /// Deliver `event` to the device; returns the monotonic time just
    /// before and just after, between which the device read its clock.
    fn deliver(b: &mut SndBackend, vrings: &[VringRwLock], event: u16) -> (Duration, Duration) {
        let before = monotonic();
        b.handle_event(event, EventSet::IN, vrings, 0).unwrap();
        (before, monotonic())
    }

    /// The worker's loop reduced to the pacing timer: wait (at most
    /// [`PATIENCE`]) for the timer descriptor to become readable, as the
    /// worker's epoll would, then deliver TIMER_EVENT. `None` if the timer
    /// never fired.
    fn on_timer(b: &mut SndBackend, vrings: &[VringRwLock]) -> Option<(Duration, Duration)> {
        let give_up = monotonic() + PATIENCE;
        loop {
            let now = monotonic();
            if now >= give_up {
                return None;
            }
            let wait = PollTimeout::try_from(give_up - now).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(b.timer.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, wait) {
                Ok(n) if n > 0 => break,
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => panic!("poll on the pacing timer: {e}"),
            }
        }
        Some(deliver(b, vrings, TIMER_EVENT))
    }

    /// Periods of the stream elapsed at `t` on a clock started at `anchor`.
    fn periods(anchor: Duration, t: Duration) -> u16 {
        (t.saturating_sub(anchor).as_nanos() / PERIOD_TIME.as_nanos()).min(u128::from(u16::MAX))
            as u16
    }

    /// `done` of `total` one-period buffers were handled by an event the
    /// device served between `before` and `after`: no buffer before its
    /// period has passed on the stream clock, and every buffer whose period
    /// had passed when the event came.
    fn assert_paced(
        what: &str,
        done: u16,
        total: u16,
        anchor: Duration,
        (before, after): (Duration, Duration),
    ) {
        let most = periods(anchor, after).min(total);
        let least = periods(anchor, before).min(total);
        assert!(
            done <= most,
            "{what}: {done} buffer(s) done {:?} after the stream clock started; \
             expected at most {most} (one per {PERIOD_TIME:?})",
            after.saturating_sub(anchor)
        );
        assert!(
            done >= least,
            "{what}: only {done} buffer(s) done {:?} after the stream clock started; \
             expected at least {least} (one per {PERIOD_TIME:?})",
            before.saturating_sub(anchor)
        );
    }

    /// Found by the `transfer` fuzz target: an available index more than a
    /// queue's size ahead (the guest published 17 buffers on a 16-entry
    /// queue) cannot be popped, yet re-enabling notifications reports
    /// buffers waiting; the worker spun on it forever.
    #[test]
    fn an_impossible_available_index_does_not_hang_the_worker() {
        let (mut b, vrings, mem, _broker) = backend();
        mem.write_obj(17u16, GuestAddress(0x100 + 2)).unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            b.handle_event(CONTROL_QUEUE, EventSet::IN, &vrings, 0)
                .unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the control queue kick did not return within 10 s (the worker spins)"
        );
    }

    /// A 10 ms playback buffer goes back to the guest when its 10 ms have
    /// passed on the stream clock, not on its kick; then its bytes reach the
    /// broker.
    #[test]
    fn a_playback_buffer_returns_after_its_length_and_its_bytes_reach_the_broker() {
        let (mut b, vrings, mem, mut broker) = backend_with(
            running_model(gate(true, false), &[(0, FMT_S16)]),
            gate(true, false),
            paced(),
        );
        let mut g = Guest::new(&mem);
        let data = payload(1);
        let x = g.tx(&data);
        let kick = deliver(&mut b, &vrings, TX_QUEUE);
        let anchor = b.clocks[0]
            .expect("the running output stream has no clock")
            .anchor;
        assert_paced("on the kick", g.used_idx(TX_QUEUE), 1, anchor, kick);
        if g.used_idx(TX_QUEUE) == 0 {
            assert_eq!(
                broker_msgs(&mut broker),
                vec![],
                "the broker got messages before the buffer was played"
            );
        }
        assert_eq!(
            b.armed,
            Some(anchor + PERIOD_TIME),
            "the pacing timer should be set to one period after the clock's start"
        );

        let fired = on_timer(&mut b, &vrings).expect("the pacing timer did not fire within 3 s");
        assert!(
            fired.0 >= anchor + PERIOD_TIME,
            "the timer fired {:?} after the clock started, before the buffer's {PERIOD_TIME:?}",
            fired.0.saturating_sub(anchor)
        );
        assert_eq!(
            g.used_idx(TX_QUEUE),
            1,
            "the buffer was not returned on the timer wake-up {:?} after the clock started",
            fired.0.saturating_sub(anchor)
        );
        assert_eq!(
            g.used(TX_QUEUE, 0),
            (u32::from(x.head), PCM_STATUS_SIZE as u32),
            "used element (head, len) of the returned buffer"
        );
        assert_eq!(
            g.status(&x),
            Status::Ok as u32,
            "status of the returned buffer"
        );
        let msgs = broker_msgs(&mut broker);
        assert!(
            msgs.iter().all(|m| matches!(m, DeviceMsg::Playback { .. })),
            "the broker got something other than playback: {msgs:?}"
        );
        assert!(
            played(&msgs) == data,
            "the broker got {} playback bytes, expected the buffer's {} bytes",
            played(&msgs).len(),
            data.len()
        );
    }

    /// Several playback buffers published at once go back one per period,
    /// in order, and their bytes reach the broker in order.
    #[test]
    fn playback_buffers_return_one_per_period_in_order() {
        let (mut b, vrings, mem, mut broker) = backend_with(
            running_model(gate(true, false), &[(0, FMT_S16)]),
            gate(true, false),
            paced(),
        );
        let mut g = Guest::new(&mem);
        let payloads: Vec<Vec<u8>> = (1..=3).map(payload).collect();
        let xs: Vec<Xfer> = payloads.iter().map(|p| g.tx(p)).collect();
        let kick = deliver(&mut b, &vrings, TX_QUEUE);
        let anchor = b.clocks[0]
            .expect("the running output stream has no clock")
            .anchor;
        assert_paced("on the kick", g.used_idx(TX_QUEUE), 3, anchor, kick);

        // An early wake-up (the worker may wake for other reasons) returns
        // nothing that is not due.
        let early = deliver(&mut b, &vrings, TIMER_EVENT);
        assert_paced("early wake-up", g.used_idx(TX_QUEUE), 3, anchor, early);

        let mut sent = played(&broker_msgs(&mut broker));
        let mut wakeups = 0;
        while g.used_idx(TX_QUEUE) < 3 {
            let at = on_timer(&mut b, &vrings).unwrap_or_else(|| {
                panic!(
                    "the pacing timer did not fire within 3 s with {} of 3 buffers returned",
                    g.used_idx(TX_QUEUE)
                )
            });
            wakeups += 1;
            let done = g.used_idx(TX_QUEUE);
            assert_paced(&format!("timer wake-up {wakeups}"), done, 3, anchor, at);
            // Unbatched: what was returned has been sent, nothing more.
            sent.extend(played(&broker_msgs(&mut broker)));
            assert!(
                sent == payloads[..usize::from(done)].concat(),
                "after {done} buffer(s) returned the broker got {} playback bytes that are \
                 not those buffers' bytes in order",
                sent.len()
            );
            assert!(wakeups < 100, "100 timer wake-ups for 3 buffers");
        }
        for (i, x) in xs.iter().enumerate() {
            assert_eq!(
                g.used(TX_QUEUE, i as u16).0,
                u32::from(x.head),
                "used element {i} is not the {i}th buffer published"
            );
            assert_eq!(g.status(x), Status::Ok as u32, "status of buffer {i}");
        }
    }

    /// Capture while input is off, or with no host source: the device
    /// fills the buffer with the stream format's silence when it is due,
    /// and bothers the broker with nothing.
    #[test]
    fn capture_without_a_source_is_silence_when_due_and_not_asked_of_the_broker() {
        for (input, host_capture) in [(false, true), (true, false)] {
            let what = format!("input {input}, host_capture {host_capture}");
            let gate = gate(true, input);
            let pacing = Pacing {
                host_capture,
                ..paced()
            };
            // U16: silence is 0x8000, so it cannot be mistaken for memory
            // left alone (the buffer is pre-filled with 0x55).
            let (mut b, vrings, mem, mut broker) =
                backend_with(running_model(gate, &[(1, FMT_U16)]), gate, pacing);
            let mut g = Guest::new(&mem);
            let x = g.rx(PERIOD);
            let kick = deliver(&mut b, &vrings, RX_QUEUE);
            let anchor = b.clocks[1]
                .expect("the running input stream has no clock")
                .anchor;
            assert_paced(
                &format!("{what}: on the kick"),
                g.used_idx(RX_QUEUE),
                1,
                anchor,
                kick,
            );
            let fired = on_timer(&mut b, &vrings)
                .unwrap_or_else(|| panic!("{what}: the pacing timer did not fire within 3 s"));
            assert_paced(
                &format!("{what}: timer"),
                g.used_idx(RX_QUEUE),
                1,
                anchor,
                fired,
            );
            assert_rx_returned(&g, &x, &what);
            let got = g.read(x.data, PERIOD);
            let mut silence = vec![0u8; PERIOD as usize];
            SampleFormat::U16.fill_silence(&mut silence);
            assert!(
                got == silence,
                "{what}: the capture buffer does not hold U16 silence (00 80 …); it starts {:02x?}",
                &got[..8]
            );
            assert_eq!(
                broker_msgs(&mut broker),
                vec![],
                "{what}: the device asked the broker although the answer is silence"
            );
        }
    }

    /// Capture while input is on and the backend has a source: the device
    /// asks the broker when the buffer is due, and the guest gets the
    /// buffer back only with the broker's bytes.
    #[test]
    fn capture_with_input_on_asks_the_broker_when_due_and_returns_its_bytes() {
        let gate = gate(true, true);
        let (mut b, vrings, mem, mut broker) =
            backend_with(running_model(gate, &[(1, FMT_S16)]), gate, paced());
        let mut g = Guest::new(&mem);
        let x = g.rx(PERIOD);
        let kick = deliver(&mut b, &vrings, RX_QUEUE);
        let anchor = b.clocks[1]
            .expect("the running input stream has no clock")
            .anchor;
        let asked = |msgs: &[DeviceMsg]| {
            msgs.iter()
                .filter_map(|m| match m {
                    DeviceMsg::Capture { buffer, len } => Some((*buffer, *len)),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let mut requests = asked(&broker_msgs(&mut broker));
        assert_paced(
            "capture requests on the kick",
            requests.len() as u16,
            1,
            anchor,
            kick,
        );
        if requests.is_empty() {
            let fired =
                on_timer(&mut b, &vrings).expect("the pacing timer did not fire within 3 s");
            requests = asked(&broker_msgs(&mut broker));
            assert_paced(
                "capture requests on the timer",
                requests.len() as u16,
                1,
                anchor,
                fired,
            );
        }
        assert_eq!(
            requests.len(),
            1,
            "one capture request for one buffer: {requests:?}"
        );
        let (buffer, len) = requests[0];
        assert_eq!(len, PERIOD, "the capture request's length");
        assert_eq!(
            g.used_idx(RX_QUEUE),
            0,
            "returned before the broker answered"
        );

        // Time passing does not return it either: it waits for the broker.
        std::thread::sleep(2 * PERIOD_TIME);
        deliver(&mut b, &vrings, TIMER_EVENT);
        assert_eq!(
            g.used_idx(RX_QUEUE),
            0,
            "returned on a timer wake-up before the broker answered"
        );
        assert_eq!(broker_msgs(&mut broker), vec![], "asked the broker twice");

        let data: Vec<u8> = (0..PERIOD).map(|i| (i % 251) as u8 ^ 0xa5).collect();
        let (first, rest) = data.split_at(1000);
        broker
            .send(&BrokerMsg::CaptureData {
                buffer,
                last: false,
                data: first.to_vec(),
            })
            .unwrap();
        deliver(&mut b, &vrings, BROKER_EVENT);
        assert_eq!(
            g.used_idx(RX_QUEUE),
            0,
            "returned before the broker's last chunk"
        );
        broker
            .send(&BrokerMsg::CaptureData {
                buffer,
                last: true,
                data: rest.to_vec(),
            })
            .unwrap();
        deliver(&mut b, &vrings, BROKER_EVENT);
        assert_rx_returned(&g, &x, "after the broker's last chunk");
        assert!(
            g.read(x.data, PERIOD) == data,
            "the capture buffer does not hold the broker's bytes"
        );
    }

    /// Unpaced (benchmarks only): a playback buffer goes back on its kick.
    #[test]
    fn unpaced_playback_returns_on_the_kick() {
        let pacing = Pacing {
            unpaced: true,
            ..paced()
        };
        let (mut b, vrings, mem, mut broker) = backend_with(
            running_model(gate(true, false), &[(0, FMT_S16)]),
            gate(true, false),
            pacing,
        );
        let mut g = Guest::new(&mem);
        let data = payload(9);
        let x = g.tx(&data);
        deliver(&mut b, &vrings, TX_QUEUE);
        assert_eq!(
            g.used_idx(TX_QUEUE),
            1,
            "not returned on its kick while unpaced"
        );
        assert_eq!(
            g.used(TX_QUEUE, 0),
            (u32::from(x.head), PCM_STATUS_SIZE as u32)
        );
        assert_eq!(g.status(&x), Status::Ok as u32, "status");
        assert!(
            played(&broker_msgs(&mut broker)) == data,
            "the broker did not get the buffer's bytes on the kick"
        );
        assert!(
            g.would_kick(TX_QUEUE),
            "unpaced, the queue's kicks should stay on"
        );
    }

    /// While the running stream has a buffer pending the guest is told not
    /// to kick (EVENT_IDX: avail_event is left behind), a buffer it then
    /// publishes without a kick is still taken and returned in turn, and
    /// once the queue is empty kicks are on again.
    #[test]
    fn playback_kicks_are_off_while_a_buffer_is_pending_and_on_when_the_queue_is_empty() {
        let (mut b, vrings, mem, _broker) = backend_with(
            running_model(gate(true, false), &[(0, FMT_S16)]),
            gate(true, false),
            paced(),
        );
        let mut g = Guest::new(&mem);
        assert!(g.would_kick(TX_QUEUE), "a fresh queue should want kicks");
        let first = g.tx(&payload(1));
        let kick = deliver(&mut b, &vrings, TX_QUEUE);
        let anchor = b.clocks[0]
            .expect("the running output stream has no clock")
            .anchor;
        let pending = g.used_idx(TX_QUEUE) == 0;
        if pending {
            assert!(
                !g.would_kick(TX_QUEUE),
                "with a buffer pending the guest is still asked to kick"
            );
            assert!(b.kicks_off[usize::from(TX_QUEUE)], "kicks_off not set");
        } else {
            // The kick itself took a period (a loaded machine).
            assert_paced("on the kick", 1, 1, anchor, kick);
        }

        // Published while kicks are off: no kick.
        let second = g.tx(&payload(2));
        if !pending {
            deliver(&mut b, &vrings, TX_QUEUE);
        }
        let mut wakeups = 0;
        while g.used_idx(TX_QUEUE) < 2 {
            let at = on_timer(&mut b, &vrings).unwrap_or_else(|| {
                panic!(
                    "the pacing timer did not fire within 3 s with {} of 2 buffers returned \
                     (a buffer published without a kick was not taken?)",
                    g.used_idx(TX_QUEUE)
                )
            });
            wakeups += 1;
            let done = g.used_idx(TX_QUEUE);
            assert_paced(&format!("timer wake-up {wakeups}"), done, 2, anchor, at);
            if done < 2 {
                assert!(
                    !g.would_kick(TX_QUEUE),
                    "with {} buffer(s) pending the guest is asked to kick",
                    2 - done
                );
            }
            assert!(wakeups < 100, "100 timer wake-ups for 2 buffers");
        }
        assert_eq!(g.used(TX_QUEUE, 0).0, u32::from(first.head), "first used");
        assert_eq!(g.used(TX_QUEUE, 1).0, u32::from(second.head), "second used");
        if pending {
            // The timer wake-up took the unkicked buffer before returning
            // the first: the first's status reports it queued behind.
            let latency: u32 = mem.read_obj(first.status.unchecked_add(4)).unwrap();
            assert_eq!(
                latency, PERIOD,
                "latency_bytes of the first buffer: the second ({PERIOD} bytes, published \
                 without a kick) should have been queued when the first was returned"
            );
        }
        assert!(
            g.would_kick(TX_QUEUE),
            "with the queue empty the guest is not asked to kick again (avail_event left behind)"
        );
        assert!(!b.kicks_off[usize::from(TX_QUEUE)], "kicks_off still set");
        assert_eq!(b.armed, None, "the timer stays armed with nothing pending");
    }

    /// Found in review: a transfer queue stopped by the frontend while its
    /// kicks were off (EVENT_IDX told the guest not to kick) and started
    /// again without a device reset (a VM paused and resumed) was never
    /// looked at again: no kick, no deadline, nothing to drain it.
    #[test]
    fn a_queue_stopped_with_kicks_off_is_looked_at_again_once_it_runs() {
        let (mut b, vrings, mem, _broker) = backend_with(
            running_model(gate(true, false), &[(0, FMT_S16)]),
            gate(true, false),
            paced(),
        );
        let mut g = Guest::new(&mem);
        for n in 1..=3 {
            g.tx(&payload(n));
        }
        deliver(&mut b, &vrings, TX_QUEUE);
        let tx = &vrings[usize::from(TX_QUEUE)];
        // GET_VRING_BASE, then the ring set up and started again.
        tx.set_queue_ready(false);
        b.stop_vring(u32::from(TX_QUEUE)).unwrap();
        tx.set_queue_ready(true);
        let returned = g.used_idx(TX_QUEUE);
        // The guest publishes as it was last told, without a kick, and then
        // talks to the device on its control queue.
        let x = g.tx(&payload(4));
        deliver(&mut b, &vrings, CONTROL_QUEUE);
        assert_eq!(
            g.used_idx(TX_QUEUE),
            returned.wrapping_add(1),
            "the buffer published after the restart was not taken"
        );
        let last = g.used_idx(TX_QUEUE).wrapping_sub(1);
        assert_eq!(g.used(TX_QUEUE, last).0, u32::from(x.head));
        // Its stream was released with the stopped queue: refused, not lost.
        assert_eq!(g.status(&x), Status::BadMsg as u32);
        assert!(
            g.would_kick(TX_QUEUE),
            "after the restart the guest is still told not to kick"
        );
    }
}
