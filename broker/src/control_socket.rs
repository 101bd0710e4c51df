//! The control socket: QUERY/SET/SUBSCRIBE lines from administrators and
//! policy tools.
//!
//! A Unix stream socket created with mode 0600. Each peer is checked with
//! SO_PEERCRED: the broker's own uid, root, and every `--control-allow-uid`
//! may talk; anyone else gets `ERR permission denied` and is disconnected.
//! Everything is non-blocking and bounded (clients, line length, queued
//! output, idle time), so a slow or hostile client never stalls audio or
//! other clients.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use nix::poll::PollFlags;
use vsnd_ipc::{Direction, GateState};

use crate::gate::{describe, Gate, Source};

/// Most clients connected at once; more are turned away.
pub const MAX_CLIENTS: usize = 64;
/// Longest request line, without its newline.
pub const MAX_LINE: usize = 256;
/// A client that sends nothing for this long is disconnected (subscribers
/// are exempt: waiting is what they do).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes queued to one client; a client that does not read is dropped.
pub const MAX_PENDING_OUTPUT: usize = 16 * 1024;
/// Most bytes read from one client per wakeup: a few requests. A client
/// that pipelines requests (each change also syncs the audit log) waits
/// for the next wakeup, after the audio and the other clients; the rest
/// stays in its socket.
pub const MAX_READ_PER_WAKEUP: usize = 64;

/// One request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// `QUERY`
    Query,
    /// `SET output|input on|off`
    Set(Direction, bool),
    /// `SUBSCRIBE`
    Subscribe,
}

/// Parse one request line (without its newline). Keywords are
/// case-insensitive; words are separated by spaces or tabs.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|_| "request is not ASCII".to_string())?;
    let text = text.strip_suffix('\r').unwrap_or(text);
    if !text.is_ascii() {
        return Err("request is not ASCII".into());
    }
    let words: Vec<&str> = text.split_ascii_whitespace().collect();
    match words.as_slice() {
        [] => Err("empty request".into()),
        [cmd] if cmd.eq_ignore_ascii_case("QUERY") => Ok(Request::Query),
        [cmd] if cmd.eq_ignore_ascii_case("SUBSCRIBE") => Ok(Request::Subscribe),
        [cmd, dir, value] if cmd.eq_ignore_ascii_case("SET") => {
            let d = if dir.eq_ignore_ascii_case("output") {
                Direction::Output
            } else if dir.eq_ignore_ascii_case("input") {
                Direction::Input
            } else {
                return Err("bad direction: use output or input".into());
            };
            let on = if value.eq_ignore_ascii_case("on") {
                true
            } else if value.eq_ignore_ascii_case("off") {
                false
            } else {
                return Err("bad value: use on or off".into());
            };
            Ok(Request::Set(d, on))
        }
        [cmd, ..] if cmd.eq_ignore_ascii_case("SET") => {
            Err("usage: SET output|input on|off".into())
        }
        [cmd, ..] if cmd.eq_ignore_ascii_case("QUERY") || cmd.eq_ignore_ascii_case("SUBSCRIBE") => {
            Err(format!("{} takes no arguments", cmd.to_ascii_uppercase()))
        }
        _ => Err("unknown command: use QUERY, SET output|input on|off, or SUBSCRIBE".into()),
    }
}

struct Peer {
    uid: u32,
    pid: i32,
    comm: String,
}

struct Client {
    stream: UnixStream,
    peer: Peer,
    input: Vec<u8>,
    output: VecDeque<u8>,
    subscribed: bool,
    last_request: Instant,
    /// Close once the output is flushed.
    closing: bool,
    /// Gone: remove at the next sweep.
    dead: bool,
}

impl Client {
    fn queue(&mut self, line: &str) {
        if self.output.len() + line.len() + 1 > MAX_PENDING_OUTPUT {
            debug!(
                "control: client pid {} does not read; disconnecting",
                self.peer.pid
            );
            self.dead = true;
            return;
        }
        self.output.extend(line.as_bytes());
        self.output.push_back(b'\n');
    }

    fn flush(&mut self) {
        while !self.output.is_empty() {
            let (a, _) = self.output.as_slices();
            match self.stream.write(a) {
                Ok(0) => {
                    self.dead = true;
                    return;
                }
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    self.dead = true;
                    return;
                }
            }
        }
        if self.closing {
            self.dead = true;
        }
    }
}

/// The listening control socket and its clients.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    allowed: Vec<u32>,
    own_uid: u32,
    clients: Vec<Client>,
}

