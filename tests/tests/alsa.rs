//! The broker's ALSA backend (`--backend alsa`) as a guest sees it, through
//! the test frontend, against the real `vsnd-broker` + `vsnd-device`.
//!
//! There is no sound card: the broker runs with a private ALSA
//! configuration (`vsnd_tests::alsa`) whose PCMs are `type file` over a
//! `null` slave. `vsnd_out` writes what is played to the broker
//! directory's `played.raw` (each opening starts the file over); `vsnd_in`
//! records that directory's `capture.raw` from its first byte each time it
//! is opened. The broker's
//! clock paces both streams (the `null` slave has none), so these tests see
//! the real-time pace, the exact bytes, and when the capture PCM is open
//! (the broker holds `capture.raw` open exactly while it is).
//!
//! A `null` slave never runs dry or over, so these tests check that no xrun
//! and no dropped playback byte is reported. Xruns are provoked for real
//! with the one PCM that has a clock of its own without a sound card,
//! PipeWire's ALSA plugin (`pipewire-alsa`) over a private daemon: the
//! broker's feeding thread is held still (ptrace, that one thread only)
//! until the PCM runs dry. Capture overruns are not: that plugin's capture
//! PCM drops what does not fit and never reports one.
//!
//! Build the binaries first (`cargo build --workspace --bins`); `aplay`
//! (alsa-utils, from `scripts/setup`) gives an independent opinion of what
//! a PCM accepts.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vsnd_tests::alsa::{self, AlsaPcms};
use vsnd_tests::bin_path;
use vsnd_tests::ctl::{has_open, wait_for};
use vsnd_tests::fixture::{
    self, add_rx, add_tx, assert_responsive, assert_same_bytes, expect_nothing_used, expect_status,
    pcm_pattern, query_all, setup_stream, tx_status, wait_used, Broker, BrokerOptions, PcmConfig,
    TempDir,
};
use vsnd_tests::frontend::{Frontend, FrontendOptions};
use vsnd_tests::snd::{self, PcmInfo, PcmStatus};

const OUT: u32 = 0;
const IN: u32 = 1;

/// Generous bound for anything that should happen "at once".
const PROMPT: Duration = Duration::from_secs(2);
/// How long a test watches for buffers that must not come back yet.
const QUIET: Duration = Duration::from_millis(300);
/// RX buffers a running capture keeps queued.
const IN_FLIGHT: usize = 4;
/// A flip of the input flag takes effect from the next period the broker
/// generates; the buffers it generated before may still come back with the
/// old state.
const STALE_BUFFERS: usize = IN_FLIGHT + 1;
/// `capture.raw`: 2 s of 48 kHz stereo S16, longer than any test records
/// (the file plugin does not loop its infile).
const CAPTURE_LEN: usize = 2 * 48_000 * 4;

/// How soon after `SET input off` is answered the capture PCM must be
/// closed. Not at once: the broker's control socket writes its answer
/// before the broker's loop tells the session (which closes the PCM).
const CLOSE_BOUND: Duration = Duration::from_millis(100);
/// Broker log text of an xrun (`Stream::xrun` in broker/src/audio/alsa.rs),
/// and of a stream closed after xruns or dropped playback (`Stream::drop`).
const XRUN_LOG: [&str; 2] = ["xruns so far", "ALSA stream closed:"];

/// A broker with the ALSA backend over `pcms`, `--initial-streams initial`,
/// a long pseudo-random `capture.raw`, and a control socket.
fn alsa_broker(tag: &str, pcms: &AlsaPcms, initial: &str) -> Broker {
    Broker::start_with(
        tag,
        BrokerOptions {
            initial_streams: initial.into(),
            capture: pcm_pattern(0xA15A, CAPTURE_LEN),
            control_socket: true,
            backend: Some(pcms.backend()),
            ..BrokerOptions::default()
        },
    )
}

fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

fn assert_no_xrun(broker: &Broker, context: &str) {
    let log = broker.log();
    let xruns: Vec<&str> = XRUN_LOG.iter().flat_map(|n| lines_with(&log, n)).collect();
    assert!(
        xruns.is_empty(),
        "{context}: a null-backed file PCM can neither xrun nor refuse data, yet the broker \
         logged:\n{}",
        xruns.join("\n")
    );
}

fn info_of(fe: &mut Frontend) -> Vec<PcmInfo> {
    query_all(fe, snd::R_PCM_INFO, 2, snd::PCM_INFO_SIZE)
        .iter()
        .map(|b| PcmInfo::parse(b).unwrap_or_else(|e| panic!("PCM_INFO item: {e}")))
        .collect()
}

fn mask(bits: impl IntoIterator<Item = u8>) -> u64 {
    bits.into_iter().fold(0, |m, b| m | 1u64 << b)
}

/// `n` distinct periods of `cfg`.
fn periods(cfg: &PcmConfig, n: usize, seed: u64) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| pcm_pattern(seed + i as u64, cfg.period_bytes as usize))
        .collect()
}

/// Queue `data` on the prepared stream 0 (but its first `queued` periods,
/// which already are), START it, and wait for every buffer; returns the
/// time from START to each return.
fn play_queued(
    fe: &mut Frontend,
    cfg: &PcmConfig,
    data: &[Vec<u8>],
    queued: usize,
) -> Vec<Duration> {
    play_window(fe, cfg, data, queued, data.len())
}

