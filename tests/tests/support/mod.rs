//! Shared by `config.rs` and `socket_activation.rs`, on top of
//! [`vsnd_tests::process`]: descriptors handed over the way a service
//! manager does, brokers that should give up at start, paths that should
//! appear, and the VM's view (connect, read the config, ask PCM_INFO).

#![allow(dead_code)]

use std::ffi::OsStr;
use std::os::fd::RawFd;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use vsnd_tests::bin_path;
use vsnd_tests::process;
pub use vsnd_tests::process::{BrokerProcess as Broker, DEVICE_STARTED};
use vsnd_tests::snd;

/// How long a broker that should give up at start may take.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for a log line, a socket or a notification.
pub const WAIT: Duration = Duration::from_secs(10);

/// A `vsnd-broker` command: `RUST_LOG=info`, stdin from /dev/null, and
/// `fd3` (when given) open in the broker as descriptor 3, not close-on-exec.
pub fn broker_command<S: AsRef<OsStr>>(
    args: impl IntoIterator<Item = S>,
    fd3: Option<RawFd>,
) -> Command {
    let fds: Vec<(RawFd, RawFd)> = fd3.map(|fd| (fd, 3)).into_iter().collect();
    process::broker_command(args, &fds)
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
    process::pass_fds(&mut cmd, &[(fd3, 3)]);
    cmd
}

/// Run a broker that should give up at start; returns (status, stderr).
pub fn run_to_exit(cmd: Command, what: &str) -> (ExitStatus, String) {
    let out = process::run_to_exit(cmd, EXIT_TIMEOUT, what);
    (out.status, out.stderr)
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
    let fe = process::assert_served(socket, &|| broker.logs(), what);
    snd::Config::parse(fe.config_bytes()).map_or(0, |c| c.streams)
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
