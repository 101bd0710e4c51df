//! The ALSA backend: one PCM per direction, non-blocking, in the broker's
//! thread.
//!
//! The session's clock paces the guest; this backend writes consumed
//! playback to the playback PCM and reads exactly the requested capture
//! bytes from the capture PCM, never waiting: a full playback buffer drops
//! the excess, a capture PCM that has less than asked is padded with
//! silence, and xruns are recovered, counted and logged. So neither
//! direction can block the other, or the broker.
//!
//! The capture PCM is opened only while input is on and a capture stream
//! runs (the session decides), and closed as soon as either ends.

use std::time::{Duration, Instant};

use alsa::pcm::{Access, Format, HwParams, PCM};
use alsa::{Direction as AlsaDir, ValueOr};
use log::{info, warn};
use vsnd_ipc::{Capabilities, PcmParams, SampleFormat};

use super::RATES;

/// Periods the host PCM's buffer holds at least (a cushion against the
/// broker's wakeup jitter).
const MIN_PERIODS: i64 = 4;
/// Periods queued before the playback PCM starts.
const START_PERIODS: i64 = 2;
/// At most one xrun warning per this interval per direction.
const XRUN_LOG_INTERVAL: Duration = Duration::from_secs(5);

fn alsa_format(f: SampleFormat) -> Format {
    match f {
        SampleFormat::U8 => Format::U8,
        SampleFormat::S8 => Format::S8,
        SampleFormat::S16 => Format::S16LE,
        SampleFormat::U16 => Format::U16LE,
        SampleFormat::S24Packed => Format::S243LE,
        SampleFormat::S24 => Format::S24LE,
        SampleFormat::S32 => Format::S32LE,
        SampleFormat::U32 => Format::U32LE,
        SampleFormat::Float => Format::FloatLE,
        SampleFormat::Float64 => Format::Float64LE,
    }
}

struct Stream {
    pcm: PCM,
    params: PcmParams,
    frame: usize,
    xruns: u64,
    dropped_bytes: u64,
    last_warning: Option<Instant>,
}

impl Stream {
    fn open(device: &str, dir: AlsaDir, p: &PcmParams) -> Result<Stream, String> {
        let pcm = PCM::new(device, dir, true)
            .map_err(|e| format!("cannot open ALSA PCM {device:?}: {e}"))?;
        let frame = p.frame_bytes() as usize;
        let period = i64::from(p.period_bytes) / frame.max(1) as i64;
        let buffer = (i64::from(p.buffer_bytes) / frame.max(1) as i64).max(period * MIN_PERIODS);
        {
            let hw = HwParams::any(&pcm).map_err(|e| e.to_string())?;
            hw.set_access(Access::RWInterleaved)
                .map_err(|e| format!("interleaved access: {e}"))?;
            hw.set_format(alsa_format(p.format))
                .map_err(|e| format!("format {:?}: {e}", p.format))?;
            hw.set_channels(u32::from(p.channels))
                .map_err(|e| format!("{} channels: {e}", p.channels))?;
            hw.set_rate(p.rate, ValueOr::Nearest)
                .map_err(|e| format!("{} Hz: {e}", p.rate))?;
            hw.set_period_size_near(period, ValueOr::Nearest)
                .map_err(|e| format!("period: {e}"))?;
            hw.set_buffer_size_near(buffer)
                .map_err(|e| format!("buffer: {e}"))?;
            pcm.hw_params(&hw).map_err(|e| format!("hw params: {e}"))?;
        }
        if dir == AlsaDir::Playback {
            let sw = pcm.sw_params_current().map_err(|e| e.to_string())?;
            sw.set_start_threshold(period * START_PERIODS)
                .map_err(|e| e.to_string())?;
            pcm.sw_params(&sw).map_err(|e| format!("sw params: {e}"))?;
        }
        // snd_pcm_get_params: (buffer size, period size).
        let (buffer_got, period_got) = pcm.get_params().map_err(|e| e.to_string())?;
        info!(
            "ALSA {} {device:?}: {:?} {} Hz {} ch, period {period_got} frames, buffer {buffer_got} frames",
            if dir == AlsaDir::Playback { "playback" } else { "capture" },
            p.format,
            p.rate,
            p.channels
        );
        if dir == AlsaDir::Capture {
            pcm.start()
                .map_err(|e| format!("cannot start capture: {e}"))?;
        }
        Ok(Stream {
            pcm,
            params: *p,
            frame,
            xruns: 0,
            dropped_bytes: 0,
            last_warning: None,
        })
    }