/// Like [`play_queued`], but with at most `window` periods queued at a
/// time: one more is queued after each that comes back, as a guest does.
fn play_window(
    fe: &mut Frontend,
    cfg: &PcmConfig,
    data: &[Vec<u8>],
    queued: usize,
    window: usize,
) -> Vec<Duration> {
    let mut next = queued;
    while next < window.min(data.len()) {
        add_tx(fe, OUT, &data[next]);
        next += 1;
    }
    fe.kick(snd::QUEUE_TX).unwrap();
    fixture::start(fe, OUT);
    let t0 = Instant::now();
    let bound = cfg.period() * data.len() as u32 * 5 + PROMPT;
    (0..data.len())
        .map(|i| {
            let u = wait_used(fe, snd::QUEUE_TX, bound, &format!("playback buffer {i}"));
            let st = tx_status(&u, &format!("playback buffer {i}"));
            assert_eq!(
                st.status,
                snd::S_OK,
                "playback buffer {i}: expected S_OK, got {}",
                snd::status_name(st.status)
            );
            let at = t0.elapsed();
            if next < data.len() {
                add_tx(fe, OUT, &data[next]);
                fe.kick(snd::QUEUE_TX).unwrap();
                next += 1;
            }
            at
        })
        .collect()
}

/// [`play_queued`] with nothing queued yet.
fn play(fe: &mut Frontend, cfg: &PcmConfig, data: &[Vec<u8>]) -> Vec<Duration> {
    play_queued(fe, cfg, data, 0)
}

/// A received RX buffer: its data, status checked.
fn rx_data(u: &vsnd_tests::frontend::Used, cfg: &PcmConfig, what: &str) -> Vec<u8> {
    let (data, st) = PcmStatus::split_rx(&u.writable_bytes)
        .unwrap_or_else(|e| panic!("{what}: {e} (used.len {})", u.len));
    assert_eq!(
        (st.status, data.len()),
        (snd::S_OK, cfg.period_bytes as usize),
        "{what}: expected S_OK with a full period, got {} with {} bytes",
        snd::status_name(st.status),
        data.len()
    );
    data.to_vec()
}

/// A capture stream kept running: one RX buffer replaces each that returns.
struct Capture {
    cfg: PcmConfig,
}

impl Capture {
    fn start(fe: &mut Frontend, cfg: PcmConfig) -> Self {
        setup_stream(fe, IN, &cfg);
        fixture::start(fe, IN);
        for _ in 0..IN_FLIGHT {
            add_rx(fe, IN, cfg.period_bytes);
        }
        fe.kick(snd::QUEUE_RX).unwrap();
        Capture { cfg }
    }

    fn next(&self, fe: &mut Frontend) -> Vec<u8> {
        let u = wait_used(fe, snd::QUEUE_RX, PROMPT, "a capture buffer");
        add_rx(fe, IN, self.cfg.period_bytes);
        fe.kick(snd::QUEUE_RX).unwrap();
        rx_data(&u, &self.cfg, "capture buffer")
    }

    /// Buffers until one is not all zeros (at most [`STALE_BUFFERS`]).
    fn until_loud(&self, fe: &mut Frontend, broker: &Broker, what: &str) -> Vec<u8> {
        for _ in 0..=STALE_BUFFERS {
            let d = self.next(fe);
            if d.iter().any(|&b| b != 0) {
                return d;
            }
        }
        panic!(
            "{what}: expected capture.raw's bytes within {STALE_BUFFERS} buffers, got only \
             zeros; log:\n{}",
            broker.log_tail()
        );
    }

    /// Buffers until one is all zeros (at most [`STALE_BUFFERS`]).
    fn until_silent(&self, fe: &mut Frontend, what: &str) {
        for _ in 0..=STALE_BUFFERS {
            if self.next(fe).iter().all(|&b| b == 0) {
                return;
            }
        }
        panic!("{what}: expected silence within {STALE_BUFFERS} buffers");
    }
}

// ---------------------------------------------------------------------------
// PCM_INFO
// ---------------------------------------------------------------------------

/// PCM_INFO of both streams equals what `aplay --dump-hw-params` says the
/// playback PCM accepts (within what vsnd carries).
fn assert_info_matches_aplay(fe: &mut Frontend, pcms: &AlsaPcms) -> (u64, u64, u8, u8) {
    let hw = alsa::hw_params(pcms, &pcms.playback);
    let want = hw.expected_info();
    for (id, info) in info_of(fe).iter().enumerate() {
        assert_eq!(
            (
                info.formats,
                info.rates,
                info.channels_min,
                info.channels_max
            ),
            want,
            "stream {id}: PCM_INFO (formats, rates, channels min, max) should be what the \
             ALSA PCM {:?} accepts, as aplay --dump-hw-params shows it: {hw:?}; got {info:?}",
            pcms.playback
        );
    }
    want
}

fn expect_not_supp(fe: &mut Frontend, cfg: PcmConfig, why: &str) {
    expect_status(
        fe,
        &cfg.set_params_request(OUT),
        snd::S_NOT_SUPP,
        &format!("SET_PARAMS {why} ({cfg:?})"),
    );
}

