//! A private, headless PipeWire daemon for the PipeWire backend's tests.
//!
//! [`PipeWire::start`] runs `tests/pipewire/start.sh` in a fresh temporary
//! directory: a `pipewire` daemon and its session manager (WirePlumber) with
//! everything (socket, configuration, state, logs) under that directory, no
//! D-Bus, no systemd, none of the host's configuration. The daemon has
//!
//! * [`SINK`] (`vsnd-test-sink`): an `Audio/Sink`, 48 kHz stereo null sink,
//!   the default sink. What is played into it is recorded from its monitor
//!   ports with [`PipeWire::start_recording`] / [`PipeWire::record_sink_monitor`].
//! * [`SOURCE`] (`vsnd-test-source`): an `Audio/Source`, 48 kHz stereo, the
//!   default source, which outputs what [`PipeWire::feed_source`] plays into
//!   [`SOURCE_INPUT`] (a loopback).
//!
//! The graph runs at 48 kHz in F32, and nothing changes volumes or adds
//! dither, so S16/F32/U8 data at 48 kHz comes out bit-exact (measured with
//! bookworm's PipeWire 0.3.65 and backports' 1.4.2; see
//! `tests/pipewire/README.md`). S32 loses its low 8 bits in the F32 graph;
//! other rates are resampled.
//!
//! Clients (the broker under test) connect to it with the variables of
//! [`PipeWire::env`]. Nodes are listed with `pw-dump` ([`PipeWire::nodes`],
//! [`PipeWire::capture_streams`]). [`PipeWire::restart_daemon`] kills the
//! daemon and starts it again on the same socket, for "daemon restarted
//! mid-stream" tests. Dropping the guard stops everything; if the test
//! panicked (or `$VSND_TEST_KEEP` is set) the directory is kept and the
//! daemon logs' tails are printed. If the test process dies without dropping
//! it, a watchdog started by `start.sh --watch` stops the daemons.
//!
//! Every helper that can fail panics with a message saying what was expected
//! and what came instead, like the rest of the test fixtures.
//!
//! Needs, besides std and nix: `serde_json` (the workspace's), to read
//! `pw-dump`. Needs on the machine: `pipewire`, `pipewire-bin`, `wireplumber`
//! (scripts/setup, `PIPEWIRE_PKGS`).

use std::collections::BTreeMap;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// `node.name` of the null sink (`Audio/Sink`, default sink).
pub const SINK: &str = "vsnd-test-sink";
/// `node.name` of the source (`Audio/Source`, default source).
pub const SOURCE: &str = "vsnd-test-source";
/// `node.name` of the sink that feeds [`SOURCE`] (a loopback's input side).
pub const SOURCE_INPUT: &str = "vsnd-test-source-input";
/// The daemon's socket name inside its runtime directory (`PIPEWIRE_REMOTE`).
pub const REMOTE: &str = "pipewire-0";
/// `media.class` of capture (recording) streams.
pub const CAPTURE_STREAM_CLASS: &str = "Stream/Input/Audio";
/// `media.class` of playback streams.
pub const PLAYBACK_STREAM_CLASS: &str = "Stream/Output/Audio";
/// Prefix of the `node.name` of every stream this fixture creates itself
/// (recorders, feeders); [`PipeWire::capture_streams`] leaves them out.
pub const OWN_NODE_PREFIX: &str = "vsnd-fixture-";

/// Environment variable: the directory holding `start.sh` & co. (default:
/// `pipewire/` next to this crate's `Cargo.toml`, i.e. `tests/pipewire`).
pub const SCRIPTS_ENV: &str = "VSND_PIPEWIRE_SCRIPTS";
/// Environment variable: keep the temporary directory even on success (the
/// same one the other fixtures honour).
pub const KEEP_ENV: &str = "VSND_TEST_KEEP";