impl ControlServer {
    /// Create the socket at `path` with mode 0600. A stale socket is
    /// replaced; anything else at `path` is refused.
    pub fn bind(path: &Path, allowed: Vec<u32>) -> Result<Self, String> {
        crate::socket_path::clear_stale_socket(path, "--control-socket")?;
        // Created 0600 from the start: no window in which others could
        // connect.
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
        let bound = UnixListener::bind(path);
        nix::sys::stat::umask(old);
        let listener =
            bound.map_err(|e| format!("cannot create --control-socket {}: {e}", path.display()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot set the mode of {}: {e}", path.display()))?;
        if !allowed.is_empty() {
            if let Err(e) = grant_uids(path, &allowed) {
                let _ = std::fs::remove_file(path);
                return Err(format!(
                    "cannot let uids {allowed:?} reach --control-socket {} (a POSIX ACL on the socket file): {e}; \
                     put the socket on a filesystem with ACL support (tmpfs, ext4, xfs)",
                    path.display()
                ));
            }
        }
        listener.set_nonblocking(true).map_err(|e| e.to_string())?;
        if allowed.is_empty() {
            info!("control socket {} (mode 0600)", path.display());
        } else {
            info!(
                "control socket {} (mode 0600, plus an ACL for uids {allowed:?})",
                path.display()
            );
        }
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            allowed,
            own_uid: nix::unistd::getuid().as_raw(),
            clients: Vec::new(),
        })
    }

    /// Descriptors and events to poll: the listener, then each client.
    pub fn poll_set(&self) -> Vec<(BorrowedFd<'_>, PollFlags)> {
        let mut v = vec![(self.listener.as_fd(), PollFlags::POLLIN)];
        for c in &self.clients {
            let mut f = PollFlags::POLLIN;
            if !c.output.is_empty() {
                f |= PollFlags::POLLOUT;
            }
            v.push((c.stream.as_fd(), f));
        }
        v
    }

    /// When the next idle client must be dropped.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.clients
            .iter()
            .filter(|c| !c.subscribed)
            .map(|c| c.last_request + IDLE_TIMEOUT)
            .min()
    }

    /// Handle poll results (in the order of [`ControlServer::poll_set`]).
    /// Returns true if the gate changed.
    pub fn on_events(&mut self, revents: &[PollFlags], gate: &mut Gate, now: Instant) -> bool {
        // The flags after each change, for one EVENT line per change.
        let mut changes: Vec<GateState> = Vec::new();
        for (i, ev) in revents.iter().enumerate().skip(1) {
            if ev.is_empty() {
                continue;
            }
            if let Some(c) = self.clients.get_mut(i - 1) {
                if ev.contains(PollFlags::POLLOUT) {
                    c.flush();
                }
                if ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                    Self::read_client(c, gate, now, &mut changes);
                }
            }
        }
        if revents.first().is_some_and(|e| !e.is_empty()) {
            // Clients that just left make room for those arriving.
            self.clients.retain(|c| !c.dead);
            self.accept_all(now);
        }
        for state in &changes {
            let line = format!("EVENT {}", describe(*state));
            for c in self.clients.iter_mut().filter(|c| c.subscribed && !c.dead) {
                c.queue(&line);
            }
        }
        self.sweep(now);
        if changes.is_empty() {
            self.flush_all();
        }
        // Otherwise the answers wait until the caller has applied the new
        // flags (closed the host capture source): a client that reads
        // "OK … input=off" can rely on the microphone being closed.
        !changes.is_empty()
    }

    /// Send what is queued for every client (after a gate change has been
    /// applied).
    pub fn flush_all(&mut self) {
        for c in self
            .clients
            .iter_mut()
            .filter(|c| !c.dead && !c.output.is_empty())
        {
            c.flush();
        }
        self.clients.retain(|c| !c.dead);
    }

    fn accept_all(&mut self, now: Instant) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("control socket: accept failed: {e}");
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let peer = match nix::sys::socket::getsockopt(
                &stream,
                nix::sys::socket::sockopt::PeerCredentials,
            ) {
                Ok(c) => Peer {
                    uid: c.uid(),
                    pid: c.pid(),
                    comm: comm_of(c.pid()),
                },
                Err(_) => continue,
            };
            let mut client = Client {
                stream,
                peer,
                input: Vec::new(),
                output: VecDeque::new(),
                subscribed: false,
                last_request: now,
                closing: false,
                dead: false,
            };
            let allowed = client.peer.uid == 0
                || client.peer.uid == self.own_uid
                || self.allowed.contains(&client.peer.uid);
            if !allowed {
                warn!(
                    "control socket: refused uid {} pid {} ({})",
                    client.peer.uid, client.peer.pid, client.peer.comm
                );
                client.queue("ERR permission denied");
                client.closing = true;
                client.flush();
                continue; // dropped: a refused peer is not kept waiting
            }
            if self.clients.len() >= MAX_CLIENTS {
                warn!(
                    "control socket: {MAX_CLIENTS} clients already connected; refusing pid {}",
                    client.peer.pid
                );
                client.queue("ERR too many clients");
                client.closing = true;
                client.flush();
                continue;
            }
            debug!(
                "control: client uid {} pid {} ({})",
                client.peer.uid, client.peer.pid, client.peer.comm
            );
            self.clients.push(client);
        }
    }

    /// Read (at most [`MAX_READ_PER_WAKEUP`] bytes) and answer what a client
    /// sent; the flags after each change are appended to `changes`.
    fn read_client(c: &mut Client, gate: &mut Gate, now: Instant, changes: &mut Vec<GateState>) {
        if c.dead || c.closing {
            return;
        }
        let mut buf = [0u8; MAX_READ_PER_WAKEUP];
        let n = loop {
            match c.stream.read(&mut buf) {
                Ok(0) => {
                    c.dead = true;
                    return;
                }
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    c.dead = true;
                    return;
                }
            }
        };
        c.last_request = now;
        for &b in buf.get(..n).unwrap_or(&[]) {
            if c.closing {
                break;
            }
            if b == b'\n' {
                let line = std::mem::take(&mut c.input);
                if Self::answer(c, &line, gate) {
                    changes.push(gate.state());
                }
            } else if c.input.len() >= MAX_LINE {
                c.queue(&format!("ERR line longer than {MAX_LINE} bytes"));
                c.closing = true;
            } else {
                c.input.push(b);
            }
        }
    }

    fn answer(c: &mut Client, line: &[u8], gate: &mut Gate) -> bool {
        match parse_request(line) {
            Ok(Request::Query) => {
                c.queue(&format!("OK {}", describe(gate.state())));
                false
            }
            Ok(Request::Subscribe) => {
                c.subscribed = true;
                c.queue(&format!("OK {}", describe(gate.state())));
                false
            }
            Ok(Request::Set(d, on)) => {
                let source = Source::Control {
                    uid: c.peer.uid,
                    pid: c.peer.pid,
                    comm: c.peer.comm.clone(),
                };
                let changed = gate.set(d, on, &source);
                c.queue(&format!("OK {}", describe(gate.state())));
                changed
            }
            Err(why) => {
                c.queue(&format!("ERR {why}"));
                false
            }
        }
    }

    fn sweep(&mut self, now: Instant) {
        for c in &mut self.clients {
            if !c.subscribed && now.saturating_duration_since(c.last_request) >= IDLE_TIMEOUT {
                debug!("control: dropping idle client pid {}", c.peer.pid);
                c.dead = true;
            }
        }
        self.clients.retain(|c| !c.dead);
    }

    /// How many clients are connected (for the tests).
    #[cfg(test)]
    fn clients(&self) -> usize {
        self.clients.len()
    }
}

