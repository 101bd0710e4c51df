//! `vsnd-broker` as a process, the way an admin or a VMM experiences it:
//! its command line and exit codes, signals, the socket file it owns, the
//! device it supervises (crashes, restarts with backoff, reconnecting VMs),
//! what the device inherits, and a device of another release.
//!
//! Every test runs the real `vsnd-broker` binary (build it first with
//! `cargo build --workspace --bins`). Most run the real `vsnd-device` too;
//! the others run `vsnd-fake-device` (this crate's binary) under a name that
//! picks its misbehaviour, e.g. `<tmp>/fake-garbage`. The broker's stderr
//! (which its device shares) is collected line by line with the moment each
//! line arrived, and every failure message includes it.
//!
//! These tests read `/proc/<pid>/{fd,environ,status}` of the device, so they
//! run on Linux only, as the broker and device themselves do.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::fd::{AsRawFd as _, RawFd};
use std::os::unix::fs::FileTypeExt as _;
use std::os::unix::net::{UnixDatagram, UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vsnd_ipc::PROTOCOL_VERSION;
use vsnd_tests::fixture::TempDir;
use vsnd_tests::frontend::Frontend;
use vsnd_tests::process::{
    self, broker_command, open_fds, show_fds, BrokerProcess as Broker, Log, Outcome, DEVICE_READY,
    DEVICE_STARTED, RUST_LOG,
};

// ---------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------

/// How long a broker with bad arguments may take to give up.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the broker may take to exit after SIGTERM/SIGINT ("a couple of
/// seconds", with room for a loaded CI machine).
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for a log line that should come promptly.
const LOG_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a dead process may take to disappear from /proc.
const GONE_TIMEOUT: Duration = Duration::from_secs(5);

/// The broker's first restart delay; it doubles after each failed start
/// (`MIN_BACKOFF` in broker/src/supervisor.rs).
const FIRST_BACKOFF_MS: u64 = 100;

// ---------------------------------------------------------------------------
// Scratch directories
// ---------------------------------------------------------------------------

/// A private directory per test; removed on success, kept on failure.
struct TestDir(TempDir);

impl TestDir {
    fn new(tag: &str) -> Self {
        TestDir(TempDir::new(&format!("lifecycle-{tag}")))
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// `vsnd-fake-device` made available as `<dir>/fake-<mode>` (for `spy`,
    /// in a subdirectory the device can write to even when the broker runs
    /// it as another user).
    fn fake_device(&self, mode: &str) -> PathBuf {
        let mut dir = self.0.path().to_path_buf();
        if mode == "spy" {
            use std::os::unix::fs::PermissionsExt as _;
            dir.push("spy");
            fs::create_dir_all(&dir).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        }
        let link = dir.join(format!("fake-{mode}"));
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vsnd-fake-device"), &link)
            .unwrap_or_else(|e| panic!("cannot link the fake device as {}: {e}", link.display()));
        link
    }
}

/// Whether the fake device started as `spy` ran at all.
fn spy_started(spy: &Path) -> Option<String> {
    let mut marker = spy.as_os_str().to_owned();
    marker.push(".started");
    fs::read_to_string(marker).ok()
}

// ---------------------------------------------------------------------------
// Spawning the broker
// ---------------------------------------------------------------------------

/// The lifecycle tests' view of [`BrokerProcess`].
trait LifecycleBroker {
    /// A broker on `socket` with the real device and `extra` arguments.
    fn start(socket: &Path, extra: &[&str]) -> Self;
    /// Wait until the `n`th real device is started and waits for a VM.
    /// Fails at once if that device stops first (it will not get ready).
    fn wait_device_ready(&mut self, n: usize) -> i32;
}

impl LifecycleBroker for Broker {
    fn start(socket: &Path, extra: &[&str]) -> Broker {
        let mut args: Vec<OsString> = vec!["--socket".into(), socket.into()];
        args.extend(extra.iter().map(OsString::from));
        Broker::spawn(broker_command(args, &[]))
    }

    fn wait_device_ready(&mut self, n: usize) -> i32 {
        let pid = self.wait_device(n, LOG_TIMEOUT);
        let deadline = Instant::now() + LOG_TIMEOUT;
        loop {
            let lines = self.log.snapshot();
            if lines
                .iter()
                .filter(|(_, l)| l.contains(DEVICE_READY))
                .count()
                >= n
            {
                return pid;
            }
            let stopped = lines
                .iter()
                .filter(|(_, l)| l.contains(DEVICE_STARTED))
                .nth(n - 1)
                .and_then(|(started, _)| {
                    lines
                        .iter()
                        .find(|(t, l)| t >= started && l.contains("device stopped"))
                });
            if let Some((_, line)) = stopped {
                panic!(
                    "expected device #{n} (pid {pid}) to get ready for a VM ({DEVICE_READY:?}), \
                     it stopped first: {line}\n{}",
                    self.logs()
                );
            }
            if self.poll_exit().is_some() || Instant::now() >= deadline {
                // Let wait_log report the exit or the timeout.
                self.wait_log(DEVICE_READY, n, Duration::ZERO);
                return pid;
            }
            sleep(Duration::from_millis(10));
        }
    }
}

/// Run `cmd` to completion (killing it after [`EXIT_TIMEOUT`]).
fn run_to_exit(cmd: Command, what: &str) -> Outcome {
    process::run_to_exit(cmd, EXIT_TIMEOUT, what)
}

// ---------------------------------------------------------------------------
// Processes and /proc
// ---------------------------------------------------------------------------

/// Whether `pid` no longer runs (no such process, or a zombie nobody has
/// reaped yet).
fn process_gone(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

fn wait_gone(pid: i32, what: &str, logs: &dyn Fn() -> String) {
    let deadline = Instant::now() + GONE_TIMEOUT;
    while !process_gone(pid) {
        if Instant::now() >= deadline {
            panic!("{what}: expected process {pid} to be gone within {GONE_TIMEOUT:?}, it still runs\n{}", logs());
        }
        sleep(Duration::from_millis(10));
    }
}

/// A field of `/proc/<pid>/status`, e.g. `SigBlk`.
fn status_field(pid: i32, field: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("/proc/{pid}/status has no {field} field:\n{status}"))
}

// ---------------------------------------------------------------------------
// The VM's view
// ---------------------------------------------------------------------------

/// Connect as a VM to `socket` and ask for PCM_INFO of every stream; panics
/// (with the broker's log) unless every step works.
fn assert_served(socket: &Path, broker: &Broker, what: &str) -> Frontend {
    process::assert_served(socket, &|| broker.logs(), what)
}

fn is_socket(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

// ---------------------------------------------------------------------------
// 1. Command line
// ---------------------------------------------------------------------------

/// What must hold after a refused start, beyond exit code 2 and the message.
enum After {
    /// This path must not exist.
    Absent(PathBuf),
    /// This file must still have exactly these bytes.
    Unchanged(PathBuf, Vec<u8>),
}

struct BadCase {
    what: &'static str,
    args: Vec<OsString>,
    /// Substrings the message on stderr must contain.
    says: Vec<&'static str>,
    after: Vec<After>,
}

fn os(args: &[&dyn AsRef<OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_os_string()).collect()
}

fn check_refused(case: &BadCase, spy: &Path, fds: &[(RawFd, RawFd)]) {
    let what = case.what;
    let out = run_to_exit(broker_command(&case.args, fds), what);
    let log = format!(
        "--- stderr ---\n{}--- stdout ---\n{}",
        out.stderr, out.stdout
    );
    assert_eq!(
        out.status.code(),
        Some(2),
        "{what}: expected exit status 2 (usage), got {}\n{log}",
        out.status
    );
    for s in &case.says {
        assert!(
            out.stderr.contains(s),
            "{what}: expected the message on stderr to mention {s:?}\n{log}"
        );
    }
    assert!(
        !out.stderr.contains(DEVICE_STARTED) && !out.stderr.contains("] listening on"),
        "{what}: expected nothing to start, the broker reported starting something\n{log}"
    );
    if let Some(pids) = spy_started(spy) {
        panic!("{what}: expected no device to be started, one ran (pids {pids:?})\n{log}");
    }
    for a in &case.after {
        match a {
            After::Absent(p) => {
                assert!(
                    fs::symlink_metadata(p).is_err(),
                    "{what}: expected {} not to exist afterwards, it does\n{log}",
                    p.display()
                )
            }
            After::Unchanged(p, bytes) => {
                let now = fs::read(p);
                assert!(
                    now.as_ref().is_ok_and(|n| n == bytes),
                    "{what}: expected {} to be left untouched ({} bytes), got {:?}\n{log}",
                    p.display(),
                    bytes.len(),
                    now.map(|n| format!("{} bytes", n.len()))
                );
            }
        }
    }
}

#[test]
fn bad_arguments_exit_2_with_a_message_and_start_nothing() {
    let dir = TestDir::new("badargs");
    let spy = dir.fake_device("spy");
    let sock = dir.join("vm.sock");
    let missing = dir.join("missing.raw");
    let empty = dir.join("empty.raw");
    fs::write(&empty, b"").unwrap();
    let capture = dir.join("capture.raw");
    fs::write(&capture, [1u8; 64]).unwrap();
    let new_playback = dir.join("new-playback.raw");
    // A recording from an earlier run, which a failed start must not touch.
    let recording = dir.join("earlier.wav");
    let recording_bytes: Vec<u8> = (0..200u8).collect();
    fs::write(&recording, &recording_bytes).unwrap();
    let regular = dir.join("not-a-socket");
    fs::write(&regular, b"precious").unwrap();
    let no_dir_sock = dir.join("no-such-dir").join("vm.sock");

    let d = "--device-path";
    let absent = |p: &Path| After::Absent(p.to_path_buf());
    let cases = vec![
        BadCase {
            what: "no --socket and no --socket-fd",
            args: os(&[&d, &spy]),
            says: vec!["--socket"],
            after: vec![],
        },
        BadCase {
            what: "both --socket and --socket-fd",
            args: os(&[&"--socket", &sock, &"--socket-fd", &"3", &d, &spy]),
            says: vec!["--socket", "--socket-fd"],
            after: vec![absent(&sock)],
        },
        BadCase {
            what: "--initial-streams mic",
            args: os(&[&"--socket", &sock, &"--initial-streams", &"mic", &d, &spy]),
            says: vec!["mic", "output", "input"],
            after: vec![absent(&sock)],
        },
        BadCase {
            what: "--backend file without files",
            args: os(&[&"--socket", &sock, &"--backend", &"file", &d, &spy]),
            says: vec!["--playback-file", "--capture-file"],
            after: vec![absent(&sock)],
        },
        BadCase {
            what: "--playback-file with --backend null",
            args: os(&[
                &"--socket",
                &sock,
                &"--backend",
                &"null",
                &"--playback-file",
                &new_playback,
                &d,
                &spy,
            ]),
            says: vec!["--backend file"],
            after: vec![absent(&sock), absent(&new_playback)],
        },
        BadCase {
            what: "missing --capture-file",
            args: os(&[
                &"--socket",
                &sock,
                &"--backend",
                &"file",
                &"--capture-file",
                &missing,
                &"--playback-file",
                &new_playback,
                &d,
                &spy,
            ]),
            says: vec!["--capture-file", "missing.raw"],
            after: vec![absent(&sock), absent(&new_playback)],
        },
        BadCase {
            what: "empty --capture-file",
            args: os(&[
                &"--socket",
                &sock,
                &"--backend",
                &"file",
                &"--capture-file",
                &empty,
                &d,
                &spy,
            ]),
            says: vec!["--capture-file", "empty"],
            after: vec![absent(&sock)],
        },
        BadCase {
            what: "missing --capture-file next to an earlier WAV recording",
            args: os(&[
                &"--socket",
                &sock,
                &"--backend",
                &"file",
                &"--playback-file",
                &recording,
                &"--capture-file",
                &missing,
                &d,
                &spy,
            ]),
            says: vec!["--capture-file"],
            after: vec![
                absent(&sock),
                After::Unchanged(recording.clone(), recording_bytes.clone()),
            ],
        },
        BadCase {
            what: "--device-path /nonexistent",
            args: os(&[
                &"--socket",
                &sock,
                &"--backend",
                &"file",
                &"--playback-file",
                &recording,
                &"--capture-file",
                &capture,
                &d,
                &"/nonexistent",
            ]),
            says: vec!["/nonexistent", "--device-path"],
            after: vec![
                absent(&sock),
                After::Unchanged(recording.clone(), recording_bytes.clone()),
            ],
        },
        BadCase {
            what: "--socket in a directory that does not exist",
            args: os(&[
                &"--socket",
                &no_dir_sock,
                &"--backend",
                &"file",
                &"--playback-file",
                &new_playback,
                &d,
                &spy,
            ]),
            says: vec!["no-such-dir"],
            after: vec![
                absent(&no_dir_sock),
                absent(no_dir_sock.parent().unwrap()),
                absent(&new_playback),
            ],
        },
        BadCase {
            what: "--socket naming an existing regular file",
            args: os(&[
                &"--socket",
                &regular,
                &"--backend",
                &"file",
                &"--playback-file",
                &recording,
                &d,
                &spy,
            ]),
            says: vec!["not-a-socket", "not a socket"],
            after: vec![
                After::Unchanged(regular.clone(), b"precious".to_vec()),
                After::Unchanged(recording.clone(), recording_bytes.clone()),
            ],
        },
    ];
    for case in &cases {
        check_refused(case, &spy, &[]);
    }
}

#[test]
fn bad_socket_fd_exits_2_and_starts_nothing() {
    let dir = TestDir::new("badfd");
    let spy = dir.fake_device("spy");
    let (stream, _peer) = UnixStream::pair().unwrap();
    let bound_not_listening = UnixDatagram::bind(dir.join("dgram.sock")).unwrap();
    let file = fs::File::create(dir.join("a-file")).unwrap();

    let args = |fd: &str| os(&[&"--socket-fd", &fd, &"--device-path", &spy]);
    let case = |what, fd, says| BadCase {
        what,
        args: args(fd),
        says,
        after: vec![],
    };
    check_refused(
        &case("--socket-fd 0", "0", vec!["--socket-fd 0"]),
        &spy,
        &[],
    );
    check_refused(
        &case(
            "--socket-fd 99 (not open)",
            "99",
            vec!["--socket-fd 99", "not an open"],
        ),
        &spy,
        &[],
    );
    check_refused(
        &case(
            "--socket-fd of a connected, not listening, socket",
            "3",
            vec!["--socket-fd 3", "not listening"],
        ),
        &spy,
        &[(stream.as_raw_fd(), 3)],
    );
    check_refused(
        &case(
            "--socket-fd of a bound datagram socket",
            "3",
            vec!["--socket-fd 3"],
        ),
        &spy,
        &[(bound_not_listening.as_raw_fd(), 3)],
    );
    check_refused(
        &case(
            "--socket-fd of a regular file",
            "3",
            vec!["--socket-fd 3", "not a socket"],
        ),
        &spy,
        &[(file.as_raw_fd(), 3)],
    );
}

/// A root broker that could not stop its `nobody` device (no CAP_KILL, as
/// under a systemd unit whose CapabilityBoundingSet forgets it) refuses to
/// start, saying which capabilities it needs, instead of hanging in its
/// device's shutdown later.
#[test]
fn root_without_cap_kill_exits_2_naming_the_capability() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (CI runs as root)");
        return;
    }
    let dir = TestDir::new("nokill");
    let sock = dir.join("vm.sock");
    let mut cmd = Command::new("setpriv");
    cmd.args(["--bounding-set", "-kill", "--"])
        .arg(vsnd_tests::bin_path("vsnd-broker"))
        .arg("--socket")
        .arg(&sock)
        .env("RUST_LOG", RUST_LOG)
        .stdin(std::process::Stdio::null());
    let out = run_to_exit(cmd, "vsnd-broker without CAP_KILL");
    assert_eq!(
        out.status.code(),
        Some(2),
        "expected exit status 2 without CAP_KILL, got {}; stderr:\n{}",
        out.status,
        out.stderr
    );
    assert!(
        out.stderr.contains("CAP_KILL") && out.stderr.contains("CapabilityBoundingSet"),
        "expected the error to name CAP_KILL and how to grant it; stderr:\n{}",
        out.stderr
    );
    assert!(
        !sock.exists() && !out.stderr.contains(DEVICE_STARTED),
        "nothing may be started: socket {} exists: {}; stderr:\n{}",
        sock.display(),
        sock.exists(),
        out.stderr
    );
}

#[test]
fn second_broker_on_a_busy_socket_refuses_and_the_first_keeps_serving() {
    let dir = TestDir::new("busy");
    let spy = dir.fake_device("spy");
    let sock = dir.join("vm.sock");
    let mut first = Broker::start(&sock, &[]);
    first.wait_device_ready(1);

    let case = BadCase {
        what: "a second broker on the same --socket",
        args: os(&[&"--socket", &sock, &"--device-path", &spy]),
        says: vec!["vm.sock", "in use"],
        after: vec![],
    };
    check_refused(&case, &spy, &[]);

    first.assert_running("the first broker after a second one was refused");
    assert!(
        is_socket(&sock),
        "expected {} to still be the first broker's socket\n{}",
        sock.display(),
        first.logs()
    );
    // The second broker's "is anyone listening?" probe is a connection the
    // first broker's device accepts and sees closed at once; that may cost
    // the device a (clean) restart, but never a failure.
    assert_eq!(
        first.log.count("restarting in"),
        0,
        "expected no device failure in the first broker\n{}",
        first.logs()
    );
    assert_served(
        &sock,
        &first,
        "the first broker after a second one was refused",
    );
}

#[test]
fn help_and_version_exit_0() {
    for flag in ["-h", "--help"] {
        let out = run_to_exit(broker_command([flag], &[]), flag);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{flag}: expected exit status 0, got {}\n{}",
            out.status,
            out.stderr
        );
        for s in [
            "Usage:",
            "vsnd-broker",
            "--socket",
            "--socket-fd",
            "--backend",
            "--initial-streams",
        ] {
            assert!(
                out.stdout.contains(s),
                "{flag}: expected the usage on stdout to mention {s:?}, got:\n{}",
                out.stdout
            );
        }
    }
    for flag in ["-V", "--version"] {
        let out = run_to_exit(broker_command([flag], &[]), flag);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{flag}: expected exit status 0, got {}\n{}",
            out.status,
            out.stderr
        );
        let want = format!("vsnd-broker {}", env!("CARGO_PKG_VERSION"));
        assert_eq!(
            out.stdout.trim(),
            want,
            "{flag}: expected the version on stdout"
        );
    }
}

