//! The broker's PipeWire backend (`--backend pipewire`) against a real
//! PipeWire daemon, as a guest (the test frontend) and a desktop's mixer
//! (`pw-dump`, the sink's monitor) see it.
//!
//! Every test starts its own private, headless daemon with its session
//! manager (`vsnd_tests::pipewire`, `tests/pipewire/`: a 48 kHz null sink
//! recorded from its monitor, and a source fed through a loopback) and a
//! real `vsnd-broker` + `vsnd-device` with the daemon's environment and
//! `--backend pipewire --name <test>`. The graph runs at 48 kHz in F32 and
//! nothing touches volumes or adds dither, so S16 48 kHz data comes out
//! bit-exact; the tests search for what was played or fed (the recorders
//! start before it, so it always comes after some silence) and report where
//! it was found.
//!
//! While a test waits for something in the graph (`pw-dump` polled in a
//! helper thread) the guest's streams keep running: the frontend is serviced
//! all the time, so the completion times the tests measure are the broker's.
//!
//! Build the binaries first (`cargo build --workspace --bins`). Needs
//! `pipewire`, `pipewire-bin` and `wireplumber` (`scripts/setup`).

use std::time::{Duration, Instant};

use vsnd_tests::fixture::{
    self, add_rx, add_tx, query_all, setup_stream, tx_status, Backend, Broker, BrokerOptions,
    PcmConfig,
};
use vsnd_tests::frontend::{Frontend, FrontendOptions, Used};
use vsnd_tests::pipewire::{self, Dump, Node, PcmFormat, PipeWire};
use vsnd_tests::snd::{self, PcmInfo, PcmStatus};

const OUT: u32 = 0;
const IN: u32 = 1;

/// Generous bound for anything that should happen "at once".
const PROMPT: Duration = Duration::from_secs(2);
/// How long a node may take to appear in (or go from) the graph.
const GRAPH: Duration = Duration::from_secs(5);
/// Periods a running stream keeps queued (TX) or requested (RX).
const IN_FLIGHT: usize = 8;
/// A flip of the input flag takes effect from the next period the broker
/// generates; those it generated before may still come back.
const STALE_BUFFERS: usize = IN_FLIGHT + 1;
/// One second of S16 48 kHz stereo.
const SECOND: usize = 48_000 * 4;
/// The guest's period in the tests that compare bytes: 40 ms, 1920 frames,
/// so that the graph's quantum is 1024 frames (PipeWire's default; the
/// quantum is the period rounded down to a power of two). The node tests
/// use 10 ms and 5 ms periods too.
const PERIOD_MS: u32 = 40;
/// Slack for the tests' own scheduling in the longest gap between two
/// playback completions that still counts as the real-time pace (the
/// nominal gap is one period).
const GAP_SLACK: Duration = Duration::from_millis(60);

/// Broker log line of a PipeWire stream that had trouble (see
/// broker/src/audio/pipewire.rs): "PipeWire stream closed: N underruns, ...".
const CLOSED_LOG: &str = "PipeWire stream closed:";

// ---------------------------------------------------------------------------
// The broker and the graph
// ---------------------------------------------------------------------------

/// The tests run one at a time. Every client's data thread (the broker's,
/// pw-record's, pw-play's; none is real-time here: no rtkit) must run
/// within one quantum of each graph cycle, or the graph plays a quantum of
/// silence (or a recorder loses one). Two tests at once on a 2-core CI
/// machine, each with a daemon, a session manager, a broker and recorders,
/// missed that now and then at a 10 ms period (256-frame quantum); one at a
/// time at [`PERIOD_MS`], with one core kept busy besides, 10 runs of all
/// of them passed.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A broker with the PipeWire backend, the daemon's environment (and
/// nothing else of the test's, but PATH), a control socket, and
/// `--initial-streams initial`.
fn pw_broker(pw: &PipeWire, name: &str, initial: &str, extra: &[&str]) -> Broker {
    let mut env = pw.env();
    if let Some(path) = std::env::var_os("PATH") {
        env.push(("PATH".into(), path.to_string_lossy().into_owned()));
    }
    let mut args: Vec<String> = vec![
        "--backend".into(),
        "pipewire".into(),
        "--name".into(),
        name.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Broker::start_with(
        &format!("pw-{name}"),
        BrokerOptions {
            initial_streams: initial.into(),
            control_socket: true,
            backend: Some(Backend {
                args,
                files: Vec::new(),
                env: Some(env),
            }),
            ..BrokerOptions::default()
        },
    )
}

fn output_node(name: &str) -> String {
    format!("vsnd.{name}.output")
}

fn input_node(name: &str) -> String {
    format!("vsnd.{name}.input")
}

/// The node `name` of `pw-dump`'s raw JSON (for its `params`, which the
/// fixture's [`Node`] leaves out).
fn raw_node(pw: &PipeWire, name: &str) -> serde_json::Value {
    let json = pw.tool("pw-dump", &[]);
    let all: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("pw-dump printed no JSON ({e}):\n{json}"));
    all.as_array()
        .into_iter()
        .flatten()
        .find(|o| o.pointer("/info/props/node.name").and_then(|v| v.as_str()) == Some(name))
        .cloned()
        .unwrap_or_else(|| panic!("no node {name} in pw-dump:\n{json}"))
}

/// The negotiated `Format` param of node `name`: (format, rate, channels,
/// positions).
fn node_format(pw: &PipeWire, name: &str) -> (String, u64, u64, Vec<String>) {
    let node = raw_node(pw, name);
    let f = node
        .pointer("/info/params/Format/0")
        .unwrap_or_else(|| panic!("node {name} has no Format param: {node:#}"));
    let s = |k: &str| f.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
    let n = |k: &str| f.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let pos = f
        .get("position")
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .map(|p| p.as_str().unwrap_or("?").to_owned())
                .collect()
        })
        .unwrap_or_default();
    (s("format"), n("rate"), n("channels"), pos)
}

