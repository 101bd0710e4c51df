//! One device's session: the hello, then every message from the device,
//! checked as hostile, and the real-time budget that meters both streams.
//!
//! The device paces the guest (it returns each playback buffer and asks for
//! each capture buffer when the stream's clock has advanced by its length),
//! so the broker does not wake up for every period. It trusts none of
//! that: each stream has a clock from START on, and bytes are let through
//! only within its budget — what the real-time rate has made due, plus a
//! slack for batching and scheduling (a quarter of a second). A device that runs fast
//! waits; it never gets more host audio than real time allows.
//!
//! Playback: the bytes the device consumed are played (or, while output is
//! off, discarded) as they arrive within the budget; the rest queue.
//!
//! Capture: each request is answered within the budget, with host samples
//! while input is enabled and silence otherwise. The host source is not
//! touched while input is off.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use vsnd_ipc::lifecycle::{PcmCommand, PcmState, Stream};
use vsnd_ipc::{
    codec, BrokerMsg, Capabilities, Channel, ChannelError, DeviceMsg, Direction, GateState, Pacing,
    PcmParams, MAGIC, MAX_BUFFER_BYTES, MAX_GUEST_BUFFER_BYTES, MAX_PCM_CHUNK, MAX_PENDING_CAPTURE,
    MAX_QUEUED_PLAYBACK_BYTES, PROTOCOL_VERSION,
};

use crate::audio::Audio;

/// Messages handled per wakeup, so one flood cannot starve the clock.
const MAX_BATCH: usize = 512;

/// Bytes queued towards a device that does not read before it is
/// considered stuck (over a second of the largest stream vsnd carries).
const MAX_OUTBOX_BYTES: usize = 8 * 1024 * 1024;

/// Most playback chunks queued for the output stream: full chunks up to
/// [`MAX_QUEUED_PLAYBACK_BYTES`], plus one short chunk for each buffer a
/// virtqueue can have in flight (the bound on capture requests). The byte
/// limit alone does not bound memory: a device sending empty or one-byte
/// chunks would queue millions of them.
const MAX_QUEUED_PLAYBACK_CHUNKS: usize =
    MAX_QUEUED_PLAYBACK_BYTES / MAX_PCM_CHUNK + MAX_PENDING_CAPTURE;

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The device closed the channel (it exited or crashed).
    #[error("the device closed the channel")]
    Closed,
    /// The device speaks another protocol version; respawning cannot help.
    #[error(
        "vsnd-device speaks protocol version {device}, this vsnd-broker speaks {PROTOCOL_VERSION}: \
         install vsnd-broker and vsnd-device from the same release"
    )]
    VersionMismatch {
        /// The device's version.
        device: u32,
    },
    /// The device broke the protocol: it is killed and restarted.
    #[error("protocol violation by the device: {0}")]
    Violation(String),
    /// A socket error.
    #[error("channel error: {0}")]
    Io(String),
}

fn violation<T>(why: impl Into<String>) -> Result<T, SessionError> {
    Err(SessionError::Violation(why.into()))
}

/// The real-time clock of one running stream.
#[derive(Debug, Clone, Copy)]
struct Clock {
    anchor: Instant,
    /// Bytes accounted since `anchor`.
    done: u64,
}

impl Clock {
    /// A clock from `now`; what the stream was allowed beyond `now` when
    /// it stopped (`served_until`) is owed first, so that stopping and
    /// starting again gains nothing.
    fn start(now: Instant, served_until: Option<Instant>, p: &PcmParams) -> Self {
        let owed = served_until.map_or(0, |t| p.bytes_in(t.saturating_duration_since(now)));
        Clock {
            anchor: now,
            done: owed,
        }
    }

    /// Up to when the stream has been served.
    fn served_until(&self, p: &PcmParams) -> Instant {
        self.anchor
            .checked_add(p.time_for(self.done))
            .unwrap_or_else(|| self.anchor + Duration::from_secs(365 * 86_400))
    }

    /// Bytes that may pass by `now`: what the real-time rate has made due
    /// since START, plus as much again but at most `slack` ahead of it,
    /// less what passed already. The allowance ahead grows with the time
    /// the stream runs, and what a stopped stream was allowed ahead is
    /// owed when it starts again ([`Clock::start`]), so that a device
    /// cycling START and STOP gains nothing.
    fn budget(&self, now: Instant, p: &PcmParams, slack: u64) -> u64 {
        let elapsed = p.bytes_in(now.saturating_duration_since(self.anchor));
        elapsed
            .saturating_add(elapsed.min(slack))
            .saturating_sub(self.done)
    }

    /// The stream had nothing waiting until `now`: time it did not use
    /// beyond `slack` is forgotten, so that a stream idle for a while
    /// cannot burst more than twice `slack`.
    fn forget_idle(&mut self, now: Instant, p: &PcmParams, slack: u64) {
        let elapsed = p.bytes_in(now.saturating_duration_since(self.anchor));
        self.done = self.done.max(elapsed.saturating_sub(slack));
    }

    /// When the budget will allow `bytes` (the inverse of
    /// [`Clock::budget`]).
    fn when(&self, bytes: u64, p: &PcmParams, slack: u64) -> Instant {
        let want = self.done.saturating_add(bytes);
        let elapsed = if want <= slack.saturating_mul(2) {
            want.div_ceil(2)
        } else {
            want - slack
        };
        let offset = p.time_for(elapsed);
        // Far beyond any real deadline, but never an overflow.
        self.anchor
            .checked_add(offset)
            .unwrap_or_else(|| self.anchor + Duration::from_secs(365 * 86_400))
    }
}