#[test]
fn streams_alias_of_upstream_is_accepted() {
    let dir = TestDir::new("alias");
    let sock = dir.join("vm.sock");
    let mut broker = Broker::start(&sock, &["--streams", "input"]);
    broker.wait_device_ready(1);
    // The device's own view of the flags it was given in the broker's hello.
    broker.wait_log("output off, input on", 1, LOG_TIMEOUT);
    assert_served(&sock, &broker, "--streams input");
}

// ---------------------------------------------------------------------------
// 2. Signals and the socket file
// ---------------------------------------------------------------------------

fn stops_cleanly_on(sig: Signal, with_vm: bool) {
    let dir = TestDir::new(sig.as_str());
    let sock = dir.join("vm.sock");
    let mut broker = Broker::start(&sock, &[]);
    let device = broker.wait_device_ready(1);
    let vm = with_vm.then(|| assert_served(&sock, &broker, "before the signal"));

    let what = format!(
        "{sig} with{} a VM connected",
        if with_vm { "" } else { "out" }
    );
    broker.signal(sig);
    let status = broker.wait_exit(STOP_TIMEOUT, &what);
    assert_eq!(
        status.code(),
        Some(0),
        "{what}: expected exit status 0, got {status}\n{}",
        broker.logs()
    );
    wait_gone(device, &format!("{what}: the device"), &|| broker.logs());
    assert!(
        fs::symlink_metadata(&sock).is_err(),
        "{what}: expected the broker to remove its socket {}, it is still there\n{}",
        sock.display(),
        broker.logs()
    );
    drop(vm);
}

