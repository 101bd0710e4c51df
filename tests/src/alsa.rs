//! ALSA without a sound card, for the tests of the broker's ALSA backend
//! (`tests/alsa.rs`, `tests/real_guest.rs`).
//!
//! [`AlsaPcms`] writes a private ALSA configuration into the broker's
//! directory with two `type file` PCMs over a `null` slave:
//!
//! * [`PLAYBACK_PCM`] (`vsnd_out`) appends everything played to
//!   `<dir>/played.raw`, raw, the guest's bytes as they are;
//! * [`CAPTURE_PCM`] (`vsnd_in`) records `<dir>/capture.raw` from its first
//!   byte (the file plugin's `infile`, opened when the PCM is opened).
//!
//! These are the files the [`Broker`](crate::fixture::Broker) fixture's
//! helpers read and write, so `played()`, `capture_bytes()` & co. work
//! unchanged. The `null` slave has no clock: the device's timer paces both
//! streams, as it does for every backend. Nothing ever blocks and nothing
//! ever xruns on these PCMs (`tests/alsa.rs` provokes xruns through
//! PipeWire's ALSA plugin instead).
//!
//! The broker runs in a clean environment ([`environment`]):
//! `ALSA_CONFIG_PATH=<dir>/asound.conf` makes that file the *only*
//! configuration its ALSA library reads — not `/usr/share/alsa/alsa.conf`
//! nor what that one would load (`/etc/asound.conf`, `/etc/alsa/conf.d`
//! with its PipeWire or PulseAudio plugins, `~/.asoundrc`), so the host's
//! `default` PCM (on a machine without a sound card it points at card 0,
//! which does not exist) plays no part. The file is therefore
//! self-contained: the slaves are written out (`slave.pcm { type null }`)
//! rather than named (`"null"` is defined by alsa.conf). `HOME` is the
//! directory too, so no one's `~/.asoundrc` could be read even if a tool
//! loaded alsa.conf. Both PCMs set `truncate true` (alsa.conf's default,
//! which this file does not inherit): each opening of the playback PCM (a
//! stream prepared after a release) starts `played.raw` over, so a test
//! that plays several streams reads the file after each. (`truncate false`
//! would not append: alsa-lib then opens with `O_EXCL` and, the file
//! existing, writes `played.raw.0001` instead.)
//!
//! [`hw_params`] asks `aplay --dump-hw-params` (alsa-utils, installed by
//! `scripts/setup`) what a PCM of such a configuration accepts: an opinion
//! independent of the broker's probe.

use std::process::{Command, Stdio};

use crate::fixture::{Backend, TempDir};
use crate::snd;

/// The playback PCM: `<dir>/played.raw`.
pub const PLAYBACK_PCM: &str = "vsnd_out";
/// The capture PCM: `<dir>/capture.raw`.
pub const CAPTURE_PCM: &str = "vsnd_in";
/// The configuration file in the broker's directory.
pub const CONFIG_FILE: &str = "asound.conf";

/// `type file` playback PCM `name` over a `null` slave, writing `file`
/// (`{dir}` is the broker's directory), which each opening of the PCM
/// (hw params) starts over.
pub fn playback_pcm(name: &str, file: &str) -> String {
    format!(
        "pcm.{name} {{\n    type file\n    slave.pcm {{ type null }}\n    file \"{file}\"\n    \
         format \"raw\"\n    truncate true\n}}\n"
    )
}

/// `type file` capture PCM `name` over a `null` slave, recording `infile`
/// from its first byte.
pub fn capture_pcm(name: &str, infile: &str) -> String {
    format!(
        "pcm.{name} {{\n    type file\n    slave.pcm {{ type null }}\n    file \"/dev/null\"\n    \
         infile \"{infile}\"\n    format \"raw\"\n    truncate true\n}}\n"
    )
}

/// The broker's whole environment (besides `RUST_LOG`); `{dir}` is its
/// directory.
pub fn environment() -> Vec<(String, String)> {
    vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), "{dir}".into()),
        ("ALSA_CONFIG_PATH".into(), format!("{{dir}}/{CONFIG_FILE}")),
    ]
}

