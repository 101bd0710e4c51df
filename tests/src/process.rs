//! The real `vsnd-broker` as a child process of a test, for the tests that
//! need the process itself rather than [`crate::fixture::Broker`]'s private
//! directory: its exit status, its stderr line by line as it arrives,
//! descriptors handed over as a service manager would, signals.
//!
//! Shared by `broker_lifecycle.rs`, `sandbox.rs`, `config.rs` and
//! `socket_activation.rs`.

use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader, Read as _};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::bin_path;
use crate::frontend::{Frontend, FrontendOptions};
use crate::snd;

/// Log level of the broker and, through it, the device: the tests read
/// `info` lines, whatever the caller's RUST_LOG says.
pub const RUST_LOG: &str = "info";
/// What the broker logs when it has started a device.
pub const DEVICE_STARTED: &str = "device started (pid ";
/// What the real device logs when it waits for a VM.
pub const DEVICE_READY: &str = "waiting for a vhost-user frontend";
/// The prefix of a device's lines relayed by the broker (`vsnd-device[PID]: `).
pub const DEVICE_LINE_PREFIX: &str = "vsnd-device[";
/// Most descriptors [`pass_fds`] can hand over.
pub const MAX_PASSED_FDS: usize = 4;

/// A `vsnd-broker` command with `args`, `RUST_LOG` set, stdin from
/// /dev/null, and each `(ours, theirs)` of `fds` open in the broker as
/// descriptor `theirs` (see [`pass_fds`]).
pub fn broker_command<S: AsRef<OsStr>>(
    args: impl IntoIterator<Item = S>,
    fds: &[(RawFd, RawFd)],
) -> Command {
    let mut cmd = Command::new(bin_path("vsnd-broker"));
    cmd.args(args)
        .env("RUST_LOG", RUST_LOG)
        .stdin(Stdio::null());
    pass_fds(&mut cmd, fds);
    cmd
}

/// Make each `(ours, theirs)` of `fds` open in `cmd`'s process as
/// descriptor `theirs`, not close-on-exec. `theirs` must be 3..100.
///
/// # Panics
/// With more than [`MAX_PASSED_FDS`] descriptors or a target out of range.
pub fn pass_fds(cmd: &mut Command, fds: &[(RawFd, RawFd)]) {
    assert!(
        fds.len() <= MAX_PASSED_FDS,
        "at most {MAX_PASSED_FDS} descriptors can be passed"
    );
    assert!(
        fds.iter().all(|&(_, theirs)| (3..100).contains(&theirs)),
        "target descriptors must be 3..100"
    );
    if fds.is_empty() {
        return;
    }
    let fds = fds.to_vec();
    // SAFETY: the closure runs in the forked child before exec; it only
    // makes async-signal-safe calls (fcntl, dup2, close) on integers and
    // does not allocate (the Vec was moved in before the fork).
    unsafe {
        cmd.pre_exec(move || {
            // First move every source above 100 so that no target clobbers a
            // source not yet placed, then place them; dup2 leaves the target
            // without FD_CLOEXEC.
            let mut high = [-1; MAX_PASSED_FDS];
            for (slot, &(ours, _)) in high.iter_mut().zip(&fds) {
                *slot = libc::fcntl(ours, libc::F_DUPFD_CLOEXEC, 100);
                if *slot < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            for (&h, &(_, theirs)) in high.iter().zip(&fds) {
                if libc::dup2(h, theirs) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::close(h);
            }
            Ok(())
        });
    }
}

/// Lines of a process's stderr, each with the moment it arrived.
#[derive(Clone, Default)]
pub struct Log {
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Log {
    /// Collect `pipe` in a background thread until it closes.
    pub fn collect(pipe: impl std::io::Read + Send + 'static) -> Log {
        let log = Log::default();
        let lines = Arc::clone(&log.lines);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                lines
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((Instant::now(), line));
            }
        });
        log
    }

    /// Every line so far, with its arrival time.
    pub fn snapshot(&self) -> Vec<(Instant, String)> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.snapshot().into_iter().map(|(_, l)| l).collect()
    }

    /// Everything so far, one line each.
    pub fn text(&self) -> String {
        self.snapshot().into_iter().map(|(_, l)| l + "\n").collect()
    }

    /// How many lines contain `needle`.
    pub fn count(&self, needle: &str) -> usize {
        self.snapshot()
            .iter()
            .filter(|(_, l)| l.contains(needle))
            .count()
    }

    /// Lines containing `needle`, with their arrival times.
    pub fn matching(&self, needle: &str) -> Vec<(Instant, String)> {
        self.snapshot()
            .into_iter()
            .filter(|(_, l)| l.contains(needle))
            .collect()
    }
}