/// The null-backed file PCM accepts every format, rate and channel count,
/// so PCM_INFO offers everything vsnd carries and only what lies beyond
/// that is refused. A narrower PCM (2 channels of integer samples: `multi`
/// over `linear`) narrows PCM_INFO accordingly, refuses the rest, and plays
/// what it accepts.
#[test]
fn pcm_info_advertises_what_the_alsa_device_accepts() {
    let pcms = AlsaPcms::default();
    let broker = alsa_broker("alsa-info", &pcms, "output");
    let mut fe = broker.connect(FrontendOptions::default());
    let want = assert_info_matches_aplay(&mut fe, &pcms);
    let all_formats = mask(alsa::FORMATS.iter().map(|(c, _)| *c));
    assert_eq!(
        want,
        (all_formats, mask(alsa::vsnd_rates()), 1, 8),
        "the null-backed file PCM should accept every format, rate (8-192 kHz) and 1-8 channels"
    );
    let ok = PcmConfig::s16_stereo_48k(10);
    expect_not_supp(
        &mut fe,
        PcmConfig {
            rate: snd::PCM_RATE_384000,
            ..ok
        },
        "at 384 kHz",
    );
    expect_not_supp(
        &mut fe,
        PcmConfig {
            rate: snd::PCM_RATE_5512,
            ..ok
        },
        "at 5512 Hz",
    );
    expect_not_supp(
        &mut fe,
        PcmConfig {
            format: snd::PCM_FMT_MU_LAW,
            period_bytes: 960,
            buffer_bytes: 3840,
            ..ok
        },
        "in mu-law",
    );
    expect_not_supp(
        &mut fe,
        PcmConfig {
            channels: 9,
            period_bytes: 48 * 10 * 18,
            buffer_bytes: 4 * 48 * 10 * 18,
            ..ok
        },
        "with 9 channels",
    );
    fixture::set_params(&mut fe, OUT, &ok);
    drop(fe);

    // Two channels of integer samples only.
    let narrow = AlsaPcms {
        playback: "vsnd_narrow".into(),
        extra: alsa::playback_pcm("vsnd_narrow_file", "{dir}/narrow.raw")
            + "pcm.vsnd_narrow_s16 {\n    type linear\n    slave { pcm vsnd_narrow_file; format S16_LE }\n}\n\
               pcm.vsnd_narrow {\n    type multi\n    slaves.a { pcm vsnd_narrow_s16; channels 2 }\n    \
               bindings.0 { slave a; channel 0 }\n    bindings.1 { slave a; channel 1 }\n}\n",
        ..AlsaPcms::default()
    };
    let broker = alsa_broker("alsa-info-narrow", &narrow, "output");
    let mut fe = broker.connect(FrontendOptions::default());
    let pid = broker.device_pid(PROMPT);
    let want = assert_info_matches_aplay(&mut fe, &narrow);
    let ints = all_formats & !mask([snd::PCM_FMT_FLOAT, snd::PCM_FMT_FLOAT64]);
    assert_eq!(
        want,
        (ints, mask(alsa::vsnd_rates()), 2, 2),
        "vsnd_narrow should take the integer formats, every rate, and 2 channels only"
    );
    for (format, name) in [
        (snd::PCM_FMT_FLOAT, "FLOAT"),
        (snd::PCM_FMT_FLOAT64, "FLOAT64"),
    ] {
        let b = snd::format_bytes(format).unwrap_or(4) * 2 * 480;
        expect_not_supp(
            &mut fe,
            PcmConfig {
                format,
                period_bytes: b,
                buffer_bytes: 4 * b,
                ..ok
            },
            &format!("in {name} on vsnd_narrow"),
        );
    }
    expect_not_supp(
        &mut fe,
        PcmConfig {
            channels: 1,
            period_bytes: 960,
            buffer_bytes: 3840,
            ..ok
        },
        "mono on vsnd_narrow",
    );
    // What it accepts plays, byte for byte (S16 to S16 is no conversion).
    setup_stream(&mut fe, OUT, &ok);
    let data = periods(&ok, 5, 0x4A55);
    play(&mut fe, &ok, &data);
    fixture::stop(&mut fe, OUT);
    fixture::release(&mut fe, OUT);
    let narrow_raw = broker.dir().join("narrow.raw");
    let want_bytes = data.concat();
    let got = wait_for(PROMPT, || {
        let b = std::fs::read(&narrow_raw).unwrap_or_default();
        (b.len() >= want_bytes.len()).then_some(b)
    })
    .unwrap_or_else(|| std::fs::read(&narrow_raw).unwrap_or_default());
    assert_same_bytes("narrow.raw after 5 S16 stereo periods", &got, &want_bytes);
    assert_responsive(&mut fe, &broker, pid, "after the narrow PCM");
    println!(
        "PCM_INFO: vsnd_out formats {all_formats:#x} rates {:#x} channels 1-8 (everything); \
         vsnd_narrow formats {ints:#x} channels 2-2; NOT_SUPP for 384 kHz, 5512 Hz, mu-law, \
         9 channels, and on vsnd_narrow FLOAT, FLOAT64, mono",
        mask(alsa::vsnd_rates())
    );
}

// ---------------------------------------------------------------------------
// Playback
// ---------------------------------------------------------------------------