#[test]
fn sigterm_stops_broker_and_device_and_removes_the_socket() {
    stops_cleanly_on(Signal::SIGTERM, true);
}

#[test]
fn sigint_stops_broker_and_device_and_removes_the_socket() {
    stops_cleanly_on(Signal::SIGINT, false);
}

#[test]
fn stale_socket_of_a_killed_broker_is_replaced() {
    let dir = TestDir::new("stale");
    let sock = dir.join("vm.sock");
    let mut killed = Broker::start(&sock, &[]);
    let device = killed.wait_device_ready(1);
    killed.signal(Signal::SIGKILL);
    killed.wait_exit(STOP_TIMEOUT, "SIGKILL");
    // The device dies with its broker (parent-death signal).
    wait_gone(device, "the device of a SIGKILLed broker", &|| {
        killed.logs()
    });
    assert!(
        is_socket(&sock),
        "precondition: a SIGKILLed broker leaves its socket file {}",
        sock.display()
    );

    let mut next = Broker::start(&sock, &[]);
    next.wait_device_ready(1);
    next.wait_log("stale socket", 1, LOG_TIMEOUT);
    assert_served(&sock, &next, "a broker started over a stale socket");
}

// ---------------------------------------------------------------------------
// 3. and 4. Device crashes, VM reconnects
// ---------------------------------------------------------------------------