fn node_of(dump: &Dump, name: &str) -> Node {
    dump.node(name)
        .cloned()
        .unwrap_or_else(|| panic!("no node {name}"))
}

/// Lines of `log` containing `needle`.
fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

/// The broker's timestamp of a log line (`[2026-...T10:25:34.559Z ...`), in
/// milliseconds of the day.
fn log_ms(line: &str) -> Option<u64> {
    let t = line.split('T').nth(1)?.get(..12)?;
    let mut parts = t.split([':', '.']);
    let mut next = || parts.next()?.parse::<u64>().ok();
    let (h, m, s, ms) = (next()?, next()?, next()?, next()?);
    Some(((h * 60 + m) * 60 + s) * 1000 + ms)
}

// ---------------------------------------------------------------------------
// The guest's streams
// ---------------------------------------------------------------------------

/// A playback stream (stream 0) playing `data` period by period, keeping
/// [`IN_FLIGHT`] periods queued.
struct Player {
    cfg: PcmConfig,
    data: Vec<u8>,
    sent: usize,
    done: Vec<Instant>,
    started: Option<Instant>,
}

impl Player {
    /// SET_PARAMS, PREPARE, and the first periods queued (not started).
    fn prepare(fe: &mut Frontend, cfg: PcmConfig, data: Vec<u8>) -> Self {
        assert_eq!(data.len() % cfg.period_bytes as usize, 0, "whole periods");
        setup_stream(fe, OUT, &cfg);
        let mut p = Player {
            cfg,
            data,
            sent: 0,
            done: Vec::new(),
            started: None,
        };
        for _ in 0..IN_FLIGHT {
            p.submit(fe);
        }
        fe.kick(snd::QUEUE_TX).unwrap();
        p
    }

    fn submit(&mut self, fe: &mut Frontend) {
        let period = self.cfg.period_bytes as usize;
        if let Some(chunk) = self.data.get(self.sent..self.sent + period) {
            let chunk = chunk.to_vec();
            add_tx(fe, OUT, &chunk);
            self.sent += period;
        }
    }

    fn start(&mut self, fe: &mut Frontend) {
        fixture::start(fe, OUT);
        self.started = Some(Instant::now());
    }

    fn period(&self) -> usize {
        self.cfg.period_bytes as usize
    }

    fn periods(&self) -> usize {
        self.data.len() / self.period()
    }

    fn finished(&self) -> bool {
        self.done.len() >= self.periods()
    }

    fn on_used(&mut self, fe: &mut Frontend, u: &Used) {
        let i = self.done.len();
        let st = tx_status(u, &format!("playback period {i}"));
        assert_eq!(
            st.status,
            snd::S_OK,
            "playback period {i}: expected S_OK, got {}",
            snd::status_name(st.status)
        );
        self.done.push(Instant::now());
        self.submit(fe);
        fe.kick(snd::QUEUE_TX).unwrap();
    }

    /// The longest time between two completions, from the `from`th on.
    fn max_gap(&self, from: usize) -> Duration {
        self.done
            .get(from..)
            .unwrap_or_default()
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default()
    }

    /// Time from START to the last completion, and the nominal duration of
    /// what completed.
    fn pace(&self) -> (Duration, Duration) {
        let took = match (self.started, self.done.last()) {
            (Some(s), Some(&l)) => l - s,
            _ => Duration::ZERO,
        };
        (took, self.cfg.period() * self.done.len() as u32)
    }

    /// Completed at the real-time pace: no gap between two completions
    /// over one period + [`GAP_SLACK`] (or two periods: a stall the guest
    /// would notice), and the whole no faster than 95 % nor slower than
    /// 110 % (+ 200 ms) of nominal.
    fn assert_paced(&self, what: &str, broker: &Broker) {
        let (took, nominal) = self.pace();
        let gap = self.max_gap(0);
        let max_gap = (self.cfg.period() + GAP_SLACK).max(self.cfg.period() * 2);
        assert!(
            took >= nominal * 95 / 100 && took <= nominal * 110 / 100 + Duration::from_millis(200),
            "{what}: {} periods should complete in about {nominal:?} (the real-time pace), \
             they took {took:?}; log:\n{}",
            self.done.len(),
            broker.log_tail()
        );
        assert!(
            gap <= max_gap,
            "{what}: the longest gap between two completions was {gap:?}, expected at most \
             {max_gap:?} ({:?} periods, no stall); log:\n{}",
            self.cfg.period(),
            broker.log_tail()
        );
    }
}

/// A capture stream (stream 1) kept running: each RX buffer that comes
/// back is replaced.
struct Capture {
    cfg: PcmConfig,
    data: Vec<u8>,
    /// Per buffer: whether it was all zeros.
    silent: Vec<bool>,
}

impl Capture {
    fn start(fe: &mut Frontend, cfg: PcmConfig) -> Self {
        setup_stream(fe, IN, &cfg);
        fixture::start(fe, IN);
        for _ in 0..IN_FLIGHT {
            add_rx(fe, IN, cfg.period_bytes);
        }
        fe.kick(snd::QUEUE_RX).unwrap();
        Capture {
            cfg,
            data: Vec::new(),
            silent: Vec::new(),
        }
    }

