//! The gate as an administrator and a guest see it: the broker's output and
//! input flags, its control socket (through `socat`, `vsnd-ctl` and a raw
//! client), who may use it, its bounds, the audit trail, and what the flags
//! do to the audio a guest plays and records and to the jacks it sees.
//!
//! Every test runs the real `vsnd-broker` and `vsnd-device` (build them
//! first with `cargo build --workspace --bins`) with the `file` backend and
//! a loud capture file (no byte of it is zero). The permission tests start
//! clients as `nobody` (and as uid 65533), so these tests run as root, as CI
//! does. Failure messages say what was expected and what came instead; the
//! broker's log (and its device's) is printed when a test fails.

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vsnd_tests::bin_path;
use vsnd_tests::ctl::{
    has_open, loud_pattern, socat, user, vsnd_ctl, wait_for, CtlClient, GatedBroker, Line,
    ANSWER_TIMEOUT, NOBODY,
};
use vsnd_tests::fixture::{
    add_rx, add_tx, assert_same_bytes, looped, pcm_pattern, query_all, setup_stream, start,
    tx_status, wait_used, PcmConfig, TempDir,
};
use vsnd_tests::frontend::{Frontend, FrontendOptions};
use vsnd_tests::snd::{self, Event, JackInfo, PcmStatus};

const OUT: u32 = 0;
const IN: u32 = 1;

/// Longest request line the broker accepts (`MAX_LINE` in
/// broker/src/control_socket.rs).
const MAX_LINE: usize = 256;
/// Most clients at once (`MAX_CLIENTS`).
const MAX_CLIENTS: usize = 64;
/// The capture file: loud, and not a multiple of the tests' periods.
const CAPTURE_LEN: usize = 8_888;
/// Generous bound for anything that should happen "at once".
const PROMPT: Duration = Duration::from_secs(2);
/// How long a test watches for something that must not come.
const QUIET: Duration = Duration::from_millis(300);
/// How long a control-socket round trip may take while another client
/// floods the broker with changes.
const ROUND_TRIP_BOUND: Duration = Duration::from_secs(1);
/// How many RX/TX buffers a streaming test keeps in flight.
const IN_FLIGHT: usize = 4;
/// A flip takes effect from the next period the broker generates; buffers
/// it generated before (at most the ones in flight) may still come back
/// with the old state.
const STALE_BUFFERS: usize = IN_FLIGHT;

// vsnd-ctl's exit codes.
const CTL_OK: i32 = 0;
const CTL_REFUSED: i32 = 1;
const CTL_USAGE: i32 = 2;
const CTL_UNREACHABLE: i32 = 3;
const CTL_DENIED: i32 = 4;

/// The permission tests start clients as other users.
fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs clients as {NOBODY} and uid 65533, so it must run as root (as CI does)"
    );
}

fn gated(tag: &str) -> GatedBroker {
    GatedBroker::start(tag, "output", loud_pattern(CAPTURE_LEN), &[])
}

fn assert_ok(b: &GatedBroker, got: &str, want: &str, what: &str) {
    assert_eq!(
        got,
        want,
        "{what}: expected {want:?}, got {got:?}; log:\n{}",
        b.log_tail()
    );
}

// ---------------------------------------------------------------------------
// The control protocol
// ---------------------------------------------------------------------------

#[test]
fn control_protocol_through_socat() {
    let b = gated("gate-socat");
    let session = "QUERY\nSET input on\nSET input on\nSET output off\nSET output on\n\
                   SET input off\nBOGUS\nSET mic on\nSET input maybe\nSET input on now\n\
                   QUERY me\n\nquery\n";
    let out = socat(&b.ctl, session.as_bytes(), None);
    assert_eq!(out.code(), Some(0), "socat: {out}");
    let want = [
        "OK output=on input=off",
        "OK output=on input=on",
        "OK output=on input=on",
        "OK output=off input=on",
        "OK output=on input=on",
        "OK output=on input=off",
        "ERR unknown command",
        "ERR bad direction",
        "ERR bad value",
        "ERR usage: SET output|input on|off",
        "ERR QUERY takes no arguments",
        "ERR empty request",
        "OK output=on input=off",
    ];
    let got: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(
        got.len(),
        want.len(),
        "expected {} answer lines (errors leave the connection usable), got {got:#?}",
        want.len()
    );
    for (g, w) in got.iter().zip(want) {
        assert!(
            g.starts_with(w),
            "expected an answer starting {w:?}, got {g:?}; all answers: {got:#?}"
        );
    }

    // A line of exactly MAX_LINE bytes is still a request…
    let mut exact = "QUERY".to_string();
    exact.push_str(&" ".repeat(MAX_LINE - exact.len()));
    let out = socat(&b.ctl, format!("{exact}\nQUERY\n").as_bytes(), None);
    assert_eq!(
        out.stdout, "OK output=on input=off\nOK output=on input=off\n",
        "a {MAX_LINE}-byte line: {out}"
    );
    // …one byte more is refused, and the connection is closed: the QUERY
    // after it is never answered.
    let long = format!("{exact} \nQUERY\n");
    let out = socat(&b.ctl, long.as_bytes(), None);
    assert_eq!(
        out.stdout,
        format!("ERR line longer than {MAX_LINE} bytes\n"),
        "a {}-byte line: {out}",
        MAX_LINE + 1
    );
    let mut c = b.client();
    c.send_raw(&[b'x'; 4 * MAX_LINE]).unwrap();
    let first = c.read_line(ANSWER_TIMEOUT);
    assert!(
        matches!(&first, Line::Line(l) if l.starts_with("ERR line longer")),
        "an endless line: expected `ERR line longer…`, got {first:?}"
    );
    let next = c.read_line(ANSWER_TIMEOUT);
    assert_eq!(
        next,
        Line::Closed,
        "after an over-long line: expected the connection closed"
    );
    assert_ok(&b, &b.query(), "OK output=on input=off", "QUERY afterwards");
}

