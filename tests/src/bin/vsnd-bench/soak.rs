//! `vsnd-bench soak`: a long duplex run through the file backend, so every
//! played byte can be checked, with the microphone gate flipped through the
//! control socket every few seconds and the device killed (SIGKILL) once
//! half-way; the frontend reconnects like a VM would. Samples the broker's
//! and the device's RSS and descriptor counts; fails if anything grows, if
//! bytes are lost outside the deliberate kill, if a capture buffer carries
//! host samples while input is off, or on any xrun.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use vsnd_tests::fixture::{pcm_pattern, PcmConfig};
use vsnd_tests::frontend::Frontend;

use crate::compare::{find_streams, frontend_options, RT_DEPTH};
use crate::guest::{Guest, Pace, Res, Streams};
use crate::procfs;
use crate::stats;
use crate::target::{Kind, Spec, Target};

/// RSS growth (KiB) over the run that counts as growth.
const RSS_GROWTH_KIB: u64 = 1024;
/// A capture buffer that comes back this long after input was turned off
/// must be silence (the flag takes effect within one period; one more for
/// the buffer already on its way).
const GATE_SLACK: Duration = Duration::from_millis(20);
/// Size of the capture file (not a multiple of the period).
const CAPTURE_BYTES: usize = 48_000 * 4 + 1_004;

#[derive(Debug, Clone)]
pub struct Opts {
    pub duration: Duration,
    pub flip_every: Duration,
    pub sample_every: Duration,
    pub kill_at: Option<Duration>,
    pub broker: PathBuf,
}

#[derive(Debug, Clone)]
struct Sample {
    t: f64,
    broker_rss: u64,
    broker_fds: usize,
    device: Option<u32>,
    device_rss: u64,
    device_fds: usize,
    load: String,
}

fn sample(broker: u32, t0: Instant) -> Sample {
    let device = procfs::children(broker).last().copied();
    Sample {
        t: t0.elapsed().as_secs_f64(),
        broker_rss: procfs::rss_kib(broker).unwrap_or(0),
        broker_fds: procfs::fd_count(broker).unwrap_or(0),
        device,
        device_rss: device.and_then(procfs::rss_kib).unwrap_or(0),
        device_fds: device.and_then(procfs::fd_count).unwrap_or(0),
        load: procfs::loadavg(),
    }
}