    fn on_used(&mut self, fe: &mut Frontend, u: &Used) {
        let (data, st) = PcmStatus::split_rx(&u.writable_bytes)
            .unwrap_or_else(|e| panic!("capture buffer: {e} (used.len {})", u.len));
        assert_eq!(
            (st.status, data.len()),
            (snd::S_OK, self.cfg.period_bytes as usize),
            "expected a full capture buffer with S_OK, got {} with {} bytes",
            snd::status_name(st.status),
            data.len()
        );
        self.silent.push(data.iter().all(|&b| b == 0));
        self.data.extend_from_slice(data);
        add_rx(fe, IN, self.cfg.period_bytes);
        fe.kick(snd::QUEUE_RX).unwrap();
    }
}

/// The guest's running streams, serviced whenever the test waits.
#[derive(Default)]
struct Guest {
    player: Option<Player>,
    capture: Option<Capture>,
}

impl Guest {
    /// Take back every used TX/RX buffer (and queue new ones); true if any.
    fn service(&mut self, fe: &mut Frontend) -> bool {
        let mut any = false;
        if let Some(p) = self.player.as_mut() {
            while let Some(u) = fe.poll_used(snd::QUEUE_TX).unwrap() {
                p.on_used(fe, &u);
                any = true;
            }
        }
        if let Some(c) = self.capture.as_mut() {
            while let Some(u) = fe.poll_used(snd::QUEUE_RX).unwrap() {
                c.on_used(fe, &u);
                any = true;
            }
        }
        any
    }

    /// Service the streams while `busy()`, at most `timeout`.
    fn pump_while(
        &mut self,
        fe: &mut Frontend,
        timeout: Duration,
        mut busy: impl FnMut(&Guest) -> bool,
    ) {
        let deadline = Instant::now() + timeout;
        while busy(self) {
            assert!(Instant::now() < deadline, "still waiting after {timeout:?}");
            if !self.service(fe) {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        self.service(fe);
    }

    /// Service the streams for `d`.
    fn pump(&mut self, fe: &mut Frontend, d: Duration) {
        let end = Instant::now() + d;
        self.pump_while(fe, d + PROMPT, |_| Instant::now() < end);
    }

    /// Run `f` in a helper thread (e.g. `pw-dump` polling, a daemon restart)
    /// while the streams are serviced here; its result.
    fn during<T: Send>(&mut self, fe: &mut Frontend, f: impl FnOnce() -> T + Send) -> T {
        std::thread::scope(|s| {
            let h = s.spawn(f);
            self.pump_while(fe, Duration::from_secs(60), |_| !h.is_finished());
            match h.join() {
                Ok(v) => v,
                Err(e) => std::panic::resume_unwind(e),
            }
        })
    }

    /// Service the streams until the player has played everything.
    fn finish_playing(&mut self, fe: &mut Frontend) {
        let left = self
            .player
            .as_ref()
            .map(|p| p.cfg.period() * (p.periods() - p.done.len()) as u32)
            .unwrap_or_default();
        self.pump_while(fe, left * 2 + PROMPT, |g| {
            !g.player.as_ref().is_none_or(Player::finished)
        });
    }

    fn player(&self) -> &Player {
        self.player.as_ref().expect("no player")
    }

    fn capture(&self) -> &Capture {
        self.capture.as_ref().expect("no capture")
    }
}

// ---------------------------------------------------------------------------
// Searching
// ---------------------------------------------------------------------------

/// How `want` appears in `got`: where it starts, how many of its bytes
/// follow contiguously, and what comes where it stops matching.
fn describe_match(got: &[u8], want: &[u8]) -> String {
    let probe = want.len().min(64);
    let Some(at) = pipewire::find_bytes(got, &want[..probe]) else {
        return format!(
            "its first {probe} bytes are nowhere in the {} recorded bytes ({} of them non-zero)",
            got.len(),
            got.iter().filter(|&&b| b != 0).count()
        );
    };
    let n = got[at..]
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(want.len().min(got.len() - at));
    let after = &got[at + n..];
    let zeros = after.iter().take_while(|&&b| b == 0).count();
    let resumes = want
        .get(n..n + probe.min(want.len() - n))
        .and_then(|rest| pipewire::find_bytes(after, rest));
    format!(
        "it starts at byte {at} of the recording, {n} of its {} bytes follow contiguously; then \
         {zeros} zero bytes, and the rest of it resumes {}",
        want.len(),
        match resumes {
            Some(r) => format!("{r} bytes later (silence or stale data inserted)"),
            None => "nowhere (bytes lost)".into(),
        }
    )
}

/// Where `want` is in `got`, bit-exact and contiguous; panics with a
/// description of what is there instead.
fn find_exact(what: &str, got: &[u8], want: &[u8], log: &dyn Fn() -> String) -> usize {
    match pipewire::find_bytes(got, want) {
        Some(at) => at,
        None => panic!(
            "{what}: the {} bytes are not in the recording bit-exact and contiguous: {}\n{}",
            want.len(),
            describe_match(got, want),
            log()
        ),
    }
}

fn ms(bytes: usize) -> f64 {
    bytes as f64 * 1000.0 / SECOND as f64
}

/// A sine (`freq` Hz, amplitude `amp` of full scale) in `format` at `rate`,
/// stereo, `frames` long.
fn sine(format: u8, rate: u32, frames: usize, freq: f64, amp: f64) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..frames {
        let x = amp * (2.0 * std::f64::consts::PI * freq * i as f64 / f64::from(rate)).sin();
        for _ in 0..2 {
            match format {
                snd::PCM_FMT_S32 => {
                    out.extend_from_slice(&((x * f64::from(i32::MAX)) as i32).to_le_bytes())
                }
                snd::PCM_FMT_FLOAT => out.extend_from_slice(&(x as f32).to_le_bytes()),
                snd::PCM_FMT_S16 => {
                    out.extend_from_slice(&((x * f64::from(i16::MAX)) as i16).to_le_bytes())
                }
                other => panic!("sine: format {other} not supported here"),
            }
        }
    }
    out
}

/// S16 stereo samples of `pcm`.
fn samples(pcm: &[u8]) -> impl Iterator<Item = i16> + '_ {
    pcm.chunks_exact(2)
        .map(|b| i16::from_le_bytes([b[0], b[1]]))
}

