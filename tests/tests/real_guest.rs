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
//!   socket (the second served by the fresh device the broker started).
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
//!   fixture against upstream.
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
use vsnd_tests::bin_path;

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
/// `capture.raw` is longer than what the guest records, so that the broker's
/// looping of the capture file never comes into play.
const CAPTURE_FILE_BYTES: usize = 2 * PCM_BYTES;

/// The broker command line used by every test. Adjust it here.
fn broker_command(dir: &Path, socket: &Path) -> Command {
    if let Ok(tmpl) = std::env::var("VSND_REAL_GUEST_BROKER_CMD") {
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
    cmd.arg("--socket")
        .arg(socket)
        .args(["--backend", "file"])
        .arg("--playback-file")
        .arg(dir.join("played.raw"))
        .arg("--capture-file")
        .arg(dir.join("capture.raw"))
        .args(["--initial-streams", "output,input"])
        .env("RUST_LOG", "debug");
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

/// Deterministic, non-silent S16_LE stereo: left = a tone, right = a frame
/// counter mixed with a seed, so that a lost, repeated or misaligned byte
/// anywhere shows up as a mismatch (and the counter tells where).
fn pcm_pattern(bytes: usize, freq_hz: f64, seed: u16) -> Vec<u8> {
    assert_eq!(bytes % BYTES_PER_FRAME, 0);
    let frames = bytes / BYTES_PER_FRAME;
    let mut v = Vec::with_capacity(bytes);
    for i in 0..frames {
        let t = i as f64 / f64::from(RATE);
        let tone = (8000.0 * (2.0 * std::f64::consts::PI * freq_hz * t).sin()) as i16;
        // Never zero, so silence is never mistaken for data.
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
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Play => "play",
            Mode::Record => "record",
            Mode::Duplex => "duplex",
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
    /// The first PCM_BYTES of the record disk.
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
        )
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
    /// its socket.
    fn start(tag: &str, capture_data: &[u8]) -> GuestBroker {
        let dir = Arc::new(TempDir::new(tag));
        let d = dir.0.clone();
        let socket = d.join("vsnd.sock");
        fs::write(d.join("capture.raw"), capture_data).expect("write capture.raw");
        let mut bcmd = broker_command(&d, &socket);
        bcmd.stdin(Stdio::null())
            .stdout(File::create(d.join("broker.stdout")).expect("broker.stdout"))
            .stderr(File::create(d.join("broker.stderr")).expect("broker.stderr"));
        let _ = fs::write(d.join("broker-command.txt"), format!("{bcmd:?}\n"));
        let mut broker = ChildGuard(Some(
            bcmd.spawn()
                .unwrap_or_else(|e| panic!("cannot start broker {bcmd:?}: {e}")),
        ));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
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
        let fx = fixture();
        let d = self.dir.0.clone();
        let name = |f: &str| d.join(format!("{guest}{f}"));
        write_disk(&name("play.img"), play_data, play_data.len());
        write_disk(&name("rec.img"), &[], PCM_BYTES + 4096);

        let append = format!(
            "console=ttyS0 panic=-1 quiet vsnd.mode={} vsnd.fmt={FORMAT} vsnd.rate={RATE} \
             vsnd.ch={CHANNELS} vsnd.bytes={PCM_BYTES} vsnd.timeout={GUEST_TOOL_TIMEOUT_S}",
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
            sleep(Duration::from_millis(50));
        };
        let wall = start.elapsed();
        qemu.terminate(Duration::from_secs(2));

        let rec_img = fs::read(name("rec.img")).unwrap_or_default();
        let out = Outcome {
            dir: Arc::clone(&self.dir),
            guest: guest.to_owned(),
            console: read_lossy(&console_path),
            played: None,
            recorded: rec_img[..PCM_BYTES.min(rec_img.len())].to_vec(),
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
    let mut gb = GuestBroker::start(mode.name(), capture_data);
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

fn check_record(out: &Outcome, capture_data: &[u8]) {
    assert_eq!(
        marker_value(&out.console, "VSND-ARECORD-RC="),
        Some("0"),
        "arecord failed in the guest\n{}",
        out.diag()
    );
    let n = PCM_BYTES.to_string();
    assert_eq!(
        marker_value(&out.console, "VSND-ARECORD-BYTES="),
        Some(n.as_str()),
        "arecord produced the wrong number of bytes\n{}",
        out.diag()
    );
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
    let mut gb = GuestBroker::start("reconnect", &capture);

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

#[test]
fn pcm_pattern_is_deterministic_and_never_silent() {
    let a = pcm_pattern(PCM_BYTES, 440.0, 0);
    assert_eq!(a, pcm_pattern(PCM_BYTES, 440.0, 0));
    assert_eq!(a.len(), PCM_BYTES);
    assert!(a.chunks(BYTES_PER_FRAME).all(|f| f[2] & 1 == 1));
    assert_ne!(a[..4096], pcm_pattern(PCM_BYTES, 1000.0, 0x5a5a)[..4096]);
}
