//! Support for the tests of the gate (`tests/gate.rs`) and of a rogue device
//! (`tests/rogue_device.rs`): a broker with a control socket and an audit
//! log, a line client for the control socket, `vsnd-ctl` and `socat` run as
//! any user, and what `/proc` says about a process (open files, resident
//! memory).
//!
//! The rogue device (`vsnd-fake-device` under a mode name) reports what it
//! saw in a sidecar file next to its program; [`FakeDevice`] places it and
//! reads those reports.

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::bin_path;
use crate::fixture::{Broker, BrokerOptions, TempDir};

/// How long a control-socket answer may take before a test gives up (a
/// generous bound for a loaded CI machine, not a performance claim).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a `vsnd-ctl` or `socat` run may take.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(10);
/// The user the permission tests run clients as.
pub const NOBODY: &str = "nobody";

// ---------------------------------------------------------------------------
// PCM data
// ---------------------------------------------------------------------------

/// `len` bytes of a "loud" capture source: pseudo-random, every byte in
/// 1..=0x7e, so no byte of it is silence in any format (0x00, or 0x80 for
/// the unsigned ones) and any leaked byte is recognisable.
pub fn loud_pattern(len: usize) -> Vec<u8> {
    crate::fixture::pcm_pattern(0x10_0D, len)
        .into_iter()
        .map(|b| b % 0x7e + 1)
        .collect()
}

/// FNV-1a, 64 bit: how the rogue device reports the bytes of a buffer.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

// ---------------------------------------------------------------------------
// A broker with a control socket and an audit log
// ---------------------------------------------------------------------------

/// A running `vsnd-broker --backend file` (see [`Broker`]) with
/// `--control-socket <dir>/ctl.sock --audit-log <dir>/audit.log`, in a
/// directory every user may enter (so that the permission tests decide by
/// the socket's own mode).
pub struct GatedBroker {
    /// The broker (dropped first: SIGTERM, log on failure).
    pub broker: Broker,
    /// The control socket.
    pub ctl: PathBuf,
    /// The audit log.
    pub audit: PathBuf,
    dir: TempDir,
}