#[test]
fn vsnd_ctl_answers_and_exit_codes() {
    let b = gated("gate-vsnd-ctl");
    let ok = |args: &[&str], want: &str| {
        let out = vsnd_ctl(&b.ctl, args, None);
        assert_eq!(
            (out.code(), out.stdout.as_str()),
            (Some(CTL_OK), format!("{want}\n").as_str()),
            "vsnd-ctl {args:?}: {out}; log:\n{}",
            b.log_tail()
        );
    };
    ok(&["query"], "output=on input=off");
    ok(&["set", "input", "on"], "output=on input=on");
    ok(&["set", "input", "on"], "output=on input=on");
    ok(&["set", "output", "off"], "output=off input=on");
    ok(&["set", "output", "on"], "output=on input=on");
    ok(&["set", "input", "off"], "output=on input=off");
    ok(&["query"], "output=on input=off");

    for args in [
        &["set", "mic", "on"][..],
        &["set", "input", "maybe"],
        &["set", "input"],
        &["frobnicate"],
        &[],
    ] {
        let out = vsnd_ctl(&b.ctl, args, None);
        assert_eq!(
            out.code(),
            Some(CTL_USAGE),
            "vsnd-ctl {args:?}: expected exit {CTL_USAGE} (usage), got {out}"
        );
    }
    let missing = b.ctl_dir().join("no-such.sock");
    let out = vsnd_ctl(&missing, &["query"], None);
    assert_eq!(
        out.code(),
        Some(CTL_UNREACHABLE),
        "vsnd-ctl on a missing socket: expected exit {CTL_UNREACHABLE}, got {out}"
    );
    assert!(
        out.stderr.contains("cannot connect"),
        "vsnd-ctl on a missing socket: expected `cannot connect` on stderr, got {out}"
    );
    // Refused (exit 1) is covered with `ERR too many clients` in
    // clients_are_bounded_and_a_slow_reader_stalls_no_one; denied (exit 4)
    // in a_peer_that_is_not_allowed_is_refused_after_connecting.
}

