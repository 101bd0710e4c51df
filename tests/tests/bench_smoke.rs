//! The benchmark binary itself works: `vsnd-bench compare --vsnd-only
//! --quick` runs every workload against the real broker and device and
//! prints a table with every row. No timing claims here (those live in
//! BENCHMARKS.md); only that vsnd keeps up with real time, unpaced, and
//! that the real-time runs had a schedule to measure.

use std::process::Command;

/// Rows `vsnd-bench compare` must print.
const ROWS: [&str; 12] = [
    "control round trip PCM_INFO p50",
    "control round trip PCM_INFO p99",
    "TX completion jitter p50",
    "TX completion jitter p99",
    "TX completion jitter max",
    "xruns in the duplex run",
    "host CPU per second of duplex audio",
    "host CPU per second of playback-only audio",
    "unpaced playback throughput",
    "start-up until the socket accepts",
    "start-up until the vhost-user set-up is answered",
    "peak RSS",
];

/// The median (first number) of the vsnd column of `row`.
fn vsnd_median(table: &str, row: &str) -> f64 {
    let line = table
        .lines()
        .find(|l| l.starts_with(&format!("| {row}")))
        .unwrap_or_else(|| panic!("no row {row:?} in:\n{table}"));
    let cell = line.split('|').nth(2).unwrap_or("").trim();
    cell.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("row {row:?}: vsnd cell {cell:?} is not a number"))
}

#[test]
fn quick_compare_prints_every_row_and_vsnd_outruns_real_time() {
    let bench = env!("CARGO_BIN_EXE_vsnd-bench");
    // The bench runs the vsnd-broker next to itself, like the tests do.
    let bin_dir = vsnd_tests::bin_path("vsnd-broker")
        .parent()
        .expect("bin dir")
        .to_path_buf();
    let out = Command::new(bench)
        .args([
            "compare",
            "--vsnd-only",
            "--quick",
            "--duplex",
            "2",
            "--throughput",
            "1",
        ])
        .env(vsnd_tests::BIN_DIR_ENV, &bin_dir)
        .output()
        .expect("run vsnd-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "vsnd-bench compare --vsnd-only --quick failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    for row in ROWS {
        assert!(
            stdout.lines().any(|l| l.starts_with(&format!("| {row}"))),
            "expected a row {row:?} in the table, got:\n{stdout}\n{stderr}"
        );
    }
    assert!(
        stdout.contains("not run (--vsnd-only)"),
        "the upstream column should say it was not run:\n{stdout}"
    );
    let x = vsnd_median(&stdout, "unpaced playback throughput");
    assert!(
        x > 1.0,
        "expected vsnd's unpaced throughput above 1× real time, got {x}×:\n{stdout}"
    );
    let p50 = vsnd_median(&stdout, "TX completion jitter p50");
    assert!(
        p50.is_finite(),
        "expected a measured jitter, got {p50}:\n{stdout}"
    );
}