/// 20 periods of 10 ms through `vsnd_out`: nothing before START, the
/// buffers come back at the real-time pace, the host PCM gets the guest's
/// period and buffer sizes, and `played.raw` holds exactly the guest's
/// bytes. A second stream after RELEASE reopens the PCM with its own period.
#[test]
fn playback_through_alsa_is_paced_and_byte_exact() {
    let broker = alsa_broker("alsa-play", &AlsaPcms::default(), "output");
    let mut fe = broker.connect(FrontendOptions::default());
    let pid = broker.device_pid(PROMPT);
    let cfg = PcmConfig::s16_stereo_48k(10);
    const N: usize = 20;
    let data = periods(&cfg, N, 0x51A7);
    setup_stream(&mut fe, OUT, &cfg);
    for p in &data[..2] {
        add_tx(&mut fe, OUT, p);
    }
    fe.kick(snd::QUEUE_TX).unwrap();
    expect_nothing_used(&mut fe, snd::QUEUE_TX, QUIET, "playback before START");
    let times = play_queued(&mut fe, &cfg, &data, 2);
    let elapsed = *times.last().unwrap_or(&Duration::ZERO);
    let nominal = cfg.period() * N as u32;
    assert!(
        elapsed >= nominal * 4 / 5,
        "{N} periods of {:?} came back {elapsed:?} after START; expected at least 80% of the \
         {nominal:?} they take to play",
        cfg.period()
    );
    fixture::stop(&mut fe, OUT);
    fixture::release(&mut fe, OUT);
    let want = data.concat();
    assert_same_bytes(
        "played.raw after RELEASE",
        &broker.wait_played(want.len(), PROMPT),
        &want,
    );
    let log = broker.log();
    let opened = lines_with(&log, "ALSA playback \"vsnd_out\"");
    assert!(
        opened.len() == 1
            && opened[0].contains("S16 48000 Hz 2 ch, period 480 frames, buffer 1920 frames"),
        "expected the playback PCM opened once with the guest's 10 ms period (480 frames) and \
         40 ms buffer (1920 frames), the log has:\n{}",
        opened.join("\n")
    );

    // Again, 20 ms periods: the PCM is reopened (which starts played.raw
    // over) with the new period.
    let cfg2 = PcmConfig::s16_stereo_48k(20);
    let data2 = periods(&cfg2, 5, 0x52A7);
    setup_stream(&mut fe, OUT, &cfg2);
    play(&mut fe, &cfg2, &data2);
    fixture::stop(&mut fe, OUT);
    fixture::release(&mut fe, OUT);
    let want2 = data2.concat();
    assert_same_bytes(
        "played.raw after a second stream",
        &broker.wait_played(want2.len(), PROMPT),
        &want2,
    );
    assert!(
        broker
            .log()
            .contains("S16 48000 Hz 2 ch, period 960 frames, buffer 3840 frames"),
        "expected the second stream's PCM opened with 960-frame periods; log:\n{}",
        broker.log_tail()
    );
    assert_no_xrun(&broker, "playback");
    assert_responsive(&mut fe, &broker, pid, "after playback");
    println!(
        "playback: {N} periods ({} bytes, {nominal:?} of audio) came back {elapsed:?} after \
         START ({:.0}% of real time), played.raw byte-exact; then {} bytes byte-exact through \
         the reopened PCM",
        want.len(),
        elapsed.as_secs_f64() * 100.0 / nominal.as_secs_f64(),
        want2.len()
    );
}

/// Every format vsnd carries, each at another rate and channel count, opens
/// the playback PCM with the guest's parameters and plays byte-exact.
#[test]
fn every_advertised_format_plays_through_alsa() {
    let broker = alsa_broker("alsa-formats", &AlsaPcms::default(), "output");
    let mut fe = broker.connect(FrontendOptions::default());
    let pid = broker.device_pid(PROMPT);
    let rates: Vec<u8> = alsa::vsnd_rates().collect();
    const FRAMES: u32 = 256;
    let mut total = 0;
    let mut cases = Vec::new();
    for (i, (format, name)) in alsa::FORMATS.iter().enumerate() {
        let channels = 1 + (i % 8) as u8;
        let rate = rates[(i * 5) % rates.len()];
        let frame = snd::format_bytes(*format).unwrap_or(0) * u32::from(channels);
        let cfg = PcmConfig {
            channels,
            format: *format,
            rate,
            period_bytes: FRAMES * frame,
            buffer_bytes: 4 * FRAMES * frame,
        };
        let data = periods(&cfg, 3, 0x600 + i as u64);
        setup_stream(&mut fe, OUT, &cfg);
        play(&mut fe, &cfg, &data);
        fixture::stop(&mut fe, OUT);
        fixture::release(&mut fe, OUT);
        // Each stream reopens the PCM, which starts played.raw over.
        let bytes = data.concat();
        assert_same_bytes(
            &format!("{name}: played.raw"),
            &broker.wait_played(bytes.len(), PROMPT),
            &bytes,
        );
        total += bytes.len();
        let hz = snd::rate_hz(rate).unwrap_or(0);
        let line = format!(
            "{hz} Hz {channels} ch, period {FRAMES} frames, buffer {} frames",
            4 * FRAMES
        );
        let log = broker.log();
        assert_eq!(
            lines_with(&log, &line).len(),
            cases
                .iter()
                .filter(|c: &&String| c.as_str() == line)
                .count()
                + 1,
            "{name}: expected the playback PCM opened with \"{line}\"; log:\n{}",
            broker.log_tail()
        );
        cases.push(line);
    }
    assert_no_xrun(&broker, "every format");
    assert_responsive(&mut fe, &broker, pid, "after every format");
    println!(
        "every format: {} streams ({}) played {} bytes byte-exact",
        cases.len(),
        cases.join("; "),
        total
    );
}

// ---------------------------------------------------------------------------
// Capture
// ---------------------------------------------------------------------------

