//! One device's session: the hello, then every message from the device,
//! checked as hostile, and the real-time clock that paces both streams.
//!
//! Playback: chunks queue per stream; the clock consumes them at the
//! stream's byte rate from START on; when a buffer's last byte is consumed
//! the device hears `PlaybackDone`. Consumed bytes go to the backend only
//! while output is enabled (otherwise they are discarded, at the same pace).
//!
//! Capture: requests queue; each is answered when the clock has advanced by
//! its length, with host samples while input is enabled and silence
//! otherwise. The host source is not touched while input is off.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use log::{debug, info};
use vsnd_ipc::lifecycle::{PcmCommand, PcmState, Stream};
use vsnd_ipc::{
    codec, BrokerMsg, Capabilities, Channel, ChannelError, DeviceMsg, Direction, GateState,
    PcmParams, MAGIC, MAX_BUFFER_BYTES, MAX_PCM_CHUNK, MAX_PENDING_CAPTURE,
    MAX_QUEUED_PLAYBACK_BYTES, PROTOCOL_VERSION,
};

use crate::audio::Audio;

/// Messages handled per wakeup, so one flood cannot starve the clock.
const MAX_BATCH: usize = 512;

/// Frames queued towards a device that does not read before it is
/// considered stuck.
const MAX_OUTBOX: usize = 4096;

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
    fn new(now: Instant) -> Self {
        Clock {
            anchor: now,
            done: 0,
        }
    }

    /// Whole frames' worth of bytes due by `now` and not yet accounted.
    fn due(&self, now: Instant, p: &PcmParams) -> u64 {
        let elapsed = now.saturating_duration_since(self.anchor).as_nanos();
        let frames = elapsed * u128::from(p.rate) / 1_000_000_000;
        let bytes = frames * u128::from(p.frame_bytes());
        u64::try_from(bytes)
            .unwrap_or(u64::MAX)
            .saturating_sub(self.done)
    }

    /// When `more` bytes beyond those accounted will be due.
    fn when(&self, more: u64, p: &PcmParams) -> Instant {
        let frame = u64::from(p.frame_bytes().max(1));
        let frames = (self.done.saturating_add(more)).div_ceil(frame);
        let nanos = u128::from(frames) * 1_000_000_000 / u128::from(p.rate.max(1));
        self.anchor + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

struct Chunk {
    data: Vec<u8>,
    pos: usize,
    /// Set on the last chunk of a guest buffer.
    ends: Option<u64>,
}

/// The output stream as the broker sees it.
#[derive(Default)]
struct Playback {
    stream: Stream,
    params: Option<PcmParams>,
    queue: VecDeque<Chunk>,
    queued: usize,
    /// An unfinished buffer (chunks without `last` yet).
    open_buffer: Option<u64>,
    clock: Option<Clock>,
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
    clock: Option<Clock>,
    source_open: bool,
}

/// A running session with one device.
pub struct Session {
    ch: Channel,
    outbox: VecDeque<Vec<u8>>,
    greeted: bool,
    caps: Capabilities,
    gate: GateState,
    playback: Playback,
    capture: Capture,
    scratch: Vec<u8>,
}

impl Session {
    /// Start a session on a fresh channel; the device speaks first.
    pub fn new(ch: Channel, caps: Capabilities, gate: GateState) -> Result<Self, SessionError> {
        ch.set_nonblocking(true)
            .map_err(|e| SessionError::Io(e.to_string()))?;
        Ok(Session {
            ch,
            outbox: VecDeque::new(),
            greeted: false,
            caps,
            gate,
            playback: Playback::default(),
            capture: Capture::default(),
            scratch: Vec::new(),
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
        let (clock, params) = (pb.clock?, pb.params.as_ref()?);
        // Bytes up to the end of the first complete buffer in the queue.
        let mut bytes = 0u64;
        for c in &pb.queue {
            bytes = bytes.saturating_add((c.data.len().saturating_sub(c.pos)) as u64);
            if c.ends.is_some() {
                return Some(clock.when(bytes, params));
            }
        }
        None
    }

    fn capture_deadline(&self) -> Option<Instant> {
        let cap = &self.capture;
        let (clock, params) = (cap.clock?, cap.params.as_ref()?);
        let first = cap.queue.front()?;
        Some(clock.when(u64::from(first.len), params))
    }

    /// The gate changed: tell the device (it shows the guest its jacks) and
    /// close the host capture source if input went off. Both streams read
    /// the flags at every period, so a flip takes effect within one.
    pub fn set_gate(&mut self, gate: GateState, audio: &mut dyn Audio) -> Result<(), SessionError> {
        self.gate = gate;
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
        if self.outbox.len() >= MAX_OUTBOX {
            return violation("the device does not read its channel");
        }
        self.outbox.push_back(frame);
        Ok(())
    }

    /// The channel is writable: flush queued frames.
    pub fn on_writable(&mut self) -> Result<(), SessionError> {
        while let Some(frame) = self.outbox.front() {
            match self.ch.send_frame(frame) {
                Ok(()) => {
                    self.outbox.pop_front();
                }
                Err(ChannelError::WouldBlock) => break,
                Err(ChannelError::Closed) => return Err(SessionError::Closed),
                Err(e) => return Err(SessionError::Io(e.to_string())),
            }
        }
        Ok(())
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
            DeviceMsg::Playback { buffer, last, data } => {
                self.playback_data(buffer, last, data, now)
            }
            DeviceMsg::Capture { buffer, len } => self.capture_request(buffer, len, now),
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
                self.playback.clock = Some(Clock::new(now));
            }
            (Direction::Output, PcmCommand::Stop) => self.playback.clock = None,
            (Direction::Output, PcmCommand::Release) => {
                let pb = &mut self.playback;
                pb.clock = None;
                pb.queue.clear();
                pb.queued = 0;
                pb.open_buffer = None;
            }
            (Direction::Input, PcmCommand::Start) => {
                self.capture.clock = Some(Clock::new(now));
            }
            (Direction::Input, PcmCommand::Stop) => self.capture.clock = None,
            (Direction::Input, PcmCommand::Release) => {
                self.capture.clock = None;
                self.capture.queue.clear();
                if self.capture.source_open {
                    audio.close_capture();
                    self.capture.source_open = false;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn playback_data(
        &mut self,
        buffer: u64,
        last: bool,
        data: Vec<u8>,
        now: Instant,
    ) -> Result<(), SessionError> {
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
        if let Some(open) = pb.open_buffer {
            if open != buffer {
                return violation("playback buffer interleaved with another");
            }
        }
        pb.queued = pb.queued.saturating_add(data.len());
        if pb.queued > MAX_QUEUED_PLAYBACK_BYTES {
            return violation(format!(
                "more than {MAX_QUEUED_PLAYBACK_BYTES} playback bytes queued"
            ));
        }
        pb.open_buffer = if last { None } else { Some(buffer) };
        if pb.queue.is_empty() {
            restart_if_starved(&mut pb.clock, pb.params.as_ref(), now);
        }
        pb.queue.push_back(Chunk {
            data,
            pos: 0,
            ends: last.then_some(buffer),
        });
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
            restart_if_starved(&mut cap.clock, cap.params.as_ref(), now);
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
        let (Some(mut clock), Some(params)) = (pb.clock, pb.params) else {
            return Ok(());
        };
        let mut budget = clock.due(now, &params);
        let mut done = Vec::new();
        while budget > 0 {
            let Some(chunk) = pb.queue.front_mut() else {
                break;
            };
            let avail = chunk.data.len().saturating_sub(chunk.pos);
            let n = avail.min(usize::try_from(budget).unwrap_or(usize::MAX));
            if let Some(bytes) = chunk.data.get(chunk.pos..chunk.pos + n) {
                if output_on {
                    audio.play(&params, bytes);
                }
            }
            chunk.pos += n;
            budget -= n as u64;
            clock.done = clock.done.saturating_add(n as u64);
            pb.queued = pb.queued.saturating_sub(n);
            if chunk.pos >= chunk.data.len() {
                if let Some(b) = chunk.ends {
                    done.push(b);
                }
                pb.queue.pop_front();
            }
        }
        pb.clock = Some(clock);
        let latency = u32::try_from(pb.queued).unwrap_or(u32::MAX);
        for buffer in done {
            self.send(&BrokerMsg::PlaybackDone {
                buffer,
                latency_bytes: latency,
            })?;
        }
        Ok(())
    }

    fn tick_capture(&mut self, audio: &mut dyn Audio, now: Instant) -> Result<(), SessionError> {
        let input_on = self.gate.input;
        let (Some(mut clock), Some(params)) = (self.capture.clock, self.capture.params) else {
            return Ok(());
        };
        while let Some(req) = self.capture.queue.front() {
            if clock.due(now, &params) < u64::from(req.len) {
                break;
            }
            let (buffer, len) = (req.buffer, req.len as usize);
            self.capture.queue.pop_front();
            clock.done = clock.done.saturating_add(len as u64);
            let mut data = std::mem::take(&mut self.scratch);
            data.clear();
            data.resize(len, 0);
            if input_on {
                if !self.capture.source_open {
                    info!("input on: host capture source opened");
                    self.capture.source_open = true;
                }
                audio.capture(&params, &mut data);
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
        self.capture.clock = Some(clock);
        Ok(())
    }
}

/// A running stream whose queue ran dry has underrun: the time that passed
/// with nothing queued is gone. Restart its clock so that new data is paced
/// from now instead of consumed in a burst.
fn restart_if_starved(clock: &mut Option<Clock>, params: Option<&PcmParams>, now: Instant) {
    if let (Some(c), Some(p)) = (clock.as_ref(), params) {
        if c.due(now, p) > 0 {
            debug!("underrun: restarting the stream clock");
            *clock = Some(Clock::new(now));
        }
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
