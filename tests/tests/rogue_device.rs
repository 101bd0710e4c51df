//! A rogue device against the real broker: `vsnd-fake-device` under a mode
//! name (see its module documentation) speaks the device⇄broker protocol
//! the way a device fully compromised by its guest could, and the tests
//! check what the design promises about it:
//!
//! * no message of the protocol turns input on or gets it host samples
//!   while input is off (the flags did not flip, nothing was audited, every
//!   capture byte it got is silence while the capture file is loud);
//! * capture requests past the size and count limits, malformed frames and
//!   protocol violations get the device killed and restarted, and the broker
//!   survives and keeps answering its control socket;
//! * a flood does not grow the broker's memory without bound, and does not
//!   stall the control socket;
//! * while input is off a capturing device gets silence at the real-time
//!   pace, and when the admin turns input on (through the control socket)
//!   the capture file's bytes flow: the broker decides, not the device.
//!
//! The broker runs as in production (as root in CI, its device as
//! `nobody`), with the `file` backend and a loud capture file (no byte of it
//! is 0x00 or 0x80). Every failure message says what was expected and what
//! came instead; the broker's log (its device's stderr included) is printed
//! when a test fails.

use std::path::Path;
use std::time::{Duration, Instant};

use vsnd_ipc::{MAX_BUFFER_BYTES, MAX_PENDING_CAPTURE};
use vsnd_tests::ctl::{
    field, has_open, loud_pattern, num, vm_rss_kib, wait_for, CtlClient, FakeDevice, GatedBroker,
};
use vsnd_tests::fixture::{looped, TempDir};

/// The capture file: loud, and not a multiple of the tests' periods.
const CAPTURE_LEN: usize = 8_888;
/// Bytes of one 10 ms period of S16 stereo at 48 kHz (what `fake-listen`
/// asks for).
const PERIOD_BYTES: usize = 1920;
/// One period.
const PERIOD: Duration = Duration::from_millis(10);
/// How much the broker's resident memory may grow during a flood.
const RSS_BOUND_KIB: u64 = 64 * 1024;
/// How long a control-socket round trip may take during a flood.
const QUERY_BOUND: Duration = Duration::from_secs(1);
/// How long the floods run.
const FLOOD_TIME: Duration = Duration::from_secs(4);
/// What the broker logs when it kills a device for a protocol violation
/// (`<VIOLATION>: <why>; <KILLED>`).
const VIOLATION: &str = "protocol violation by the device";
/// See [`VIOLATION`].
const KILLED: &str = "; killing the device";

fn fake_exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_vsnd-fake-device"))
}

/// A broker whose device is `fake-<mode>`, input off.
fn rogue_broker(mode: &str) -> (GatedBroker, FakeDevice, TempDir) {
    let dir = TempDir::new(&format!("rogue-{mode}-fake"));
    let fake = FakeDevice::new(dir.path(), mode, fake_exe());
    let program = fake.program().display().to_string();
    let broker = GatedBroker::start(
        &format!("rogue-{mode}"),
        "output",
        loud_pattern(CAPTURE_LEN),
        &["--device-path", &program],
    );
    (broker, fake, dir)
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// The devices killed for a protocol violation, with the reasons.
fn violations(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(VIOLATION) && l.contains(KILLED))
        .collect()
}

/// Wait until the fake reported a line starting with `prefix`.
fn wait_report(b: &GatedBroker, fake: &FakeDevice, prefix: &str, timeout: Duration) -> String {
    wait_for(timeout, || fake.reported(prefix).into_iter().next()).unwrap_or_else(|| {
        panic!(
            "expected the fake device to report `{prefix}…` within {timeout:?}, got report:\n{}\n\
             broker log:\n{}",
            fake.report().join("\n"),
            b.log_tail()
        )
    })
}

/// The flags did not move and nothing but the start-up was audited.
fn assert_gate_untouched(b: &GatedBroker, context: &str) {
    let q = b.query();
    assert_eq!(
        q,
        "OK output=on input=off",
        "{context}: expected the flags unchanged, got {q:?}; log:\n{}",
        b.log_tail()
    );
    let audit = b.audit_lines();
    assert_eq!(
        audit.len(),
        2,
        "{context}: expected only the two start-up lines in the audit log, got {audit:#?}"
    );
    assert!(
        audit.iter().all(|l| l.contains("source=start-up")),
        "{context}: expected only start-up records, got {audit:#?}"
    );
    let log = b.broker.log();
    assert_eq!(
        count(&log, " -> "),
        0,
        "{context}: expected no gate change in the broker log; log:\n{}",
        b.log_tail()
    );
}