/// Input on from the start: the RX buffers carry `capture.raw` from its
/// first byte, paced; the capture PCM (and so `capture.raw`) is open while
/// the stream runs, with the guest's period, and closed at RELEASE.
#[test]
fn capture_with_input_on_records_the_infile_from_its_start() {
    let broker = alsa_broker("alsa-capture", &AlsaPcms::default(), "output,input");
    let bpid = broker.pid().unwrap_or(0);
    // Room for every buffer at once (3 descriptors each).
    let mut fe = broker.connect(FrontendOptions {
        queue_size: 256,
        ..FrontendOptions::default()
    });
    let pid = broker.device_pid(PROMPT);
    let cfg = PcmConfig::s16_stereo_48k(10);
    const N: usize = 30;
    setup_stream(&mut fe, IN, &cfg);
    for _ in 0..N {
        add_rx(&mut fe, IN, cfg.period_bytes);
    }
    fe.kick(snd::QUEUE_RX).unwrap();
    expect_nothing_used(&mut fe, snd::QUEUE_RX, QUIET, "capture before START");
    assert!(
        !has_open(bpid, broker.capture_path()),
        "the capture PCM must not be open before the capture stream runs"
    );
    fixture::start(&mut fe, IN);
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut first = None;
    for i in 0..N {
        let u = wait_used(
            &mut fe,
            snd::QUEUE_RX,
            cfg.period() * N as u32 * 5 + PROMPT,
            &format!("capture buffer {i}"),
        );
        first.get_or_insert_with(|| t0.elapsed());
        got.extend(rx_data(&u, &cfg, &format!("capture buffer {i}")));
        if i == N / 2 {
            assert!(
                has_open(bpid, broker.capture_path()),
                "the broker should hold capture.raw (the capture PCM's infile) open while \
                 the stream runs with input on"
            );
        }
    }
    let elapsed = t0.elapsed();
    let nominal = cfg.period() * N as u32;
    assert_same_bytes(
        "captured bytes vs capture.raw from its start",
        &got,
        &broker.capture_bytes()[..got.len()],
    );
    assert!(
        elapsed >= nominal * 4 / 5,
        "{N} capture periods came back {elapsed:?} after START; expected at least 80% of \
         {nominal:?}"
    );
    let first = first.unwrap_or_default();
    assert!(
        first >= cfg.period() * 4 / 5,
        "the first capture period came back {first:?} after START, before a period passed"
    );
    let log = broker.log();
    assert!(
        log.contains(
            "ALSA capture \"vsnd_in\": S16 48000 Hz 2 ch, period 480 frames, buffer 1920 frames"
        ),
        "expected the capture PCM opened with the guest's parameters; log:\n{}",
        broker.log_tail()
    );
    fixture::stop(&mut fe, IN);
    fixture::release(&mut fe, IN);
    assert!(
        wait_for(PROMPT, || (!has_open(bpid, broker.capture_path()))
            .then_some(()))
        .is_some(),
        "the capture PCM should be closed at RELEASE"
    );
    assert!(
        broker
            .log()
            .contains("ALSA capture device \"vsnd_in\" closed"),
        "expected the broker to log the capture PCM closed; log:\n{}",
        broker.log_tail()
    );
    assert_no_xrun(&broker, "capture");
    assert_responsive(&mut fe, &broker, pid, "after capture");
    println!(
        "capture: {} bytes = capture.raw[0..{}] byte-exact; {N} periods ({nominal:?}) in \
         {elapsed:?} ({:.0}% of real time), first after {first:?}",
        got.len(),
        got.len(),
        elapsed.as_secs_f64() * 100.0 / nominal.as_secs_f64()
    );
}

/// Input off (the default): zeros, and the capture PCM is not opened (the
/// broker has no descriptor of `capture.raw`). `SET input on`: the PCM is
/// opened and `capture.raw` flows from its first byte. `SET input off`:
/// zeros, and it is closed. On again: reopened, from the first byte again.
#[test]
fn capture_pcm_is_open_only_while_input_is_on() {
    let broker = alsa_broker("alsa-gate", &AlsaPcms::default(), "output");
    let bpid = broker.pid().unwrap_or(0);
    let infile = broker.capture_path().to_path_buf();
    let capture = broker.capture_bytes().to_vec();
    let mut fe = broker.connect(FrontendOptions::default());
    let pid = broker.device_pid(PROMPT);
    let cfg = PcmConfig::s16_stereo_48k(10);
    let cap = Capture::start(&mut fe, cfg);

    let mut off_buffers = 0;
    for i in 0..15 {
        let d = cap.next(&mut fe);
        assert!(
            d.iter().all(|&b| b == 0),
            "buffer {i} while input is off: expected zeros, got {} non-zero bytes",
            d.iter().filter(|&&b| b != 0).count()
        );
        assert!(
            !has_open(bpid, &infile),
            "buffer {i}: input is off, yet the broker holds {} open",
            infile.display()
        );
        off_buffers += 1;
    }
    assert!(
        lines_with(&broker.log(), "ALSA capture").is_empty(),
        "input is off, yet the broker logged a capture PCM:\n{}",
        broker.log_tail()
    );

    let (mut rounds, mut close_delays) = (Vec::new(), Vec::new());
    for round in 1..=2 {
        assert_eq!(broker.control("SET input on"), "OK output=on input=on");
        let mut got = cap.until_loud(&mut fe, &broker, &format!("input on (round {round})"));
        for _ in 0..9 {
            got.extend(cap.next(&mut fe));
        }
        assert_same_bytes(
            &format!("10 buffers after `SET input on` (round {round}): capture.raw from its start"),
            &got,
            &capture[..got.len()],
        );
        assert!(
            has_open(bpid, &infile),
            "round {round}: input is on and the stream runs: the broker should hold {} open",
            infile.display()
        );
        assert_eq!(broker.control("SET input off"), "OK output=on input=off");
        // The broker answers before its loop closes the capture PCM (see
        // CLOSE_BOUND): allow that moment, and measure it.
        let answered = Instant::now();
        let closed = wait_for(CLOSE_BOUND, || {
            (!has_open(bpid, &infile)).then(|| answered.elapsed())
        });
        let Some(closed) = closed else {
            panic!(
                "round {round}: {} still open {CLOSE_BOUND:?} after `SET input off` was answered",
                infile.display()
            );
        };
        close_delays.push(closed);
        cap.until_silent(&mut fe, &format!("input off (round {round})"));
        for i in 0..5 {
            assert!(
                cap.next(&mut fe).iter().all(|&b| b == 0),
                "round {round}, buffer {i} after input went off: expected zeros"
            );
        }
        assert!(!has_open(bpid, &infile));
        rounds.push(got.len());
    }
    let log = broker.log();
    assert_eq!(
        lines_with(&log, "ALSA capture \"vsnd_in\"").len(),
        2,
        "expected the capture PCM opened once per `SET input on`; log:\n{}",
        broker.log_tail()
    );
    assert_eq!(
        lines_with(&log, "ALSA capture device \"vsnd_in\" closed").len(),
        2,
        "expected the capture PCM closed once per `SET input off`; log:\n{}",
        broker.log_tail()
    );
    fixture::stop(&mut fe, IN);
    fixture::release(&mut fe, IN);
    assert_no_xrun(&broker, "gate");
    assert_responsive(&mut fe, &broker, pid, "after the gate flips");
    println!(
        "gate: {off_buffers} zero buffers with input off and no descriptor of capture.raw; \
         twice `SET input on` -> capture.raw[0..{}] byte-exact with it open, `SET input off` \
         -> closed {close_delays:?} after the answer, zeros",
        rounds[0]
    );
}