/// Variables that select another PipeWire build without installing it
/// (`tests/pipewire/with-backports.sh` sets them): passed through from the
/// test's environment by [`PipeWire::env`] when set, like `start.sh` passes
/// them to the daemons and writes them into `DIR/env`. Keep the two lists
/// the same.
pub const PASS_THROUGH: &[&str] = &[
    "LD_LIBRARY_PATH",
    "PIPEWIRE_MODULE_DIR",
    "SPA_PLUGIN_DIR",
    "SPA_DATA_DIR",
    "WIREPLUMBER_MODULE_DIR",
    "WIREPLUMBER_DATA_DIR",
    "PIPEWIRE_DEBUG",
    "WIREPLUMBER_DEBUG",
];

/// How long `start.sh` may take to get the daemon ready (it measured
/// 50–250 ms on a 2-core CI machine; this is for a loaded one).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a recorder may take to be linked to its target.
pub const LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a recorder or player may take to exit after SIGTERM / its end.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Silence appended to everything [`PipeWire::feed_source`] plays: bookworm's
/// `pw-play` drops the last partial quantum of a file, so the data proper is
/// followed by more than one quantum (max 2048 frames) of silence.
pub const FEED_PADDING_FRAMES: u32 = 12_000;

/// A sample format as `pw-cat --format` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleFormat {
    /// Unsigned 8 bit (silence is 0x80).
    U8,
    /// Signed 16 bit little-endian.
    S16,
    /// Signed 32 bit little-endian (not bit-exact through the F32 graph).
    S32,
    /// 32 bit float little-endian.
    F32,
}

impl SampleFormat {
    /// Bytes per sample.
    pub fn bytes(self) -> usize {
        match self {
            Self::U8 => 1,
            Self::S16 => 2,
            Self::S32 | Self::F32 => 4,
        }
    }

    /// The name `pw-cat --format` takes.
    pub fn pw_cat_name(self) -> &'static str {
        match self {
            Self::U8 => "u8",
            Self::S16 => "s16",
            Self::S32 => "s32",
            Self::F32 => "f32",
        }
    }

    /// The byte silence is made of.
    pub fn silence_byte(self) -> u8 {
        match self {
            Self::U8 => 0x80,
            _ => 0,
        }
    }

    fn wav_tag(self) -> u16 {
        match self {
            Self::F32 => 3, // WAVE_FORMAT_IEEE_FLOAT
            _ => 1,         // WAVE_FORMAT_PCM
        }
    }
}

/// Interleaved PCM: sample format, rate and channel count. Channels are
/// positioned as PipeWire does by default (1: MONO, 2: FL FR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcmFormat {
    /// Sample format.
    pub sample: SampleFormat,
    /// Frames per second.
    pub rate: u32,
    /// Samples per frame.
    pub channels: u16,
}

impl PcmFormat {
    /// S16LE, 48 kHz, stereo: the sink's and the source's own format.
    pub const S16_48K_STEREO: Self = Self {
        sample: SampleFormat::S16,
        rate: 48_000,
        channels: 2,
    };

    /// Bytes per frame.
    pub fn frame_bytes(self) -> usize {
        self.sample.bytes() * usize::from(self.channels)
    }

    fn pw_cat_args(self) -> [String; 6] {
        [
            "--rate".into(),
            self.rate.to_string(),
            "--channels".into(),
            self.channels.to_string(),
            "--format".into(),
            self.sample.pw_cat_name().into(),
        ]
    }
}

/// One node as `pw-dump` shows it.
#[derive(Clone, Debug)]
pub struct Node {
    /// The global id (changes when the daemon restarts).
    pub id: u32,
    /// `node.name`, if it has one.
    pub name: Option<String>,
    /// `media.class`, if it has one.
    pub media_class: Option<String>,
    /// `info.state` (`"running"`, `"idle"`, `"suspended"`, ...).
    pub state: Option<String>,
    /// All of `info.props`; strings as they are, other values as JSON text.
    pub props: BTreeMap<String, String>,
}

