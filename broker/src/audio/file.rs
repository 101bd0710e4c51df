//! The file backend: playback appended to a file, capture read from a file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use log::{error, info, warn};
use vsnd_ipc::{Capabilities, PcmParams, SampleFormat};

/// Playback and capture through files.
pub struct FileAudio {
    playback: Option<PlaybackFile>,
    capture: Option<CaptureFile>,
}

struct PlaybackFile {
    path: PathBuf,
    file: File,
    wav: Option<WavState>,
    failed: bool,
}

struct WavState {
    params: Option<PcmParams>,
    data_bytes: u64,
}

struct CaptureFile {
    path: PathBuf,
    file: Option<File>,
}

impl FileAudio {
    /// Open (and check) the files before anything else starts, so a bad path
    /// is reported at once. A `.wav` playback file is rewritten; any other
    /// playback file is appended to.
    pub fn open(playback: Option<&Path>, capture: Option<&Path>) -> Result<Self, String> {
        // The capture file first: opening the playback file creates it
        // (and rewrites a .wav), which a bad capture file must not cause.
        let capture = match capture {
            None => None,
            Some(p) => {
                let f = File::open(p)
                    .map_err(|e| format!("cannot open --capture-file {}: {e}", p.display()))?;
                let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                if len == 0 {
                    return Err(format!(
                        "--capture-file {} is empty: give a file of raw PCM samples",
                        p.display()
                    ));
                }
                Some(CaptureFile {
                    path: p.to_path_buf(),
                    file: None,
                })
            }
        };
        let playback = match playback {
            None => None,
            Some(p) => {
                let wav = is_wav(p);
                let file = OpenOptions::new()
                    .create(true)
                    .append(!wav)
                    .write(true)
                    .truncate(wav)
                    .open(p)
                    .map_err(|e| format!("cannot open --playback-file {}: {e}", p.display()))?;
                Some(PlaybackFile {
                    path: p.to_path_buf(),
                    file,
                    wav: wav.then_some(WavState {
                        params: None,
                        data_bytes: 0,
                    }),
                    failed: false,
                })
            }
        };
        Ok(FileAudio { playback, capture })
    }
}

fn is_wav(p: &Path) -> bool {
    p.extension().is_some_and(|e| e.eq_ignore_ascii_case("wav"))
}

impl super::Audio for FileAudio {
    fn capabilities(&self) -> Capabilities {
        super::raw_capabilities()
    }

    fn has_capture_source(&self) -> bool {
        self.capture.is_some()
    }

    fn play(&mut self, params: &PcmParams, data: &[u8]) {
        let Some(pb) = self.playback.as_mut() else {
            return;
        };
        if pb.failed {
            return;
        }
        if let Err(e) = pb.write(params, data) {
            error!(
                "playback file {}: {e}; further playback is discarded",
                pb.path.display()
            );
            pb.failed = true;
        }
    }

    fn capture(&mut self, params: &PcmParams, buf: &mut [u8]) {
        let Some(cap) = self.capture.as_mut() else {
            params.format.fill_silence(buf);
            return;
        };
        if let Err(e) = cap.read_looping(buf) {
            warn!("capture file {}: {e}; sending silence", cap.path.display());
            params.format.fill_silence(buf);
            cap.file = None;
        }
    }

    fn close_capture(&mut self) {
        if let Some(cap) = self.capture.as_mut() {
            if cap.file.take().is_some() {
                info!("capture file {} closed", cap.path.display());
            }
        }
    }
}

impl PlaybackFile {
    fn write(&mut self, params: &PcmParams, data: &[u8]) -> io::Result<()> {
        if let Some(wav) = self.wav.as_mut() {
            match wav.params {
                None => {
                    wav.params = Some(*params);
                    self.file.write_all(&wav_header(params, 0))?;
                }
                Some(p)
                    if p.format != params.format
                        || p.rate != params.rate
                        || p.channels != params.channels =>
                {
                    warn!(
                        "{}: the guest changed format; the WAV header keeps the first one ({:?} {} Hz {} ch)",
                        self.path.display(),
                        p.format,
                        p.rate,
                        p.channels
                    );
                    wav.params = Some(*params);
                }
                Some(_) => {}
            }
        }
        self.file.write_all(data)?;
        if let Some(wav) = self.wav.as_mut() {
            wav.data_bytes = wav.data_bytes.saturating_add(data.len() as u64);
            let data_len = u32::try_from(wav.data_bytes).unwrap_or(u32::MAX);
            let riff_len = data_len.saturating_add(36);
            self.file.seek(SeekFrom::Start(4))?;
            self.file.write_all(&riff_len.to_le_bytes())?;
            self.file.seek(SeekFrom::Start(40))?;
            self.file.write_all(&data_len.to_le_bytes())?;
            self.file.seek(SeekFrom::End(0))?;
        }
        Ok(())
    }
}