#[test]
fn subscribers_hear_every_change() {
    let b = gated("gate-subscribe");
    let mut raw = b.client();
    assert_eq!(
        raw.request("SUBSCRIBE").as_deref(),
        Ok("OK output=on input=off")
    );

    // A second subscriber: vsnd-ctl, its lines read in a thread.
    let mut child = Command::new(bin_path("vsnd-ctl"))
        .arg("--socket")
        .arg(&b.ctl)
        .arg("subscribe")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start vsnd-ctl subscribe");
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().expect("vsnd-ctl stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = rx.recv_timeout(ANSWER_TIMEOUT);
    assert_eq!(
        first.as_deref(),
        Ok("output=on input=off"),
        "vsnd-ctl subscribe: expected the current flags first"
    );

    for (dir, value) in [
        ("input", "on"),
        ("input", "on"),
        ("output", "off"),
        ("output", "off"),
        ("output", "on"),
        ("input", "off"),
    ] {
        let out = vsnd_ctl(&b.ctl, &["set", dir, value], None);
        assert_eq!(
            out.code(),
            Some(CTL_OK),
            "vsnd-ctl set {dir} {value}: {out}"
        );
    }
    let want = [
        "output=on input=on",
        "output=off input=on",
        "output=on input=on",
        "output=on input=off",
    ];
    for w in want {
        let got = raw.read_line(ANSWER_TIMEOUT);
        assert_eq!(
            got,
            Line::Line(format!("EVENT {w}")),
            "raw subscriber: expected `EVENT {w}`"
        );
        let got = rx.recv_timeout(ANSWER_TIMEOUT);
        assert_eq!(got.as_deref(), Ok(w), "vsnd-ctl subscribe: expected {w:?}");
    }
    // A SET to the current value is no change: no event.
    assert_eq!(
        raw.read_line(QUIET),
        Line::Timeout,
        "raw subscriber: no further event"
    );
    assert!(
        rx.recv_timeout(Duration::from_millis(50)).is_err(),
        "vsnd-ctl subscribe: no further event"
    );
    // A subscriber is still a client: QUERY on the same connection works.
    assert_eq!(
        raw.request("QUERY").as_deref(),
        Ok("OK output=on input=off")
    );
    let _ = child.kill();
    let _ = child.wait();
}

// ---------------------------------------------------------------------------
// The socket file and who may use it
// ---------------------------------------------------------------------------

#[test]
fn socket_file_is_0600_owned_by_the_broker_and_removed_at_exit() {
    // Run the broker with nothing but a control socket (and the null
    // backend), so that its default --initial-streams is what QUERY shows.
    let dir = TempDir::new("gate-socket-file");
    let ctl = dir.path().join("ctl.sock");
    let mut broker = Command::new(bin_path("vsnd-broker"))
        .arg("--socket")
        .arg(dir.path().join("vsnd.sock"))
        .arg("--control-socket")
        .arg(&ctl)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vsnd-broker");
    let log = broker.stderr.take().expect("broker stderr");
    let log_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(log), &mut s);
        s
    });
    let appeared = wait_for(PROMPT, || ctl.exists().then_some(()));
    let check = || -> Result<(), String> {
        appeared.ok_or("expected the control socket to appear")?;
        let meta = std::fs::symlink_metadata(&ctl).map_err(|e| e.to_string())?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode != 0o600 {
            return Err(format!("expected mode 0600, got {mode:04o}"));
        }
        let own = nix::unistd::getuid().as_raw();
        if meta.uid() != own {
            return Err(format!(
                "expected owner uid {own} (the broker's), got {}",
                meta.uid()
            ));
        }
        let mut c = CtlClient::connect(&ctl).map_err(|e| e.to_string())?;
        let q = c.request("QUERY")?;
        if q != "OK output=on input=off" {
            return Err(format!(
                "expected the default flags `OK output=on input=off`, got {q:?}"
            ));
        }
        Ok(())
    };
    let result = check();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(broker.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = broker.wait().expect("wait for the broker");
    let log = log_t.join().unwrap_or_default();
    if let Err(e) = result {
        panic!("{e}; broker log:\n{log}");
    }
    assert!(
        status.success(),
        "expected exit 0 after SIGTERM, got {status}; log:\n{log}"
    );
    assert!(
        !ctl.exists(),
        "expected the control socket to be removed at exit; log:\n{log}"
    );
}

#[test]
fn a_user_without_access_cannot_even_connect() {
    require_root();
    let b = gated("gate-no-access");
    let nobody = user(NOBODY);
    let out = vsnd_ctl(&b.ctl, &["set", "input", "on"], Some(nobody));
    assert_eq!(
        out.code(),
        Some(CTL_UNREACHABLE),
        "vsnd-ctl as {NOBODY} on a 0600 socket: expected exit {CTL_UNREACHABLE}, got {out}"
    );
    assert!(
        out.stderr.contains("Permission denied"),
        "vsnd-ctl as {NOBODY}: expected EACCES on stderr, got {out}"
    );
    let out = socat(&b.ctl, b"SET input on\n", Some(nobody));
    assert!(
        out.code() != Some(0) && out.stdout.is_empty(),
        "socat as {NOBODY} on a 0600 socket: expected a failed connect, got {out}"
    );
    assert_ok(&b, &b.query(), "OK output=on input=off", "QUERY");
    assert_eq!(
        b.audit_lines().len(),
        2,
        "no change audited: {:#?}",
        b.audit_lines()
    );
}

#[test]
fn a_peer_that_is_not_allowed_is_refused_after_connecting() {
    // The file mode is the first fence; SO_PEERCRED is the second. Open the
    // first (as a careless admin might) and check the second holds.
    require_root();
    let b = gated("gate-peercred");
    std::fs::set_permissions(&b.ctl, std::fs::Permissions::from_mode(0o666)).unwrap();
    let nobody = user(NOBODY);

    // socat -u only reads (a refused client's writes may fail once the
    // broker has closed, and socat then gives up before reading).
    let mut cmd = Command::new("socat");
    cmd.args(["-u", "-t", "2"])
        .arg(format!("UNIX-CONNECT:{}", b.ctl.display()))
        .arg("-");
    vsnd_tests::ctl::run_as(&mut cmd, nobody);
    let out = vsnd_tests::ctl::run(cmd, b"");
    assert_eq!(
        (out.stdout.as_str(), out.status.is_some()),
        ("ERR permission denied\n", true),
        "socat as {NOBODY}: expected `ERR permission denied` and then the end of the \
         connection, got {out}"
    );
    let out = vsnd_ctl(&b.ctl, &["set", "input", "on"], Some(nobody));
    assert_eq!(
        out.code(),
        Some(CTL_DENIED),
        "vsnd-ctl as {NOBODY}: expected exit {CTL_DENIED} (permission denied), got {out}"
    );
    assert!(
        out.stderr.contains("permission denied"),
        "vsnd-ctl as {NOBODY}: expected the reason on stderr, got {out}"
    );
    assert_ok(
        &b,
        &b.query(),
        "OK output=on input=off",
        "QUERY after the refusals",
    );
    assert_eq!(
        b.audit_lines().len(),
        2,
        "no change audited: {:#?}",
        b.audit_lines()
    );
    let (uid, _) = nobody;
    assert!(
        b.broker
            .log()
            .contains(&format!("control socket: refused uid {uid}")),
        "expected the broker to log the refused uid {uid}; log:\n{}",
        b.log_tail()
    );
}