#[test]
fn device_crash_is_logged_and_a_new_device_serves_the_vm() {
    let dir = TestDir::new("crash");
    let sock = dir.join("vm.sock");
    let mut broker = Broker::start(&sock, &[]);
    let first = broker.wait_device_ready(1);
    let vm = assert_served(&sock, &broker, "before the crash");

    kill(Pid::from_raw(first), Signal::SIGKILL).unwrap();
    broker.wait_log("killed by signal 9", 1, LOG_TIMEOUT);
    broker.wait_log(
        &format!("restarting in {FIRST_BACKOFF_MS} ms"),
        1,
        LOG_TIMEOUT,
    );
    let second = broker.wait_device_ready(2);
    assert_ne!(
        second,
        first,
        "expected a new device process after the crash\n{}",
        broker.logs()
    );
    broker.assert_running("after the device crashed");
    assert!(
        is_socket(&sock),
        "expected the socket {} to stay across a device crash\n{}",
        sock.display(),
        broker.logs()
    );

    // The VM notices its connection is gone, and reconnects.
    drop(vm);
    assert_served(&sock, &broker, "a VM reconnecting after the device crashed");
}

#[test]
fn vm_can_disconnect_and_reconnect_repeatedly() {
    let dir = TestDir::new("reconnect");
    let sock = dir.join("vm.sock");
    let mut broker = Broker::start(&sock, &[]);
    broker.wait_device_ready(1);
    for round in 1..=4 {
        let vm = assert_served(&sock, &broker, &format!("connection #{round}"));
        drop(vm);
    }
    broker.assert_running("after four VM connections");
    let logs = broker.logs();
    assert_eq!(
        broker.log.count("restarting in"),
        0,
        "expected no device failure on clean disconnects\n{logs}"
    );
}

