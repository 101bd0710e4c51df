//! A real Linux guest under QEMU plays and records through vsnd.
//!
//! Each test boots QEMU (`-accel tcg`: no KVM needed) with a
//! `vhost-user-snd-pci` device connected to a real `vsnd-broker` using its
//! `file` backend, and a 6.12 kernel + busybox initramfs (built by
//! `tests/guest/build-initramfs.sh` into `target/guest/` from packages that
//! `scripts/setup` installs). The guest's `/init` (`tests/guest/init`) runs
//! `aplay`/`arecord` on `hw:0,0` and exchanges the PCM bytes with the host
//! through two raw virtio-blk disks; the test then checks them byte for byte:
//!
//! * `play`: what the guest played == what the broker wrote to `played.raw`;
//! * `record`: what the guest recorded == the start of `capture.raw`;
//! * `duplex`: both at once;
//! * `reconnect`: one broker, two guests one after the other on the same
//!   socket (the second served by the fresh device the broker started);
//! * `gate`: the broker starts with its defaults (input OFF), a control
//!   socket and an audit log, and a loud `capture.raw`. The guest records
//!   3 s; about a second into it the test runs `vsnd-ctl set input on`. The
//!   recording must be exact zeros, then exactly `capture.raw` from its
//!   first byte, switching at a period boundary within one period of the
//!   SET; the guest's ALSA must show the mic jack unplugged before and
//!   plugged after; the audit log must name `vsnd-ctl`;
//! * `gate_off_is_silence`: the same broker, no SET: every recorded byte is
//!   0, the host capture file is never opened, the jack stays unplugged;
//! * `alsa_duplex`: `duplex` with the broker's ALSA backend, through
//!   `type file` PCMs over `null` on the same two files
//!   (`vsnd_tests::alsa`).
//!
//! Every test also checks that the broker's device was never killed by
//! seccomp; when it was, the failure message starts with the reporter's line,
//! which names the system call missing from `policy/seccomp`.
//!
//! A missing prerequisite (QEMU, the guest kernel, busybox, alsa-utils) makes
//! the tests FAIL with a pointer to `scripts/setup`; they never skip.
//!
//! Environment knobs (for debugging only):
//! * `VSND_REAL_GUEST_BROKER_CMD`: replace the broker command line; words are
//!   split on whitespace, `{socket}` and `{dir}` are substituted. E.g.
//!   `/path/vhost-device-sound --socket {socket} --backend null` to run the
//!   fixture against upstream. The gate tests ignore it (they need
//!   vsnd-broker's control socket and audit log), and so does `alsa_duplex`.
//! * `VSND_REAL_GUEST_KEEP=1`: keep the temporary directory even on success.

use std::fs::{self, File};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vsnd_tests::alsa::AlsaPcms;
use vsnd_tests::bin_path;
use vsnd_tests::pipewire::{self, PcmFormat, PipeWire};

// ---------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------

const SETUP_HINT: &str = "run `scripts/setup` (as root) to install QEMU, the guest kernel, \
                          busybox-static and alsa-utils";
const QEMU: &str = "qemu-system-x86_64";
/// Hard limit for one guest run, boot to power-off.
const QEMU_TIMEOUT: Duration = Duration::from_secs(120);
/// Guest-side limit for one aplay/arecord (the guest's /init kills them after it).
const GUEST_TOOL_TIMEOUT_S: u32 = 60;

const RATE: u32 = 48_000;
const CHANNELS: u32 = 2;
const FORMAT: &str = "S16_LE";
const BYTES_PER_FRAME: usize = 2 * CHANNELS as usize;
/// PCM bytes played and/or recorded by each test: 2 s.
const PCM_BYTES: usize = 2 * RATE as usize * BYTES_PER_FRAME;
/// `capture.raw` is longer than what any test records, so that the
/// broker's looping of the capture file never comes into play.
const CAPTURE_FILE_BYTES: usize = 2 * PCM_BYTES;
/// What the guest records in `real_guest_gate`: 3 s.
const GATE_PCM_BYTES: usize = 3 * RATE as usize * BYTES_PER_FRAME;
/// What the guest records in `real_guest_gate_off_is_silence`: 1.5 s.
const GATE_OFF_PCM_BYTES: usize = 3 * RATE as usize * BYTES_PER_FRAME / 2;
/// How long `real_guest_gate` leaves input off after the guest said
/// `VSND-RECORDING` (arecord runs since ~0.3 s by then).
const GATE_OFF_FOR: Duration = Duration::from_secs(1);
/// How often the QEMU wait loop polls (and calls its hook).
const POLL: Duration = Duration::from_millis(50);

/// How the broker is configured.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum BrokerKind {
    /// `--initial-streams output,input`: the play and record tests.
    Open,
    /// The default `--initial-streams` (output only: input OFF), plus
    /// `--control-socket DIR/ctl.sock --audit-log DIR/audit.log`.
    Gate,
    /// `--backend alsa` through file PCMs on `DIR/played.raw` and
    /// `DIR/capture.raw` (`vsnd_tests::alsa`, in a clean environment),
    /// `--initial-streams output,input`.
    Alsa,
    /// `--backend pipewire --name guest1` against the private daemon whose
    /// environment is in [`PIPEWIRE_ENV`] (and nothing else of the test's
    /// but PATH), `--initial-streams output,input`.
    PipeWire,
}

/// The client environment of the PipeWire daemon a [`BrokerKind::PipeWire`]
/// broker connects to; set by the test that starts it, under `GUEST_LOCK`.
static PIPEWIRE_ENV: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

/// The broker command line used by every test. Adjust it here.
fn broker_command(dir: &Path, socket: &Path, kind: BrokerKind) -> Command {
    let override_cmd = std::env::var("VSND_REAL_GUEST_BROKER_CMD").ok();
    if let (Some(tmpl), BrokerKind::Open) = (override_cmd, kind) {
        let words: Vec<String> = tmpl
            .split_whitespace()
            .map(|w| {
                w.replace("{socket}", &socket.to_string_lossy())
                    .replace("{dir}", &dir.to_string_lossy())
            })
            .collect();
        let mut cmd = Command::new(&words[0]);
        cmd.args(&words[1..]);
        cmd.env("RUST_LOG", "debug");
        return cmd;
    }
    let mut cmd = Command::new(bin_path("vsnd-broker"));
    cmd.arg("--socket").arg(socket);
    if kind == BrokerKind::Alsa {
        // Writes DIR/asound.conf; clears the environment.
        AlsaPcms::default().backend().apply(dir, &mut cmd);
    } else if kind == BrokerKind::PipeWire {
        cmd.env_clear()
            .envs(
                PIPEWIRE_ENV
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone(),
            )
            .envs(std::env::var_os("PATH").map(|p| ("PATH", p)))
            .args(["--backend", "pipewire", "--name", "guest1"]);
    } else {
        cmd.args(["--backend", "file"])
            .arg("--playback-file")
            .arg(dir.join("played.raw"))
            .arg("--capture-file")
            .arg(dir.join("capture.raw"));
    }
    cmd.env("RUST_LOG", "debug");
    match kind {
        BrokerKind::Open | BrokerKind::Alsa | BrokerKind::PipeWire => {
            cmd.args(["--initial-streams", "output,input"]);
        }
        BrokerKind::Gate => {
            cmd.arg("--control-socket")
                .arg(dir.join("ctl.sock"))
                .arg("--audit-log")
                .arg(dir.join("audit.log"));
        }
    }
    cmd
}

