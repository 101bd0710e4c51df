//! vsnd-fake-device: a stand-in for `vsnd-device` that speaks (or breaks)
//! the device⇄broker protocol on purpose, so that tests can watch how the
//! real `vsnd-broker` copes. It is the seed of the rogue-device suite.
//!
//! The broker starts its device with a fixed command line (`--listen-fd 3
//! --ipc-fd 4`, plus sandbox options the fake ignores) and an environment
//! emptied of everything but `RUST_LOG`, so the only thing a test controls
//! is the *program name*: the test symlinks (or copies) this binary as
//! `fake-<mode>` (or `vsnd-fake-device-<mode>`) and passes that path as
//! `--device-path`. The mode is taken from the file name in `argv[0]`:
//!
//! | file name           | behaviour |
//! |---------------------|-----------|
//! | `fake-idle`         | a well-behaved device that never gets a frontend: hello, then wait |
//! | `fake-spy`          | like `idle`, but first appends its pid to `<argv[0]>.started` (the directory must be writable by the device's user), so a test can tell whether the broker started a device at all |
//! | `fake-version[-N]`  | says hello with protocol version `N` (default 999), then waits |
//! | `fake-garbage`      | proper hello exchange, then an undecodable frame, then waits |
//! | `fake-exit-early`   | exits at once with status [`EXIT_EARLY_STATUS`] |
//! | `fake-unmute`       | the rogue that wants the microphone: a seeded random walk through every message the protocol allows, in every order the stream state machine accepts (parameters, prepare, start, stop, release of both directions, capture requests, playback data), counting every capture byte it gets; then, one per incarnation, the messages that are not allowed (a second hello, a hello of another version, the broker's own `Gate` message forged, commands out of order) |
//! | `fake-big-capture`  | capture requests of `MAX_BUFFER_BYTES` (allowed), `MAX_BUFFER_BYTES + 1`, `u32::MAX`, and one more than `MAX_PENDING_CAPTURE` queued, one per incarnation |
//! | `fake-flood`        | after `.go`: playback chunks and capture requests at the highest byte rate, as fast as the socket takes them, never reading, until `.stop` |
//! | `fake-hoard`        | after `.go`: a capture stream at the highest byte rate with the most requests allowed, never reading its answers, until `.stop` |
//! | `fake-listen`       | a well-behaved capture client: S16 stereo 48 kHz, 10 ms requests, two outstanding, each buffer reported (`buf id= t_us= len= nonzero= fnv=`) |
//! | `fake-oversized`    | hello, then a packet one byte over `MAX_FRAME` |
//! | `fake-truncated`    | hello, then a playback frame cut short |
//! | `fake-unknown-variant` | hello, then a frame whose variant index no `DeviceMsg` has |
//! | `fake-huge-length`  | hello, then a playback frame whose length prefix is `u64::MAX` |
//!
//! "Waits" means: blocks until the broker closes the channel (then exits 0)
//! or kills it.
//!
//! The rogue modes (from `unmute` on) keep notes in files next to their
//! program, so the test's directory must be writable by the device's user:
//! `<argv[0]>.report` gets one line per thing worth telling (`key=value`
//! words; also echoed to stderr, except per-buffer lines), `<argv[0]>.step`
//! says which step of a multi-incarnation script runs next (the broker kills
//! and restarts the device after each protocol violation), and the test
//! creates `<argv[0]>.go` and `<argv[0]>.stop` to start and end a flood. Like the real device it asks for SIGKILL when the broker
//! dies, so it never outlives its supervisor. It logs to stderr (which ends
//! up in the broker's log) with a `vsnd-fake-device[<mode>]:` prefix.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io::Write as _;
use std::os::fd::{AsRawFd as _, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use vsnd_ipc::lifecycle::{PcmCommand, Stream};
use vsnd_ipc::{
    codec, BrokerMsg, Capabilities, Channel, ChannelError, DeviceMsg, Direction, GateState,
    PcmParams, SampleFormat, MAGIC, MAX_BUFFER_BYTES, MAX_FRAME, MAX_PCM_CHUNK,
    MAX_PENDING_CAPTURE, PROTOCOL_VERSION,
};
use vsnd_tests::ctl::fnv1a64;

/// Exit status of the `exit-early` mode.
const EXIT_EARLY_STATUS: u8 = 7;

/// Protocol version the `version` mode claims when the name gives none.
const DEFAULT_WRONG_VERSION: u32 = 999;

/// A frame no `DeviceMsg` decodes from: variant index 200 does not exist.
const GARBAGE_FRAME: &[u8] = &[200, 0xff, 0xff, 0xff];

/// Exit status for a bad command line or program name.
const EXIT_USAGE: u8 = 2;

/// What this fake device does, chosen by its program name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Hello, then wait.
    Idle,
    /// Record that it was started, then behave like [`Mode::Idle`].
    Spy,
    /// Hello with this protocol version, then wait.
    Version(u32),
    /// Hello exchange, then one undecodable frame, then wait.
    Garbage,
    /// Exit at once with [`EXIT_EARLY_STATUS`].
    ExitEarly,
    /// Try every allowed message in every allowed order, then the
    /// disallowed ones; count the capture bytes.
    Unmute,
    /// Capture requests past the size and count limits.
    BigCapture,
    /// Playback and capture as fast as possible, never reading.
    Flood,
    /// A capture stream whose answers are never read.
    Hoard,
    /// A polite capture client that reports every buffer.
    Listen,
    /// A packet larger than `MAX_FRAME`.
    Oversized,
    /// A frame cut short.
    Truncated,
    /// A frame with an unknown variant index.
    UnknownVariant,
    /// A frame with a huge length prefix.
    HugeLength,
}

