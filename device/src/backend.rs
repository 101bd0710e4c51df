//! The vhost-user backend: moves guest buffers between the virtqueues and
//! the broker. One worker thread handles all four queues and the broker
//! channel, so there is no locking between them.

use std::collections::VecDeque;
use std::io;

use log::{debug, error, info, warn};
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
    BrokerMsg, Channel, ChannelError, DeviceMsg, Direction, GateState, MAX_BUFFER_BYTES,
    MAX_PCM_CHUNK, MAX_PENDING_CAPTURE, MAX_QUEUED_PLAYBACK_BYTES,
};

use crate::control::{stream_direction, SndModel, JACKS};
use crate::sg::{split_chain, Chain, Sg};
use crate::virtio_snd::*;
use vsnd_ipc::lifecycle::PcmState;

/// Event id of the broker channel on the worker's epoll (ids up to
/// NUM_QUEUES are reserved by vhost-user-backend).
pub const BROKER_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Largest virtqueue the device accepts.
const MAX_QUEUE_SIZE: usize = 256;

/// Control requests are at most 24 bytes; read no more than this.
const MAX_CONTROL_REQUEST: usize = 64;

/// Jack events waiting for an event buffer from the guest.
const MAX_EVENT_BACKLOG: usize = 64;

/// Broker messages handled per wakeup before the queues get a turn.
const MAX_BROKER_BATCH: usize = 256;

/// Playback bytes the device lets queue at the broker; past this the guest
/// gets IO_ERR (the broker's own, larger, limit is never reached).
const MAX_DEVICE_QUEUED_PLAYBACK: u64 = (MAX_QUEUED_PLAYBACK_BYTES / 2) as u64;

/// Pending transfers per queue; a guest that re-publishes heads it has not
/// got back cannot grow the lists past this.
const MAX_PENDING_TX: usize = 1024;

/// With EVENT_IDX, a transfer queue whose stream has at least this many
/// buffers waiting at the broker is not kicked: the broker will wake the
/// device when the first of them is done, while the others (two periods or
/// more) still play, and the device drains the queue then. Saves one
/// wake-up of the device per period; with fewer buffers queued the guest
/// kicks as usual, so the broker's cushion never shrinks below two buffers
/// because of it.
const DEFER_KICKS_AT: usize = 3;

type Mem = GuestMemoryAtomic<GuestMemoryMmap>;

struct PendingTx {
    buffer: u64,
    head: u16,
    bytes: u64,
    writable: Sg,
}

struct PendingRx {
    buffer: u64,
    head: u16,
    len: u32,
    written: u32,
    writable: Sg,
}

/// The virtio-snd device.
pub struct SndBackend {
    mem: Option<Mem>,
    event_idx: bool,
    model: SndModel,
    gate: GateState,
    broker: Channel,
    next_buffer: u64,
    tx_pending: VecDeque<PendingTx>,
    tx_queued_bytes: u64,
    rx_pending: VecDeque<PendingRx>,
    event_buffers: VecDeque<(u16, Sg)>,
    event_backlog: VecDeque<[u8; EVENT_SIZE]>,
    to_signal: [bool; NUM_QUEUES],
    /// Queues whose kicks are deferred (see [`DEFER_KICKS_AT`]).
    kicks_deferred: [bool; NUM_QUEUES],
    scratch: Vec<u8>,
    exit: (EventConsumer, EventNotifier),
}