impl GatedBroker {
    /// Start a broker with `--initial-streams initial` (`output` is the
    /// broker's default), `capture` as its capture file and `extra`
    /// arguments, and wait for its control socket.
    ///
    /// # Panics
    /// When the broker does not start or creates no control socket.
    pub fn start(tag: &str, initial: &str, capture: Vec<u8>, extra: &[&str]) -> Self {
        let dir = TempDir::new(&format!("{tag}-ctl"));
        make_public(dir.path());
        let ctl = dir.path().join("ctl.sock");
        let audit = dir.path().join("audit.log");
        let mut extra_args = vec![
            "--control-socket".to_string(),
            ctl.display().to_string(),
            "--audit-log".to_string(),
            audit.display().to_string(),
        ];
        extra_args.extend(extra.iter().map(|s| s.to_string()));
        let broker = Broker::start_with(
            tag,
            BrokerOptions {
                initial_streams: initial.into(),
                capture,
                rust_log: std::env::var("VSND_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
                extra_args,
                ..BrokerOptions::default()
            },
        );
        let b = GatedBroker {
            broker,
            ctl,
            audit,
            dir,
        };
        // The start-up records are written once the control socket
        // listens; after them the broker is ready.
        let ready = wait_for(ANSWER_TIMEOUT, || {
            (b.audit_lines().len() >= 2).then_some(())
        });
        assert!(
            ready.is_some(),
            "expected the control socket {} and two start-up audit records within \
             {ANSWER_TIMEOUT:?}, got {:?}; broker log:\n{}",
            b.ctl.display(),
            b.audit_lines(),
            b.broker.log_tail()
        );
        b
    }

    /// The directory holding the control socket and the audit log.
    pub fn ctl_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The broker's pid.
    pub fn pid(&self) -> u32 {
        self.broker.pid().unwrap_or(0)
    }

    /// The tail of the broker's log (and its devices').
    pub fn log_tail(&self) -> String {
        self.broker.log_tail()
    }

    /// A new control-socket client.
    ///
    /// # Panics
    /// When it cannot connect.
    pub fn client(&self) -> CtlClient {
        CtlClient::connect(&self.ctl).unwrap_or_else(|e| {
            panic!(
                "expected to connect to {}, got {e}; broker log:\n{}",
                self.ctl.display(),
                self.log_tail()
            )
        })
    }

    /// One request on a fresh connection; the answer line.
    pub fn request(&self, line: &str) -> String {
        let mut c = self.client();
        c.request(line)
            .unwrap_or_else(|e| panic!("{e}; broker log:\n{}", self.log_tail()))
    }

    /// `QUERY` on a fresh connection.
    pub fn query(&self) -> String {
        self.request("QUERY")
    }

    /// Lines of the audit log so far.
    pub fn audit_lines(&self) -> Vec<String> {
        fs::read_to_string(&self.audit)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Panic unless the broker process still runs.
    pub fn assert_running(&mut self, context: &str) {
        assert!(
            self.broker.is_running(),
            "{context}: expected the broker to be running, but it exited; log:\n{}",
            self.log_tail()
        );
    }
}

/// chmod 0755: others may enter (and read).
fn make_public(dir: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", dir.display()));
}

// ---------------------------------------------------------------------------
// A control-socket client
// ---------------------------------------------------------------------------

/// A line client of the control socket.
pub struct CtlClient {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// What [`CtlClient::read_line`] saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A line, without its newline.
    Line(String),
    /// The broker closed the connection (after any partial line).
    Closed,
    /// Nothing within the timeout.
    Timeout,
}

impl CtlClient {
    /// Connect to `path`.
    pub fn connect(path: &Path) -> io::Result<Self> {
        Ok(CtlClient {
            stream: UnixStream::connect(path)?,
            buf: Vec::new(),
        })
    }

    /// A client on an already connected socket (e.g. a clone of another
    /// client's, to read its answers in another thread).
    pub fn from_stream(stream: UnixStream) -> Self {
        CtlClient {
            stream,
            buf: Vec::new(),
        }
    }

    /// The socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Send `line` and a newline.
    pub fn send(&mut self, line: &str) -> io::Result<()> {
        self.send_raw(format!("{line}\n").as_bytes())
    }

    /// Send bytes verbatim.
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.set_write_timeout(Some(ANSWER_TIMEOUT))?;
        self.stream.write_all(bytes)
    }

    /// The next line from the broker.
    pub fn read_line(&mut self, timeout: Duration) -> Line {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let rest = self.buf.split_off(i + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                return Line::Line(String::from_utf8_lossy(&line).into_owned());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Line::Timeout;
            }
            let _ = self.stream.set_read_timeout(Some(left));
            let mut tmp = [0u8; 4096];
            match self.stream.read(&mut tmp) {
                Ok(0) => {
                    if self.buf.is_empty() {
                        return Line::Closed;
                    }
                    let line = std::mem::take(&mut self.buf);
                    return Line::Line(String::from_utf8_lossy(&line).into_owned());
                }
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Line::Timeout
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Line::Closed,
            }
        }
    }

    /// Send `line` and return the answer line, or say what came instead.
    pub fn request(&mut self, line: &str) -> Result<String, String> {
        self.send(line)
            .map_err(|e| format!("sending {line:?} to the control socket: {e}"))?;
        match self.read_line(ANSWER_TIMEOUT) {
            Line::Line(l) => Ok(l),
            other => Err(format!(
                "expected an answer to {line:?} within {ANSWER_TIMEOUT:?}, got {other:?}"
            )),
        }
    }
}

// ---------------------------------------------------------------------------
// Tools run as any user
// ---------------------------------------------------------------------------

/// (uid, gid) of the user `name`.
///
/// # Panics
/// When there is no such user.
pub fn user(name: &str) -> (u32, u32) {
    let u = nix::unistd::User::from_name(name)
        .unwrap_or_else(|e| panic!("cannot look up user {name}: {e}"))
        .unwrap_or_else(|| panic!("no user {name} on this machine"));
    (u.uid.as_raw(), u.gid.as_raw())
}

/// Make `cmd` run as `uid`/`gid` with no supplementary groups (the test
/// must be root).
pub fn run_as(cmd: &mut Command, (uid, gid): (u32, u32)) -> &mut Command {
    // SAFETY: the closure runs in the forked child before exec and only
    // makes async-signal-safe calls (setgroups, setgid, setuid) on integers.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) < 0
                || libc::setgid(gid) < 0
                || libc::setuid(uid) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// How a tool run ended.
#[derive(Debug)]
pub struct Outcome {
    /// Its exit status (None: killed after [`TOOL_TIMEOUT`]).
    pub status: Option<ExitStatus>,
    /// Its pid.
    pub pid: u32,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl Outcome {
    /// The exit code (None when killed by a signal or the timeout).
    pub fn code(&self) -> Option<i32> {
        self.status.and_then(|s| s.code())
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}, stdout {:?}, stderr {:?}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Run `cmd` with `input` on its stdin (then closed), collecting its
/// output; killed after [`TOOL_TIMEOUT`].
pub fn run(mut cmd: Command, input: &[u8]) -> Outcome {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id();
    let mut stdin = child.stdin.take();
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        if let Some(s) = stdin.as_mut() {
            let _ = s.write_all(&input);
        }
    });
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_end(&mut s);
        }
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(o) = err.as_mut() {
            let _ = o.read_to_end(&mut s);
        }
        s
    });
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let _ = writer.join();
    let stdout = String::from_utf8_lossy(&out_t.join().unwrap_or_default()).into_owned();
    let stderr = String::from_utf8_lossy(&err_t.join().unwrap_or_default()).into_owned();
    Outcome {
        status,
        pid,
        stdout,
        stderr,
    }
}

