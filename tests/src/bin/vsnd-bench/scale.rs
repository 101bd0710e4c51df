//! `vsnd-bench scale`: N brokers (null backend) on one machine, each serving
//! its own test frontend that plays and records in real time; one thread of
//! this process per frontend.

use std::path::PathBuf;
use std::sync::{mpsc, Arc, Barrier};
use std::time::{Duration, Instant};

use vsnd_tests::fixture::PcmConfig;

use crate::compare::{find_streams, frontend_options, RT_DEPTH};
use crate::guest::{Guest, Pace, Res, Streams};
use crate::procfs;
use crate::stats::{self, Spread};
use crate::target::{Spec, Target};

/// Warm-up after START before measuring.
const WARMUP: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct Opts {
    pub brokers: usize,
    pub duration: Duration,
    pub broker: PathBuf,
    pub base: PathBuf,
}

#[derive(Debug, Default, Clone)]
struct StreamResult {
    tx_p99: f64,
    tx_max: f64,
    rx_p99: f64,
    rx_max: f64,
    tx_late: u64,
    rx_late: u64,
    rx_bad: u64,
    tx_bad: u64,
    completed: u64,
}

fn one(i: usize, o: &Opts, pids: &mpsc::Sender<Vec<u32>>, ready: &Barrier) -> Res<StreamResult> {
    let cfg = PcmConfig::s16_stereo_48k(10);
    let setup = (|| -> Res<(Target, Guest)> {
        let spec = Spec::vsnd_null(&o.broker, false);
        let (t, mut fe, _) = Target::start(&spec, &o.base, &format!("b{i}"), frontend_options())?;
        let (out_id, in_id) = find_streams(&mut fe)?;
        let mut g = Guest::new(
            fe,
            cfg,
            Streams {
                tx: Some((out_id, RT_DEPTH)),
                rx: Some((in_id, RT_DEPTH)),
            },
            Pace::Device,
            0,
        )?;
        g.setup()?;
        g.prefill()?;
        Ok((t, g))
    })();
    let (mut target, mut g) = match setup {
        Ok(x) => x,
        Err(e) => {
            let _ = pids.send(Vec::new());
            ready.wait();
            return Err(format!("broker {i}: {e}"));
        }
    };
    let _ = pids.send(target.pids());
    ready.wait();
    let go = Instant::now();
    let run = (|| -> Res<()> {
        g.start()?;
        g.run_until(go + WARMUP)?;
        g.reset_stats();
        g.run_until(go + WARMUP + o.duration)
    })();
    if let Err(e) = run {
        target.keep();
        return Err(format!("broker {i}: {e}\n{}", target.log_tail(20)));
    }
    let tx = g.tx.as_ref().ok_or("no tx")?;
    let rx = g.rx.as_ref().ok_or("no rx")?;
    Ok(StreamResult {
        tx_p99: stats::percentile(&tx.dev_us, 99.0).unwrap_or(f64::NAN),
        tx_max: stats::max(&tx.dev_us).unwrap_or(f64::NAN),
        rx_p99: stats::percentile(&rx.dev_us, 99.0).unwrap_or(f64::NAN),
        rx_max: stats::max(&rx.dev_us).unwrap_or(f64::NAN),
        tx_late: tx.late,
        rx_late: rx.late,
        rx_bad: rx.bad,
        tx_bad: tx.bad,
        completed: g.completed(),
    })
}