// ---------------------------------------------------------------------------
// Playback
// ---------------------------------------------------------------------------

/// 2 s of pseudo-random S16 48 kHz stereo in 40 ms periods, released at
/// once after its last period completed: all of it is in the sink's monitor,
/// bit-exact and contiguous (nothing dropped, repeated or inserted, the end
/// included: the stream plays out its ring before it goes), at the
/// real-time pace, with no underrun.
#[test]
fn playback_is_bit_exact_in_the_sink_monitor() {
    let _serial = serial();
    let pw = PipeWire::start();
    let name = "play";
    let broker = pw_broker(&pw, name, "output", &[]);
    let mut fe = broker.connect(FrontendOptions::default());
    let cfg = PcmConfig::s16_stereo_48k(PERIOD_MS);
    let data = fixture::pcm_pattern(0x5107, 2 * SECOND);
    let rec = pw.start_recording(pipewire::SINK, true, PcmFormat::S16_48K_STEREO);
    let mut g = Guest {
        player: Some(Player::prepare(&mut fe, cfg, data.clone())),
        ..Guest::default()
    };
    g.player.as_mut().unwrap().start(&mut fe);
    let lib = assert_libpipewire_loaded(&broker);
    g.finish_playing(&mut fe);
    g.player().assert_paced("2 s of playback", &broker);
    fixture::stop(&mut fe, OUT);
    fixture::release(&mut fe, OUT);
    let node = output_node(name);
    pw.wait_for("the output node to go after RELEASE", GRAPH, |d| {
        d.node(&node).is_none()
    });
    let got = rec.stop();
    let at = find_exact(
        "2 s played by the guest, in the sink's monitor",
        &got,
        &data,
        &|| broker.log_tail(),
    );
    let (_, quiet) = pipewire::find_pcm(&got, &data, 0).unwrap_or((at, false));
    let log = broker.log();
    assert!(
        lines_with(&log, CLOSED_LOG).is_empty(),
        "expected no underrun, drop or unplayed byte, the broker logged:\n{}",
        lines_with(&log, CLOSED_LOG).join("\n")
    );
    assert!(
        quiet,
        "expected only silence around the guest's data in the monitor recording"
    );
    let (took, nominal) = g.player().pace();
    println!(
        "playback through {lib}: {} bytes bit-exact and contiguous at byte {at} of {} \
         recorded ({:.1} ms of leading silence), silence only around it; {} periods in \
         {took:?} (nominal {nominal:?}), longest gap {:?}; 0 underruns",
        data.len(),
        got.len(),
        ms(at),
        g.player().done.len(),
        g.player().max_gap(0)
    );
}

/// Environment variable naming the directory the broker's libpipewire must
/// come from (set by `tests/pipewire/with-backports.sh`), so that a run meant
/// for another PipeWire version fails instead of quietly testing the
/// installed one.
const EXPECT_LIBDIR_ENV: &str = "VSND_PW_EXPECT_LIBDIR";

/// The libpipewire the running broker has mapped (from `/proc/PID/maps`),
/// checked against [`EXPECT_LIBDIR_ENV`] when that is set.
fn assert_libpipewire_loaded(broker: &Broker) -> String {
    let pid = broker.pid().expect("the broker is running");
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/maps: {e}"));
    let lib = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/libpipewire-0.3.so"))
        .unwrap_or_else(|| panic!("the broker (pid {pid}) has no libpipewire-0.3.so mapped"))
        .to_string();
    if let Some(dir) = std::env::var_os(EXPECT_LIBDIR_ENV) {
        let dir = std::path::PathBuf::from(dir);
        let real = std::fs::canonicalize(&lib).unwrap_or_else(|_| lib.clone().into());
        assert!(
            real.starts_with(&dir),
            "{EXPECT_LIBDIR_ENV}={} but the broker loaded {lib} ({})",
            dir.display(),
            real.display()
        );
    }
    lib
}