/// The pid in a broker line `... device started (pid N) ...`.
pub fn started_device_pid(line: &str) -> Option<i32> {
    let rest = &line[line.find(DEVICE_STARTED)? + DEVICE_STARTED.len()..];
    rest[..rest.find(')')?].parse().ok()
}

/// A running broker; killed and reaped on drop (its device dies with it:
/// parent-death signal), its log printed when the test is failing.
pub struct BrokerProcess {
    child: Child,
    /// Its stderr (the device's relayed lines included).
    pub log: Log,
    exited: Option<ExitStatus>,
}

impl BrokerProcess {
    /// Start a broker from `cmd` (see [`broker_command`]); its stderr is
    /// collected, its stdout discarded.
    ///
    /// # Panics
    /// When it cannot be started.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start vsnd-broker: {e}"));
        let log = Log::collect(child.stderr.take().expect("stderr is piped"));
        Self {
            child,
            log,
            exited: None,
        }
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Its stderr so far, framed, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- vsnd-broker stderr (pid {}) ---\n{}--- end ---",
            self.child.id(),
            self.log.text()
        )
    }

    /// The exit status, if it has exited.
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Wait until `needle` has appeared in at least `count` lines, and
    /// return the `count`th.
    ///
    /// # Panics
    /// (With the log) when the broker exits first or `timeout` passes.
    pub fn wait_log(&mut self, needle: &str, count: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.log.matching(needle);
            if let Some((_, line)) = found.get(count.saturating_sub(1)) {
                return line.clone();
            }
            if let Some(status) = self.poll_exit() {
                // The last lines may still be in the pipe.
                sleep(Duration::from_millis(100));
                if let Some((_, line)) = self.log.matching(needle).get(count.saturating_sub(1)) {
                    return line.clone();
                }
                panic!(
                    "expected {count} log line(s) containing {needle:?}, got {} before the broker \
                     exited ({status})\n{}",
                    found.len(),
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "expected {count} log line(s) containing {needle:?} within {timeout:?}, got {}\n{}",
                found.len(),
                self.logs()
            );
            sleep(Duration::from_millis(10));
        }
    }

    /// Pids from the broker's "device started (pid N)" lines, in order.
    pub fn device_pids(&self) -> Vec<i32> {
        self.log
            .matching(DEVICE_STARTED)
            .iter()
            .filter_map(|(_, l)| started_device_pid(l))
            .collect()
    }

    /// Wait for the `n`th device (1-based) to be started; its pid.
    ///
    /// # Panics
    /// As [`wait_log`](Self::wait_log), or when the line has no pid.
    pub fn wait_device(&mut self, n: usize, timeout: Duration) -> i32 {
        let line = self.wait_log(DEVICE_STARTED, n, timeout);
        started_device_pid(&line).unwrap_or_else(|| {
            panic!(
                "could not read the pid of device #{n} from {line:?}\n{}",
                self.logs()
            )
        })
    }

    /// The relayed lines of device `pid`, without the `vsnd-device[PID]: `
    /// prefix.
    pub fn device_lines(&self, pid: i32) -> Vec<String> {
        let prefix = format!("{DEVICE_LINE_PREFIX}{pid}]: ");
        self.log
            .lines()
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix).map(str::to_owned))
            .collect()
    }

    /// The broker's own lines (not relayed from a device).
    pub fn own_lines(&self) -> Vec<String> {
        self.log
            .lines()
            .into_iter()
            .filter(|l| !l.starts_with(DEVICE_LINE_PREFIX))
            .collect()
    }

    /// Send `sig` to the broker.
    ///
    /// # Panics
    /// When it cannot be sent.
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig)
            .unwrap_or_else(|e| panic!("cannot send {sig} to the broker: {e}\n{}", self.logs()));
    }

    /// Wait for the broker to exit on its own.
    ///
    /// # Panics
    /// (With the log) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.poll_exit() {
                // Let the reader thread catch the last lines.
                sleep(Duration::from_millis(50));
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: expected the broker to exit within {timeout:?}, it is still running\n{}",
                self.logs()
            );
            sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then expect exit status 0 within `timeout`.
    ///
    /// # Panics
    /// (With the log) otherwise.
    pub fn stop(&mut self, timeout: Duration, what: &str) {
        self.signal(Signal::SIGTERM);
        let s = self.wait_exit(timeout, what);
        assert_eq!(
            s.code(),
            Some(0),
            "{what}: expected exit status 0 after SIGTERM, got {s}\n{}",
            self.logs()
        );
    }

    /// # Panics
    /// (With the log) when the broker has exited.
    pub fn assert_running(&mut self, what: &str) {
        if let Some(s) = self.poll_exit() {
            panic!(
                "{what}: expected the broker to keep running, it exited ({s})\n{}",
                self.logs()
            );
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if self.poll_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            // Let the reader catch the last lines.
            sleep(Duration::from_millis(50));
            eprintln!("{}", self.logs());
        }
    }
}

