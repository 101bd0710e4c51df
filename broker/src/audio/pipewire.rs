//! The PipeWire backend: one stream per running direction. The PipeWire
//! main loop is driven from the broker's own poll loop (its descriptor is
//! polled there), so connecting, creating and destroying streams and every
//! event but one happen in the broker's thread. The exception is the
//! process callback: it runs in PipeWire's data thread (`RT_PROCESS`),
//! which meets the graph's deadline of one quantum (5.3 ms at a 10 ms guest
//! period: the quantum is rounded down to 256 frames) even when the
//! broker's thread is late; from the main loop a late broker made the graph
//! play a quantum of silence. Each ring is shared with the session under a
//! mutex held only to copy bytes, never across anything that blocks.
//!
//! The session's clock still paces the guest. Playback the clock consumed
//! goes into a ring the output stream's process callback drains; the input
//! stream's process callback fills a ring the clock drains one guest period
//! at a time. Each ring is primed with two guest periods before it is used,
//! so the two clocks' jitter never splits the audio with silence; a ring
//! that runs dry is primed again (counted as an underrun), one that
//! overflows drops its oldest bytes down to the priming (counted too).
//!
//! The input stream exists only while input is on and the guest records:
//! no capture node while input is off. If the daemon goes away the guest
//! keeps running (silence, discard) and the broker reconnects with backoff.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::rc::Rc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use pipewire as pw;
use pw::spa;
use pw::spa::pod::Pod;
use vsnd_ipc::{Capabilities, PcmParams, SampleFormat};

/// First reconnect delay after the daemon went away; doubles up to
/// [`MAX_RETRY`].
const MIN_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// Guest periods a ring holds before it is used.
const PRIME_PERIODS: usize = 2;
/// Guest periods a ring holds at most.
const RING_PERIODS: usize = 8;
/// How long a released output stream may take to play what its ring still
/// holds, beyond the ring's own duration, before it is destroyed anyway.
const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// Process cycles that find a draining ring empty before its stream is
/// destroyed: by then the graph has taken the last data buffer.
const DRAIN_EMPTY_PULLS: u32 = 2;
/// How often a draining stream is checked once its data should have been
/// played (its process callbacks run in the data thread and wake nothing).
const DRAIN_POLL: Duration = Duration::from_millis(20);

fn spa_format(f: SampleFormat) -> spa::param::audio::AudioFormat {
    use spa::param::audio::AudioFormat as A;
    match f {
        SampleFormat::U8 => A::U8,
        SampleFormat::S8 => A::S8,
        SampleFormat::S16 => A::S16LE,
        SampleFormat::U16 => A::U16LE,
        SampleFormat::S24Packed => A::S24LE,
        SampleFormat::S24 => A::S24_32LE,
        SampleFormat::S32 => A::S32LE,
        SampleFormat::U32 => A::U32LE,
        SampleFormat::Float => A::F32LE,
        SampleFormat::Float64 => A::F64LE,
    }
}

/// Channel positions matching the channel maps the device offers.
fn positions(channels: u8) -> [u32; spa::sys::SPA_AUDIO_MAX_CHANNELS as usize] {
    use spa::sys::*;
    let mut p = [0u32; SPA_AUDIO_MAX_CHANNELS as usize];
    let layout: &[u32] = match channels {
        1 => &[SPA_AUDIO_CHANNEL_MONO],
        2 => &[SPA_AUDIO_CHANNEL_FL, SPA_AUDIO_CHANNEL_FR],
        4 => &[
            SPA_AUDIO_CHANNEL_FL,
            SPA_AUDIO_CHANNEL_FR,
            SPA_AUDIO_CHANNEL_RL,
            SPA_AUDIO_CHANNEL_RR,
        ],
        6 => &[
            SPA_AUDIO_CHANNEL_FL,
            SPA_AUDIO_CHANNEL_FR,
            SPA_AUDIO_CHANNEL_RL,
            SPA_AUDIO_CHANNEL_RR,
            SPA_AUDIO_CHANNEL_FC,
            SPA_AUDIO_CHANNEL_LFE,
        ],
        8 => &[
            SPA_AUDIO_CHANNEL_FL,
            SPA_AUDIO_CHANNEL_FR,
            SPA_AUDIO_CHANNEL_RL,
            SPA_AUDIO_CHANNEL_RR,
            SPA_AUDIO_CHANNEL_FC,
            SPA_AUDIO_CHANNEL_LFE,
            SPA_AUDIO_CHANNEL_SL,
            SPA_AUDIO_CHANNEL_SR,
        ],
        _ => &[],
    };
    for (i, slot) in p.iter_mut().enumerate().take(usize::from(channels)) {
        *slot = layout
            .get(i)
            .copied()
            .unwrap_or(SPA_AUDIO_CHANNEL_AUX0 + i as u32);
    }
    p
}