/// Give each of `uids` read-write access to the socket file with a POSIX
/// access ACL (connecting needs write permission), leaving group and others
/// without any.
fn grant_uids(path: &Path, uids: &[u32]) -> io::Result<()> {
    const VERSION: u32 = 2;
    const USER_OBJ: u16 = 0x01;
    const USER: u16 = 0x02;
    const GROUP_OBJ: u16 = 0x04;
    const MASK: u16 = 0x10;
    const OTHER: u16 = 0x20;
    const RW: u16 = 6;
    const UNDEFINED: u32 = u32::MAX;
    let mut uids = uids.to_vec();
    uids.sort_unstable();
    uids.dedup();
    let mut entries: Vec<(u16, u16, u32)> = vec![(USER_OBJ, RW, UNDEFINED)];
    entries.extend(uids.iter().map(|&u| (USER, RW, u)));
    entries.extend([
        (GROUP_OBJ, 0, UNDEFINED),
        (MASK, RW, UNDEFINED),
        (OTHER, 0, UNDEFINED),
    ]);
    let mut value = VERSION.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        value.extend(tag.to_le_bytes());
        value.extend(perm.to_le_bytes());
        value.extend(id.to_le_bytes());
    }
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: both strings are NUL-terminated and the value buffer is valid
    // for its length.
    let rc = unsafe {
        libc::setxattr(
            cpath.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A client's command name, for the audit trail.
fn comm_of(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| {
            s.trim_end()
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect()
        })
        .unwrap_or_else(|_| "?".into())
}

/// Remove the socket file at exit.
impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests() {
        assert_eq!(parse_request(b"QUERY"), Ok(Request::Query));
        assert_eq!(parse_request(b"query\r"), Ok(Request::Query));
        assert_eq!(parse_request(b"SUBSCRIBE"), Ok(Request::Subscribe));
        assert_eq!(
            parse_request(b"SET input on"),
            Ok(Request::Set(Direction::Input, true))
        );
        assert_eq!(
            parse_request(b"set  output\toff"),
            Ok(Request::Set(Direction::Output, false))
        );
        for bad in [
            &b""[..],
            b"   ",
            b"SET mic on",
            b"SET input maybe",
            b"SET input",
            b"SET input on now",
            b"QUERY me",
            b"HELLO",
            b"SET input \xff",
            b"\x00\x01",
        ] {
            let r = parse_request(bad);
            assert!(r.is_err(), "{bad:?} parsed as {r:?}");
        }
    }

    fn server(dir: &Path) -> ControlServer {
        ControlServer::bind(&dir.join("ctl.sock"), vec![]).unwrap()
    }

    fn pump(s: &mut ControlServer, gate: &mut Gate) -> bool {
        let n = s.poll_set().len();
        let ev = vec![PollFlags::POLLIN | PollFlags::POLLOUT; n];
        let changed = s.on_events(&ev, gate, Instant::now());
        s.flush_all();
        changed
    }

    fn read_line(c: &mut UnixStream) -> String {
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut out = Vec::new();
        let mut b = [0u8; 1];
        while c.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
            out.push(b[0]);
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn query_set_subscribe_and_errors() {
        let dir = std::env::temp_dir().join(format!("vsnd-ctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = server(&dir);
        let mode = std::fs::metadata(dir.join("ctl.sock"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let mut gate = Gate::new(true, false, crate::audit::AuditLog::open(None).unwrap());
        let mut a = UnixStream::connect(dir.join("ctl.sock")).unwrap();
        let mut sub = UnixStream::connect(dir.join("ctl.sock")).unwrap();
        pump(&mut s, &mut gate);
        sub.write_all(b"SUBSCRIBE\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        pump(&mut s, &mut gate);
        a.write_all(b"QUERY\nSET input on\nBOGUS\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(pump(&mut s, &mut gate), "SET input on changes the gate");
        assert_eq!(read_line(&mut sub), "OK output=on input=off");
        assert_eq!(read_line(&mut sub), "EVENT output=on input=on");
        assert_eq!(read_line(&mut a), "OK output=on input=off");
        assert_eq!(read_line(&mut a), "OK output=on input=on");
        assert!(read_line(&mut a).starts_with("ERR unknown command"));
        // Still usable after an error; SET to the same value is no change.
        a.write_all(b"SET input on\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!pump(&mut s, &mut gate));
        assert_eq!(read_line(&mut a), "OK output=on input=on");
        // An over-long line ends the connection (read a little per wakeup).
        a.write_all(&[b'x'; MAX_LINE + 10]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        for _ in 0..(MAX_LINE + 10).div_ceil(MAX_READ_PER_WAKEUP) {
            pump(&mut s, &mut gate);
        }
        assert!(read_line(&mut a).starts_with("ERR line longer"));
        assert_eq!(read_line(&mut a), "", "the connection is closed");
        pump(&mut s, &mut gate);
        assert_eq!(s.clients(), 1, "only the subscriber is left");
        drop(s);
        assert!(!dir.join("ctl.sock").exists(), "the socket is removed");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn every_change_is_an_event_and_a_wakeup_reads_a_little() {
        let dir = std::env::temp_dir().join(format!("vsnd-ctl-ev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = server(&dir);
        let mut gate = Gate::new(true, false, crate::audit::AuditLog::open(None).unwrap());
        let mut a = UnixStream::connect(dir.join("ctl.sock")).unwrap();
        let mut sub = UnixStream::connect(dir.join("ctl.sock")).unwrap();
        pump(&mut s, &mut gate);
        sub.write_all(b"SUBSCRIBE\n").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        pump(&mut s, &mut gate);
        assert_eq!(read_line(&mut sub), "OK output=on input=off");
        // Three changes in one read: three events, in order.
        a.write_all(b"SET input on\nSET input off\nSET input on\n")
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(pump(&mut s, &mut gate));
        for want in ["on", "off", "on"] {
            assert_eq!(read_line(&mut sub), format!("EVENT output=on input={want}"));
        }
        for _ in 0..3 {
            assert!(read_line(&mut a).starts_with("OK"));
        }
        // Pipelined requests are answered a few per wakeup.
        a.write_all(&b"QUERY\n".repeat(40)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        pump(&mut s, &mut gate);
        a.set_nonblocking(true).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = a.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let answers = got.iter().filter(|&&b| b == b'\n').count();
        assert_eq!(answers, MAX_READ_PER_WAKEUP / b"QUERY\n".len());
        std::fs::remove_dir_all(&dir).ok();
    }
}
