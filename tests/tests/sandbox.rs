//! The device's sandbox, proven from the outside.
//!
//! * **Escapes under `--seccomp kill`** (the default): the real broker
//!   starts `vsnd-sandbox-probe` (this crate's binary) as its device, under a
//!   name that picks one escape (`<dir>/probe-open-passwd`, …). The probe
//!   goes through exactly the device's sandbox code (`vsnd_device::sandbox`)
//!   on the broker's real spawn path, then makes one raw system call. Each
//!   test asserts the probe died of SIGSYS, that its SIGSYS reporter named
//!   the expected call, and that nothing happened (no file, no connection,
//!   the victim alive, the broker untraced).
//! * **Defence in depth under `--seccomp log`** (seccomp only logs): landlock
//!   alone refuses files and exec, and signals and ptrace stay confined; a
//!   connect() to a pathname Unix socket is NOT stopped by landlock before
//!   ABI 9, which is why the seccomp profile has no `socket`/`connect`.
//! * **The real device** (`vsnd-broker --backend null`): `/proc` shows
//!   seccomp, no_new_privs, no capabilities, nobody, exactly the expected
//!   descriptors and rlimits, before and after a VM connects; its log names
//!   the landlock ABI; it links and depends on no audio library;
//!   `--insecure-no-sandbox` is loud; a broker running as the device's own
//!   user is non-dumpable.
//!
//! Run as root (CI does): the broker then runs the device as `nobody`, and
//! the tests start victims and helper processes as `nobody`. Build the
//! binaries first (`cargo build --workspace --bins`).

use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use vsnd_tests::bin_path;
use vsnd_tests::fixture::TempDir;
use vsnd_tests::frontend::{Frontend, FrontendOptions};
use vsnd_tests::process::{
    broker_command, open_fds, show_fds, BrokerProcess as Broker, DEVICE_READY, DEVICE_STARTED,
};

// ---------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------

/// How long to wait for a log line that should come promptly.
const LOG_TIMEOUT: Duration = Duration::from_secs(10);
/// The user the root broker runs the device as (`--device-user` default).
const DEVICE_USER: &str = "nobody";

/// The real device's line once a VM is connected (after which it lowers
/// RLIMIT_NPROC to 0).
const FRONTEND_CONNECTED: &str = "frontend connected";
/// The broker's description of a device killed by seccomp.
const SIGSYS_DEATH: &str = "killed by signal 31 (SIGSYS)";
/// The device's SIGSYS reporter (device/src/sandbox.rs).
const SECCOMP_BLOCKED: &str = "seccomp: blocked system call ";
/// The broker's line when a device exited 0 (the probe survived).
const DEVICE_EXITED: &str = "device exited after its frontend disconnected";
/// The broker's line when a device died or failed.
const DEVICE_STOPPED: &str = "device stopped (";
/// The device's (and probe's) landlock report.
const LANDLOCK_LINE: &str = "sandbox: landlock ABI ";

/// First landlock ABI whose filesystem rights cover connect() to a pathname
/// Unix socket (`LANDLOCK_ACCESS_FS_RESOLVE_UNIX`).
const LANDLOCK_ABI_RESOLVE_UNIX: u32 = 9;
/// First landlock ABI with the signal scope.
const LANDLOCK_ABI_SIGNAL_SCOPE: u32 = 6;

/// Names the probe uses in its own directory (tests/src/bin/vsnd-sandbox-probe.rs).
const PROBE_CREATED_FILE: &str = "created-by-probe";
const PROBE_UNIX_SOCKET: &str = "pw.sock";
const PROBE_VICTIM_PID_FILE: &str = "victim.pid";

// ---------------------------------------------------------------------------
// Scratch directories
// ---------------------------------------------------------------------------

/// A private, world-writable directory per test (so that plain file
/// permissions never stop a `nobody` process: whatever stops it is the
/// sandbox); removed on success, kept on failure.
struct TestDir(TempDir);

impl TestDir {
    fn new(tag: &str) -> Self {
        let dir = TempDir::new(&format!("sandbox-{tag}"));
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o777))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", dir.path().display()));
        TestDir(dir)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }

    /// The probe made available as `<dir>/probe-<action>`.
    fn probe(&self, action: &str) -> PathBuf {
        let link = self.join(&format!("probe-{action}"));
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vsnd-sandbox-probe"), &link)
            .unwrap_or_else(|e| panic!("cannot link the probe as {}: {e}", link.display()));
        link
    }
}

// ---------------------------------------------------------------------------
// Users and helper processes
// ---------------------------------------------------------------------------

/// (uid, gid) of the device's user.
fn nobody() -> (u32, u32) {
    let u = nix::unistd::User::from_name(DEVICE_USER)
        .unwrap_or_else(|e| panic!("cannot look up user {DEVICE_USER}: {e}"))
        .unwrap_or_else(|| panic!("no user {DEVICE_USER} on this machine"));
    (u.uid.as_raw(), u.gid.as_raw())
}

fn assert_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "these tests run as root (as CI does): the broker must run the device as {DEVICE_USER} \
         and the tests start processes as {DEVICE_USER}"
    );
}

/// Make `cmd` run as `uid`/`gid` with no supplementary groups (and, as a
/// consequence of leaving uid 0, no capabilities).
fn run_as(cmd: &mut Command, (uid, gid): (u32, u32)) -> &mut Command {
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
        })
    }
}

/// A process killed and reaped on drop.
struct Proc(Child);

