//! Shared fixtures for the tests that run the real binaries: a private
//! temporary directory, a running `vsnd-broker` (with its `file` backend, or
//! another: [`Backend`]) that is stopped on drop, a deterministic PCM
//! generator, and helpers that drive a stream through SET_PARAMS / PREPARE /
//! START / STOP / RELEASE and submit transfers.
//!
//! Every helper that can fail panics with a message that says what was
//! expected and what came instead; the [`Broker`] guard prints the broker's
//! (and its devices') log when it is dropped during a panic, and keeps its
//! directory for inspection.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::bin_path;
use crate::frontend::{Frontend, FrontendOptions, Used};
use crate::snd::{self, PcmStatus};

/// How long [`Broker::start`] waits for the broker's socket to appear.
pub const START_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the guard waits for the broker to exit after SIGTERM before it
/// sends SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long [`Broker::connect`] waits for the vhost-user handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Broker::control`] waits for an answer.
pub const CONTROL_SOCKET_TIMEOUT: Duration = Duration::from_secs(5);
/// Lines of the broker log printed when a test fails.
pub const LOG_TAIL_LINES: usize = 400;

/// Environment variable: keep the temporary directories even on success.
pub const KEEP_ENV: &str = "VSND_TEST_KEEP";

// ---------------------------------------------------------------------------
// Temporary directory
// ---------------------------------------------------------------------------