/// The ring, whatever a panicking holder left (nothing panics while
/// holding it; a process callback must not panic at all).
fn lock(ring: &Mutex<Ring>) -> MutexGuard<'_, Ring> {
    ring.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A byte ring between the session and a process callback.
struct Ring {
    bytes: VecDeque<u8>,
    cap: usize,
    prime: usize,
    primed: bool,
    silence: SampleFormat,
    underruns: u64,
    dropped: u64,
    /// The guest released the stream: play out what is left, unprimed or
    /// not, and count the cycles that find the ring empty.
    draining: bool,
    empty_pulls: u32,
}

impl Ring {
    fn new(p: &PcmParams) -> Ring {
        let period = p.period_bytes as usize;
        Ring {
            bytes: VecDeque::new(),
            cap: period * RING_PERIODS,
            prime: period * PRIME_PERIODS,
            primed: false,
            silence: p.format,
            underruns: 0,
            dropped: 0,
            draining: false,
            empty_pulls: 0,
        }
    }

    /// Empty and unprimed (the counters stay).
    fn reset(&mut self) {
        self.bytes.clear();
        self.primed = false;
    }

    /// Append `data`. A ring that overflows has fallen a whole ring
    /// behind (a guest that was late, a stalled graph): its oldest bytes go
    /// down to the priming level, so that one glitch is the price, not a
    /// lasting latency of a full ring with a drop at every jitter after it.
    fn push(&mut self, data: &[u8]) {
        self.bytes.extend(data);
        if self.bytes.len() > self.cap {
            let excess = self.bytes.len() - self.prime.min(self.cap);
            self.bytes.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    /// Fill `out` from the ring once it is primed; silence otherwise.
    fn pull(&mut self, out: &mut [u8]) {
        if !self.primed
            && (self.bytes.len() >= self.prime || (self.draining && !self.bytes.is_empty()))
        {
            self.primed = true;
        }
        let mut n = 0;
        if self.primed {
            n = out.len().min(self.bytes.len());
            for (dst, src) in out.iter_mut().zip(self.bytes.drain(..n)) {
                *dst = src;
            }
            if n < out.len() && !self.draining {
                self.underruns += 1;
                self.primed = false;
            }
        }
        if self.draining && n == 0 {
            self.empty_pulls = self.empty_pulls.saturating_add(1);
        }
        if let Some(rest) = out.get_mut(n..) {
            self.silence.fill_silence(rest);
        }
    }
}

/// A stream and its listener. Dropped: disconnected first (no process
/// callback runs in the data thread any more), then the listener goes,
/// then the stream (fields drop in this order).
struct Live {
    _listener: pw::stream::StreamListener<()>,
    stream: pw::stream::StreamRc,
}

impl Drop for Live {
    fn drop(&mut self) {
        let _ = self.stream.disconnect();
    }
}

struct DirState {
    params: PcmParams,
    ring: Arc<Mutex<Ring>>,
    live: Option<Live>,
}

/// A released output stream still playing out its ring.
struct Drain {
    state: DirState,
    /// Destroyed then at the latest.
    deadline: Instant,
    /// When to look whether it has played out.
    check_at: Instant,
}

struct Connection {
    core: pw::core::CoreRc,
    _listener: pw::core::Listener,
}

/// Playback and capture through a PipeWire daemon.
pub struct PipeWireAudio {
    name: String,
    remote: Option<String>,
    mainloop: pw::main_loop::MainLoopRc,
    context: pw::context::ContextRc,
    conn: Option<Connection>,
    failed: Rc<RefCell<Option<String>>>,
    retry_at: Option<Instant>,
    retry_delay: Duration,
    output: Option<DirState>,
    input: Option<DirState>,
    draining: Option<Drain>,
}

impl PipeWireAudio {
    /// Set up the PipeWire loop and connect. A daemon that is not there yet
    /// is not an error: the broker keeps retrying.
    pub fn new(name: &str, remote: Option<&str>) -> Result<Self, String> {
        if let Some(r) = remote {
            // libpipewire (0.3.65 included) takes $PIPEWIRE_REMOTE over the
            // remote.name property: --pipewire-remote must win. Set before
            // PipeWire starts its threads (the broker has none of its own).
            std::env::set_var("PIPEWIRE_REMOTE", r);
        }
        pw::init();
        let mainloop =
            pw::main_loop::MainLoopRc::new(None).map_err(|e| format!("PipeWire main loop: {e}"))?;
        // Enter the loop for good, in this thread. PipeWire hands work from
        // its data thread to this loop with an invoke, and an invoke on a
        // loop that no thread has entered runs right away in the calling
        // thread: with the loop entered only during `iterate` (as
        // `Loop::iterate` does), stream events would run in the data
        // thread, racing the broker's thread. Entered, they are queued and
        // run from `dispatch`. Left in `Drop`.
        // SAFETY: paired with the `leave` in `Drop`, in this same thread
        // (the broker is single-threaded and this value never moves
        // between threads: it is not `Send`).
        unsafe { mainloop.loop_().enter() };
        let context = match pw::context::ContextRc::new(&mainloop, None) {
            Ok(c) => c,
            Err(e) => {
                // SAFETY: paired with the `enter` above, in this thread.
                unsafe { mainloop.loop_().leave() };
                return Err(format!("PipeWire context: {e}"));
            }
        };
        let mut me = PipeWireAudio {
            name: name.to_string(),
            remote: remote.map(str::to_string),
            mainloop,
            context,
            conn: None,
            failed: Rc::new(RefCell::new(None)),
            retry_at: None,
            retry_delay: MIN_RETRY,
            output: None,
            input: None,
            draining: None,
        };
        if let Err(e) = me.connect() {
            warn!("PipeWire: {e}; retrying in the background (the guest hears silence meanwhile)");
            me.schedule_retry(Instant::now());
        }
        Ok(me)
    }

    fn connect(&mut self) -> Result<(), String> {
        let props = self
            .remote
            .as_ref()
            .map(|r| pw::properties::properties! { *pw::keys::REMOTE_NAME => r.as_str() });
        let core = self
            .context
            .connect_rc(props)
            .map_err(|e| format!("cannot connect to the daemon: {e}"))?;
        let failed = self.failed.clone();
        let listener = core
            .add_listener_local()
            .error(move |id, _seq, res, msg| {
                if id == pw::core::PW_ID_CORE {
                    *failed.borrow_mut() = Some(format!("{msg} ({res})"));
                }
            })
            .register();
        *self.failed.borrow_mut() = None;
        self.conn = Some(Connection {
            core,
            _listener: listener,
        });
        info!(
            "PipeWire: connected{}",
            self.remote
                .as_ref()
                .map(|r| format!(" to {r}"))
                .unwrap_or_default()
        );
        self.retry_delay = MIN_RETRY;
        // Streams that should exist come back.
        for out in [true, false] {
            if let Err(e) = self.make_stream(out) {
                warn!("PipeWire: {e}");
            }
        }
        Ok(())
    }

    fn schedule_retry(&mut self, now: Instant) {
        self.retry_at = Some(now + self.retry_delay);
        self.retry_delay = (self.retry_delay * 2).min(MAX_RETRY);
    }

    fn disconnect(&mut self, why: &str, now: Instant) {
        warn!("PipeWire: {why}; the guest hears silence until the daemon is back");
        for d in [self.output.as_mut(), self.input.as_mut()]
            .into_iter()
            .flatten()
        {
            d.live = None;
        }
        self.draining = None;
        self.conn = None;
        self.schedule_retry(now);
    }

    fn dir_mut(&mut self, output: bool) -> &mut Option<DirState> {
        if output {
            &mut self.output
        } else {
            &mut self.input
        }
    }

    /// Create the PipeWire stream for a direction that should have one.
    fn make_stream(&mut self, output: bool) -> Result<(), String> {
        let Some(conn) = self.conn.as_ref() else {
            return Ok(());
        };
        let core = conn.core.clone();
        let name = self.name.clone();
        let Some(state) = self.dir_mut(output).as_mut() else {
            return Ok(());
        };
        if state.live.is_some() {
            return Ok(());
        }
        let p = state.params;
        // A new stream starts from an empty ring, primed afresh: what
        // accumulated while there was none (the daemon was away) is stale.
        lock(&state.ring).reset();
        let frames = p.period_bytes / p.frame_bytes().max(1);
        let (node, description, category, role) = if output {
            (
                format!("vsnd.{name}.output"),
                format!("{name} (VM) playback"),
                "Playback",
                "Music",
            )
        } else {
            (
                format!("vsnd.{name}.input"),
                format!("{name} (VM) microphone"),
                "Capture",
                "Communication",
            )
        };
        let props = pw::properties::properties! {
            *pw::keys::MEDIA_TYPE => "Audio",
            *pw::keys::MEDIA_CATEGORY => category,
            *pw::keys::MEDIA_ROLE => role,
            *pw::keys::MEDIA_CLASS => if output { "Stream/Output/Audio" } else { "Stream/Input/Audio" },
            *pw::keys::NODE_NAME => node.as_str(),
            *pw::keys::NODE_DESCRIPTION => description.as_str(),
            *pw::keys::APP_NAME => "vsnd",
            *pw::keys::NODE_LATENCY => format!("{frames}/{}", p.rate),
        };
        let stream = pw::stream::StreamRc::new(core, &node, props)
            .map_err(|e| format!("cannot create {node}: {e}"))?;
        let ring = state.ring.clone();
        let listener = stream
            .add_local_listener_with_user_data(())
            // Runs in PipeWire's data thread (RT_PROCESS): touches nothing
            // but the buffer and `ring` (locked only to copy), never blocks
            // otherwise, never panics.
            .process(move |stream, _| {
                let Some(mut buffer) = stream.dequeue_buffer() else {
                    return;
                };
                // Frames the graph wants this cycle (0: unknown). Writing the
                // whole buffer instead would hand PipeWire up to its quantum
                // limit at once: the ring would be emptied into one buffer
                // padded with silence, and then overflow while the graph
                // works through it.
                let requested = usize::try_from(buffer.requested()).unwrap_or(usize::MAX);
                let datas = buffer.datas_mut();
                let Some(data) = datas.first_mut() else {
                    return;
                };
                let frame = p.frame_bytes() as usize;
                if output {
                    let want = if requested > 0 {
                        requested.saturating_mul(frame)
                    } else {
                        p.period_bytes as usize
                    };
                    let n = match data.data() {
                        Some(slice) => {
                            let n = slice.len().min(want);
                            let n = n - n % frame.max(1);
                            if let Some(out) = slice.get_mut(..n) {
                                lock(&ring).pull(out);
                            }
                            n
                        }
                        None => 0,
                    };
                    let chunk = data.chunk_mut();
                    *chunk.offset_mut() = 0;
                    *chunk.stride_mut() = frame as i32;
                    *chunk.size_mut() = n as u32;
                } else {
                    let (offset, size) =
                        (data.chunk().offset() as usize, data.chunk().size() as usize);
                    if let Some(slice) = data.data() {
                        if let Some(bytes) = slice.get(offset..offset.saturating_add(size)) {
                            lock(&ring).push(bytes);
                        }
                    }
                }
            })
            .state_changed(move |_, _, old, new| debug!("PipeWire stream: {old:?} -> {new:?}"))
            .register()
            .map_err(|e| format!("cannot listen to {node}: {e}"))?;

        let mut info = spa::param::audio::AudioInfoRaw::new();
        info.set_format(spa_format(p.format));
        info.set_rate(p.rate);
        info.set_channels(u32::from(p.channels));
        info.set_position(positions(p.channels));
        let pod = spa::pod::serialize::PodSerializer::serialize(
            std::io::Cursor::new(Vec::new()),
            &spa::pod::Value::Object(spa::pod::Object {
                type_: spa::sys::SPA_TYPE_OBJECT_Format,
                id: spa::sys::SPA_PARAM_EnumFormat,
                properties: info.into(),
            }),
        )
        .map_err(|e| format!("format for {node}: {e:?}"))?
        .0
        .into_inner();
        let mut params = [Pod::from_bytes(&pod).ok_or("bad format pod")?];
        let dir = if output {
            spa::utils::Direction::Output
        } else {
            spa::utils::Direction::Input
        };
        stream
            .connect(
                dir,
                None,
                pw::stream::StreamFlags::AUTOCONNECT
                    | pw::stream::StreamFlags::MAP_BUFFERS
                    | pw::stream::StreamFlags::RT_PROCESS,
                &mut params,
            )
            .map_err(|e| format!("cannot connect {node}: {e}"))?;
        info!(
            "PipeWire: stream {node} ({:?} {} Hz {} ch, latency {frames}/{})",
            p.format, p.rate, p.channels, p.rate
        );
        state.live = Some(Live {
            _listener: listener,
            stream,
        });
        Ok(())
    }

    fn open_dir(&mut self, output: bool, params: &PcmParams) -> Result<(), String> {
        if let Some(s) = self.dir_mut(output).as_ref() {
            if s.params == *params {
                return Ok(());
            }
        }
        self.close_dir(output);
        if output {
            match self.draining.take() {
                // Released and prepared again with the same parameters (a
                // player going on with its next file): the stream goes on.
                Some(d) if d.state.params == *params && d.state.live.is_some() => {
                    let mut r = lock(&d.state.ring);
                    r.draining = false;
                    r.empty_pulls = 0;
                    if r.bytes.is_empty() {
                        r.primed = false;
                    }
                    drop(r);
                    self.output = Some(d.state);
                    return Ok(());
                }
                Some(d) => Self::destroy(d.state),
                None => {}
            }
        }
        *self.dir_mut(output) = Some(DirState {
            params: *params,
            ring: Arc::new(Mutex::new(Ring::new(params))),
            live: None,
        });
        self.make_stream(output)
    }

    /// Close a direction. A playback stream first plays out what its ring
    /// still holds (the guest was told it was played): it is destroyed
    /// from [`super::Audio::dispatch`] once drained.
    fn close_dir(&mut self, output: bool) {
        let Some(state) = self.dir_mut(output).take() else {
            return;
        };
        let left = lock(&state.ring).bytes.len();
        if output && state.live.is_some() && left > 0 {
            lock(&state.ring).draining = true;
            let p = state.params;
            let bytes_per_sec = u64::from(p.frame_bytes().max(1)) * u64::from(p.rate.max(1));
            let playout = Duration::from_millis(left as u64 * 1000 / bytes_per_sec);
            debug!("PipeWire: draining {left} bytes of playback ({playout:?})");
            if let Some(old) = self.draining.take() {
                Self::destroy(old.state);
            }
            let now = Instant::now();
            self.draining = Some(Drain {
                state,
                deadline: now + playout + DRAIN_GRACE,
                check_at: now + playout,
            });
            return;
        }
        Self::destroy(state);
    }

    fn destroy(state: DirState) {
        let (underruns, dropped, left) = {
            let r = lock(&state.ring);
            (r.underruns, r.dropped, r.bytes.len())
        };
        if underruns > 0 || dropped > 0 || left > 0 {
            info!(
                "PipeWire stream closed: {underruns} underruns, {dropped} bytes dropped, \
                 {left} bytes left over"
            );
        }
        // Dropped (disconnected) only now, with the ring unlocked: the
        // disconnect waits for the data thread, whose process callback may
        // be waiting for the lock.
        drop(state);
    }
}

impl super::Audio for PipeWireAudio {
    fn capabilities(&self) -> Capabilities {
        // PipeWire converts formats, rates and channel counts itself.
        super::raw_capabilities()
    }

    fn open_output(&mut self, params: &PcmParams) -> Result<(), String> {
        self.open_dir(true, params)
    }

    fn play(&mut self, _params: &PcmParams, data: &[u8]) {
        // Without a stream (no daemon) the guest's output is discarded.
        if let Some(s) = self.output.as_ref().filter(|s| s.live.is_some()) {
            lock(&s.ring).push(data);
        }
    }

    fn close_output(&mut self) {
        self.close_dir(true);
    }

    fn open_capture(&mut self, params: &PcmParams) -> Result<(), String> {
        self.open_dir(false, params)
    }

    fn capture(&mut self, params: &PcmParams, buf: &mut [u8]) {
        match self.input.as_ref().filter(|s| s.live.is_some()) {
            Some(s) => lock(&s.ring).pull(buf),
            None => params.format.fill_silence(buf),
        }
    }

    fn close_capture(&mut self) {
        if self.input.is_some() {
            info!("PipeWire: capture stream destroyed");
        }
        self.close_dir(false);
    }

    fn poll_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.mainloop.loop_().fd())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let drain = self.draining.as_ref().map(|d| d.deadline.min(d.check_at));
        match (self.retry_at, drain) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn dispatch(&mut self, now: Instant) {
        // SAFETY: the loop was entered in `new` and is left in `Drop`.
        unsafe {
            self.mainloop
                .loop_()
                .iterate_unguarded(pw::loop_::Timeout::None)
        };
        if let Some(d) = self.draining.as_mut() {
            if now >= d.deadline || lock(&d.state.ring).empty_pulls >= DRAIN_EMPTY_PULLS {
                if let Some(d) = self.draining.take() {
                    Self::destroy(d.state);
                }
            } else if now >= d.check_at {
                d.check_at = now + DRAIN_POLL;
            }
        }
        let failure = self.failed.borrow_mut().take();
        if let Some(why) = failure {
            if self.conn.is_some() {
                self.disconnect(&format!("the daemon connection failed: {why}"), now);
            }
        }
        if self.conn.is_none() && self.retry_at.is_some_and(|t| now >= t) {
            self.retry_at = None;
            if let Err(e) = self.connect() {
                debug!("PipeWire: {e}");
                self.schedule_retry(now);
            }
        }
    }
}

impl Drop for PipeWireAudio {
    fn drop(&mut self) {
        // Streams and the connection go while the loop is still entered.
        let draining = self.draining.take().map(|d| d.state);
        for state in [self.output.take(), self.input.take(), draining]
            .into_iter()
            .flatten()
        {
            Self::destroy(state);
        }
        self.conn = None;
        // SAFETY: paired with the `enter` in `new`, in the same thread.
        unsafe { self.mainloop.loop_().leave() };
    }
}

impl AsFd for PipeWireAudio {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.mainloop.loop_().fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> PcmParams {
        PcmParams {
            format: SampleFormat::S16,
            rate: 48000,
            channels: 2,
            buffer_bytes: 16,
            period_bytes: 4,
        }
    }

