//! virtio-snd wire format (virtio 1.2 §5.14, plus the 1.3 control-element
//! codes), written from the specification independently of `vsnd-device`.
//!
//! This module is deliberately a *second opinion*: it must not import anything
//! from the device crate, so a misreading of the spec in one place is caught
//! by the other.
//!
//! Every constant is the spec's name without the `VIRTIO_SND_` prefix
//! (`VIRTIO_SND_R_PCM_INFO` → [`R_PCM_INFO`]). All multi-byte fields are
//! little-endian. Builders return the exact request bytes; parsers take the
//! bytes the device wrote and check their length.

use thiserror::Error;

// ---------------------------------------------------------------------------
// Queues and device features
// ---------------------------------------------------------------------------

/// Control queue index.
pub const QUEUE_CONTROL: usize = 0;
/// Event queue index.
pub const QUEUE_EVENT: usize = 1;
/// Playback (transmit) queue index.
pub const QUEUE_TX: usize = 2;
/// Capture (receive) queue index.
pub const QUEUE_RX: usize = 3;
/// Number of virtqueues of a virtio-snd device.
pub const NUM_QUEUES: usize = 4;

/// Device feature bit (virtio 1.3): the device supports control elements and
/// its configuration has the `controls` field.
pub const F_CTLS: u32 = 0;

// ---------------------------------------------------------------------------
// Request, event and status codes (struct virtio_snd_hdr.code)
// ---------------------------------------------------------------------------

/// Query jack information.
pub const R_JACK_INFO: u32 = 1;
/// Remap a jack's association and sequence.
pub const R_JACK_REMAP: u32 = 2;

/// Query PCM stream information.
pub const R_PCM_INFO: u32 = 0x0100;
/// Set a stream's parameters.
pub const R_PCM_SET_PARAMS: u32 = 0x0101;
/// Prepare a stream.
pub const R_PCM_PREPARE: u32 = 0x0102;
/// Release a stream.
pub const R_PCM_RELEASE: u32 = 0x0103;
/// Start a stream.
pub const R_PCM_START: u32 = 0x0104;
/// Stop a stream.
pub const R_PCM_STOP: u32 = 0x0105;

/// Query channel-map information.
pub const R_CHMAP_INFO: u32 = 0x0200;

/// Control elements (virtio 1.3, only with [`F_CTLS`]): query information.
pub const R_CTL_INFO: u32 = 0x0300;
/// Control elements (1.3): enumerate an enumerated control's items.
pub const R_CTL_ENUM_ITEMS: u32 = 0x0301;
/// Control elements (1.3): read a value.
pub const R_CTL_READ: u32 = 0x0302;
/// Control elements (1.3): write a value.
pub const R_CTL_WRITE: u32 = 0x0303;
/// Control elements (1.3): read TLV metadata.
pub const R_CTL_TLV_READ: u32 = 0x0304;
/// Control elements (1.3): write TLV metadata.
pub const R_CTL_TLV_WRITE: u32 = 0x0305;
/// Control elements (1.3): TLV command.
pub const R_CTL_TLV_COMMAND: u32 = 0x0306;

/// Event: a jack was connected.
pub const EVT_JACK_CONNECTED: u32 = 0x1000;
/// Event: a jack was disconnected.
pub const EVT_JACK_DISCONNECTED: u32 = 0x1001;
/// Event: a hardware period elapsed (only with [`PCM_F_EVT_SHMEM_PERIODS`]).
pub const EVT_PCM_PERIOD_ELAPSED: u32 = 0x1100;
/// Event: an underflow/overflow happened (only with [`PCM_F_EVT_XRUNS`]).
pub const EVT_PCM_XRUN: u32 = 0x1101;
/// Event (1.3): a control element changed.
pub const EVT_CTL_NOTIFY: u32 = 0x1200;

/// Status: success.
pub const S_OK: u32 = 0x8000;
/// Status: malformed request.
pub const S_BAD_MSG: u32 = 0x8001;
/// Status: request not supported.
pub const S_NOT_SUPP: u32 = 0x8002;
/// Status: I/O error.
pub const S_IO_ERR: u32 = 0x8003;

// ---------------------------------------------------------------------------
// Directions, feature bits
// ---------------------------------------------------------------------------