impl Node {
    /// The property `key`, if set.
    pub fn prop(&self, key: &str) -> Option<&str> {
        self.props.get(key).map(String::as_str)
    }
}

/// One link as `pw-dump` shows it.
#[derive(Clone, Debug)]
pub struct Link {
    /// The global id.
    pub id: u32,
    /// Id of the node whose output port is linked.
    pub output_node: u32,
    /// Id of the node whose input port is linked.
    pub input_node: u32,
    /// `info.state` (`"active"`, `"paused"`, `"init"`, `"error"`, ...).
    pub state: Option<String>,
}

/// Objects of one `pw-dump`.
#[derive(Clone, Debug, Default)]
pub struct Dump {
    /// Every node.
    pub nodes: Vec<Node>,
    /// Every link.
    pub links: Vec<Link>,
}

impl Dump {
    /// The node named `name`.
    pub fn node(&self, name: &str) -> Option<&Node> {
        self.nodes.iter().find(|n| n.name.as_deref() == Some(name))
    }

    /// Nodes of media class `class`.
    pub fn nodes_of_class<'a>(&'a self, class: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.nodes
            .iter()
            .filter(move |n| n.media_class.as_deref() == Some(class))
    }

    /// Capture streams (`Stream/Input/Audio`), without this fixture's own
    /// recorders.
    pub fn capture_streams(&self) -> Vec<&Node> {
        self.nodes_of_class(CAPTURE_STREAM_CLASS)
            .filter(|n| !is_own(n))
            .collect()
    }

    /// Playback streams (`Stream/Output/Audio`), without this fixture's own
    /// feeders.
    pub fn playback_streams(&self) -> Vec<&Node> {
        self.nodes_of_class(PLAYBACK_STREAM_CLASS)
            .filter(|n| !is_own(n))
            .collect()
    }

    /// Whether some link goes from node `from` to node `to` (by name).
    pub fn linked(&self, from: &str, to: &str) -> bool {
        match (self.node(from), self.node(to)) {
            (Some(f), Some(t)) => self
                .links
                .iter()
                .any(|l| l.output_node == f.id && l.input_node == t.id),
            _ => false,
        }
    }
}

fn is_own(n: &Node) -> bool {
    n.name
        .as_deref()
        .is_some_and(|s| s.starts_with(OWN_NODE_PREFIX))
}

/// Parse `pw-dump`'s JSON into nodes and links; other objects are skipped.
///
/// # Errors
/// When the text is not a JSON array (message says why).
pub fn parse_pw_dump(json: &str) -> Result<Dump, String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("pw-dump output is not JSON: {e}"))?;
    let objects = value
        .as_array()
        .ok_or("pw-dump output is not a JSON array")?;
    let mut dump = Dump::default();
    for o in objects {
        let ty = o.get("type").and_then(|t| t.as_str()).unwrap_or("");
        let Some(id) = o
            .get("id")
            .and_then(|i| i.as_u64())
            .and_then(|i| u32::try_from(i).ok())
        else {
            continue;
        };
        let info = o.get("info");
        let state = info
            .and_then(|i| i.get("state"))
            .and_then(|s| s.as_str())
            .map(str::to_owned);
        if ty == "PipeWire:Interface:Node" {
            let mut props = BTreeMap::new();
            if let Some(p) = info
                .and_then(|i| i.get("props"))
                .and_then(|p| p.as_object())
            {
                for (k, v) in p {
                    let text = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    props.insert(k.clone(), text);
                }
            }
            dump.nodes.push(Node {
                id,
                name: props.get("node.name").cloned(),
                media_class: props.get("media.class").cloned(),
                state,
                props,
            });
        } else if ty == "PipeWire:Interface:Link" {
            let node_id = |key: &str| {
                info.and_then(|i| i.get(key))
                    .and_then(|v| v.as_u64())
                    .and_then(|v| u32::try_from(v).ok())
            };
            if let (Some(output_node), Some(input_node)) =
                (node_id("output-node-id"), node_id("input-node-id"))
            {
                dump.links.push(Link {
                    id,
                    output_node,
                    input_node,
                    state,
                });
            }
        }
    }
    Ok(dump)
}