/// How far ahead of the broker's clock a stream may run, once it has run
/// that long: a quarter of a second. Covers the device's batches of
/// playback (100 ms at most) and the time the broker takes to read START;
/// a device that returns each buffer when it is due never runs further
/// ahead, and one that tries to is held to the real-time rate.
fn slack(p: &PcmParams) -> u64 {
    p.bytes_per_second() / 4
}

/// The meter of one direction: its clock while the stream runs, and up to
/// when it was served when the clock last stopped (owed at the next START).
#[derive(Default, Clone, Copy)]
struct Meter {
    clock: Option<Clock>,
    served_until: Option<Instant>,
}

impl Meter {
    /// START: a clock from `now` (none without parameters).
    fn start(&mut self, now: Instant, p: Option<&PcmParams>) {
        if let Some(p) = p {
            self.clock = Some(Clock::start(now, self.served_until, p));
        }
    }

    /// STOP or RELEASE: the clock stops; what it served ahead is kept.
    fn stop(&mut self, p: Option<&PcmParams>) {
        let served = self.clock.take().zip(p).map(|(c, p)| c.served_until(p));
        self.served_until = match (served, self.served_until) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }

    /// Nothing was waiting until `now` (see [`Clock::forget_idle`]).
    fn forget_idle(&mut self, now: Instant, p: Option<&PcmParams>) {
        if let (Some(clock), Some(p)) = (self.clock.as_mut(), p) {
            clock.forget_idle(now, p, slack(p));
        }
    }
}

struct Chunk {
    data: Vec<u8>,
    pos: usize,
}

/// The output stream as the broker sees it.
#[derive(Default)]
struct Playback {
    stream: Stream,
    params: Option<PcmParams>,
    /// Consumed playback beyond the budget, waiting for it.
    queue: VecDeque<Chunk>,
    queued: usize,
    meter: Meter,
}

struct CaptureReq {
    buffer: u64,
    len: u32,
}

/// The input stream as the broker sees it.
#[derive(Default)]
struct Capture {
    stream: Stream,
    params: Option<PcmParams>,
    queue: VecDeque<CaptureReq>,
    meter: Meter,
    source_open: bool,
    /// Opening the host source failed; not retried until the stream is
    /// released or input is turned off and on.
    source_failed: bool,
}

/// A running session with one device.
pub struct Session {
    ch: Channel,
    outbox: VecDeque<Vec<u8>>,
    outbox_bytes: usize,
    greeted: bool,
    caps: Capabilities,
    gate: GateState,
    playback: Playback,
    capture: Capture,
    scratch: Vec<u8>,
    /// How the device paces the guest (its hello says so); with `unpaced`,
    /// measurement only, the broker does not meter either.
    pacing: Pacing,
}

impl Session {
    /// Start a session on a fresh channel; the device speaks first.
    pub fn new(
        ch: Channel,
        caps: Capabilities,
        gate: GateState,
        pacing: Pacing,
    ) -> Result<Self, SessionError> {
        ch.set_nonblocking(true)
            .map_err(|e| SessionError::Io(e.to_string()))?;
        Ok(Session {
            ch,
            outbox: VecDeque::new(),
            outbox_bytes: 0,
            greeted: false,
            caps,
            gate,
            playback: Playback::default(),
            capture: Capture::default(),
            scratch: Vec::new(),
            pacing,
        })
    }

    /// The channel, for polling.
    pub fn channel(&self) -> &Channel {
        &self.ch
    }

    /// Whether frames are waiting to be written (poll for POLLOUT).
    pub fn wants_write(&self) -> bool {
        !self.outbox.is_empty()
    }