/// Data direction: playback, driver → device.
pub const D_OUTPUT: u8 = 0;
/// Data direction: capture, device → driver.
pub const D_INPUT: u8 = 1;

/// Jack feature bit: the jack supports `R_JACK_REMAP`.
pub const JACK_F_REMAP: u32 = 0;

/// PCM feature bit: shared memory allocated by the host.
pub const PCM_F_SHMEM_HOST: u32 = 0;
/// PCM feature bit: shared memory allocated by the guest.
pub const PCM_F_SHMEM_GUEST: u32 = 1;
/// PCM feature bit: message-based transport polling.
pub const PCM_F_MSG_POLLING: u32 = 2;
/// PCM feature bit: period-elapsed notifications for shared memory.
pub const PCM_F_EVT_SHMEM_PERIODS: u32 = 3;
/// PCM feature bit: xrun notifications.
pub const PCM_F_EVT_XRUNS: u32 = 4;

// ---------------------------------------------------------------------------
// PCM formats (bit numbers in virtio_snd_pcm_info.formats)
// ---------------------------------------------------------------------------

/// IMA ADPCM.
pub const PCM_FMT_IMA_ADPCM: u8 = 0;
/// µ-law.
pub const PCM_FMT_MU_LAW: u8 = 1;
/// A-law.
pub const PCM_FMT_A_LAW: u8 = 2;
/// Signed 8 bit.
pub const PCM_FMT_S8: u8 = 3;
/// Unsigned 8 bit.
pub const PCM_FMT_U8: u8 = 4;
/// Signed 16 bit.
pub const PCM_FMT_S16: u8 = 5;
/// Unsigned 16 bit.
pub const PCM_FMT_U16: u8 = 6;
/// Signed 18 bit in 3 bytes.
pub const PCM_FMT_S18_3: u8 = 7;
/// Unsigned 18 bit in 3 bytes.
pub const PCM_FMT_U18_3: u8 = 8;
/// Signed 20 bit in 3 bytes.
pub const PCM_FMT_S20_3: u8 = 9;
/// Unsigned 20 bit in 3 bytes.
pub const PCM_FMT_U20_3: u8 = 10;
/// Signed 24 bit in 3 bytes.
pub const PCM_FMT_S24_3: u8 = 11;
/// Unsigned 24 bit in 3 bytes.
pub const PCM_FMT_U24_3: u8 = 12;
/// Signed 20 bit in 4 bytes.
pub const PCM_FMT_S20: u8 = 13;
/// Unsigned 20 bit in 4 bytes.
pub const PCM_FMT_U20: u8 = 14;
/// Signed 24 bit in 4 bytes.
pub const PCM_FMT_S24: u8 = 15;
/// Unsigned 24 bit in 4 bytes.
pub const PCM_FMT_U24: u8 = 16;
/// Signed 32 bit.
pub const PCM_FMT_S32: u8 = 17;
/// Unsigned 32 bit.
pub const PCM_FMT_U32: u8 = 18;
/// 32-bit float.
pub const PCM_FMT_FLOAT: u8 = 19;
/// 64-bit float.
pub const PCM_FMT_FLOAT64: u8 = 20;
/// DSD, 8 bit.
pub const PCM_FMT_DSD_U8: u8 = 21;
/// DSD, 16 bit.
pub const PCM_FMT_DSD_U16: u8 = 22;
/// DSD, 32 bit.
pub const PCM_FMT_DSD_U32: u8 = 23;
/// IEC958 subframe.
pub const PCM_FMT_IEC958_SUBFRAME: u8 = 24;
/// Number of defined formats (valid values are `0..PCM_FMT_COUNT`).
pub const PCM_FMT_COUNT: u8 = 25;

/// The formats vsnd carries (what its null, file and PipeWire backends
/// advertise; ALSA's are those of these its device accepts).
pub const VSND_FORMATS: [u8; 10] = [
    PCM_FMT_U8,
    PCM_FMT_S8,
    PCM_FMT_S16,
    PCM_FMT_U16,
    PCM_FMT_S24_3,
    PCM_FMT_S24,
    PCM_FMT_S32,
    PCM_FMT_U32,
    PCM_FMT_FLOAT,
    PCM_FMT_FLOAT64,
];

