//! Spawning and supervising vsnd-device.
//!
//! The device gets exactly two descriptors (3: the vhost-user listener,
//! 4: its end of the SEQPACKET channel), an empty environment except
//! `RUST_LOG`, and stderr for its log. It serves one frontend connection and
//! exits; a fresh one is started for the next. A crash is logged and the
//! device restarted with backoff; the listener stays open throughout, so a
//! VM can always reconnect.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use nix::poll::{PollFd, PollFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::time::TimeSpec;
use vsnd_ipc::{socketpair, Channel, Pacing};

use crate::audio::Audio;
use crate::cli::SeccompMode;
use crate::control_socket::ControlServer;
use crate::device_log::DeviceLog;
use crate::gate::Gate;
use crate::session::{Session, SessionError};

/// First restart delay after a crash; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest restart delay.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A device that ran this long resets the backoff.
const STABLE_RUN: Duration = Duration::from_secs(10);
/// How long a device may take to exit after closing its channel or being
/// asked to stop.
const EXIT_GRACE: Duration = Duration::from_secs(1);

/// Exit status of vsnd-device for a protocol version mismatch.
const DEVICE_EXIT_VERSION_MISMATCH: i32 = 3;
/// Exit status of vsnd-device when it cannot enter its sandbox.
const DEVICE_EXIT_NO_SANDBOX: i32 = 4;

/// The signals the broker handles; blocked and read from a signalfd.
pub fn handled_signals() -> SigSet {
    let mut s = SigSet::empty();
    s.add(Signal::SIGTERM);
    s.add(Signal::SIGINT);
    s.add(Signal::SIGCHLD);
    s
}

/// How the broker's run ended.
pub enum RunEnd {
    /// SIGTERM or SIGINT.
    Shutdown,
    /// An error no restart can fix.
    Fatal(String),
}

enum DeviceEnd {
    Shutdown,
    Exited {
        status: ExitStatus,
        reason: Option<String>,
    },
    Fatal(String),
}

/// How to start the device.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    /// The vsnd-device executable.
    pub path: PathBuf,
    /// (uid, gid) to switch to before exec; set when the broker is root.
    pub user: Option<(u32, u32)>,
    /// The seccomp mismatch action.
    pub seccomp: SeccompMode,
    /// Run without the sandbox (debugging only).
    pub insecure: bool,
}

/// Everything the supervisor needs.
pub struct Supervisor {
    listener: OwnedFd,
    device: DeviceSpec,
    audio: Box<dyn Audio>,
    gate: Gate,
    control: Option<ControlServer>,
    signals: SignalFd,
    unpaced: bool,
    /// Called with the pid of every device started (readiness reporting).
    on_started: Option<Box<dyn FnMut(u32)>>,
}

impl Supervisor {
    /// `signals` must already be blocked in this thread.
    pub fn new(
        listener: OwnedFd,
        device: DeviceSpec,
        audio: Box<dyn Audio>,
        gate: Gate,
        control: Option<ControlServer>,
    ) -> io::Result<Self> {
        let signals = SignalFd::with_flags(
            &handled_signals(),
            SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK,
        )
        .map_err(io::Error::from)?;
        Ok(Supervisor {
            listener,
            device,
            audio,
            gate,
            control,
            signals,
            unpaced: false,
            on_started: None,
        })
    }

    /// Call `f` with the device's pid each time a device has said hello
    /// (it has sandboxed itself and serves the listener).
    pub fn on_device_started(&mut self, f: impl FnMut(u32) + 'static) {
        self.on_started = Some(Box::new(f));
    }

    /// Measurement only (`--unpaced-for-benchmark`): sessions run without
    /// real-time pacing or metering (see [`vsnd_ipc::Pacing::unpaced`]).
    pub fn set_unpaced_for_benchmark(&mut self, unpaced: bool) {
        self.unpaced = unpaced;
    }

