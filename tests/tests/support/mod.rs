//! Shared by `config.rs` and `socket_activation.rs`: the real `vsnd-broker`
//! as a process whose stderr is collected line by line, descriptors handed
//! over the way a service manager does, and the VM's view (connect, read
//! the config, ask PCM_INFO).

#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead as _, BufReader};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::sleep;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vsnd_tests::bin_path;
use vsnd_tests::frontend::{Frontend, FrontendOptions};
use vsnd_tests::snd;

/// How long a broker that should give up at start may take.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a log line, a socket or a notification.
pub const WAIT: Duration = Duration::from_secs(10);
/// What the broker logs when it has started a device.
pub const DEVICE_STARTED: &str = "device started (pid ";

/// A `vsnd-broker` command: `RUST_LOG=info`, stdin from /dev/null, and
/// `fd` (when given) open in the broker as descriptor 3, not close-on-exec.
pub fn broker_command<S: AsRef<OsStr>>(
    args: impl IntoIterator<Item = S>,
    fd3: Option<RawFd>,
) -> Command {
    let mut cmd = Command::new(bin_path("vsnd-broker"));
    cmd.args(args).env("RUST_LOG", "info").stdin(Stdio::null());
    pass_fd3(&mut cmd, fd3);
    cmd
}

/// What a service manager does for socket activation: `fd3` becomes
/// descriptor 3 and `LISTEN_FDS=count`, `LISTEN_PID` the broker's own pid
/// (a shell sets it to `$$` and execs the broker, which keeps that pid) —
/// or `listen_pid` when given, to play a variable meant for another
/// process.
pub fn activated_command<S: AsRef<OsStr>>(
    args: impl IntoIterator<Item = S>,
    fd3: RawFd,
    count: &str,
    listen_pid: Option<u32>,
) -> Command {
    let mut cmd = Command::new("/bin/sh");
    let pid = listen_pid.map_or_else(|| "$$".to_string(), |p| p.to_string());
    cmd.arg("-c")
        .arg(format!("export LISTEN_PID={pid}; exec \"$0\" \"$@\""))
        .arg(bin_path("vsnd-broker"))
        .args(args)
        .env("LISTEN_FDS", count)
        .env("LISTEN_FDNAMES", "vsnd")
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_PID")
        .stdin(Stdio::null());
    pass_fd3(&mut cmd, Some(fd3));
    cmd
}

fn pass_fd3(cmd: &mut Command, fd3: Option<RawFd>) {
    let Some(fd) = fd3 else { return };
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe calls (fcntl, dup2, close) on integers.
    unsafe {
        cmd.pre_exec(move || {
            // Move it above 100 first, in case the source is 3 already.
            let high = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 100);
            if high < 0 || libc::dup2(high, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::close(high);
            Ok(())
        });
    }
}

/// Lines of a process's stderr.
#[derive(Clone, Default)]
pub struct Log {
    lines: Arc<Mutex<Vec<String>>>,
}

impl Log {
    fn collect(pipe: impl std::io::Read + Send + 'static) -> Log {
        let log = Log::default();
        let lines = Arc::clone(&log.lines);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        log
    }

    /// Everything so far.
    pub fn text(&self) -> String {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines.iter().map(|l| format!("{l}\n")).collect()
    }

    /// Lines containing `needle`.
    pub fn matching(&self, needle: &str) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        lines
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }
}

/// A running broker; killed and reaped on drop, its log printed if the
/// test is failing.
pub struct Broker {
    pub child: Child,
    pub log: Log,
    exited: Option<ExitStatus>,
}