/// Bytes one sample of `format` occupies in a buffer (its physical width),
/// or `None` for IMA ADPCM (4 bits) and undefined formats.
pub fn format_bytes(format: u8) -> Option<u32> {
    match format {
        PCM_FMT_MU_LAW | PCM_FMT_A_LAW | PCM_FMT_S8 | PCM_FMT_U8 | PCM_FMT_DSD_U8 => Some(1),
        PCM_FMT_S16 | PCM_FMT_U16 | PCM_FMT_DSD_U16 => Some(2),
        PCM_FMT_S18_3 | PCM_FMT_U18_3 | PCM_FMT_S20_3 | PCM_FMT_U20_3 | PCM_FMT_S24_3
        | PCM_FMT_U24_3 => Some(3),
        PCM_FMT_S20
        | PCM_FMT_U20
        | PCM_FMT_S24
        | PCM_FMT_U24
        | PCM_FMT_S32
        | PCM_FMT_U32
        | PCM_FMT_FLOAT
        | PCM_FMT_DSD_U32
        | PCM_FMT_IEC958_SUBFRAME => Some(4),
        PCM_FMT_FLOAT64 => Some(8),
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// PCM rates (bit numbers in virtio_snd_pcm_info.rates)
// ---------------------------------------------------------------------------

/// 5512 Hz.
pub const PCM_RATE_5512: u8 = 0;
/// 8000 Hz.
pub const PCM_RATE_8000: u8 = 1;
/// 11025 Hz.
pub const PCM_RATE_11025: u8 = 2;
/// 16000 Hz.
pub const PCM_RATE_16000: u8 = 3;
/// 22050 Hz.
pub const PCM_RATE_22050: u8 = 4;
/// 32000 Hz.
pub const PCM_RATE_32000: u8 = 5;
/// 44100 Hz.
pub const PCM_RATE_44100: u8 = 6;
/// 48000 Hz.
pub const PCM_RATE_48000: u8 = 7;
/// 64000 Hz.
pub const PCM_RATE_64000: u8 = 8;
/// 88200 Hz.
pub const PCM_RATE_88200: u8 = 9;
/// 96000 Hz.
pub const PCM_RATE_96000: u8 = 10;
/// 176400 Hz.
pub const PCM_RATE_176400: u8 = 11;
/// 192000 Hz.
pub const PCM_RATE_192000: u8 = 12;
/// 384000 Hz.
pub const PCM_RATE_384000: u8 = 13;

/// Frequency in Hz of each rate code, indexed by the code.
pub const RATES_HZ: [u32; 14] = [
    5512, 8000, 11025, 16000, 22050, 32000, 44100, 48000, 64000, 88200, 96000, 176400, 192000,
    384000,
];

/// Frequency in Hz of rate code `rate`, `None` when undefined.
pub fn rate_hz(rate: u8) -> Option<u32> {
    RATES_HZ.get(usize::from(rate)).copied()
}

// ---------------------------------------------------------------------------
// Channel map positions
// ---------------------------------------------------------------------------

/// Maximum number of positions in a channel map.
pub const CHMAP_MAX_SIZE: usize = 18;

/// Undefined.
pub const CHMAP_NONE: u8 = 0;
/// Silent.
pub const CHMAP_NA: u8 = 1;
/// Mono stream.
pub const CHMAP_MONO: u8 = 2;
/// Front left.
pub const CHMAP_FL: u8 = 3;
/// Front right.
pub const CHMAP_FR: u8 = 4;
/// Rear left.
pub const CHMAP_RL: u8 = 5;
/// Rear right.
pub const CHMAP_RR: u8 = 6;
/// Front center.
pub const CHMAP_FC: u8 = 7;
/// Low frequency (LFE).
pub const CHMAP_LFE: u8 = 8;
/// Side left.
pub const CHMAP_SL: u8 = 9;
/// Side right.
pub const CHMAP_SR: u8 = 10;
/// Rear center.
pub const CHMAP_RC: u8 = 11;
/// Front left center.
pub const CHMAP_FLC: u8 = 12;
/// Front right center.
pub const CHMAP_FRC: u8 = 13;
/// Rear left center.
pub const CHMAP_RLC: u8 = 14;
/// Rear right center.
pub const CHMAP_RRC: u8 = 15;
/// Front left wide.
pub const CHMAP_FLW: u8 = 16;
/// Front right wide.
pub const CHMAP_FRW: u8 = 17;
/// Front left high.
pub const CHMAP_FLH: u8 = 18;
/// Front center high.
pub const CHMAP_FCH: u8 = 19;
/// Front right high.
pub const CHMAP_FRH: u8 = 20;
/// Top center.
pub const CHMAP_TC: u8 = 21;
/// Top front left.
pub const CHMAP_TFL: u8 = 22;
/// Top front right.
pub const CHMAP_TFR: u8 = 23;
/// Top front center.
pub const CHMAP_TFC: u8 = 24;
/// Top rear left.
pub const CHMAP_TRL: u8 = 25;
/// Top rear right.
pub const CHMAP_TRR: u8 = 26;
/// Top rear center.
pub const CHMAP_TRC: u8 = 27;
/// Top front left center.
pub const CHMAP_TFLC: u8 = 28;
/// Top front right center.
pub const CHMAP_TFRC: u8 = 29;
/// Top side left.
pub const CHMAP_TSL: u8 = 30;
/// Top side right.
pub const CHMAP_TSR: u8 = 31;
/// Left LFE.
pub const CHMAP_LLFE: u8 = 32;
/// Right LFE.
pub const CHMAP_RLFE: u8 = 33;
/// Bottom center.
pub const CHMAP_BC: u8 = 34;
/// Bottom left center.
pub const CHMAP_BLC: u8 = 35;
/// Bottom right center.
pub const CHMAP_BRC: u8 = 36;

// ---------------------------------------------------------------------------
// Structure sizes (bytes on the wire)
// ---------------------------------------------------------------------------

/// `struct virtio_snd_config` as in virtio 1.2: jacks, streams, chmaps.
pub const CONFIG_SIZE: usize = 12;
/// `struct virtio_snd_config` with the 1.3 `controls` field.
pub const CONFIG_SIZE_CTLS: usize = 16;
/// `struct virtio_snd_hdr`: code.
pub const HDR_SIZE: usize = 4;
/// `struct virtio_snd_event`: hdr, data.
pub const EVENT_SIZE: usize = 8;
/// `struct virtio_snd_query_info`: hdr, start_id, count, size.
pub const QUERY_INFO_SIZE: usize = 16;
/// `struct virtio_snd_info`: hda_fn_nid.
pub const INFO_SIZE: usize = 4;
/// `struct virtio_snd_jack_hdr`: hdr, jack_id.
pub const JACK_HDR_SIZE: usize = 8;
/// `struct virtio_snd_jack_info`: info, features, hda_reg_defconf,
/// hda_reg_caps, connected, padding\[7\].
pub const JACK_INFO_SIZE: usize = 24;
/// `struct virtio_snd_jack_remap`: jack_hdr, association, sequence.
pub const JACK_REMAP_SIZE: usize = 16;
/// `struct virtio_snd_pcm_hdr`: hdr, stream_id.
pub const PCM_HDR_SIZE: usize = 8;
/// `struct virtio_snd_pcm_info`: info, features, formats (le64), rates (le64),
/// direction, channels_min, channels_max, padding\[5\].
pub const PCM_INFO_SIZE: usize = 32;
/// `struct virtio_snd_pcm_set_params`: pcm_hdr, buffer_bytes, period_bytes,
/// features, channels, format, rate, padding.
pub const PCM_SET_PARAMS_SIZE: usize = 24;
/// `struct virtio_snd_pcm_xfer`: stream_id.
pub const PCM_XFER_SIZE: usize = 4;
/// `struct virtio_snd_pcm_status`: status, latency_bytes.
pub const PCM_STATUS_SIZE: usize = 8;
/// `struct virtio_snd_chmap_info`: info, direction, channels,
/// positions\[18\].
pub const CHMAP_INFO_SIZE: usize = 24;

// ---------------------------------------------------------------------------
// Names, for failure messages
// ---------------------------------------------------------------------------

/// Spec name of a status code (`"S_OK"`…), `"?"` when unknown.
pub fn status_name(status: u32) -> &'static str {
    match status {
        S_OK => "S_OK",
        S_BAD_MSG => "S_BAD_MSG",
        S_NOT_SUPP => "S_NOT_SUPP",
        S_IO_ERR => "S_IO_ERR",
        _ => "?",
    }
}

/// Spec name of a request or event code (`"R_PCM_INFO"`…), `"?"` when unknown.
pub fn code_name(code: u32) -> &'static str {
    match code {
        R_JACK_INFO => "R_JACK_INFO",
        R_JACK_REMAP => "R_JACK_REMAP",
        R_PCM_INFO => "R_PCM_INFO",
        R_PCM_SET_PARAMS => "R_PCM_SET_PARAMS",
        R_PCM_PREPARE => "R_PCM_PREPARE",
        R_PCM_RELEASE => "R_PCM_RELEASE",
        R_PCM_START => "R_PCM_START",
        R_PCM_STOP => "R_PCM_STOP",
        R_CHMAP_INFO => "R_CHMAP_INFO",
        R_CTL_INFO => "R_CTL_INFO",
        R_CTL_ENUM_ITEMS => "R_CTL_ENUM_ITEMS",
        R_CTL_READ => "R_CTL_READ",
        R_CTL_WRITE => "R_CTL_WRITE",
        R_CTL_TLV_READ => "R_CTL_TLV_READ",
        R_CTL_TLV_WRITE => "R_CTL_TLV_WRITE",
        R_CTL_TLV_COMMAND => "R_CTL_TLV_COMMAND",
        EVT_JACK_CONNECTED => "EVT_JACK_CONNECTED",
        EVT_JACK_DISCONNECTED => "EVT_JACK_DISCONNECTED",
        EVT_PCM_PERIOD_ELAPSED => "EVT_PCM_PERIOD_ELAPSED",
        EVT_PCM_XRUN => "EVT_PCM_XRUN",
        EVT_CTL_NOTIFY => "EVT_CTL_NOTIFY",
        _ => "?",
    }
}