#[test]
fn an_allowed_uid_gets_in_through_an_acl() {
    require_root();
    let nobody = user(NOBODY);
    let allow = nobody.0.to_string();
    let b = GatedBroker::start(
        "gate-acl",
        "output",
        loud_pattern(CAPTURE_LEN),
        &["--control-allow-uid", &allow],
    );
    assert!(
        has_xattr(&b.ctl, "system.posix_acl_access"),
        "expected a POSIX ACL on {}",
        b.ctl.display()
    );
    let out = vsnd_ctl(&b.ctl, &["set", "input", "on"], Some(nobody));
    assert_eq!(
        (out.code(), out.stdout.as_str()),
        (Some(CTL_OK), "output=on input=on\n"),
        "vsnd-ctl as allowed uid {allow}: {out}; log:\n{}",
        b.log_tail()
    );
    let audit = b.audit_lines();
    let last = audit.last().cloned().unwrap_or_default();
    let want = format!(
        " input off -> on uid={allow} pid={} comm=\"vsnd-ctl\" source=control-socket",
        out.pid
    );
    assert!(
        last.ends_with(&want),
        "expected the change audited as `…{want}`, got {audit:#?}"
    );

    // A uid that is neither allowed nor the broker's: the ACL gives it no
    // access to the file, or the broker refuses it.
    let stranger = (65533, 65533);
    let out = vsnd_ctl(&b.ctl, &["set", "input", "off"], Some(stranger));
    match out.code() {
        Some(CTL_UNREACHABLE) => assert!(
            out.stderr.contains("Permission denied"),
            "uid 65533: expected EACCES, got {out}"
        ),
        Some(CTL_DENIED) => {}
        _ => panic!("uid 65533: expected exit {CTL_UNREACHABLE} or {CTL_DENIED}, got {out}"),
    }
    assert_ok(
        &b,
        &b.query(),
        "OK output=on input=on",
        "QUERY after the stranger",
    );
    assert_eq!(b.audit_lines().len(), 3, "{:#?}", b.audit_lines());
}

fn has_xattr(path: &Path, name: &str) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: both strings are NUL-terminated; a null buffer of size 0 asks
    // only for the value's size.
    let rc = unsafe { libc::getxattr(p.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) };
    rc > 0
}

// ---------------------------------------------------------------------------
// Bounds
// ---------------------------------------------------------------------------