/// While the guest plays, `pw-dump` shows its stream as a mixer would:
/// named after `--name`, a playback stream with a role, the guest's period
/// as its latency, the guest's format with its channel positions (stereo
/// and 5.1), linked to the default sink; gone after RELEASE. When the
/// device dies without releasing, the node goes too.
#[test]
fn the_output_node_carries_name_class_role_latency_and_positions() {
    let _serial = serial();
    let pw = PipeWire::start();
    let name = "props";
    let broker = pw_broker(&pw, name, "output", &[]);
    let mut fe = broker.connect(FrontendOptions::default());
    let node = output_node(name);

    type Case = (u8, u32, &'static [&'static str]);
    let cases: [Case; 2] = [
        (2, 480, &["FL", "FR"]),
        (6, 240, &["FL", "FR", "RL", "RR", "FC", "LFE"]),
    ];
    for (channels, frames, positions) in cases {
        let frame = 2 * u32::from(channels);
        let cfg = PcmConfig {
            channels,
            period_bytes: frames * frame,
            buffer_bytes: 4 * frames * frame,
            ..PcmConfig::s16_stereo_48k(10)
        };
        let what = format!("{channels} channels, {frames}-frame periods");
        let data = fixture::pcm_pattern(u64::from(channels), cfg.period_bytes as usize * 150);
        let mut g = Guest {
            player: Some(Player::prepare(&mut fe, cfg, data)),
            ..Guest::default()
        };
        g.player.as_mut().unwrap().start(&mut fe);
        let n = node.clone();
        let dump = g.during(&mut fe, || {
            pw.wait_for(&format!("{n} running and linked to the sink"), GRAPH, |d| {
                d.node(&n).and_then(|x| x.state.as_deref()) == Some("running")
                    && d.linked(&n, pipewire::SINK)
            })
        });
        let (format, rate, ch, pos) = g.during(&mut fe, || node_format(&pw, &node));
        let x = node_of(&dump, &node);
        let p = |k: &str| x.prop(k).unwrap_or("").to_owned();
        assert_eq!(p("node.name"), node, "{what}: node.name");
        assert!(
            p("node.description").contains(name),
            "{what}: node.description should name the VM ({name}), got {:?}",
            p("node.description")
        );
        assert_eq!(
            p("media.class"),
            pipewire::PLAYBACK_STREAM_CLASS,
            "{what}: media.class"
        );
        assert!(!p("media.role").is_empty(), "{what}: media.role is not set");
        assert_eq!(
            p("node.latency"),
            format!("{frames}/48000"),
            "{what}: node.latency should be the guest's period"
        );
        assert_eq!(
            (format.as_str(), rate, ch),
            ("S16LE", 48_000, u64::from(channels)),
            "{what}: the negotiated format"
        );
        assert_eq!(pos, positions, "{what}: channel positions of the format");
        println!(
            "{what}: node {node} (id {}) \"{}\" {} role {} latency {} format {format} {rate} Hz \
             {ch} ch [{}], {}",
            x.id,
            p("node.description"),
            p("media.class"),
            p("media.role"),
            p("node.latency"),
            pos.join(","),
            x.state.as_deref().unwrap_or("?")
        );
        g.finish_playing(&mut fe);
        fixture::stop(&mut fe, OUT);
        fixture::release(&mut fe, OUT);
        pw.wait_for("the output node to go after RELEASE", GRAPH, |d| {
            d.node(&node).is_none()
        });
    }

    // A device that dies mid-stream releases nothing: its stream must go
    // anyway (the broker starts a fresh device for the next VM).
    let cfg = PcmConfig::s16_stereo_48k(10);
    let mut g = Guest {
        player: Some(Player::prepare(
            &mut fe,
            cfg,
            fixture::pcm_pattern(9, 300 * cfg.period_bytes as usize),
        )),
        ..Guest::default()
    };
    g.player.as_mut().unwrap().start(&mut fe);
    g.pump(&mut fe, Duration::from_millis(300));
    pw.wait_for("the output node", GRAPH, |d| d.node(&node).is_some());
    let pid = broker.device_pid(PROMPT);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill the device");
    pw.wait_for(
        "the output node to go once its device was killed",
        GRAPH,
        |d| d.node(&node).is_none(),
    );
    drop(fe);
}

/// The guest asks for formats and rates the graph does not run at (S32 and
/// FLOAT at 44.1 kHz): PCM_INFO offers every format and rate vsnd carries
/// (PipeWire converts), SET_PARAMS takes them, the stream is negotiated in
/// the guest's format, and the sine the guest plays comes out of the sink
/// at the amplitude it was played at.
#[test]
fn other_formats_and_rates_are_converted_by_pipewire() {
    let _serial = serial();
    let pw = PipeWire::start();
    let name = "formats";
    let broker = pw_broker(&pw, name, "output", &[]);
    let mut fe = broker.connect(FrontendOptions::default());
    let every_format = snd::VSND_FORMATS.iter().fold(0u64, |m, f| m | 1 << f);
    let every_rate = (snd::PCM_RATE_8000..=snd::PCM_RATE_192000).fold(0u64, |m, r| m | 1 << r);
    for (id, b) in query_all(&mut fe, snd::R_PCM_INFO, 2, snd::PCM_INFO_SIZE)
        .iter()
        .enumerate()
    {
        let info = PcmInfo::parse(b).unwrap_or_else(|e| panic!("PCM_INFO item: {e}"));
        assert_eq!(
            (
                info.formats,
                info.rates,
                info.channels_min,
                info.channels_max
            ),
            (every_format, every_rate, 1, 8),
            "stream {id}: PCM_INFO should offer every format and rate vsnd carries, 1-8 \
             channels; got {info:?}"
        );
    }
    let node = output_node(name);
    for (format, fname, pw_name, bytes) in [
        (snd::PCM_FMT_S32, "S32", "S32LE", 4u32),
        (snd::PCM_FMT_FLOAT, "FLOAT", "F32LE", 4),
    ] {
        let frames = 441; // 10 ms at 44.1 kHz
        let cfg = PcmConfig {
            channels: 2,
            format,
            rate: snd::PCM_RATE_44100,
            period_bytes: frames * 2 * bytes,
            buffer_bytes: 4 * frames * 2 * bytes,
        };
        let data = sine(format, 44_100, frames as usize * 100, 1000.0, 0.5);
        let rec = pw.start_recording(pipewire::SINK, true, PcmFormat::S16_48K_STEREO);
        let mut g = Guest {
            player: Some(Player::prepare(&mut fe, cfg, data)),
            ..Guest::default()
        };
        g.player.as_mut().unwrap().start(&mut fe);
        g.pump(&mut fe, Duration::from_millis(300));
        let (f, rate, ch, _) = g.during(&mut fe, || node_format(&pw, &node));
        assert_eq!(
            (f.as_str(), rate, ch),
            (pw_name, 44_100, 2),
            "{fname}: the stream should be negotiated in the guest's format and rate"
        );
        g.finish_playing(&mut fe);
        g.player()
            .assert_paced(&format!("{fname} 44.1 kHz"), &broker);
        fixture::stop(&mut fe, OUT);
        fixture::release(&mut fe, OUT);
        pw.wait_for("the output node to go after RELEASE", GRAPH, |d| {
            d.node(&node).is_none()
        });
        let got = rec.stop();
        let peak = samples(&got).map(|s| s.unsigned_abs()).max().unwrap_or(0);
        let loud = got
            .chunks_exact(4)
            .filter(|f| samples(f).any(|s| s.unsigned_abs() > 1000))
            .count();
        // 1 s of a 1 kHz sine at half scale: |x| > 1000 for ~96 % of frames.
        assert!(
            (15_000..=18_000).contains(&peak) && loud >= 48_000 * 85 / 100,
            "{fname} 44.1 kHz: expected the sine at half scale (peak ~16384) for about a \
             second in the monitor (48 kHz S16), got peak {peak} and {loud} loud frames of {}",
            got.len() / 4
        );
        println!(
            "{fname} 44.1 kHz stereo: negotiated {f} {rate} Hz; in the monitor peak {peak} \
             (half scale 16384), {loud} loud frames ({:.0} ms)",
            loud as f64 / 48.0
        );
    }
}