/// One control-socket request; the answer line.
fn control(path: &Path, line: &str) -> Res<String> {
    let mut s = UnixStream::connect(path).map_err(|e| format!("control socket: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("control socket: {e}"))?;
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .map_err(|e| format!("control socket: {e}"))?;
    Ok(answer.trim_end().to_owned())
}

/// What the guests measured, added up over the reconnect.
#[derive(Default)]
struct Totals {
    tx_dev: Vec<f64>,
    rx_dev: Vec<f64>,
    tx_late: u64,
    rx_late: u64,
    tx_bad: u64,
    rx_bad: u64,
    completed: u64,
    rx_log: Vec<(Instant, bool)>,
}

impl Totals {
    fn add(&mut self, g: &mut Guest) {
        if let Some(tx) = g.tx.as_mut() {
            self.tx_dev.append(&mut tx.dev_us);
            self.tx_late += tx.late;
            self.tx_bad += tx.bad;
        }
        if let Some(rx) = g.rx.as_mut() {
            self.rx_dev.append(&mut rx.dev_us);
            self.rx_late += rx.late;
            self.rx_bad += rx.bad;
            if let Some(log) = rx.rx_log.as_mut() {
                self.rx_log.append(log);
            }
        }
        self.completed += g.completed();
    }
}

fn new_guest(fe: Frontend, first_seq: u64) -> Res<Guest> {
    let mut fe = fe;
    let (out_id, in_id) = find_streams(&mut fe)?;
    let mut g = Guest::new(
        fe,
        PcmConfig::s16_stereo_48k(10),
        Streams {
            tx: Some((out_id, RT_DEPTH)),
            rx: Some((in_id, RT_DEPTH)),
        },
        Pace::Device,
        first_seq,
    )?;
    if let Some(rx) = g.rx.as_mut() {
        rx.rx_log = Some(Vec::new());
    }
    g.setup()?;
    g.prefill()?;
    g.start()?;
    Ok(g)
}

/// What the played file says: (complete buffers found, buffers missing
/// outside `allowed`, bytes missing outside `allowed`, order errors,
/// buffers of `allowed` missing or partial).
struct Played {
    complete: u64,
    missing: Vec<u64>,
    lost_bytes: u64,
    disorder: u64,
    allowed_hit: u64,
}

fn check_played(bytes: &[u8], submitted: u64, allowed: &BTreeSet<u64>, period: u32) -> Played {
    let words_per = u64::from(period / 4);
    // Run-length: (seq, frames).
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for w in bytes.chunks_exact(4) {
        let v = u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        match runs.last_mut() {
            Some((s, n)) if *s == v => *n += 1,
            _ => runs.push((v, 1)),
        }
    }
    let mut p = Played {
        complete: 0,
        missing: Vec::new(),
        lost_bytes: 0,
        disorder: 0,
        allowed_hit: 0,
    };
    let mut frames = vec![0u64; submitted as usize];
    let mut last: Option<u64> = None;
    for &(s, n) in &runs {
        if last.is_some_and(|l| s <= l) || s >= submitted {
            p.disorder += 1;
        }
        last = Some(s);
        if let Some(f) = frames.get_mut(s as usize) {
            *f += n;
        }
    }
    for (s, &f) in frames.iter().enumerate() {
        let s = s as u64;
        if f == words_per {
            p.complete += 1;
        } else if allowed.contains(&s) {
            p.allowed_hit += 1;
        } else {
            p.missing.push(s);
            p.lost_bytes += words_per.saturating_sub(f) * 4;
        }
    }
    // Trailing bytes that are not a whole frame.
    p.lost_bytes += (bytes.len() % 4) as u64;
    p
}

/// Run the soak; (markdown report, passed).
pub fn run(o: &Opts) -> Res<(String, bool)> {
    let base = std::env::temp_dir().join(format!("vsnd-bench-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
    let capture = pcm_pattern(0x50A4, CAPTURE_BYTES);
    // The pattern may hold zero bytes but never a silent period.
    let spec = Spec {
        kind: Kind::Vsnd,
        program: o.broker.clone(),
        extra_args: [
            "--backend",
            "file",
            "--playback-file",
            "{dir}/played.raw",
            "--capture-file",
            "{dir}/capture.raw",
            "--initial-streams",
            "output,input",
            "--control-socket",
            "{dir}/control.sock",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        rust_log: "info".into(),
        files: vec![("capture.raw".into(), capture)],
    };
    let load_start = procfs::loadavg();
    let (mut target, fe, _) = Target::start(&spec, &base, "soak", frontend_options())?;
    let dir = target.dir().to_path_buf();
    let ctl = dir.join("control.sock");
    let broker = target.pid();
    let t0 = Instant::now();
    let end = t0 + o.duration;
    let kill_at = t0 + o.kill_at.unwrap_or(o.duration / 2);

    let stop = Arc::new(AtomicBool::new(false));
    // (sent, answered, input on after it)
    let flips: Arc<Mutex<Vec<(Instant, Instant, bool)>>> = Arc::default();
    let flip_errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let gate_thread = {
        let (stop, flips, errs, ctl, every) = (
            stop.clone(),
            flips.clone(),
            flip_errors.clone(),
            ctl.clone(),
            o.flip_every,
        );
        std::thread::spawn(move || {
            let mut on = true;
            let mut next = Instant::now() + every;
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                next += every;
                on = !on;
                let sent = Instant::now();
                let want = format!("SET input {}", if on { "on" } else { "off" });
                match control(&ctl, &want) {
                    Ok(a) if a.contains(if on { "input=on" } else { "input=off" }) => {
                        flips.lock().unwrap().push((sent, Instant::now(), on))
                    }
                    Ok(a) => errs.lock().unwrap().push(format!("{want}: {a}")),
                    Err(e) => errs.lock().unwrap().push(format!("{want}: {e}")),
                }
            }
        })
    };
    let samples: Arc<Mutex<Vec<Sample>>> = Arc::default();
    let sampler = {
        let (stop, samples, every) = (stop.clone(), samples.clone(), o.sample_every);
        std::thread::spawn(move || {
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                if Instant::now() >= next {
                    samples.lock().unwrap().push(sample(broker, t0));
                    next += every;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };

    let mut totals = Totals::default();
    let mut allowed = BTreeSet::new();
    let mut notes = Vec::new();
    let result = (|| -> Res<u64> {
        let mut g = new_guest(fe, 0)?;
        g.run_until(kill_at)?;
        // The deliberate kill.
        let lost: Vec<u64> =
            g.tx.as_ref()
                .map(|t| t.in_flight_seqs())
                .unwrap_or_default();
        let next_seq = g.tx.as_ref().map_or(0, |t| t.next_seq);
        let dev = target
            .device_pid()
            .ok_or("no device to kill (the broker has no child)")?;
        kill(Pid::from_raw(dev as i32), Signal::SIGKILL).map_err(|e| e.to_string())?;
        let killed = Instant::now();
        totals.add(&mut g);
        drop(g);
        allowed.extend(lost.iter().copied());
        let fe = Frontend::connect(target.socket(), frontend_options())
            .map_err(|e| format!("reconnecting after the kill: {e}"))?;
        let mut g = new_guest(fe, next_seq)?;
        notes.push(format!(
            "device {dev} killed (SIGKILL) at {:.1} s with {} playback buffers queued (seq {:?}); \
             the frontend reconnected and restarted its streams {:.0} ms later (device {})",
            killed.duration_since(t0).as_secs_f64(),
            lost.len(),
            lost,
            killed.elapsed().as_secs_f64() * 1e3,
            target.device_pid().map_or("?".into(), |p| p.to_string()),
        ));
        g.run_until(end)?;
        let tail: Vec<u64> =
            g.tx.as_ref()
                .map(|t| t.in_flight_seqs())
                .unwrap_or_default();
        allowed.extend(tail);
        let submitted = g.tx.as_ref().map_or(0, |t| t.next_seq);
        totals.add(&mut g);
        // The last sample while the guest is still connected.
        stop.store(true, Ordering::Relaxed);
        samples.lock().unwrap().push(sample(broker, t0));
        drop(g);
        Ok(submitted)
    })();
    stop.store(true, Ordering::Relaxed);
    let _ = gate_thread.join();
    let _ = sampler.join();
    let samples = samples.lock().unwrap().clone();
    let submitted = match result {
        Ok(s) => s,
        Err(e) => {
            target.keep();
            return Err(format!("soak: {e}\n{}", target.log_tail(40)));
        }
    };
    let played = std::fs::read(dir.join("played.raw")).map_err(|e| e.to_string())?;
    let period = PcmConfig::s16_stereo_48k(10).period_bytes;
    let pc = check_played(&played, submitted, &allowed, period);

    // Capture buffers with host samples while input was off.
    let flips = flips.lock().unwrap().clone();
    let leaked = totals
        .rx_log
        .iter()
        .filter(|&&(t, nonsilent)| {
            if !nonsilent {
                return false;
            }
            // The last flip answered before t - slack, and no "on" sent since.
            let off_since = flips
                .iter()
                .rev()
                .find(|f| f.1 + GATE_SLACK <= t)
                .is_some_and(|f| !f.2);
            let on_sent_since = flips
                .iter()
                .any(|f| f.2 && f.0 <= t && f.1 + GATE_SLACK > t);
            off_since && !on_sent_since
        })
        .count();
    let nonsilent = totals.rx_log.iter().filter(|x| x.1).count();

    // Growth: the least of the last three samples against the least of the
    // first three after warm-up (a control-socket client of the gate thread
    // may hold one more descriptor at any single sample).
    let warm = o.duration.as_secs_f64().min(600.0) / 10.0;
    let after: Vec<&Sample> = samples.iter().filter(|s| s.t >= warm).collect();
    let mut growth = Vec::new();
    let first3 = |v: &[&Sample], f: fn(&Sample) -> u64| v.iter().take(3).map(|s| f(s)).min();
    let last3 = |v: &[&Sample], f: fn(&Sample) -> u64| v.iter().rev().take(3).map(|s| f(s)).min();
    if let (Some(a), Some(b)) = (
        first3(&after, |s| s.broker_rss),
        last3(&after, |s| s.broker_rss),
    ) {
        if b > a + RSS_GROWTH_KIB {
            growth.push(format!("broker RSS grew from {a} to {b} KiB"));
        }
    }
    if let (Some(a), Some(b)) = (
        first3(&after, |s| s.broker_fds as u64),
        last3(&after, |s| s.broker_fds as u64),
    ) {
        if b > a {
            growth.push(format!("broker fds grew from {a} to {b}"));
        }
    }
    let mut devices: Vec<u32> = samples.iter().filter_map(|s| s.device).collect();
    devices.dedup();
    let mut device_fds = Vec::new();
    for d in &devices {
        // Skip each device's first sample (it may still be setting up).
        let mine: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.device == Some(*d))
            .skip(1)
            .collect();
        if let (Some(a), Some(b)) = (
            first3(&mine, |s| s.device_rss),
            last3(&mine, |s| s.device_rss),
        ) {
            if b > a + RSS_GROWTH_KIB {
                growth.push(format!("device {d} RSS grew from {a} to {b} KiB"));
            }
        }
        if let (Some(a), Some(b)) = (
            first3(&mine, |s| s.device_fds as u64),
            last3(&mine, |s| s.device_fds as u64),
        ) {
            device_fds.push(b);
            if b > a {
                growth.push(format!("device {d} fds grew from {a} to {b}"));
            }
        }
    }
    if device_fds.windows(2).any(|w| w[1] > w[0]) {
        growth.push(format!(
            "the restarted device has more fds than the first: {device_fds:?}"
        ));
    }
    let flip_errors = flip_errors.lock().unwrap().clone();
    let xruns = totals.tx_late + totals.rx_late + totals.tx_bad + totals.rx_bad;
    let ok = growth.is_empty()
        && pc.missing.is_empty()
        && pc.lost_bytes == 0
        && pc.disorder == 0
        && leaked == 0
        && xruns == 0
        && flip_errors.is_empty();
    if !ok {
        target.keep();
    }
    let load_end = procfs::loadavg();
    drop(target);
    if ok {
        let _ = std::fs::remove_dir_all(&base);
    }

    let p99 = |v: &[f64]| stats::percentile(v, 99.0).unwrap_or(f64::NAN);
    let mx = |v: &[f64]| stats::max(v).unwrap_or(f64::NAN);
    let mut md = String::new();
    md.push_str(&format!(
        "{:.0} s of duplex (48 kHz stereo S16, 10 ms periods, {RT_DEPTH} queued per direction) \
         through `--backend file`; input gate flipped through the control socket every {:.0} s; \
         the device killed once. Load average at start: {load_start}; at end: {load_end}.\n\n",
        o.duration.as_secs_f64(),
        o.flip_every.as_secs_f64(),
    ));
    for n in &notes {
        md.push_str(&format!("* {n}\n"));
    }
    md.push_str("\n| check | result |\n|---|---|\n");
    md.push_str(&format!(
        "| playback buffers submitted / found complete in the played file | {submitted} / {} |\n",
        pc.complete
    ));
    md.push_str(&format!(
        "| buffers queued at the kill or at the end, missing or partial (allowed) | {} of {} |\n",
        pc.allowed_hit,
        allowed.len()
    ));
    md.push_str(&format!(
        "| **gaps in the played bytes outside the kill** | **{} buffers, {} bytes**{} |\n",
        pc.missing.len(),
        pc.lost_bytes,
        if pc.missing.is_empty() {
            String::new()
        } else {
            format!(" (first: {:?})", &pc.missing[..pc.missing.len().min(10)])
        }
    ));
    md.push_str(&format!(
        "| out-of-order or unknown runs in the played file | {} |\n",
        pc.disorder
    ));
    md.push_str(&format!(
        "| **xruns** | **{xruns}** (TX late {}, RX late {}, RX short/error {}, TX error {}) |\n",
        totals.tx_late, totals.rx_late, totals.rx_bad, totals.tx_bad
    ));
    md.push_str(&format!(
        "| TX / RX completion jitter p99 (max) | {:.0} ({:.0}) / {:.0} ({:.0}) µs |\n",
        p99(&totals.tx_dev),
        mx(&totals.tx_dev),
        p99(&totals.rx_dev),
        mx(&totals.rx_dev)
    ));
    md.push_str(&format!(
        "| gate flips done / failed | {} / {} |\n",
        flips.len(),
        flip_errors.len()
    ));
    md.push_str(&format!(
        "| **capture buffers with host samples while input was off** | **{leaked}** (of {} capture buffers, {nonsilent} with host samples) |\n",
        totals.rx_log.len()
    ));
    md.push_str(&format!(
        "| **growth (RSS > {RSS_GROWTH_KIB} KiB or any fd) after {warm:.0} s of warm-up** | **{}** |\n",
        if growth.is_empty() {
            "none".to_string()
        } else {
            growth.join("; ")
        }
    ));
    md.push_str(&format!(
        "| verdict | {} |\n",
        if ok { "PASS" } else { "**FAIL**" }
    ));
    md.push_str("\nRSS and descriptors over time:\n\n");
    md.push_str("| t (s) | broker RSS (KiB) | broker fds | device pid | device RSS (KiB) | device fds | load |\n");
    md.push_str("|---|---|---|---|---|---|---|\n");
    // At most ~25 rows: every n-th sample, plus the last.
    let step = samples.len().div_ceil(25).max(1);
    for (i, s) in samples.iter().enumerate() {
        if i % step == 0 || i + 1 == samples.len() {
            md.push_str(&format!(
                "| {:.0} | {} | {} | {} | {} | {} | {} |\n",
                s.t,
                s.broker_rss,
                s.broker_fds,
                s.device.map_or("—".into(), |d| d.to_string()),
                s.device_rss,
                s.device_fds,
                s.load
            ));
        }
    }
    for e in &flip_errors {
        md.push_str(&format!("\ngate flip error: {e}\n"));
    }
    md.push_str(
        "\nAn xrun is a buffer that came back more than one period (10 ms) later than its place \
         on the ideal schedule (re-anchored after each late buffer), or a capture buffer that \
         came back short or with an error status. Playback buffer k carries k in every frame, \
         so the played file shows exactly which bytes arrived.\n",
    );
    Ok((md, ok))
}
