//! The two service-manager conventions the broker speaks, written by hand
//! (no libsystemd): socket activation (`LISTEN_PID`, `LISTEN_FDS`,
//! `LISTEN_FDNAMES`: the listener is descriptor 3) and readiness
//! notification (`NOTIFY_SOCKET`: `READY=1`, `STATUS=…`, `STOPPING=1` as
//! datagrams to a Unix socket, abstract when the name starts with `@`).
//!
//! Both read their variables once, at start, while the broker has a single
//! thread, and remove them from the environment: the device (started with
//! a clean environment anyway) and anything else the broker starts never
//! see them.

use std::cell::Cell;
use std::ffi::OsString;
use std::os::fd::RawFd;
use std::os::unix::net::{SocketAddr, UnixDatagram};

use log::{debug, info, warn};

/// The first descriptor a service manager passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// Most passed descriptors the broker looks at (it serves one; the bound
/// keeps a hostile environment from making it walk the descriptor table).
const MAX_LISTEN_FDS: usize = 64;

/// Sockets a service manager passed to this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    /// How many (`LISTEN_FDS`): descriptors 3 … 3 + count − 1.
    pub count: usize,
    /// `LISTEN_FDNAMES`, when set.
    pub names: Option<String>,
}

fn take_var(name: &str) -> Option<OsString> {
    let v = std::env::var_os(name);
    if v.is_some() {
        // Single-threaded at this point (see the module comment).
        std::env::remove_var(name);
    }
    v
}

/// Read and remove `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`. The
/// sockets are ours only if `LISTEN_PID` is this process; otherwise (they
/// were meant for a parent that exec'd us without clearing them) they are
/// ignored with a log line. Call it first thing in `main`, before any
/// thread exists.
pub fn take_activation() -> Result<Option<Activation>, String> {
    let pid = take_var("LISTEN_PID");
    let fds = take_var("LISTEN_FDS");
    let names = take_var("LISTEN_FDNAMES").and_then(|n| n.into_string().ok());
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    let me = std::process::id();
    let pid_ok = pid.to_str().and_then(|p| p.parse::<u32>().ok());
    if pid_ok != Some(me) {
        info!(
            "LISTEN_PID={} is not this process (pid {me}): ignoring LISTEN_FDS \
             (sockets passed to another process)",
            pid.to_string_lossy()
        );
        return Ok(None);
    }
    let count = fds
        .to_str()
        .and_then(|n| n.parse::<usize>().ok())
        .ok_or_else(|| {
            format!(
                "LISTEN_FDS={:?} is not a number of descriptors",
                fds.to_string_lossy()
            )
        })?;
    if count == 0 {
        debug!("LISTEN_FDS=0: no socket was passed");
        return Ok(None);
    }
    if count > MAX_LISTEN_FDS {
        return Err(format!(
            "LISTEN_FDS={count}: vsnd-broker serves exactly one socket (one vsnd@.socket per VM)"
        ));
    }
    Ok(Some(Activation { count, names }))
}

impl Activation {
    /// The passed descriptors.
    pub fn fds(&self) -> impl Iterator<Item = RawFd> {
        let end = LISTEN_FDS_START.saturating_add(RawFd::try_from(self.count).unwrap_or(0));
        LISTEN_FDS_START..end
    }

    /// The one listener the broker can use, or why not.
    pub fn listener_fd(&self) -> Result<RawFd, String> {
        if self.count != 1 {
            return Err(format!(
                "the service manager passed {} sockets (LISTEN_FDS={}{}); vsnd-broker \
                 serves exactly one: give the socket unit a single ListenStream=",
                self.count,
                self.count,
                self.names
                    .as_deref()
                    .map(|n| format!(", LISTEN_FDNAMES={n}"))
                    .unwrap_or_default()
            ));
        }
        Ok(LISTEN_FDS_START)
    }

    /// Passed descriptors the broker does not use: close-on-exec, so that
    /// nothing it starts inherits them (the device gets only its own two).
    pub fn set_cloexec(&self) {
        for fd in self.fds() {
            // SAFETY: F_GETFD/F_SETFD on a descriptor number only change its
            // close-on-exec flag; an unused number fails harmlessly.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                if flags >= 0 {
                    libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                }
            }
        }
    }
}