// ---------------------------------------------------------------------------
// Request builders
// ---------------------------------------------------------------------------

fn le32s(fields: &[u32]) -> Vec<u8> {
    fields.iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// `virtio_snd_hdr` alone (4 bytes): a request with nothing but a code.
pub fn hdr(code: u32) -> Vec<u8> {
    le32s(&[code])
}

/// `virtio_snd_query_info` (16 bytes) for `R_JACK_INFO`, `R_PCM_INFO` or
/// `R_CHMAP_INFO`: ask for `count` items from `start_id`, each `size` bytes in
/// the response (normally [`JACK_INFO_SIZE`], [`PCM_INFO_SIZE`] or
/// [`CHMAP_INFO_SIZE`]). The response is a `virtio_snd_hdr` followed by
/// `count * size` bytes; see [`split_info`].
pub fn query_info(code: u32, start_id: u32, count: u32, size: u32) -> Vec<u8> {
    le32s(&[code, start_id, count, size])
}

/// `virtio_snd_jack_hdr` (8 bytes).
pub fn jack_hdr(code: u32, jack_id: u32) -> Vec<u8> {
    le32s(&[code, jack_id])
}

/// `virtio_snd_jack_remap` (16 bytes): `R_JACK_REMAP` of `jack_id`.
pub fn jack_remap(jack_id: u32, association: u32, sequence: u32) -> Vec<u8> {
    le32s(&[R_JACK_REMAP, jack_id, association, sequence])
}

/// `virtio_snd_pcm_hdr` (8 bytes): `R_PCM_PREPARE`, `R_PCM_RELEASE`,
/// `R_PCM_START`, `R_PCM_STOP` (or any code, for hostile tests).
pub fn pcm_hdr(code: u32, stream_id: u32) -> Vec<u8> {
    le32s(&[code, stream_id])
}

/// `virtio_snd_pcm_set_params` (24 bytes). `features` is a bit mask of
/// `1 << PCM_F_*`; `format` a `PCM_FMT_*`; `rate` a `PCM_RATE_*` code.
pub fn pcm_set_params(
    stream_id: u32,
    buffer_bytes: u32,
    period_bytes: u32,
    features: u32,
    channels: u8,
    format: u8,
    rate: u8,
) -> Vec<u8> {
    let mut v = le32s(&[
        R_PCM_SET_PARAMS,
        stream_id,
        buffer_bytes,
        period_bytes,
        features,
    ]);
    v.extend_from_slice(&[channels, format, rate, 0]);
    v
}

/// `virtio_snd_pcm_xfer` (4 bytes): the header of every TX/RX buffer.
pub fn pcm_xfer(stream_id: u32) -> Vec<u8> {
    le32s(&[stream_id])
}

// ---------------------------------------------------------------------------
// Response parsers
// ---------------------------------------------------------------------------

/// A device response did not have the shape the spec gives it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    /// Too few bytes for the structure.
    #[error("{what}: needs {need} bytes, the device wrote {got}")]
    Short {
        /// Structure being parsed.
        what: &'static str,
        /// Bytes it needs.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// An info response whose items are not a whole number of records.
    #[error("{what}: {got} bytes after the header are not a whole number of {size}-byte items")]
    Ragged {
        /// Structure being parsed.
        what: &'static str,
        /// Item size.
        size: usize,
        /// Bytes after the header.
        got: usize,
    },
}

fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), ParseError> {
    if b.len() < n {
        Err(ParseError::Short {
            what,
            need: n,
            got: b.len(),
        })
    } else {
        Ok(())
    }
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(off..off + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(off..off + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

fn u8_at(b: &[u8], off: usize) -> u8 {
    b.get(off).copied().unwrap_or(0)
}

/// The status code at the start of a response (`virtio_snd_hdr.code`).
pub fn status(resp: &[u8]) -> Result<u32, ParseError> {
    need("virtio_snd_hdr", resp, HDR_SIZE)?;
    Ok(u32_at(resp, 0))
}

/// Split an info response (`virtio_snd_hdr` + items) into its status and
/// `size`-byte items. Items are only present when the status is `S_OK`; a
/// response that is just the header gives an empty list.
pub fn split_info(resp: &[u8], size: usize) -> Result<(u32, Vec<&[u8]>), ParseError> {
    let st = status(resp)?;
    let rest = resp.get(HDR_SIZE..).unwrap_or(&[]);
    if size == 0 || rest.len() % size != 0 {
        return Err(ParseError::Ragged {
            what: "info response",
            size,
            got: rest.len(),
        });
    }
    Ok((st, rest.chunks(size).collect()))
}

/// `struct virtio_snd_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Number of jacks.
    pub jacks: u32,
    /// Number of PCM streams.
    pub streams: u32,
    /// Number of channel maps.
    pub chmaps: u32,
    /// Number of control elements (1.3), when the bytes include the field.
    pub controls: Option<u32>,
}

impl Config {
    /// Parse 12 (virtio 1.2) or 16 or more (1.3 `controls`) config bytes.
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        need("virtio_snd_config", b, CONFIG_SIZE)?;
        Ok(Self {
            jacks: u32_at(b, 0),
            streams: u32_at(b, 4),
            chmaps: u32_at(b, 8),
            controls: (b.len() >= CONFIG_SIZE_CTLS).then(|| u32_at(b, 12)),
        })
    }
}

/// `struct virtio_snd_jack_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JackInfo {
    /// HDA function node id.
    pub hda_fn_nid: u32,
    /// Bit mask of `1 << JACK_F_*`.
    pub features: u32,
    /// HDA pin configuration default register.
    pub hda_reg_defconf: u32,
    /// HDA pin capabilities register.
    pub hda_reg_caps: u32,
    /// Non-zero when connected.
    pub connected: u8,
    /// Padding (the device should write zeros).
    pub padding: [u8; 7],
}

