//! Message types of the device⇄broker protocol.
//!
//! Streams are named by [`Direction`], not by a number the device chooses:
//! playback messages always concern the output stream and capture messages
//! always concern the input stream, so a rogue device cannot relabel one as
//! the other.

use bincode::{Decode, Encode};

/// `b"VSND"` little-endian; the first field of both hellos.
pub const MAGIC: u32 = u32::from_le_bytes(*b"VSND");

/// Bumped on every incompatible change to any type in this module.
///
/// Variant 0 of both enums (`Hello { magic, version, .. }`) keeps its first
/// two fields forever, so a peer of another version can still read them and
/// say clearly what is wrong.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest PCM payload carried by one [`DeviceMsg::Playback`] or
/// [`BrokerMsg::CaptureData`]; more is split into several messages.
pub const MAX_PCM_CHUNK: usize = 32 * 1024;

/// Largest guest buffer (one virtio-snd I/O message) the device forwards and
/// the broker accepts, in bytes. The Linux driver's periods are far smaller.
pub const MAX_BUFFER_BYTES: u32 = 4 * 1024 * 1024;

/// Largest guest ring buffer (`buffer_bytes` of SET_PARAMS) the device
/// accepts and the broker believes.
pub const MAX_GUEST_BUFFER_BYTES: u32 = 4 * MAX_BUFFER_BYTES;

/// Most capture requests the broker keeps queued per stream (a virtqueue has
/// at most this many buffers in flight).
pub const MAX_PENDING_CAPTURE: usize = 1024;

/// Most playback bytes the broker keeps queued for one stream before it
/// treats the device as misbehaving.
pub const MAX_QUEUED_PLAYBACK_BYTES: usize = 16 * 1024 * 1024;

/// A stream's direction, from the guest's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub enum Direction {
    /// Playback: guest → host speakers.
    Output,
    /// Capture: host microphone → guest.
    Input,
}

impl Direction {
    /// Both directions, output first.
    pub const ALL: [Direction; 2] = [Direction::Output, Direction::Input];

    /// The user-facing name: `output` or `input`.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Output => "output",
            Direction::Input => "input",
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Sample formats vsnd can carry. Sizes are per sample, per channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Encode, Decode)]
pub enum SampleFormat {
    /// Unsigned 8 bit.
    U8,
    /// Signed 8 bit.
    S8,
    /// Signed 16 bit little-endian.
    S16,
    /// Unsigned 16 bit little-endian.
    U16,
    /// Signed 24 bit packed in 3 bytes, little-endian.
    S24Packed,
    /// Signed 24 bit in the low bits of 4 bytes, little-endian.
    S24,
    /// Signed 32 bit little-endian.
    S32,
    /// Unsigned 32 bit little-endian.
    U32,
    /// IEEE-754 32 bit float little-endian.
    Float,
    /// IEEE-754 64 bit float little-endian.
    Float64,
}

impl SampleFormat {
    /// Every format, in a stable order.
    pub const ALL: [SampleFormat; 10] = [
        SampleFormat::U8,
        SampleFormat::S8,
        SampleFormat::S16,
        SampleFormat::U16,
        SampleFormat::S24Packed,
        SampleFormat::S24,
        SampleFormat::S32,
        SampleFormat::U32,
        SampleFormat::Float,
        SampleFormat::Float64,
    ];

    /// Bytes one sample of one channel occupies.
    pub fn bytes(self) -> u32 {
        match self {
            SampleFormat::U8 | SampleFormat::S8 => 1,
            SampleFormat::S16 | SampleFormat::U16 => 2,
            SampleFormat::S24Packed => 3,
            SampleFormat::S24 | SampleFormat::S32 | SampleFormat::U32 | SampleFormat::Float => 4,
            SampleFormat::Float64 => 8,
        }
    }

    /// The byte that encodes silence in this format (all formats here use
    /// a single repeated byte for silence).
    pub fn silence_byte(self) -> u8 {
        match self {
            SampleFormat::U8 => 0x80,
            // U16/U32 silence is 0x8000/0x80000000, not a repeated byte;
            // callers use [`SampleFormat::fill_silence`].
            _ => 0,
        }
    }

    /// Fill `buf` with silence in this format. A trailing partial sample is
    /// zero-filled.
    pub fn fill_silence(self, buf: &mut [u8]) {
        match self {
            SampleFormat::U16 => fill_pattern(buf, &[0x00, 0x80]),
            SampleFormat::U32 => fill_pattern(buf, &[0x00, 0x00, 0x00, 0x80]),
            other => buf.fill(other.silence_byte()),
        }
    }
}

fn fill_pattern(buf: &mut [u8], pattern: &[u8]) {
    let mut chunks = buf.chunks_exact_mut(pattern.len());
    for c in &mut chunks {
        c.copy_from_slice(pattern);
    }
    chunks.into_remainder().fill(0);
}

/// Stream parameters as the guest set them (already validated by the device,
/// validated again by the broker).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct PcmParams {
    /// Sample format.
    pub format: SampleFormat,
    /// Frames per second.
    pub rate: u32,
    /// Channels per frame.
    pub channels: u8,
    /// The guest's ring buffer size in bytes.
    pub buffer_bytes: u32,
    /// The guest's period size in bytes.
    pub period_bytes: u32,
}

impl PcmParams {
    /// Bytes per frame (all channels), at least 1 for any valid params.
    pub fn frame_bytes(&self) -> u32 {
        self.format.bytes().saturating_mul(u32::from(self.channels))
    }