// ---------------------------------------------------------------------------
// Capture
// ---------------------------------------------------------------------------

/// Input on from the start: the capture stream appears when the guest
/// records (named and classed like the output one), and the signal fed
/// into the source comes out of the guest's recording bit-exact.
#[test]
fn capture_records_the_source_bit_exact() {
    let _serial = serial();
    let pw = PipeWire::start();
    let name = "capture";
    let broker = pw_broker(&pw, name, "output,input", &[]);
    let mut fe = broker.connect(FrontendOptions::default());
    let node = input_node(name);
    assert!(
        pw.capture_streams().is_empty(),
        "no capture stream may exist before the guest records"
    );
    let cfg = PcmConfig::s16_stereo_48k(PERIOD_MS);
    let mut g = Guest {
        capture: Some(Capture::start(&mut fe, cfg)),
        ..Guest::default()
    };
    let n = node.clone();
    let dump = g.during(&mut fe, || {
        pw.wait_for(&format!("{n} linked to the source"), GRAPH, |d| {
            d.linked(pipewire::SOURCE, &n)
        })
    });
    let x = node_of(&dump, &node);
    let p = |k: &str| x.prop(k).unwrap_or("").to_owned();
    assert!(
        p("node.description").contains(name)
            && p("media.class") == pipewire::CAPTURE_STREAM_CLASS
            && !p("media.role").is_empty()
            && p("node.latency") == format!("{}/48000", PERIOD_MS * 48),
        "the capture node's properties: {:?}",
        x.props
    );
    let (format, rate, ch, pos) = g.during(&mut fe, || node_format(&pw, &node));
    assert_eq!(
        (format.as_str(), rate, ch, pos.join(",")),
        ("S16LE", 48_000, 2, "FL,FR".to_owned()),
        "the capture stream's format"
    );
    let signal = fixture::pcm_pattern(0xFEED, SECOND);
    let before = g.capture().data.len();
    g.during(&mut fe, || pw.feed_source(&signal));
    g.pump(&mut fe, Duration::from_millis(300));
    let got = g.capture().data[before..].to_vec();
    let at = find_exact(
        "the signal fed into the source, in what the guest recorded",
        &got,
        &signal,
        &|| broker.log_tail(),
    );
    println!(
        "capture: node {node} \"{}\" {} role {} latency {} {format} {rate} Hz {ch} ch; \
         {} bytes fed into the source found bit-exact and contiguous at byte {at} of the {} \
         recorded after the link ({:.1} ms in)",
        p("node.description"),
        p("media.class"),
        p("media.role"),
        p("node.latency"),
        signal.len(),
        got.len(),
        ms(at)
    );
}