    /// Run until SIGTERM/SIGINT or a fatal error.
    pub fn run(&mut self) -> RunEnd {
        let mut backoff = MIN_BACKOFF;
        loop {
            let started = Instant::now();
            let end = match self.spawn() {
                Ok((child, ch, mut log)) => {
                    let end = self.serve(child, ch, &mut log);
                    log.drain();
                    // The session is over, however it ended: the host capture
                    // source and playback stream close with it (the next VM
                    // starts afresh; a device that died released nothing).
                    self.audio.close_capture();
                    self.audio.close_output();
                    end
                }
                Err(e) => DeviceEnd::Exited {
                    status: ExitStatus::from_raw(1 << 8),
                    reason: Some(format!("cannot start {}: {e}", self.device.path.display())),
                },
            };
            match end {
                DeviceEnd::Shutdown => return RunEnd::Shutdown,
                DeviceEnd::Fatal(msg) => return RunEnd::Fatal(msg),
                DeviceEnd::Exited { status, reason } => {
                    if status.code() == Some(DEVICE_EXIT_VERSION_MISMATCH) {
                        return RunEnd::Fatal(format!(
                            "{} does not speak this broker's protocol (see its log above): \
                             install vsnd-broker and vsnd-device from the same release",
                            self.device.path.display()
                        ));
                    }
                    if status.code() == Some(DEVICE_EXIT_NO_SANDBOX) {
                        warn!(
                            "the device refused to run without its sandbox (see its log above); \
                             fix the cause, or debug with --insecure-no-sandbox"
                        );
                    }
                    if status.success() && reason.is_none() {
                        info!("device exited after its frontend disconnected; ready for the next connection");
                        backoff = MIN_BACKOFF;
                        continue;
                    }
                    if started.elapsed() >= STABLE_RUN {
                        backoff = MIN_BACKOFF;
                    }
                    let why = reason.unwrap_or_else(|| describe_status(status));
                    warn!(
                        "device stopped ({why}); restarting in {} ms",
                        backoff.as_millis()
                    );
                    if self.sleep(backoff) {
                        return RunEnd::Shutdown;
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    fn spawn(&self) -> io::Result<(Child, Channel, DeviceLog)> {
        let (ours, theirs) = socketpair()?;
        let (log_r, log_w) = DeviceLog::pipe()?;
        let child = spawn_device(&self.device, self.listener.as_fd(), theirs.as_fd(), log_w)?;
        drop(theirs);
        info!("device started (pid {})", child.id());
        if self.device.insecure {
            warn!("*** INSECURE: the device runs WITHOUT its sandbox (--insecure-no-sandbox); debugging only ***");
        }
        let log = DeviceLog::new(log_r, child.id());
        Ok((child, Channel::new(ours), log))
    }

    /// Wait `d`, watching for SIGTERM/SIGINT; true if one came.
    fn sleep(&mut self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let wake = earliest([
                Some(deadline),
                self.control.as_ref().and_then(|c| c.next_deadline()),
                self.audio.next_deadline(),
            ])
            .unwrap_or(deadline);
            let (sig_ready, audio_ready, ctl_events) = {
                let ctl_set = self
                    .control
                    .as_ref()
                    .map(|c| c.poll_set())
                    .unwrap_or_default();
                let mut fds = vec![
                    PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                    audio_pollfd(self.audio.as_ref(), self.signals.as_fd()),
                ];
                fds.extend(ctl_set.iter().map(|(fd, f)| PollFd::new(*fd, *f)));
                let _ = nix::poll::ppoll(
                    &mut fds,
                    Some(TimeSpec::from_duration(wake.saturating_duration_since(now))),
                    None,
                );
                let ev: Vec<PollFlags> = fds
                    .iter()
                    .map(|f| f.revents().unwrap_or(PollFlags::empty()))
                    .collect();
                (
                    ev.first().is_some_and(|e| !e.is_empty()),
                    ev.get(1).is_some_and(|e| !e.is_empty()),
                    ev.get(2..).map(<[_]>::to_vec).unwrap_or_default(),
                )
            };
            let now = Instant::now();
            if audio_ready || self.audio.next_deadline().is_some_and(|t| now >= t) {
                self.audio.dispatch(now);
            }
            if let Some(ctl) = self.control.as_mut() {
                ctl.on_events(&ctl_events, &mut self.gate, Instant::now());
                // No device, no stream: nothing to apply first.
                ctl.flush_all();
            }
            if sig_ready && self.read_signals().0 {
                return true;
            }
        }
    }

    /// Drain the signalfd: (shutdown requested, a child changed state).
    fn read_signals(&mut self) -> (bool, bool) {
        let (mut stop, mut child) = (false, false);
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGTERM | Signal::SIGINT) => {
                    info!("signal {}: shutting down", info.ssi_signo);
                    stop = true;
                }
                Ok(Signal::SIGCHLD) => child = true,
                _ => {}
            }
        }
        (stop, child)
    }

    fn serve(&mut self, mut child: Child, ch: Channel, log: &mut DeviceLog) -> DeviceEnd {
        let mut log_open = true;
        let pacing = Pacing {
            unpaced: self.unpaced,
            playback_batch_ms: self.audio.playback_batch_ms(),
            host_capture: self.audio.has_capture_source(),
        };
        let mut session =
            match Session::new(ch, self.audio.capabilities(), self.gate.state(), pacing) {
                Ok(s) => s,
                Err(e) => return stop_device(&mut child, Some(e.to_string())),
            };
        // The device is announced (readiness) once it has said hello: it
        // does so only after it has sandboxed itself, with the listener.
        let mut announced = false;
        loop {
            if !announced && session.greeted() {
                announced = true;
                if let Some(f) = self.on_started.as_mut() {
                    f(child.id());
                }
            }
            let now = Instant::now();
            if let Err(e) = session.on_tick(self.audio.as_mut(), now) {
                return self.session_failed(&mut child, e);
            }
            let wake = earliest([
                session.next_deadline(),
                self.control.as_ref().and_then(|c| c.next_deadline()),
                self.audio.next_deadline(),
            ]);
            let timeout = wake.map(|d| TimeSpec::from_duration(d.saturating_duration_since(now)));
            let mut flags = PollFlags::POLLIN;
            if session.wants_write() {
                flags |= PollFlags::POLLOUT;
            }
            let log_flags = if log_open {
                PollFlags::POLLIN
            } else {
                PollFlags::empty()
            };
            let (sig_ready, ch_events, log_ready, audio_ready, ctl_events) = {
                let ctl_set = self
                    .control
                    .as_ref()
                    .map(|c| c.poll_set())
                    .unwrap_or_default();
                let mut fds = vec![
                    PollFd::new(self.signals.as_fd(), PollFlags::POLLIN),
                    PollFd::new(session.channel().as_fd(), flags),
                    PollFd::new(log.as_fd(), log_flags),
                    audio_pollfd(self.audio.as_ref(), self.signals.as_fd()),
                ];
                fds.extend(ctl_set.iter().map(|(fd, f)| PollFd::new(*fd, *f)));
                match nix::poll::ppoll(&mut fds, timeout, None) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return DeviceEnd::Fatal(format!("poll failed: {e}")),
                }
                let ev: Vec<PollFlags> = fds
                    .iter()
                    .map(|f| f.revents().unwrap_or(PollFlags::empty()))
                    .collect();
                let get = |i: usize| ev.get(i).copied().unwrap_or(PollFlags::empty());
                (
                    get(0).contains(PollFlags::POLLIN),
                    get(1),
                    !get(2).is_empty(),
                    !get(3).is_empty(),
                    ev.get(4..).map(<[_]>::to_vec).unwrap_or_default(),
                )
            };
            let now = Instant::now();
            if audio_ready || self.audio.next_deadline().is_some_and(|t| now >= t) {
                self.audio.dispatch(now);
            }
            if let Some(ctl) = self.control.as_mut() {
                if ctl.on_events(&ctl_events, &mut self.gate, Instant::now()) {
                    let applied = session.set_gate(self.gate.state(), self.audio.as_mut());
                    // Answers go out only now, after the flags took effect.
                    ctl.flush_all();
                    if let Err(e) = applied {
                        return self.session_failed(&mut child, e);
                    }
                }
            }
            if log_ready && log_open {
                log_open = log.on_readable();
            }
            if sig_ready {
                let (stop, _) = self.read_signals();
                if stop {
                    let _ = stop_device(&mut child, None);
                    return DeviceEnd::Shutdown;
                }
                if let Ok(Some(status)) = child.try_wait() {
                    // Whatever it left in the channel no longer matters.
                    return DeviceEnd::Exited {
                        status,
                        reason: None,
                    };
                }
            }
            let now = Instant::now();
            if ch_events.contains(PollFlags::POLLOUT) {
                if let Err(e) = session.on_writable() {
                    return self.session_failed(&mut child, e);
                }
            }
            if ch_events.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                if let Err(e) = session.on_readable(self.audio.as_mut(), now) {
                    return self.session_failed(&mut child, e);
                }
            }
        }
    }

    fn session_failed(&mut self, child: &mut Child, e: SessionError) -> DeviceEnd {
        match e {
            SessionError::Closed => {
                // The device is exiting on its own; give it a moment.
                let status = wait_timeout(child, EXIT_GRACE);
                match status {
                    Some(status) => DeviceEnd::Exited {
                        status,
                        reason: None,
                    },
                    None => stop_device(child, Some("closed its channel but did not exit".into())),
                }
            }
            SessionError::VersionMismatch { .. } => {
                let _ = stop_device(child, None);
                DeviceEnd::Fatal(e.to_string())
            }
            SessionError::Violation(_) | SessionError::Io(_) => {
                error!("{e}; killing the device");
                stop_device(child, Some(e.to_string()))
            }
        }
    }
}

