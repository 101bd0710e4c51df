//! Host audio backends. The session meters every stream against the
//! broker's clock and consults the gate; a backend only moves bytes.

pub mod alsa;
pub mod file;
pub mod null;
pub mod pipewire;

use vsnd_ipc::{Capabilities, PcmParams, SampleFormat};

/// Rates (Hz) the null and file backends accept: every virtio rate from
/// 8 kHz to 192 kHz.
pub const RATES: [u32; 12] = [
    8000, 11025, 16000, 22050, 32000, 44100, 48000, 64000, 88200, 96000, 176400, 192000,
];

/// How long the device may collect playback for the null backend, which
/// drops it, in milliseconds: one broker wake-up for ten 10 ms periods
/// instead of one each. (The file backend takes each buffer at once: a
/// device that dies then loses nothing it returned to the guest.)
pub const NULL_BATCH_MS: u16 = 100;

/// Most channels the null and file backends accept.
pub const MAX_CHANNELS: u8 = 8;

/// What the null and file backends support: everything, since they move
/// raw bytes.
pub fn raw_capabilities() -> Capabilities {
    Capabilities {
        formats: SampleFormat::ALL.to_vec(),
        rates: RATES.to_vec(),
        channels_min: 1,
        channels_max: MAX_CHANNELS,
    }
}

/// A host audio backend. The session paces both directions by its clock
/// and consults the gate; a backend only moves bytes, never blocks, and is
/// never asked for capture data while input is off.
pub trait Audio {
    /// What PCM_INFO advertises.
    fn capabilities(&self) -> Capabilities;

    /// How long the device may collect consumed playback before sending it
    /// (milliseconds). A backend that plays or keeps the bytes wants each
    /// buffer at once (0, the default); one that drops them takes batches,
    /// which spares the broker wake-ups.
    fn playback_batch_ms(&self) -> u16 {
        0
    }

    /// Whether the backend has a host capture source at all. Without one
    /// the device fills capture buffers with silence itself.
    fn has_capture_source(&self) -> bool {
        true
    }

    /// The guest prepared its playback stream with `params`.
    fn open_output(&mut self, _params: &PcmParams) -> Result<(), String> {
        Ok(())
    }

    /// Playback data consumed at the real-time rate, only while output is
    /// enabled. `params` are the stream's parameters.
    fn play(&mut self, params: &PcmParams, data: &[u8]);

    /// `len` bytes of playback were discarded because output is off (a
    /// device backend keeps its stream fed with silence).
    fn discard(&mut self, _params: &PcmParams, _len: usize) {}

    /// The guest released its playback stream.
    fn close_output(&mut self) {}

    /// Open the host capture source; called only while input is enabled,
    /// right before the first [`Audio::capture`].
    fn open_capture(&mut self, _params: &PcmParams) -> Result<(), String> {
        Ok(())
    }

    /// Fill `buf` with host capture data; called only while input is
    /// enabled and a capture stream runs.
    fn capture(&mut self, params: &PcmParams, buf: &mut [u8]);

    /// Input was disabled or its stream released: close the host source.
    fn close_capture(&mut self);

    /// A descriptor the broker's loop must poll for this backend (PipeWire's
    /// loop), if any; [`Audio::dispatch`] runs when it is readable.
    fn poll_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }

    /// When [`Audio::dispatch`] must run even without activity (a
    /// reconnect timer), if ever.
    fn next_deadline(&self) -> Option<std::time::Instant> {
        None
    }

    /// Do the backend's own work (its descriptor was readable or its
    /// deadline passed). Never blocks.
    fn dispatch(&mut self, _now: std::time::Instant) {}
}
