//! The audit trail of gate changes: one line per change, always in the log,
//! and with `--audit-log FILE` appended and flushed to that file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use log::{error, info};

/// Where audit records go.
pub struct AuditLog {
    file: Option<(File, String)>,
}

impl AuditLog {
    /// Log only, or also append to `path` (created 0600 if missing).
    pub fn open(path: Option<&Path>) -> Result<Self, String> {
        let file = match path {
            None => None,
            Some(p) => {
                use std::os::unix::fs::OpenOptionsExt;
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(p)
                    .map_err(|e| format!("cannot open --audit-log {}: {e}", p.display()))?;
                Some((f, p.display().to_string()))
            }
        };
        Ok(AuditLog { file })
    }

    /// Write one record: `<UTC time> <text>`.
    pub fn record(&mut self, text: &str) {
        let line = format!("{} {text}", utc_now());
        info!("audit: {line}");
        if let Some((f, path)) = self.file.as_mut() {
            let res = f
                .write_all(line.as_bytes())
                .and_then(|()| f.write_all(b"\n"))
                .and_then(|()| f.sync_data());
            if let Err(e) = res {
                error!("cannot write the audit log {path}: {e}");
            }
        }
    }
}

/// The current time as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn utc_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format_utc(d.as_secs(), d.subsec_millis())
}

fn format_utc(secs: u64, millis: u32) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc(951_782_400, 5), "2000-02-29T00:00:00.005Z");
        assert_eq!(format_utc(1_795_599_045, 123), "2026-11-25T09:30:45.123Z");
    }

    #[test]
    fn records_are_appended_to_the_file() {
        let dir = std::env::temp_dir().join(format!("vsnd-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.log");
        std::fs::write(&path, "earlier\n").unwrap();
        let mut a = AuditLog::open(Some(&path)).unwrap();
        a.record("input off -> on");
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "earlier");
        assert!(lines[1].ends_with("Z input off -> on"), "{text}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