impl Broker {
    pub fn spawn(mut cmd: Command) -> Broker {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start vsnd-broker: {e}"));
        let log = Log::collect(child.stderr.take().expect("stderr is piped"));
        Broker {
            child,
            log,
            exited: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        format!(
            "--- vsnd-broker stderr (pid {}) ---\n{}--- end ---",
            self.child.id(),
            self.log.text()
        )
    }

    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().ok().flatten();
        }
        self.exited
    }

    /// Wait until a line contains `needle`; returns it.
    pub fn wait_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(l) = self.log.matching(needle).into_iter().next() {
                return l;
            }
            if let Some(s) = self.poll_exit() {
                sleep(Duration::from_millis(100));
                if let Some(l) = self.log.matching(needle).into_iter().next() {
                    return l;
                }
                panic!(
                    "expected a log line containing {needle:?}, the broker exited first ({s})\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "expected a log line containing {needle:?} within {WAIT:?}\n{}",
                self.logs()
            );
            sleep(Duration::from_millis(10));
        }
    }

    /// The pid of the first device started.
    pub fn device_pid(&mut self) -> i32 {
        let line = self.wait_log(DEVICE_STARTED);
        let rest = &line[line.find(DEVICE_STARTED).unwrap() + DEVICE_STARTED.len()..];
        rest[..rest.find(')').unwrap()].parse().unwrap()
    }

    /// Wait for the broker to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration, what: &str) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.poll_exit() {
                sleep(Duration::from_millis(50));
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: expected the broker to exit within {timeout:?}, it still runs\n{}",
                self.logs()
            );
            sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then expect exit status 0.
    pub fn stop(&mut self, what: &str) {
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM).unwrap();
        let s = self.wait_exit(WAIT, what);
        assert_eq!(
            s.code(),
            Some(0),
            "{what}: expected exit status 0 after SIGTERM, got {s}\n{}",
            self.logs()
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if self.poll_exit().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

/// Run a broker that should give up at start; returns (status, stderr).
pub fn run_to_exit(cmd: Command, what: &str) -> (ExitStatus, String) {
    let mut b = Broker::spawn(cmd);
    let status = b.wait_exit(EXIT_TIMEOUT, what);
    (status, b.log.text())
}

/// Wait until `path` exists.
pub fn wait_for_path(path: &Path, broker: &mut Broker) {
    let deadline = Instant::now() + WAIT;
    while std::fs::symlink_metadata(path).is_err() {
        if let Some(s) = broker.poll_exit() {
            panic!(
                "expected {} to appear, the broker exited ({s})\n{}",
                path.display(),
                broker.logs()
            );
        }
        assert!(
            Instant::now() < deadline,
            "expected {} to appear within {WAIT:?}\n{}",
            path.display(),
            broker.logs()
        );
        sleep(Duration::from_millis(10));
    }
}

/// Connect as a VM to `socket`, read the device config and ask PCM_INFO of
/// every stream; panics (with the broker's log) unless every step works.
/// Returns the number of streams.
pub fn assert_served(socket: &Path, broker: &Broker, what: &str) -> u32 {
    let mut fe = Frontend::connect(socket, FrontendOptions::default()).unwrap_or_else(|e| {
        panic!(
            "{what}: expected the VM to connect to {} and set up the device, got: {e}\n{}",
            socket.display(),
            broker.logs()
        )
    });
    let config = snd::Config::parse(fe.config_bytes())
        .unwrap_or_else(|e| panic!("{what}: unreadable device config: {e}\n{}", broker.logs()));
    let n = config.streams;
    assert!(
        n >= 1,
        "{what}: expected PCM streams in the config, got {config:?}\n{}",
        broker.logs()
    );
    let req = snd::query_info(snd::R_PCM_INFO, 0, n, snd::PCM_INFO_SIZE as u32);
    let resp_len = (snd::HDR_SIZE + n as usize * snd::PCM_INFO_SIZE) as u32;
    let resp = fe.control(&req, resp_len).unwrap_or_else(|e| {
        panic!(
            "{what}: expected an answer to PCM_INFO, got: {e}\n{}",
            broker.logs()
        )
    });
    let (status, items) = snd::split_info(&resp, snd::PCM_INFO_SIZE).unwrap_or_else(|e| {
        panic!(
            "{what}: malformed PCM_INFO answer {resp:02x?}: {e}\n{}",
            broker.logs()
        )
    });
    assert_eq!(
        status,
        snd::S_OK,
        "{what}: expected PCM_INFO to answer S_OK, got {status:#x}\n{}",
        broker.logs()
    );
    assert_eq!(
        items.len(),
        n as usize,
        "{what}: expected {n} PCM_INFO items\n{}",
        broker.logs()
    );
    n
}

/// The environment of `pid`, as `NAME=value` strings.
pub fn environ(pid: i32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_else(|e| panic!("cannot read /proc/{pid}/environ: {e}"));
    raw.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}