/// A capture PCM that cannot be opened (an unknown name; a file PCM whose
/// infile is missing): the guest records paced silence, the broker says why
/// once and keeps serving, and playback is unaffected.
#[test]
fn a_capture_device_that_cannot_be_opened_records_silence() {
    let cases = [
        ("nonexistent", String::new()),
        (
            "vsnd_in_missing",
            alsa::capture_pcm("vsnd_in_missing", "{dir}/missing.raw"),
        ),
    ];
    for (device, extra) in &cases {
        let pcms = AlsaPcms {
            capture: (*device).into(),
            extra: extra.clone(),
            ..AlsaPcms::default()
        };
        let mut broker = alsa_broker(&format!("alsa-nocap-{device}"), &pcms, "output,input");
        let mut fe = broker.connect(FrontendOptions::default());
        let pid = broker.device_pid(PROMPT);
        let cfg = PcmConfig::s16_stereo_48k(10);
        let cap = Capture::start(&mut fe, cfg);
        let t0 = Instant::now();
        const N: usize = 15;
        for i in 0..N {
            let d = cap.next(&mut fe);
            assert!(
                d.iter().all(|&b| b == 0),
                "{device}: buffer {i}: the capture PCM cannot be opened, so the guest should \
                 record zeros"
            );
        }
        let took = t0.elapsed();
        let nominal = cfg.period() * N as u32;
        assert!(
            took >= nominal * 4 / 5,
            "{device}: {N} silent periods came in {took:?}, faster than real time ({nominal:?})"
        );
        let log = broker.log();
        let why = lines_with(&log, "host capture unavailable");
        assert!(
            why.len() == 1
                && why[0].contains(&format!("cannot open ALSA PCM \"{device}\""))
                && why[0].contains("the guest records silence"),
            "{device}: expected one log line saying the capture PCM {device:?} cannot be opened \
             and the guest records silence, got:\n{}\nlog:\n{}",
            why.join("\n"),
            broker.log_tail()
        );
        fixture::stop(&mut fe, IN);
        fixture::release(&mut fe, IN);
        assert!(
            broker.is_running(),
            "{device}: the broker exited; log:\n{}",
            broker.log_tail()
        );
        assert_responsive(&mut fe, &broker, pid, &format!("{device}: after capture"));
        // Playback still works.
        let play_cfg = PcmConfig::s16_stereo_48k(10);
        let data = periods(&play_cfg, 5, 0x7000);
        setup_stream(&mut fe, OUT, &play_cfg);
        play(&mut fe, &play_cfg, &data);
        fixture::stop(&mut fe, OUT);
        fixture::release(&mut fe, OUT);
        assert_same_bytes(
            &format!("{device}: played.raw"),
            &broker.wait_played(data.concat().len(), PROMPT),
            &data.concat(),
        );
        println!(
            "{device}: {N} zero buffers in {took:?}; the broker logged: {}",
            why[0]
        );
    }
}

// ---------------------------------------------------------------------------
// Duplex
// ---------------------------------------------------------------------------