impl Proc {
    /// `sleep 600` as `user`: a victim for signals and ptrace.
    fn sleeper(user: (u32, u32)) -> Proc {
        let child = run_as(Command::new("sleep").arg("600"), user)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `sleep 600` as {user:?}: {e}"));
        Proc(child)
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Still running (not exited, not killed).
    fn running(&mut self) -> bool {
        matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Run `op` in a fresh process that has become `user` (no capabilities):
/// the process is forked, drops to `user`, runs `op`, and execs
/// `/bin/true`. `op`'s error (an errno) comes back as the error.
fn attempt_as(
    user: (u32, u32),
    op: impl Fn() -> io::Result<()> + Send + Sync + 'static,
) -> io::Result<()> {
    let mut cmd = Command::new("/bin/true");
    run_as(&mut cmd, user);
    // SAFETY: runs in the forked child after run_as's closure; `op` only
    // makes async-signal-safe system calls (open, read, close, ptrace) on
    // data prepared before the fork.
    unsafe { cmd.pre_exec(op) };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let _ = child.wait();
    Ok(())
}

/// As `user`: open `path` read-only and read a byte.
fn read_as(user: (u32, u32), path: &str) -> io::Result<()> {
    let c = CString::new(path).expect("no NUL in a /proc path");
    attempt_as(user, move || {
        // SAFETY: a valid NUL-terminated path; the buffer is ours.
        unsafe {
            let fd = libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut b = [0u8; 1];
            let n = libc::read(fd, b.as_mut_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if n < 0 {
                return Err(err);
            }
        }
        Ok(())
    })
}

/// As `user`: open `path` read-only (no read: `/proc/<pid>/mem` at offset 0
/// is unmapped and would fail with EIO even when the open is allowed).
fn open_as(user: (u32, u32), path: &str) -> io::Result<()> {
    let c = CString::new(path).expect("no NUL in a /proc path");
    attempt_as(user, move || {
        // SAFETY: a valid NUL-terminated path.
        unsafe {
            let fd = libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::close(fd);
        }
        Ok(())
    })
}

/// As `user`: PTRACE_ATTACH to `pid` (the tracer then execs /bin/true and
/// exits, which detaches).
fn ptrace_as(user: (u32, u32), pid: i32) -> io::Result<()> {
    attempt_as(user, move || {
        // SAFETY: ptrace with integer arguments and null pointers.
        let rc = unsafe {
            libc::ptrace(
                libc::PTRACE_ATTACH,
                pid,
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_void>(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })
}

/// Yama's ptrace_scope (0 when Yama is absent): above 0, ptrace of a
/// non-descendant fails whatever else holds, so the controls cannot run.
fn yama_ptrace_scope() -> u32 {
    fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn errno_of(r: &io::Result<()>) -> Option<i32> {
    r.as_ref().err().and_then(io::Error::raw_os_error)
}

// ---------------------------------------------------------------------------
// The broker
// ---------------------------------------------------------------------------

/// The sandbox tests' view of [`BrokerProcess`].
trait SandboxBroker {
    /// `vsnd-broker --socket <socket> --backend null <extra>`, optionally
    /// as `user`.
    fn start(socket: &Path, extra: &[&OsStr], user: Option<(u32, u32)>) -> Self;
    /// The first real device, once it waits for a VM.
    fn ready_device(&mut self) -> i32;
}

impl SandboxBroker for Broker {
    fn start(socket: &Path, extra: &[&OsStr], user: Option<(u32, u32)>) -> Broker {
        let mut args: Vec<&OsStr> = vec![
            OsStr::new("--socket"),
            socket.as_os_str(),
            OsStr::new("--backend"),
            OsStr::new("null"),
        ];
        args.extend_from_slice(extra);
        let mut cmd = broker_command(args, &[]);
        if let Some(u) = user {
            run_as(&mut cmd, u);
        }
        Broker::spawn(cmd)
    }

    fn ready_device(&mut self) -> i32 {
        let pid = self.wait_device(1, LOG_TIMEOUT);
        self.wait_log(DEVICE_READY, 1, LOG_TIMEOUT);
        assert!(
            self.device_lines(pid)
                .iter()
                .any(|l| l.contains(DEVICE_READY)),
            "expected device {pid} (the first) to be the one waiting for a VM\n{}",
            self.logs()
        );
        pid
    }
}

// ---------------------------------------------------------------------------
// /proc
// ---------------------------------------------------------------------------

/// Field `name` of `/proc/<pid>/status` (or of a task's status file).
fn status_field_of(status_path: &str, name: &str) -> String {
    let status = fs::read_to_string(status_path).unwrap_or_default();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(':')
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("{status_path} has no {name} field:\n{status}"))
}

fn status_field(pid: i32, name: &str) -> String {
    status_field_of(&format!("/proc/{pid}/status"), name)
}

/// `(soft, hard)` of a `/proc/<pid>/limits` row such as `Max open files`.
fn limit(pid: i32, name: &str) -> (String, String) {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    limits
        .lines()
        .find_map(|l| {
            let rest = l.strip_prefix(name)?;
            let mut w = rest.split_whitespace();
            Some((w.next()?.to_owned(), w.next()?.to_owned()))
        })
        .unwrap_or_else(|| panic!("/proc/{pid}/limits has no {name:?} row:\n{limits}"))
}

/// Whether `pid` runs (exists and is not a zombie).
fn process_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .map(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
        })
        .unwrap_or(false)
}

/// The landlock ABI from a `sandbox: landlock ABI N, ...` line.
fn landlock_abi(line: &str) -> Option<u32> {
    let rest = &line[line.find(LANDLOCK_LINE)? + LANDLOCK_LINE.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The inode of a `socket:[N]` link target.
fn socket_inode(target: &str) -> Option<&str> {
    target.strip_prefix("socket:[")?.strip_suffix(']')
}

/// Inodes of the Unix sockets bound to `path` (from /proc/net/unix).
fn unix_socket_inodes(path: &Path) -> Vec<String> {
    let table = fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let want = path.to_string_lossy();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 8 && w[7] == want).then(|| w[6].to_owned())
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Probe runs
// ---------------------------------------------------------------------------

/// What the broker saw of the first probe it started.
struct ProbeRun {
    dir: TestDir,
    broker: Broker,
    action: &'static str,
    /// The first probe's relayed lines (prefix removed).
    lines: Vec<String>,
    /// The broker's line on how the first probe ended.
    end: String,
}

impl ProbeRun {
    /// Start a broker (as root, so the probe runs as nobody with an empty
    /// bounding set) whose device is `probe-<action>`, wait until the first
    /// probe has ended, and collect what it said. `setup` prepares the
    /// probe's directory first (victim pid, listener).
    fn run(action: &'static str, seccomp: &str, setup: impl FnOnce(&TestDir)) -> ProbeRun {
        ProbeRun::run_as(action, seccomp, None, setup)
    }

    fn run_as(
        action: &'static str,
        seccomp: &str,
        broker_user: Option<(u32, u32)>,
        setup: impl FnOnce(&TestDir),
    ) -> ProbeRun {
        let dir = TestDir::new(&format!("{action}-{seccomp}"));
        let probe = dir.probe(action);
        setup(&dir);
        let socket = dir.join("vsnd.sock");
        let mut broker = Broker::start(
            &socket,
            &[
                OsStr::new("--device-path"),
                probe.as_os_str(),
                OsStr::new("--seccomp"),
                OsStr::new(seccomp),
            ],
            broker_user,
        );
        let pid = broker.wait_device(1, LOG_TIMEOUT);
        // The broker starts the next device only once the first has ended
        // (and its log is drained).
        broker.wait_device(2, LOG_TIMEOUT);
        let lines = broker.device_lines(pid);
        let all = broker.log.lines();
        let first = all
            .iter()
            .position(|l| l.contains(&format!("{DEVICE_STARTED}{pid})")))
            .unwrap_or(0);
        let end = all[first..]
            .iter()
            .find(|l| {
                !l.starts_with("vsnd-device[")
                    && (l.contains(DEVICE_STOPPED) || l.contains(DEVICE_EXITED))
            })
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "the broker did not say how probe {pid} ended\n{}",
                    broker.logs()
                )
            });
        ProbeRun {
            dir,
            broker,
            action,
            lines,
            end,
        }
    }

    fn context(&self) -> String {
        format!(
            "probe-{} said:\n  {}\nbroker: {}\n{}",
            self.action,
            self.lines.join("\n  "),
            self.end,
            self.broker.logs()
        )
    }

    fn line(&self, needle: &str) -> Option<&String> {
        self.lines.iter().find(|l| l.contains(needle))
    }

    /// The landlock ABI the probe reported.
    fn landlock_abi(&self) -> u32 {
        self.line(LANDLOCK_LINE)
            .and_then(|l| landlock_abi(l))
            .unwrap_or_else(|| {
                panic!(
                    "expected the probe to report {LANDLOCK_LINE:?}N\n{}",
                    self.context()
                )
            })
    }

    /// The probe entered the sandbox and reached its attempt.
    fn assert_attempted(&self) {
        let attempting = format!("PROBE {}: sandboxed", self.action);
        assert!(
            self.line(&attempting).is_some(),
            "expected the probe to enter the sandbox and reach its attempt ({attempting:?})\n{}",
            self.context()
        );
    }

    /// The attempt was killed by seccomp, naming `syscall`.
    fn assert_killed(&self, syscall: &str) {
        self.assert_attempted();
        let survived = format!("PROBE {}: ", self.action);
        let outcome: Vec<&String> = self
            .lines
            .iter()
            .filter(|l| {
                l.starts_with(&survived)
                    && (l.contains(": returned ") || l.contains(": failed with"))
            })
            .collect();
        assert!(
            outcome.is_empty(),
            "expected the probe to be killed by seccomp during its attempt, it survived it: {outcome:?}\n{}",
            self.context()
        );
        let blocked = self.line(SECCOMP_BLOCKED).unwrap_or_else(|| {
            panic!(
                "expected the SIGSYS reporter's line {SECCOMP_BLOCKED:?}… naming {syscall}\n{}",
                self.context()
            )
        });
        assert!(
            blocked.contains(&format!("({syscall})")),
            "expected the blocked call to be `{syscall}`, the reporter said: {blocked}\n{}",
            self.context()
        );
        assert!(
            self.end.contains(SIGSYS_DEATH),
            "expected the broker to report the probe {SIGSYS_DEATH:?}, it said: {}\n{}",
            self.end,
            self.context()
        );
    }

    /// The probe survived the attempt (seccomp in log mode) and says how it
    /// went: `Ok(value)` or `Err((errno, NAME))`.
    fn survived(&self) -> Result<i64, (i32, String)> {
        self.assert_attempted();
        assert!(
            self.line(SECCOMP_BLOCKED).is_none() && !self.end.contains("SIGSYS"),
            "expected seccomp in log mode to let the probe live\n{}",
            self.context()
        );
        assert!(
            self.end.contains(DEVICE_EXITED),
            "expected the probe to exit 0 after its attempt, the broker said: {}\n{}",
            self.end,
            self.context()
        );
        let returned = format!("PROBE {}: returned ", self.action);
        let failed = format!("PROBE {}: failed with errno ", self.action);
        if let Some(l) = self.line(&returned) {
            let v = l[l.find(&returned).unwrap_or(0) + returned.len()..].trim();
            return Ok(v.parse().unwrap_or_else(|_| {
                panic!("unreadable return value in {l:?}\n{}", self.context())
            }));
        }
        let l = self.line(&failed).unwrap_or_else(|| {
            panic!(
                "expected a `returned` or `failed with` line\n{}",
                self.context()
            )
        });
        let rest = &l[l.find(&failed).unwrap_or(0) + failed.len()..];
        let (num, name) = rest.split_once(' ').unwrap_or((rest, ""));
        let errno = num
            .parse()
            .unwrap_or_else(|_| panic!("unreadable errno in {l:?}\n{}", self.context()));
        let name = name.trim_matches(|c| c == '(' || c == ')').to_owned();
        Err((errno, name))
    }

    /// The attempt failed with `errno` (e.g. `libc::EACCES`).
    fn assert_failed_with(&self, errno: i32, why: &str) {
        let got = self.survived();
        assert!(
            matches!(&got, Err((e, _)) if *e == errno),
            "expected the attempt to fail with {} ({why}), got {got:?}\n{}",
            nix::errno::Errno::from_raw(errno),
            self.context()
        );
    }
}

/// A pathname Unix socket in `dir` that anyone may connect to (0666), as a
/// user's PipeWire socket is to that user: plain permissions never stop the
/// probe, only the sandbox can.
fn stand_in_listener(dir: &TestDir) -> UnixListener {
    let path = dir.join(PROBE_UNIX_SOCKET);
    let l = UnixListener::bind(&path)
        .unwrap_or_else(|e| panic!("cannot listen on {}: {e}", path.display()));
    fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
    l.set_nonblocking(true).unwrap();
    l
}

/// How many connections `l` has waiting.
fn connections(l: &UnixListener) -> usize {
    let mut n = 0;
    while l.accept().is_ok() {
        n += 1;
    }
    n
}

/// A `sleep` running as nobody (so that plain permissions would let the
/// probe signal it) whose pid is in the probe's `victim.pid`.
fn victim_for(dir: &TestDir) -> Proc {
    let v = Proc::sleeper(nobody());
    fs::write(dir.join(PROBE_VICTIM_PID_FILE), v.pid().to_string()).unwrap();
    v
}

// ---------------------------------------------------------------------------
// 1. Escapes under --seccomp kill: SIGSYS, and nothing happens
// ---------------------------------------------------------------------------

#[test]
fn kill_open_etc_passwd_dies_of_sigsys_in_openat() {
    assert_root();
    let run = ProbeRun::run("open-passwd", "kill", |_| {});
    run.assert_killed("openat");
}

#[test]
fn kill_create_file_dies_of_sigsys_in_openat_and_creates_nothing() {
    assert_root();
    let run = ProbeRun::run("create-file", "kill", |_| {});
    run.assert_killed("openat");
    let f = run.dir.join(PROBE_CREATED_FILE);
    assert!(
        fs::symlink_metadata(&f).is_err(),
        "expected {} not to exist, the probe created it\n{}",
        f.display(),
        run.context()
    );
}

#[test]
fn kill_unix_socket_dies_of_sigsys_in_socket() {
    assert_root();
    ProbeRun::run("socket-unix", "kill", |_| {}).assert_killed("socket");
}

#[test]
fn kill_inet_socket_dies_of_sigsys_in_socket() {
    assert_root();
    ProbeRun::run("socket-inet", "kill", |_| {}).assert_killed("socket");
}

#[test]
fn kill_connect_to_a_pathname_socket_dies_in_socket_and_connects_nothing() {
    assert_root();
    let mut listener = None;
    let run = ProbeRun::run("connect-unix", "kill", |d| {
        listener = Some(stand_in_listener(d))
    });
    // The probe needs a socket first; socket() is where it dies.
    run.assert_killed("socket");
    let n = connections(listener.as_ref().unwrap());
    assert_eq!(
        n,
        0,
        "expected no connection to the stand-in socket, got {n}\n{}",
        run.context()
    );
}

#[test]
fn kill_connect_on_a_socket_held_from_before_the_sandbox_dies_in_connect() {
    assert_root();
    let mut listener = None;
    let run = ProbeRun::run("connect-held", "kill", |d| {
        listener = Some(stand_in_listener(d))
    });
    // Even holding a socket, the call that would reach PipeWire is refused.
    run.assert_killed("connect");
    let n = connections(listener.as_ref().unwrap());
    assert_eq!(
        n,
        0,
        "expected no connection to the stand-in socket, got {n}\n{}",
        run.context()
    );
}

#[test]
fn kill_exec_dies_of_sigsys_in_execve() {
    assert_root();
    ProbeRun::run("exec-true", "kill", |_| {}).assert_killed("execve");
}

#[test]
fn kill_ptrace_of_the_broker_dies_of_sigsys_in_ptrace() {
    assert_root();
    let run = ProbeRun::run("ptrace-broker", "kill", |_| {});
    run.assert_killed("ptrace");
    let pid = run.broker.pid();
    assert_eq!(
        status_field(pid, "TracerPid"),
        "0",
        "expected the broker not to be traced\n{}",
        run.context()
    );
    assert!(
        process_alive(pid),
        "expected the broker to keep running\n{}",
        run.context()
    );
}

#[test]
fn kill_signal_to_another_process_dies_of_sigsys_in_kill_and_the_victim_lives() {
    assert_root();
    let mut victim = None;
    let run = ProbeRun::run("kill-victim", "kill", |d| victim = Some(victim_for(d)));
    run.assert_killed("kill");
    let v = victim.as_mut().unwrap();
    assert!(
        v.running(),
        "expected the victim (pid {}, same user as the probe) to be alive\n{}",
        v.pid(),
        run.context()
    );
}

// ---------------------------------------------------------------------------
// 2. Defence in depth: --seccomp log lets every call through to the kernel
// ---------------------------------------------------------------------------

#[test]
fn log_mode_landlock_alone_refuses_to_open_etc_passwd() {
    assert_root();
    // World-readable: only landlock can say no.
    let mode = fs::metadata("/etc/passwd").unwrap().permissions().mode();
    assert_ne!(
        mode & 0o004,
        0,
        "precondition: /etc/passwd is world-readable"
    );
    let run = ProbeRun::run("open-passwd", "log", |_| {});
    run.assert_failed_with(libc::EACCES, "landlock: no path is allowed");
}

#[test]
fn log_mode_landlock_alone_refuses_to_create_a_file() {
    assert_root();
    let run = ProbeRun::run("create-file", "log", |_| {});
    // The directory is 0777: only landlock can say no.
    run.assert_failed_with(libc::EACCES, "landlock: no path is allowed");
    let f = run.dir.join(PROBE_CREATED_FILE);
    assert!(
        fs::symlink_metadata(&f).is_err(),
        "expected {} not to exist\n{}",
        f.display(),
        run.context()
    );
}

#[test]
fn log_mode_landlock_alone_refuses_exec() {
    assert_root();
    ProbeRun::run("exec-true", "log", |_| {})
        .assert_failed_with(libc::EACCES, "landlock: nothing may be executed");
}

#[test]
fn log_mode_the_broker_cannot_be_traced() {
    assert_root();
    let run = ProbeRun::run("ptrace-broker", "log", |_| {});
    // Landlock (a sandboxed process cannot trace outside its domain), the
    // missing capabilities and the broker being root and non-dumpable each
    // refuse it.
    run.assert_failed_with(
        libc::EPERM,
        "landlock, no capabilities, non-dumpable broker",
    );
    assert_eq!(
        status_field(run.broker.pid(), "TracerPid"),
        "0",
        "{}",
        run.context()
    );
}

#[test]
fn log_mode_landlock_signal_scope_protects_a_same_user_process() {
    assert_root();
    let mut victim = None;
    let run = ProbeRun::run("kill-victim", "log", |d| victim = Some(victim_for(d)));
    let abi = run.landlock_abi();
    let v = victim.as_mut().unwrap();
    if abi >= LANDLOCK_ABI_SIGNAL_SCOPE {
        // The victim runs as nobody like the probe: plain permissions would
        // allow the signal, the landlock signal scope does not.
        run.assert_failed_with(libc::EPERM, "landlock signal scope");
        assert!(
            v.running(),
            "expected the victim to be alive\n{}",
            run.context()
        );
    } else {
        // Only seccomp stops it on this kernel.
        let got = run.survived();
        assert_eq!(
            got,
            Ok(0),
            "landlock ABI {abi} has no signal scope\n{}",
            run.context()
        );
    }
}

/// Landlock before ABI 9 has no right for connect() to a pathname Unix
/// socket: with seccomp only logging, a compromised device could reach a
/// PipeWire socket its user may write to. That is exactly why the profile
/// in policy/seccomp has no `socket`, `connect` or `bind` at all (see the
/// `kill_connect_*` tests). On ABI 9 and later landlock refuses it too.
#[test]
fn log_mode_pathname_unix_connect_is_stopped_by_landlock_only_from_abi_9() {
    assert_root();
    let mut listener = None;
    let run = ProbeRun::run("connect-unix", "log", |d| {
        listener = Some(stand_in_listener(d))
    });
    let abi = run.landlock_abi();
    let n = connections(listener.as_ref().unwrap());
    let got = run.survived();
    println!("landlock ABI {abi}: socket(AF_UNIX) + connect() under --seccomp log: {got:?}, {n} connection(s) accepted");
    if abi < LANDLOCK_ABI_RESOLVE_UNIX {
        assert_eq!(
            got,
            Ok(0),
            "expected connect() to succeed under landlock ABI {abi} (< {LANDLOCK_ABI_RESOLVE_UNIX}): \
             only seccomp stops it\n{}",
            run.context()
        );
        assert!(
            n >= 1,
            "expected the stand-in socket to get the probe's connection\n{}",
            run.context()
        );
    } else {
        assert!(
            matches!(&got, Err((e, _)) if *e == libc::EACCES || *e == libc::EPERM),
            "expected landlock ABI {abi} to refuse connect() to a pathname socket, got {got:?}\n{}",
            run.context()
        );
        assert_eq!(n, 0, "expected no connection\n{}", run.context());
    }
}

// ---------------------------------------------------------------------------
// 3. The real device, as /proc shows it
// ---------------------------------------------------------------------------

/// Every capability set empty, no_new_privs, seccomp filtering, as `user`.
fn assert_confined(pid: i32, user: (u32, u32), bounding_empty: bool, ctx: &dyn Fn() -> String) {
    let tasks: Vec<String> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| {
                Some(format!(
                    "/proc/{pid}/task/{}/status",
                    e.ok()?.file_name().to_str()?
                ))
            })
            .collect()
        })
        .unwrap_or_default();
    assert!(
        !tasks.is_empty(),
        "cannot list the threads of {pid}\n{}",
        ctx()
    );
    for status in std::iter::once(format!("/proc/{pid}/status")).chain(tasks) {
        let f = |name: &str| status_field_of(&status, name);
        assert_eq!(
            f("Seccomp"),
            "2",
            "{status}: expected Seccomp 2 (filter mode)\n{}",
            ctx()
        );
        assert_eq!(
            f("NoNewPrivs"),
            "1",
            "{status}: expected NoNewPrivs 1\n{}",
            ctx()
        );
        let mut sets = vec!["CapInh", "CapPrm", "CapEff", "CapAmb"];
        if bounding_empty {
            sets.push("CapBnd");
        }
        for set in sets {
            assert_eq!(
                f(set),
                "0000000000000000",
                "{status}: expected {set} empty\n{}",
                ctx()
            );
        }
        let ids = |v: u32| format!("{v}\t{v}\t{v}\t{v}");
        assert_eq!(
            f("Uid"),
            ids(user.0),
            "{status}: expected every uid {}\n{}",
            user.0,
            ctx()
        );
        assert_eq!(
            f("Gid"),
            ids(user.1),
            "{status}: expected every gid {}\n{}",
            user.1,
            ctx()
        );
    }
}

/// The device's descriptors: 0 and 1 on /dev/null, 2 the log pipe, 3 the
/// vhost-user listener (bound to `socket`), 4 the channel; beyond that only
/// epoll and eventfd instances, `extra_sockets` sockets (a VM connection)
/// and guest memory memfds. Never a file or directory.
fn assert_device_fds(pid: i32, socket: &Path, extra_sockets: usize, ctx: &dyn Fn() -> String) {
    let fds = open_fds(pid);
    let listing = || {
        format!(
            "device (pid {pid}) descriptors:\n{}{}",
            show_fds(&fds),
            ctx()
        )
    };
    let target = |n: i32| fds.iter().find(|(m, _)| *m == n).map(|(_, t)| t.as_str());
    assert_eq!(
        target(0),
        Some("/dev/null"),
        "expected stdin on /dev/null\n{}",
        listing()
    );
    assert_eq!(
        target(1),
        Some("/dev/null"),
        "expected stdout on /dev/null\n{}",
        listing()
    );
    assert!(
        target(2).is_some_and(|t| t.starts_with("pipe:[")),
        "expected stderr to be the log pipe\n{}",
        listing()
    );
    let listener = target(3).and_then(socket_inode).map(str::to_owned);
    let bound = unix_socket_inodes(socket);
    assert!(
        listener.as_ref().is_some_and(|i| bound.contains(i)),
        "expected fd 3 to be the listener bound to {} (inodes {bound:?})\n{}",
        socket.display(),
        listing()
    );
    let channel = target(4).and_then(socket_inode);
    assert!(
        channel.is_some() && channel != listener.as_deref(),
        "expected fd 4 to be the broker channel (another socket)\n{}",
        listing()
    );
    // The connection may be held under more than one number (the vhost-user
    // library duplicates it): count distinct sockets.
    let mut sockets = std::collections::BTreeSet::new();
    for (n, t) in fds.iter().filter(|(n, _)| *n > 4) {
        if let Some(inode) = socket_inode(t) {
            assert!(
                Some(inode) != listener.as_deref() && Some(inode) != channel,
                "expected fd {n} not to be another handle on the listener or the channel\n{}",
                listing()
            );
            sockets.insert(inode);
        } else {
            assert!(
                t == "anon_inode:[eventfd]"
                    || t == "anon_inode:[eventpoll]"
                    || t == "anon_inode:[timerfd]"
                    || t.starts_with("/memfd:"),
                "expected fd {n} to be an eventfd, an epoll instance, the pacing timer, a socket \
                 or guest memory (a memfd from the VMM), got {t}: the device must hold no file \
                 or directory\n{}",
                listing()
            );
        }
    }
    assert_eq!(
        sockets.len(),
        extra_sockets,
        "expected {extra_sockets} distinct socket(s) beyond fds 3 and 4\n{}",
        listing()
    );
}

#[test]
fn real_device_is_confined_before_and_after_a_vm_connects() {
    assert_root();
    let dir = TestDir::new("real-device");
    let socket = dir.join("vsnd.sock");
    let mut broker = Broker::start(&socket, &[], None);
    let pid = broker.ready_device();
    let user = nobody();
    let ctx = || broker.logs();

    assert_confined(pid, user, true, &ctx);
    assert_device_fds(pid, &socket, 0, &ctx);
    for (row, want) in [
        ("Max open files", "64"),
        ("Max file size", "0"),
        ("Max core file size", "0"),
    ] {
        let got = limit(pid, row);
        assert_eq!(
            got,
            (want.to_owned(), want.to_owned()),
            "{row}: expected {want} (soft and hard)\n{}",
            ctx()
        );
    }
    assert_ne!(
        limit(pid, "Max processes").1,
        "0",
        "expected RLIMIT_NPROC untouched before a VM connects (threads are still to come)\n{}",
        ctx()
    );

    // The landlock ABI the device reports, for the record.
    let lines = broker.device_lines(pid);
    let ll = lines
        .iter()
        .find(|l| l.contains(LANDLOCK_LINE))
        .unwrap_or_else(|| {
            panic!(
                "expected the device to log {LANDLOCK_LINE:?}N, …\n{}",
                ctx()
            )
        });
    let abi =
        landlock_abi(ll).unwrap_or_else(|| panic!("unreadable landlock ABI in {ll:?}\n{}", ctx()));
    println!("device landlock: ABI {abi}; the device logged: {ll}");
    assert!(
        ll.contains("seccomp enforcing") && ll.contains("no_new_privs"),
        "expected the device's sandbox line to say seccomp is enforcing: {ll}"
    );

    let fe = Frontend::connect(&socket, FrontendOptions::default())
        .unwrap_or_else(|e| panic!("cannot connect a VM: {e}\n{}", broker.logs()));
    broker.wait_log(FRONTEND_CONNECTED, 1, LOG_TIMEOUT);
    // forbid_new_tasks() follows the "frontend connected" line.
    let deadline = Instant::now() + LOG_TIMEOUT;
    while limit(pid, "Max processes") != ("0".into(), "0".into()) && Instant::now() < deadline {
        sleep(Duration::from_millis(10));
    }
    let ctx = || broker.logs();
    assert_eq!(
        limit(pid, "Max processes"),
        ("0".to_owned(), "0".to_owned()),
        "expected RLIMIT_NPROC 0 once the VM is connected\n{}",
        ctx()
    );
    assert_confined(pid, user, true, &ctx);
    assert_device_fds(pid, &socket, 1, &ctx);
    assert!(
        open_fds(pid).iter().any(|(_, t)| t.starts_with("/memfd:")),
        "expected the VM's guest memory (a memfd) to be mapped by now\n{}",
        show_fds(&open_fds(pid))
    );
    drop(fe);
}

#[test]
fn device_binary_links_no_audio_library() {
    let device = bin_path("vsnd-device");
    let (tool, out) = match Command::new("readelf").arg("-d").arg(&device).output() {
        Ok(o) if o.status.success() => ("readelf -d", o),
        _ => (
            "ldd",
            Command::new("ldd")
                .arg(&device)
                .output()
                .unwrap_or_else(|e| panic!("neither readelf nor ldd runs: {e}")),
        ),
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let needed: Vec<&str> = text
        .lines()
        .filter(|l| tool == "ldd" || l.contains("(NEEDED)"))
        .collect();
    println!("{tool} {}:\n{}", device.display(), needed.join("\n"));
    // Control: the listing was read at all.
    assert!(
        needed.iter().any(|l| l.contains("libc.so")),
        "expected `{tool}` to list libc among the libraries vsnd-device needs:\n{text}"
    );
    for lib in ["libpipewire", "libspa", "libasound", "libpulse"] {
        assert!(
            !needed.iter().any(|l| l.contains(lib)),
            "vsnd-device must link no audio library, `{tool}` lists {lib}:\n{}",
            needed.join("\n")
        );
    }
}

/// Names of the crates `package` depends on (normal and build edges),
/// from `cargo tree`.
fn dependency_crates(package: &str) -> Vec<String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from(env!("CARGO")));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace");
    let out = Command::new(&cargo)
        .args([
            "tree",
            "-p",
            package,
            "-e",
            "normal,build",
            "--prefix",
            "none",
            "--offline",
        ])
        .current_dir(root)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} tree: {e}"));
    assert!(
        out.status.success(),
        "`cargo tree -p {package}` failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| !w.starts_with('['))
        .map(str::to_owned)
        .collect();
    names.sort();
    names.dedup();
    names
}

