//! vsnd-bench: measures vsnd through the Rust vhost-user test frontend.
//!
//! ```text
//! vsnd-bench compare [--reps N] [--duplex SECS] [--rtt N] [--throughput SECS]
//!                    [--upstream PATH | --vsnd-only] [--quick] [--out FILE]
//! vsnd-bench scale   [--brokers N] [--duration SECS]
//! vsnd-bench soak    [--duration SECS] [--flip-every SECS] [--sample-every SECS]
//! ```
//!
//! * `compare` — vsnd and upstream vhost-device-sound 0.3.0 (null backends)
//!   on the same workloads in the same run; prints a markdown table.
//! * `scale` — N brokers (null backend), each with its own frontend playing
//!   and recording in real time; total CPU, per-stream jitter, xruns.
//! * `soak` — duplex through the file backend for a long time, the
//!   microphone gate flipped, the device killed once; checks every played
//!   byte, RSS and descriptor counts. Exits 1 if anything grew or was lost.
//!
//! `VSND_BENCH_RUST_LOG` sets the programs' `RUST_LOG` (default `warn`);
//! `VSND_BENCH_KEEP` keeps their directories and logs under the temp dir.
//!
//! Build with `cargo build --release --workspace --bins` (the bench runs the
//! `vsnd-broker` next to itself); `scripts/bench-setup` also installs
//! upstream. Numbers from a debug build mean nothing.

mod compare;
mod floor;
mod guest;
mod procfs;
mod scale;
mod soak;
mod stats;
mod target;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "usage:
  vsnd-bench compare [--reps N] [--duplex SECS] [--rtt N] [--throughput SECS]
                     [--upstream PATH | --vsnd-only] [--quick] [--out FILE]
  vsnd-bench scale   [--brokers N] [--duration SECS] [--out FILE]
  vsnd-bench soak    [--duration SECS] [--flip-every SECS] [--sample-every SECS]
                     [--kill-at SECS] [--out FILE]";

struct Args {
    cmd: String,
    rest: Vec<String>,
}

impl Args {
    fn flag(&mut self, name: &str) -> bool {
        match self.rest.iter().position(|a| a == name) {
            Some(i) => {
                self.rest.remove(i);
                true
            }
            None => false,
        }
    }

    fn value(&mut self, name: &str) -> Result<Option<String>, String> {
        match self.rest.iter().position(|a| a == name) {
            Some(i) => {
                if i + 1 >= self.rest.len() {
                    return Err(format!("{name} needs a value"));
                }
                let v = self.rest.remove(i + 1);
                self.rest.remove(i);
                Ok(Some(v))
            }
            None => Ok(None),
        }
    }

    fn num<T: std::str::FromStr>(&mut self, name: &str) -> Result<Option<T>, String> {
        match self.value(name)? {
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|_| format!("{name}: not a number: {v:?}")),
            None => Ok(None),
        }
    }

    fn secs(&mut self, name: &str) -> Result<Option<Duration>, String> {
        Ok(self
            .num::<f64>(name)?
            .filter(|s| *s > 0.0)
            .map(Duration::from_secs_f64))
    }

    fn done(&self) -> Result<(), String> {
        match self.rest.first() {
            Some(a) => Err(format!("unknown argument {a:?}")),
            None => Ok(()),
        }
    }
}

fn scratch_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vsnd-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let _ = std::fs::create_dir_all(&d);
    d
}

/// Remove a scratch directory, unless `$VSND_BENCH_KEEP` asks to keep the
/// programs' logs.
fn clean(dir: &std::path::Path) {
    if std::env::var_os("VSND_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn emit(report: &str, out: Option<String>) -> Result<(), String> {
    println!("{report}");
    if let Some(path) = out {
        std::fs::write(&path, report).map_err(|e| format!("cannot write {path}: {e}"))?;
    }
    Ok(())
}

fn real_main() -> Result<bool, String> {
    let mut argv = std::env::args().skip(1);
    let cmd = argv.next().ok_or(USAGE)?;
    let mut a = Args {
        cmd,
        rest: argv.collect(),
    };
    let broker = vsnd_tests::bin_path("vsnd-broker");
    match a.cmd.clone().as_str() {
        "compare" => {
            let quick = a.flag("--quick");
            let vsnd_only = a.flag("--vsnd-only");
            let upstream_flag = a.value("--upstream")?.map(PathBuf::from);
            let mut o = compare::Opts {
                reps: if quick { 1 } else { 3 },
                duplex: Duration::from_secs(if quick { 3 } else { 30 }),
                rtt_requests: if quick { 500 } else { 5000 },
                throughput: Duration::from_secs(if quick { 1 } else { 5 }),
                upstream: None,
                broker,
                base: scratch_dir("compare"),
            };
            if let Some(n) = a.num("--reps")? {
                o.reps = n;
            }
            if let Some(d) = a.secs("--duplex")? {
                o.duplex = d;
            }
            if let Some(n) = a.num("--rtt")? {
                o.rtt_requests = n;
            }
            if let Some(d) = a.secs("--throughput")? {
                o.throughput = d;
            }
            let out = a.value("--out")?;
            a.done()?;
            if !vsnd_only {
                o.upstream = Some(compare::find_upstream(upstream_flag.as_deref())?);
            }
            let report = compare::run(&o);
            clean(&o.base);
            emit(&report?, out)?;
            Ok(true)
        }
        "scale" => {
            let mut o = scale::Opts {
                brokers: 32,
                duration: Duration::from_secs(60),
                broker,
                base: scratch_dir("scale"),
            };
            if let Some(n) = a.num("--brokers")? {
                o.brokers = n;
            }
            if let Some(d) = a.secs("--duration")? {
                o.duration = d;
            }
            let out = a.value("--out")?;
            a.done()?;
            let report = scale::run(&o);
            clean(&o.base);
            let (report, ok) = report?;
            emit(&report, out)?;
            Ok(ok)
        }
        "soak" => {
            let mut o = soak::Opts {
                duration: Duration::from_secs(600),
                flip_every: Duration::from_secs(3),
                sample_every: Duration::from_secs(10),
                kill_at: None,
                broker,
            };
            if let Some(d) = a.secs("--duration")? {
                o.duration = d;
            }
            if let Some(d) = a.secs("--flip-every")? {
                o.flip_every = d;
            }
            if let Some(d) = a.secs("--sample-every")? {
                o.sample_every = d;
            }
            o.kill_at = a.secs("--kill-at")?;
            let out = a.value("--out")?;
            a.done()?;
            let (report, ok) = soak::run(&o)?;
            emit(&report, out)?;
            Ok(ok)
        }
        // Internal: the child process of the pacing floor (see floor.rs).
        "floor-child" => {
            floor::child(&a.rest)?;
            Ok(true)
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(true)
        }
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("vsnd-bench: FAILED (see the report)");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vsnd-bench: {e}");
            ExitCode::from(2)
        }
    }
}