// ---------------------------------------------------------------------------
// 5. An inherited listener (--socket-fd)
// ---------------------------------------------------------------------------

#[test]
fn inherited_listener_is_served_and_left_in_place() {
    let dir = TestDir::new("sockfd");
    let sock = dir.join("activated.sock");
    // What systemd socket activation (or a VMM) would do.
    let listener = UnixListener::bind(&sock).unwrap();
    let mut broker = Broker::spawn(broker_command(
        ["--socket-fd", "3"],
        &[(listener.as_raw_fd(), 3)],
    ));
    broker.wait_log("listening on inherited socket fd 3", 1, LOG_TIMEOUT);
    broker.wait_device_ready(1);
    assert_served(&sock, &broker, "a VM connecting to the inherited listener");
    assert_served(
        &sock,
        &broker,
        "a VM reconnecting to the inherited listener",
    );

    broker.signal(Signal::SIGTERM);
    let status = broker.wait_exit(STOP_TIMEOUT, "SIGTERM with --socket-fd");
    assert_eq!(
        status.code(),
        Some(0),
        "expected exit status 0 after SIGTERM, got {status}\n{}",
        broker.logs()
    );
    assert!(
        is_socket(&sock),
        "expected the broker to leave {} (a socket it did not create) in place\n{}",
        sock.display(),
        broker.logs()
    );
}