/// The target directory (`target/`), from this test executable's path
/// (`target/<profile>/deps/real_guest-<hash>`).
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent() // deps
        .and_then(Path::parent) // <profile>
        .and_then(Path::parent) // target
        .expect("test executable is not in target/<profile>/deps")
        .to_path_buf()
}

// ---------------------------------------------------------------------------
// Fixture: kernel + initramfs
// ---------------------------------------------------------------------------

struct Fixture {
    kernel: PathBuf,
    initrd: PathBuf,
}

/// Builds `target/guest/` once per test process (the script itself is a
/// no-op when its inputs did not change) and checks QEMU.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Result<Fixture, String>> = OnceLock::new();
    let r = FIXTURE.get_or_init(|| {
        let out = Command::new(QEMU)
            .args(["-device", "help"])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {QEMU}: {e}; {SETUP_HINT}"))?;
        let devices = String::from_utf8_lossy(&out.stdout);
        if !devices.contains("\"vhost-user-snd-pci\"") {
            return Err(format!(
                "{QEMU} has no vhost-user-snd-pci device (QEMU >= 8.2 needed); {SETUP_HINT}"
            ));
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("guest/build-initramfs.sh");
        let outdir = target_dir().join("guest");
        let out = Command::new("bash")
            .arg(&script)
            .arg(&outdir)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "{} failed ({}):\n{}{}\n{SETUP_HINT}",
                script.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        Ok(Fixture {
            kernel: outdir.join("vmlinuz"),
            initrd: outdir.join("initramfs.cpio.gz"),
        })
    });
    match r {
        Ok(f) => f,
        Err(e) => panic!("real-guest prerequisites missing: {e}"),
    }
}

// ---------------------------------------------------------------------------
// PCM patterns
// ---------------------------------------------------------------------------

/// Deterministic, loud S16_LE stereo: left = a tone (peak 8000, about
/// -12 dBFS), right = a frame counter mixed with a seed, so that a lost,
/// repeated or misaligned byte anywhere shows up as a mismatch (and the
/// counter tells where). No sample is ever 0, so that silence (exact zeros)
/// is never mistaken for data, nor data for silence.
fn pcm_pattern(bytes: usize, freq_hz: f64, seed: u16) -> Vec<u8> {
    assert_eq!(bytes % BYTES_PER_FRAME, 0);
    let frames = bytes / BYTES_PER_FRAME;
    let mut v = Vec::with_capacity(bytes);
    for i in 0..frames {
        let t = i as f64 / f64::from(RATE);
        let tone = (8000.0 * (2.0 * std::f64::consts::PI * freq_hz * t).sin()) as i16;
        let tone = if tone == 0 { 1 } else { tone };
        let counter = ((i as u16) ^ seed) | 1;
        v.extend_from_slice(&tone.to_le_bytes());
        v.extend_from_slice(&counter.to_le_bytes());
    }
    v
}

/// Panics with a precise description if `got != want`.
fn assert_same_bytes(what: &str, got: &[u8], want: &[u8], diag: &dyn Fn() -> String) {
    if got == want {
        return;
    }
    let first = got.iter().zip(want).position(|(a, b)| a != b);
    let at = first.unwrap_or(got.len().min(want.len()));
    let show = |b: &[u8]| -> String {
        let s = at.saturating_sub(8) & !(BYTES_PER_FRAME - 1);
        let e = (at + 16).min(b.len());
        if s >= e {
            return "(nothing)".into();
        }
        format!("[{s}..{e}) {:02x?}", &b[s..e])
    };
    // Where does what we got start in what we wanted (shifted / delayed data)?
    let mut hint = String::new();
    if got.len() >= 64 && want.len() >= 64 {
        if let Some(off) = want.windows(64).position(|w| w == &got[..64]) {
            hint = format!("\n  note: the first 64 bytes received are found at offset {off} of the expected data");
        } else if let Some(off) = got.windows(64).position(|w| w == &want[..64]) {
            hint =
                format!("\n  note: the expected data starts at offset {off} of what was received");
        }
    }
    panic!(
        "{what}: bytes differ: got {} bytes, expected {} bytes, first mismatch at byte {at} (frame {})\n  \
         got:      {}\n  expected: {}{hint}\n{}",
        got.len(),
        want.len(),
        at / BYTES_PER_FRAME,
        show(got),
        show(want),
        diag()
    );
}

// ---------------------------------------------------------------------------
// One guest run
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Play,
    Record,
    Duplex,
    /// Record, printing the jacks before and after and `VSND-RECORDING`
    /// once arecord runs.
    Gate,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Play => "play",
            Mode::Record => "record",
            Mode::Duplex => "duplex",
            Mode::Gate => "gate",
        }
    }
}

