//! `vsnd-bench compare`: vsnd and upstream vhost-device-sound on the same
//! workloads, through the same test frontend, in the same run, repetitions
//! interleaved (vsnd, upstream, vsnd, …) so that a disturbance of the machine
//! hits both.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vsnd_tests::fixture::PcmConfig;
use vsnd_tests::frontend::{Frontend, FrontendOptions};
use vsnd_tests::snd;

use crate::guest::{Guest, Pace, Res, Streams};
use crate::procfs;
use crate::stats::{self, Spread};
use crate::target::{Kind, Spec, Target};

/// Control requests timed per repetition (after [`RTT_WARMUP`]).
const RTT_WARMUP: usize = 200;
/// Playback buffers kept queued in the real-time runs (a 4-period buffer,
/// like the Linux driver with these parameters).
pub const RT_DEPTH: usize = 4;
/// Playback buffers kept queued in the unpaced throughput run.
const TPUT_DEPTH: usize = 16;

#[derive(Debug, Clone)]
pub struct Opts {
    pub reps: usize,
    pub duplex: Duration,
    pub rtt_requests: usize,
    pub throughput: Duration,
    pub upstream: Option<PathBuf>,
    pub broker: PathBuf,
    pub base: PathBuf,
}

/// One repetition of one implementation.
#[derive(Debug, Clone, Default)]
struct Rep {
    accept_ms: f64,
    ready_ms: f64,
    rtt_p50_us: f64,
    rtt_p99_us: f64,
    jitter_p50_us: Option<f64>,
    jitter_p99_us: Option<f64>,
    jitter_max_us: Option<f64>,
    xruns: Option<u64>,
    moved_back_us: f64,
    cpu_ms_per_s: f64,
    cpu_tx_ms_per_s: f64,
    /// The pacing floor (see floor.rs), measured next to vsnd's runs.
    floor_ms_per_s: Option<f64>,
    floor_tx_ms_per_s: Option<f64>,
    hwm_mib: f64,
    throughput_x: f64,
    load: String,
    memory: String,
}

/// The frontend every workload uses: EVENT_IDX on (as QEMU and Linux do).
pub fn frontend_options() -> FrontendOptions {
    FrontendOptions {
        event_idx: true,
        ..FrontendOptions::default()
    }
}

/// The stream ids of the first output and the first input stream, from
/// PCM_INFO.
pub fn find_streams(fe: &mut Frontend) -> Res<(u32, u32)> {
    let cfg = snd::Config::parse(fe.config_bytes()).map_err(|e| e.to_string())?;
    let n = cfg.streams;
    let resp = fe
        .control(
            &snd::query_info(snd::R_PCM_INFO, 0, n, snd::PCM_INFO_SIZE as u32),
            (snd::HDR_SIZE + n as usize * snd::PCM_INFO_SIZE) as u32,
        )
        .map_err(|e| format!("PCM_INFO: {e}"))?;
    let (st, items) = snd::split_info(&resp, snd::PCM_INFO_SIZE).map_err(|e| e.to_string())?;
    if st != snd::S_OK {
        return Err(format!("PCM_INFO: {}", snd::status_name(st)));
    }
    let mut out = None;
    let mut inp = None;
    for (i, it) in items.iter().enumerate() {
        let info = snd::PcmInfo::parse(it).map_err(|e| e.to_string())?;
        match info.direction {
            snd::D_OUTPUT if out.is_none() => out = Some(i as u32),
            snd::D_INPUT if inp.is_none() => inp = Some(i as u32),
            _ => {}
        }
    }
    match (out, inp) {
        (Some(o), Some(i)) => Ok((o, i)),
        _ => Err(format!(
            "need an output and an input stream, PCM_INFO has {items:?}"
        )),
    }
}

/// PCM_INFO round trips, µs each.
pub fn control_rtts(fe: &mut Frontend, n: usize) -> Res<Vec<f64>> {
    let req = snd::query_info(snd::R_PCM_INFO, 0, 1, snd::PCM_INFO_SIZE as u32);
    let len = (snd::HDR_SIZE + snd::PCM_INFO_SIZE) as u32;
    let mut v = Vec::with_capacity(n);
    for i in 0..RTT_WARMUP + n {
        let t = Instant::now();
        let resp = fe
            .control(&req, len)
            .map_err(|e| format!("PCM_INFO: {e}"))?;
        let us = t.elapsed().as_secs_f64() * 1e6;
        if snd::status(&resp).ok() != Some(snd::S_OK) {
            return Err(format!("PCM_INFO answered {resp:02x?}"));
        }
        if i >= RTT_WARMUP {
            v.push(us);
        }
    }
    Ok(v)
}

