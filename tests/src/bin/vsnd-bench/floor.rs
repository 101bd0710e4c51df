//! The pacing floor: what keeping real time costs on this machine, whatever
//! else a device does.
//!
//! A child process (this program as `vsnd-bench floor-child`) blocks on a
//! 10 ms periodic timerfd and, at every expiry, signals one eventfd (two for
//! duplex) that this process waits on, the way the test frontend waits on a
//! device's interrupts. That is all a device that returns buffers at the
//! real-time rate by itself must do per period, at the fewest system calls
//! (one blocking `read`, one `write` per signalled queue). Its CPU per
//! second is the least any paced device pays here. Upstream's null backend
//! does not pace: the frontend's clock wakes it (one `read`, one `write`
//! per period), so the timer's cost lands in the frontend, not in it.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};

use crate::guest::Res;
use crate::procfs;

/// The period the floor keeps (the benchmark's 10 ms periods).
const PERIOD: Duration = Duration::from_millis(10);

/// Warm-up before the measured window.
const WARM_UP: Duration = Duration::from_secs(1);

/// `vsnd-bench floor-child SECS FD [FD]`: signal the eventfds every period
/// for SECS seconds.
pub fn child(args: &[String]) -> Res<()> {
    let (secs, fds) = args.split_first().ok_or("floor-child: SECS FD [FD]")?;
    let secs: u64 = secs.parse().map_err(|e| format!("floor-child: {e}"))?;
    let fds = fds
        .iter()
        .map(|f| f.parse::<RawFd>().map_err(|e| format!("floor-child: {e}")))
        .collect::<Res<Vec<RawFd>>>()?;
    let timer = TimerFd::new(ClockId::CLOCK_MONOTONIC, TimerFlags::TFD_CLOEXEC)
        .map_err(|e| format!("timerfd: {e}"))?;
    timer
        .set(
            Expiration::Interval(TimeSpec::from_duration(PERIOD)),
            TimerSetTimeFlags::empty(),
        )
        .map_err(|e| format!("timerfd_settime: {e}"))?;
    let end = Instant::now() + Duration::from_secs(secs);
    let one = 1u64.to_ne_bytes();
    let mut ticks = [0u8; 8];
    while Instant::now() < end {
        nix::unistd::read(timer.as_fd(), &mut ticks).map_err(|e| format!("read: {e}"))?;
        for &fd in &fds {
            // SAFETY: the parent passed these descriptors open to us.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            nix::unistd::write(fd, &one).map_err(|e| format!("write: {e}"))?;
        }
    }
    Ok(())
}

/// Run the floor for `window` (after a warm-up) with one eventfd, or two
/// with `duplex`; its CPU in milliseconds per second.
pub fn measure(window: Duration, duplex: bool) -> Res<f64> {
    let n = if duplex { 2 } else { 1 };
    // Not close-on-exec: the child inherits them.
    let efds = (0..n)
        .map(|_| {
            EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK)
                .map_err(|e| format!("eventfd: {e}"))
        })
        .collect::<Res<Vec<EventFd>>>()?;
    let secs = (WARM_UP + window).as_secs() + 2;
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("floor-child").arg(secs.to_string());
    for e in &efds {
        cmd.arg(e.as_raw_fd().to_string());
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the floor child: {e}"))?;
    let pid = child.id();
    let result = (|| -> Res<f64> {
        let mut buf = [0u8; 8];
        let mut wait = |until: Instant| -> Res<()> {
            while Instant::now() < until {
                let mut pfds: Vec<PollFd> = efds
                    .iter()
                    .map(|e| PollFd::new(e.as_fd(), PollFlags::POLLIN))
                    .collect();
                poll(&mut pfds, PollTimeout::from(100u16)).map_err(|e| format!("poll: {e}"))?;
                for e in &efds {
                    let _ = nix::unistd::read(e.as_fd(), &mut buf);
                }
            }
            Ok(())
        };
        wait(Instant::now() + WARM_UP)?;
        let cpu0 = procfs::cpu_ns(pid).ok_or("the floor child is gone")?;
        let t0 = Instant::now();
        wait(t0 + window)?;
        let cpu1 = procfs::cpu_ns(pid).ok_or("the floor child is gone")?;
        Ok(cpu1.saturating_sub(cpu0) as f64 / 1e6 / t0.elapsed().as_secs_f64())
    })();
    let _ = child.kill();
    let _ = child.wait();
    result
}