/// A fresh directory under the system temp dir; removed on drop unless the
/// test panicked (or `$VSND_TEST_KEEP` is set), in which case its path is
/// printed.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Create `<tmp>/vsnd-<tag>-<pid>-<n>`.
    ///
    /// # Panics
    /// When the directory cannot be created.
    pub fn new(tag: &str) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("vsnd-{tag}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create temp dir {}: {e}", path.display()));
        Self { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os(KEEP_ENV).is_some() {
            eprintln!("kept test directory {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

// ---------------------------------------------------------------------------
// PCM data
// ---------------------------------------------------------------------------

/// `len` deterministic pseudo-random bytes for `seed` (xorshift64*): never
/// all-silent, never periodic at any period a test uses, and different for
/// different seeds, so misplaced, repeated or dropped bytes are detected.
pub fn pcm_pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `len` bytes of `src` repeated from its start (what a looping capture file
/// yields).
pub fn looped(src: &[u8], len: usize) -> Vec<u8> {
    src.iter().copied().cycle().take(len).collect()
}

/// Compare byte strings and panic with the first difference, the lengths
/// and a short hex context (never the whole buffers).
pub fn assert_same_bytes(what: &str, got: &[u8], want: &[u8]) {
    if got == want {
        return;
    }
    let first = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let ctx = |b: &[u8]| {
        let s = first.saturating_sub(8);
        let e = (first + 8).min(b.len());
        b.get(s..e).map(|x| format!("{x:02x?}")).unwrap_or_default()
    };
    panic!(
        "{what}: expected {} bytes, got {}; first difference at byte {first}: \
         expected …{}…, got …{}…",
        want.len(),
        got.len(),
        ctx(want),
        ctx(got)
    );
}

/// Stream parameters as a test sets them (virtio codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcmConfig {
    /// Channels per frame.
    pub channels: u8,
    /// `snd::PCM_FMT_*`.
    pub format: u8,
    /// `snd::PCM_RATE_*`.
    pub rate: u8,
    /// Period in bytes.
    pub period_bytes: u32,
    /// Ring buffer in bytes.
    pub buffer_bytes: u32,
}

impl PcmConfig {
    /// S16 stereo at 48 kHz with periods of `period_ms` milliseconds and a
    /// buffer of four periods.
    pub fn s16_stereo_48k(period_ms: u32) -> Self {
        let period_bytes = 48 * period_ms * 4;
        Self {
            channels: 2,
            format: snd::PCM_FMT_S16,
            rate: snd::PCM_RATE_48000,
            period_bytes,
            buffer_bytes: 4 * period_bytes,
        }
    }

    /// Bytes per frame.
    pub fn frame_bytes(&self) -> u32 {
        snd::format_bytes(self.format).unwrap_or(0) * u32::from(self.channels)
    }

    /// Bytes per second at the real-time rate.
    pub fn bytes_per_second(&self) -> u64 {
        u64::from(self.frame_bytes()) * u64::from(snd::rate_hz(self.rate).unwrap_or(0))
    }

    /// How long `bytes` take to play at the real-time rate.
    pub fn duration_of(&self, bytes: u64) -> Duration {
        let bps = self.bytes_per_second().max(1);
        Duration::from_nanos(
            u64::try_from(u128::from(bytes) * 1_000_000_000 / u128::from(bps)).unwrap_or(u64::MAX),
        )
    }

    /// Duration of one period.
    pub fn period(&self) -> Duration {
        self.duration_of(u64::from(self.period_bytes))
    }

    /// The SET_PARAMS request for `stream_id`.
    pub fn set_params_request(&self, stream_id: u32) -> Vec<u8> {
        snd::pcm_set_params(
            stream_id,
            self.buffer_bytes,
            self.period_bytes,
            0,
            self.channels,
            self.format,
            self.rate,
        )
    }
}

// ---------------------------------------------------------------------------
// The broker
// ---------------------------------------------------------------------------

/// How to start the broker.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// `--initial-streams`.
    pub initial_streams: String,
    /// Contents of `capture.raw` (must not be empty).
    pub capture: Vec<u8>,
    /// `RUST_LOG` of the broker and its devices.
    pub rust_log: String,
    /// Create a control socket (`--control-socket <dir>/control.sock`) for
    /// [`Broker::control`].
    pub control_socket: bool,
    /// More arguments, appended verbatim.
    pub extra_args: Vec<String>,
    /// Another host backend instead of `--backend file` (see [`Backend`]).
    pub backend: Option<Backend>,
}

/// A host backend for [`BrokerOptions::backend`] (e.g. ALSA through file
/// PCMs, see [`crate::alsa`]), replacing the fixture's `--backend file
/// --playback-file <dir>/played.raw --capture-file <dir>/capture.raw`.
/// `{dir}` in any argument, file contents or environment value stands for
/// the broker's private directory, so a backend that writes `played.raw`
/// and reads `capture.raw` there works with [`Broker::played`] and
/// [`Broker::capture_bytes`] unchanged.
#[derive(Debug, Clone, Default)]
pub struct Backend {
    /// The backend's arguments (`--backend …` and its options).
    pub args: Vec<String>,
    /// Files written into the directory before the broker starts: (file
    /// name, contents).
    pub files: Vec<(String, String)>,
    /// When set, the broker runs in exactly this environment (plus
    /// `RUST_LOG`), not the test's: the host's configuration in the test's
    /// environment cannot leak in.
    pub env: Option<Vec<(String, String)>>,
}

impl Backend {
    /// Write the files into `dir` and give `cmd` the arguments and the
    /// environment. Call it before setting `RUST_LOG` (it may clear the
    /// environment).
    ///
    /// # Panics
    /// When a file cannot be written.
    pub fn apply(&self, dir: &Path, cmd: &mut Command) {
        let d = dir.to_string_lossy();
        let sub = |s: &str| s.replace("{dir}", &d);
        for (name, contents) in &self.files {
            let path = dir.join(name);
            fs::write(&path, sub(contents))
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        }
        if let Some(env) = &self.env {
            cmd.env_clear();
            for (k, v) in env {
                cmd.env(k, sub(v));
            }
        }
        cmd.args(self.args.iter().map(|a| sub(a)));
    }
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self {
            initial_streams: "output,input".into(),
            // Not a multiple of any test period, so captures loop mid-period.
            capture: pcm_pattern(0xC0FFEE, 8_888),
            rust_log: "debug".into(),
            control_socket: false,
            extra_args: Vec::new(),
            backend: None,
        }
    }
}

/// A running `vsnd-broker --backend file` (or [`BrokerOptions::backend`]) in
/// its own temporary directory.
/// Dropping it sends SIGTERM (SIGKILL after [`STOP_GRACE`]), reaps it, and —
/// when the test is panicking — prints the tail of its log.
pub struct Broker {
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
    playback: PathBuf,
    capture_path: PathBuf,
    capture: Vec<u8>,
    // Last: removed after the broker is gone.
    dir: TempDir,
}

impl Broker {
    /// Start a broker with the default options.
    pub fn start(tag: &str) -> Self {
        Self::start_with(tag, BrokerOptions::default())
    }

    /// Start a broker and wait until its socket exists.
    ///
    /// # Panics
    /// When the broker cannot be started or does not create its socket.
    pub fn start_with(tag: &str, opts: BrokerOptions) -> Self {
        assert!(
            !opts.capture.is_empty(),
            "BrokerOptions::capture must not be empty"
        );
        let dir = TempDir::new(tag);
        let socket = dir.path().join("vsnd.sock");
        let log = dir.path().join("broker.log");
        let playback = dir.path().join("played.raw");
        let capture_path = dir.path().join("capture.raw");
        fs::write(&capture_path, &opts.capture)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", capture_path.display()));
        let log_file =
            File::create(&log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let mut cmd = Command::new(bin_path("vsnd-broker"));
        cmd.arg("--socket").arg(&socket);
        match &opts.backend {
            Some(b) => b.apply(dir.path(), &mut cmd),
            None => {
                cmd.args(["--backend", "file"])
                    .arg("--playback-file")
                    .arg(&playback)
                    .arg("--capture-file")
                    .arg(&capture_path);
            }
        }
        let child = cmd
            .arg("--initial-streams")
            .arg(&opts.initial_streams)
            .args(if opts.control_socket {
                vec![
                    "--control-socket".into(),
                    dir.path().join("control.sock").into_os_string(),
                ]
            } else {
                Vec::new()
            })
            .args(&opts.extra_args)
            .env("RUST_LOG", &opts.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log_file))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start vsnd-broker: {e}"));
        let mut b = Self {
            child: Some(child),
            socket,
            log,
            playback,
            capture_path,
            capture: opts.capture,
            dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while !b.socket.exists() {
            if let Some(status) = b.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "vsnd-broker exited at start ({status}); log:\n{}",
                    b.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "vsnd-broker did not create {} within {START_TIMEOUT:?}; log:\n{}",
                b.socket.display(),
                b.log_tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        b
    }

    /// The vhost-user socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The broker's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the broker process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Connect a test frontend.
    ///
    /// # Panics
    /// When the connection or the negotiation fails.
    ///
    /// The vhost-user handshake has no timeout of its own (a listening
    /// socket accepts the connection even when no device serves it), so it
    /// runs in a helper thread and the test fails after [`CONNECT_TIMEOUT`]
    /// instead of hanging.
    pub fn connect(&self, opts: FrontendOptions) -> Frontend {
        let (tx, rx) = std::sync::mpsc::channel();
        let socket = self.socket.clone();
        std::thread::spawn(move || {
            let _ = tx.send(Frontend::connect(&socket, opts));
        });
        match rx.recv_timeout(CONNECT_TIMEOUT) {
            Ok(Ok(fe)) => fe,
            Ok(Err(e)) => panic!(
                "connecting the test frontend to {}: {e}",
                self.socket.display()
            ),
            Err(_) => panic!(
                "connecting the test frontend to {}: no device completed the vhost-user \
                 handshake within {CONNECT_TIMEOUT:?}",
                self.socket.display()
            ),
        }
    }

    /// The control socket (with [`BrokerOptions::control_socket`]).
    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// Send one request line to the control socket and return the answer
    /// line (without its newline).
    ///
    /// # Panics
    /// When the socket cannot be used or does not answer within
    /// [`CONTROL_SOCKET_TIMEOUT`].
    pub fn control(&self, request: &str) -> String {
        use std::io::{BufRead, BufReader, Write};
        let path = self.control_socket();
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap_or_else(|e| {
            panic!(
                "cannot connect to the control socket {}: {e} (BrokerOptions::control_socket \
                 must be set)",
                path.display()
            )
        });
        s.set_read_timeout(Some(CONTROL_SOCKET_TIMEOUT)).ok();
        s.set_write_timeout(Some(CONTROL_SOCKET_TIMEOUT)).ok();
        s.write_all(format!("{request}\n").as_bytes())
            .unwrap_or_else(|e| panic!("control socket: sending {request:?}: {e}"));
        let mut line = String::new();
        BufReader::new(s)
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("control socket: no answer to {request:?}: {e}"));
        line.trim_end().to_owned()
    }

    /// The whole log (broker and devices) so far.
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last [`LOG_TAIL_LINES`] lines of the log.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let skip = lines.len().saturating_sub(LOG_TAIL_LINES);
        let mut out = String::new();
        if skip > 0 {
            out.push_str(&format!(
                "[… {skip} earlier lines in {} …]\n",
                self.log.display()
            ));
        }
        for l in &lines[skip..] {
            out.push_str(l);
            out.push('\n');
        }
        out
    }

    /// `played.raw` as it is now.
    pub fn played(&self) -> Vec<u8> {
        fs::read(&self.playback).unwrap_or_default()
    }

    /// Wait until `played.raw` holds at least `len` bytes (or `timeout`
    /// passed) and return its contents.
    pub fn wait_played(&self, len: usize, timeout: Duration) -> Vec<u8> {
        let deadline = Instant::now() + timeout;
        loop {
            let p = self.played();
            if p.len() >= len || Instant::now() >= deadline {
                return p;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The bytes of `capture.raw`.
    pub fn capture_bytes(&self) -> &[u8] {
        &self.capture
    }

    /// Path of `capture.raw`.
    pub fn capture_path(&self) -> &Path {
        &self.capture_path
    }

    /// Path of `played.raw`.
    pub fn playback_path(&self) -> &Path {
        &self.playback
    }

    /// Every pid of a device this broker started, in order ("device started
    /// (pid N)" lines of the log).
    pub fn device_pids(&self) -> Vec<u32> {
        self.log()
            .lines()
            .filter_map(|l| {
                let rest = l.split("device started (pid ").nth(1)?;
                rest.split(')').next()?.trim().parse().ok()
            })
            .collect()
    }

    /// The pid of the device started last, waiting up to `timeout` for one.
    ///
    /// # Panics
    /// When no device was started in time.
    pub fn device_pid(&self, timeout: Duration) -> u32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(&pid) = self.device_pids().last() {
                return pid;
            }
            assert!(
                Instant::now() < deadline,
                "the broker logged no \"device started (pid N)\" within {timeout:?}; log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Log lines that show a device crashed, was killed, or broke the
    /// protocol (a supervised restart is logged as "device stopped (…)").
    pub fn crash_lines(&self) -> Vec<String> {
        const MARKERS: [&str; 5] = [
            "device stopped",
            "panicked",
            "protocol violation",
            "killing the device",
            "the device stops",
        ];
        self.log()
            .lines()
            .filter(|l| MARKERS.iter().any(|m| l.contains(m)))
            .map(str::to_owned)
            .collect()
    }

    /// Panic if the log shows any device crash (see [`Broker::crash_lines`]).
    pub fn assert_no_device_crash(&self, context: &str) {
        let lines = self.crash_lines();
        assert!(
            lines.is_empty(),
            "{context}: expected no device crash, but the broker log has:\n{}",
            lines.join("\n")
        );
    }

    /// Panic unless device `pid` is still the broker's current device and
    /// alive, and no crash was logged.
    pub fn assert_device_alive(&self, pid: u32, context: &str) {
        self.assert_no_device_crash(context);
        let pids = self.device_pids();
        assert_eq!(
            pids.last(),
            Some(&pid),
            "{context}: expected device pid {pid} to still be the current device, \
             but the broker started devices {pids:?}"
        );
        assert!(
            process_alive(pid),
            "{context}: expected device pid {pid} to be alive, but it is gone or a zombie"
        );
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if !crate::process::terminate(&mut child, STOP_GRACE) {
                eprintln!("vsnd-broker did not stop within {STOP_GRACE:?} of SIGTERM; killed it");
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "--- vsnd-broker log ({}) ---\n{}--- end of log ---",
                self.log.display(),
                self.log_tail()
            );
        }
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S …": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------
// Control requests
// ---------------------------------------------------------------------------

/// Send a control request with a `response_len`-byte response buffer;
/// return the status the device wrote.
///
/// # Panics
/// When the request is not answered, or the answer has no status.
pub fn control_status(fe: &mut Frontend, req: &[u8], response_len: u32, what: &str) -> u32 {
    let resp = fe
        .control(req, response_len)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    snd::status(&resp)
        .unwrap_or_else(|e| panic!("{what}: expected a status, got {resp:02x?} ({e})"))
}

/// Send a control request and check its status; a status-only answer must
/// have `used.len` 4.
///
/// # Panics
/// On any other status or length.
pub fn expect_status(fe: &mut Frontend, req: &[u8], want: u32, what: &str) {
    let resp = fe
        .control(req, 64)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let got = snd::status(&resp)
        .unwrap_or_else(|e| panic!("{what}: expected a status, got {resp:02x?} ({e})"));
    assert_eq!(
        got,
        want,
        "{what}: expected {} ({want:#x}), device answered {} ({got:#x})",
        snd::status_name(want),
        snd::status_name(got)
    );
    assert_eq!(
        resp.len(),
        snd::HDR_SIZE,
        "{what}: expected a status-only answer (used.len 4), got used.len {}",
        resp.len()
    );
}

/// A PCM command (`R_PCM_PREPARE`…) on `stream_id`; returns the status.
pub fn pcm_command(fe: &mut Frontend, code: u32, stream_id: u32) -> u32 {
    control_status(
        fe,
        &snd::pcm_hdr(code, stream_id),
        snd::HDR_SIZE as u32,
        &format!("{} of stream {stream_id}", snd::code_name(code)),
    )
}

/// SET_PARAMS `cfg` on `stream_id`, expecting S_OK.
pub fn set_params(fe: &mut Frontend, stream_id: u32, cfg: &PcmConfig) {
    expect_status(
        fe,
        &cfg.set_params_request(stream_id),
        snd::S_OK,
        &format!("SET_PARAMS {cfg:?} on stream {stream_id}"),
    );
}

fn expect_ok(fe: &mut Frontend, code: u32, stream_id: u32) {
    expect_status(
        fe,
        &snd::pcm_hdr(code, stream_id),
        snd::S_OK,
        &format!("{} of stream {stream_id}", snd::code_name(code)),
    );
}

/// PREPARE `stream_id`, expecting S_OK.
pub fn prepare(fe: &mut Frontend, stream_id: u32) {
    expect_ok(fe, snd::R_PCM_PREPARE, stream_id);
}

/// START `stream_id`, expecting S_OK.
pub fn start(fe: &mut Frontend, stream_id: u32) {
    expect_ok(fe, snd::R_PCM_START, stream_id);
}

/// STOP `stream_id`, expecting S_OK.
pub fn stop(fe: &mut Frontend, stream_id: u32) {
    expect_ok(fe, snd::R_PCM_STOP, stream_id);
}

/// RELEASE `stream_id`, expecting S_OK.
pub fn release(fe: &mut Frontend, stream_id: u32) {
    expect_ok(fe, snd::R_PCM_RELEASE, stream_id);
}

/// SET_PARAMS + PREPARE: the stream accepts transfers afterwards.
pub fn setup_stream(fe: &mut Frontend, stream_id: u32, cfg: &PcmConfig) {
    set_params(fe, stream_id, cfg);
    prepare(fe, stream_id);
}

/// Query all `count` items of an info request (`R_PCM_INFO`…) with item
/// size `size`; returns the items.
///
/// # Panics
/// Unless the answer is S_OK with exactly `count` items.
pub fn query_all(fe: &mut Frontend, code: u32, count: u32, size: usize) -> Vec<Vec<u8>> {
    let what = snd::code_name(code);
    let resp = fe
        .control(
            &snd::query_info(code, 0, count, size as u32),
            (snd::HDR_SIZE + count as usize * size) as u32,
        )
        .unwrap_or_else(|e| panic!("{what} of {count} items: {e}"));
    let (st, items) = snd::split_info(&resp, size).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        st,
        snd::S_OK,
        "{what}: expected S_OK, got {} ({st:#x})",
        snd::status_name(st)
    );
    assert_eq!(
        items.len(),
        count as usize,
        "{what}: expected {count} items, got {}",
        items.len()
    );
    items.into_iter().map(<[u8]>::to_vec).collect()
}

// ---------------------------------------------------------------------------
// Transfers
// ---------------------------------------------------------------------------

/// Add (and publish, not kick) a TX buffer: xfer header for `stream_id`, the
/// payload, an 8-byte status.
///
/// # Panics
/// When the queue or guest memory is full.
pub fn add_tx(fe: &mut Frontend, stream_id: u32, payload: &[u8]) -> u16 {
    let xfer = snd::pcm_xfer(stream_id);
    let readable: Vec<&[u8]> = if payload.is_empty() {
        vec![&xfer]
    } else {
        vec![&xfer, payload]
    };
    fe.add_chain(snd::QUEUE_TX, &readable, &[snd::PCM_STATUS_SIZE as u32])
        .unwrap_or_else(|e| panic!("adding a TX buffer: {e}"))
}

/// Add (and publish, not kick) an RX buffer: xfer header for `stream_id`,
/// `data_len` writable bytes for the samples and 8 for the status.
///
/// # Panics
/// When the queue or guest memory is full.
pub fn add_rx(fe: &mut Frontend, stream_id: u32, data_len: u32) -> u16 {
    let xfer = snd::pcm_xfer(stream_id);
    fe.add_chain(
        snd::QUEUE_RX,
        &[&xfer],
        &[data_len, snd::PCM_STATUS_SIZE as u32],
    )
    .unwrap_or_else(|e| panic!("adding an RX buffer: {e}"))
}

/// An RX buffer whose status location is known (see [`add_rx_tracked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxBuffer {
    /// Head descriptor.
    pub head: u16,
    /// Guest address of the data area.
    pub data_gpa: u64,
    /// Guest address of the 8-byte status, right after the data area.
    pub status_gpa: u64,
}

impl RxBuffer {
    /// The status as the guest reads it: at its fixed place after the data
    /// area, whatever `used.len` says (what the Linux driver does).
    pub fn status(&self, fe: &Frontend) -> PcmStatus {
        let b = fe
            .read_mem(self.status_gpa, snd::PCM_STATUS_SIZE)
            .unwrap_or_else(|e| panic!("reading an RX status: {e}"));
        PcmStatus::parse(&b).unwrap_or_else(|e| panic!("RX status: {e}"))
    }
}

/// Like [`add_rx`], with the addresses of the data and status areas known
/// (both filled with [`crate::frontend::POISON`]); published, not kicked.
///
/// # Panics
/// When the queue or guest memory is full.
pub fn add_rx_tracked(fe: &mut Frontend, stream_id: u32, data_len: u32) -> RxBuffer {
    use crate::frontend::{RawDesc, POISON};
    let hdr = fe
        .alloc_bytes(&snd::pcm_xfer(stream_id))
        .unwrap_or_else(|e| panic!("allocating an RX header: {e}"));
    let data_gpa = fe
        .alloc_bytes(&vec![POISON; data_len as usize])
        .unwrap_or_else(|e| panic!("allocating an RX buffer: {e}"));
    let status_gpa = fe
        .alloc_bytes(&[POISON; snd::PCM_STATUS_SIZE])
        .unwrap_or_else(|e| panic!("allocating an RX status: {e}"));
    let head = fe
        .add_raw_chain(
            snd::QUEUE_RX,
            &[
                RawDesc::readable(hdr, snd::PCM_XFER_SIZE as u32).then(1),
                RawDesc::writable(data_gpa, data_len).then(2),
                RawDesc::writable(status_gpa, snd::PCM_STATUS_SIZE as u32),
            ],
        )
        .unwrap_or_else(|e| panic!("adding an RX buffer: {e}"));
    fe.publish(snd::QUEUE_RX, head)
        .unwrap_or_else(|e| panic!("publishing an RX buffer: {e}"));
    RxBuffer {
        head,
        data_gpa,
        status_gpa,
    }
}

/// Wait for the next used buffer of queue `q`.
///
/// # Panics
/// On a frontend error or when nothing comes back within `timeout`.
pub fn wait_used(fe: &mut Frontend, q: usize, timeout: Duration, what: &str) -> Used {
    match fe.wait_used(q, timeout) {
        Ok(Some(u)) => u,
        Ok(None) => {
            panic!("{what}: expected a used buffer on queue {q} within {timeout:?}, got none")
        }
        Err(e) => panic!("{what}: {e}"),
    }
}

/// Assert nothing comes back on queue `q` for `window`.
///
/// # Panics
/// When something does.
pub fn expect_nothing_used(fe: &mut Frontend, q: usize, window: Duration, what: &str) {
    match fe.wait_used(q, window) {
        Ok(None) => {}
        Ok(Some(u)) => panic!(
            "{what}: expected no used buffer on queue {q} for {window:?}, got head {} with len {}",
            u.id, u.len
        ),
        Err(e) => panic!("{what}: {e}"),
    }
}

/// The status of a TX buffer that came back: `used.len` must be 8.
///
/// # Panics
/// Otherwise.
pub fn tx_status(u: &Used, what: &str) -> PcmStatus {
    assert_eq!(
        u.len as usize,
        snd::PCM_STATUS_SIZE,
        "{what}: expected TX used.len {} (the status), got {}",
        snd::PCM_STATUS_SIZE,
        u.len
    );
    PcmStatus::parse(&u.writable_bytes).unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// A quick health check of the device serving `fe`: a PCM_INFO query is
/// answered S_OK, and device `pid` is alive and was not restarted.
///
/// # Panics
/// Otherwise.
pub fn assert_responsive(fe: &mut Frontend, broker: &Broker, pid: u32, context: &str) {
    let resp = fe
        .control(
            &snd::query_info(snd::R_PCM_INFO, 0, 1, snd::PCM_INFO_SIZE as u32),
            36,
        )
        .unwrap_or_else(|e| panic!("{context}: the follow-up PCM_INFO was not answered: {e}"));
    let st = snd::status(&resp).unwrap_or_else(|e| panic!("{context}: follow-up PCM_INFO: {e}"));
    assert_eq!(
        (st, resp.len()),
        (snd::S_OK, snd::HDR_SIZE + snd::PCM_INFO_SIZE),
        "{context}: expected the follow-up PCM_INFO to be answered S_OK with 36 bytes, \
         got {} ({st:#x}) with {} bytes",
        snd::status_name(st),
        resp.len()
    );
    broker.assert_device_alive(pid, context);
}