impl JackInfo {
    /// Parse one jack info item.
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        need("virtio_snd_jack_info", b, JACK_INFO_SIZE)?;
        let mut padding = [0u8; 7];
        padding.copy_from_slice(b.get(17..24).unwrap_or(&[0; 7]));
        Ok(Self {
            hda_fn_nid: u32_at(b, 0),
            features: u32_at(b, 4),
            hda_reg_defconf: u32_at(b, 8),
            hda_reg_caps: u32_at(b, 12),
            connected: u8_at(b, 16),
            padding,
        })
    }
}

/// `struct virtio_snd_pcm_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcmInfo {
    /// HDA function node id.
    pub hda_fn_nid: u32,
    /// Bit mask of `1 << PCM_F_*`.
    pub features: u32,
    /// Bit mask of `1 << PCM_FMT_*`.
    pub formats: u64,
    /// Bit mask of `1 << PCM_RATE_*`.
    pub rates: u64,
    /// `D_OUTPUT` or `D_INPUT`.
    pub direction: u8,
    /// Minimum channels.
    pub channels_min: u8,
    /// Maximum channels.
    pub channels_max: u8,
    /// Padding (the device should write zeros).
    pub padding: [u8; 5],
}

impl PcmInfo {
    /// Parse one PCM info item.
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        need("virtio_snd_pcm_info", b, PCM_INFO_SIZE)?;
        let mut padding = [0u8; 5];
        padding.copy_from_slice(b.get(27..32).unwrap_or(&[0; 5]));
        Ok(Self {
            hda_fn_nid: u32_at(b, 0),
            features: u32_at(b, 4),
            formats: u64_at(b, 8),
            rates: u64_at(b, 16),
            direction: u8_at(b, 24),
            channels_min: u8_at(b, 25),
            channels_max: u8_at(b, 26),
            padding,
        })
    }

    /// Whether format `fmt` (a `PCM_FMT_*`) is offered.
    pub fn has_format(&self, fmt: u8) -> bool {
        fmt < 64 && self.formats & (1u64 << fmt) != 0
    }

    /// Whether rate `rate` (a `PCM_RATE_*`) is offered.
    pub fn has_rate(&self, rate: u8) -> bool {
        rate < 64 && self.rates & (1u64 << rate) != 0
    }
}