/// Input off: the guest records exact zeros and the graph has no capture
/// stream of the broker at all, while the guest records and the source
/// plays. `SET input on`: the capture node appears and the source's signal
/// reaches the guest bit-exact. `SET input off`: the node goes, zeros again.
#[test]
fn no_capture_node_while_input_is_off() {
    let _serial = serial();
    let pw = PipeWire::start();
    let name = "gate";
    let broker = pw_broker(&pw, name, "output", &[]);
    let mut fe = broker.connect(FrontendOptions::default());
    let node = input_node(name);
    let cfg = PcmConfig::s16_stereo_48k(PERIOD_MS);
    let mut g = Guest {
        capture: Some(Capture::start(&mut fe, cfg)),
        ..Guest::default()
    };

    // Off, with the source playing.
    let loud = fixture::pcm_pattern(0x0FF, SECOND);
    let feeder = pw.start_feeding_source(&loud);
    let mut checks = 0;
    for _ in 0..5 {
        g.pump(&mut fe, Duration::from_millis(100));
        let streams = g.during(&mut fe, || pw.capture_streams());
        assert!(
            streams.is_empty(),
            "input off: expected no capture stream in the graph while the guest records, got \
             {:?}",
            streams.iter().map(|n| &n.name).collect::<Vec<_>>()
        );
        checks += 1;
    }
    feeder.stop();
    let off = g.capture().silent.len();
    assert!(
        off >= 10 && g.capture().silent.iter().all(|&s| s),
        "input off: expected at least 10 buffers (0.5 s), all exact zeros; got {off}, {} of \
         them not silent",
        g.capture().silent.iter().filter(|&&s| !s).count()
    );

    // On: the node appears, linked to the source, and the signal flows.
    assert_eq!(broker.control("SET input on"), "OK output=on input=on");
    let t0 = Instant::now();
    let n = node.clone();
    g.during(&mut fe, || {
        pw.wait_for(&format!("{n} after SET input on"), GRAPH, |d| {
            d.linked(pipewire::SOURCE, &n)
        })
    });
    let appeared = t0.elapsed();
    let signal = fixture::pcm_pattern(0x51C, SECOND);
    let before = g.capture().data.len();
    g.during(&mut fe, || pw.feed_source(&signal));
    g.pump(&mut fe, Duration::from_millis(300));
    let got = g.capture().data[before..].to_vec();
    let at = find_exact(
        "the source's signal after SET input on",
        &got,
        &signal,
        &|| broker.log_tail(),
    );

    // Off again: the node goes, zeros within a few buffers.
    assert_eq!(broker.control("SET input off"), "OK output=on input=off");
    let t1 = Instant::now();
    let n = node.clone();
    g.during(&mut fe, || {
        pw.wait_for(&format!("{n} gone after SET input off"), GRAPH, |d| {
            d.node(&n).is_none() && d.capture_streams().is_empty()
        })
    });
    let gone = t1.elapsed();
    let mark = g.capture().silent.len();
    g.pump(&mut fe, cfg.period() * (STALE_BUFFERS as u32 + 5));
    let after = &g.capture().silent[mark..];
    assert!(
        after.len() > STALE_BUFFERS && after.iter().skip(STALE_BUFFERS).all(|&s| s),
        "after SET input off: expected exact zeros (after at most {STALE_BUFFERS} stale \
         buffers), got {after:?}"
    );
    assert!(
        !lines_with(&broker.log(), "capture stream destroyed").is_empty(),
        "expected the broker to log that it destroyed the capture stream"
    );
    println!(
        "input off: {off} buffers of exact zeros, no capture node in {checks} pw-dumps while \
         the source played; SET input on: node linked after {appeared:?}, {} bytes bit-exact \
         at byte {at}; SET input off: node gone after {gone:?}",
        signal.len()
    );
}

// ---------------------------------------------------------------------------
// The daemon going away
// ---------------------------------------------------------------------------

/// Seconds of the broker log between the first line containing `a` and the
/// first line after it containing `b`.
fn log_interval(log: &str, a: &str, b: &str) -> Option<u64> {
    let lines: Vec<&str> = log.lines().collect();
    let i = lines.iter().position(|l| l.contains(a))?;
    let j = lines[i..].iter().position(|l| l.contains(b))? + i;
    Some(log_ms(lines[j])?.saturating_sub(log_ms(lines[i])?))
}

/// Record the sink's monitor while the guest plays 1.2 s more, and find
/// what it played meanwhile in the recording, bit-exact: audio reaches the
/// sink. From the periods completed when the recorder was linked (those
/// before may have been played before it) to those completed 200 ms and
/// two rings' priming before it stopped (those after may still be on
/// their way). Returns (bytes matched, offset).
fn audio_reaches_the_sink(
    pw: &PipeWire,
    g: &mut Guest,
    fe: &mut Frontend,
    broker: &Broker,
    what: &str,
) -> (usize, usize) {
    let rec = g.during(fe, || {
        pw.start_recording(pipewire::SINK, true, PcmFormat::S16_48K_STEREO)
    });
    let first = g.player().done.len();
    let period = g.player().period();
    g.pump(fe, Duration::from_millis(1200));
    let margin = 4 + (SECOND / 5).div_ceil(period);
    let last = g.player().done.len().saturating_sub(margin);
    let got = g.during(fe, || rec.stop());
    assert!(
        last.saturating_sub(first) * period >= SECOND / 2,
        "{what}: expected to have played 0.5 s while recording, got {} periods",
        last.saturating_sub(first)
    );
    let want = &g.player().data[first * period..last * period];
    let at = find_exact(what, &got, want, &|| broker.log_tail());
    (want.len(), at)
}

/// The daemon is killed (SIGKILL) and started again while the guest plays:
/// the guest's buffers keep completing at the real-time pace throughout,
/// the broker logs the loss and reconnects by itself, the output node is
/// back, and what the guest plays reaches the sink bit-exact again.
#[test]
fn the_daemon_restarting_mid_stream_does_not_disturb_the_guest() {
    let _serial = serial();
    let pw = PipeWire::start();
    let name = "restart";
    let broker = pw_broker(&pw, name, "output", &[]);
    let mut fe = broker.connect(FrontendOptions::default());
    let node = output_node(name);
    let cfg = PcmConfig::s16_stereo_48k(PERIOD_MS);
    let data = fixture::pcm_pattern(0x2E57, 6 * SECOND);
    let mut g = Guest {
        player: Some(Player::prepare(&mut fe, cfg, data)),
        ..Guest::default()
    };
    g.player.as_mut().unwrap().start(&mut fe);
    let n = node.clone();
    g.during(&mut fe, || {
        pw.wait_for("the output node linked", GRAPH, |d| {
            d.linked(&n, pipewire::SINK)
        })
    });
    let (matched0, _) = audio_reaches_the_sink(&pw, &mut g, &mut fe, &broker, "before the restart");

    let restarted_at = g.player().done.len();
    let down = g.during(&mut fe, || pw.restart_daemon());
    let n = node.clone();
    let back = g.during(&mut fe, || {
        let t = Instant::now();
        pw.wait_for("the output node back after the restart", GRAPH, |d| {
            d.linked(&n, pipewire::SINK)
        });
        t.elapsed()
    });
    let (matched1, at1) =
        audio_reaches_the_sink(&pw, &mut g, &mut fe, &broker, "after the restart");
    g.finish_playing(&mut fe);
    g.player()
        .assert_paced("6 s of playback across the restart", &broker);
    let gap_around = g.player().max_gap(restarted_at.saturating_sub(1));
    fixture::stop(&mut fe, OUT);
    fixture::release(&mut fe, OUT);

    let log = broker.log();
    let lost = lines_with(&log, "the daemon connection failed");
    assert_eq!(
        lost.len(),
        1,
        "expected the broker to log the daemon's loss once, it logged:\n{}",
        lost.join("\n")
    );
    assert_eq!(
        lines_with(&log, "PipeWire: connected").len(),
        2,
        "expected the broker to connect twice (start, after the restart); log:\n{}",
        broker.log_tail()
    );
    let reconnect = log_interval(&log, "the daemon connection failed", "PipeWire: connected");
    let closed = lines_with(&log, CLOSED_LOG);
    println!(
        "restart: daemon down and ready again in {down:?}; broker reconnected {reconnect:?} ms \
         after it logged the loss; output node linked again {back:?} after the daemon was \
         ready; longest completion gap around the restart {gap_around:?} (whole run: {:?}); \
         {matched0} bytes bit-exact before, {matched1} bytes bit-exact after (at byte {at1}); \
         {}",
        g.player().max_gap(0),
        if closed.is_empty() {
            "no underrun".to_owned()
        } else {
            closed.join(" / ")
        }
    );
}