    fn xrun(&mut self, what: &str, err: alsa::Error) {
        self.xruns += 1;
        let recovered = self.pcm.try_recover(err, true);
        if what == "capture" {
            let _ = self.pcm.start();
        }
        // Rate-limited: a device that stays broken (unplugged) must not
        // flood the log once per period.
        let now = Instant::now();
        if self
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= XRUN_LOG_INTERVAL)
        {
            self.last_warning = Some(now);
            match recovered {
                Ok(()) => warn!(
                    "ALSA {what}: {err}; recovered ({} xruns so far)",
                    self.xruns
                ),
                Err(e) => warn!(
                    "ALSA {what}: {err}; cannot recover: {e} ({} errors so far)",
                    self.xruns
                ),
            }
        }
    }

    /// Write whole frames; what does not fit is dropped.
    fn write(&mut self, data: &[u8]) {
        let usable = data.len() - data.len() % self.frame.max(1);
        let mut rest = data.get(..usable).unwrap_or(&[]);
        let mut retried = false;
        while !rest.is_empty() {
            let res = self.pcm.io_bytes().writei(rest);
            match res {
                Ok(frames) => {
                    let n = frames * self.frame;
                    rest = rest.get(n..).unwrap_or(&[]);
                    if frames == 0 {
                        break;
                    }
                }
                Err(e) if e.errno() == libc::EAGAIN => break,
                Err(e) if !retried => {
                    retried = true;
                    self.xrun("playback", e);
                }
                Err(_) => break,
            }
        }
        self.dropped_bytes += rest.len() as u64;
    }

    /// Fill `buf` with what the PCM has now, silence for the rest.
    fn read(&mut self, buf: &mut [u8]) {
        let usable = buf.len() - buf.len() % self.frame.max(1);
        let mut filled = 0;
        let mut retried = false;
        while filled < usable {
            let Some(dst) = buf.get_mut(filled..usable) else {
                break;
            };
            let res = self.pcm.io_bytes().readi(dst);
            match res {
                Ok(0) => break,
                Ok(frames) => filled += frames * self.frame,
                Err(e) if e.errno() == libc::EAGAIN => break,
                Err(e) if !retried => {
                    retried = true;
                    self.xrun("capture", e);
                }
                Err(_) => break,
            }
        }
        if let Some(rest) = buf.get_mut(filled..) {
            self.params.format.fill_silence(rest);
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let _ = self.pcm.drop();
        if self.xruns > 0 || self.dropped_bytes > 0 {
            info!(
                "ALSA stream closed: {} xruns, {} playback bytes dropped",
                self.xruns, self.dropped_bytes
            );
        }
    }
}

/// Playback and capture through ALSA PCMs.
pub struct AlsaAudio {
    playback_device: String,
    capture_device: String,
    caps: Capabilities,
    output: Option<Stream>,
    input: Option<Stream>,
}

impl AlsaAudio {
    /// Check the playback device and read what it supports. The capture
    /// device is not opened here: that would open the microphone.
    pub fn open(playback_device: &str, capture_device: &str) -> Result<Self, String> {
        let caps = probe(playback_device)?;
        Ok(AlsaAudio {
            playback_device: playback_device.to_string(),
            capture_device: capture_device.to_string(),
            caps,
            output: None,
            input: None,
        })
    }
}

/// What an ALSA playback PCM accepts, as PCM_INFO should advertise it.
fn probe(device: &str) -> Result<Capabilities, String> {
    let pcm = PCM::new(device, AlsaDir::Playback, true).map_err(|e| {
        format!("cannot open ALSA playback device {device:?}: {e} (check --alsa-playback-device and the user's access to /dev/snd)")
    })?;
    let hw = HwParams::any(&pcm).map_err(|e| e.to_string())?;
    let formats: Vec<SampleFormat> = SampleFormat::ALL
        .iter()
        .copied()
        .filter(|f| hw.test_format(alsa_format(*f)).is_ok())
        .collect();
    let rates: Vec<u32> = RATES
        .iter()
        .copied()
        .filter(|r| hw.test_rate(*r).is_ok())
        .collect();
    let cmin = hw.get_channels_min().unwrap_or(1).clamp(1, 8) as u8;
    let cmax = hw.get_channels_max().unwrap_or(8).clamp(1, 8) as u8;
    if formats.is_empty() || rates.is_empty() {
        return Err(format!(
            "ALSA device {device:?} supports no format or rate vsnd can offer"
        ));
    }
    Ok(Capabilities {
        formats,
        rates,
        channels_min: cmin,
        channels_max: cmax.max(cmin),
    })
}

impl super::Audio for AlsaAudio {
    fn capabilities(&self) -> Capabilities {
        self.caps.clone()
    }

    fn open_output(&mut self, params: &PcmParams) -> Result<(), String> {
        if self.output.as_ref().is_some_and(|s| s.params == *params) {
            return Ok(());
        }
        self.output = None;
        self.output = Some(Stream::open(
            &self.playback_device,
            AlsaDir::Playback,
            params,
        )?);
        Ok(())
    }

    fn play(&mut self, _params: &PcmParams, data: &[u8]) {
        if let Some(s) = self.output.as_mut() {
            s.write(data);
        }
    }

    fn discard(&mut self, params: &PcmParams, len: usize) {
        if let Some(s) = self.output.as_mut() {
            let mut silence = vec![0u8; len];
            params.format.fill_silence(&mut silence);
            s.write(&silence);
        }
    }

    fn close_output(&mut self) {
        self.output = None;
    }

    fn open_capture(&mut self, params: &PcmParams) -> Result<(), String> {
        self.input = None;
        self.input = Some(Stream::open(
            &self.capture_device,
            AlsaDir::Capture,
            params,
        )?);
        Ok(())
    }

    fn capture(&mut self, params: &PcmParams, buf: &mut [u8]) {
        match self.input.as_mut() {
            Some(s) => s.read(buf),
            None => params.format.fill_silence(buf),
        }
    }

    fn close_capture(&mut self) {
        if self.input.take().is_some() {
            info!("ALSA capture device {:?} closed", self.capture_device);
        }
    }
}