#[test]
fn clients_are_bounded_and_a_slow_reader_stalls_no_one() {
    let b = gated("gate-bounds");
    let mut idle: Vec<CtlClient> = (0..MAX_CLIENTS).map(|_| b.client()).collect();
    let mut extra = b.client();
    let got = extra.read_line(ANSWER_TIMEOUT);
    assert_eq!(
        got,
        Line::Line("ERR too many clients".into()),
        "client {}: expected to be turned away",
        MAX_CLIENTS + 1
    );
    assert_eq!(
        extra.read_line(ANSWER_TIMEOUT),
        Line::Closed,
        "and disconnected"
    );
    let out = vsnd_ctl(&b.ctl, &["query"], None);
    assert_eq!(
        out.code(),
        Some(CTL_REFUSED),
        "vsnd-ctl with {MAX_CLIENTS} clients connected: expected exit {CTL_REFUSED} (refused), got {out}"
    );
    assert_eq!(
        idle[0].request("QUERY").as_deref(),
        Ok("OK output=on input=off"),
        "one of the {MAX_CLIENTS} idle clients"
    );
    // A place freed is a place taken.
    idle.pop();
    let again = wait_for(PROMPT, || {
        let mut c = CtlClient::connect(&b.ctl).ok()?;
        c.request("QUERY").ok().filter(|a| a.starts_with("OK"))
    });
    assert!(
        again.is_some(),
        "expected a new client to get in after one left"
    );
    drop(idle);

    // A subscriber that never reads, one that does, a client that measures
    // QUERY round trips, and one that flips input 2000 times.
    const FLIPS: usize = 2000;
    // (Once the broker has seen the idle clients go.)
    let mut sleeper = wait_for(PROMPT, || {
        let mut c = CtlClient::connect(&b.ctl).ok()?;
        (c.request("SUBSCRIBE").ok()? == "OK output=on input=off").then_some(c)
    })
    .unwrap_or_else(|| panic!("expected to subscribe once the idle clients left"));
    let reader_t = subscriber(&b, FLIPS);
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let mut prober = b.client();
    let prober_t = std::thread::spawn(move || {
        let mut slowest = Duration::ZERO;
        let mut n = 0;
        while stop_rx.try_recv().is_err() {
            let t = Instant::now();
            let a = prober.request("QUERY");
            slowest = slowest.max(t.elapsed());
            if a.is_err() {
                return (n, Duration::MAX);
            }
            n += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        (n, slowest)
    });
    let mut flipper = b.client();
    let t0 = Instant::now();
    for i in 0..FLIPS {
        let want = if i % 2 == 0 { "on" } else { "off" };
        let a = flipper.request(&format!("SET input {want}"));
        assert_eq!(
            a,
            Ok(format!("OK output=on input={want}")),
            "flip {i}; log:\n{}",
            b.log_tail()
        );
    }
    let flips_took = t0.elapsed();
    let _ = stop_tx.send(());
    let (probes, slowest) = prober_t.join().unwrap();
    let events = reader_t.join().unwrap();
    eprintln!(
        "{FLIPS} flips took {flips_took:?}; {probes} QUERY round trips meanwhile, the slowest \
         {slowest:?}"
    );
    assert_eq!(
        events.len(),
        FLIPS,
        "expected the subscriber that reads to get one event per flip"
    );
    assert!(
        slowest < ROUND_TRIP_BOUND && probes > 0,
        "expected QUERY round trips under {ROUND_TRIP_BOUND:?} during the flips, the slowest \
         of {probes} took {slowest:?}"
    );

    // The sleeper was dropped once its queue was full: it can read what
    // was queued, then the end of the connection, long before 2000 events.
    let mut got = 0;
    let end = loop {
        match sleeper.read_line(ANSWER_TIMEOUT) {
            Line::Line(l) if l.starts_with("EVENT ") => got += 1,
            other => break other,
        }
    };
    assert!(
        end == Line::Closed && got < FLIPS,
        "expected the subscriber that never reads to be disconnected before {FLIPS} events, \
         it got {got} events and then {end:?}"
    );
    eprintln!("the subscriber that never read got {got} events before it was dropped");
    assert_eq!(b.audit_lines().len(), 2 + FLIPS, "one audit line per flip");
}

/// A subscriber reading in a thread until it has `n` events (or 5 s pass
/// without one); returns the events.
fn subscriber(b: &GatedBroker, n: usize) -> std::thread::JoinHandle<Vec<String>> {
    let mut c = b.client();
    assert_eq!(
        c.request("SUBSCRIBE").as_deref(),
        Ok("OK output=on input=off")
    );
    std::thread::spawn(move || {
        let mut events = Vec::new();
        while events.len() < n {
            match c.read_line(ANSWER_TIMEOUT) {
                Line::Line(l) => events.push(l),
                Line::Closed | Line::Timeout => break,
            }
        }
        events
    })
}

#[test]
fn a_client_pipelining_changes_stalls_neither_audio_nor_other_clients() {
    // Each change is also synced to the audit log: a client that sends
    // thousands of changes in one write must be served a few at a time,
    // between periods of audio and the other clients' requests.
    const FLIPS: usize = 4000;
    let b = gated("gate-pipeline");
    let mut fe = b.broker.connect(FrontendOptions::default());
    let cap = Capture::start(&mut fe, PcmConfig::s16_stereo_48k(10));
    for _ in 0..5 {
        cap.next(&mut fe, &b);
    }
    let events_t = subscriber(&b, FLIPS);
    let mut flooder = b.client();
    // Its answers are read in a thread, so that its queue never fills.
    let mut answers =
        CtlClient::from_stream(flooder.stream().try_clone().expect("clone the socket"));
    let answers_t = std::thread::spawn(move || {
        let mut n = 0;
        while n < FLIPS {
            match answers.read_line(ANSWER_TIMEOUT) {
                Line::Line(l) if l.starts_with("OK") => n += 1,
                _ => break,
            }
        }
        n
    });
    let burst: String = (0..FLIPS)
        .map(|i| {
            if i % 2 == 0 {
                "SET input on\n"
            } else {
                "SET input off\n"
            }
        })
        .collect();
    let writer_t = std::thread::spawn(move || flooder.send_raw(burst.as_bytes()));

    let mut prober = b.client();
    let t0 = Instant::now();
    let (mut slowest_query, mut longest_gap) = (Duration::ZERO, Duration::ZERO);
    let mut last = Instant::now();
    while !answers_t.is_finished() && t0.elapsed() < Duration::from_secs(15) {
        let (at, _) = cap.next(&mut fe, &b);
        longest_gap = longest_gap.max(at - last);
        last = at;
        let q = Instant::now();
        let a = prober.request("QUERY");
        slowest_query = slowest_query.max(q.elapsed());
        assert!(a.is_ok(), "QUERY during the flood: {a:?}");
    }
    let took = t0.elapsed();
    let answered = answers_t.join().unwrap();
    writer_t.join().unwrap().expect("send the burst");
    let events = events_t.join().unwrap();
    eprintln!(
        "{FLIPS} pipelined changes answered in {took:?}; meanwhile the longest gap between \
         capture buffers was {longest_gap:?} and the slowest QUERY {slowest_query:?}"
    );
    assert_eq!(
        answered, FLIPS,
        "expected every pipelined SET to be answered"
    );
    assert!(
        longest_gap < Duration::from_millis(500) && slowest_query < ROUND_TRIP_BOUND,
        "expected audio and other clients to keep going during the flood (10 ms periods, \
         QUERY under {ROUND_TRIP_BOUND:?}), got a {longest_gap:?} gap between capture buffers \
         and a {slowest_query:?} QUERY"
    );
    assert_eq!(events.len(), FLIPS, "expected one EVENT per change");
    let wrong: Vec<(usize, &String)> = events
        .iter()
        .enumerate()
        .filter(|(i, e)| {
            let want = if i % 2 == 0 { "on" } else { "off" };
            **e != format!("EVENT output=on input={want}")
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "expected the events to alternate input=on, input=off like the changes, got (index, \
         event) {:?}…",
        &wrong[..wrong.len().min(5)]
    );
    assert_eq!(
        b.audit_lines().len(),
        2 + FLIPS,
        "one audit line per change"
    );
}

// ---------------------------------------------------------------------------
// The audit trail
// ---------------------------------------------------------------------------

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Parse `YYYY-MM-DDTHH:MM:SS.mmmZ` into Unix seconds.
fn parse_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 24 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || b[19] != b'.' || b[23] != b'Z' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let days = days_from_civil(n(0..4)?, n(5..7)?, n(8..10)?);
    let _millis = n(20..23)?;
    Some(days * 86_400 + n(11..13)? * 3600 + n(14..16)? * 60 + n(17..19)?)
}

/// The time of an audit line, checked to be within a minute of now, and
/// the rest of the line.
fn audit_record(line: &str) -> &str {
    let (time, rest) = line
        .split_once(' ')
        .unwrap_or_else(|| panic!("audit line without a time: {line:?}"));
    let t = parse_time(time)
        .unwrap_or_else(|| panic!("expected a time YYYY-MM-DDTHH:MM:SS.mmmZ, got {time:?}"));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (now - t).abs() < 60,
        "expected the audit time {time} to be now (UTC), it is {}s off",
        now - t
    );
    rest
}

