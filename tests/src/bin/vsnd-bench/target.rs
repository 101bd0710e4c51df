//! The programs under test: vsnd (broker + device) or upstream
//! vhost-device-sound, each started in a private directory, timed until its
//! socket accepts and until the vhost-user handshake is done, and stopped by
//! its own pid.

use std::fs::{self, File};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vsnd_tests::frontend::{Frontend, FrontendOptions};

use crate::procfs;

/// How long a program may take to accept its first connection.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a program gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Which implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Vsnd,
    Upstream,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Vsnd => "vsnd",
            Kind::Upstream => "upstream",
        }
    }
}

/// How to start one.
#[derive(Debug, Clone)]
pub struct Spec {
    pub kind: Kind,
    /// The vsnd-broker or vhost-device-sound executable.
    pub program: PathBuf,
    /// More arguments (vsnd: backend, control socket, …).
    pub extra_args: Vec<String>,
    /// `RUST_LOG`.
    pub rust_log: String,
    /// Files written into the private directory before the start: (name,
    /// contents). `{dir}` in `extra_args` stands for that directory.
    pub files: Vec<(String, Vec<u8>)>,
}

impl Spec {
    /// vsnd with the null backend and both directions on.
    pub fn vsnd_null(broker: &Path, unpaced: bool) -> Spec {
        let mut extra_args = vec![
            "--backend".into(),
            "null".into(),
            "--initial-streams".into(),
            "output,input".into(),
        ];
        if unpaced {
            extra_args.push("--unpaced-for-benchmark".into());
        }
        Spec {
            kind: Kind::Vsnd,
            program: broker.to_path_buf(),
            extra_args,
            rust_log: default_log(),
            files: Vec::new(),
        }
    }

    /// Upstream with its null backend.
    pub fn upstream_null(program: &Path) -> Spec {
        Spec {
            kind: Kind::Upstream,
            program: program.to_path_buf(),
            extra_args: vec!["--backend".into(), "null".into()],
            rust_log: default_log(),
            files: Vec::new(),
        }
    }
}

/// `RUST_LOG` of the programs under test: `$VSND_BENCH_RUST_LOG`, else
/// `warn` (logging must not cost time in a measurement).
pub fn default_log() -> String {
    std::env::var("VSND_BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into())
}

/// Keep every program's directory and log (`$VSND_BENCH_KEEP` set).
fn keep_all() -> bool {
    std::env::var_os("VSND_BENCH_KEEP").is_some()
}

/// How long start-up took.
#[derive(Debug, Clone, Copy)]
pub struct Startup {
    /// From spawn until `connect()` on the socket succeeded.
    pub accept: Duration,
    /// From spawn until the vhost-user handshake and queue set-up finished
    /// (the device answered every request of [`Frontend::connect`]).
    pub ready: Duration,
}

/// A running program.
pub struct Target {
    pub kind: Kind,
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
    keep: bool,
}

impl Target {
    /// Start `spec` in a fresh directory under `base`, wait until its socket
    /// accepts, and connect a frontend with `opts` over that very
    /// connection (so the first connection is the one that is served).
    pub fn start(
        spec: &Spec,
        base: &Path,
        tag: &str,
        opts: FrontendOptions,
    ) -> Result<(Target, Frontend, Startup), String> {
        let dir = base.join(tag);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let socket = dir.join("snd.sock");
        for (name, contents) in &spec.files {
            fs::write(dir.join(name), contents)
                .map_err(|e| format!("cannot write {name} in {}: {e}", dir.display()))?;
        }
        let log = File::create(dir.join("stderr.log")).map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&spec.program);
        cmd.arg("--socket")
            .arg(&socket)
            .args(
                spec.extra_args
                    .iter()
                    .map(|a| a.replace("{dir}", &dir.to_string_lossy())),
            )
            .env("RUST_LOG", &spec.rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        let t0 = Instant::now();
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", spec.program.display()))?;
        let mut target = Target {
            kind: spec.kind,
            child: Some(child),
            dir,
            socket,
            keep: false,
        };
        let stream = loop {
            match UnixStream::connect(&target.socket) {
                Ok(s) => break s,
                Err(_) if t0.elapsed() < START_TIMEOUT => {
                    if let Some(st) = target
                        .child
                        .as_mut()
                        .and_then(|c| c.try_wait().ok().flatten())
                    {
                        target.keep = true;
                        return Err(format!(
                            "{} exited at start ({st}); see {}",
                            spec.kind.name(),
                            target.dir.display()
                        ));
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(e) => {
                    target.keep = true;
                    return Err(format!(
                        "{} did not accept on {} within {START_TIMEOUT:?}: {e}",
                        spec.kind.name(),
                        target.socket.display()
                    ));
                }
            }
        };
        let accept = t0.elapsed();
        let fe = Frontend::from_stream(stream, &target.socket, opts).map_err(|e| {
            target.keep = true;
            format!("{}: vhost-user set-up failed: {e}", spec.kind.name())
        })?;
        let ready = t0.elapsed();
        Ok((target, fe, Startup { accept, ready }))
    }

    /// The socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The private directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The main process (vsnd: the broker).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Every process that does the work: vsnd's broker and its device(s),
    /// or upstream's one process.
    pub fn pids(&self) -> Vec<u32> {
        let pid = self.pid();
        let mut v = vec![pid];
        if self.kind == Kind::Vsnd {
            v.extend(procfs::children(pid));
        }
        v
    }

    /// vsnd's current device.
    pub fn device_pid(&self) -> Option<u32> {
        procfs::children(self.pid()).last().copied()
    }

    /// Summed CPU time of [`Target::pids`], ns.
    pub fn cpu_ns(&self) -> u64 {
        self.pids().iter().filter_map(|&p| procfs::cpu_ns(p)).sum()
    }

    /// Summed peak RSS of [`Target::pids`], KiB.
    pub fn hwm_kib(&self) -> u64 {
        self.pids().iter().filter_map(|&p| procfs::hwm_kib(p)).sum()
    }

    /// Keep the directory (and its logs) after stopping.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// The end of the program's stderr.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            vsnd_tests::process::terminate(&mut child, STOP_GRACE);
        }
        if self.keep || keep_all() {
            eprintln!("kept {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