#[test]
fn no_message_of_the_protocol_unmutes_the_microphone() {
    let (mut b, fake, _dir) = rogue_broker("unmute");
    let capture = wait_report(&b, &fake, "capture ", Duration::from_secs(10));
    wait_report(&b, &fake, "finished", Duration::from_secs(15));
    let n = |k: &str| num(&capture, k).unwrap_or(u64::MAX);
    assert_eq!(
        n("other"),
        0,
        "expected every capture byte the rogue got to be silence (0x00, or 0x80 in the unsigned \
         formats) while input is off, got {} other bytes: {capture}\nlog:\n{}",
        n("other"),
        b.log_tail()
    );
    assert!(
        n("bytes") >= 20 * PERIOD_BYTES as u64 && n("buffers") >= 20,
        "expected the rogue to have received at least 20 capture buffers of silence, got {capture}"
    );
    assert_eq!(
        field(&capture, "input_on_seen"),
        Some("false"),
        "expected the broker never to tell the rogue that input is on, got {capture}"
    );
    let explore = fake.reported("explore ");
    assert!(!explore.is_empty(), "expected an `explore` report line");
    for kind in [
        "set_params",
        "prepare",
        "start",
        "stop",
        "release",
        "capture",
        "playback",
    ] {
        assert!(
            num(&explore[0], kind).unwrap_or(0) > 0,
            "expected the random walk to send {kind} messages, got {}",
            explore[0]
        );
    }

    // Each disallowed message got the device killed, with the reason.
    let log = b.broker.log();
    for (what, needle) in [
        ("a second hello", "a second hello"),
        ("the forged Gate message", "undecodable frame"),
        ("START before SET_PARAMS", "input: Start in state Initial"),
        (
            "a capture request before PREPARE",
            "capture request in state ParamsSet",
        ),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(VIOLATION) && l.contains(needle)),
            "expected `{VIOLATION}: …{needle}…` for {what}; log:\n{}",
            b.log_tail()
        );
    }
    let v = violations(&log);
    assert_eq!(
        v.len(),
        5,
        "expected 5 devices killed (2 second hellos, a forged gate, 2 commands out of order), \
         got {v:#?}"
    );
    assert_eq!(
        count(&log, "a second hello"),
        4,
        "expected both later hellos (same and other version) to be refused as a second hello \
         (an error and a restart line each); log:\n{}",
        b.log_tail()
    );
    b.assert_running("after the rogue's attempts");
    assert_gate_untouched(&b, "after the rogue's attempts");
}

#[test]
fn capture_requests_past_the_limits_get_the_device_killed() {
    let (mut b, fake, _dir) = rogue_broker("big-capture");
    let largest = wait_report(&b, &fake, "largest-capture", Duration::from_secs(10));
    wait_report(&b, &fake, "finished", Duration::from_secs(10));
    assert_eq!(
        (num(&largest, "bytes"), num(&largest, "other")),
        (Some(u64::from(MAX_BUFFER_BYTES)), Some(0)),
        "expected a request of exactly MAX_BUFFER_BYTES to be answered with that many silent \
         bytes, got {largest}"
    );
    let log = b.broker.log();
    for needle in [
        format!(
            "capture request of {} bytes",
            u64::from(MAX_BUFFER_BYTES) + 1
        ),
        format!("capture request of {} bytes", u32::MAX),
        "too many capture requests".to_string(),
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(VIOLATION) && l.contains(&needle)),
            "expected `{VIOLATION}: {needle}`; log:\n{}",
            b.log_tail()
        );
    }
    let v = violations(&log);
    assert_eq!(
        v.len(),
        3,
        "expected exactly 3 devices killed (the {MAX_PENDING_CAPTURE} queued requests before \
         the last one are allowed), got {v:#?}"
    );
    assert!(
        b.broker.device_pids().len() >= 4,
        "expected a new device after each violation, got {:?}",
        b.broker.device_pids()
    );
    b.assert_running("after oversized capture requests");
    assert_gate_untouched(&b, "after oversized capture requests");
}

#[test]
fn malformed_frames_get_the_device_killed_and_the_broker_survives() {
    for mode in ["oversized", "truncated", "unknown-variant", "huge-length"] {
        let (mut b, fake, _dir) = rogue_broker(mode);
        wait_report(&b, &fake, "sending", Duration::from_secs(5));
        let restarted = wait_for(Duration::from_secs(5), || {
            let log = b.broker.log();
            (!violations(&log).is_empty() && b.broker.device_pids().len() >= 2).then_some(())
        });
        assert!(
            restarted.is_some(),
            "{mode}: expected `{VIOLATION}: undecodable frame` and a new device, got devices \
             {:?}; log:\n{}",
            b.broker.device_pids(),
            b.log_tail()
        );
        let log = b.broker.log();
        assert!(
            log.lines()
                .any(|l| l.contains(VIOLATION) && l.contains("undecodable frame")),
            "{mode}: expected the violation to name an undecodable frame; log:\n{}",
            b.log_tail()
        );
        b.assert_running(mode);
        assert_gate_untouched(&b, mode);
    }
}