#[test]
fn every_change_is_audited_once_with_who_made_it() {
    let b = gated("gate-audit");
    let start = b.audit_lines();
    let rest: Vec<&str> = start.iter().map(|l| audit_record(l)).collect();
    assert_eq!(
        rest,
        [
            "output on (initial) source=start-up",
            "input off (initial) source=start-up"
        ],
        "the audit log after start-up"
    );

    let ctl = vsnd_ctl(&b.ctl, &["set", "input", "on"], None);
    assert_eq!(ctl.code(), Some(CTL_OK), "{ctl}");
    let soc = socat(&b.ctl, b"SET output off\n", None);
    assert_eq!(soc.stdout, "OK output=off input=on\n", "{soc}");
    // No change, no record.
    let same = vsnd_ctl(&b.ctl, &["set", "input", "on"], None);
    assert_eq!(same.code(), Some(CTL_OK), "{same}");
    let same = socat(&b.ctl, b"SET output off\nSET output off\n", None);
    assert_eq!(same.code(), Some(0), "{same}");
    let uid = nix::unistd::getuid().as_raw();
    let want = [
        format!(
            "input off -> on uid={uid} pid={} comm=\"vsnd-ctl\" source=control-socket",
            ctl.pid
        ),
        format!(
            "output on -> off uid={uid} pid={} comm=\"socat\" source=control-socket",
            soc.pid
        ),
    ];
    let lines = b.audit_lines();
    assert_eq!(
        lines.len(),
        4,
        "expected 2 start-up lines and one per change, got {lines:#?}"
    );
    for (line, w) in lines[2..].iter().zip(&want) {
        assert_eq!(audit_record(line), w, "audit line {line:?}");
    }
    let log = b.broker.log();
    for line in &lines {
        assert!(
            log.contains(&format!("audit: {line}")),
            "expected the broker log to carry the audit line {line:?}; log:\n{}",
            b.log_tail()
        );
    }
    // The file is the broker's alone.
    let mode = std::fs::metadata(&b.audit).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "audit log mode");
}

// ---------------------------------------------------------------------------
// What the flags do to the audio
// ---------------------------------------------------------------------------

/// A capture stream kept running: one RX buffer replaces each that returns.
struct Capture {
    cfg: PcmConfig,
}

impl Capture {
    fn start(fe: &mut Frontend, cfg: PcmConfig) -> Self {
        setup_stream(fe, IN, &cfg);
        start(fe, IN);
        for _ in 0..IN_FLIGHT {
            add_rx(fe, IN, cfg.period_bytes);
        }
        fe.kick(snd::QUEUE_RX).unwrap();
        Capture { cfg }
    }

    /// The next buffer: when it came back and its data (status checked).
    fn next(&self, fe: &mut Frontend, b: &GatedBroker) -> (Instant, Vec<u8>) {
        let u = wait_used(fe, snd::QUEUE_RX, PROMPT, "a capture buffer");
        let at = Instant::now();
        add_rx(fe, IN, self.cfg.period_bytes);
        fe.kick(snd::QUEUE_RX).unwrap();
        let (data, st) = PcmStatus::split_rx(&u.writable_bytes)
            .unwrap_or_else(|e| panic!("capture buffer: {e}"));
        assert_eq!(
            (st.status, data.len()),
            (snd::S_OK, self.cfg.period_bytes as usize),
            "expected a full capture buffer with status OK, got {} with {} bytes; log:\n{}",
            snd::status_name(st.status),
            data.len(),
            b.log_tail()
        );
        (at, data.to_vec())
    }
}