    /// Bytes per second at the real-time rate.
    pub fn bytes_per_second(&self) -> u64 {
        u64::from(self.frame_bytes()) * u64::from(self.rate)
    }

    /// Bytes (whole frames) a stream with these parameters makes due in
    /// `elapsed` of real time.
    pub fn bytes_in(&self, elapsed: std::time::Duration) -> u64 {
        let frames = elapsed.as_nanos() * u128::from(self.rate) / 1_000_000_000;
        u64::try_from(frames * u128::from(self.frame_bytes())).unwrap_or(u64::MAX)
    }

    /// Real time until `bytes` are due, rounded up to whole frames: the
    /// inverse of [`PcmParams::bytes_in`]. Saturates far beyond any real
    /// deadline instead of overflowing.
    pub fn time_for(&self, bytes: u64) -> std::time::Duration {
        let frames = bytes.div_ceil(u64::from(self.frame_bytes().max(1)));
        let nanos = (u128::from(frames) * 1_000_000_000).div_ceil(u128::from(self.rate.max(1)));
        std::time::Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// What the broker's backend can do; the device advertises exactly this in
/// PCM_INFO.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Capabilities {
    /// Supported sample formats.
    pub formats: Vec<SampleFormat>,
    /// Supported rates in Hz.
    pub rates: Vec<u32>,
    /// Fewest channels per frame.
    pub channels_min: u8,
    /// Most channels per frame.
    pub channels_max: u8,
}

/// The broker's enable flags, as far as the guest may see them (the jacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct GateState {
    /// Playback reaches the host.
    pub output: bool,
    /// Host capture reaches the guest.
    pub input: bool,
}

impl GateState {
    /// The flag for one direction.
    pub fn get(&self, dir: Direction) -> bool {
        match dir {
            Direction::Output => self.output,
            Direction::Input => self.input,
        }
    }
}

/// Messages from vsnd-device to vsnd-broker. The broker treats every field
/// as hostile.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum DeviceMsg {
    /// First message on the channel.
    Hello {
        /// Must be [`MAGIC`].
        magic: u32,
        /// The device's [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// The guest set a stream's parameters (VIRTIO_SND_R_PCM_SET_PARAMS).
    SetParams {
        /// Which stream.
        direction: Direction,
        /// The parameters.
        params: PcmParams,
    },
    /// VIRTIO_SND_R_PCM_PREPARE.
    Prepare {
        /// Which stream.
        direction: Direction,
    },
    /// VIRTIO_SND_R_PCM_START: the stream's clock starts.
    Start {
        /// Which stream.
        direction: Direction,
    },
    /// VIRTIO_SND_R_PCM_STOP: the stream's clock pauses.
    Stop {
        /// Which stream.
        direction: Direction,
    },
    /// VIRTIO_SND_R_PCM_RELEASE: queued data is dropped.
    Release {
        /// Which stream.
        direction: Direction,
    },
    /// Playback bytes the guest's clock has consumed, in order: the device
    /// returned the buffers they came from to the guest. The broker plays
    /// them (or discards them while output is off) as they arrive, but
    /// never faster than the real-time rate: bytes beyond its budget wait.
    Playback {
        /// PCM bytes, at most [`MAX_PCM_CHUNK`].
        data: Vec<u8>,
    },
    /// A capture buffer of `len` bytes is due now (the device's clock has
    /// advanced by its length). The broker answers with
    /// [`BrokerMsg::CaptureData`] chunks at once, or once its own clock
    /// allows that much, with host samples only while input is enabled.
    Capture {
        /// The device's id for the guest buffer, increasing.
        buffer: u64,
        /// Bytes wanted, at most [`MAX_BUFFER_BYTES`].
        len: u32,
    },
}

/// How the device paces the guest, chosen by the broker (its hello).
///
/// The device owns the guest's clock: it returns playback buffers and asks
/// for capture data at the real-time rate from START on, so that the
/// broker does not have to wake up for every period. The broker still
/// meters both directions against its own clock and decides what capture
/// data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode)]
pub struct Pacing {
    /// Measurement only (`--unpaced-for-benchmark`): return playback and
    /// ask for capture as soon as buffers arrive.
    pub unpaced: bool,
    /// How long the device may collect consumed playback before sending it,
    /// in milliseconds; 0 sends each buffer's bytes when it is returned.
    /// The null backend, which drops playback, takes batches.
    pub playback_batch_ms: u16,
    /// Whether the backend has a host capture source at all. Without one
    /// (the null backend), or while input is off, the device fills capture
    /// buffers with silence itself instead of asking.
    pub host_capture: bool,
}

/// Messages from vsnd-broker to vsnd-device.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum BrokerMsg {
    /// Answer to the device's hello.
    Hello {
        /// Must be [`MAGIC`].
        magic: u32,
        /// The broker's [`PROTOCOL_VERSION`].
        version: u32,
        /// What the backend supports.
        caps: Capabilities,
        /// The flags at this moment (shown to the guest as jacks).
        gate: GateState,
        /// How the device paces the guest.
        pacing: Pacing,
    },
    /// Capture bytes for a buffer; chunks arrive in order, `last` ends it.
    CaptureData {
        /// The id from [`DeviceMsg::Capture`].
        buffer: u64,
        /// This chunk completes the buffer.
        last: bool,
        /// PCM bytes, at most [`MAX_PCM_CHUNK`].
        data: Vec<u8>,
    },
    /// The flags changed.
    Gate(GateState),
}