// ---------------------------------------------------------------------------
// 6. What the device inherits
// ---------------------------------------------------------------------------

fn socket_inode(target: &str) -> Option<&str> {
    target.strip_prefix("socket:[")?.strip_suffix(']')
}

#[test]
fn device_inherits_only_its_two_sockets_a_clean_environment_and_no_blocked_signals() {
    let dir = TestDir::new("hygiene");
    let sock = dir.join("vm.sock");
    // A descriptor the broker's parent leaked (not close-on-exec), and a
    // variable the broker's environment happens to hold.
    let leaked_path = dir.join("leaked-file");
    let leaked = fs::File::create(&leaked_path).unwrap();
    const LEAKED_FD: RawFd = 9;
    let mut cmd = broker_command(
        [OsStr::new("--socket"), sock.as_os_str()],
        &[(leaked.as_raw_fd(), LEAKED_FD)],
    );
    cmd.env("VSND_TEST_SECRET", "must-not-reach-the-device");
    let mut broker = Broker::spawn(cmd);
    let device = broker.wait_device_ready(1);

    // Precondition: the broker itself did get the leaked descriptor.
    let broker_fds = open_fds(broker.pid());
    let leaked_target = leaked_path.to_string_lossy().into_owned();
    assert!(
        broker_fds
            .iter()
            .any(|(n, t)| *n == LEAKED_FD && *t == leaked_target),
        "precondition: the broker should hold the leaked fd {LEAKED_FD}; it has:\n{}",
        show_fds(&broker_fds)
    );

    let fds = open_fds(device);
    let listing = format!(
        "device (pid {device}) descriptors:\n{}{}",
        show_fds(&fds),
        broker.logs()
    );
    let target = |n: i32| fds.iter().find(|(m, _)| *m == n).map(|(_, t)| t.as_str());
    assert_eq!(
        target(0),
        Some("/dev/null"),
        "expected stdin on /dev/null\n{listing}"
    );
    assert_eq!(
        target(1),
        Some("/dev/null"),
        "expected stdout on /dev/null\n{listing}"
    );
    // The broker's own stderr, or a pipe the broker reads the device's log
    // from: never a file the device could read back or write elsewhere.
    let broker_stderr = broker_fds
        .iter()
        .find(|(n, _)| *n == 2)
        .map(|(_, t)| t.as_str());
    assert!(
        target(2).is_some_and(|t| t.starts_with("pipe:") || Some(t) == broker_stderr),
        "expected stderr to be a pipe to the broker or the broker's own stderr\n{listing}"
    );
    let listener = target(3).and_then(socket_inode);
    let channel = target(4).and_then(socket_inode);
    assert!(
        listener.is_some(),
        "expected fd 3 to be the vhost-user listener (a socket)\n{listing}"
    );
    assert!(
        channel.is_some() && channel != listener,
        "expected fd 4 to be the broker channel (another socket)\n{listing}"
    );
    assert!(
        broker_fds.iter().any(|(_, t)| socket_inode(t) == listener),
        "expected fd 3 to be the broker's own listener\nbroker descriptors:\n{}{listing}",
        show_fds(&broker_fds)
    );
    // Everything else is what the vhost-user library creates itself: epoll
    // instances and eventfds. No files, directories, pipes or other sockets.
    let strays: Vec<_> = fds
        .iter()
        .filter(|(n, t)| *n > 4 && !t.starts_with("anon_inode:"))
        .collect();
    assert!(
        strays.is_empty(),
        "expected no inherited descriptors beyond 0-4, found {strays:?}\n{listing}"
    );
    assert!(
        !fds.iter().any(|(_, t)| *t == leaked_target),
        "expected the descriptor leaked into the broker not to reach the device\n{listing}"
    );

    let environ = fs::read(format!("/proc/{device}/environ")).unwrap();
    let vars: Vec<String> = environ
        .split(|&b| b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert_eq!(
        vars,
        vec![format!("RUST_LOG={RUST_LOG}")],
        "expected the device's environment to hold only RUST_LOG\n{}",
        broker.logs()
    );

    // Signals the broker blocks for its signalfd must not stay blocked in the
    // device, or it cannot be stopped with SIGTERM.
    let blocked = status_field(device, "SigBlk");
    assert!(
        blocked.chars().all(|c| c == '0'),
        "expected the device to start with no blocked signals, SigBlk is {blocked}\n{}",
        broker.logs()
    );
}

// ---------------------------------------------------------------------------
// 7. Devices that misbehave (vsnd-fake-device)
// ---------------------------------------------------------------------------

#[test]
fn device_of_another_protocol_version_stops_the_broker_with_advice() {
    let dir = TestDir::new("version");
    let sock = dir.join("vm.sock");
    let fake = dir.fake_device("version-999");
    let mut broker = Broker::start(&sock, &["--device-path", fake.to_str().unwrap()]);
    let device = broker.wait_device(1, LOG_TIMEOUT);
    let status = broker.wait_exit(STOP_TIMEOUT, "a device of protocol version 999");
    let logs = broker.logs();
    assert_eq!(
        status.code(),
        Some(1),
        "expected exit status 1, got {status}\n{logs}"
    );
    let stderr = broker.log.text();
    for s in ["999", &format!("speaks {PROTOCOL_VERSION}"), "same release"] {
        assert!(
            stderr.contains(s),
            "expected the broker to say {s:?} (both versions, install matching releases)\n{logs}"
        );
    }
    assert_eq!(
        broker.device_pids().len(),
        1,
        "expected no restart of a device of another version\n{logs}"
    );
    wait_gone(device, "the fake device", &|| logs.clone());
    assert!(
        fs::symlink_metadata(&sock).is_err(),
        "expected the socket {} removed\n{logs}",
        sock.display()
    );
}

/// The delays announced in "restarting in N ms" lines, in order.
fn announced_backoffs(log: &Log) -> Vec<u64> {
    log.matching("restarting in ")
        .iter()
        .filter_map(|(_, l)| {
            l.split("restarting in ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn device_sending_garbage_is_killed_and_replaced() {
    let dir = TestDir::new("garbage");
    let sock = dir.join("vm.sock");
    let fake = dir.fake_device("garbage");
    let mut broker = Broker::start(&sock, &["--device-path", fake.to_str().unwrap()]);
    broker.wait_device(3, LOG_TIMEOUT);
    let logs = broker.logs();
    assert!(
        broker.log.count("protocol violation") >= 2,
        "expected each garbage-sending device to be reported as a protocol violation\n{logs}"
    );
    let delays = announced_backoffs(&broker.log);
    assert!(
        delays.starts_with(&[FIRST_BACKOFF_MS, 2 * FIRST_BACKOFF_MS]),
        "expected restarts after {FIRST_BACKOFF_MS} ms, then {} ms, got {delays:?}\n{logs}",
        2 * FIRST_BACKOFF_MS
    );
    let pids = broker.device_pids();
    for &old in &pids[..2] {
        wait_gone(old, "a device killed for a protocol violation", &|| {
            logs.clone()
        });
    }
    broker.assert_running("after devices sent garbage");
    assert!(
        is_socket(&sock),
        "expected the socket {} kept across device restarts\n{logs}",
        sock.display()
    );

    broker.signal(Signal::SIGTERM);
    let status = broker.wait_exit(STOP_TIMEOUT, "SIGTERM after garbage");
    assert_eq!(
        status.code(),
        Some(0),
        "expected exit status 0 after SIGTERM, got {status}\n{}",
        broker.logs()
    );
}

#[test]
fn device_exiting_at_once_is_restarted_with_growing_delays() {
    let dir = TestDir::new("exit-early");
    let sock = dir.join("vm.sock");
    let fake = dir.fake_device("exit-early");
    let started = Instant::now();
    let mut broker = Broker::start(&sock, &["--device-path", fake.to_str().unwrap()]);
    // 100 + 200 + 400 + 800 + 1600 ms of backoff: six starts in about 3 s.
    let long_delay = 32 * FIRST_BACKOFF_MS;
    broker.wait_log(&format!("restarting in {long_delay} ms"), 1, LOG_TIMEOUT);
    let logs = broker.logs();
    assert!(
        broker.log.count("exit status 7") >= 6,
        "expected every exit (status 7) to be logged\n{logs}"
    );

    let delays = announced_backoffs(&broker.log);
    let doubling: Vec<u64> = (0..6).map(|i| FIRST_BACKOFF_MS << i).collect();
    assert_eq!(
        delays, doubling,
        "expected the restart delay to double each time\n{logs}"
    );

    // The delays are real: each start comes at least the announced delay
    // after the previous one (less 10% for clock granularity).
    let starts: Vec<Instant> = broker
        .log
        .matching(DEVICE_STARTED)
        .iter()
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(
        starts.len(),
        delays.len(),
        "expected one start per announced restart\n{logs}"
    );
    for (i, pair) in starts.windows(2).enumerate() {
        let gap = pair[1] - pair[0];
        let want = Duration::from_millis(delays[i] * 9 / 10);
        assert!(gap >= want, "expected restart #{} at least {want:?} after the previous start, it came after {gap:?}\n{logs}", i + 1);
    }
    let in_two_seconds = starts
        .iter()
        .filter(|t| t.duration_since(started) <= Duration::from_secs(2))
        .count();
    assert!(
        in_two_seconds <= 6,
        "expected a handful of starts in the first 2 s, got {in_two_seconds}\n{logs}"
    );

    // The broker is now sleeping 3.2 s before the next attempt; SIGTERM must
    // not wait for that.
    let asked = Instant::now();
    broker.signal(Signal::SIGTERM);
    let status = broker.wait_exit(STOP_TIMEOUT, "SIGTERM during a restart delay");
    let took = asked.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "expected exit status 0 after SIGTERM, got {status}\n{}",
        broker.logs()
    );
    assert!(
        took < Duration::from_millis(long_delay),
        "expected SIGTERM to cut the {long_delay} ms restart delay short, the broker took {took:?}\n{}",
        broker.logs()
    );
    assert_eq!(
        broker.device_pids().len(),
        starts.len(),
        "expected no start after SIGTERM\n{}",
        broker.logs()
    );
    assert!(
        fs::symlink_metadata(&sock).is_err(),
        "expected the socket {} removed\n{}",
        sock.display(),
        broker.logs()
    );
}