#[test]
fn capture_is_silence_while_input_is_off_and_the_file_when_it_is_on() {
    let b = gated("gate-capture");
    let pid = b.pid();
    let cap_path = b.broker.capture_path().to_path_buf();
    let capture = b.broker.capture_bytes().to_vec();
    let mut fe = b.broker.connect(FrontendOptions::default());
    let cfg = PcmConfig::s16_stereo_48k(10);
    let cap = Capture::start(&mut fe, cfg);

    // Off: exact zeros, paced, and the file is not open.
    let mut times = Vec::new();
    for i in 0..30 {
        let (at, data) = cap.next(&mut fe, &b);
        assert!(
            data.iter().all(|&x| x == 0),
            "buffer {i} while input is off: expected exact zeros, got {} non-zero bytes",
            data.iter().filter(|&&x| x != 0).count()
        );
        times.push(at);
    }
    let took = times[29] - times[IN_FLIGHT + 1];
    let want = cfg.period() * (29 - IN_FLIGHT as u32 - 1);
    assert!(
        took >= want * 9 / 10,
        "expected capture at the real-time pace: {} buffers of {:?} in at least ~{want:?}, \
         they took {took:?}",
        29 - IN_FLIGHT - 1,
        cfg.period()
    );
    assert!(
        !has_open(pid, &cap_path),
        "expected the broker not to hold the capture file open while input is off"
    );

    // On while capturing: the file's bytes, from its start, within a period.
    let mut admin = b.client();
    assert_eq!(
        admin.request("SET input on").as_deref(),
        Ok("OK output=on input=on")
    );
    let flipped = Instant::now();
    let mut stale = 0;
    let (first_at, first) = loop {
        let (at, data) = cap.next(&mut fe, &b);
        if data.iter().any(|&x| x != 0) {
            break (at, data);
        }
        stale += 1;
        assert!(
            stale <= STALE_BUFFERS,
            "expected the capture file's bytes within {STALE_BUFFERS} buffers of `SET input \
             on`, got {stale} silent ones; log:\n{}",
            b.log_tail()
        );
    };
    eprintln!(
        "input on: the first loud buffer came {:?} after the answer ({stale} silent before it)",
        first_at - flipped
    );
    let mut got = first;
    for _ in 0..9 {
        got.extend(cap.next(&mut fe, &b).1);
    }
    assert_same_bytes(
        "10 capture buffers after `SET input on` (the capture file from its start)",
        &got,
        &looped(&capture, got.len()),
    );
    assert!(
        has_open(pid, &cap_path),
        "expected the broker to hold the capture file open while input is on"
    );

    // Off again: zeros within a period, and the file closed.
    assert_eq!(
        admin.request("SET input off").as_deref(),
        Ok("OK output=on input=off")
    );
    let mut stale = 0;
    loop {
        let (_, data) = cap.next(&mut fe, &b);
        if data.iter().all(|&x| x == 0) {
            break;
        }
        stale += 1;
        assert!(
            stale <= STALE_BUFFERS,
            "expected silence within {STALE_BUFFERS} buffers of `SET input off`, got {stale} \
             loud ones"
        );
    }
    for i in 0..10 {
        let (_, data) = cap.next(&mut fe, &b);
        assert!(
            data.iter().all(|&x| x == 0),
            "buffer {i} after input went off again: expected exact zeros"
        );
    }
    assert!(
        !has_open(pid, &cap_path),
        "expected the broker to close the capture file when input goes off"
    );
}