impl SndBackend {
    /// A device answering the guest from `model`, talking to the broker on
    /// `broker` (hello already exchanged).
    pub fn new(model: SndModel, gate: GateState, broker: Channel) -> io::Result<Self> {
        Ok(SndBackend {
            mem: None,
            event_idx: false,
            model,
            gate,
            broker,
            next_buffer: 0,
            tx_pending: VecDeque::new(),
            tx_queued_bytes: 0,
            rx_pending: VecDeque::new(),
            event_buffers: VecDeque::new(),
            event_backlog: VecDeque::new(),
            to_signal: [false; NUM_QUEUES],
            kicks_deferred: [false; NUM_QUEUES],
            scratch: Vec::new(),
            exit: new_event_consumer_and_notifier(EventFlag::NONBLOCK)?,
        })
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
            let defer = self.can_defer_kicks(q);
            if let Some(d) = self.kicks_deferred.get_mut(usize::from(q)) {
                *d = defer;
            }
            if defer {
                // Not re-enabled: the guest stops kicking this queue until
                // the device drains it at the broker's next message.
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

    /// Whether queue `q` can do without kicks for now (see
    /// [`DEFER_KICKS_AT`]).
    fn can_defer_kicks(&self, q: u16) -> bool {
        match q {
            TX_QUEUE => self.tx_pending.len() >= DEFER_KICKS_AT,
            RX_QUEUE => self.rx_pending.len() >= DEFER_KICKS_AT,
            _ => false,
        }
    }

    /// Queues whose kicks are deferred but that no longer have enough
    /// buffers at the broker: kicks on again (and what came meanwhile is
    /// taken).
    fn rearm_kicks(&mut self, vrings: &[VringRwLock]) {
        for q in [TX_QUEUE, RX_QUEUE] {
            if self.kicks_deferred.get(usize::from(q)) == Some(&true) && !self.can_defer_kicks(q) {
                self.process_queue(q, vrings);
            }
        }
    }

    /// Drain the queues whose kicks are deferred (and re-enable their kicks
    /// once too few of their buffers wait at the broker).
    fn drain_deferred(&mut self, vrings: &[VringRwLock]) {
        for q in [TX_QUEUE, RX_QUEUE] {
            if self.kicks_deferred.get(usize::from(q)) == Some(&true) {
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
            self.send(&effect);
            if let DeviceMsg::Release { direction } = effect {
                self.complete_all(direction, mem, vrings);
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
        let mut data = std::mem::take(&mut self.scratch);
        data.resize(payload as usize, 0);
        if c.readable
            .read_at(mem, PCM_XFER_SIZE as u64, &mut data)
            .is_err()
        {
            self.scratch = data;
            return self.refuse(mem, vrings, TX_QUEUE, head, &c.writable, Status::BadMsg);
        }
        let buffer = self.next_id();
        if data.is_empty() {
            self.send(&DeviceMsg::Playback {
                buffer,
                last: true,
                data: Vec::new(),
            });
        }
        let mut chunks = data.chunks(MAX_PCM_CHUNK).peekable();
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            self.send(&DeviceMsg::Playback {
                buffer,
                last,
                data: chunk.to_vec(),
            });
        }
        self.scratch = data;
        self.tx_queued_bytes = self.tx_queued_bytes.saturating_add(payload);
        self.tx_pending.push_back(PendingTx {
            buffer,
            head,
            bytes: payload,
            writable: c.writable,
        });
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
        let buffer = self.next_id();
        let len = len as u32;
        self.send(&DeviceMsg::Capture { buffer, len });
        self.rx_pending.push_back(PendingRx {
            buffer,
            head,
            len,
            written: 0,
            writable: c.writable,
        });
    }

    /// RELEASE, or a queue that stopped: every pending buffer of the stream
    /// goes back to the guest now, as the spec requires.
    fn complete_all(&mut self, d: Direction, mem: &GuestMemoryMmap, vrings: &[VringRwLock]) {
        match d {
            Direction::Output => {
                self.tx_queued_bytes = 0;
                while let Some(p) = self.tx_pending.pop_front() {
                    self.finish_tx(p, 0, mem, vrings);
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
        latency: u32,
        mem: &GuestMemoryMmap,
        vrings: &[VringRwLock],
    ) {
        let len = write_status(mem, &p.writable, Status::Ok, latency)
            .map_or(0, |()| PCM_STATUS_SIZE as u32);
        self.complete(vrings, TX_QUEUE, p.head, len);
    }

    fn finish_rx(&mut self, p: PendingRx, mem: &GuestMemoryMmap, vrings: &[VringRwLock]) {
        let len = write_status(mem, &p.writable, Status::Ok, 0)
            .map_or(0, |()| p.written.saturating_add(PCM_STATUS_SIZE as u32));
        self.complete(vrings, RX_QUEUE, p.head, len);
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
            BrokerMsg::PlaybackDone {
                buffer,
                latency_bytes,
            } => {
                // Buffers complete in order; anything older was released.
                while let Some(front) = self.tx_pending.front() {
                    if front.buffer > buffer {
                        break;
                    }
                    let Some(p) = self.tx_pending.pop_front() else {
                        break;
                    };
                    self.tx_queued_bytes = self.tx_queued_bytes.saturating_sub(p.bytes);
                    let done = p.buffer == buffer;
                    self.finish_tx(p, latency_bytes, mem, vrings);
                    if done {
                        break;
                    }
                }
            }
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
        if let Some(d) = self.kicks_deferred.get_mut(usize::from(q)) {
            *d = false;
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
                self.tx_pending.clear();
                self.tx_queued_bytes = 0;
            }
            Direction::Input => self.rx_pending.clear(),
        }
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
                // seen before it, deferred kicks or not.
                self.drain_deferred(vrings);
                self.process_queue(CONTROL_QUEUE, vrings)
            }
            q @ (EVENT_QUEUE | TX_QUEUE | RX_QUEUE) => self.process_queue(q, vrings),
            BROKER_EVENT => {
                // What the guest queued without kicking goes to the broker
                // first, so that nothing is left to do once the guest has
                // been told about its buffers (it may need this CPU).
                self.drain_deferred(vrings);
                self.broker_event(evset, vrings)
            }
            other => debug!("unexpected event {other}"),
        }
        self.signal_all(vrings);
        // Kicks back on where too few buffers wait at the broker now.
        self.rearm_kicks(vrings);
        self.signal_all(vrings);
        // Never an error: an error would end the worker thread.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};

    /// A backend on 64 KiB of guest memory with its four queues (16
    /// entries) at 0x0, 0x400, 0x800, 0xc00 and EVENT_IDX negotiated; the
    /// broker end of the channel is returned so the device never sees it
    /// gone.
    fn backend() -> (SndBackend, Vec<VringRwLock>, GuestMemoryMmap, Channel) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let atomic = GuestMemoryAtomic::new(mem.clone());
        let gate = GateState {
            output: true,
            input: false,
        };
        let caps = vsnd_ipc::Capabilities {
            formats: vec![vsnd_ipc::SampleFormat::S16],
            rates: vec![48_000],
            channels_min: 1,
            channels_max: 2,
        };
        let (dev, broker) = vsnd_ipc::socketpair().unwrap();
        let mut b = SndBackend::new(SndModel::new(&caps, gate), gate, Channel::new(dev)).unwrap();
        b.set_event_idx(true);
        b.update_memory(atomic.clone()).unwrap();
        let vrings = (0..NUM_QUEUES as u64)
            .map(|q| {
                let v = VringRwLock::new(atomic.clone(), 16).unwrap();
                v.set_queue_size(16);
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
}