/// `vsnd-ctl --socket <socket> <args…>`, as `as_user` when given.
pub fn vsnd_ctl(socket: &Path, args: &[&str], as_user: Option<(u32, u32)>) -> Outcome {
    let mut cmd = Command::new(bin_path("vsnd-ctl"));
    cmd.arg("--socket").arg(socket).args(args);
    if let Some(u) = as_user {
        run_as(&mut cmd, u);
    }
    run(cmd, b"")
}

/// `socat -t 2 - UNIX-CONNECT:<socket>` with `input` on stdin, as
/// `as_user` when given.
pub fn socat(socket: &Path, input: &[u8], as_user: Option<(u32, u32)>) -> Outcome {
    let mut cmd = Command::new("socat");
    cmd.args(["-t", "2", "-"])
        .arg(format!("UNIX-CONNECT:{}", socket.display()));
    if let Some(u) = as_user {
        run_as(&mut cmd, u);
    }
    run(cmd, input)
}

// ---------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------

/// What the open descriptors of `pid` point to.
pub fn open_files(pid: u32) -> Vec<PathBuf> {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .collect()
}

/// Whether `pid` has `path` open.
pub fn has_open(pid: u32, path: &Path) -> bool {
    let want = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    open_files(pid).contains(&want)
}

/// VmRSS of `pid` in KiB.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Poll `f` every 5 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------------------
// The rogue device
// ---------------------------------------------------------------------------

/// `vsnd-fake-device` linked as `<dir>/rogue/fake-<mode>`, in a directory its
/// user may write (it runs as the broker's device user) so that it can keep
/// its sidecar files: `.report` (what it saw, one line per event), `.step`
/// (which step of its script the next incarnation runs), and the `.go` and
/// `.stop` files a test creates to start and end a flood.
pub struct FakeDevice {
    program: PathBuf,
}

impl FakeDevice {
    /// Link the fake device as `fake-<mode>` in a new subdirectory of `dir`.
    ///
    /// # Panics
    /// When the link cannot be made.
    pub fn new(dir: &Path, mode: &str, exe: &Path) -> Self {
        use std::os::unix::fs::PermissionsExt as _;
        let sub = dir.join("rogue");
        fs::create_dir_all(&sub).unwrap_or_else(|e| panic!("cannot create {}: {e}", sub.display()));
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o777))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", sub.display()));
        let program = sub.join(format!("fake-{mode}"));
        std::os::unix::fs::symlink(exe, &program).unwrap_or_else(|e| {
            panic!("cannot link the fake device as {}: {e}", program.display())
        });
        FakeDevice { program }
    }

    /// The path to pass as `--device-path`.
    pub fn program(&self) -> &Path {
        &self.program
    }

    fn sidecar(&self, ext: &str) -> PathBuf {
        let mut p = self.program.as_os_str().to_owned();
        p.push(".");
        p.push(ext);
        PathBuf::from(p)
    }

    /// Lines the fake device reported so far.
    pub fn report(&self) -> Vec<String> {
        fs::read_to_string(self.sidecar("report"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Report lines starting with `prefix`.
    pub fn reported(&self, prefix: &str) -> Vec<String> {
        self.report()
            .into_iter()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    /// Create the `.go` file (the flood modes wait for it).
    pub fn go(&self) {
        fs::write(self.sidecar("go"), b"go\n").unwrap_or_else(|e| panic!("cannot write go: {e}"));
    }

    /// Create the `.stop` file (the flood modes stop flooding).
    pub fn stop(&self) {
        fs::write(self.sidecar("stop"), b"stop\n")
            .unwrap_or_else(|e| panic!("cannot write stop: {e}"));
    }
}

/// The value of `key=` in a report line (`key=value` words).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// [`field`] parsed as a number.
pub fn num(line: &str, key: &str) -> Option<u64> {
    let v = field(line, key)?;
    match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => v.parse().ok(),
    }
}