/// Kills (SIGKILL) and reaps a child when dropped, e.g. on panic.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child already taken")
    }
    /// SIGTERM, then SIGKILL after `grace`.
    fn terminate(&mut self, grace: Duration) {
        let Some(mut c) = self.0.take() else { return };
        if matches!(c.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(c.try_wait(), Ok(Some(_))) {
                return;
            }
            sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A temporary directory, removed on success (kept, and named, on failure).
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!(
            "vsnd-real-guest-{tag}-{}-{nanos:08x}",
            std::process::id()
        ));
        fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("VSND_REAL_GUEST_KEEP").is_some() {
            eprintln!("real_guest: kept {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

fn read_lossy(p: &Path) -> String {
    fs::read(p)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", p.display()))
}

fn tail(s: &str, max_lines: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    let from = lines.len().saturating_sub(max_lines);
    let mut out = String::new();
    if from > 0 {
        out.push_str(&format!("  ... ({from} lines omitted)\n"));
    }
    for l in &lines[from..] {
        out.push_str("  ");
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Values of a console marker such as `VSND-APLAY-RC=` (the marker may be
/// preceded on its line by firmware escape sequences).
fn marker_values<'a>(console: &'a str, marker: &str) -> Vec<&'a str> {
    console
        .lines()
        .filter_map(|l| {
            l.find(marker)
                .map(|i| l[i + marker.len()..].trim_end_matches('\r'))
        })
        .collect()
}

fn marker_value<'a>(console: &'a str, marker: &str) -> Option<&'a str> {
    marker_values(console, marker)
        .first()
        .map(|v| v.split_whitespace().next().unwrap_or(""))
}

fn write_disk(path: &Path, data: &[u8], size: usize) {
    let mut f = File::create(path).expect("create disk image");
    f.write_all(data).expect("write disk image");
    // Raw images are a whole number of 512-byte sectors.
    let size = size.max(data.len()).div_ceil(512) * 512;
    f.set_len(size as u64).expect("size disk image");
}

/// What the broker's device prints when seccomp kills it (device/src/sandbox.rs).
const SECCOMP_BLOCKED: &str = "seccomp: blocked system call";

/// What the broker's log says about devices killed by seccomp: the
/// reporter's distinct lines (each names the system call missing from the
/// profile), or, if a device died of SIGSYS without one, the broker's lines.
fn seccomp_kills(broker_log: &str) -> Vec<String> {
    let mut named: Vec<String> = Vec::new();
    for l in broker_log.lines().filter(|l| l.contains(SECCOMP_BLOCKED)) {
        // Drop the relay's `vsnd-device[PID]: ` so that repeats collapse.
        let text = l.find("]: ").map_or(l, |i| &l[i + 3..]).to_owned();
        if !named.contains(&text) {
            named.push(text);
        }
    }
    if named.is_empty() {
        named = broker_log
            .lines()
            .filter(|l| l.contains("(SIGSYS)"))
            .take(1)
            .map(str::to_owned)
            .collect();
    }
    named
}

/// One guest's results. The directory (shared by the guests of one broker)
/// is removed when the last outcome goes, unless a test is failing.
struct Outcome {
    dir: Arc<TempDir>,
    /// File-name prefix of this guest's files (`""`, `g1-`, …).
    guest: String,
    console: String,
    played: Option<Vec<u8>>,
    /// The first `bytes` (what the guest was asked to record) of the record
    /// disk.
    recorded: Vec<u8>,
}

impl Outcome {
    fn diag(&self) -> String {
        let d = &self.dir.0;
        let g = &self.guest;
        let broker_log = read_lossy(&d.join("broker.stderr"));
        // A device killed by seccomp is the first thing to know: the line
        // names the system call missing from policy/seccomp.
        let kills = seccomp_kills(&broker_log);
        let banner = if kills.is_empty() {
            String::new()
        } else {
            format!(
                "*** vsnd-device was KILLED BY SECCOMP (a system call missing from policy/seccomp):\n*** {}\n",
                kills.join("\n*** ")
            )
        };
        format!(
            "{banner}(commands: {})\n--- guest console ({}) ---\n{}--- broker stderr ({}) ---\n{}--- qemu stderr ---\n{}",
            d.join(format!("{g}commands.txt")).display(),
            d.join(format!("{g}console.log")).display(),
            tail(&self.console, 200),
            d.join("broker.stderr").display(),
            tail(&broker_log, 150),
            tail(&read_lossy(&d.join(format!("{g}qemu.stderr"))), 30),
        ) + &self.gate_diag()
    }

    /// The gate tests' extra files, when there.
    fn gate_diag(&self) -> String {
        let d = &self.dir.0;
        let mut s = String::new();
        for f in ["audit.log", "vsnd-ctl.txt"] {
            if d.join(f).exists() {
                s += &format!("--- {f} ---\n{}", tail(&read_lossy(&d.join(f)), 20));
            }
        }
        s
    }
}

/// Serializes the guests: three TCG guests at once on a small machine would
/// starve each other (and the real-time audio streams).
static GUEST_LOCK: Mutex<()> = Mutex::new(());

/// A broker serving the guests of one test, in the test's directory.
struct GuestBroker {
    dir: Arc<TempDir>,
    socket: PathBuf,
    broker: ChildGuard,
}

impl GuestBroker {
    /// Start the broker (with `capture.raw` = `capture_data`) and wait for
    /// its sockets.
    fn start(tag: &str, capture_data: &[u8], kind: BrokerKind) -> GuestBroker {
        let dir = Arc::new(TempDir::new(tag));
        let d = dir.0.clone();
        let socket = d.join("vsnd.sock");
        fs::write(d.join("capture.raw"), capture_data).expect("write capture.raw");
        let mut bcmd = broker_command(&d, &socket, kind);
        bcmd.stdin(Stdio::null())
            .stdout(File::create(d.join("broker.stdout")).expect("broker.stdout"))
            .stderr(File::create(d.join("broker.stderr")).expect("broker.stderr"));
        let _ = fs::write(d.join("broker-command.txt"), format!("{bcmd:?}\n"));
        let mut broker = ChildGuard(Some(
            bcmd.spawn()
                .unwrap_or_else(|e| panic!("cannot start broker {bcmd:?}: {e}")),
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        let ctl = d.join("ctl.sock");
        while !socket.exists() || (kind == BrokerKind::Gate && !ctl.exists()) {
            if let Ok(Some(st)) = broker.child().try_wait() {
                panic!(
                    "broker exited ({st}) before creating {}\n--- broker stderr ---\n{}",
                    socket.display(),
                    tail(&read_lossy(&d.join("broker.stderr")), 100)
                );
            }
            assert!(
                Instant::now() < deadline,
                "broker did not create {} within 10 s\n--- broker stderr ---\n{}",
                socket.display(),
                tail(&read_lossy(&d.join("broker.stderr")), 100)
            );
            sleep(Duration::from_millis(20));
        }
        GuestBroker {
            dir,
            socket,
            broker,
        }
    }

    fn log(&self) -> String {
        read_lossy(&self.dir.0.join("broker.stderr"))
    }

    fn played(&self) -> Option<Vec<u8>> {
        fs::read(self.dir.0.join("played.raw")).ok()
    }

    /// Wait until `needle` is in at least `count` lines of the broker log.
    fn wait_log(&mut self, needle: &str, count: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            let have = log.lines().filter(|l| l.contains(needle)).count();
            if have >= count {
                return;
            }
            let exited = self.broker.child().try_wait().ok().flatten();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "expected {count} broker log line(s) containing {needle:?} within {timeout:?}, got \
                 {have}{}\n--- broker stderr ---\n{}",
                exited
                    .map(|s| format!(" (the broker exited: {s})"))
                    .unwrap_or_default(),
                tail(&log, 100)
            );
            sleep(Duration::from_millis(50));
        }
    }

    /// Boot one guest against the broker and wait for it to power off.
    /// Its files get the prefix `guest` (`play.img`, `rec.img`,
    /// `console.log`, `qemu.stderr`, …). Panics (with the diagnostics) if
    /// QEMU fails or times out.
    fn boot_guest(&self, guest: &str, mode: Mode, play_data: &[u8]) -> Outcome {
        self.boot_guest_with(guest, mode, play_data, PCM_BYTES, &mut || {})
    }

    /// [`Self::boot_guest`], the guest playing and/or recording `bytes`
    /// PCM bytes, with `hook` called every [`POLL`] while QEMU runs (to act
    /// on what the guest prints; it must not block for long).
    fn boot_guest_with(
        &self,
        guest: &str,
        mode: Mode,
        play_data: &[u8],
        bytes: usize,
        hook: &mut dyn FnMut(),
    ) -> Outcome {
        let fx = fixture();
        let d = self.dir.0.clone();
        let name = |f: &str| d.join(format!("{guest}{f}"));
        write_disk(&name("play.img"), play_data, play_data.len());
        write_disk(&name("rec.img"), &[], bytes + 4096);

        let append = format!(
            "console=ttyS0 panic=-1 quiet vsnd.mode={} vsnd.fmt={FORMAT} vsnd.rate={RATE} \
             vsnd.ch={CHANNELS} vsnd.bytes={bytes} vsnd.timeout={GUEST_TOOL_TIMEOUT_S}",
            mode.name()
        );
        let console_path = name("console.log");
        let mut qcmd = Command::new(QEMU);
        qcmd.args(["-accel", "tcg", "-m", "512", "-smp", "1"])
            .args([
                "-display",
                "none",
                "-monitor",
                "none",
                "-nic",
                "none",
                "-no-reboot",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console_path.display()))
            // vhost-user needs guest memory the backend can map: shared memfd.
            .args([
                "-object",
                "memory-backend-memfd,id=mem,size=512M,share=on",
                "-machine",
                "pc,memory-backend=mem",
            ])
            .arg("-kernel")
            .arg(&fx.kernel)
            .arg("-initrd")
            .arg(&fx.initrd)
            .arg("-append")
            .arg(&append)
            .arg("-chardev")
            .arg(format!("socket,id=snd0,path={}", self.socket.display()))
            .args(["-device", "vhost-user-snd-pci,chardev=snd0"])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=dplay",
                name("play.img").display()
            ))
            .args(["-device", "virtio-blk-pci,drive=dplay,serial=vsnd-play"])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=drec",
                name("rec.img").display()
            ))
            .args(["-device", "virtio-blk-pci,drive=drec,serial=vsnd-rec"])
            .stdin(Stdio::null())
            .stdout(File::create(name("qemu.stdout")).expect("qemu.stdout"))
            .stderr(File::create(name("qemu.stderr")).expect("qemu.stderr"));
        // For reproducing a run by hand.
        let _ = fs::write(
            name("commands.txt"),
            format!(
                "broker: {}qemu: {qcmd:?}\n",
                read_lossy(&d.join("broker-command.txt"))
            ),
        );
        let start = Instant::now();
        let mut qemu =
            ChildGuard(Some(qcmd.spawn().unwrap_or_else(|e| {
                panic!("cannot start {QEMU}: {e}; {SETUP_HINT}")
            })));
        let mut polls = 0u32;
        let mut device_killed = false;
        let status = loop {
            if let Some(st) = qemu.child().try_wait().expect("wait qemu") {
                break Some(st);
            }
            if start.elapsed() > QEMU_TIMEOUT {
                break None;
            }
            // A device killed by seccomp leaves QEMU waiting for its
            // backend until the timeout: stop early and say why.
            polls += 1;
            if polls.is_multiple_of(20) && !seccomp_kills(&self.log()).is_empty() {
                device_killed = true;
                break None;
            }
            hook();
            sleep(POLL);
        };
        let wall = start.elapsed();
        qemu.terminate(Duration::from_secs(2));

        let rec_img = fs::read(name("rec.img")).unwrap_or_default();
        let out = Outcome {
            dir: Arc::clone(&self.dir),
            guest: guest.to_owned(),
            console: read_lossy(&console_path),
            played: None,
            recorded: rec_img[..bytes.min(rec_img.len())].to_vec(),
        };
        let boot = marker_value(&out.console, "VSND-BOOT uptime=").unwrap_or("?");
        let done = marker_value(&out.console, "VSND-DONE uptime=").unwrap_or("?");
        eprintln!(
            "real_guest[{guest}{}]: QEMU wall time {:.1} s (guest uptime: /init at {boot} s, done at {done} s)",
            mode.name(),
            wall.as_secs_f64()
        );
        match status {
            None if device_killed => panic!(
                "vsnd-device was killed by seccomp while the guest ran; QEMU stopped early\n{}",
                out.diag()
            ),
            None => panic!(
                "QEMU did not finish within {} s (killed)\n{}",
                QEMU_TIMEOUT.as_secs(),
                out.diag()
            ),
            Some(st) if !st.success() => panic!("QEMU exited with {st}\n{}", out.diag()),
            Some(_) => {}
        }
        out
    }

    /// Let the broker notice the last disconnect and flush, then stop it.
    fn stop(&mut self) {
        sleep(Duration::from_millis(200));
        self.broker.terminate(Duration::from_secs(5));
    }
}