/// A running private PipeWire daemon; stopped (and its directory removed)
/// on drop.
pub struct PipeWire {
    dir: PathBuf,
    scripts: PathBuf,
    counter: AtomicU32,
    startup: Duration,
}

impl PipeWire {
    /// Whether the PipeWire test packages are installed (`pipewire`,
    /// `wireplumber`, `pw-cli`, `pw-dump`, `pw-play`, `pw-record` on PATH).
    pub fn is_installed() -> bool {
        [
            "pipewire",
            "wireplumber",
            "pw-cli",
            "pw-dump",
            "pw-play",
            "pw-record",
            "pw-link",
        ]
        .iter()
        .all(|tool| find_in_path(tool).is_some())
    }

    /// Start a daemon with its session manager in `<tmp>/vsnd-pw-<pid>-<n>`
    /// and wait until it is ready (see `start.sh`).
    ///
    /// # Panics
    /// When the directory cannot be created or `start.sh` fails (its output,
    /// which includes the daemon logs' tails, is in the message).
    pub fn start() -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("vsnd-pw-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let scripts = std::env::var_os(SCRIPTS_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("pipewire"));
        let mut pw = Self {
            dir,
            scripts,
            counter: AtomicU32::new(0),
            startup: Duration::ZERO,
        };
        let t0 = Instant::now();
        let pid = std::process::id().to_string();
        let timeout = START_TIMEOUT.as_secs().to_string();
        let dir = pw.dir.clone();
        pw.script(
            "start.sh",
            &[
                dir.as_os_str(),
                "--watch".as_ref(),
                pid.as_ref(),
                "--timeout".as_ref(),
                timeout.as_ref(),
            ],
        );
        pw.startup = t0.elapsed();
        pw
    }