/// Run a flood mode for [`FLOOD_TIME`]; sample the broker's RSS every 5 ms
/// and time QUERY round trips meanwhile. Returns (baseline, peak) KiB and
/// the slowest round trip.
fn flood(b: &GatedBroker, fake: &FakeDevice) -> (u64, u64, Duration) {
    let pid = b.pid();
    // The fake has greeted and waits for `.go`.
    b.broker.device_pid(Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(200));
    let baseline = vm_rss_kib(pid).expect("the broker's VmRSS");
    let mut client = b.client();
    fake.go();
    let t0 = Instant::now();
    let mut peak = baseline;
    let mut slowest = Duration::ZERO;
    let mut last_query = Instant::now();
    while t0.elapsed() < FLOOD_TIME {
        if let Some(rss) = vm_rss_kib(pid) {
            peak = peak.max(rss);
        }
        if last_query.elapsed() >= Duration::from_millis(50) {
            last_query = Instant::now();
            let answer = client.request("QUERY");
            slowest = slowest.max(last_query.elapsed());
            assert_eq!(
                answer.as_deref(),
                Ok("OK output=on input=off"),
                "expected QUERY to be answered during the flood; log:\n{}",
                b.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    fake.stop();
    (baseline, peak, slowest)
}

fn assert_flood_bounded(
    mode: &str,
    b: &mut GatedBroker,
    baseline: u64,
    peak: u64,
    slowest: Duration,
) {
    eprintln!(
        "{mode}: broker VmRSS baseline {baseline} KiB, peak {peak} KiB (+{} KiB); slowest QUERY {slowest:?}",
        peak - baseline
    );
    assert!(
        peak - baseline < RSS_BOUND_KIB,
        "{mode}: expected the broker's RSS to grow by less than {RSS_BOUND_KIB} KiB, got \
         {baseline} -> {peak} KiB; log:\n{}",
        b.log_tail()
    );
    assert!(
        slowest < QUERY_BOUND,
        "{mode}: expected QUERY round trips under {QUERY_BOUND:?} during the flood, the slowest \
         took {slowest:?}"
    );
    b.assert_running(mode);
    assert_gate_untouched(b, mode);
}

/// The flooding device was either killed as a violator or kept up with
/// (it stopped on `.stop` by itself); returns the reasons it was killed.
fn flood_outcome(mode: &str, b: &GatedBroker, fake: &FakeDevice) -> Vec<String> {
    let stopped = wait_for(Duration::from_secs(2), || {
        fake.reported("flood stopped").into_iter().next()
    });
    let log = b.broker.log();
    let mut reasons: Vec<String> = violations(&log)
        .iter()
        .filter_map(|l| l.split(VIOLATION).nth(1))
        .map(|r| {
            r.trim_start_matches(": ")
                .trim_end_matches(KILLED)
                .to_string()
        })
        .collect();
    eprintln!(
        "{mode}: {} devices killed as violators ({reasons:?}); flood reports: {:?}",
        reasons.len(),
        fake.reported("flood")
    );
    assert!(
        !reasons.is_empty() || stopped.is_some(),
        "{mode}: expected the broker to kill the flooding device as a violator or to keep up \
         with it until the end, got neither; log:\n{}",
        b.log_tail()
    );
    reasons.dedup();
    reasons
}

#[test]
fn a_flooding_device_does_not_grow_the_broker() {
    let (mut b, fake, _dir) = rogue_broker("flood");
    let (baseline, peak, slowest) = flood(&b, &fake);
    flood_outcome("flood", &b, &fake);
    assert_flood_bounded("flood", &mut b, baseline, peak, slowest);
}

#[test]
fn a_device_that_never_reads_its_capture_does_not_grow_the_broker() {
    let (mut b, fake, _dir) = rogue_broker("hoard");
    let (baseline, peak, slowest) = flood(&b, &fake);
    let reasons = flood_outcome("hoard", &b, &fake);
    assert!(
        reasons
            .iter()
            .all(|r| r.contains("does not read its channel")),
        "hoard: expected the device to be killed only for not reading its channel, got {reasons:?}"
    );
    assert_flood_bounded("hoard", &mut b, baseline, peak, slowest);
}

/// One `buf` line of `fake-listen`.
#[derive(Debug, Clone, Copy)]
struct Buf {
    id: u64,
    t_us: u64,
    len: u64,
    nonzero: u64,
    fnv: u64,
}

fn bufs(fake: &FakeDevice) -> Vec<Buf> {
    fake.reported("buf ")
        .iter()
        .filter(|l| field(l, "fnv").is_some_and(|f| f.len() == 18))
        .filter_map(|l| {
            Some(Buf {
                id: num(l, "id")?,
                t_us: num(l, "t_us")?,
                len: num(l, "len")?,
                nonzero: num(l, "nonzero")?,
                fnv: num(l, "fnv")?,
            })
        })
        .collect()
}

fn wait_bufs(b: &GatedBroker, fake: &FakeDevice, n: usize) -> Vec<Buf> {
    wait_for(Duration::from_secs(10), || {
        let v = bufs(fake);
        (v.len() >= n).then_some(v)
    })
    .unwrap_or_else(|| {
        panic!(
            "expected {n} capture buffers reported by fake-listen within 10 s, got {}; log:\n{}",
            bufs(fake).len(),
            b.log_tail()
        )
    })
}

#[test]
fn the_broker_not_the_device_decides_what_the_device_hears() {
    let (b, fake, _dir) = rogue_broker("listen");
    let pid = b.pid();
    let capture_path = b.broker.capture_path().to_path_buf();
    let capture = b.broker.capture_bytes().to_vec();

    // Input off: silence, at the real-time pace, and no capture file open.
    // The broker lets a stream run ahead of its clock: twice the real-time
    // rate at first, up to a quarter of a second (plus the buffer) ahead;
    // past that, the pace is the real-time one.
    let first = wait_bufs(&b, &fake, 100);
    let silent: Vec<&Buf> = first
        .iter()
        .filter(|x| x.nonzero > 0 || x.len != PERIOD_BYTES as u64)
        .collect();
    assert!(
        silent.is_empty(),
        "expected {} silent buffers of {PERIOD_BYTES} bytes while input is off, got {silent:?}",
        first.len()
    );
    let (a, z) = (first[60], first[99]);
    let took = Duration::from_micros(z.t_us - a.t_us);
    let periods = (z.id - a.id) as u32;
    assert!(
        took >= PERIOD * periods * 9 / 10,
        "expected {periods} capture buffers of 10 ms to take at least ~{:?} (the real-time \
         pace), they took {took:?}",
        PERIOD * periods
    );
    assert!(
        !has_open(pid, &capture_path),
        "expected the broker not to hold {} open while input is off",
        capture_path.display()
    );

    // The admin turns input on: the file's bytes flow, from its start.
    let mut admin = CtlClient::connect(&b.ctl).expect("connect to the control socket");
    let before_on = bufs(&fake).len();
    assert_eq!(
        admin.request("SET input on").as_deref(),
        Ok("OK output=on input=on")
    );
    let after_on = wait_for(Duration::from_secs(5), || {
        let v = bufs(&fake);
        let i = v.iter().skip(before_on).position(|x| x.nonzero > 0)?;
        (v.len() >= before_on + i + 10).then_some((v, before_on + i))
    });
    let (all, first_loud) = after_on.unwrap_or_else(|| {
        panic!(
            "expected non-silent capture within 5 s of `SET input on`, got {:?}; log:\n{}",
            bufs(&fake).iter().skip(before_on).collect::<Vec<_>>(),
            b.log_tail()
        )
    });
    assert!(
        first_loud - before_on <= 3,
        "expected the flip to reach the device within a period (at most 3 buffers already \
         under way), got {} silent buffers after `SET input on`",
        first_loud - before_on
    );
    let expected = looped(&capture, 10 * PERIOD_BYTES);
    for (k, buf) in all[first_loud..first_loud + 10].iter().enumerate() {
        let want = &expected[k * PERIOD_BYTES..(k + 1) * PERIOD_BYTES];
        assert_eq!(
            buf.fnv,
            vsnd_tests::ctl::fnv1a64(want),
            "expected buffer {k} after the flip to hold bytes {}..{} of the capture file, got \
             another content ({buf:?})",
            k * PERIOD_BYTES,
            (k + 1) * PERIOD_BYTES
        );
    }
    assert!(
        has_open(pid, &capture_path),
        "expected the broker to hold {} open while input is on and a stream captures",
        capture_path.display()
    );

    // And off again: silence within a period, the file closed.
    let before_off = bufs(&fake).len();
    assert_eq!(
        admin.request("SET input off").as_deref(),
        Ok("OK output=on input=off")
    );
    let after_off = wait_bufs(&b, &fake, before_off + 10);
    let loud_after: Vec<&Buf> = after_off[before_off..]
        .iter()
        .skip(3)
        .filter(|x| x.nonzero > 0)
        .collect();
    assert!(
        loud_after.is_empty(),
        "expected silence from the 4th buffer after `SET input off` on, got {loud_after:?}"
    );
    assert!(
        wait_for(Duration::from_secs(1), || (!has_open(pid, &capture_path))
            .then_some(()))
        .is_some(),
        "expected the broker to close {} once input is off",
        capture_path.display()
    );
    let audit = b.audit_lines();
    assert_eq!(
        audit.len(),
        4,
        "expected 2 start-up lines and 2 changes in the audit log, got {audit:#?}"
    );
}