fn run_guest(mode: Mode, play_data: &[u8], capture_data: &[u8]) -> Outcome {
    fixture();
    let _serial = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let mut gb = GuestBroker::start(mode.name(), capture_data, BrokerKind::Open);
    let mut out = gb.boot_guest("", mode, play_data);
    gb.stop();
    out.played = gb.played();
    out
}

/// The checks every mode shares: the card was probed, /init finished.
fn check_common(out: &Outcome) {
    let broker_log = read_lossy(&out.dir.0.join("broker.stderr"));
    let kills = seccomp_kills(&broker_log);
    assert!(
        kills.is_empty(),
        "vsnd-device was killed by seccomp while serving the guest: {}\n{}",
        kills.join(" / "),
        out.diag()
    );
    let cards = marker_values(&out.console, "VSND-CARD:");
    assert!(
        cards.iter().any(|l| l.trim_start().starts_with("0 [")),
        "the guest saw no sound card in /proc/asound/cards\n{}",
        out.diag()
    );
    assert!(
        !marker_values(&out.console, "VSND-DONE").is_empty(),
        "the guest's /init did not finish (no VSND-DONE)\n{}",
        out.diag()
    );
}

fn check_play(out: &Outcome, play_data: &[u8]) {
    assert_eq!(
        marker_value(&out.console, "VSND-APLAY-RC="),
        Some("0"),
        "aplay failed in the guest\n{}",
        out.diag()
    );
    let Some(played) = &out.played else {
        panic!("the broker wrote no played.raw\n{}", out.diag());
    };
    // ALSA (Linux >= 6.5) pads the last period with silence when aplay
    // drains, and the guest really plays it: allow trailing zeros up to one
    // ring buffer (aplay's default is 500 ms), nothing else.
    let (head, tail) = played.split_at(played.len().min(play_data.len()));
    assert_same_bytes(
        "played.raw vs the data the guest played",
        head,
        play_data,
        &|| out.diag(),
    );
    let max_tail = 48_000 * 4 / 2;
    assert!(
        tail.len() <= max_tail && tail.iter().all(|&b| b == 0),
        "played.raw has {} bytes after the guest's data; expected at most {max_tail} bytes of \
         drain silence (zeros)\n{}",
        tail.len(),
        out.diag()
    );
    println!(
        "real_guest: {} bytes played matched byte-exact (+{} bytes of drain silence)",
        head.len(),
        tail.len()
    );
}

/// arecord exited 0 and produced `bytes` bytes.
fn check_arecord(out: &Outcome, bytes: usize) {
    assert_eq!(
        marker_value(&out.console, "VSND-ARECORD-RC="),
        Some("0"),
        "arecord failed in the guest\n{}",
        out.diag()
    );
    let n = bytes.to_string();
    assert_eq!(
        marker_value(&out.console, "VSND-ARECORD-BYTES="),
        Some(n.as_str()),
        "arecord produced the wrong number of bytes\n{}",
        out.diag()
    );
    assert_eq!(
        out.recorded.len(),
        bytes,
        "the record disk is short\n{}",
        out.diag()
    );
}

fn check_record(out: &Outcome, capture_data: &[u8]) {
    check_arecord(out, PCM_BYTES);
    assert_same_bytes(
        "what the guest recorded vs the start of capture.raw",
        &out.recorded,
        &capture_data[..PCM_BYTES],
        &|| out.diag(),
    );
}

fn play_data() -> Vec<u8> {
    pcm_pattern(PCM_BYTES, 440.0, 0x0000)
}