/// What a real-time run measured.
struct Rt {
    /// Peak and current resident memory by kind, per process.
    memory: String,
    cpu_ms_per_s: f64,
    hwm_mib: f64,
    jitter_p50_us: Option<f64>,
    jitter_p99_us: Option<f64>,
    jitter_max_us: Option<f64>,
    xruns: Option<u64>,
    moved_back_us: f64,
}

/// Play (and with `duplex`, record) in real time for `window` after 1 s of
/// warm-up; CPU of the target's processes over the window.
fn realtime(
    kind: Kind,
    target: &mut Target,
    mut fe: Frontend,
    duplex: bool,
    window: Duration,
) -> Res<Rt> {
    let cfg = PcmConfig::s16_stereo_48k(10);
    let (out_id, in_id) = find_streams(&mut fe)?;
    let pace = match kind {
        Kind::Vsnd => Pace::Device,
        Kind::Upstream => Pace::Frontend,
    };
    let mut g = Guest::new(
        fe,
        cfg,
        Streams {
            tx: Some((out_id, RT_DEPTH)),
            rx: duplex.then_some((in_id, RT_DEPTH)),
        },
        pace,
        0,
    )?;
    g.setup()?;
    g.prefill()?;
    g.start()?;
    g.run_until(Instant::now() + Duration::from_secs(1))?;
    g.reset_stats();
    let cpu0 = target.cpu_ns();
    let t0 = Instant::now();
    g.run_until(t0 + window)?;
    let cpu1 = target.cpu_ns();
    let secs = t0.elapsed().as_secs_f64();
    let memory = target
        .pids()
        .iter()
        .map(|&p| {
            let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
            let kib = |k: &str| procfs::status_kib(p, k).unwrap_or(0);
            format!(
                "{}: VmHWM {} KiB = anonymous {} + file-backed {} + shared {}",
                comm.trim(),
                kib("VmHWM"),
                kib("RssAnon"),
                kib("RssFile"),
                kib("RssShmem")
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let mut rt = Rt {
        memory,
        cpu_ms_per_s: cpu1.saturating_sub(cpu0) as f64 / 1e6 / secs,
        hwm_mib: target.hwm_kib() as f64 / 1024.0,
        jitter_p50_us: None,
        jitter_p99_us: None,
        jitter_max_us: None,
        xruns: None,
        moved_back_us: 0.0,
    };
    if kind == Kind::Vsnd {
        let tx = g.tx.as_ref().ok_or("no tx")?;
        rt.jitter_p50_us = stats::percentile(&tx.dev_us, 50.0);
        rt.jitter_p99_us = stats::percentile(&tx.dev_us, 99.0);
        rt.jitter_max_us = stats::max(&tx.dev_us);
        rt.xruns = Some(g.lanes().map(|l| l.late + l.bad).sum());
        rt.moved_back_us = tx.moved_back * 1e6;
    }
    Ok(rt)
}

fn run_rep(kind: Kind, paced: &Spec, unpaced: &Spec, o: &Opts, rep: usize) -> Res<Rep> {
    let cfg = PcmConfig::s16_stereo_48k(10);
    let mut r = Rep {
        load: procfs::loadavg(),
        ..Rep::default()
    };
    let fail = |what: &str, target: &mut Target, e: String| -> String {
        target.keep();
        format!("{} {what}: {e}\n{}", kind.name(), target.log_tail(30))
    };

    // Start-up, control round trip, then duplex in real time.
    let tag = format!("{}-{rep}", kind.name());
    let (mut target, mut fe, st) = Target::start(paced, &o.base, &tag, frontend_options())?;
    r.accept_ms = st.accept.as_secs_f64() * 1e3;
    r.ready_ms = st.ready.as_secs_f64() * 1e3;
    let rtts =
        control_rtts(&mut fe, o.rtt_requests).map_err(|e| fail("control", &mut target, e))?;
    r.rtt_p50_us = stats::percentile(&rtts, 50.0).unwrap_or(f64::NAN);
    r.rtt_p99_us = stats::percentile(&rtts, 99.0).unwrap_or(f64::NAN);
    let rt = realtime(kind, &mut target, fe, true, o.duplex)
        .map_err(|e| fail("duplex", &mut target, e))?;
    r.cpu_ms_per_s = rt.cpu_ms_per_s;
    r.hwm_mib = rt.hwm_mib;
    r.memory = rt.memory;
    r.jitter_p50_us = rt.jitter_p50_us;
    r.jitter_p99_us = rt.jitter_p99_us;
    r.jitter_max_us = rt.jitter_max_us;
    r.xruns = rt.xruns;
    r.moved_back_us = rt.moved_back_us;
    drop(target);

    // Playback only, in real time: the same work for both.
    let (mut target, fe, _) =
        Target::start(paced, &o.base, &format!("{tag}-tx"), frontend_options())?;
    let rt = realtime(kind, &mut target, fe, false, o.duplex)
        .map_err(|e| fail("playback", &mut target, e))?;
    r.cpu_tx_ms_per_s = rt.cpu_ms_per_s;
    drop(target);

    // What keeping real time costs here at the least, duplex and playback.
    if kind == Kind::Vsnd {
        r.floor_ms_per_s = Some(crate::floor::measure(o.duplex, true)?);
        r.floor_tx_ms_per_s = Some(crate::floor::measure(o.duplex, false)?);
    }

    // Unpaced throughput, playback only.
    let (mut target, mut fe, _) =
        Target::start(unpaced, &o.base, &format!("{tag}-tput"), frontend_options())?;
    let tput = (|| -> Res<f64> {
        let (out_id, _) = find_streams(&mut fe)?;
        let mut g = Guest::new(
            fe,
            cfg,
            Streams {
                tx: Some((out_id, TPUT_DEPTH)),
                rx: None,
            },
            Pace::Device,
            0,
        )?;
        g.setup()?;
        g.prefill()?;
        g.start()?;
        g.run_until(Instant::now() + Duration::from_millis(300))?;
        let c0 = g.completed();
        let t0 = Instant::now();
        g.run_until(t0 + o.throughput)?;
        let bytes = (g.completed() - c0) * u64::from(cfg.period_bytes);
        Ok(bytes as f64 / t0.elapsed().as_secs_f64() / cfg.bytes_per_second() as f64)
    })();
    r.throughput_x = tput.map_err(|e| fail("throughput", &mut target, e))?;
    Ok(r)
}

/// A table cell for one implementation.
enum Cell {
    Val(Spread),
    Na(&'static str),
}

struct Row {
    what: &'static str,
    vsnd: Cell,
    upstream: Cell,
    /// Lower is better (for the verdict and the ratio's reading).
    target: &'static str,
    /// (vsnd median, upstream median) → met?
    verdict: Option<fn(f64, Option<f64>) -> bool>,
    digits: Option<usize>,
}

fn cell(reps: &[Rep], f: impl Fn(&Rep) -> Option<f64>) -> Option<Spread> {
    let v: Vec<f64> = reps.iter().filter_map(&f).collect();
    Spread::of(&v)
}

/// Run the comparison and return the markdown report.
pub fn run(o: &Opts) -> Res<String> {
    let upstream = o.upstream.clone();
    let specs_v = (
        Spec::vsnd_null(&o.broker, false),
        Spec::vsnd_null(&o.broker, true),
    );
    let specs_u = upstream
        .as_deref()
        .map(|p| (Spec::upstream_null(p), Spec::upstream_null(p)));
    let load_start = procfs::loadavg();
    let started = Instant::now();
    let mut vs: Vec<Rep> = Vec::new();
    let mut us = Vec::new();
    let mut log = String::new();
    for rep in 0..o.reps {
        let r = run_rep(Kind::Vsnd, &specs_v.0, &specs_v.1, o, rep)?;
        let line = format!(
            "rep {rep} vsnd: load {} | accept {:.2} ms ready {:.2} ms | rtt p50 {:.1} p99 {:.1} µs | jitter p50 {:.0} p99 {:.0} max {:.0} µs (schedule moved back {:.0} µs), xruns {} | cpu duplex {:.2} playback {:.2} ms/s (pacing floor {:.2} / {:.2}) | hwm {:.1} MiB | {:.0}× real time",
            r.load, r.accept_ms, r.ready_ms, r.rtt_p50_us, r.rtt_p99_us,
            r.jitter_p50_us.unwrap_or(f64::NAN), r.jitter_p99_us.unwrap_or(f64::NAN),
            r.jitter_max_us.unwrap_or(f64::NAN), r.moved_back_us, r.xruns.unwrap_or(0),
            r.cpu_ms_per_s, r.cpu_tx_ms_per_s, r.floor_ms_per_s.unwrap_or(f64::NAN),
            r.floor_tx_ms_per_s.unwrap_or(f64::NAN), r.hwm_mib, r.throughput_x
        );
        eprintln!("{line}");
        log.push_str(&line);
        log.push('\n');
        vs.push(r);
        if let Some((p, u)) = &specs_u {
            let r = run_rep(Kind::Upstream, p, u, o, rep)?;
            let line = format!(
                "rep {rep} upstream: load {} | accept {:.2} ms ready {:.2} ms | rtt p50 {:.1} p99 {:.1} µs | cpu duplex {:.2} playback {:.2} ms/s | hwm {:.1} MiB | {:.0}× real time",
                r.load, r.accept_ms, r.ready_ms, r.rtt_p50_us, r.rtt_p99_us,
                r.cpu_ms_per_s, r.cpu_tx_ms_per_s, r.hwm_mib, r.throughput_x
            );
            eprintln!("{line}");
            log.push_str(&line);
            log.push('\n');
            us.push(r);
        }
    }
    let have_up = specs_u.is_some();
    let up = |f: fn(&Rep) -> Option<f64>| -> Cell {
        if !have_up {
            return Cell::Na("not run (--vsnd-only)");
        }
        cell(&us, f).map_or(Cell::Na("no data"), Cell::Val)
    };
    let vv = |f: fn(&Rep) -> Option<f64>| -> Cell {
        cell(&vs, f).map_or(Cell::Na("no data"), Cell::Val)
    };
    const NO_PACE: &str =
        "n/a: upstream does not pace (its null backend returns each playback buffer at once)";
    let rows = vec![
        Row {
            what: "control round trip PCM_INFO p50 (µs)",
            vsnd: vv(|r| Some(r.rtt_p50_us)),
            upstream: up(|r| Some(r.rtt_p50_us)),
            target: "≤ 1.5× upstream",
            verdict: Some(|v, u| u.is_none_or(|u| v <= 1.5 * u)),
            digits: Some(1),
        },
        Row {
            what: "control round trip PCM_INFO p99 (µs)",
            vsnd: vv(|r| Some(r.rtt_p99_us)),
            upstream: up(|r| Some(r.rtt_p99_us)),
            target: "≤ 1.5× upstream and ≤ 200 µs",
            verdict: Some(|v, u| v <= 200.0 && u.is_none_or(|u| v <= 1.5 * u)),
            digits: Some(1),
        },
        Row {
            what: "TX completion jitter p50 (µs)",
            vsnd: vv(|r| r.jitter_p50_us),
            upstream: Cell::Na(NO_PACE),
            target: "",
            verdict: None,
            digits: Some(0),
        },
        Row {
            what: "TX completion jitter p99 (µs)",
            vsnd: vv(|r| r.jitter_p99_us),
            upstream: Cell::Na(NO_PACE),
            target: "≤ 1000 µs",
            verdict: Some(|v, _| v <= 1000.0),
            digits: Some(0),
        },
        Row {
            what: "TX completion jitter max (µs)",
            vsnd: vv(|r| r.jitter_max_us),
            upstream: Cell::Na(NO_PACE),
            target: "",
            verdict: None,
            digits: Some(0),
        },
        Row {
            what: "xruns in the duplex run (count)",
            vsnd: vv(|r| r.xruns.map(|x| x as f64)),
            upstream: Cell::Na(NO_PACE),
            target: "0",
            verdict: Some(|v, _| v == 0.0),
            digits: Some(0),
        },
        Row {
            what: "host CPU per second of duplex audio (ms/s)",
            vsnd: vv(|r| Some(r.cpu_ms_per_s)),
            upstream: up(|r| Some(r.cpu_ms_per_s)),
            target: "≤ 1.0× upstream",
            verdict: Some(|v, u| u.is_none_or(|u| v <= u)),
            digits: Some(2),
        },
        Row {
            what: "host CPU per second of playback-only audio (ms/s; the same work for both)",
            vsnd: vv(|r| Some(r.cpu_tx_ms_per_s)),
            upstream: up(|r| Some(r.cpu_tx_ms_per_s)),
            target: "",
            verdict: None,
            digits: Some(2),
        },
        Row {
            what: "pacing floor per second of duplex (ms/s): a process that only sleeps on a \
                   10 ms timer and signals two eventfds (see below)",
            vsnd: vv(|r| r.floor_ms_per_s),
            upstream: Cell::Na(NO_PACE),
            target: "",
            verdict: None,
            digits: Some(2),
        },
        Row {
            what: "pacing floor per second of playback (ms/s): the same with one eventfd",
            vsnd: vv(|r| r.floor_tx_ms_per_s),
            upstream: Cell::Na(NO_PACE),
            target: "",
            verdict: None,
            digits: Some(2),
        },
        Row {
            what: "unpaced playback throughput (× real time)",
            vsnd: vv(|r| Some(r.throughput_x)),
            upstream: up(|r| Some(r.throughput_x)),
            target: "≥ 500×",
            verdict: Some(|v, _| v >= 500.0),
            digits: Some(0),
        },
        Row {
            what: "start-up until the socket accepts (ms)",
            vsnd: vv(|r| Some(r.accept_ms)),
            upstream: up(|r| Some(r.accept_ms)),
            target: "",
            verdict: None,
            digits: Some(2),
        },
        Row {
            what: "start-up until the vhost-user set-up is answered (ms)",
            vsnd: vv(|r| Some(r.ready_ms)),
            upstream: up(|r| Some(r.ready_ms)),
            target: "",
            verdict: None,
            digits: Some(2),
        },
        Row {
            what: "peak RSS (MiB; vsnd: broker + device)",
            vsnd: vv(|r| Some(r.hwm_mib)),
            upstream: up(|r| Some(r.hwm_mib)),
            target: "≤ 2× upstream",
            verdict: Some(|v, u| u.is_none_or(|u| v <= 2.0 * u)),
            digits: Some(1),
        },
    ];

    let mut md = String::new();
    md.push_str(&format!(
        "{} repetition(s), vsnd and upstream interleaved; median [min–max] over repetitions. \
         Duplex: 48 kHz stereo S16, 10 ms periods, {RT_DEPTH} periods queued per direction, {:.0} s \
         measured per repetition after 1 s of warm-up. Throughput: playback only, {TPUT_DEPTH} \
         periods queued, {:.1} s. Control: {} PCM_INFO requests after {RTT_WARMUP} of warm-up. \
         Load average (1/5/15 min) at start: {load_start}; at end: {}; run took {:.0} s.\n\n",
        o.reps,
        o.duplex.as_secs_f64(),
        o.throughput.as_secs_f64(),
        o.rtt_requests,
        procfs::loadavg(),
        started.elapsed().as_secs_f64(),
    ));
    md.push_str("| workload | vsnd | upstream 0.3.0 | vsnd/upstream | target | met |\n");
    md.push_str("|---|---|---|---|---|---|\n");
    for row in &rows {
        let show = |c: &Cell| match c {
            Cell::Val(s) => s.show(row.digits.unwrap_or_else(|| stats::auto_digits(s.median))),
            Cell::Na(why) => why.to_string(),
        };
        let (vm, um) = (
            match &row.vsnd {
                Cell::Val(s) => Some(s.median),
                Cell::Na(_) => None,
            },
            match &row.upstream {
                Cell::Val(s) => Some(s.median),
                Cell::Na(_) => None,
            },
        );
        let ratio = match (vm, um) {
            (Some(v), Some(u)) if u != 0.0 => format!("{:.2}", v / u),
            (Some(_), Some(_)) => "∞".into(),
            _ => "—".into(),
        };
        let met = match (row.verdict, vm) {
            (Some(f), Some(v)) => {
                if f(v, um) {
                    "yes"
                } else {
                    "**no**"
                }
            }
            _ => "",
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            row.what,
            show(&row.vsnd),
            show(&row.upstream),
            ratio,
            row.target,
            met
        ));
    }
    md.push_str(
        "\nUpstream's duplex run: the frontend submits one playback period every 10 ms by its \
         own clock (upstream returns each at once) and keeps 4 capture buffers queued (its null \
         backend never returns them), so upstream does less work there than vsnd, which paces \
         and answers both directions.\n",
    );
    md.push_str(
        "\nResident memory at the end of the last duplex run (RSS split by /proc/PID/status \
         into anonymous, file-backed — code of the program and its libraries — and shared):\n\n",
    );
    for (name, reps) in [("vsnd", &vs), ("upstream", &us)] {
        if let Some(r) = reps.last() {
            md.push_str(&format!("* {name}: {}\n", r.memory));
        }
    }
    md.push_str("\nPer repetition:\n\n```\n");
    md.push_str(&log);
    md.push_str("```\n");
    Ok(md)
}

/// The default place `scripts/bench-setup` installs upstream into.
pub const DEFAULT_UPSTREAM_ROOT: &str = "/var/cache/vsnd-bench/upstream";

/// Where upstream's binary is: `--upstream`, `$UPSTREAM_VHOST_DEVICE_SOUND`,
/// or the default root.
pub fn find_upstream(flag: Option<&Path>) -> Res<PathBuf> {
    let p = match flag {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("UPSTREAM_VHOST_DEVICE_SOUND") {
            Some(p) => PathBuf::from(p),
            None => Path::new(DEFAULT_UPSTREAM_ROOT).join("bin/vhost-device-sound"),
        },
    };
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "upstream vhost-device-sound not found at {}: run scripts/bench-setup (or pass \
             --upstream PATH, or --vsnd-only)",
            p.display()
        ))
    }
}