/// Playback and capture at once: both byte-exact, both at the real-time
/// pace, and overlapping (neither waited for the other to finish); no
/// buffer of either is more than a bound late.
#[test]
fn duplex_through_alsa_is_byte_exact_both_ways() {
    let broker = alsa_broker("alsa-duplex", &AlsaPcms::default(), "output,input");
    let mut fe = broker.connect(FrontendOptions {
        event_idx: true,
        queue_size: 256,
        ..FrontendOptions::default()
    });
    let pid = broker.device_pid(PROMPT);
    let cfg = PcmConfig::s16_stereo_48k(10);
    const N: usize = 40;
    setup_stream(&mut fe, OUT, &cfg);
    setup_stream(&mut fe, IN, &cfg);
    let data = periods(&cfg, N, 0xD0);
    for p in &data {
        add_tx(&mut fe, OUT, p);
    }
    for _ in 0..N {
        add_rx(&mut fe, IN, cfg.period_bytes);
    }
    fe.kick(snd::QUEUE_TX).unwrap();
    fe.kick(snd::QUEUE_RX).unwrap();
    fixture::start(&mut fe, OUT);
    fixture::start(&mut fe, IN);
    let t0 = Instant::now();
    let deadline = t0 + cfg.period() * N as u32 * 5 + PROMPT;
    let (mut tx_times, mut rx_times, mut rx) = (Vec::new(), Vec::new(), Vec::new());
    while tx_times.len() < N || rx_times.len() < N {
        assert!(
            Instant::now() < deadline,
            "duplex: only {}/{N} playback and {}/{N} capture buffers by the deadline; log:\n{}",
            tx_times.len(),
            rx_times.len(),
            broker.log_tail()
        );
        let mut idle = true;
        if let Some(u) = fe.poll_used(snd::QUEUE_TX).unwrap() {
            let st = tx_status(&u, "duplex playback buffer");
            assert_eq!(st.status, snd::S_OK, "duplex playback buffer status");
            tx_times.push(t0.elapsed());
            idle = false;
        }
        if let Some(u) = fe.poll_used(snd::QUEUE_RX).unwrap() {
            rx.extend(rx_data(&u, &cfg, "duplex capture buffer"));
            rx_times.push(t0.elapsed());
            idle = false;
        }
        if idle {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    for s in [OUT, IN] {
        fixture::stop(&mut fe, s);
        fixture::release(&mut fe, s);
    }
    let want = data.concat();
    assert_same_bytes(
        "duplex: played.raw",
        &broker.wait_played(want.len(), PROMPT),
        &want,
    );
    assert_same_bytes(
        "duplex: captured bytes vs capture.raw from its start",
        &rx,
        &broker.capture_bytes()[..rx.len()],
    );
    let nominal = cfg.period() * N as u32;
    let (tx_end, rx_end) = (tx_times[N - 1], rx_times[N - 1]);
    for (what, end) in [("playback", tx_end), ("capture", rx_end)] {
        assert!(
            end >= nominal * 4 / 5,
            "duplex {what}: {N} periods took {end:?}, faster than real time ({nominal:?})"
        );
    }
    assert!(
        rx_times[0] < tx_end && tx_times[0] < rx_end,
        "duplex: the streams did not overlap (playback {:?}..{tx_end:?}, capture \
         {:?}..{rx_end:?})",
        tx_times[0],
        rx_times[0]
    );
    // Buffer i is due (i + 1) periods after START.
    let lateness = |times: &[Duration]| {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| t.saturating_sub(cfg.period() * (i as u32 + 1)))
            .max()
            .unwrap_or_default()
    };
    let (tx_late, rx_late) = (lateness(&tx_times), lateness(&rx_times));
    const LATE_BOUND: Duration = Duration::from_millis(500);
    assert!(
        tx_late <= LATE_BOUND && rx_late <= LATE_BOUND,
        "duplex: a buffer came back more than {LATE_BOUND:?} after it was due (playback at \
         most {tx_late:?} late, capture {rx_late:?}): one stream held up the other?"
    );
    assert_no_xrun(&broker, "duplex");
    assert_responsive(&mut fe, &broker, pid, "after duplex");
    println!(
        "duplex: {} bytes played and {} bytes captured, both byte-exact; {N} periods \
         ({nominal:?}): playback done at {tx_end:?}, capture at {rx_end:?}; latest buffer \
         {tx_late:?} (playback) / {rx_late:?} (capture) after it was due",
        want.len(),
        rx.len()
    );
}

// ---------------------------------------------------------------------------
// A playback device that cannot be opened
// ---------------------------------------------------------------------------

/// `--alsa-playback-device nonexistent`: the broker exits 2 at once with a
/// message naming the device and the option, and leaves no socket behind.
#[test]
fn a_playback_device_that_cannot_be_opened_is_a_usage_error() {
    let dir = TempDir::new("alsa-bad-playback");
    let socket = dir.path().join("vsnd.sock");
    let pcms = AlsaPcms {
        playback: "nonexistent".into(),
        ..AlsaPcms::default()
    };
    let mut cmd = Command::new(bin_path("vsnd-broker"));
    cmd.arg("--socket").arg(&socket);
    pcms.backend().apply(dir.path(), &mut cmd);
    cmd.env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start vsnd-broker: {e}"));
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(10)) {
        Ok(r) => r.unwrap_or_else(|e| panic!("waiting for vsnd-broker: {e}")),
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("vsnd-broker with a nonexistent playback device did not exit within 10 s");
        }
    };
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit status 2 (usage), got {}; stderr:\n{stderr}",
        out.status
    );
    let message = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_default();
    assert!(
        message.contains("cannot open ALSA playback device \"nonexistent\"")
            && message.contains("--alsa-playback-device"),
        "expected an error line naming the device and --alsa-playback-device, got:\n{stderr}"
    );
    assert!(
        !Path::new(&socket).exists(),
        "the broker left its socket {} behind",
        socket.display()
    );
    println!("bad playback device: exit 2 after {took:?}: {message}");
}

/// The ALSA plugin that plays into PipeWire (`pipewire-alsa`, installed by
/// `scripts/setup`): the one PCM with a clock of its own that exists
/// without a sound card.
const PW_PLUGIN: &str = "/usr/lib/x86_64-linux-gnu/alsa-lib/libasound_module_pcm_pipewire.so";