fn capture_data() -> Vec<u8> {
    pcm_pattern(CAPTURE_FILE_BYTES, 1000.0, 0x5a5a)
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[test]
fn real_guest_play() {
    let play = play_data();
    let out = run_guest(Mode::Play, &play, &capture_data());
    check_common(&out);
    check_play(&out, &play);
}

#[test]
fn real_guest_record() {
    let capture = capture_data();
    let out = run_guest(Mode::Record, &play_data(), &capture);
    check_common(&out);
    check_record(&out, &capture);
}

#[test]
fn real_guest_duplex() {
    let play = play_data();
    let capture = capture_data();
    let out = run_guest(Mode::Duplex, &play, &capture);
    check_common(&out);
    check_play(&out, &play);
    check_record(&out, &capture);
}

/// The duplex guest with the broker's ALSA backend (`--backend alsa`)
/// through `type file` PCMs over `null` (`vsnd_tests::alsa`: a private
/// ALSA configuration, nothing of the host's): what the guest played is
/// `played.raw` (plus drain silence) and what it recorded is the start of
/// `capture.raw`, byte for byte, as with the file backend. Prints the bytes
/// matched each way and the broker's xrun lines.
#[test]
fn real_guest_alsa_duplex() {
    let play = play_data();
    let capture = capture_data();
    fixture();
    let _serial = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let t_test = Instant::now();
    let mut gb = GuestBroker::start("alsa-duplex", &capture, BrokerKind::Alsa);
    let mut out = gb.boot_guest("", Mode::Duplex, &play);
    gb.stop();
    out.played = gb.played();
    let log = gb.log();
    check_common(&out);
    check_play(&out, &play);
    check_record(&out, &capture);
    // The ALSA PCMs served it (not some fallback), each opened once.
    for (needle, what) in [
        ("ALSA playback \"vsnd_out\"", "the playback PCM opened"),
        ("ALSA capture \"vsnd_in\"", "the capture PCM opened"),
        (
            "ALSA capture device \"vsnd_in\" closed",
            "the capture PCM closed",
        ),
    ] {
        let n = log.lines().filter(|l| l.contains(needle)).count();
        assert_eq!(
            n,
            1,
            "expected {what} once (log lines with {needle:?}), got {n}\n{}",
            out.diag()
        );
    }
    // Xruns are recovered and logged (a warning at most every 5 s per
    // direction), and each stream's total is logged when it closes.
    let warned: Vec<&str> = log.lines().filter(|l| l.contains("xruns so far")).collect();
    let totals: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ALSA stream closed:"))
        .collect();
    let xruns: u64 = totals
        .iter()
        .filter_map(|l| {
            let rest = l.split("ALSA stream closed: ").nth(1)?;
            rest.split(" xruns").next()?.trim().parse::<u64>().ok()
        })
        .sum();
    let played = out.played.as_deref().unwrap_or_default();
    println!(
        "real_guest_alsa_duplex: played {} bytes: played.raw[0..{}] byte-exact + {} bytes of \
         drain silence; recorded {PCM_BYTES} bytes = capture.raw[0..{PCM_BYTES}] byte-exact; \
         xruns: {xruns} (xrun warning lines: {}, stream totals: {}); test {:.1} s",
        play.len(),
        play.len(),
        played.len().saturating_sub(play.len()),
        warned.len(),
        totals.len(),
        t_test.elapsed().as_secs_f64()
    );
    for l in warned.iter().chain(&totals) {
        println!("  {l}");
    }
}

/// The duplex guest with the broker's PipeWire backend (`--backend
/// pipewire`) against a private PipeWire daemon (`vsnd_tests::pipewire`):
/// the host records the null sink's monitor from before the guest boots,
/// and feeds the source a long signal from the moment the guest's /init
/// starts its tools. What the guest played must be in the monitor recording
/// bit-exact and contiguous (silence around it); what the guest recorded
/// must be silence (while its capture stream is created and primed) and
/// then a contiguous, bit-exact piece of the source's signal up to its end.
/// Prints the bytes matched each way, where, and the broker's underrun,
/// drop and drain lines.
#[test]
fn real_guest_pipewire_duplex() {
    let play = play_data();
    // 20 s: from the guest's VSND-START to the end of its 2 s recording,
    // with TCG's pace to spare. Its own pattern: no sample is 0.
    let signal = pcm_pattern(20 * RATE as usize * BYTES_PER_FRAME, 1000.0, 0x3c3c);
    fixture();
    let _serial = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let t_test = Instant::now();
    let pw = PipeWire::start();
    *PIPEWIRE_ENV.lock().unwrap_or_else(|e| e.into_inner()) = pw.env();
    let mut gb = GuestBroker::start("pipewire-duplex", &capture_data(), BrokerKind::PipeWire);
    let monitor = pw.start_recording(pipewire::SINK, true, PcmFormat::S16_48K_STEREO);
    let console = gb.dir.0.join("console.log");
    let mut feeder = None;
    let mut fed_at = None;
    let mut out = gb.boot_guest_with("", Mode::Duplex, &play, PCM_BYTES, &mut || {
        if feeder.is_none() && read_lossy(&console).contains("VSND-START") {
            feeder = Some(pw.start_feeding_source(&signal));
            fed_at = Some(t_test.elapsed());
        }
    });
    gb.stop();
    let recorded_monitor = monitor.stop();
    if let Some(f) = feeder {
        f.stop();
    }
    let log = gb.log();
    // The broker's own files stay empty: this is the PipeWire backend.
    out.played = None;
    check_common(&out);
    assert_eq!(
        marker_value(&out.console, "VSND-APLAY-RC="),
        Some("0"),
        "aplay failed in the guest\n{}",
        out.diag()
    );
    check_arecord(&out, PCM_BYTES);
    for (needle, what) in [
        (
            "PipeWire: stream vsnd.guest1.output",
            "the output stream created",
        ),
        (
            "PipeWire: stream vsnd.guest1.input",
            "the input stream created",
        ),
        (
            "PipeWire: capture stream destroyed",
            "the input stream destroyed",
        ),
    ] {
        let n = log.lines().filter(|l| l.contains(needle)).count();
        assert_eq!(
            n,
            1,
            "expected {what} once (log lines with {needle:?}), got {n}\n{}",
            out.diag()
        );
    }
    // Underruns, overflows and unplayed bytes (one line per stream, only if
    // any), and what the output stream played out after its release.
    let troubles: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("PipeWire stream closed:"))
        .collect();
    let drained: Vec<&str> = log.lines().filter(|l| l.contains("draining")).collect();

    // Playback: bit-exact and contiguous in the monitor, silence around it.
    let Some((at, quiet)) = pipewire::find_pcm(&recorded_monitor, &play, 0) else {
        let probe = &play[..64];
        let first = pipewire::find_bytes(&recorded_monitor, probe);
        let run = first.map(|a| {
            recorded_monitor[a..]
                .iter()
                .zip(&play)
                .take_while(|(x, y)| x == y)
                .count()
        });
        panic!(
            "what the guest played ({} bytes) is not in the sink's monitor recording ({} \
             bytes, {} non-zero) bit-exact and contiguous: its first 64 bytes are at {first:?}, \
             {run:?} bytes match from there; broker lines: {troubles:#?}\n{}",
            play.len(),
            recorded_monitor.len(),
            recorded_monitor.iter().filter(|&&b| b != 0).count(),
            out.diag()
        );
    };
    assert!(
        quiet,
        "the sink's monitor has something besides the guest's data and silence\n{}",
        out.diag()
    );

    // Capture: leading silence, then the signal, contiguous, to the end.
    let rec = &out.recorded;
    let lead = rec.iter().take_while(|&&b| b == 0).count() / BYTES_PER_FRAME * BYTES_PER_FRAME;
    let tail = &rec[lead..];
    assert!(
        tail.len() >= PCM_BYTES / 2,
        "the guest recorded {lead} bytes of silence of {PCM_BYTES}: expected the source's \
         signal for at least half of it\n{}",
        out.diag()
    );
    let Some(from) = pipewire::find_bytes(&signal, tail) else {
        let first = pipewire::find_bytes(&signal, &tail[..64]);
        let run = first.map(|a| {
            signal[a..]
                .iter()
                .zip(tail)
                .take_while(|(x, y)| x == y)
                .count()
        });
        panic!(
            "what the guest recorded after {lead} bytes of silence ({} bytes) is not a \
             contiguous piece of the source's signal: its first 64 bytes are at {first:?} of \
             the signal, {run:?} bytes match from there; broker lines: {troubles:#?}\n{}",
            tail.len(),
            out.diag()
        );
    };
    println!(
        "real_guest_pipewire_duplex: played {} bytes: found bit-exact and contiguous in the \
         sink's monitor at byte {at} of {} recorded, silence only around it; recorded \
         {PCM_BYTES} bytes: {lead} bytes ({:.1} ms) of leading silence, then {} bytes \
         bit-exact = the source's signal from byte {from}; source fed from {:?} into the \
         test; test {:.1} s; underruns/drops: {}; drain: {}",
        play.len(),
        recorded_monitor.len(),
        ms_of(lead),
        tail.len(),
        fed_at,
        t_test.elapsed().as_secs_f64(),
        if troubles.is_empty() {
            "none (no underrun, drop or drain)".to_owned()
        } else {
            troubles.join(" | ")
        },
        drained.join(" | ")
    );
}