impl Mode {
    /// The mode named by a program file name such as `fake-version-42`.
    fn from_program_name(file_name: &str) -> Result<Mode, String> {
        let name = file_name
            .strip_prefix("vsnd-fake-device-")
            .or_else(|| file_name.strip_prefix("fake-"))
            .ok_or_else(|| format!("program name {file_name:?} does not start with `fake-`"))?;
        match name {
            "idle" => Ok(Mode::Idle),
            "spy" => Ok(Mode::Spy),
            "version" => Ok(Mode::Version(DEFAULT_WRONG_VERSION)),
            "garbage" => Ok(Mode::Garbage),
            "exit-early" => Ok(Mode::ExitEarly),
            "unmute" => Ok(Mode::Unmute),
            "big-capture" => Ok(Mode::BigCapture),
            "flood" => Ok(Mode::Flood),
            "hoard" => Ok(Mode::Hoard),
            "listen" => Ok(Mode::Listen),
            "oversized" => Ok(Mode::Oversized),
            "truncated" => Ok(Mode::Truncated),
            "unknown-variant" => Ok(Mode::UnknownVariant),
            "huge-length" => Ok(Mode::HugeLength),
            other => match other.strip_prefix("version-") {
                Some(v) => v.parse().map(Mode::Version).map_err(|_| {
                    format!("`{v}` in {file_name:?} is not a protocol version number")
                }),
                None => Err(format!("unknown mode `{other}`")),
            },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Idle => "idle",
            Mode::Spy => "spy",
            Mode::Version(_) => "version",
            Mode::Garbage => "garbage",
            Mode::ExitEarly => "exit-early",
            Mode::Unmute => "unmute",
            Mode::BigCapture => "big-capture",
            Mode::Flood => "flood",
            Mode::Hoard => "hoard",
            Mode::Listen => "listen",
            Mode::Oversized => "oversized",
            Mode::Truncated => "truncated",
            Mode::UnknownVariant => "unknown-variant",
            Mode::HugeLength => "huge-length",
        }
    }
}

/// What the fake needs from the command line the broker gives every device.
struct Args {
    program: PathBuf,
    ipc_fd: RawFd,
}

/// Take `argv[0]` and `--ipc-fd N` (default 4). Everything else the broker
/// passes (`--listen-fd 3`, sandbox options, …) is ignored, so the fake keeps
/// working as the real device's command line grows.
fn parse_args(mut argv: impl Iterator<Item = OsString>) -> Result<Args, String> {
    let program = PathBuf::from(argv.next().ok_or("no argv[0]")?);
    let mut ipc_fd = 4;
    while let Some(a) = argv.next() {
        if a == "--ipc-fd" {
            ipc_fd = argv
                .next()
                .and_then(|v| v.to_str().and_then(|s| s.parse().ok()))
                .filter(|v: &RawFd| *v >= 0)
                .ok_or("--ipc-fd needs a file descriptor number")?;
        }
    }
    Ok(Args { program, ipc_fd })
}

const USAGE: &str = "vsnd-fake-device is a test double started by vsnd-broker as \
    `fake-<mode> --listen-fd 3 --ipc-fd 4 ...`; symlink it as fake-idle, fake-spy, \
    fake-version[-N], fake-garbage, fake-exit-early, fake-unmute, fake-big-capture, \
    fake-flood, fake-hoard, fake-listen, fake-oversized, fake-truncated, \
    fake-unknown-variant or fake-huge-length";

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vsnd-fake-device: {e}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let file_name = args
        .program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mode = match Mode::from_program_name(&file_name) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("vsnd-fake-device: {e}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let log = |msg: &str| eprintln!("vsnd-fake-device[{}]: {msg}", mode.name());
    match run(mode, &args, log) {
        Ok(code) => code,
        Err(e) => {
            log(&e);
            ExitCode::FAILURE
        }
    }
}