/// Which PCMs the broker uses, and the configuration that defines them.
#[derive(Debug, Clone)]
pub struct AlsaPcms {
    /// `--alsa-playback-device`.
    pub playback: String,
    /// `--alsa-capture-device`.
    pub capture: String,
    /// More definitions, appended to the configuration (`{dir}` is the
    /// broker's directory).
    pub extra: String,
}

impl Default for AlsaPcms {
    /// [`PLAYBACK_PCM`] and [`CAPTURE_PCM`].
    fn default() -> Self {
        Self {
            playback: PLAYBACK_PCM.into(),
            capture: CAPTURE_PCM.into(),
            extra: String::new(),
        }
    }
}

impl AlsaPcms {
    /// The configuration file's contents (`{dir}` not yet substituted).
    pub fn config(&self) -> String {
        format!(
            "# vsnd tests (tests/src/alsa.rs): ALSA without a sound card. The only\n\
             # configuration read (ALSA_CONFIG_PATH): no alsa.conf, /etc/asound.conf or\n\
             # ~/.asoundrc, so no `default` and no `null` either.\n{}{}{}",
            playback_pcm(PLAYBACK_PCM, "{dir}/played.raw"),
            capture_pcm(CAPTURE_PCM, "{dir}/capture.raw"),
            self.extra
        )
    }

    /// The broker's backend: `--backend alsa --alsa-playback-device …
    /// --alsa-capture-device …`, the configuration and the environment.
    pub fn backend(&self) -> Backend {
        Backend {
            args: vec![
                "--backend".into(),
                "alsa".into(),
                "--alsa-playback-device".into(),
                self.playback.clone(),
                "--alsa-capture-device".into(),
                self.capture.clone(),
            ],
            files: vec![(CONFIG_FILE.into(), self.config())],
            env: Some(environment()),
        }
    }
}

/// What a PCM accepts, as `aplay --dump-hw-params` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HwParams {
    /// The `FORMAT:` line's names (`S16_LE`, …).
    pub formats: Vec<String>,
    /// The `CHANNELS:` interval (inclusive).
    pub channels: (u64, u64),
    /// The `RATE:` interval (inclusive).
    pub rates: (u64, u64),
}

/// The ALSA name of each format vsnd carries (`snd::PCM_FMT_*`, its
/// `SampleFormat::ALL`), little-endian as virtio's are.
pub const FORMATS: [(u8, &str); 10] = [
    (snd::PCM_FMT_U8, "U8"),
    (snd::PCM_FMT_S8, "S8"),
    (snd::PCM_FMT_S16, "S16_LE"),
    (snd::PCM_FMT_U16, "U16_LE"),
    (snd::PCM_FMT_S24_3, "S24_3LE"),
    (snd::PCM_FMT_S24, "S24_LE"),
    (snd::PCM_FMT_S32, "S32_LE"),
    (snd::PCM_FMT_U32, "U32_LE"),
    (snd::PCM_FMT_FLOAT, "FLOAT_LE"),
    (snd::PCM_FMT_FLOAT64, "FLOAT64_LE"),
];

/// The rates vsnd offers at most (8 kHz to 192 kHz: `snd::PCM_RATE_*`).
pub fn vsnd_rates() -> std::ops::RangeInclusive<u8> {
    snd::PCM_RATE_8000..=snd::PCM_RATE_192000
}

impl HwParams {
    /// Parse `aplay --dump-hw-params` output.
    pub fn parse(dump: &str) -> Result<Self, String> {
        let field = |name: &str| {
            dump.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
                .ok_or_else(|| format!("no {name}: line in\n{dump}"))
        };
        Ok(Self {
            formats: field("FORMAT")?
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            channels: interval(field("CHANNELS")?)?,
            rates: interval(field("RATE")?)?,
        })
    }