/// Run the scale test; (markdown report, passed).
pub fn run(o: &Opts) -> Res<(String, bool)> {
    let load_start = procfs::loadavg();
    let n = o.brokers;
    let ready = Arc::new(Barrier::new(n + 1));
    let (ptx, prx) = mpsc::channel();
    let opts = Arc::new(o.clone());
    let mut handles = Vec::new();
    for i in 0..n {
        let (ready, ptx, opts) = (ready.clone(), ptx.clone(), opts.clone());
        handles.push(
            std::thread::Builder::new()
                .name(format!("guest-{i}"))
                .spawn(move || one(i, &opts, &ptx, &ready))
                .map_err(|e| e.to_string())?,
        );
        // Do not start them all in the same millisecond: a real host's VMs
        // do not either, and the schedules should not be in lockstep.
        std::thread::sleep(Duration::from_millis(7));
    }
    let mut all_pids = Vec::new();
    for _ in 0..n {
        all_pids.extend(prx.recv().map_err(|e| e.to_string())?);
    }
    let processes = all_pids.len();
    ready.wait();
    let go = Instant::now();
    std::thread::sleep(WARMUP);
    let cpu = |pids: &[u32]| -> u64 { pids.iter().filter_map(|&p| procfs::cpu_ns(p)).sum() };
    let (c0, s0, t0) = (cpu(&all_pids), procfs::self_cpu_ns(), Instant::now());
    std::thread::sleep((go + WARMUP + o.duration).saturating_duration_since(Instant::now()));
    let (c1, s1, secs) = (
        cpu(&all_pids),
        procfs::self_cpu_ns(),
        t0.elapsed().as_secs_f64(),
    );
    let load_end = procfs::loadavg();
    let mut results = Vec::new();
    let mut errors = Vec::new();
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => errors.push(e),
            Err(_) => errors.push("a guest thread panicked".into()),
        }
    }
    let cpu_pct = c1.saturating_sub(c0) as f64 / 1e9 / secs * 100.0;
    let self_pct = s1.saturating_sub(s0) as f64 / 1e9 / secs * 100.0;
    let col = |f: fn(&StreamResult) -> f64| -> Vec<f64> { results.iter().map(f).collect() };
    let worst = |v: &[f64]| -> (usize, f64) {
        v.iter()
            .copied()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap_or((0, f64::NAN))
    };
    let tx_p99 = col(|r| r.tx_p99);
    let rx_p99 = col(|r| r.rx_p99);
    let (wtx_i, wtx) = worst(&tx_p99);
    let (wrx_i, wrx) = worst(&rx_p99);
    let tx_max = worst(&col(|r| r.tx_max)).1;
    let rx_max = worst(&col(|r| r.rx_max)).1;
    let tx_late: u64 = results.iter().map(|r| r.tx_late).sum();
    let rx_late: u64 = results.iter().map(|r| r.rx_late).sum();
    let rx_bad: u64 = results.iter().map(|r| r.rx_bad).sum();
    let tx_bad: u64 = results.iter().map(|r| r.tx_bad).sum();
    let completed: u64 = results.iter().map(|r| r.completed).sum();
    let xruns = tx_late + rx_late + rx_bad + tx_bad;
    let med = |v: &[f64]| Spread::of(v).map_or("n/a".into(), |s| s.show(0));
    let ok = errors.is_empty() && xruns == 0;

    let mut md = String::new();
    md.push_str(&format!(
        "{n} brokers (`--backend null`), {processes} processes (brokers + devices), each broker \
         serving its own test frontend that plays and records 48 kHz stereo S16 in real time \
         (10 ms periods, {RT_DEPTH} queued per direction); {:.0} s measured after {:.0} s of \
         warm-up; {} cores. Load average (1/5/15 min) at start: {load_start}; at end: \
         {load_end}.\n\n",
        o.duration.as_secs_f64(),
        WARMUP.as_secs_f64(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    ));
    md.push_str("| measure | result |\n|---|---|\n");
    md.push_str(&format!(
        "| total CPU of all brokers + devices | {cpu_pct:.1} % of one core ({:.2} % per broker) |\n",
        cpu_pct / n.max(1) as f64
    ));
    md.push_str(&format!(
        "| CPU of the {n} test frontends (this process, not counted above) | {self_pct:.1} % of one core |\n"
    ));
    md.push_str(&format!(
        "| TX completion jitter p99, per stream: median [best–worst] | {} µs |\n",
        med(&tx_p99)
    ));
    md.push_str(&format!(
        "| worst stream's TX jitter p99 / worst TX max | {wtx:.0} µs (broker {wtx_i}) / {tx_max:.0} µs |\n"
    ));
    md.push_str(&format!(
        "| RX completion jitter p99, per stream: median [best–worst] | {} µs |\n",
        med(&rx_p99)
    ));
    md.push_str(&format!(
        "| worst stream's RX jitter p99 / worst RX max | {wrx:.0} µs (broker {wrx_i}) / {rx_max:.0} µs |\n"
    ));
    md.push_str(&format!(
        "| buffers completed (both directions, all streams, incl. warm-up) | {completed} |\n"
    ));
    md.push_str(&format!(
        "| **xruns** | **{xruns}** (TX late {tx_late}, RX late {rx_late}, RX short/error {rx_bad}, TX error {tx_bad}) |\n"
    ));
    if !errors.is_empty() {
        md.push_str(&format!("| errors | {} |\n", errors.len()));
    }
    md.push_str(
        "\nAn xrun is a buffer that came back more than one period (10 ms) later than its place \
         on the ideal schedule (START + (k+1) × 10 ms for the k-th buffer of a stream; the \
         schedule is re-anchored after a late buffer so one stall counts once), or a capture \
         buffer that came back short or with a status other than OK. Jitter is |completion − \
         ideal time|.\n",
    );
    for e in &errors {
        md.push_str(&format!("\nerror: {e}\n"));
    }
    Ok((md, ok))
}
