//! The device's stderr, relayed into the broker's log.
//!
//! The device writes its log to a pipe the broker reads, so that its lines
//! are always marked as coming from the device (a compromised device cannot
//! forge broker lines), control characters are removed, lines are capped in
//! length and in rate, and the device never writes a file.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

/// Longest relayed line; the rest is cut.
const MAX_LINE: usize = 1024;
/// Most lines relayed per [`RATE_WINDOW`]; more are counted and dropped.
const MAX_LINES_PER_WINDOW: u32 = 200;
/// Rate-limit window.
const RATE_WINDOW: Duration = Duration::from_secs(1);
/// Bytes read per wakeup.
const READ_CHUNK: usize = 16 * 1024;

/// The reading end of the device's stderr.
pub struct DeviceLog {
    fd: OwnedFd,
    pid: u32,
    line: Vec<u8>,
    window_start: Instant,
    lines_in_window: u32,
    dropped: u64,
}

impl DeviceLog {
    /// Create the pipe: (our reading end, the device's stderr).
    pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
        let (r, w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .map_err(io::Error::from)?;
        // The device's end must block: it writes its log synchronously.
        let flags =
            nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_GETFL).map_err(io::Error::from)?;
        let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
        flags.remove(nix::fcntl::OFlag::O_NONBLOCK);
        nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
        Ok((r, w))
    }

    /// Relay from `fd` for the device with `pid`.
    pub fn new(fd: OwnedFd, pid: u32) -> Self {
        DeviceLog {
            fd,
            pid,
            line: Vec::new(),
            window_start: Instant::now(),
            lines_in_window: 0,
            dropped: 0,
        }
    }

    /// Read what is there; false once the device closed its end.
    pub fn on_readable(&mut self) -> bool {
        let mut buf = [0u8; READ_CHUNK];
        loop {
            match nix::unistd::read(&self.fd, &mut buf) {
                Ok(0) => {
                    self.flush_partial();
                    return false;
                }
                Ok(n) => {
                    for &b in buf.get(..n).unwrap_or(&[]) {
                        if b == b'\n' {
                            self.emit();
                        } else if self.line.len() < MAX_LINE {
                            self.line.push(b);
                        }
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return true, // EAGAIN: nothing more for now
            }
        }
    }

    /// Relay whatever is left once the device is gone.
    pub fn drain(&mut self) {
        self.on_readable();
    }

    fn flush_partial(&mut self) {
        if !self.line.is_empty() {
            self.emit();
        }
        if self.dropped > 0 {
            eprintln!(
                "vsnd-device[{}]: ({} log lines dropped by the rate limit)",
                self.pid, self.dropped
            );
            self.dropped = 0;
        }
    }

    fn emit(&mut self) {
        let now = Instant::now();
        if now.duration_since(self.window_start) >= RATE_WINDOW {
            if self.dropped > 0 {
                eprintln!(
                    "vsnd-device[{}]: ({} log lines dropped by the rate limit)",
                    self.pid, self.dropped
                );
                self.dropped = 0;
            }
            self.window_start = now;
            self.lines_in_window = 0;
        }
        let line = std::mem::take(&mut self.line);
        if self.lines_in_window >= MAX_LINES_PER_WINDOW {
            self.dropped += 1;
            return;
        }
        self.lines_in_window += 1;
        let text: String = String::from_utf8_lossy(&line)
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        eprintln!("vsnd-device[{}]: {text}", self.pid);
    }
}

impl AsFd for DeviceLog {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