/// `struct virtio_snd_chmap_info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChmapInfo {
    /// HDA function node id.
    pub hda_fn_nid: u32,
    /// `D_OUTPUT` or `D_INPUT`.
    pub direction: u8,
    /// Number of valid entries in `positions`.
    pub channels: u8,
    /// `CHMAP_*` positions.
    pub positions: [u8; CHMAP_MAX_SIZE],
}

impl ChmapInfo {
    /// Parse one channel map info item.
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        need("virtio_snd_chmap_info", b, CHMAP_INFO_SIZE)?;
        let mut positions = [0u8; CHMAP_MAX_SIZE];
        positions.copy_from_slice(b.get(6..24).unwrap_or(&[0; CHMAP_MAX_SIZE]));
        Ok(Self {
            hda_fn_nid: u32_at(b, 0),
            direction: u8_at(b, 4),
            channels: u8_at(b, 5),
            positions,
        })
    }

    /// The valid positions (`channels` of them, at most [`CHMAP_MAX_SIZE`]).
    pub fn valid_positions(&self) -> &[u8] {
        let n = usize::from(self.channels).min(CHMAP_MAX_SIZE);
        self.positions.get(..n).unwrap_or(&[])
    }
}

/// `struct virtio_snd_pcm_status`, the trailer of every TX/RX buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PcmStatus {
    /// `S_*` status.
    pub status: u32,
    /// Device-side latency in bytes.
    pub latency_bytes: u32,
}