fn audio_crates(names: &[String]) -> Vec<&String> {
    names
        .iter()
        .filter(|n| {
            ["pipewire", "libspa", "alsa"]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .collect()
}

#[test]
fn device_depends_on_no_audio_crate() {
    let device = dependency_crates("vsnd-device");
    // Control: the listing is the device's real tree.
    for must in [
        "vsnd-device",
        "vsnd-ipc",
        "landlock",
        "seccompiler",
        "vhost-user-backend",
    ] {
        assert!(
            device.iter().any(|n| n == must),
            "expected `cargo tree -p vsnd-device` to list {must}; it listed {device:?}"
        );
    }
    let audio = audio_crates(&device);
    assert!(
        audio.is_empty(),
        "vsnd-device must not depend on an audio crate, directly or not; found {audio:?}"
    );
    // Control: the same check on the broker, which is where audio crates
    // belong, sees the broker's tree (today it has none either: its
    // backends are null and file).
    let broker = dependency_crates("vsnd-broker");
    for must in ["vsnd-broker", "vsnd-ipc", "clap"] {
        assert!(
            broker.iter().any(|n| n == must),
            "expected `cargo tree -p vsnd-broker` to list {must}; it listed {broker:?}"
        );
    }
    println!(
        "audio crates in the broker's tree: {:?}",
        audio_crates(&broker)
    );
}

#[test]
fn insecure_no_sandbox_runs_unconfined_and_says_so_loudly() {
    assert_root();
    let dir = TestDir::new("insecure");
    let socket = dir.join("vsnd.sock");
    let mut broker = Broker::start(&socket, &[OsStr::new("--insecure-no-sandbox")], None);
    let pid = broker.ready_device();
    assert_eq!(
        status_field(pid, "Seccomp"),
        "0",
        "expected no seccomp filter with --insecure-no-sandbox\n{}",
        broker.logs()
    );
    let own = broker.own_lines();
    assert!(
        own.iter().any(|l| l.contains("INSECURE")),
        "expected the broker itself to warn INSECURE\n{}",
        broker.logs()
    );
    let dev = broker.device_lines(pid);
    assert!(
        dev.iter().any(|l| l.contains("INSECURE")),
        "expected the device to warn INSECURE\n{}",
        broker.logs()
    );
    assert!(
        !dev.iter().any(|l| l.contains(LANDLOCK_LINE)),
        "expected the device not to claim a sandbox\n{}",
        broker.logs()
    );
}

// ---------------------------------------------------------------------------
// 4. A broker running as the device's own user
// ---------------------------------------------------------------------------

#[test]
fn same_user_broker_is_non_dumpable_and_its_device_still_confined() {
    assert_root();
    let user = nobody();
    let dir = TestDir::new("same-user");
    let socket = dir.join("vsnd.sock");
    let mut broker = Broker::start(&socket, &[], Some(user));
    let device = broker.ready_device();
    let bpid = broker.pid();
    let ctx = || broker.logs();

    let ids = |v: u32| format!("{v}\t{v}\t{v}\t{v}");
    assert_eq!(
        status_field(bpid, "Uid"),
        ids(user.0),
        "the broker runs as {DEVICE_USER}\n{}",
        ctx()
    );
    // A non-root broker cannot empty the bounding set (no CAP_SETPCAP), and
    // does not need to: no_new_privs and empty permitted, inheritable and
    // ambient sets leave nothing to gain from it.
    assert_confined(device, user, false, &ctx);
    let bnd = status_field(device, "CapBnd");
    if bnd != "0000000000000000" {
        assert!(
            broker
                .device_lines(device)
                .iter()
                .any(|l| l.contains(LANDLOCK_LINE) && l.contains("bounding-set entries kept")),
            "expected the device to report the bounding-set entries it kept (CapBnd {bnd})\n{}",
            ctx()
        );
    }
    println!("device under a {DEVICE_USER} broker: CapBnd {bnd}");

    // Non-dumpable: /proc/<broker>/ belongs to root, not to the broker's user.
    let owner = fs::metadata(format!("/proc/{bpid}/environ")).unwrap().uid();
    assert_eq!(
        owner,
        0,
        "expected /proc/{bpid}/environ to belong to root (non-dumpable broker)\n{}",
        ctx()
    );

    // Controls: a dumpable process of the same user is open to another one,
    // so what refuses the broker below is its non-dumpability.
    let control = Proc::sleeper(user);
    let cpid = control.pid();
    let r = read_as(user, &format!("/proc/{cpid}/environ"));
    assert!(r.is_ok(), "control: expected {DEVICE_USER} to read the environ of its own dumpable process, got {r:?}");
    let yama = yama_ptrace_scope();
    if yama == 0 {
        let r = open_as(user, &format!("/proc/{cpid}/mem"));
        assert!(r.is_ok(), "control: expected {DEVICE_USER} to open the mem of its own dumpable process, got {r:?}");
        let r = ptrace_as(user, cpid);
        assert!(
            r.is_ok(),
            "control: expected {DEVICE_USER} to attach to its own dumpable process, got {r:?}"
        );
    } else {
        println!("Yama ptrace_scope {yama}: the ptrace and mem controls are skipped");
    }

    let r = read_as(user, &format!("/proc/{bpid}/environ"));
    assert_eq!(
        errno_of(&r),
        Some(libc::EACCES),
        "expected another {DEVICE_USER} process to be refused the broker's environ (EACCES), got {r:?}\n{}",
        ctx()
    );
    let r = open_as(user, &format!("/proc/{bpid}/mem"));
    assert_eq!(
        errno_of(&r),
        Some(libc::EACCES),
        "expected another {DEVICE_USER} process to be refused the broker's memory (EACCES), got {r:?}\n{}",
        ctx()
    );
    let r = ptrace_as(user, bpid);
    assert_eq!(
        errno_of(&r),
        Some(libc::EPERM),
        "expected another {DEVICE_USER} process to be refused PTRACE_ATTACH to the broker (EPERM), got {r:?}\n{}",
        ctx()
    );
    assert_eq!(status_field(bpid, "TracerPid"), "0", "{}", ctx());
}

/// The device itself, sharing the broker's user, cannot trace it even with
/// seccomp only logging: the broker is non-dumpable and landlock confines
/// ptrace to the sandbox's own domain.
#[test]
fn same_user_probe_cannot_trace_the_broker_even_in_log_mode() {
    assert_root();
    let run = ProbeRun::run_as("ptrace-broker", "log", Some(nobody()), |_| {});
    run.assert_failed_with(
        libc::EPERM,
        "non-dumpable broker, landlock ptrace restriction",
    );
    assert_eq!(
        status_field(run.broker.pid(), "TracerPid"),
        "0",
        "{}",
        run.context()
    );
}