impl CaptureFile {
    fn read_looping(&mut self, buf: &mut [u8]) -> io::Result<()> {
        if self.file.is_none() {
            info!("capture file {} opened", self.path.display());
            self.file = Some(File::open(&self.path)?);
        }
        let Some(file) = self.file.as_mut() else {
            return Ok(());
        };
        let mut filled = 0;
        let mut rewound = false;
        while filled < buf.len() {
            let n = file.read(&mut buf[filled..])?;
            if n == 0 {
                if rewound {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the file is empty",
                    ));
                }
                file.seek(SeekFrom::Start(0))?;
                rewound = true;
                continue;
            }
            rewound = false;
            filled += n;
        }
        Ok(())
    }
}

/// A canonical 44-byte WAV header; sizes are patched as data arrives.
fn wav_header(p: &PcmParams, data_len: u32) -> [u8; 44] {
    let (tag, bits): (u16, u16) = match p.format {
        SampleFormat::Float | SampleFormat::Float64 => (3, (p.format.bytes() * 8) as u16),
        SampleFormat::S24 => (1, 32),
        _ => (1, (p.format.bytes() * 8) as u16),
    };
    let channels = u16::from(p.channels);
    let block = channels.saturating_mul(bits / 8);
    let byte_rate = p.rate.saturating_mul(u32::from(block));
    let mut h = [0u8; 44];
    h[0..4].copy_from_slice(b"RIFF");
    h[4..8].copy_from_slice(&data_len.saturating_add(36).to_le_bytes());
    h[8..12].copy_from_slice(b"WAVE");
    h[12..16].copy_from_slice(b"fmt ");
    h[16..20].copy_from_slice(&16u32.to_le_bytes());
    h[20..22].copy_from_slice(&tag.to_le_bytes());
    h[22..24].copy_from_slice(&channels.to_le_bytes());
    h[24..28].copy_from_slice(&p.rate.to_le_bytes());
    h[28..32].copy_from_slice(&byte_rate.to_le_bytes());
    h[32..34].copy_from_slice(&block.to_le_bytes());
    h[34..36].copy_from_slice(&bits.to_le_bytes());
    h[36..40].copy_from_slice(b"data");
    h[40..44].copy_from_slice(&data_len.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::super::Audio;
    use super::*;

    fn params() -> PcmParams {
        PcmParams {
            format: SampleFormat::S16,
            rate: 48000,
            channels: 2,
            buffer_bytes: 1920,
            period_bytes: 960,
        }
    }

    #[test]
    fn raw_playback_appends_exact_bytes() {
        let dir = std::env::temp_dir().join(format!("vsnd-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.raw");
        std::fs::write(&path, b"old").unwrap();
        let mut a = FileAudio::open(Some(&path), None).unwrap();
        a.play(&params(), &[1, 2, 3]);
        a.play(&params(), &[4]);
        assert_eq!(std::fs::read(&path).unwrap(), b"old\x01\x02\x03\x04");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn wav_playback_has_a_correct_header() {
        let dir = std::env::temp_dir().join(format!("vsnd-wav-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out.wav");
        let mut a = FileAudio::open(Some(&path), None).unwrap();
        a.play(&params(), &[9; 8]);
        a.play(&params(), &[7; 4]);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len(), 44 + 12);
        assert_eq!(&bytes[0..4], b"RIFF");
        assert_eq!(u32::from_le_bytes(bytes[4..8].try_into().unwrap()), 36 + 12);
        assert_eq!(u32::from_le_bytes(bytes[24..28].try_into().unwrap()), 48000);
        assert_eq!(
            u32::from_le_bytes(bytes[28..32].try_into().unwrap()),
            192000
        );
        assert_eq!(u32::from_le_bytes(bytes[40..44].try_into().unwrap()), 12);
        assert_eq!(&bytes[44..], &[9, 9, 9, 9, 9, 9, 9, 9, 7, 7, 7, 7]);
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn capture_loops_and_empty_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("vsnd-cap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("in.raw");
        std::fs::write(&path, [1, 2, 3]).unwrap();
        let mut a = FileAudio::open(None, Some(&path)).unwrap();
        let mut buf = [0u8; 7];
        a.capture(&params(), &mut buf);
        assert_eq!(buf, [1, 2, 3, 1, 2, 3, 1]);
        a.capture(&params(), &mut buf[..2]);
        assert_eq!(&buf[..2], &[2, 3]);
        std::fs::write(&path, []).unwrap();
        assert!(FileAudio::open(None, Some(&path)).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