/// Stop one thread of another process (ptrace `SEIZE` + `INTERRUPT` act on
/// a single task, unlike SIGSTOP) for `how_long`, then let it go. The
/// process's other threads keep running.
fn stall_thread(tid: i32, how_long: Duration) {
    let seize = libc::PTRACE_SEIZE as libc::c_uint;
    let interrupt = libc::PTRACE_INTERRUPT as libc::c_uint;
    let detach = libc::PTRACE_DETACH as libc::c_uint;
    let null = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: ptrace requests on another process's task with null
    // address/data arguments; no memory of ours is read or written.
    let rc = unsafe { libc::ptrace(seize, tid, null, null) };
    assert_eq!(
        rc,
        0,
        "PTRACE_SEIZE {tid}: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: as above.
    let rc = unsafe { libc::ptrace(interrupt, tid, null, null) };
    assert_eq!(
        rc,
        0,
        "PTRACE_INTERRUPT {tid}: {}",
        std::io::Error::last_os_error()
    );
    let mut status = 0;
    // SAFETY: waits for the traced task; `status` is a valid out pointer.
    let rc = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
    assert_eq!(
        rc,
        tid,
        "waitpid {tid}: {}",
        std::io::Error::last_os_error()
    );
    std::thread::sleep(how_long);
    // SAFETY: as above; detaching resumes the task.
    let rc = unsafe { libc::ptrace(detach, tid, null, null) };
    assert_eq!(
        rc,
        0,
        "PTRACE_DETACH {tid}: {}",
        std::io::Error::last_os_error()
    );
}

/// A broker with the ALSA backend whose playback PCM plays into the
/// private PipeWire daemon `pw` through PipeWire's ALSA plugin
/// (`vsnd_pw_out`): a PCM with a clock of its own, the PipeWire graph's,
/// which runs in another process. (Capture stays the file PCM: the
/// plugin's capture PCM never reports an overrun, it drops what does not
/// fit; `arecord` held still for 500 ms sees none either.)
fn pw_alsa_broker(pw: &vsnd_tests::pipewire::PipeWire, tag: &str, initial: &str) -> Broker {
    assert!(
        Path::new(PW_PLUGIN).exists(),
        "this test needs PipeWire's ALSA plugin ({PW_PLUGIN}): run scripts/setup"
    );
    let pcms = AlsaPcms {
        playback: "vsnd_pw_out".into(),
        extra: "pcm.vsnd_pw_out {\n    type pipewire\n}\n".into(),
        ..AlsaPcms::default()
    };
    let mut backend = pcms.backend();
    if let Some(env) = backend.env.as_mut() {
        env.extend(pw.env());
    }
    Broker::start_with(
        tag,
        BrokerOptions {
            initial_streams: initial.into(),
            capture: pcm_pattern(0xA15A, CAPTURE_LEN),
            backend: Some(backend),
            ..BrokerOptions::default()
        },
    )
}

/// Hold the broker's main thread (the one that feeds and drains ALSA)
/// still for [`STALL`], 400 ms from now, on another thread; join it for
/// how long the stall really took.
fn stall_broker_soon(broker: &Broker) -> std::thread::JoinHandle<Duration> {
    let tid = broker.pid().expect("the broker is running") as i32;
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(400));
        let t = Instant::now();
        stall_thread(tid, STALL);
        t.elapsed()
    })
}

/// How long [`stall_broker_soon`] holds the broker: longer than the
/// PCM's buffer (4 periods of 20 ms).
const STALL: Duration = Duration::from_millis(300);

/// The broker's log once the stream `what` (`playback`, `capture`) was
/// closed after an xrun: the "recovered" lines and the "closed" lines.
/// Panics unless an xrun was logged as recovered and counted at close.
fn assert_xrun_recovered(broker: &Broker, what: &str, stalled: Duration) -> (String, String) {
    let log = wait_for(PROMPT, || {
        let log = broker.log();
        log.contains(XRUN_LOG[1]).then_some(log)
    })
    .unwrap_or_else(|| {
        panic!(
            "expected the broker to log the closed stream's xruns (\"{}\"); log:\n{}",
            XRUN_LOG[1],
            broker.log_tail()
        )
    });
    let recovered = lines_with(&log, XRUN_LOG[0]);
    assert!(
        recovered
            .iter()
            .any(|l| l.contains(&format!("ALSA {what}:")) && l.contains("recovered")),
        "expected an ALSA {what} xrun logged as recovered after the broker stood still for \
         {stalled:?}; log:\n{}",
        broker.log_tail()
    );
    let closed = lines_with(&log, XRUN_LOG[1]);
    let counted: u64 = closed
        .iter()
        .filter_map(|l| {
            l.split(XRUN_LOG[1])
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    assert!(
        counted >= 1,
        "expected the closed stream to count at least one xrun; it logged:\n{}",
        closed.join("\n")
    );
    let strip = |l: &&str| l.split("] ").nth(1).unwrap_or(l).to_string();
    (
        recovered.iter().map(strip).collect::<Vec<_>>().join(" | "),
        closed.iter().map(strip).collect::<Vec<_>>().join(" | "),
    )
}

/// An xrun, provoked for real: the broker plays through PipeWire's ALSA
/// plugin and its main thread (the one that feeds ALSA) is held still for
/// 300 ms while the plugin's own thread keeps consuming. The PCM runs dry;
/// the broker recovers, counts and logs the xrun, and the guest notices
/// nothing but late buffers: every one comes back S_OK and the stream
/// plays on after the stall.
#[test]
fn a_playback_xrun_is_recovered_counted_and_logged() {
    let pw = vsnd_tests::pipewire::PipeWire::start();
    let broker = pw_alsa_broker(&pw, "alsa-xrun-out", "output");
    let mut fe = broker.connect(FrontendOptions::default());
    let pid = broker.device_pid(PROMPT);
    let cfg = PcmConfig::s16_stereo_48k(20);
    const N: usize = 60; // 1.2 s
    let data = periods(&cfg, N, 0x7A11);
    setup_stream(&mut fe, OUT, &cfg);
    let staller = stall_broker_soon(&broker);
    let times = play_window(&mut fe, &cfg, &data, 0, 8);
    let stalled = staller.join().expect("the stalling thread");
    fixture::stop(&mut fe, OUT);
    fixture::release(&mut fe, OUT);
    let (recovered, closed) = assert_xrun_recovered(&broker, "playback", stalled);
    let last = *times.last().unwrap_or(&Duration::ZERO);
    let nominal = cfg.period() * N as u32;
    assert!(
        last >= nominal * 4 / 5,
        "{N} periods came back {last:?} after START; expected the stream to play on at the \
         real-time pace after the stall (at least 80% of {nominal:?})"
    );
    assert_responsive(&mut fe, &broker, pid, "after the xrun");
    println!(
        "playback xrun: the broker held for {stalled:?}; logged: {recovered}; closed: \
         {closed}; all {N} buffers S_OK, the last {last:?} after START (nominal {nominal:?})"
    );
}