/// One broker (sandbox on, seccomp kill: the defaults), two guests one
/// after the other on the same socket: the first plays and powers off (its
/// device exits with the connection), the second is served by the fresh
/// device the broker started meanwhile and plays and records at once.
#[test]
fn real_guest_reconnect() {
    let play1 = pcm_pattern(PCM_BYTES, 440.0, 0x1111);
    let play2 = pcm_pattern(PCM_BYTES, 660.0, 0x2222);
    let capture = capture_data();
    fixture();
    let _serial = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let vsnd = std::env::var_os("VSND_REAL_GUEST_BROKER_CMD").is_none();
    let mut gb = GuestBroker::start("reconnect", &capture, BrokerKind::Open);

    let mut first = gb.boot_guest("g1-", Mode::Play, &play1);
    // The first device exits with its connection; the broker starts a fresh
    // one and it waits for the next VM.
    if vsnd {
        gb.wait_log("device started (pid ", 2, Duration::from_secs(10));
        gb.wait_log(
            "waiting for a vhost-user frontend",
            2,
            Duration::from_secs(10),
        );
    } else {
        sleep(Duration::from_secs(1));
    }
    // Everything the first guest played is in played.raw by now (the raw
    // file backend appends); the second guest's bytes follow.
    let after_first = gb.played().unwrap_or_default();
    first.played = Some(after_first.clone());

    let mut second = gb.boot_guest("g2-", Mode::Duplex, &play2);
    gb.stop();
    second.played = gb
        .played()
        .map(|p| p.get(after_first.len()..).unwrap_or_default().to_vec());

    check_common(&first);
    check_play(&first, &play1);
    check_common(&second);
    check_play(&second, &play2);
    check_record(&second, &capture);

    if vsnd {
        let log = gb.log();
        let count = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
        let stopped: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("device stopped") || l.contains("SIGSYS"))
            .collect();
        assert!(
            stopped.is_empty(),
            "expected no device to stop abnormally across the reconnect, the broker logged:\n{}\n{}",
            stopped.join("\n"),
            second.diag()
        );
        assert!(
            count("device started (pid ") >= 2,
            "expected a second \"device started\" for the second guest\n{}",
            second.diag()
        );
        assert_eq!(
            count("frontend connected"),
            2,
            "expected each guest to be served by its own device (two \"frontend connected\")\n{}",
            second.diag()
        );
    }
}

// ---------------------------------------------------------------------------
// The gate with a real guest
// ---------------------------------------------------------------------------