/// Stop `child` the way a service manager does: SIGTERM, then SIGKILL if it
/// has not exited within `grace`; reap it. True if it exited on SIGTERM.
pub fn terminate(child: &mut Child, grace: Duration) -> bool {
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return true,
            Ok(None) if Instant::now() < deadline => sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// `(fd number, link target)` of every open descriptor of `pid`, sorted.
///
/// # Panics
/// When `/proc/<pid>/fd` cannot be listed.
pub fn open_fds(pid: i32) -> Vec<(i32, String)> {
    let dir = format!("/proc/{pid}/fd");
    let mut fds: Vec<(i32, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {dir}: {e}"))
        .filter_map(|e| {
            let e = e.ok()?;
            let n = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some((n, target.to_string_lossy().into_owned()))
        })
        .collect();
    fds.sort();
    fds
}

/// [`open_fds`] for a failure message, one per line.
pub fn show_fds(fds: &[(i32, String)]) -> String {
    fds.iter().map(|(n, t)| format!("  {n} -> {t}\n")).collect()
}

/// What a broker that was expected to exit on its own did.
#[derive(Debug)]
pub struct Outcome {
    /// Its exit status.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

/// Run `cmd` to completion, killing it after `timeout`.
///
/// # Panics
/// (With its stderr) when it cannot be started or is still running after
/// `timeout`.
pub fn run_to_exit(mut cmd: Command, timeout: Duration, what: &str) -> Outcome {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start vsnd-broker: {e}"));
    let mut out = child.stdout.take().expect("stdout is piped");
    let stdout = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = Log::collect(child.stderr.take().expect("stderr is piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap_or(None) {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            sleep(Duration::from_millis(50));
            panic!(
                "{what}: expected vsnd-broker to exit at once, it was still running after \
                 {timeout:?}\n--- stderr ---\n{}",
                err.text()
            );
        }
        sleep(Duration::from_millis(5));
    };
    let stdout = stdout.join().unwrap_or_default();
    sleep(Duration::from_millis(20));
    Outcome {
        status,
        stdout,
        stderr: err.text(),
    }
}

/// Connect as a VM to `socket`, read the device config and ask PCM_INFO of
/// every stream; returns the connection.
///
/// # Panics
/// (With `logs()`) unless every step works.
pub fn assert_served(socket: &Path, logs: &dyn Fn() -> String, what: &str) -> Frontend {
    let mut fe = Frontend::connect(socket, FrontendOptions::default()).unwrap_or_else(|e| {
        panic!(
            "{what}: expected the VM to connect to {} and set up the device, got: {e}\n{}",
            socket.display(),
            logs()
        )
    });
    let config = snd::Config::parse(fe.config_bytes())
        .unwrap_or_else(|e| panic!("{what}: unreadable device config: {e}\n{}", logs()));
    let n = config.streams;
    assert!(
        n >= 1,
        "{what}: expected at least one PCM stream in the config, got {config:?}\n{}",
        logs()
    );
    let req = snd::query_info(snd::R_PCM_INFO, 0, n, snd::PCM_INFO_SIZE as u32);
    let resp_len = (snd::HDR_SIZE + n as usize * snd::PCM_INFO_SIZE) as u32;
    let resp = fe.control(&req, resp_len).unwrap_or_else(|e| {
        panic!(
            "{what}: expected an answer to PCM_INFO, got: {e}\n{}",
            logs()
        )
    });
    let (status, items) = snd::split_info(&resp, snd::PCM_INFO_SIZE).unwrap_or_else(|e| {
        panic!(
            "{what}: malformed PCM_INFO answer {resp:02x?}: {e}\n{}",
            logs()
        )
    });
    assert_eq!(
        status,
        snd::S_OK,
        "{what}: expected PCM_INFO to answer S_OK, got {status:#x} ({})\n{}",
        snd::status_name(status),
        logs()
    );
    assert_eq!(
        items.len(),
        n as usize,
        "{what}: expected {n} PCM_INFO items, got {}\n{}",
        items.len(),
        logs()
    );
    fe
}