    #[test]
    fn ring_primes_then_streams_then_reprimes() {
        let mut r = Ring::new(&params());
        let mut out = [9u8; 4];
        r.push(&[1, 2, 3, 4]);
        r.pull(&mut out);
        assert_eq!(out, [0; 4], "not primed with one period");
        r.push(&[5, 6, 7, 8]);
        r.pull(&mut out);
        assert_eq!(out, [1, 2, 3, 4]);
        let mut big = [9u8; 8];
        r.pull(&mut big);
        assert_eq!(big, [5, 6, 7, 8, 0, 0, 0, 0], "short: padded and counted");
        assert_eq!(r.underruns, 1);
        r.push(&[1; 40]);
        assert_eq!(r.bytes.len(), 8, "over 8 periods: back to the priming");
        assert_eq!(r.dropped, 32);
    }

    #[test]
    fn a_draining_ring_plays_out_even_unprimed_and_counts_empty_cycles() {
        let mut r = Ring::new(&params());
        let mut out = [9u8; 4];
        r.push(&[1, 2]);
        r.draining = true;
        r.pull(&mut out);
        assert_eq!(out, [1, 2, 0, 0], "less than the priming, played anyway");
        assert_eq!((r.underruns, r.empty_pulls), (0, 0));
        r.pull(&mut out);
        r.pull(&mut out);
        assert_eq!(out, [0; 4]);
        assert_eq!((r.underruns, r.empty_pulls), (0, 2));
    }

    #[test]
    fn positions_match_the_channel_maps() {
        use spa::sys::*;
        assert_eq!(positions(1)[0], SPA_AUDIO_CHANNEL_MONO);
        assert_eq!(
            &positions(2)[..2],
            &[SPA_AUDIO_CHANNEL_FL, SPA_AUDIO_CHANNEL_FR]
        );
        assert_eq!(positions(8)[7], SPA_AUDIO_CHANNEL_SR);
        assert_eq!(positions(3)[2], SPA_AUDIO_CHANNEL_AUX0 + 2);
    }
}