/// The earliest of some optional instants.
fn earliest<const N: usize>(times: [Option<Instant>; N]) -> Option<Instant> {
    times.into_iter().flatten().min()
}

/// The backend's descriptor to poll, or a placeholder that never fires (so
/// that every poll set has the same layout).
fn audio_pollfd<'a>(audio: &'a dyn Audio, placeholder: BorrowedFd<'a>) -> PollFd<'a> {
    match audio.poll_fd() {
        Some(fd) => PollFd::new(fd, PollFlags::POLLIN),
        None => PollFd::new(placeholder, PollFlags::empty()),
    }
}

fn describe_status(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (_, Some(sig)) => {
            let name = Signal::try_from(sig)
                .map(|s| s.as_str())
                .unwrap_or("unknown");
            if sig == libc::SIGSYS {
                format!(
                    "killed by signal {sig} ({name}): a system call outside its seccomp profile; \
                     its last log line names the call (see policy/README.md)"
                )
            } else {
                format!("killed by signal {sig} ({name})")
            }
        }
        _ => format!("{s}"),
    }
}

fn wait_timeout(child: &mut Child, d: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + d;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => return None,
        }
    }
}

/// Stop the device: SIGTERM, then SIGKILL after a grace period; reap it.
fn stop_device(child: &mut Child, reason: Option<String>) -> DeviceEnd {
    if let Ok(Some(status)) = child.try_wait() {
        return DeviceEnd::Exited { status, reason };
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    if let Err(e) = nix::sys::signal::kill(pid, Signal::SIGTERM) {
        warn!("cannot send SIGTERM to device {pid}: {e}");
    }
    // Never wait without a bound: a broker that cannot signal its device
    // (no CAP_KILL over its user; refused at start, but be safe) must not
    // hang here. A device left running dies with the broker (parent-death
    // signal).
    let status = wait_timeout(child, EXIT_GRACE).or_else(|| {
        if let Err(e) = child.kill() {
            warn!("cannot send SIGKILL to device {pid}: {e}");
        }
        wait_timeout(child, EXIT_GRACE)
    });
    let Some(status) = status else {
        // Starting another device on the same listener beside it would
        // leave two serving the VM's socket: stop the broker instead (the
        // device dies with it: parent-death signal).
        return DeviceEnd::Fatal(format!(
            "device {pid} did not stop and cannot be signalled (does the broker lack CAP_KILL?)"
        ));
    };
    debug!("device {} stopped: {status}", pid);
    DeviceEnd::Exited { status, reason }
}

/// fork+exec the device with the listener as fd 3 and the channel as fd 4,
/// stderr a pipe to the broker, every other descriptor closed at exec, a
/// clean environment, and (when the broker is root) an empty bounding set
/// and the unprivileged user.
fn spawn_device(
    spec: &DeviceSpec,
    listener: BorrowedFd<'_>,
    ipc: BorrowedFd<'_>,
    log: OwnedFd,
) -> io::Result<Child> {
    let mut cmd = Command::new(&spec.path);
    cmd.args([
        "--listen-fd",
        "3",
        "--ipc-fd",
        "4",
        "--seccomp",
        spec.seccomp.arg(),
    ])
    .arg("--broker-pid")
    .arg(std::process::id().to_string())
    .env_clear()
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::from(log));
    if spec.insecure {
        cmd.arg("--insecure-no-sandbox");
    }
    if let Ok(v) = std::env::var("RUST_LOG") {
        cmd.env("RUST_LOG", v);
    }
    let (lfd, ifd) = (listener.as_raw_fd(), ipc.as_raw_fd());
    let user = spec.user;
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (sigprocmask, fcntl, dup2, close_range,
    // prctl, setgroups, setgid, setuid) on integers and a local sigset.
    unsafe {
        cmd.pre_exec(move || {
            if let Some((uid, gid)) = user {
                // Still root: empty the bounding set, then become the user.
                for cap in 0..64 {
                    if libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) < 0 {
                        break;
                    }
                    if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                if libc::setgroups(0, std::ptr::null()) < 0
                    || libc::setgid(gid) < 0
                    || libc::setuid(uid) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            // The signals the broker blocks for its signalfd stay blocked
            // across exec; a device that inherited them could not be
            // stopped with SIGTERM. Start it with none blocked.
            let mut none = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            if libc::sigemptyset(none.as_mut_ptr()) < 0
                || libc::sigprocmask(libc::SIG_SETMASK, none.as_ptr(), std::ptr::null_mut()) < 0
            {
                return Err(io::Error::last_os_error());
            }
            // Move both out of the way first so that neither target number
            // clobbers the other, then into place; dup2 clears FD_CLOEXEC.
            let l = libc::fcntl(lfd, libc::F_DUPFD_CLOEXEC, 10);
            let i = libc::fcntl(ifd, libc::F_DUPFD_CLOEXEC, 10);
            if l < 0 || i < 0 || libc::dup2(l, 3) < 0 || libc::dup2(i, 4) < 0 {
                return Err(io::Error::last_os_error());
            }
            // Everything from 5 up closes at exec (std's own error pipe
            // included, after it has done its job).
            if libc::syscall(
                libc::SYS_close_range,
                5u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
}