#[test]
fn playback_is_discarded_at_the_real_time_pace_while_output_is_off() {
    let b = gated("gate-playback");
    assert_eq!(b.request("SET output off"), "OK output=off input=off");
    let mut fe = b.broker.connect(FrontendOptions::default());
    let cfg = PcmConfig::s16_stereo_48k(10);
    setup_stream(&mut fe, OUT, &cfg);
    start(&mut fe, OUT);
    let period = cfg.period_bytes as usize;
    let mut sent = Vec::new();
    let mut n = 0u64;
    let mut submit = |fe: &mut Frontend, sent: &mut Vec<u8>| {
        let data = pcm_pattern(1000 + n, period);
        n += 1;
        add_tx(fe, OUT, &data);
        fe.kick(snd::QUEUE_TX).unwrap();
        sent.extend_from_slice(&data);
    };
    for _ in 0..IN_FLIGHT {
        submit(&mut fe, &mut sent);
    }
    let complete = |fe: &mut Frontend| {
        let u = wait_used(fe, snd::QUEUE_TX, PROMPT, "a playback buffer");
        let st = tx_status(&u, "playback buffer");
        assert_eq!(st.status, snd::S_OK, "playback status");
        Instant::now()
    };
    let t0 = complete(&mut fe);
    const N: u32 = 25;
    for _ in 0..N {
        submit(&mut fe, &mut sent);
        complete(&mut fe);
    }
    let took = t0.elapsed();
    let want = cfg.period() * N;
    assert!(
        took >= want * 9 / 10,
        "expected {N} playback buffers to complete at the real-time pace (~{want:?}) while \
         output is off, they took {took:?}"
    );
    assert!(
        b.broker.played().is_empty(),
        "expected nothing in the playback file while output is off, got {} bytes",
        b.broker.played().len()
    );

    // On: what is consumed from now on reaches the file.
    assert_eq!(b.request("SET output on"), "OK output=on input=off");
    const M: usize = 20;
    for _ in 0..M {
        submit(&mut fe, &mut sent);
        complete(&mut fe);
    }
    for _ in 0..IN_FLIGHT - 1 {
        complete(&mut fe);
    }
    // The device sends what it consumed to the broker as it returns the
    // buffers (in batches for the file backend): the last one reaches the
    // file shortly after the guest has it back.
    let last = &sent[sent.len() - period..];
    let played = vsnd_tests::ctl::wait_for(Duration::from_secs(2), || {
        let p = b.broker.played();
        p.ends_with(last).then_some(p)
    })
    .unwrap_or_else(|| b.broker.played());
    assert!(
        played.len() >= M * period,
        "expected at least the {M} buffers submitted after `SET output on` ({} bytes) in the \
         playback file, got {} bytes",
        M * period,
        played.len()
    );
    assert_same_bytes(
        "the playback file (the end of what was played)",
        &played,
        &sent[sent.len() - played.len()..],
    );
}

// ---------------------------------------------------------------------------
// Jacks
// ---------------------------------------------------------------------------

fn jacks(fe: &mut Frontend) -> Vec<u8> {
    query_all(fe, snd::R_JACK_INFO, 2, snd::JACK_INFO_SIZE)
        .iter()
        .map(|item| JackInfo::parse(item).unwrap().connected)
        .collect()
}

fn event_buffers(fe: &mut Frontend, n: usize) {
    for _ in 0..n {
        fe.add_chain(snd::QUEUE_EVENT, &[], &[snd::EVENT_SIZE as u32])
            .unwrap();
    }
    fe.kick(snd::QUEUE_EVENT).unwrap();
}

fn expect_event(fe: &mut Frontend, b: &GatedBroker, code: u32, jack: u32, what: &str) {
    let u = wait_used(fe, snd::QUEUE_EVENT, PROMPT, what);
    let ev = Event::parse(&u.writable_bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        (u.len as usize, ev.code, ev.data),
        (snd::EVENT_SIZE, code, jack),
        "{what}: expected {} for jack {jack}, got {} ({:#x}) for {} with used.len {}; log:\n{}",
        snd::code_name(code),
        snd::code_name(ev.code),
        ev.code,
        ev.data,
        u.len,
        b.log_tail()
    );
}

#[test]
fn jacks_follow_the_flags() {
    let b = gated("gate-jacks");
    let mut fe = b.broker.connect(FrontendOptions::default());
    event_buffers(&mut fe, 8);
    assert_eq!(jacks(&mut fe), [1, 0], "jacks (output, input) at start");
    for (request, code, jack, state) in [
        ("SET input on", snd::EVT_JACK_CONNECTED, IN, [1, 1]),
        ("SET output off", snd::EVT_JACK_DISCONNECTED, OUT, [0, 1]),
        ("SET input off", snd::EVT_JACK_DISCONNECTED, IN, [0, 0]),
        ("SET output on", snd::EVT_JACK_CONNECTED, OUT, [1, 0]),
    ] {
        assert!(b.request(request).starts_with("OK"), "{request}");
        expect_event(&mut fe, &b, code, jack, &format!("after {request}"));
        assert_eq!(
            jacks(&mut fe),
            state,
            "jacks (output, input) after {request}"
        );
    }
    assert!(b.request("SET output on").starts_with("OK"));
    match fe.wait_used(snd::QUEUE_EVENT, QUIET) {
        Ok(None) => {}
        other => panic!("a SET to the current value: expected no jack event, got {other:?}"),
    }
}

#[test]
fn a_vm_connecting_after_a_change_sees_the_jacks_as_they_are() {
    let b = gated("gate-late-jacks");
    // The device is up and greeted (it waits for a VM) when the flags flip.
    b.broker.device_pid(PROMPT);
    wait_for(PROMPT, || {
        b.broker
            .log()
            .contains("waiting for a vhost-user frontend")
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "expected the device to wait for a VM; log:\n{}",
            b.log_tail()
        )
    });
    assert_eq!(b.request("SET input on"), "OK output=on input=on");
    assert_eq!(b.request("SET output off"), "OK output=off input=on");
    let mut fe = b.broker.connect(FrontendOptions::default());
    assert_eq!(
        jacks(&mut fe),
        [0, 1],
        "jacks (output, input) of a VM that connected after `SET input on`, `SET output off`; \
         log:\n{}",
        b.log_tail()
    );
}