    /// The directory everything lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How long [`start`](Self::start) took to get the daemon ready.
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The runtime directory holding the socket ([`REMOTE`]).
    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// The variables a client (vsnd-broker, pw-cli, ...) needs to talk to this
    /// daemon: `XDG_RUNTIME_DIR` and `PIPEWIRE_RUNTIME_DIR` (where the socket
    /// is), `PIPEWIRE_REMOTE` (its name; what `--pipewire-remote` would
    /// override), and `PIPEWIRE_CONFIG_DIR` (copies of the packaged
    /// client.conf plus tests/pipewire/client.conf.d, so nothing in /etc or
    /// ~ changes how clients convert). The same as `. DIR/env`.
    ///
    /// Plus, when set in the test's own environment, the variables that
    /// select another PipeWire build ([`PASS_THROUGH`], the same list
    /// `start.sh` passes to the daemons and writes into `DIR/env`), so a
    /// broker started with exactly this environment loads the same
    /// libpipewire and SPA plugins as the daemon (see
    /// `tests/pipewire/with-backports.sh`). Unset, nothing is added.
    pub fn env(&self) -> Vec<(String, String)> {
        let run = self.runtime_dir().to_string_lossy().into_owned();
        let mut env = vec![
            ("XDG_RUNTIME_DIR".into(), run.clone()),
            ("PIPEWIRE_RUNTIME_DIR".into(), run),
            ("PIPEWIRE_REMOTE".into(), REMOTE.into()),
            (
                "PIPEWIRE_CONFIG_DIR".into(),
                self.dir
                    .join("config/pipewire")
                    .to_string_lossy()
                    .into_owned(),
            ),
        ];
        for var in PASS_THROUGH {
            if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
                env.push((var.to_string(), v.to_string_lossy().into_owned()));
            }
        }
        env
    }

    /// A command for `program` with [`env`](Self::env) applied.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new(program);
        cmd.envs(self.env());
        cmd
    }

    /// Run a PipeWire tool (`pw-cli`, `pw-link`, ...) to completion.
    ///
    /// # Panics
    /// When it cannot be run or exits non-zero.
    pub fn tool(&self, program: &str, args: &[&str]) -> String {
        let out = self
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
        check_output(&format!("{program} {}", args.join(" ")), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Everything `pw-dump` shows, parsed.
    ///
    /// # Panics
    /// When pw-dump fails or prints something that is not JSON.
    pub fn dump(&self) -> Dump {
        self.try_dump().unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`dump`](Self::dump), but a failure (e.g. while the daemon is
    /// down) is returned, not a panic.
    ///
    /// # Errors
    /// When pw-dump cannot be run, fails or prints something that is not JSON.
    pub fn try_dump(&self) -> Result<Dump, String> {
        let out = self
            .command("pw-dump")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run pw-dump: {e}"))?;
        let json = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "pw-dump failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        parse_pw_dump(&json).map_err(|e| format!("{e}; pw-dump printed:\n{json}"))
    }

    /// All nodes (`pw-dump`).
    pub fn nodes(&self) -> Vec<Node> {
        self.dump().nodes
    }

    /// The capture streams (`media.class` `Stream/Input/Audio`) other than
    /// this fixture's own recorders: while the guest's input is off there
    /// must be none of the broker's.
    pub fn capture_streams(&self) -> Vec<Node> {
        self.dump().capture_streams().into_iter().cloned().collect()
    }

    /// The playback streams (`Stream/Output/Audio`) other than this
    /// fixture's own feeders.
    pub fn playback_streams(&self) -> Vec<Node> {
        self.dump()
            .playback_streams()
            .into_iter()
            .cloned()
            .collect()
    }

    /// Poll `pw-dump` until `pred` holds, and return that dump. A pw-dump
    /// that fails (the daemon is being restarted) counts as "not yet".
    ///
    /// # Panics
    /// After `timeout`, with `what` and the node list of the last dump.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&Dump) -> bool) -> Dump {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.try_dump() {
                Ok(dump) if pred(&dump) => return dump,
                Ok(dump) => dump
                    .nodes
                    .iter()
                    .map(|n| {
                        format!(
                            "  {} {} [{}] {}",
                            n.id,
                            n.name.as_deref().unwrap_or("?"),
                            n.media_class.as_deref().unwrap_or("-"),
                            n.state.as_deref().unwrap_or("-")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n"),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                panic!("timed out after {timeout:?} waiting for {what}; nodes now:\n{last}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `program` (`pw-record`, `pw-play`) with stream properties `props` on
    /// `target`, in `format`, on `file`, its output into `log`.
    ///
    /// # Panics
    /// When it cannot be started.
    fn pw_cat(
        &self,
        program: &str,
        props: &str,
        target: &str,
        format: PcmFormat,
        file: &Path,
        log: &Path,
    ) -> Child {
        self.command(program)
            .arg("-P")
            .arg(props)
            .args(["--target", target])
            .args(format.pw_cat_args())
            .arg(file)
            .stdin(Stdio::null())
            .stdout(log_file(log))
            .stderr(log_file(log))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"))
    }

    /// Start recording `target`'s output: with `monitor`, the monitor ports
    /// of a sink (what was played into it); otherwise a source. Returns once
    /// the recorder is linked, so nothing played after this returns is missed.
    /// A recorder does not survive a daemon restart (pw-record exits when its
    /// connection goes): start a new one after [`restart_daemon`](Self::restart_daemon).
    ///
    /// # Panics
    /// When pw-record cannot be started or is not linked within
    /// [`LINK_TIMEOUT`].
    pub fn start_recording(&self, target: &str, monitor: bool, format: PcmFormat) -> Recording {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("{OWN_NODE_PREFIX}rec-{n}");
        let file = self.dir.join(format!("rec-{n}.wav"));
        let log = self.dir.join(format!("log/rec-{n}.log"));
        let props = format!("{{ node.name = {name} stream.capture.sink = {monitor} }}");
        let child = self.pw_cat("pw-record", &props, target, format, &file, &log);
        let mut rec = Recording {
            child: Some(child),
            file,
            log,
            name,
            format,
        };
        rec.wait_linked(self, usize::from(format.channels));
        rec
    }

    /// Record the sink's monitor for `duration` (S16LE 48 kHz stereo) and
    /// return the PCM data. Whatever plays into [`SINK`] meanwhile (from
    /// another thread or process) is in it, preceded and followed by silence.
    pub fn record_sink_monitor(&self, duration: Duration) -> Vec<u8> {
        let rec = self.start_recording(SINK, true, PcmFormat::S16_48K_STEREO);
        thread::sleep(duration);
        rec.stop()
    }

    /// Start playing `pcm` (S16LE 48 kHz stereo) into [`SOURCE_INPUT`], so
    /// that it comes out of [`SOURCE`]; returns at once. Start the capture
    /// that should see it first: the source keeps nothing for later.
    pub fn start_feeding_source(&self, pcm: &[u8]) -> Feeder {
        self.start_playing(SOURCE_INPUT, pcm, PcmFormat::S16_48K_STEREO)
    }

    /// Play `pcm` (S16LE 48 kHz stereo) into [`SOURCE_INPUT`] and wait until
    /// it has been played: it came out of [`SOURCE`] bit-exact, with silence
    /// after it.
    pub fn feed_source(&self, pcm: &[u8]) {
        self.start_feeding_source(pcm).wait();
    }

    /// Start playing `pcm` in `format` into the node `target` (any sink);
    /// [`FEED_PADDING_FRAMES`] of silence follow it.
    ///
    /// # Panics
    /// When `pcm` is not whole frames or pw-play cannot be started.
    pub fn start_playing(&self, target: &str, pcm: &[u8], format: PcmFormat) -> Feeder {
        assert_eq!(
            pcm.len() % format.frame_bytes(),
            0,
            "PCM to play is not whole frames of {format:?}"
        );
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let name = format!("{OWN_NODE_PREFIX}play-{n}");
        let file = self.dir.join(format!("play-{n}.wav"));
        let log = self.dir.join(format!("log/play-{n}.log"));
        let pad = FEED_PADDING_FRAMES as usize * format.frame_bytes();
        let mut data = Vec::with_capacity(pcm.len() + pad);
        data.extend_from_slice(pcm);
        data.resize(pcm.len() + pad, format.sample.silence_byte());
        fs::write(&file, wav_file(format, &data))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
        let props = format!("{{ node.name = {name} }}");
        let child = self.pw_cat("pw-play", &props, target, format, &file, &log);
        let frames = (pcm.len() / format.frame_bytes()) as u64 + u64::from(FEED_PADDING_FRAMES);
        let length = Duration::from_millis(frames * 1000 / u64::from(format.rate.max(1)));
        Feeder {
            child: Some(child),
            log,
            length,
        }
    }

    /// Kill the daemon (SIGKILL, a crash; with `crash == false` SIGTERM, an
    /// orderly exit) and its session manager. Clients lose their connection;
    /// [`start_daemon`](Self::start_daemon) brings it back.
    pub fn stop_daemon(&self, crash: bool) {
        let dir = self.dir.clone();
        let sig = if crash { "KILL" } else { "TERM" };
        self.script(
            "stop.sh",
            &[
                dir.as_os_str(),
                "--daemon".as_ref(),
                "--signal".as_ref(),
                sig.as_ref(),
            ],
        );
    }

    /// Start the daemon and its session manager again after
    /// [`stop_daemon`](Self::stop_daemon), on the same socket, and wait until
    /// they are ready. Node ids change; names do not.
    pub fn start_daemon(&self) {
        let dir = self.dir.clone();
        let timeout = START_TIMEOUT.as_secs().to_string();
        self.script(
            "start.sh",
            &[dir.as_os_str(), "--timeout".as_ref(), timeout.as_ref()],
        );
    }

    /// Kill the daemon (SIGKILL) and start it again at once; returns how long
    /// it took until it was ready again.
    pub fn restart_daemon(&self) -> Duration {
        let t0 = Instant::now();
        self.stop_daemon(true);
        self.start_daemon();
        t0.elapsed()
    }

    /// The last `lines` lines of the daemon's and the session manager's logs.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for name in ["pipewire", "wireplumber"] {
            let path = self.dir.join(format!("log/{name}.log"));
            let text = fs::read_to_string(&path).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("--- {}:\n", path.display()));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    fn script(&self, name: &str, args: &[&std::ffi::OsStr]) {
        let path = self.scripts.join(name);
        let out = Command::new("bash")
            .arg(&path)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
        check_output(&path.display().to_string(), &out);
    }
}

impl Drop for PipeWire {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(self.scripts.join("stop.sh"))
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status();
        if thread::panicking() || std::env::var_os(KEEP_ENV).is_some() {
            if thread::panicking() {
                eprintln!("{}", self.log_tail(60));
            }
            eprintln!("kept PipeWire test directory {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A running `pw-record`; [`stop`](Self::stop) it to get the data.
pub struct Recording {
    child: Option<Child>,
    file: PathBuf,
    log: PathBuf,
    name: String,
    format: PcmFormat,
}

impl Recording {
    /// The recorder's `node.name`.
    pub fn node_name(&self) -> &str {
        &self.name
    }

    /// The format of the data.
    pub fn format(&self) -> PcmFormat {
        self.format
    }

    fn wait_linked(&mut self, pw: &PipeWire, ports: usize) {
        let deadline = Instant::now() + LINK_TIMEOUT;
        let needle = format!("|-> {}:input_", self.name);
        loop {
            // `pw-link -l` prints "<node>:<port>\n  |-> <node>:<port>" per link.
            let links = pw.tool("pw-link", &["-l"]);
            if links
                .lines()
                .filter(|l| l.trim_start().starts_with(&needle))
                .count()
                >= ports
            {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "pw-record exited ({status}) before it was linked: {}",
                    read_lossy(&self.log)
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "pw-record {} not linked after {LINK_TIMEOUT:?}; pw-link -l:\n{links}\nits log: {}",
                    self.name,
                    read_lossy(&self.log)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop recording (SIGTERM, so the WAV file is completed) and return the
    /// PCM data, in [`format`](Self::format).
    ///
    /// # Panics
    /// When pw-record does not exit or its file has no data chunk.
    pub fn stop(mut self) -> Vec<u8> {
        let child = self.child.take().expect("recording already stopped");
        let status = terminate(child, "pw-record", &self.log);
        let bytes = fs::read(&self.file).unwrap_or_else(|e| {
            panic!(
                "pw-record ({status}) left no file {}: {e}",
                self.file.display()
            )
        });
        let data = wav_data(&bytes).unwrap_or_else(|e| {
            panic!(
                "{}: {e}; pw-record ({status}) said: {}",
                self.file.display(),
                read_lossy(&self.log)
            )
        });
        let whole = data.len() - data.len() % self.format.frame_bytes();
        data[..whole].to_vec()
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running `pw-play`.
pub struct Feeder {
    child: Option<Child>,
    log: PathBuf,
    /// How long the file plays.
    length: Duration,
}

impl Feeder {
    /// Wait until everything has been played.
    ///
    /// # Panics
    /// When pw-play fails or takes longer than the data (with its padding)
    /// plus [`EXIT_TIMEOUT`], counted from this call.
    pub fn wait(mut self) {
        let mut child = self.child.take().expect("feeder already waited for");
        let deadline = Instant::now() + self.length + EXIT_TIMEOUT;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("pw-play did not finish in time: {}", read_lossy(&self.log));
                }
                Err(e) => panic!("cannot wait for pw-play: {e}"),
            }
        };
        assert!(
            status.success(),
            "pw-play failed ({status}): {}",
            read_lossy(&self.log)
        );
    }

    /// Stop playing now.
    pub fn stop(mut self) {
        if let Some(child) = self.child.take() {
            terminate(child, "pw-play", &self.log);
        }
    }
}

impl Drop for Feeder {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// SIGTERM `child`, wait up to [`EXIT_TIMEOUT`], then SIGKILL.
fn terminate(mut child: Child, what: &str, log: &Path) -> ExitStatus {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + EXIT_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{what} ignored SIGTERM for {EXIT_TIMEOUT:?}: {}",
                    read_lossy(log)
                );
            }
            Err(e) => panic!("cannot wait for {what}: {e}"),
        }
    }
}

fn check_output(what: &str, out: &Output) {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn log_file(path: &Path) -> Stdio {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Stdio::from)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
}

fn read_lossy(path: &Path) -> String {
    match fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) if e.kind() == ErrorKind::NotFound => "(no log)".into(),
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

fn find_in_path(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// A WAV file holding `data` in `format`.
pub fn wav_file(format: PcmFormat, data: &[u8]) -> Vec<u8> {
    let len = u32::try_from(data.len()).expect("PCM too long for a WAV file");
    let block = u16::try_from(format.frame_bytes()).expect("frame too large");
    let bits = u16::try_from(format.sample.bytes() * 8).expect("sample too large");
    let mut w = Vec::with_capacity(44 + data.len());
    w.extend_from_slice(b"RIFF");
    w.extend_from_slice(&(36 + len).to_le_bytes());
    w.extend_from_slice(b"WAVEfmt ");
    w.extend_from_slice(&16u32.to_le_bytes());
    w.extend_from_slice(&format.sample.wav_tag().to_le_bytes());
    w.extend_from_slice(&format.channels.to_le_bytes());
    w.extend_from_slice(&format.rate.to_le_bytes());
    w.extend_from_slice(&(format.rate * u32::from(block)).to_le_bytes());
    w.extend_from_slice(&block.to_le_bytes());
    w.extend_from_slice(&bits.to_le_bytes());
    w.extend_from_slice(b"data");
    w.extend_from_slice(&len.to_le_bytes());
    w.extend_from_slice(data);
    w
}

/// The contents of a WAV file's `data` chunk. A size of 0 or 0xFFFFFFFF, or
/// one past the end of the file (a recorder that did not finish the header),
/// means "up to the end of the file".
///
/// # Errors
/// When it is not a RIFF/WAVE file or has no data chunk.
pub fn wav_data(wav: &[u8]) -> Result<&[u8], String> {
    if wav.len() < 12 || &wav[0..4] != b"RIFF" || &wav[8..12] != b"WAVE" {
        return Err(format!("not a WAV file ({} bytes)", wav.len()));
    }
    let mut i = 12;
    while i + 8 <= wav.len() {
        let id = &wav[i..i + 4];
        let size = u32::from_le_bytes([wav[i + 4], wav[i + 5], wav[i + 6], wav[i + 7]]) as usize;
        let body = i + 8;
        if id == b"data" {
            let end = if size == 0 || size == 0xffff_ffff || body + size > wav.len() {
                wav.len()
            } else {
                body + size
            };
            return Ok(&wav[body..end]);
        }
        i = body + size + (size & 1);
    }
    Err("no data chunk".into())
}

/// Where `needle` first occurs in `haystack`.
pub fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Where the PCM `expected` occurs bit-exact in `recorded`, and whether
/// everything before and after it is silence (`silence` bytes).
pub fn find_pcm(recorded: &[u8], expected: &[u8], silence: u8) -> Option<(usize, bool)> {
    let at = find_bytes(recorded, expected)?;
    let quiet = recorded[..at]
        .iter()
        .chain(&recorded[at + expected.len()..])
        .all(|&b| b == silence);
    Some((at, quiet))
}
