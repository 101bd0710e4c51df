//! virtio-snd wire format (virtio 1.2, section 5.14): constants, the
//! little-endian request/response layouts, and the mapping between the
//! spec's format/rate codes and the protocol's typed values.
//!
//! Requests are parsed from byte slices with explicit lengths; nothing here
//! trusts a size that came from the guest.

use vsnd_ipc::{Direction, SampleFormat};

/// Queue indices.
pub const CONTROL_QUEUE: u16 = 0;
/// Event queue: jack and PCM notifications to the guest.
pub const EVENT_QUEUE: u16 = 1;
/// Playback data.
pub const TX_QUEUE: u16 = 2;
/// Capture data.
pub const RX_QUEUE: u16 = 3;
/// Number of virtqueues.
pub const NUM_QUEUES: usize = 4;

// Request codes.
pub const R_JACK_INFO: u32 = 1;
pub const R_JACK_REMAP: u32 = 2;
pub const R_PCM_INFO: u32 = 0x0100;
pub const R_PCM_SET_PARAMS: u32 = 0x0101;
pub const R_PCM_PREPARE: u32 = 0x0102;
pub const R_PCM_RELEASE: u32 = 0x0103;
pub const R_PCM_START: u32 = 0x0104;
pub const R_PCM_STOP: u32 = 0x0105;
pub const R_CHMAP_INFO: u32 = 0x0200;

// Event codes.
pub const EVT_JACK_CONNECTED: u32 = 0x1000;
pub const EVT_JACK_DISCONNECTED: u32 = 0x1001;

/// Status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0x8000,
    BadMsg = 0x8001,
    NotSupp = 0x8002,
    IoErr = 0x8003,
}

// Directions on the wire.
pub const D_OUTPUT: u8 = 0;
pub const D_INPUT: u8 = 1;

/// Wire code of a direction.
pub fn direction_code(d: Direction) -> u8 {
    match d {
        Direction::Output => D_OUTPUT,
        Direction::Input => D_INPUT,
    }
}

// Channel positions (VIRTIO_SND_CHMAP_*).
pub const CHMAP_MONO: u8 = 2;
pub const CHMAP_FL: u8 = 3;
pub const CHMAP_FR: u8 = 4;
pub const CHMAP_RL: u8 = 5;
pub const CHMAP_RR: u8 = 6;
pub const CHMAP_FC: u8 = 7;
pub const CHMAP_LFE: u8 = 8;
pub const CHMAP_SL: u8 = 9;
pub const CHMAP_SR: u8 = 10;
/// Positions per chmap entry.
pub const CHMAP_MAX_SIZE: usize = 18;

// Sizes of the wire structures, in bytes.
pub const HDR_SIZE: usize = 4;
pub const QUERY_INFO_SIZE: usize = 16;
pub const JACK_INFO_SIZE: usize = 24;
pub const JACK_REMAP_SIZE: usize = 16;
pub const PCM_HDR_SIZE: usize = 8;
pub const PCM_SET_PARAMS_SIZE: usize = 24;
pub const PCM_INFO_SIZE: usize = 32;
pub const CHMAP_INFO_SIZE: usize = 24;
pub const PCM_XFER_SIZE: usize = 4;
pub const PCM_STATUS_SIZE: usize = 8;
pub const EVENT_SIZE: usize = 8;
/// virtio_snd_config with the `controls` field of newer spec versions;
/// frontends may read 12 or 16 bytes.
pub const CONFIG_SIZE: usize = 16;

/// Map a virtio format code to a sample format vsnd can carry.
pub fn format_from_code(code: u8) -> Option<SampleFormat> {
    Some(match code {
        3 => SampleFormat::S8,
        4 => SampleFormat::U8,
        5 => SampleFormat::S16,
        6 => SampleFormat::U16,
        11 => SampleFormat::S24Packed,
        15 => SampleFormat::S24,
        17 => SampleFormat::S32,
        18 => SampleFormat::U32,
        19 => SampleFormat::Float,
        20 => SampleFormat::Float64,
        _ => return None,
    })
}

/// The virtio format code of a sample format.
pub fn format_code(f: SampleFormat) -> u8 {
    match f {
        SampleFormat::S8 => 3,
        SampleFormat::U8 => 4,
        SampleFormat::S16 => 5,
        SampleFormat::U16 => 6,
        SampleFormat::S24Packed => 11,
        SampleFormat::S24 => 15,
        SampleFormat::S32 => 17,
        SampleFormat::U32 => 18,
        SampleFormat::Float => 19,
        SampleFormat::Float64 => 20,
    }
}

/// Rates by virtio code (VIRTIO_SND_PCM_RATE_*), index = code.
pub const RATES: [u32; 14] = [
    5512, 8000, 11025, 16000, 22050, 32000, 44100, 48000, 64000, 88200, 96000, 176400, 192000,
    384000,
];

/// Map a virtio rate code to Hz.
pub fn rate_from_code(code: u8) -> Option<u32> {
    RATES.get(usize::from(code)).copied()
}

/// Map Hz to a virtio rate code.
pub fn rate_code(hz: u32) -> Option<u8> {
    RATES
        .iter()
        .position(|&r| r == hz)
        .and_then(|i| u8::try_from(i).ok())
}

/// Little-endian field reader over a request that was already length-checked
/// by its caller; out-of-range reads return 0 rather than panic.
pub fn le32(buf: &[u8], off: usize) -> u32 {
    match buf.get(off..off.saturating_add(4)) {
        Some(b) => u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        None => 0,
    }
}

/// Byte at `off`, 0 if out of range.
pub fn byte(buf: &[u8], off: usize) -> u8 {
    buf.get(off).copied().unwrap_or(0)
}

/// Append a little-endian u32.
pub fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// Append a little-endian u64.
pub fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A `virtio_snd_pcm_status` (also used as a bare status header for
/// control responses, which are just the first 4 bytes).
pub fn pcm_status(status: Status, latency_bytes: u32) -> [u8; PCM_STATUS_SIZE] {
    let mut out = [0u8; PCM_STATUS_SIZE];
    out[..4].copy_from_slice(&(status as u32).to_le_bytes());
    out[4..].copy_from_slice(&latency_bytes.to_le_bytes());
    out
}

/// A `virtio_snd_event`.
pub fn event(code: u32, data: u32) -> [u8; EVENT_SIZE] {
    let mut out = [0u8; EVENT_SIZE];
    out[..4].copy_from_slice(&code.to_le_bytes());
    out[4..].copy_from_slice(&data.to_le_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_codes_roundtrip() {
        for f in SampleFormat::ALL {
            assert_eq!(format_from_code(format_code(f)), Some(f));
        }
        assert_eq!(format_from_code(0), None, "IMA_ADPCM is not supported");
        assert_eq!(format_from_code(255), None);
    }

    #[test]
    fn rate_codes_roundtrip() {
        assert_eq!(rate_from_code(7), Some(48000));
        assert_eq!(rate_code(44100), Some(6));
        assert_eq!(rate_from_code(14), None);
        assert_eq!(rate_code(12345), None);
    }

    #[test]
    fn short_buffers_read_as_zero() {
        assert_eq!(le32(&[1, 2], 0), 0);
        assert_eq!(le32(&[1, 0, 0, 0], usize::MAX), 0);
        assert_eq!(byte(&[], 3), 0);
    }
}