fn run(mode: Mode, args: &Args, log: impl Fn(&str)) -> Result<ExitCode, String> {
    let mut ch = match mode {
        Mode::ExitEarly => {
            log(&format!("exiting at once with status {EXIT_EARLY_STATUS}"));
            return Ok(ExitCode::from(EXIT_EARLY_STATUS));
        }
        Mode::Spy => {
            record_start(&args.program).map_err(|e| format!("cannot record the start: {e}"))?;
            take_channel(args)?
        }
        Mode::Idle | Mode::Version(_) | Mode::Garbage => take_channel(args)?,
        rogue => {
            let ch = take_channel(args)?;
            let notes = Notes::new(&args.program, rogue.name());
            return rogue::run(rogue, ch, &notes).map(|()| ExitCode::SUCCESS);
        }
    };
    match mode {
        Mode::Version(v) => {
            send(
                &ch,
                &DeviceMsg::Hello {
                    magic: MAGIC,
                    version: v,
                },
            )?;
            log(&format!("claimed protocol version {v}"));
        }
        Mode::Garbage => {
            hello(&mut ch, PROTOCOL_VERSION)?;
            ch.send_frame(GARBAGE_FRAME)
                .map_err(|e| format!("cannot send garbage: {e}"))?;
            log(&format!("sent an undecodable frame {GARBAGE_FRAME:02x?}"));
        }
        _ => hello(&mut ch, PROTOCOL_VERSION)?,
    }
    wait_for_close(&mut ch)?;
    log("the broker closed the channel; exiting");
    Ok(ExitCode::SUCCESS)
}

/// Like the real device: never outlive the broker, then take the channel.
fn take_channel(args: &Args) -> Result<Channel, String> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| format!("cannot set the parent-death signal: {e}"))?;
    // SAFETY: the broker hands us this descriptor open; nothing else in this
    // process refers to it, and it is taken only once.
    let ipc = unsafe { OwnedFd::from_raw_fd(args.ipc_fd) };
    Ok(Channel::new(ipc))
}

fn send(ch: &Channel, msg: &DeviceMsg) -> Result<(), String> {
    ch.send(msg)
        .map_err(|e| format!("cannot send {msg:?}: {e}"))
}

/// Say hello with `version` and read the broker's answer.
fn hello(ch: &mut Channel, version: u32) -> Result<(), String> {
    send(
        ch,
        &DeviceMsg::Hello {
            magic: MAGIC,
            version,
        },
    )?;
    match ch.recv::<BrokerMsg>() {
        Ok(BrokerMsg::Hello { .. }) => Ok(()),
        Ok(other) => Err(format!("expected the broker's hello, got {other:?}")),
        Err(e) => Err(format!("no hello from the broker: {e}")),
    }
}

/// Block, ignoring whatever the broker sends, until it closes the channel.
fn wait_for_close(ch: &mut Channel) -> Result<(), String> {
    loop {
        match ch.recv::<BrokerMsg>() {
            Ok(_) | Err(ChannelError::Codec(_)) => {}
            Err(ChannelError::Closed) => return Ok(()),
            Err(e) => return Err(format!("channel error: {e}")),
        }
    }
}

/// Append this process's pid to `<program>.started`.
fn record_start(program: &Path) -> std::io::Result<()> {
    let mut marker = program.as_os_str().to_owned();
    marker.push(".started");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(marker)?;
    writeln!(f, "{}", std::process::id())
}

/// Where a rogue mode keeps its notes: files next to its program (see the
/// module documentation).
struct Notes {
    base: OsString,
    mode: &'static str,
}

impl Notes {
    fn new(program: &Path, mode: &'static str) -> Self {
        Notes {
            base: program.as_os_str().to_owned(),
            mode,
        }
    }

    fn path(&self, ext: &str) -> PathBuf {
        let mut p = self.base.clone();
        p.push(".");
        p.push(ext);
        PathBuf::from(p)
    }

    /// Append `line` to the report file only.
    fn record(&self, line: &str) {
        let res = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("report"))
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = res {
            eprintln!(
                "vsnd-fake-device[{}]: cannot write the report: {e}",
                self.mode
            );
        }
    }

    /// Append `line` to the report file and say it on stderr.
    fn say(&self, line: &str) {
        eprintln!("vsnd-fake-device[{}]: {line}", self.mode);
        self.record(line);
    }

    /// The step of the script to run now; the next incarnation runs the one
    /// after it (this one may be killed at any moment).
    fn next_step(&self) -> usize {
        let path = self.path("step");
        let n = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if let Err(e) = std::fs::write(&path, format!("{}\n", n + 1)) {
            self.say(&format!("cannot write {}: {e}", path.display()));
        }
        n
    }

    fn exists(&self, ext: &str) -> bool {
        self.path(ext).exists()
    }
}

mod rogue {
    //! The rogue modes: a device that speaks the protocol to get what it
    //! must not have, or to exhaust the broker.

