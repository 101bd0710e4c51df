//! The null backend: discards playback, captures silence.

use vsnd_ipc::{Capabilities, PcmParams};

/// No host audio at all.
pub struct Null;

impl super::Audio for Null {
    fn capabilities(&self) -> Capabilities {
        super::raw_capabilities()
    }

    fn playback_batch_ms(&self) -> u16 {
        super::NULL_BATCH_MS
    }

    fn has_capture_source(&self) -> bool {
        false
    }

    fn play(&mut self, _params: &PcmParams, _data: &[u8]) {}

    fn capture(&mut self, params: &PcmParams, buf: &mut [u8]) {
        params.format.fill_silence(buf);
    }

    fn close_capture(&mut self) {}
}