/// Where readiness goes: `NOTIFY_SOCKET`, read once.
#[derive(Debug)]
pub struct Notifier {
    addr: SocketAddr,
    display: String,
    sock: UnixDatagram,
    ready_sent: Cell<bool>,
}

impl Notifier {
    /// Read and remove `NOTIFY_SOCKET`. `None` when it is not set, or (with
    /// a warning) when it names no socket this broker can use.
    pub fn from_env() -> Option<Notifier> {
        let raw = take_var("NOTIFY_SOCKET")?;
        let name = raw.to_string_lossy().into_owned();
        match Self::new(&name) {
            Ok(n) => Some(n),
            Err(e) => {
                warn!("NOTIFY_SOCKET={name:?}: {e}; readiness will not be reported");
                None
            }
        }
    }

    /// A notifier sending to `name`: an absolute path, or `@name` for an
    /// abstract socket.
    pub fn new(name: &str) -> Result<Notifier, String> {
        let addr = if let Some(abs) = name.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(abs.as_bytes()).map_err(|e| e.to_string())?
        } else if name.starts_with('/') {
            SocketAddr::from_pathname(name).map_err(|e| e.to_string())?
        } else {
            return Err("not an absolute path or an @abstract name".into());
        };
        let sock = UnixDatagram::unbound().map_err(|e| format!("cannot create a socket: {e}"))?;
        Ok(Notifier {
            addr,
            display: name.to_string(),
            sock,
            ready_sent: Cell::new(false),
        })
    }

    /// Send `state` (newline-separated `KEY=value` lines). A failure is
    /// logged, never fatal: the broker serves the VM all the same.
    pub fn notify(&self, state: &str) {
        match self.sock.send_to_addr(state.as_bytes(), &self.addr) {
            Ok(_) => debug!("notified {}: {}", self.display, state.replace('\n', " ")),
            Err(e) => warn!("cannot notify the service manager at {}: {e}", self.display),
        }
    }

    /// A device was started and the listener is being served: `READY=1`
    /// the first time, a new `STATUS=` after that.
    pub fn device_started(&self, what: &str, device_pid: u32) {
        // One line: a newline in `what` (a socket path) would add
        // assignments of its own.
        let what = what.replace(['\n', '\r'], " ");
        let status = format!("STATUS=serving {what} (device pid {device_pid})");
        if self.ready_sent.replace(true) {
            self.notify(&status);
        } else {
            self.notify(&format!("READY=1\n{status}"));
        }
    }

    /// The broker is shutting down.
    pub fn stopping(&self, why: &str) {
        let why = why.replace(['\n', '\r'], " ");
        self.notify(&format!("STOPPING=1\nSTATUS={why}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifies_pathname_and_abstract_sockets() {
        let dir = std::env::temp_dir().join(format!("vsnd-notify-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap()).unwrap();
        n.device_started("/run/vm.sock", 42);
        n.device_started("/run/vm.sock", 43);
        n.stopping("stopping");
        let mut buf = [0u8; 256];
        let mut next = || {
            let len = rx.recv(&mut buf).unwrap();
            String::from_utf8_lossy(&buf[..len]).into_owned()
        };
        assert_eq!(
            next(),
            "READY=1\nSTATUS=serving /run/vm.sock (device pid 42)"
        );
        assert_eq!(next(), "STATUS=serving /run/vm.sock (device pid 43)");
        assert_eq!(next(), "STOPPING=1\nSTATUS=stopping");
        let _ = std::fs::remove_dir_all(&dir);

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("vsnd-notify-test-{}", std::process::id());
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        Notifier::new(&format!("@{name}"))
            .unwrap()
            .notify("READY=1");
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1");
    }

    #[test]
    fn refuses_relative_names() {
        assert!(Notifier::new("notify.sock").is_err());
        assert!(Notifier::new("vsock:2:1234").is_err());
    }

    #[test]
    fn activation_fds() {
        let a = Activation {
            count: 1,
            names: None,
        };
        assert_eq!(a.listener_fd(), Ok(3));
        assert_eq!(a.fds().collect::<Vec<_>>(), vec![3]);
        let a = Activation {
            count: 2,
            names: Some("a:b".into()),
        };
        let e = a.listener_fd().unwrap_err();
        assert!(e.contains("LISTEN_FDS=2") && e.contains("a:b"), "{e}");
        assert_eq!(a.fds().collect::<Vec<_>>(), vec![3, 4]);
    }
}