    use super::*;

    /// How long the random walk of `unmute` runs.
    const EXPLORE_TIME: Duration = Duration::from_millis(2500);
    /// Most capture requests `unmute` leaves with the broker (its limit is
    /// [`MAX_PENDING_CAPTURE`]).
    const EXPLORE_MAX_PENDING: usize = 200;
    /// Most playback bytes `unmute` queues between two releases (the
    /// broker's limit is 16 MiB).
    const EXPLORE_MAX_PLAYBACK: usize = 4 << 20;
    /// How long the flood modes run at most without a `.stop`.
    const FLOOD_LIMIT: Duration = Duration::from_secs(20);
    /// Capture requests the flood modes keep with the broker.
    const FLOOD_CAPTURES: usize = MAX_PENDING_CAPTURE - 24;

    /// Every capture byte a rogue received, by kind: zero, 0x80 (silence of
    /// the unsigned formats) and anything else (what a loud microphone
    /// sends).
    #[derive(Default)]
    struct Tally {
        chunks: u64,
        bytes: u64,
        zero: u64,
        x80: u64,
        other: u64,
        buffers: u64,
        gates: u64,
        input_on_seen: bool,
        hellos: u64,
    }

    impl Tally {
        fn capture(&mut self, data: &[u8]) {
            self.chunks += 1;
            self.bytes += data.len() as u64;
            for &b in data {
                match b {
                    0 => self.zero += 1,
                    0x80 => self.x80 += 1,
                    _ => self.other += 1,
                }
            }
        }

        fn line(&self, what: &str) -> String {
            format!(
                "{what} chunks={} bytes={} zero={} x80={} other={} buffers={} \
                 gates={} input_on_seen={} hellos={}",
                self.chunks,
                self.bytes,
                self.zero,
                self.x80,
                self.other,
                self.buffers,
                self.gates,
                self.input_on_seen,
                self.hellos
            )
        }

        /// Count one message from the broker; for a capture chunk that ends
        /// its buffer, return the buffer id.
        fn message(&mut self, msg: BrokerMsg) -> Option<u64> {
            match msg {
                BrokerMsg::CaptureData { buffer, last, data } => {
                    self.capture(&data);
                    if last {
                        self.buffers += 1;
                        return Some(buffer);
                    }
                }
                BrokerMsg::Gate(g) => {
                    self.gates += 1;
                    self.input_on_seen |= g.input;
                }
                BrokerMsg::Hello { .. } => self.hellos += 1,
            }
            None
        }
    }