/// No daemon: with `--pipewire-remote nonexistent` (a socket that is not
/// there) the broker serves the guest (paced silence for its playback),
/// says it keeps retrying, and does retry. With the daemon stopped and
/// started later on the broker's socket, the broker connects by itself, its
/// output node appears and the guest's playback reaches the sink.
#[test]
fn without_a_daemon_the_guest_is_served_and_the_broker_connects_later() {
    let _serial = serial();
    let pw = PipeWire::start();
    let cfg = PcmConfig::s16_stereo_48k(PERIOD_MS);

    // A remote that never exists.
    let name = "nodaemon";
    let broker = pw_broker(
        &pw,
        name,
        "output,input",
        &["--pipewire-remote", "nonexistent"],
    );
    let mut fe = broker.connect(FrontendOptions::default());
    let mut g = Guest {
        player: Some(Player::prepare(
            &mut fe,
            cfg,
            fixture::pcm_pattern(0x0D, 2 * SECOND),
        )),
        capture: Some(Capture::start(&mut fe, cfg)),
    };
    g.player.as_mut().unwrap().start(&mut fe);
    g.finish_playing(&mut fe);
    g.player()
        .assert_paced("2 s of playback without a daemon", &broker);
    let recorded = g.capture().silent.len();
    let want = 2000 * 8 / 10 / PERIOD_MS as usize;
    assert!(
        recorded >= want && g.capture().silent.iter().all(|&s| s),
        "without a daemon the guest records silence at the real-time pace: expected >= {want} \
         silent buffers in 2 s, got {recorded}, {} not silent",
        g.capture().silent.iter().filter(|&&s| !s).count()
    );
    let log = broker.log();
    let retrying = lines_with(&log, "retrying in the background");
    let attempts = lines_with(&log, "cannot connect to the daemon");
    assert!(
        !retrying.is_empty() && attempts.len() >= 3,
        "expected the broker to say it retries and to retry (>= 3 attempts in 2 s), the log \
         has:\n{}",
        broker.log_tail()
    );
    assert!(
        pw.dump()
            .nodes
            .iter()
            .all(|n| !n.name.as_deref().unwrap_or("").contains("vsnd.")),
        "the broker reached the daemon through a remote that does not exist?"
    );
    println!(
        "--pipewire-remote nonexistent: 2 s of playback paced in {:?} (nominal {:?}), {recorded} \
         silent capture buffers, {} connection attempts logged: {}",
        g.player().pace().0,
        g.player().pace().1,
        attempts.len(),
        retrying[0]
    );
    drop(fe);
    drop(broker);

    // The daemon stopped (its socket dir stays, empty of a listener), the
    // broker started, the daemon started later.
    pw.stop_daemon(false);
    let name = "later";
    let broker = pw_broker(&pw, name, "output", &[]);
    let mut fe = broker.connect(FrontendOptions::default());
    let mut g = Guest {
        player: Some(Player::prepare(
            &mut fe,
            cfg,
            fixture::pcm_pattern(0x1A7E, 8 * SECOND),
        )),
        ..Guest::default()
    };
    g.player.as_mut().unwrap().start(&mut fe);
    g.pump(&mut fe, Duration::from_millis(1000));
    let t0 = Instant::now();
    g.during(&mut fe, || pw.start_daemon());
    let ready = t0.elapsed();
    let node = output_node(name);
    let n = node.clone();
    g.during(&mut fe, || {
        pw.wait_for(
            &format!("{n} once the daemon is there"),
            Duration::from_secs(8),
            |d| d.linked(&n, pipewire::SINK),
        )
    });
    let linked = t0.elapsed();
    let (matched, at) = audio_reaches_the_sink(&pw, &mut g, &mut fe, &broker, "once connected");
    let done = g.player().done.len();
    g.player()
        .assert_paced("playback before and after the daemon came", &broker);
    fixture::stop(&mut fe, OUT);
    fixture::release(&mut fe, OUT);
    let log = broker.log();
    assert!(
        !lines_with(&log, "retrying in the background").is_empty()
            && lines_with(&log, "PipeWire: connected").len() == 1,
        "expected the broker to start without the daemon and connect once later; log:\n{}",
        broker.log_tail()
    );
    println!(
        "daemon started 1 s into playback: ready after {ready:?}, the output node linked \
         {linked:?} after the start; {matched} bytes bit-exact in the monitor (at byte {at}); \
         {done} periods paced, longest gap {:?}",
        g.player().max_gap(0)
    );
}