impl PcmStatus {
    /// Parse exactly the 8 status bytes.
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        need("virtio_snd_pcm_status", b, PCM_STATUS_SIZE)?;
        Ok(Self {
            status: u32_at(b, 0),
            latency_bytes: u32_at(b, 4),
        })
    }

    /// Parse the status at the *end* of the bytes a device wrote into an RX
    /// buffer (`data…, status`); returns the data and the status.
    pub fn split_rx(b: &[u8]) -> Result<(&[u8], Self), ParseError> {
        need(
            "RX buffer (data + virtio_snd_pcm_status)",
            b,
            PCM_STATUS_SIZE,
        )?;
        let (data, st) = b.split_at(b.len() - PCM_STATUS_SIZE);
        Ok((data, Self::parse(st)?))
    }
}

/// `struct virtio_snd_event`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// `EVT_*` code.
    pub code: u32,
    /// Event data (jack id, stream id, control id).
    pub data: u32,
}

impl Event {
    /// Parse one event.
    pub fn parse(b: &[u8]) -> Result<Self, ParseError> {
        need("virtio_snd_event", b, EVENT_SIZE)?;
        Ok(Self {
            code: u32_at(b, 0),
            data: u32_at(b, 4),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_have_spec_sizes() {
        assert_eq!(hdr(R_PCM_INFO).len(), HDR_SIZE);
        assert_eq!(query_info(R_PCM_INFO, 0, 1, 32).len(), QUERY_INFO_SIZE);
        assert_eq!(jack_hdr(R_JACK_INFO, 0).len(), JACK_HDR_SIZE);
        assert_eq!(jack_remap(0, 1, 2).len(), JACK_REMAP_SIZE);
        assert_eq!(pcm_hdr(R_PCM_START, 0).len(), PCM_HDR_SIZE);
        assert_eq!(
            pcm_set_params(0, 8192, 4096, 0, 2, PCM_FMT_S16, PCM_RATE_48000).len(),
            24
        );
        assert_eq!(pcm_xfer(1).len(), PCM_XFER_SIZE);
    }

    #[test]
    fn set_params_layout() {
        let b = pcm_set_params(
            3,
            0x1000,
            0x400,
            1 << PCM_F_EVT_XRUNS,
            2,
            PCM_FMT_S16,
            PCM_RATE_44100,
        );
        assert_eq!(
            b,
            [
                0x01, 0x01, 0, 0, // code
                3, 0, 0, 0, // stream
                0, 0x10, 0, 0, // buffer_bytes
                0, 0x04, 0, 0, // period_bytes
                0x10, 0, 0, 0, // features
                2, 5, 6, 0, // channels, format, rate, padding
            ]
        );
    }

    #[test]
    fn parse_pcm_info() {
        let mut b = vec![0u8; PCM_INFO_SIZE];
        b[0..4].copy_from_slice(&7u32.to_le_bytes());
        b[8..16].copy_from_slice(&(1u64 << PCM_FMT_S16).to_le_bytes());
        b[16..24].copy_from_slice(&(1u64 << PCM_RATE_48000).to_le_bytes());
        b[24] = D_INPUT;
        b[25] = 1;
        b[26] = 2;
        let i = PcmInfo::parse(&b).unwrap();
        assert_eq!(i.hda_fn_nid, 7);
        assert!(i.has_format(PCM_FMT_S16) && !i.has_format(PCM_FMT_S32));
        assert!(i.has_rate(PCM_RATE_48000) && !i.has_rate(PCM_RATE_44100));
        assert_eq!(
            (i.direction, i.channels_min, i.channels_max),
            (D_INPUT, 1, 2)
        );
        assert!(PcmInfo::parse(&b[..31]).is_err());
    }

    #[test]
    fn parse_info_response() {
        let mut r = S_OK.to_le_bytes().to_vec();
        r.extend_from_slice(&[0u8; 2 * CHMAP_INFO_SIZE]);
        r[4 + CHMAP_INFO_SIZE + 5] = 2;
        r[4 + CHMAP_INFO_SIZE + 6] = CHMAP_FL;
        r[4 + CHMAP_INFO_SIZE + 7] = CHMAP_FR;
        let (st, items) = split_info(&r, CHMAP_INFO_SIZE).unwrap();
        assert_eq!(st, S_OK);
        assert_eq!(items.len(), 2);
        let c = ChmapInfo::parse(items[1]).unwrap();
        assert_eq!(c.valid_positions(), &[CHMAP_FL, CHMAP_FR]);
        assert!(split_info(&r[..r.len() - 1], CHMAP_INFO_SIZE).is_err());
        assert!(status(&[0, 0x80]).is_err());
    }

    #[test]
    fn parse_rx_and_config() {
        let mut b = vec![9u8; 16];
        b.extend_from_slice(&S_OK.to_le_bytes());
        b.extend_from_slice(&64u32.to_le_bytes());
        let (data, st) = PcmStatus::split_rx(&b).unwrap();
        assert_eq!(data, &[9u8; 16]);
        assert_eq!(
            st,
            PcmStatus {
                status: S_OK,
                latency_bytes: 64
            }
        );
        let c = Config::parse(&[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0]).unwrap();
        assert_eq!((c.jacks, c.streams, c.chmaps, c.controls), (1, 2, 3, None));
        assert_eq!(rate_hz(PCM_RATE_48000), Some(48000));
        assert_eq!(rate_hz(14), None);
        assert_eq!(format_bytes(PCM_FMT_S24_3), Some(3));
        assert_eq!(format_bytes(PCM_FMT_IMA_ADPCM), None);
    }
}