    /// What PCM_INFO should advertise for a device that accepts this:
    /// (formats mask, rates mask, channels min, channels max), within what
    /// vsnd carries (its 10 formats, 8–192 kHz, 1–8 channels).
    pub fn expected_info(&self) -> (u64, u64, u8, u8) {
        let formats = FORMATS
            .iter()
            .filter(|(_, name)| self.formats.iter().any(|f| f == name))
            .fold(0u64, |m, (code, _)| m | 1 << code);
        let rates = vsnd_rates()
            .filter(|&r| {
                let hz = u64::from(snd::rate_hz(r).unwrap_or(0));
                (self.rates.0..=self.rates.1).contains(&hz)
            })
            .fold(0u64, |m, r| m | 1 << r);
        let cmin = self.channels.0.clamp(1, 8) as u8;
        let cmax = self.channels.1.clamp(1, 8) as u8;
        (formats, rates, cmin, cmax.max(cmin))
    }
}

/// `2`, `[1 8]`, `(0 4294967295]` → inclusive integer bounds.
fn interval(s: &str) -> Result<(u64, u64), String> {
    let bad = || format!("cannot parse the interval {s:?}");
    if let Ok(v) = s.parse::<u64>() {
        return Ok((v, v));
    }
    let (open_lo, open_hi) = (s.starts_with('('), s.ends_with(')'));
    let inner = s
        .get(1..s.len().saturating_sub(1))
        .filter(|_| s.len() >= 2)
        .ok_or_else(bad)?;
    let mut it = inner.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(lo)), Some(Ok(hi)), None) = (it.next(), it.next(), it.next()) else {
        return Err(bad());
    };
    Ok((
        if open_lo { lo + 1 } else { lo },
        if open_hi { hi.saturating_sub(1) } else { hi },
    ))
}

/// What playback PCM `device` of the configuration `pcms` accepts, from
/// `aplay -D device --dump-hw-params` in a scratch directory with the
/// broker's environment (aplay reads nothing, so it plays nothing).
///
/// # Panics
/// When aplay cannot be run (`scripts/setup` installs alsa-utils) or its
/// output has no hw params.
pub fn hw_params(pcms: &AlsaPcms, device: &str) -> HwParams {
    let dir = TempDir::new("alsa-hw-params");
    let mut aplay = Command::new("aplay");
    // The configuration and the environment, not the broker's arguments.
    Backend {
        args: Vec::new(),
        ..pcms.backend()
    }
    .apply(dir.path(), &mut aplay);
    aplay
        .args(["-D", device, "--dump-hw-params", "-t", "raw", "/dev/null"])
        .stdin(Stdio::null());
    let out = aplay.output().unwrap_or_else(|e| {
        panic!("cannot run aplay ({e}); run `scripts/setup` (as root) to install alsa-utils")
    });
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    HwParams::parse(&text).unwrap_or_else(|e| {
        panic!(
            "aplay -D {device} --dump-hw-params ({}) in {}: {e}",
            out.status,
            dir.path().display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_aplay_prints() {
        let dump = "HW Params of device \"x\":\n--------------------\nACCESS:  RW_INTERLEAVED\n\
                    FORMAT:  S8 U8 S16_LE FLOAT_LE MU_LAW S24_3LE\nSUBFORMAT:  STD\n\
                    CHANNELS: 2\nRATE: [4000 768000]\nPERIOD_TIME: (0 4294967295]\n";
        let hw = HwParams::parse(dump).unwrap();
        assert_eq!(hw.channels, (2, 2));
        assert_eq!(hw.rates, (4000, 768_000));
        let (f, r, cmin, cmax) = hw.expected_info();
        let want_f = [
            snd::PCM_FMT_S8,
            snd::PCM_FMT_U8,
            snd::PCM_FMT_S16,
            snd::PCM_FMT_FLOAT,
            snd::PCM_FMT_S24_3,
        ]
        .iter()
        .fold(0u64, |m, c| m | 1 << c);
        assert_eq!(f, want_f);
        assert_eq!(r, vsnd_rates().fold(0u64, |m, c| m | 1 << c));
        assert_eq!((cmin, cmax), (2, 2));
        assert_eq!(interval("(0 10]"), Ok((1, 10)));
        assert_eq!(interval("[1 1073741823]"), Ok((1, 1_073_741_823)));
        assert!(interval("[1").is_err());
    }
}