    /// xorshift64: a reproducible walk.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n.max(1)
        }

        fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
            items.get(self.below(items.len() as u64) as usize).copied()
        }
    }

    pub(super) fn run(mode: Mode, mut ch: Channel, notes: &Notes) -> Result<(), String> {
        let caps = greet(&mut ch)?;
        match mode {
            Mode::Unmute => unmute(&mut ch, &caps, notes),
            Mode::BigCapture => big_capture(&mut ch, &caps, notes),
            Mode::Flood => flood(&mut ch, &caps, notes, true),
            Mode::Hoard => flood(&mut ch, &caps, notes, false),
            Mode::Listen => listen(&mut ch, notes),
            Mode::Oversized => {
                let frame = vec![0u8; MAX_FRAME + 1];
                raw(&ch, &frame, notes, "a packet one byte over MAX_FRAME")?;
                idle(&mut ch, notes)
            }
            Mode::Truncated => {
                let frame = codec::encode(&DeviceMsg::Playback { data: vec![7; 100] })
                    .map_err(|e| e.to_string())?;
                let cut = frame.get(..frame.len() - 10).unwrap_or(&[]);
                raw(
                    &ch,
                    cut,
                    notes,
                    "a playback frame without its last 10 bytes",
                )?;
                idle(&mut ch, notes)
            }
            Mode::UnknownVariant => {
                // DeviceMsg has variants 0..=7.
                raw(&ch, &[8, 1, 1], notes, "a frame of variant 8")?;
                idle(&mut ch, notes)
            }
            Mode::HugeLength => {
                // Playback { buffer: 0, last: false, data: <len u64::MAX> }.
                let mut frame = vec![6u8, 0, 0, 253];
                frame.extend_from_slice(&u64::MAX.to_le_bytes());
                raw(&ch, &frame, notes, "a playback frame of length u64::MAX")?;
                idle(&mut ch, notes)
            }
            _ => Err(format!("{} is not a rogue mode", mode.name())),
        }
    }

    /// The hello exchange; the broker's capabilities.
    fn greet(ch: &mut Channel) -> Result<Capabilities, String> {
        send(
            ch,
            &DeviceMsg::Hello {
                magic: MAGIC,
                version: PROTOCOL_VERSION,
            },
        )?;
        match ch.recv::<BrokerMsg>() {
            Ok(BrokerMsg::Hello { caps, .. }) => Ok(caps),
            Ok(other) => Err(format!("expected the broker's hello, got {other:?}")),
            Err(e) => Err(format!("no hello from the broker: {e}")),
        }
    }

    fn raw(ch: &Channel, frame: &[u8], notes: &Notes, what: &str) -> Result<(), String> {
        notes.say(&format!("sending {what} ({} bytes)", frame.len()));
        nix::sys::socket::send(
            ch.as_raw_fd(),
            frame,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        )
        .map_err(|e| format!("cannot send {what}: {e}"))?;
        Ok(())
    }

    /// Read (and count) until the broker closes the channel or kills us.
    fn idle(ch: &mut Channel, notes: &Notes) -> Result<(), String> {
        let _ = ch.set_nonblocking(false);
        let mut tally = Tally::default();
        loop {
            match ch.recv::<BrokerMsg>() {
                Ok(m) => {
                    if let BrokerMsg::Gate(g) = m {
                        notes.say(&format!("gate output={} input={}", g.output, g.input));
                    }
                    tally.message(m);
                }
                Err(ChannelError::Codec(_)) => {}
                Err(ChannelError::Closed) => {
                    notes.say(&tally.line("closed"));
                    return Ok(());
                }
                Err(e) => return Err(format!("channel error: {e}")),
            }
        }
    }

    /// Read whatever is waiting, without blocking.
    fn drain(
        ch: &mut Channel,
        tally: &mut Tally,
        pending: &mut HashSet<u64>,
    ) -> Result<(), String> {
        loop {
            match ch.try_recv::<BrokerMsg>() {
                Ok(m) => {
                    if let Some(done) = tally.message(m) {
                        pending.remove(&done);
                    }
                }
                Err(ChannelError::WouldBlock) => return Ok(()),
                Err(ChannelError::Closed) => return Err("the broker closed the channel".into()),
                Err(e) => return Err(format!("channel error: {e}")),
            }
        }
    }

    /// Parameters the broker accepts, with periods of 2 to 20 ms.
    fn random_params(rng: &mut Rng, caps: &Capabilities) -> PcmParams {
        let format = rng.pick(&caps.formats).unwrap_or(SampleFormat::S16);
        let rate = rng.pick(&caps.rates).unwrap_or(48_000);
        let span = u64::from(caps.channels_max.saturating_sub(caps.channels_min)) + 1;
        let channels = caps.channels_min.max(1) + rng.below(span) as u8;
        let frame = format.bytes() * u32::from(channels);
        let frames = (u64::from(rate) * (2 + rng.below(19)) / 1000).max(1) as u32;
        let period_bytes = (frame * frames).min(MAX_BUFFER_BYTES);
        PcmParams {
            format,
            rate,
            channels,
            buffer_bytes: period_bytes * (1 + rng.below(4) as u32),
            period_bytes,
        }
    }

    /// The highest byte rate the broker offers.
    fn loudest(caps: &Capabilities, period_bytes: u32) -> PcmParams {
        PcmParams {
            format: SampleFormat::Float64,
            rate: caps.rates.iter().copied().max().unwrap_or(48_000),
            channels: caps.channels_max,
            buffer_bytes: period_bytes,
            period_bytes,
        }
    }

    fn start_stream(ch: &Channel, direction: Direction, params: PcmParams) -> Result<(), String> {
        send(ch, &DeviceMsg::SetParams { direction, params })?;
        send(ch, &DeviceMsg::Prepare { direction })?;
        send(ch, &DeviceMsg::Start { direction })
    }

    fn index(d: Direction) -> usize {
        match d {
            Direction::Output => 0,
            Direction::Input => 1,
        }
    }

    fn unmute(ch: &mut Channel, caps: &Capabilities, notes: &Notes) -> Result<(), String> {
        let step = notes.next_step();
        let violation = |ch: &Channel, name: &str, msg: &DeviceMsg| -> Result<(), String> {
            notes.say(&format!("step={name} sending {msg:?}"));
            send(ch, msg)
        };
        match step {
            0 => {
                explore(ch, caps, notes)?;
                // The broker's answer to each of these is to kill us; the
                // next incarnation goes on with the next step.
                violation(
                    ch,
                    "second-hello",
                    &DeviceMsg::Hello {
                        magic: MAGIC,
                        version: PROTOCOL_VERSION,
                    },
                )?;
            }
            1 => violation(
                ch,
                "hello-other-version",
                &DeviceMsg::Hello {
                    magic: MAGIC,
                    version: PROTOCOL_VERSION + 1,
                },
            )?,
            2 => {
                // The broker's own "the flags changed" message, as if the
                // device could say it.
                let forged = codec::encode(&BrokerMsg::Gate(GateState {
                    output: true,
                    input: true,
                }))
                .map_err(|e| e.to_string())?;
                notes.say("step=forged-gate");
                raw(ch, &forged, notes, "the broker's Gate{input: true} message")?;
            }
            3 => violation(
                ch,
                "start-before-params",
                &DeviceMsg::Start {
                    direction: Direction::Input,
                },
            )?,
            4 => {
                send(
                    ch,
                    &DeviceMsg::SetParams {
                        direction: Direction::Input,
                        params: loudest(caps, 1920),
                    },
                )?;
                violation(
                    ch,
                    "capture-before-prepare",
                    &DeviceMsg::Capture {
                        buffer: 0,
                        len: 1920,
                    },
                )?;
            }
            _ => {
                notes.say("finished");
                return idle(ch, notes);
            }
        }
        idle(ch, notes)
    }

    /// A seeded random walk through every allowed message in every order
    /// the stream state machine allows; reports what came back.
    fn explore(ch: &mut Channel, caps: &Capabilities, notes: &Notes) -> Result<(), String> {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut tally = Tally::default();
        let mut streams = [Stream::default(), Stream::default()];
        let mut params: [Option<PcmParams>; 2] = [None, None];
        let mut pending = HashSet::new();
        let mut playback_queued = 0usize;
        let mut next_id = 0u64;
        let mut sent = [0u64; 8];
        let deadline = Instant::now() + EXPLORE_TIME;
        while Instant::now() < deadline {
            drain(ch, &mut tally, &mut pending)?;
            let d = if rng.below(2) == 0 {
                Direction::Output
            } else {
                Direction::Input
            };
            let i = index(d);
            let Some(stream) = streams.get_mut(i) else {
                break;
            };
            let action = rng.below(10);
            let command = match action {
                0 => Some(PcmCommand::SetParams),
                1 => Some(PcmCommand::Prepare),
                2 => Some(PcmCommand::Start),
                3 => Some(PcmCommand::Stop),
                4 => Some(PcmCommand::Release),
                _ => None,
            };
            if let Some(c) = command {
                if stream.next_state(c).is_err() {
                    continue; // not allowed now: the broker would kill us
                }
                let msg = match c {
                    PcmCommand::SetParams => {
                        let p = random_params(&mut rng, caps);
                        params[i] = Some(p);
                        let _ = stream.set_params(p);
                        DeviceMsg::SetParams {
                            direction: d,
                            params: p,
                        }
                    }
                    PcmCommand::Prepare => DeviceMsg::Prepare { direction: d },
                    PcmCommand::Start => DeviceMsg::Start { direction: d },
                    PcmCommand::Stop => DeviceMsg::Stop { direction: d },
                    PcmCommand::Release => DeviceMsg::Release { direction: d },
                };
                if c != PcmCommand::SetParams {
                    let _ = stream.apply(c);
                }
                if c == PcmCommand::Release {
                    match d {
                        Direction::Input => pending.clear(),
                        Direction::Output => playback_queued = 0,
                    }
                }
                sent[action as usize] += 1;
                send(ch, &msg)?;
                continue;
            }
            if action >= 8 {
                // Let the clocks run a little.
                std::thread::sleep(Duration::from_millis(rng.below(8)));
                continue;
            }
            if !stream.accepts_transfers() {
                continue;
            }
            let Some(p) = params[i] else { continue };
            match d {
                Direction::Input => {
                    if pending.len() >= EXPLORE_MAX_PENDING {
                        continue;
                    }
                    // 0 bytes, odd sizes, a frame, a period, and bigger than
                    // one chunk when the rate allows it in 50 ms.
                    let most = (p.bytes_per_second() / 20).clamp(1, u64::from(MAX_BUFFER_BYTES));
                    let len = match rng.below(5) {
                        0 => 0,
                        1 => 1 + rng.below(7) as u32,
                        2 => p.frame_bytes(),
                        3 => p.period_bytes,
                        _ => 1 + rng.below(most) as u32,
                    }
                    .min(most as u32);
                    let buffer = next_id;
                    next_id += 1;
                    pending.insert(buffer);
                    sent[5] += 1;
                    send(ch, &DeviceMsg::Capture { buffer, len })?;
                }
                Direction::Output => {
                    if playback_queued >= EXPLORE_MAX_PLAYBACK {
                        continue;
                    }
                    // One to three chunks of consumed playback.
                    let chunks = 1 + rng.below(3);
                    for _ in 0..chunks {
                        let len = match rng.below(3) {
                            0 => 0,
                            1 => rng.below(4096) as usize,
                            _ => MAX_PCM_CHUNK,
                        };
                        playback_queued += len;
                        sent[6] += 1;
                        send(
                            ch,
                            &DeviceMsg::Playback {
                                data: vec![0x42; len],
                            },
                        )?;
                    }
                }
            }
        }
        notes.say(&format!(
            "explore sent set_params={} prepare={} start={} stop={} release={} capture={} playback={}",
            sent[0], sent[1], sent[2], sent[3], sent[4], sent[5], sent[6]
        ));
        // End with a capture stream that certainly runs: requests of 10 ms
        // of S16 stereo at 48 kHz.
        let input = &mut streams[1];
        if input.next_state(PcmCommand::Stop).is_ok() {
            send(
                ch,
                &DeviceMsg::Stop {
                    direction: Direction::Input,
                },
            )?;
            let _ = input.apply(PcmCommand::Stop);
        }
        if input.next_state(PcmCommand::Release).is_ok() {
            send(
                ch,
                &DeviceMsg::Release {
                    direction: Direction::Input,
                },
            )?;
        }
        let s16 = PcmParams {
            format: SampleFormat::S16,
            rate: 48_000,
            channels: 2,
            buffer_bytes: 7680,
            period_bytes: 1920,
        };
        start_stream(ch, Direction::Input, s16)?;
        pending.clear();
        for _ in 0..20 {
            let buffer = next_id;
            next_id += 1;
            pending.insert(buffer);
            send(ch, &DeviceMsg::Capture { buffer, len: 1920 })?;
        }
        let until = Instant::now() + Duration::from_secs(2);
        while !pending.is_empty() && Instant::now() < until {
            drain(ch, &mut tally, &mut pending)?;
            std::thread::sleep(Duration::from_millis(2));
        }
        notes.say(&tally.line("capture"));
        Ok(())
    }

    fn big_capture(ch: &mut Channel, caps: &Capabilities, notes: &Notes) -> Result<(), String> {
        let step = notes.next_step();
        let loud = loudest(caps, MAX_BUFFER_BYTES);
        match step {
            0 => {
                start_stream(ch, Direction::Input, loud)?;
                let t0 = Instant::now();
                send(
                    ch,
                    &DeviceMsg::Capture {
                        buffer: 0,
                        len: MAX_BUFFER_BYTES,
                    },
                )?;
                let mut tally = Tally::default();
                loop {
                    match ch.recv::<BrokerMsg>() {
                        Ok(m) => {
                            if tally.message(m) == Some(0) {
                                break;
                            }
                        }
                        Err(e) => return Err(format!("waiting for the largest capture: {e}")),
                    }
                }
                notes.say(&tally.line(&format!("largest-capture ms={}", t0.elapsed().as_millis())));
                notes.say("step=len-max-plus-one");
                send(
                    ch,
                    &DeviceMsg::Capture {
                        buffer: 1,
                        len: MAX_BUFFER_BYTES + 1,
                    },
                )?;
            }
            1 => {
                start_stream(ch, Direction::Input, loud)?;
                notes.say("step=len-u32-max");
                send(
                    ch,
                    &DeviceMsg::Capture {
                        buffer: 0,
                        len: u32::MAX,
                    },
                )?;
            }
            2 => {
                // Prepared, not started: nothing is answered, all stay queued.
                send(
                    ch,
                    &DeviceMsg::SetParams {
                        direction: Direction::Input,
                        params: loud,
                    },
                )?;
                send(
                    ch,
                    &DeviceMsg::Prepare {
                        direction: Direction::Input,
                    },
                )?;
                for buffer in 0..MAX_PENDING_CAPTURE as u64 {
                    send(ch, &DeviceMsg::Capture { buffer, len: 64 })?;
                }
                notes.say(&format!("step=one-more-than-{MAX_PENDING_CAPTURE}-pending"));
                send(
                    ch,
                    &DeviceMsg::Capture {
                        buffer: MAX_PENDING_CAPTURE as u64,
                        len: 64,
                    },
                )?;
            }
            _ => notes.say("finished"),
        }
        idle(ch, notes)
    }

    /// `flood`: playback and capture; `hoard` (`playback == false`): capture
    /// only. Neither reads a single answer.
    fn flood(
        ch: &mut Channel,
        caps: &Capabilities,
        notes: &Notes,
        playback: bool,
    ) -> Result<(), String> {
        while !notes.exists("go") {
            if notes.exists("stop") {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if notes.exists("stop") {
            notes.say("not flooding: .stop exists");
            return idle(ch, notes);
        }
        if playback {
            start_stream(ch, Direction::Output, loudest(caps, MAX_PCM_CHUNK as u32))?;
        }
        start_stream(ch, Direction::Input, loudest(caps, MAX_BUFFER_BYTES))?;
        ch.set_nonblocking(true).map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let (mut captures, mut chunks, mut spins) = (0usize, 0u64, 0u64);
        let chunk = vec![0x42u8; MAX_PCM_CHUNK];
        let mut n = 0u64;
        let end = loop {
            n += 1;
            if n.is_multiple_of(256) && (notes.exists("stop") || t0.elapsed() > FLOOD_LIMIT) {
                break "stopped";
            }
            let msg = if captures < FLOOD_CAPTURES {
                DeviceMsg::Capture {
                    buffer: captures as u64,
                    len: MAX_BUFFER_BYTES,
                }
            } else if playback {
                DeviceMsg::Playback {
                    data: chunk.clone(),
                }
            } else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            match ch.send(&msg) {
                Ok(()) => match msg {
                    DeviceMsg::Capture { .. } => captures += 1,
                    _ => chunks += 1,
                },
                Err(ChannelError::WouldBlock) => {
                    spins += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(ChannelError::Closed) => break "closed",
                Err(e) => {
                    break if e.to_string().contains("Broken pipe") {
                        "closed"
                    } else {
                        "error"
                    }
                }
            }
        };
        notes.say(&format!(
            "flood {end} after_ms={} captures={captures} playback_chunks={chunks} full_socket={spins}",
            t0.elapsed().as_millis()
        ));
        if end == "closed" {
            return Ok(());
        }
        idle(ch, notes)
    }

    /// A polite capture client: 10 ms requests, two outstanding, each
    /// buffer reported.
    fn listen(ch: &mut Channel, notes: &Notes) -> Result<(), String> {
        const LEN: u32 = 1920;
        start_stream(
            ch,
            Direction::Input,
            PcmParams {
                format: SampleFormat::S16,
                rate: 48_000,
                channels: 2,
                buffer_bytes: 4 * LEN,
                period_bytes: LEN,
            },
        )?;
        let t0 = Instant::now();
        for buffer in 0..2 {
            send(ch, &DeviceMsg::Capture { buffer, len: LEN })?;
        }
        let mut next = 2u64;
        let mut data = Vec::new();
        let mut nonzero_buffers = 0u64;
        loop {
            match ch.recv::<BrokerMsg>() {
                Ok(BrokerMsg::CaptureData {
                    buffer,
                    last,
                    data: d,
                }) => {
                    data.extend_from_slice(&d);
                    if !last {
                        continue;
                    }
                    let nonzero = data.iter().filter(|&&b| b != 0).count();
                    if nonzero > 0 {
                        nonzero_buffers += 1;
                    }
                    notes.record(&format!(
                        "buf id={buffer} t_us={} len={} nonzero={nonzero} fnv=0x{:016x}",
                        t0.elapsed().as_micros(),
                        data.len(),
                        fnv1a64(&data)
                    ));
                    if buffer.is_multiple_of(100) {
                        eprintln!(
                            "vsnd-fake-device[listen]: {} buffers, {nonzero_buffers} of them not silent",
                            buffer + 1
                        );
                    }
                    data.clear();
                    send(
                        ch,
                        &DeviceMsg::Capture {
                            buffer: next,
                            len: LEN,
                        },
                    )?;
                    next += 1;
                }
                Ok(BrokerMsg::Gate(g)) => {
                    notes.say(&format!("gate output={} input={}", g.output, g.input));
                }
                Ok(_) => {}
                Err(ChannelError::Closed) => return Ok(()),
                Err(e) => return Err(format!("channel error: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_come_from_the_program_name() {
        assert_eq!(Mode::from_program_name("fake-idle"), Ok(Mode::Idle));
        assert_eq!(Mode::from_program_name("fake-spy"), Ok(Mode::Spy));
        assert_eq!(
            Mode::from_program_name("fake-version"),
            Ok(Mode::Version(DEFAULT_WRONG_VERSION))
        );
        assert_eq!(
            Mode::from_program_name("fake-version-42"),
            Ok(Mode::Version(42))
        );
        assert_eq!(
            Mode::from_program_name("vsnd-fake-device-garbage"),
            Ok(Mode::Garbage)
        );
        assert_eq!(
            Mode::from_program_name("fake-exit-early"),
            Ok(Mode::ExitEarly)
        );
        for (name, mode) in [
            ("fake-unmute", Mode::Unmute),
            ("fake-big-capture", Mode::BigCapture),
            ("fake-flood", Mode::Flood),
            ("fake-hoard", Mode::Hoard),
            ("fake-listen", Mode::Listen),
            ("fake-oversized", Mode::Oversized),
            ("fake-truncated", Mode::Truncated),
            ("fake-unknown-variant", Mode::UnknownVariant),
            ("fake-huge-length", Mode::HugeLength),
        ] {
            assert_eq!(Mode::from_program_name(name), Ok(mode));
            assert_eq!(format!("fake-{}", mode.name()), name);
        }
        assert!(Mode::from_program_name("vsnd-fake-device").is_err());
        assert!(Mode::from_program_name("fake-version-x").is_err());
        assert!(Mode::from_program_name("vsnd-device").is_err());
    }
}