/// Milliseconds since the Unix epoch, now.
fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2026-11-25T09:47:13.720Z` (the audit log's time) to milliseconds since
/// the Unix epoch.
fn parse_utc_ms(s: &str) -> Option<u64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(str::parse::<i64>);
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let (hms, ms) = time.split_once('.')?;
    let mut t = hms.split(':').map(str::parse::<i64>);
    let (hh, mm, ss) = (t.next()?.ok()?, t.next()?.ok()?, t.next()?.ok()?);
    let ms: i64 = ms.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u64::try_from(((days * 24 + hh) * 60 + mm) * 60 * 1000 + ss * 1000 + ms).ok()
}

/// The timestamp env_logger puts at the start of a broker log line
/// (`[2026-11-25T09:47:13.720Z INFO …`; milliseconds; compares as text).
fn log_time(line: &str) -> Option<&str> {
    line.strip_prefix('[')?.split_whitespace().next()
}

/// The guest's period size for capture, from the broker's
/// `input: params PcmParams { …, period_bytes: N }` line.
fn capture_period_bytes(broker_log: &str) -> Option<usize> {
    let line = broker_log.lines().find(|l| l.contains("input: params"))?;
    let rest = &line[line.find("period_bytes: ")? + "period_bytes: ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// What the guest's /init printed as `VSND-JACKS: <when> …` (the part
/// after `<when> `).
fn jacks<'a>(out: &'a Outcome, when: &str) -> Option<&'a str> {
    marker_values(&out.console, "VSND-JACKS: ")
        .into_iter()
        .find_map(|v| v.strip_prefix(when)?.strip_prefix(' '))
        .map(str::trim)
}

fn ms_of(bytes: usize) -> f64 {
    bytes as f64 * 1000.0 / (f64::from(RATE) * BYTES_PER_FRAME as f64)
}

/// One run of `vsnd-ctl`.
struct CtlRun {
    pid: u32,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// Host clock around the run.
    began: Instant,
    ended: Instant,
    wall_began_ms: u64,
    wall_ended_ms: u64,
}

fn run_vsnd_ctl(ctl_socket: &Path, args: &[&str]) -> CtlRun {
    let mut cmd = Command::new(bin_path("vsnd-ctl"));
    cmd.arg("--socket")
        .arg(ctl_socket)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let wall_began_ms = wall_ms();
    let began = Instant::now();
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let pid = child.id();
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for vsnd-ctl: {e}"));
    let ended = Instant::now();
    let run = CtlRun {
        pid,
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        began,
        ended,
        wall_began_ms,
        wall_ended_ms: wall_ms(),
    };
    // For the diagnostics (Outcome::gate_diag).
    if let Some(dir) = ctl_socket.parent() {
        if let Ok(mut f) = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("vsnd-ctl.txt"))
        {
            let _ = writeln!(
                f,
                "vsnd-ctl {} (pid {pid}): exit {:?} in {} ms; stdout {:?} stderr {:?}",
                args.join(" "),
                run.code,
                (ended - began).as_millis(),
                run.stdout,
                run.stderr
            );
        }
    }
    run
}

/// The checks both gate tests share: the guest recorded cleanly and
/// nothing died.
fn check_gate_common(out: &Outcome, bytes: usize, broker_log: &str) {
    check_common(out);
    check_arecord(out, bytes);
    let bad: Vec<&str> = broker_log
        .lines()
        .filter(|l| l.contains("device stopped") || l.contains(SECCOMP_BLOCKED))
        .collect();
    assert!(
        bad.is_empty(),
        "the broker logged a stopped or killed device:\n{}\n{}",
        bad.join("\n"),
        out.diag()
    );
}

/// The audit file's lines; the first two are the start-up records.
fn audit_lines(out: &Outcome) -> Vec<String> {
    let text = read_lossy(&out.dir.0.join("audit.log"));
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let initial = [
        "output on (initial) source=start-up",
        "input off (initial) source=start-up",
    ];
    for (i, want) in initial.iter().enumerate() {
        let ok = lines
            .get(i)
            .and_then(|l| l.split_once(' '))
            .is_some_and(|(t, rest)| rest == *want && parse_utc_ms(t).is_some());
        assert!(
            ok,
            "audit.log line {} should be \"<time> {want}\", the file is:\n{text}\n{}",
            i + 1,
            out.diag()
        );
    }
    lines
}

/// What the test's hook saw and did while the gate guest ran.
#[derive(Default)]
struct GateWatch {
    /// The last poll at which the broker had not logged the capture START.
    before_start: Option<Instant>,
    /// The first poll at which it had.
    start_seen: Option<Instant>,
    /// When the guest's `VSND-RECORDING` was first seen on the console.
    recording_seen: Option<Instant>,
    /// `vsnd-ctl set input on`.
    set: Option<CtlRun>,
}

/// Input OFF at start; the guest records 3 s; ~1 s into it the host runs
/// `vsnd-ctl set input on`. Proves, with a real Linux `virtio_snd` driver
/// and real arecord:
/// * the guest heard exact zeros while input was off and saw the mic jack
///   unplugged;
/// * then exactly `capture.raw` from its first byte (the broker opened the
///   host source only when input went on), switching at a period boundary,
///   and at the first period that ended after the SET (timed from the
///   host: the zeros end between "SET sent − one period" and "SET answered");
/// * the audit line (naming vsnd-ctl's pid) came before the host source was
///   opened; a jack event told the guest's ALSA the mic is plugged in;
/// * arecord ran through the flip without an error.
#[test]
fn real_guest_gate() {
    let capture = capture_data();
    assert!(capture.len() >= GATE_PCM_BYTES);
    fixture();
    let _serial = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let t_test = Instant::now();
    let mut gb = GuestBroker::start("gate", &capture, BrokerKind::Gate);
    let d = gb.dir.0.clone();
    let ctl_socket = d.join("ctl.sock");
    let console_path = d.join("console.log");
    let broker_log_path = d.join("broker.stderr");

    let mut w = GateWatch::default();
    let mut hook = || {
        if w.start_seen.is_none() {
            let now = Instant::now();
            if read_lossy(&broker_log_path).contains("input stream: Start") {
                w.start_seen = Some(now);
            } else {
                w.before_start = Some(now);
            }
        }
        if w.recording_seen.is_none() && read_lossy(&console_path).contains("VSND-RECORDING") {
            w.recording_seen = Some(Instant::now());
        }
        if let (Some(seen), None) = (w.recording_seen, &w.set) {
            if seen.elapsed() >= GATE_OFF_FOR {
                w.set = Some(run_vsnd_ctl(&ctl_socket, &["set", "input", "on"]));
            }
        }
    };
    let out = gb.boot_guest_with("", Mode::Gate, &[], GATE_PCM_BYTES, &mut hook);
    gb.stop();
    let log = gb.log();

    // 6. The guest recorded without an error; nothing died.
    check_gate_common(&out, GATE_PCM_BYTES, &log);

    // 1. Before: the mic jack unplugged.
    assert_eq!(
        jacks(&out, "before"),
        Some("output=on input=off"),
        "before the SET the guest's ALSA should see the line-out jack plugged and the mic jack \
         unplugged (VSND-CONTROL lines list the card's controls)\n{}",
        out.diag()
    );

    // 2. The SET, while the guest recorded.
    let Some(set) = &w.set else {
        panic!(
            "the guest never printed VSND-RECORDING, or finished less than {GATE_OFF_FOR:?} \
             after it: the SET was never sent\n{}",
            out.diag()
        );
    };
    assert!(
        set.code == Some(0) && set.stdout.trim() == "output=on input=on",
        "`vsnd-ctl set input on` should exit 0 printing \"output=on input=on\"; it exited \
         {:?}, stdout {:?}, stderr {:?}\n{}",
        set.code,
        set.stdout,
        set.stderr,
        out.diag()
    );
    let (Some(before_start), Some(start_seen)) = (w.before_start, w.start_seen) else {
        panic!(
            "the broker never logged \"input stream: Start\" while the guest ran (or did \
             before the guest booted)\n{}",
            out.diag()
        );
    };

    // 3. Zeros, then capture.raw from its first byte, at a period boundary.
    let rec = &out.recorded;
    let period = capture_period_bytes(&log).unwrap_or_else(|| {
        panic!(
            "no \"input: params … period_bytes: N\" line in the broker log\n{}",
            out.diag()
        )
    });
    // No sample of capture.raw is 0: the first non-zero sample is the
    // file's first.
    let prefix = rec
        .chunks(2)
        .position(|s| s != [0, 0])
        .map_or(rec.len(), |i| i * 2);
    assert!(
        prefix > 0,
        "the recording starts with host samples: input was off for the first {GATE_OFF_FOR:?} \
         and the guest should have recorded zeros\n{}",
        out.diag()
    );
    assert!(
        prefix < rec.len(),
        "the whole recording ({} bytes) is zeros: `set input on` had no effect\n{}",
        rec.len(),
        out.diag()
    );
    let matched = rec.len() - prefix;
    assert_same_bytes(
        "what the guest recorded after the zeros vs the start of capture.raw",
        &rec[prefix..],
        &capture[..matched],
        &|| out.diag(),
    );
    assert_eq!(
        prefix % period,
        0,
        "the switch from zeros to host samples is not at a period boundary: zero prefix {prefix} \
         bytes, period {period} bytes\n{}",
        out.diag()
    );
    let prefix_ms = ms_of(prefix);
    let period_ms = ms_of(period);
    // The capture clock started between `before_start` and `start_seen`;
    // the SET took effect between `set.began` and `set.ended`. Stream time
    // never runs ahead of wall time, and every period that ended before the
    // SET took effect was answered with zeros, so
    //     SET - START - one period (- broker lateness) <= zeros <= SET - START.
    let ms = |a: Instant, b: Instant| a.saturating_duration_since(b).as_secs_f64() * 1000.0;
    let set_lo = ms(set.began, start_seen);
    let set_hi = ms(set.ended, before_start);
    const SLACK_MS: f64 = 20.0;
    assert!(
        prefix_ms <= set_hi + SLACK_MS,
        "the guest got {prefix_ms:.0} ms of zeros, but input went on at most {set_hi:.0} ms \
         after its capture stream started: zeros were sent after the SET\n{}",
        out.diag()
    );
    let underruns = log
        .lines()
        .filter(|l| l.contains("underrun: restarting"))
        .count();
    // A restarted capture clock (the guest was late re-queueing buffers)
    // makes stream time lag wall time; the lower bound assumes it did not.
    const LATENESS_MS: f64 = 50.0;
    if underruns == 0 {
        assert!(
            prefix_ms + period_ms + LATENESS_MS >= set_lo,
            "input went on at least {set_lo:.0} ms after the capture stream started, but the \
             guest got only {prefix_ms:.0} ms of zeros (period {period_ms:.0} ms): host samples \
             reached the guest more than one period before the SET\n{}",
            out.diag()
        );
    }
    assert!(
        prefix_ms >= 500.0,
        "only {prefix_ms:.0} ms of zeros: the SET was meant to come ~1.3 s into the \
         recording\n{}",
        out.diag()
    );

    // 3b. The broker's own order: audit line, then the host source opened.
    let lines: Vec<&str> = log.lines().collect();
    let audit_at = lines
        .iter()
        .position(|l| l.contains("audit:") && l.contains("input off -> on"));
    let open_at = lines
        .iter()
        .position(|l| l.contains("host capture source opened"));
    let (Some(audit_at), Some(open_at)) = (audit_at, open_at) else {
        panic!(
            "the broker log should have an \"input off -> on\" audit line and a \"host capture \
             source opened\" line\n{}",
            out.diag()
        );
    };
    assert!(
        audit_at < open_at && log_time(lines[audit_at]) <= log_time(lines[open_at]),
        "the host capture source was opened before the input flag went on:\n  {}\n  {}\n{}",
        lines[open_at],
        lines[audit_at],
        out.diag()
    );
    let opens = lines
        .iter()
        .filter(|l| l.contains("host capture source opened"))
        .count();
    assert_eq!(
        opens,
        1,
        "the host capture source should be opened once\n{}",
        out.diag()
    );

    // 4. After: a jack event reached the guest's ALSA.
    assert_eq!(
        jacks(&out, "after"),
        Some("output=on input=on"),
        "after the SET the guest's ALSA should see the mic jack plugged in\n{}",
        out.diag()
    );

    // 5. The audit trail: two start-up lines and exactly one change, by
    // vsnd-ctl, stamped while vsnd-ctl ran.
    let audit = audit_lines(&out);
    let want = format!(
        "input off -> on uid={} pid={} comm=\"vsnd-ctl\" source=control-socket",
        nix::unistd::getuid(),
        set.pid
    );
    assert!(
        audit.len() == 3 && audit[2].split_once(' ').is_some_and(|(_, r)| r == want),
        "audit.log should hold the two start-up lines and then \"<time> {want}\"\n{}",
        out.diag()
    );
    let stamp = audit[2].split_once(' ').and_then(|(t, _)| parse_utc_ms(t));
    assert!(
        stamp.is_some_and(|t| (set.wall_began_ms..=set.wall_ended_ms).contains(&t)),
        "the audit line's time {:?} is not within vsnd-ctl's run [{}, {}] (ms since the epoch)\n{}",
        stamp,
        set.wall_began_ms,
        set.wall_ended_ms,
        out.diag()
    );

    let after_recording = set
        .began
        .saturating_duration_since(w.recording_seen.unwrap_or(set.began));
    println!(
        "real_guest_gate: recorded {} bytes ({:.0} ms); zero prefix {prefix} bytes = \
         {prefix_ms:.0} ms = {} periods of {period} bytes ({period_ms:.0} ms); then {matched} \
         bytes = capture.raw[0..{matched}] byte-exact; SET input on came {set_lo:.0}..{set_hi:.0} \
         ms after the capture START (sent {} ms after VSND-RECORDING was seen, vsnd-ctl took {} \
         ms); capture underrun restarts: {underruns}; test {:.1} s",
        rec.len(),
        ms_of(rec.len()),
        prefix / period,
        after_recording.as_millis(),
        (set.ended - set.began).as_millis(),
        t_test.elapsed().as_secs_f64()
    );
}

/// Input OFF for the whole recording: every recorded byte is 0, the host
/// capture file is never opened, the guest sees the mic jack unplugged
/// throughout, and the audit trail has only the start-up lines.
#[test]
fn real_guest_gate_off_is_silence() {
    let capture = capture_data();
    fixture();
    let _serial = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let t_test = Instant::now();
    let mut gb = GuestBroker::start("gate-off", &capture, BrokerKind::Gate);
    let out = gb.boot_guest_with("", Mode::Gate, &[], GATE_OFF_PCM_BYTES, &mut || {});
    let query = run_vsnd_ctl(&gb.dir.0.join("ctl.sock"), &["query"]);
    gb.stop();
    let log = gb.log();

    check_gate_common(&out, GATE_OFF_PCM_BYTES, &log);
    let nonzero = out.recorded.iter().filter(|&&b| b != 0).count();
    assert_eq!(
        nonzero,
        0,
        "input was off, yet {nonzero} of the {} recorded bytes are not 0 (the first at byte \
         {:?})\n{}",
        out.recorded.len(),
        out.recorded.iter().position(|&b| b != 0),
        out.diag()
    );
    for when in ["before", "after"] {
        assert_eq!(
            jacks(&out, when),
            Some("output=on input=off"),
            "with input off the guest's ALSA should see the mic jack unplugged ({when})\n{}",
            out.diag()
        );
    }
    let opened: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("host capture source opened")
                || (l.contains("capture file") && l.contains(" opened"))
        })
        .collect();
    assert!(
        opened.is_empty(),
        "input was off, yet the broker opened the host capture source:\n{}\n{}",
        opened.join("\n"),
        out.diag()
    );
    assert_eq!(
        audit_lines(&out).len(),
        2,
        "no change was made: audit.log should hold only the start-up lines\n{}",
        out.diag()
    );
    assert!(
        query.code == Some(0) && query.stdout.trim() == "output=on input=off",
        "`vsnd-ctl query` after the guest: exit {:?}, stdout {:?}, stderr {:?}\n{}",
        query.code,
        query.stdout,
        query.stderr,
        out.diag()
    );
    println!(
        "real_guest_gate_off_is_silence: recorded {} bytes ({:.0} ms), all 0; host capture \
         source never opened; jacks input=off before and after; test {:.1} s",
        out.recorded.len(),
        ms_of(out.recorded.len()),
        t_test.elapsed().as_secs_f64()
    );
}

#[test]
fn pcm_pattern_is_deterministic_and_never_silent() {
    let a = pcm_pattern(PCM_BYTES, 440.0, 0);
    assert_eq!(a, pcm_pattern(PCM_BYTES, 440.0, 0));
    assert_eq!(a.len(), PCM_BYTES);
    assert!(a.chunks(BYTES_PER_FRAME).all(|f| f[2] & 1 == 1));
    let c = capture_data();
    assert!(
        a.chunks(2).chain(c.chunks(2)).all(|s| s != [0, 0]),
        "no 16-bit sample may be 0"
    );
    assert_ne!(a[..4096], pcm_pattern(PCM_BYTES, 1000.0, 0x5a5a)[..4096]);
}

#[test]
fn gate_log_helpers_parse_what_the_broker_writes() {
    assert_eq!(parse_utc_ms("1970-01-01T00:00:01.005Z"), Some(1005));
    assert_eq!(
        parse_utc_ms("2000-02-29T00:00:00.005Z"),
        Some(951_782_400_005)
    );
    assert_eq!(
        parse_utc_ms("2026-11-25T09:30:45.123Z"),
        Some(1_795_599_045_123)
    );
    assert_eq!(parse_utc_ms("2026-11-25 09:30:45"), None);
    let log = "[2026-11-25T09:47:12Z DEBUG vsnd_broker::session] input: params PcmParams { \
               format: S16, rate: 48000, channels: 2, buffer_bytes: 96000, period_bytes: 24000 }";
    assert_eq!(capture_period_bytes(log), Some(24_000));
    assert_eq!(log_time(log), Some("2026-11-25T09:47:12Z"));
}