    /// The earliest moment something is due, if any stream runs.
    pub fn next_deadline(&self) -> Option<Instant> {
        let pb = self.playback_deadline();
        let cap = self.capture_deadline();
        match (pb, cap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn playback_deadline(&self) -> Option<Instant> {
        let pb = &self.playback;
        let (clock, params) = (pb.meter.clock?, pb.params.as_ref()?);
        let first = pb.queue.front()?;
        let rest = first.data.len().saturating_sub(first.pos) as u64;
        Some(clock.when(rest, params, slack(params)))
    }

    fn capture_deadline(&self) -> Option<Instant> {
        let cap = &self.capture;
        let (clock, params) = (cap.meter.clock?, cap.params.as_ref()?);
        let first = cap.queue.front()?;
        Some(clock.when(u64::from(first.len), params, slack(params)))
    }

    /// The gate changed: tell the device (it shows the guest its jacks, and
    /// starts or stops asking for capture data) and close the host capture
    /// source if input went off. Every byte the broker passes from now on
    /// follows the new flags; the device asks for each capture buffer when
    /// it is due, so a flip reaches the guest within a period.
    pub fn set_gate(&mut self, gate: GateState, audio: &mut dyn Audio) -> Result<(), SessionError> {
        self.gate = gate;
        if !gate.input {
            self.capture.source_failed = false;
        }
        if !gate.input && self.capture.source_open {
            audio.close_capture();
            self.capture.source_open = false;
            info!("input off: host capture source closed");
        }
        if self.greeted {
            self.send(&BrokerMsg::Gate(gate))?;
        }
        Ok(())
    }

    fn send(&mut self, msg: &BrokerMsg) -> Result<(), SessionError> {
        let frame = codec::encode(msg).map_err(|e| SessionError::Io(e.to_string()))?;
        if self.outbox.is_empty() {
            match self.ch.send_frame(&frame) {
                Ok(()) => return Ok(()),
                Err(ChannelError::WouldBlock) => {}
                Err(ChannelError::Closed) => return Err(SessionError::Closed),
                Err(e) => return Err(SessionError::Io(e.to_string())),
            }
        }
        if self.outbox_bytes.saturating_add(frame.len()) > MAX_OUTBOX_BYTES {
            return violation("the device does not read its channel");
        }
        self.outbox_bytes += frame.len();
        self.outbox.push_back(frame);
        Ok(())
    }

    /// The channel is writable: flush queued frames.
    pub fn on_writable(&mut self) -> Result<(), SessionError> {
        while let Some(frame) = self.outbox.front() {
            match self.ch.send_frame(frame) {
                Ok(()) => {
                    if let Some(f) = self.outbox.pop_front() {
                        self.outbox_bytes = self.outbox_bytes.saturating_sub(f.len());
                    }
                }
                Err(ChannelError::WouldBlock) => break,
                Err(ChannelError::Closed) => return Err(SessionError::Closed),
                Err(e) => return Err(SessionError::Io(e.to_string())),
            }
        }
        Ok(())
    }

    /// Whether the device has said a valid hello (it does so once it is
    /// sandboxed and holds the listener).
    pub fn greeted(&self) -> bool {
        self.greeted
    }

    /// The channel is readable: handle what the device sent.
    pub fn on_readable(&mut self, audio: &mut dyn Audio, now: Instant) -> Result<(), SessionError> {
        for _ in 0..MAX_BATCH {
            let msg = match self.ch.try_recv::<DeviceMsg>() {
                Ok(m) => m,
                Err(ChannelError::WouldBlock) => break,
                Err(ChannelError::Closed) => return Err(SessionError::Closed),
                Err(ChannelError::Codec(e)) => return violation(format!("undecodable frame: {e}")),
                Err(ChannelError::Io(e)) => return Err(SessionError::Io(e.to_string())),
            };
            self.handle(msg, audio, now)?;
        }
        Ok(())
    }

    fn handle(
        &mut self,
        msg: DeviceMsg,
        audio: &mut dyn Audio,
        now: Instant,
    ) -> Result<(), SessionError> {
        if !self.greeted {
            return match msg {
                DeviceMsg::Hello { magic, version } if magic == MAGIC => {
                    if version != PROTOCOL_VERSION {
                        return Err(SessionError::VersionMismatch { device: version });
                    }
                    self.greeted = true;
                    let hello = BrokerMsg::Hello {
                        magic: MAGIC,
                        version: PROTOCOL_VERSION,
                        caps: self.caps.clone(),
                        gate: self.gate,
                        pacing: self.pacing,
                    };
                    self.send(&hello)
                }
                other => violation(format!("expected hello, got {}", describe(&other))),
            };
        }
        match msg {
            DeviceMsg::Hello { .. } => violation("a second hello"),
            DeviceMsg::SetParams { direction, params } => {
                self.check_params(&params)?;
                let stream = self.stream_mut(direction);
                stream
                    .set_params(params)
                    .or_else(|e| violation(format!("{direction}: {e:?}")))?;
                debug!("{direction}: params {params:?}");
                match direction {
                    Direction::Output => self.playback.params = Some(params),
                    Direction::Input => self.capture.params = Some(params),
                }
                Ok(())
            }
            DeviceMsg::Prepare { direction } => {
                self.command(direction, PcmCommand::Prepare, audio, now)
            }
            DeviceMsg::Start { direction } => {
                self.command(direction, PcmCommand::Start, audio, now)
            }
            DeviceMsg::Stop { direction } => self.command(direction, PcmCommand::Stop, audio, now),
            DeviceMsg::Release { direction } => {
                self.command(direction, PcmCommand::Release, audio, now)
            }
            // Played or answered at once when within the budget, so that a
            // STOP or RELEASE read in the same batch comes after them.
            DeviceMsg::Playback { data } => {
                self.playback_data(data, now)?;
                self.tick_playback(audio, now)
            }
            DeviceMsg::Capture { buffer, len } => {
                self.capture_request(buffer, len, now)?;
                self.tick_capture(audio, now)
            }
        }
    }

    fn stream_mut(&mut self, d: Direction) -> &mut Stream {
        match d {
            Direction::Output => &mut self.playback.stream,
            Direction::Input => &mut self.capture.stream,
        }
    }

    /// The device validated these too; a rogue one may not have.
    fn check_params(&self, p: &PcmParams) -> Result<(), SessionError> {
        let ok = self.caps.formats.contains(&p.format)
            && self.caps.rates.contains(&p.rate)
            && (self.caps.channels_min..=self.caps.channels_max).contains(&p.channels)
            && p.period_bytes > 0
            && p.period_bytes <= p.buffer_bytes
            && p.period_bytes <= MAX_BUFFER_BYTES
            && p.buffer_bytes <= MAX_GUEST_BUFFER_BYTES
            && p.frame_bytes() > 0;
        if ok {
            Ok(())
        } else {
            violation(format!("unsupported parameters {p:?}"))
        }
    }

    fn command(
        &mut self,
        d: Direction,
        c: PcmCommand,
        audio: &mut dyn Audio,
        now: Instant,
    ) -> Result<(), SessionError> {
        let stream = self.stream_mut(d);
        stream
            .apply(c)
            .or_else(|e| violation(format!("{d}: {:?} in state {:?}", e.command, e.from)))?;
        info!("{d} stream: {c:?}");
        match (d, c) {
            (Direction::Output, PcmCommand::Start) => {
                let pb = &mut self.playback;
                pb.meter.start(now, pb.params.as_ref());
            }
            (Direction::Output, PcmCommand::Stop) => {
                let pb = &mut self.playback;
                pb.meter.stop(pb.params.as_ref());
            }
            (Direction::Output, PcmCommand::Prepare) => {
                if let Some(params) = self.playback.params {
                    if let Err(e) = audio.open_output(&params) {
                        warn!("host playback unavailable ({e}); the guest's output is discarded");
                    }
                }
            }
            (Direction::Output, PcmCommand::Release) => {
                let pb = &mut self.playback;
                pb.meter.stop(pb.params.as_ref());
                pb.queue.clear();
                pb.queued = 0;
                audio.close_output();
            }
            (Direction::Input, PcmCommand::Start) => {
                let cap = &mut self.capture;
                cap.meter.start(now, cap.params.as_ref());
            }
            (Direction::Input, PcmCommand::Stop) => {
                let cap = &mut self.capture;
                cap.meter.stop(cap.params.as_ref());
                // A paused recording does not keep the host microphone open.
                if self.capture.source_open {
                    audio.close_capture();
                    self.capture.source_open = false;
                    info!("input stopped: host capture source closed");
                }
            }
            (Direction::Input, PcmCommand::Release) => {
                let cap = &mut self.capture;
                cap.meter.stop(cap.params.as_ref());
                cap.queue.clear();
                self.capture.source_failed = false;
                if self.capture.source_open {
                    audio.close_capture();
                    self.capture.source_open = false;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn playback_data(&mut self, data: Vec<u8>, now: Instant) -> Result<(), SessionError> {
        let pb = &mut self.playback;
        if !matches!(
            pb.stream.state(),
            PcmState::Prepared | PcmState::Running | PcmState::Stopped
        ) {
            return violation(format!("playback data in state {:?}", pb.stream.state()));
        }
        if data.len() > MAX_PCM_CHUNK {
            return violation("playback chunk too large");
        }
        if pb.queue.len() >= MAX_QUEUED_PLAYBACK_CHUNKS {
            return violation(format!(
                "more than {MAX_QUEUED_PLAYBACK_CHUNKS} playback chunks queued"
            ));
        }
        pb.queued = pb.queued.saturating_add(data.len());
        if pb.queued > MAX_QUEUED_PLAYBACK_BYTES {
            return violation(format!(
                "more than {MAX_QUEUED_PLAYBACK_BYTES} playback bytes queued"
            ));
        }
        if pb.queue.is_empty() {
            pb.meter.forget_idle(now, pb.params.as_ref());
        }
        pb.queue.push_back(Chunk { data, pos: 0 });
        Ok(())
    }

    fn capture_request(&mut self, buffer: u64, len: u32, now: Instant) -> Result<(), SessionError> {
        let cap = &mut self.capture;
        if !matches!(
            cap.stream.state(),
            PcmState::Prepared | PcmState::Running | PcmState::Stopped
        ) {
            return violation(format!("capture request in state {:?}", cap.stream.state()));
        }
        if len > MAX_BUFFER_BYTES {
            return violation(format!("capture request of {len} bytes"));
        }
        if cap.queue.len() >= MAX_PENDING_CAPTURE {
            return violation("too many capture requests");
        }
        if cap.queue.is_empty() {
            cap.meter.forget_idle(now, cap.params.as_ref());
        }
        cap.queue.push_back(CaptureReq { buffer, len });
        Ok(())
    }

    /// Advance both clocks to `now`.
    pub fn on_tick(&mut self, audio: &mut dyn Audio, now: Instant) -> Result<(), SessionError> {
        self.tick_playback(audio, now)?;
        self.tick_capture(audio, now)
    }

    fn tick_playback(&mut self, audio: &mut dyn Audio, now: Instant) -> Result<(), SessionError> {
        let output_on = self.gate.output;
        let pb = &mut self.playback;
        let (Some(mut clock), Some(params)) = (pb.meter.clock, pb.params) else {
            return Ok(());
        };
        let mut budget = if self.pacing.unpaced {
            u64::MAX
        } else {
            clock.budget(now, &params, slack(&params))
        };
        while budget > 0 {
            let Some(chunk) = pb.queue.front_mut() else {
                break;
            };
            let avail = chunk.data.len().saturating_sub(chunk.pos);
            let n = avail.min(usize::try_from(budget).unwrap_or(usize::MAX));
            if let Some(bytes) = chunk.data.get(chunk.pos..chunk.pos + n) {
                if output_on {
                    audio.play(&params, bytes);
                } else {
                    audio.discard(&params, bytes.len());
                }
            }
            chunk.pos += n;
            budget -= n as u64;
            clock.done = clock.done.saturating_add(n as u64);
            pb.queued = pb.queued.saturating_sub(n);
            if chunk.pos >= chunk.data.len() {
                pb.queue.pop_front();
            }
        }
        pb.meter.clock = Some(clock);
        Ok(())
    }

    fn tick_capture(&mut self, audio: &mut dyn Audio, now: Instant) -> Result<(), SessionError> {
        let input_on = self.gate.input;
        let (Some(mut clock), Some(params)) = (self.capture.meter.clock, self.capture.params)
        else {
            return Ok(());
        };
        let mut budget = if self.pacing.unpaced {
            u64::MAX
        } else {
            clock.budget(now, &params, slack(&params))
        };
        while let Some(req) = self.capture.queue.front() {
            if budget < u64::from(req.len) {
                break;
            }
            budget -= u64::from(req.len);
            let (buffer, len) = (req.buffer, req.len as usize);
            self.capture.queue.pop_front();
            clock.done = clock.done.saturating_add(len as u64);
            let mut data = std::mem::take(&mut self.scratch);
            data.clear();
            data.resize(len, 0);
            // An empty request needs no source (and does not open one).
            if input_on && len > 0 {
                if !self.capture.source_open && !self.capture.source_failed {
                    match audio.open_capture(&params) {
                        Ok(()) => {
                            info!("input on: host capture source opened");
                            self.capture.source_open = true;
                        }
                        Err(e) => {
                            warn!("host capture unavailable ({e}); the guest records silence");
                            self.capture.source_failed = true;
                        }
                    }
                }
                if self.capture.source_open {
                    audio.capture(&params, &mut data);
                } else {
                    params.format.fill_silence(&mut data);
                }
            } else {
                // The gate is closed: the guest gets silence, whatever the
                // host hears.
                params.format.fill_silence(&mut data);
            }
            let mut chunks = data.chunks(MAX_PCM_CHUNK).peekable();
            if chunks.peek().is_none() {
                self.send(&BrokerMsg::CaptureData {
                    buffer,
                    last: true,
                    data: Vec::new(),
                })?;
            }
            while let Some(c) = chunks.next() {
                let last = chunks.peek().is_none();
                self.send(&BrokerMsg::CaptureData {
                    buffer,
                    last,
                    data: c.to_vec(),
                })?;
            }
            self.scratch = data;
        }
        self.capture.meter.clock = Some(clock);
        Ok(())
    }
}

fn describe(m: &DeviceMsg) -> &'static str {
    match m {
        DeviceMsg::Hello { .. } => "hello",
        DeviceMsg::SetParams { .. } => "set-params",
        DeviceMsg::Prepare { .. } => "prepare",
        DeviceMsg::Start { .. } => "start",
        DeviceMsg::Stop { .. } => "stop",
        DeviceMsg::Release { .. } => "release",
        DeviceMsg::Playback { .. } => "playback",
        DeviceMsg::Capture { .. } => "capture",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vsnd_ipc::{socketpair, SampleFormat};

    /// A backend that records what it is asked to do.
    #[derive(Default)]
    struct Recorder {
        played: Vec<u8>,
        discarded: usize,
        capture_calls: usize,
        closes: usize,
    }

    impl Audio for Recorder {
        fn capabilities(&self) -> Capabilities {
            crate::audio::raw_capabilities()
        }
        fn play(&mut self, _p: &PcmParams, data: &[u8]) {
            self.played.extend_from_slice(data);
        }
        fn discard(&mut self, _p: &PcmParams, len: usize) {
            self.discarded += len;
        }
        fn capture(&mut self, _p: &PcmParams, buf: &mut [u8]) {
            self.capture_calls += 1;
            buf.fill(0x55);
        }
        fn close_capture(&mut self) {
            self.closes += 1;
        }
    }

    /// 48 kHz stereo S16: 192 bytes per millisecond, 10 ms periods.
    const PERIOD: u32 = 1920;

    fn params() -> PcmParams {
        PcmParams {
            format: SampleFormat::S16,
            rate: 48_000,
            channels: 2,
            buffer_bytes: 4 * PERIOD,
            period_bytes: PERIOD,
        }
    }

    /// What a stream with [`params`] may run ahead: 250 ms.
    const SLACK: usize = 48_000;

    fn paced() -> Pacing {
        Pacing {
            unpaced: false,
            playback_batch_ms: 0,
            host_capture: true,
        }
    }

    struct Rig {
        session: Session,
        device: Channel,
        audio: Recorder,
        t0: Instant,
    }

    impl Rig {
        fn new(gate: GateState) -> Rig {
            Rig::with(gate, paced())
        }

        fn with(gate: GateState, pacing: Pacing) -> Rig {
            let (a, b) = socketpair().unwrap();
            let session = Session::new(
                Channel::new(a),
                crate::audio::raw_capabilities(),
                gate,
                pacing,
            )
            .unwrap();
            let mut rig = Rig {
                session,
                device: Channel::new(b),
                audio: Recorder::default(),
                t0: Instant::now(),
            };
            rig.send(DeviceMsg::Hello {
                magic: MAGIC,
                version: PROTOCOL_VERSION,
            })
            .unwrap();
            match rig.device.try_recv::<BrokerMsg>() {
                Ok(BrokerMsg::Hello { pacing: p, .. }) => assert_eq!(p, pacing),
                other => panic!("expected the broker's hello, got {other:?}"),
            }
            rig
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        fn send(&mut self, m: DeviceMsg) -> Result<(), SessionError> {
            let now = self.t0;
            self.send_at(m, now)
        }

        fn send_at(&mut self, m: DeviceMsg, now: Instant) -> Result<(), SessionError> {
            self.device.send(&m).unwrap();
            self.session.on_readable(&mut self.audio, now)
        }

        fn tick(&mut self, now: Instant) {
            self.session.on_tick(&mut self.audio, now).unwrap();
        }

        fn replies(&mut self) -> Vec<BrokerMsg> {
            let mut v = Vec::new();
            while let Ok(m) = self.device.try_recv::<BrokerMsg>() {
                v.push(m);
            }
            v
        }

        fn stream(&mut self, d: Direction) {
            self.send(DeviceMsg::SetParams {
                direction: d,
                params: params(),
            })
            .unwrap();
            self.send(DeviceMsg::Prepare { direction: d }).unwrap();
        }

        fn start(&mut self, d: Direction, ms: u64) {
            let at = self.at(ms);
            self.send_at(DeviceMsg::Start { direction: d }, at).unwrap();
        }

        fn play(&mut self, bytes: &[u8]) {
            for c in bytes.chunks(MAX_PCM_CHUNK) {
                self.send(DeviceMsg::Playback { data: c.to_vec() }).unwrap();
            }
        }
    }

    fn capture_data(msgs: &[BrokerMsg]) -> Vec<(u64, Vec<u8>)> {
        let mut out: Vec<(u64, Vec<u8>)> = Vec::new();
        for m in msgs {
            if let BrokerMsg::CaptureData { buffer, data, .. } = m {
                match out.last_mut() {
                    Some((b, d)) if b == buffer => d.extend_from_slice(data),
                    _ => out.push((*buffer, data.clone())),
                }
            }
        }
        out
    }

    #[test]
    fn playback_is_played_as_it_arrives_in_order_and_not_before_start() {
        let mut r = Rig::new(GateState {
            output: true,
            input: false,
        });
        r.stream(Direction::Output);
        let mut want = Vec::new();
        for b in 0..3u8 {
            want.extend(vec![b + 1; PERIOD as usize]);
        }
        r.play(&want);
        r.tick(r.at(1000));
        assert!(r.audio.played.is_empty(), "nothing is played before START");
        r.start(Direction::Output, 1000);
        // 15 ms after START the budget is twice that: all three periods.
        r.tick(r.at(1015));
        assert_eq!(r.audio.played, want, "exactly the guest's bytes, in order");
        assert_eq!(r.session.next_deadline(), None, "nothing waits");
    }

    #[test]
    fn a_device_that_runs_fast_is_held_to_the_real_time_rate() {
        let mut r = Rig::new(GateState {
            output: true,
            input: false,
        });
        r.stream(Direction::Output);
        r.start(Direction::Output, 0);
        // Two seconds of playback at the instant of START.
        let two: Vec<u8> = (0..384_000u32).map(|i| i as u8).collect();
        r.play(&two);
        r.tick(r.at(0));
        assert!(r.audio.played.is_empty(), "nothing ahead at START");
        r.tick(r.at(100));
        assert_eq!(
            r.audio.played.len(),
            2 * 19_200,
            "twice the real-time rate while the allowance ahead grows"
        );
        r.tick(r.at(1000));
        assert_eq!(
            r.audio.played.len(),
            192_000 + SLACK,
            "then the real-time rate plus the slack"
        );
        assert!(r.session.next_deadline().is_some(), "the rest waits");
        r.tick(r.at(2000));
        assert!(r.audio.played == two, "all of it, in order, by 2 s");
    }

    #[test]
    fn start_and_stop_cycles_do_not_refill_the_slack() {
        let mut r = Rig::new(GateState {
            output: true,
            input: false,
        });
        r.stream(Direction::Output);
        r.play(&vec![3; 384_000]);
        // A second of 10 ms START/STOP cycles.
        for k in 0..100u64 {
            r.start(Direction::Output, 10 * k);
            r.tick(r.at(10 * k + 10));
            r.send_at(
                DeviceMsg::Stop {
                    direction: Direction::Output,
                },
                r.at(10 * k + 10),
            )
            .unwrap();
        }
        assert!(
            r.audio.played.len() <= 192_000 + SLACK,
            "at most real time and the slack over a second of cycles, got {} bytes",
            r.audio.played.len()
        );
    }

    #[test]
    fn an_idle_stream_cannot_save_up_a_burst() {
        let mut r = Rig::new(GateState {
            output: true,
            input: false,
        });
        r.stream(Direction::Output);
        r.start(Direction::Output, 0);
        r.tick(r.at(10_000));
        let at = r.at(10_000);
        for c in vec![1; 192_000].chunks(MAX_PCM_CHUNK) {
            r.send_at(DeviceMsg::Playback { data: c.to_vec() }, at)
                .unwrap();
        }
        r.tick(at);
        assert_eq!(
            r.audio.played.len(),
            2 * SLACK,
            "after 10 s of silence, at most twice the slack at once"
        );
    }

    #[test]
    fn unpaced_for_benchmark_plays_and_answers_at_once() {
        let mut r = Rig::with(
            GateState {
                output: true,
                input: true,
            },
            Pacing {
                unpaced: true,
                ..paced()
            },
        );
        r.stream(Direction::Output);
        r.stream(Direction::Input);
        for d in Direction::ALL {
            r.start(d, 0);
        }
        r.play(&vec![7; 50 * PERIOD as usize * 10]);
        for b in 0..50u64 {
            r.send(DeviceMsg::Capture {
                buffer: 100 + b,
                len: PERIOD,
            })
            .unwrap();
        }
        // Five seconds of playback, half a second of capture, at START.
        r.tick(r.at(0));
        // More than the socket buffer holds: read, let the outbox flush,
        // read again.
        let mut replies = r.replies();
        while r.session.wants_write() {
            r.session.on_writable().unwrap();
            replies.extend(r.replies());
        }
        assert_eq!(capture_data(&replies).len(), 50, "every request answered");
        assert_eq!(r.audio.played.len(), 500 * PERIOD as usize);
        assert_eq!(r.session.next_deadline(), None, "nothing left to wait for");
    }

    #[test]
    fn output_off_discards_what_the_device_consumed() {
        let mut r = Rig::new(GateState {
            output: false,
            input: false,
        });
        r.stream(Direction::Output);
        r.start(Direction::Output, 0);
        r.play(&[9; PERIOD as usize]);
        r.tick(r.at(10));
        assert!(
            r.audio.played.is_empty(),
            "output off: nothing reaches the host"
        );
        assert_eq!(r.audio.discarded, PERIOD as usize);
    }

    #[test]
    fn stop_holds_what_waits_for_the_budget() {
        let mut r = Rig::new(GateState {
            output: true,
            input: false,
        });
        r.stream(Direction::Output);
        r.start(Direction::Output, 0);
        r.play(&vec![1; 4 * PERIOD as usize]);
        r.tick(r.at(10));
        assert_eq!(r.audio.played.len(), 2 * PERIOD as usize);
        r.send_at(
            DeviceMsg::Stop {
                direction: Direction::Output,
            },
            r.at(11),
        )
        .unwrap();
        r.tick(r.at(500));
        assert_eq!(
            r.audio.played.len(),
            2 * PERIOD as usize,
            "a stopped stream plays nothing"
        );
        r.start(Direction::Output, 500);
        r.tick(r.at(510));
        assert_eq!(r.audio.played.len(), 4 * PERIOD as usize);
    }

    #[test]
    fn input_off_gives_silence_and_never_touches_the_host_source() {
        let mut r = Rig::new(GateState {
            output: true,
            input: false,
        });
        r.stream(Direction::Input);
        r.start(Direction::Input, 0);
        for b in 0..2u64 {
            r.send(DeviceMsg::Capture {
                buffer: b,
                len: PERIOD,
            })
            .unwrap();
        }
        r.tick(r.at(10));
        let got = capture_data(&r.replies());
        assert_eq!(got.len(), 2);
        assert!(got
            .iter()
            .all(|(_, d)| d.len() == PERIOD as usize && d.iter().all(|&b| b == 0)));
        assert_eq!(
            r.audio.capture_calls, 0,
            "the host source is not used while input is off"
        );
        // Input on: the next request is answered with host samples.
        r.session
            .set_gate(
                GateState {
                    output: true,
                    input: true,
                },
                &mut r.audio,
            )
            .unwrap();
        assert!(r.replies().contains(&BrokerMsg::Gate(GateState {
            output: true,
            input: true
        })));
        r.send(DeviceMsg::Capture {
            buffer: 2,
            len: PERIOD,
        })
        .unwrap();
        r.tick(r.at(20));
        let got = capture_data(&r.replies());
        assert_eq!(got, vec![(2, vec![0x55; PERIOD as usize])]);
        // Off again: silence for the next request, and the source is closed.
        r.session
            .set_gate(
                GateState {
                    output: true,
                    input: false,
                },
                &mut r.audio,
            )
            .unwrap();
        assert_eq!(r.audio.closes, 1);
        r.send(DeviceMsg::Capture {
            buffer: 3,
            len: PERIOD,
        })
        .unwrap();
        r.tick(r.at(30));
        let got = capture_data(&r.replies());
        assert_eq!(got, vec![(3, vec![0; PERIOD as usize])]);
    }

    #[test]
    fn capture_requests_beyond_the_budget_wait_for_the_clock() {
        let mut r = Rig::new(GateState {
            output: true,
            input: true,
        });
        r.stream(Direction::Input);
        r.start(Direction::Input, 0);
        // A second of requests at once: a device trying to read ahead.
        for b in 0..100u64 {
            r.send(DeviceMsg::Capture {
                buffer: b,
                len: PERIOD,
            })
            .unwrap();
        }
        r.tick(r.at(0));
        assert!(
            capture_data(&r.replies()).is_empty(),
            "nothing ahead at START"
        );
        r.tick(r.at(100));
        assert_eq!(
            capture_data(&r.replies()).len(),
            20,
            "twice real time while the allowance ahead grows"
        );
        r.tick(r.at(400));
        assert_eq!(
            capture_data(&r.replies()).len(),
            (76_800 + SLACK) / PERIOD as usize - 20,
            "then real time plus the slack"
        );
        r.tick(r.at(500));
        assert_eq!(
            capture_data(&r.replies()).len(),
            10,
            "ten 10 ms buffers per 100 ms"
        );
    }

    #[test]
    fn stopping_capture_closes_the_host_source() {
        let mut r = Rig::new(GateState {
            output: true,
            input: true,
        });
        r.stream(Direction::Input);
        r.start(Direction::Input, 0);
        r.send(DeviceMsg::Capture {
            buffer: 0,
            len: PERIOD,
        })
        .unwrap();
        r.tick(r.at(10));
        assert_eq!(r.audio.capture_calls, 1);
        r.send_at(
            DeviceMsg::Stop {
                direction: Direction::Input,
            },
            r.at(11),
        )
        .unwrap();
        assert_eq!(
            r.audio.closes, 1,
            "a paused recording must not keep the microphone open"
        );
        r.send_at(
            DeviceMsg::Capture {
                buffer: 1,
                len: PERIOD,
            },
            r.at(12),
        )
        .unwrap();
        r.tick(r.at(15));
        assert_eq!(r.audio.capture_calls, 1, "not answered while stopped");
        r.start(Direction::Input, 20);
        r.tick(r.at(30));
        assert_eq!(r.audio.capture_calls, 2, "reopened after START");
    }

    #[test]
    fn a_rogue_device_is_cut_off() {
        type Case = (&'static str, Vec<DeviceMsg>);
        let cases: Vec<Case> = vec![
            (
                "capture before prepare",
                vec![DeviceMsg::Capture { buffer: 0, len: 4 }],
            ),
            (
                "playback before prepare",
                vec![DeviceMsg::Playback { data: vec![1] }],
            ),
            (
                "second hello",
                vec![DeviceMsg::Hello {
                    magic: MAGIC,
                    version: PROTOCOL_VERSION,
                }],
            ),
            (
                "start without params",
                vec![DeviceMsg::Start {
                    direction: Direction::Input,
                }],
            ),
            (
                "unsupported params",
                vec![DeviceMsg::SetParams {
                    direction: Direction::Input,
                    params: PcmParams {
                        rate: 1,
                        ..params()
                    },
                }],
            ),
            (
                "a guest buffer larger than the device accepts",
                vec![DeviceMsg::SetParams {
                    direction: Direction::Input,
                    params: PcmParams {
                        buffer_bytes: MAX_GUEST_BUFFER_BYTES + 1,
                        ..params()
                    },
                }],
            ),
            (
                "huge capture",
                vec![
                    DeviceMsg::SetParams {
                        direction: Direction::Input,
                        params: params(),
                    },
                    DeviceMsg::Prepare {
                        direction: Direction::Input,
                    },
                    DeviceMsg::Capture {
                        buffer: 0,
                        len: MAX_BUFFER_BYTES + 1,
                    },
                ],
            ),
            (
                "oversized chunk",
                vec![
                    DeviceMsg::SetParams {
                        direction: Direction::Output,
                        params: params(),
                    },
                    DeviceMsg::Prepare {
                        direction: Direction::Output,
                    },
                    DeviceMsg::Playback {
                        data: vec![0; MAX_PCM_CHUNK + 1],
                    },
                ],
            ),
        ];
        for (name, msgs) in cases {
            let mut r = Rig::new(GateState {
                output: true,
                input: false,
            });
            let mut result = Ok(());
            for m in msgs {
                // An oversized chunk cannot even be encoded by the codec;
                // send its raw frame.
                if let DeviceMsg::Playback { data } = &m {
                    if data.len() > MAX_PCM_CHUNK {
                        let frame =
                            bincode::encode_to_vec(&m, bincode::config::standard()).unwrap();
                        r.device.send_frame(&frame).unwrap();
                        result = r.session.on_readable(&mut r.audio, r.t0);
                        continue;
                    }
                }
                result = r.send(m);
                if result.is_err() {
                    break;
                }
            }
            assert!(
                matches!(result, Err(SessionError::Violation(_))),
                "{name}: expected a protocol violation, got {result:?}"
            );
        }
    }

    #[test]
    fn too_many_playback_chunks_is_a_violation() {
        // Empty chunks add no bytes; only their number can bound them.
        let mut r = Rig::new(GateState {
            output: true,
            input: false,
        });
        r.stream(Direction::Output);
        for _ in 0..MAX_QUEUED_PLAYBACK_CHUNKS {
            r.send(DeviceMsg::Playback { data: Vec::new() }).unwrap();
        }
        let res = r.send(DeviceMsg::Playback { data: Vec::new() });
        assert!(
            matches!(res, Err(SessionError::Violation(_))),
            "chunk {} of endless empty playback: got {res:?}",
            MAX_QUEUED_PLAYBACK_CHUNKS + 1
        );
    }

    #[test]
    fn too_many_capture_requests_is_a_violation() {
        let mut r = Rig::new(GateState {
            output: true,
            input: false,
        });
        r.stream(Direction::Input);
        for b in 0..MAX_PENDING_CAPTURE as u64 {
            r.send(DeviceMsg::Capture { buffer: b, len: 4 }).unwrap();
        }
        let res = r.send(DeviceMsg::Capture {
            buffer: u64::MAX,
            len: 4,
        });
        assert!(
            matches!(res, Err(SessionError::Violation(_))),
            "got {res:?}"
        );
    }

    #[test]
    fn a_version_mismatch_is_reported_as_such() {
        let (a, b) = socketpair().unwrap();
        let mut s = Session::new(
            Channel::new(a),
            crate::audio::raw_capabilities(),
            GateState {
                output: true,
                input: false,
            },
            paced(),
        )
        .unwrap();
        let dev = Channel::new(b);
        dev.send(&DeviceMsg::Hello {
            magic: MAGIC,
            version: 999,
        })
        .unwrap();
        let res = s.on_readable(&mut Recorder::default(), Instant::now());
        assert!(
            matches!(res, Err(SessionError::VersionMismatch { device: 999 })),
            "got {res:?}"
        );
    }
}
