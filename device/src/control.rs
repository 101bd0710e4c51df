//! Control requests: parse a guest request, answer it, and say what the
//! broker must be told. Pure (no I/O, no guest memory), so it is unit-tested
//! and fuzzed directly.

use vsnd_ipc::{Capabilities, DeviceMsg, Direction, GateState, PcmParams, MAX_BUFFER_BYTES};

use crate::virtio_snd::*;
use vsnd_ipc::lifecycle::{PcmCommand, PcmState, Stream};

/// Streams this device exposes: id 0 is the output, id 1 the input. Both
/// always exist; the broker's gate, not the stream list, decides what flows.
pub const STREAMS: [Direction; 2] = [Direction::Output, Direction::Input];

/// One jack per stream, same ids; reported connected while the broker lets
/// that direction through.
pub const JACKS: [Direction; 2] = [Direction::Output, Direction::Input];

pub use vsnd_ipc::MAX_GUEST_BUFFER_BYTES;

/// Largest control response this device ever builds (PCM/JACK/CHMAP info
/// for every item fits far below this).
pub const MAX_CONTROL_RESPONSE: usize = 4096;

/// Channel layouts offered per direction, as channel-position lists.
const LAYOUTS: [&[u8]; 5] = [
    &[CHMAP_MONO],
    &[CHMAP_FL, CHMAP_FR],
    &[CHMAP_FL, CHMAP_FR, CHMAP_RL, CHMAP_RR],
    &[CHMAP_FL, CHMAP_FR, CHMAP_RL, CHMAP_RR, CHMAP_FC, CHMAP_LFE],
    &[
        CHMAP_FL, CHMAP_FR, CHMAP_RL, CHMAP_RR, CHMAP_FC, CHMAP_LFE, CHMAP_SL, CHMAP_SR,
    ],
];

/// Look up a stream by its wire id.
pub fn stream_direction(id: u32) -> Option<Direction> {
    STREAMS.get(usize::try_from(id).ok()?).copied()
}

/// The answer to one control request.
#[derive(Debug, PartialEq, Eq)]
pub struct ControlOutcome {
    /// Bytes to write into the guest's response buffer.
    pub response: Vec<u8>,
    /// What to tell the broker, if the request changed a stream.
    pub effect: Option<DeviceMsg>,
}

impl ControlOutcome {
    fn status(status: Status) -> Self {
        ControlOutcome {
            response: (status as u32).to_le_bytes().to_vec(),
            effect: None,
        }
    }
}

/// The device model: what it advertises and the state of its streams.
#[derive(Debug, Clone)]
pub struct SndModel {
    formats: u64,
    rates: u64,
    channels_min: u8,
    channels_max: u8,
    gate: GateState,
    streams: [Stream; 2],
}

impl SndModel {
    /// Build the model from the broker's capabilities. Formats and rates
    /// virtio cannot express are dropped; channel counts are clamped to
    /// 1..=8 (the chmaps offered).
    pub fn new(caps: &Capabilities, gate: GateState) -> Self {
        let formats = caps
            .formats
            .iter()
            .fold(0u64, |m, f| m | 1u64 << format_code(*f));
        let rates = caps
            .rates
            .iter()
            .filter_map(|r| rate_code(*r))
            .fold(0u64, |m, c| m | 1u64 << c);
        let channels_max = caps.channels_max.clamp(1, 8);
        let channels_min = caps.channels_min.clamp(1, channels_max);
        SndModel {
            formats,
            rates,
            channels_min,
            channels_max,
            gate,
            streams: Default::default(),
        }
    }

    /// The stream with wire id `id`.
    pub fn stream(&self, d: Direction) -> &Stream {
        match d {
            Direction::Output => &self.streams[0],
            Direction::Input => &self.streams[1],
        }
    }

    fn stream_mut(&mut self, d: Direction) -> &mut Stream {
        match d {
            Direction::Output => &mut self.streams[0],
            Direction::Input => &mut self.streams[1],
        }
    }

    /// Forget a stream's state (its queue was stopped by the frontend);
    /// returns the state it was in.
    pub fn reset_stream(&mut self, d: Direction) -> PcmState {
        let s = self.stream_mut(d);
        let was = s.state();
        *s = Stream::default();
        was
    }

    /// The broker changed its flags (the jacks follow them).
    pub fn set_gate(&mut self, gate: GateState) {
        self.gate = gate;
    }

    /// `virtio_snd_config`: jacks, streams, chmaps, controls (0).
    pub fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut out = Vec::with_capacity(CONFIG_SIZE);
        put32(&mut out, JACKS.len() as u32);
        put32(&mut out, STREAMS.len() as u32);
        put32(&mut out, (LAYOUTS.len() * STREAMS.len()) as u32);
        put32(&mut out, 0);
        let mut cfg = [0u8; CONFIG_SIZE];
        cfg.copy_from_slice(&out);
        cfg
    }

    /// Answer one control request. `max_response` is the size of the
    /// guest's device-writable buffer.
    pub fn handle(&mut self, req: &[u8], max_response: usize) -> ControlOutcome {
        if req.len() < HDR_SIZE {
            return ControlOutcome::status(Status::BadMsg);
        }
        match le32(req, 0) {
            R_JACK_INFO => self.query(
                req,
                max_response,
                JACK_INFO_SIZE,
                JACKS.len(),
                |m, i, out| m.jack_info(i, out),
            ),
            R_PCM_INFO => self.query(
                req,
                max_response,
                PCM_INFO_SIZE,
                STREAMS.len(),
                |m, i, out| m.pcm_info(i, out),
            ),
            R_CHMAP_INFO => {
                let n = LAYOUTS.len() * STREAMS.len();
                self.query(req, max_response, CHMAP_INFO_SIZE, n, |_, i, out| {
                    chmap_info(i, out)
                })
            }
            R_JACK_REMAP => self.jack_remap(req),
            R_PCM_SET_PARAMS => self.set_params(req),
            R_PCM_PREPARE => self.pcm_command(req, PcmCommand::Prepare),
            R_PCM_START => self.pcm_command(req, PcmCommand::Start),
            R_PCM_STOP => self.pcm_command(req, PcmCommand::Stop),
            R_PCM_RELEASE => self.pcm_command(req, PcmCommand::Release),
            code => {
                log::debug!("control: unknown request code {code:#x}");
                ControlOutcome::status(Status::NotSupp)
            }
        }
    }

    /// An item query (`virtio_snd_query_info`): validates the range and the
    /// item size, then answers OK followed by `count` items of `size` bytes
    /// (ours, zero-padded if the guest's `size` is larger).
    fn query(
        &self,
        req: &[u8],
        max_response: usize,
        item_size: usize,
        items: usize,
        fill: impl Fn(&Self, usize, &mut Vec<u8>),
    ) -> ControlOutcome {
        if req.len() < QUERY_INFO_SIZE {
            return ControlOutcome::status(Status::BadMsg);
        }
        let start = le32(req, 4) as usize;
        let count = le32(req, 8) as usize;
        let size = le32(req, 12) as usize;
        let Some(end) = start.checked_add(count) else {
            return ControlOutcome::status(Status::BadMsg);
        };
        if end > items || size < item_size {
            return ControlOutcome::status(Status::BadMsg);
        }
        let Some(len) = count
            .checked_mul(size)
            .and_then(|n| n.checked_add(HDR_SIZE))
        else {
            return ControlOutcome::status(Status::BadMsg);
        };
        if len > max_response || len > MAX_CONTROL_RESPONSE {
            return ControlOutcome::status(Status::BadMsg);
        }
        let mut out = Vec::with_capacity(len);
        put32(&mut out, Status::Ok as u32);
        for i in start..end {
            let before = out.len();
            fill(self, i, &mut out);
            out.resize(before + size, 0);
        }
        ControlOutcome {
            response: out,
            effect: None,
        }
    }

    fn jack_info(&self, i: usize, out: &mut Vec<u8>) {
        let Some(&dir) = JACKS.get(i) else { return };
        // HDA pin default configuration: jack at the rear, 1/8" connector;
        // line out (green) for output, mic in (pink) for input; association 1.
        let (defconf, caps) = match dir {
            Direction::Output => (0x0101_4010u32, 0x14u32),
            Direction::Input => (0x01A1_9010u32, 0x24u32),
        };
        put32(out, 0); // hda_fn_nid: the one function group of both streams
        put32(out, 0); // features: no REMAP
        put32(out, defconf);
        put32(out, caps); // presence detect + output/input capable
        out.push(u8::from(self.gate.get(dir)));
        out.extend_from_slice(&[0u8; 7]);
    }

    fn pcm_info(&self, i: usize, out: &mut Vec<u8>) {
        let Some(&dir) = STREAMS.get(i) else { return };
        put32(out, 0); // hda_fn_nid
        put32(out, 0); // features: none
        put64(out, self.formats);
        put64(out, self.rates);
        out.push(direction_code(dir));
        out.push(self.channels_min);
        out.push(self.channels_max);
        out.extend_from_slice(&[0u8; 5]);
    }

    fn jack_remap(&self, req: &[u8]) -> ControlOutcome {
        if req.len() < JACK_REMAP_SIZE {
            return ControlOutcome::status(Status::BadMsg);
        }
        if le32(req, 4) as usize >= JACKS.len() {
            return ControlOutcome::status(Status::BadMsg);
        }
        // No jack advertises VIRTIO_SND_JACK_F_REMAP.
        ControlOutcome::status(Status::NotSupp)
    }

    fn set_params(&mut self, req: &[u8]) -> ControlOutcome {
        if req.len() < PCM_SET_PARAMS_SIZE {
            return ControlOutcome::status(Status::BadMsg);
        }
        let Some(direction) = stream_direction(le32(req, 4)) else {
            return ControlOutcome::status(Status::BadMsg);
        };
        let buffer_bytes = le32(req, 8);
        let period_bytes = le32(req, 12);
        let features = le32(req, 16);
        let channels = byte(req, 20);
        let format_code = byte(req, 21);
        let rate_code = byte(req, 22);

        if self
            .stream(direction)
            .next_state(PcmCommand::SetParams)
            .is_err()
        {
            return ControlOutcome::status(Status::BadMsg);
        }
        if buffer_bytes == 0 || period_bytes == 0 || period_bytes > buffer_bytes {
            return ControlOutcome::status(Status::BadMsg);
        }
        if features != 0 {
            return ControlOutcome::status(Status::NotSupp);
        }
        let format = match format_from_code(format_code) {
            Some(f) if self.formats & (1u64 << format_code) != 0 => f,
            _ => return ControlOutcome::status(Status::NotSupp),
        };
        let rate = match rate_from_code(rate_code) {
            Some(r) if self.rates & (1u64 << rate_code) != 0 => r,
            _ => return ControlOutcome::status(Status::NotSupp),
        };
        if channels < self.channels_min || channels > self.channels_max {
            return ControlOutcome::status(Status::NotSupp);
        }
        if period_bytes > MAX_BUFFER_BYTES || buffer_bytes > MAX_GUEST_BUFFER_BYTES {
            return ControlOutcome::status(Status::NotSupp);
        }
        let params = PcmParams {
            format,
            rate,
            channels,
            buffer_bytes,
            period_bytes,
        };
        if params.frame_bytes() == 0 || !period_bytes.is_multiple_of(params.frame_bytes()) {
            return ControlOutcome::status(Status::BadMsg);
        }
        match self.stream_mut(direction).set_params(params) {
            Ok(()) => ControlOutcome {
                response: (Status::Ok as u32).to_le_bytes().to_vec(),
                effect: Some(DeviceMsg::SetParams { direction, params }),
            },
            Err(_) => ControlOutcome::status(Status::BadMsg),
        }
    }

    fn pcm_command(&mut self, req: &[u8], command: PcmCommand) -> ControlOutcome {
        if req.len() < PCM_HDR_SIZE {
            return ControlOutcome::status(Status::BadMsg);
        }
        let Some(direction) = stream_direction(le32(req, 4)) else {
            return ControlOutcome::status(Status::BadMsg);
        };
        if let Err(e) = self.stream_mut(direction).apply(command) {
            log::debug!(
                "control: {direction} stream: {:?} refused in state {:?}",
                e.command,
                e.from
            );
            return ControlOutcome::status(Status::BadMsg);
        }
        let effect = match command {
            PcmCommand::Prepare => DeviceMsg::Prepare { direction },
            PcmCommand::Start => DeviceMsg::Start { direction },
            PcmCommand::Stop => DeviceMsg::Stop { direction },
            PcmCommand::Release => DeviceMsg::Release { direction },
            PcmCommand::SetParams => return ControlOutcome::status(Status::BadMsg),
        };
        ControlOutcome {
            response: (Status::Ok as u32).to_le_bytes().to_vec(),
            effect: Some(effect),
        }
    }
}

fn chmap_info(i: usize, out: &mut Vec<u8>) {
    let dir = STREAMS
        .get(i / LAYOUTS.len())
        .copied()
        .unwrap_or(Direction::Output);
    let positions = LAYOUTS.get(i % LAYOUTS.len()).copied().unwrap_or(&[]);
    put32(out, 0); // hda_fn_nid
    out.push(direction_code(dir));
    out.push(positions.len() as u8);
    let mut pos = [0u8; CHMAP_MAX_SIZE];
    for (slot, p) in pos.iter_mut().zip(positions) {
        *slot = *p;
    }
    out.extend_from_slice(&pos);
}

#[cfg(test)]
mod tests {
    use super::*;
    use vsnd_ipc::SampleFormat;

    fn model() -> SndModel {
        SndModel::new(
            &Capabilities {
                formats: vec![
                    SampleFormat::U8,
                    SampleFormat::S16,
                    SampleFormat::S24,
                    SampleFormat::S32,
                    SampleFormat::Float,
                ],
                rates: vec![8000, 44100, 48000, 192000],
                channels_min: 1,
                channels_max: 8,
            },
            GateState {
                output: true,
                input: false,
            },
        )
    }

    fn hdr(code: u32, stream: u32) -> Vec<u8> {
        let mut v = Vec::new();
        put32(&mut v, code);
        put32(&mut v, stream);
        v
    }

    fn set_params(
        stream: u32,
        buffer: u32,
        period: u32,
        features: u32,
        ch: u8,
        fmt: u8,
        rate: u8,
    ) -> Vec<u8> {
        let mut v = hdr(R_PCM_SET_PARAMS, stream);
        put32(&mut v, buffer);
        put32(&mut v, period);
        put32(&mut v, features);
        v.extend_from_slice(&[ch, fmt, rate, 0]);
        v
    }

    fn query(code: u32, start: u32, count: u32, size: u32) -> Vec<u8> {
        let mut v = Vec::new();
        for x in [code, start, count, size] {
            put32(&mut v, x);
        }
        v
    }

    fn status(o: &ControlOutcome) -> u32 {
        le32(&o.response, 0)
    }

    #[test]
    fn config_matches_what_queries_return() {
        let mut m = model();
        let cfg = m.config();
        let (jacks, streams, chmaps) = (le32(&cfg, 0), le32(&cfg, 4), le32(&cfg, 8));
        for (code, n, size) in [
            (R_JACK_INFO, jacks, JACK_INFO_SIZE),
            (R_PCM_INFO, streams, PCM_INFO_SIZE),
            (R_CHMAP_INFO, chmaps, CHMAP_INFO_SIZE),
        ] {
            let o = m.handle(&query(code, 0, n, size as u32), 4096);
            assert_eq!(
                status(&o),
                Status::Ok as u32,
                "query {code:#x} of all {n} items"
            );
            assert_eq!(o.response.len(), 4 + n as usize * size);
            let o = m.handle(&query(code, 0, n + 1, size as u32), 4096);
            assert_eq!(
                status(&o),
                Status::BadMsg as u32,
                "query {code:#x} past the end"
            );
        }
    }

    #[test]
    fn pcm_info_advertises_the_capabilities() {
        let mut m = model();
        let o = m.handle(&query(R_PCM_INFO, 0, 2, 32), 4096);
        let out = &o.response[4..36];
        let formats = u64::from_le_bytes(out[8..16].try_into().unwrap());
        let rates = u64::from_le_bytes(out[16..24].try_into().unwrap());
        assert_eq!(formats, 1 << 4 | 1 << 5 | 1 << 15 | 1 << 17 | 1 << 19);
        assert_eq!(rates, 1 << 1 | 1 << 6 | 1 << 7 | 1 << 12);
        assert_eq!(out[24], D_OUTPUT);
        assert_eq!((out[25], out[26]), (1, 8));
        assert_eq!(o.response[36 + 24], D_INPUT);
    }

    #[test]
    fn jacks_follow_the_gate() {
        let mut m = model();
        let o = m.handle(&query(R_JACK_INFO, 0, 2, 24), 4096);
        assert_eq!(o.response[4 + 16], 1, "output jack connected");
        assert_eq!(
            o.response[4 + 24 + 16],
            0,
            "input jack disconnected while input is off"
        );
        m.set_gate(GateState {
            output: false,
            input: true,
        });
        let o = m.handle(&query(R_JACK_INFO, 0, 2, 24), 4096);
        assert_eq!((o.response[4 + 16], o.response[4 + 24 + 16]), (0, 1));
    }

    #[test]
    fn short_and_unknown_requests() {
        let mut m = model();
        assert_eq!(
            m.handle(&[], 64).response,
            (Status::BadMsg as u32).to_le_bytes()
        );
        assert_eq!(status(&m.handle(&[1, 1], 64)), Status::BadMsg as u32);
        assert_eq!(
            status(&m.handle(&0xdead_u32.to_le_bytes(), 64)),
            Status::NotSupp as u32
        );
        assert_eq!(
            status(&m.handle(&query(R_PCM_INFO, 0, 2, 32)[..12], 64)),
            Status::BadMsg as u32
        );
        assert_eq!(
            status(&m.handle(&hdr(R_PCM_START, 0)[..6], 64)),
            Status::BadMsg as u32
        );
    }

    #[test]
    fn query_bounds() {
        let mut m = model();
        for (start, count, size, max) in [
            (u32::MAX, 2, 32, 4096),
            (1, u32::MAX, 32, 4096),
            (0, 2, 31, 4096), // size below the struct
            (0, 2, u32::MAX, 4096),
            (0, 2, 32, 67), // response does not fit
        ] {
            let o = m.handle(&query(R_PCM_INFO, start, count, size), max);
            assert_eq!(
                status(&o),
                Status::BadMsg as u32,
                "start {start} count {count} size {size} max {max}"
            );
        }
        let o = m.handle(&query(R_PCM_INFO, 1, 1, 40), 4096);
        assert_eq!(o.response.len(), 44, "a larger item size is zero-padded");
    }

    #[test]
    fn jack_remap_is_not_supported_but_checked() {
        let mut m = model();
        let mut req = hdr(R_JACK_REMAP, 1);
        put32(&mut req, 0);
        put32(&mut req, 0);
        assert_eq!(status(&m.handle(&req, 64)), Status::NotSupp as u32);
        let mut req = hdr(R_JACK_REMAP, 2);
        put32(&mut req, 0);
        put32(&mut req, 0);
        assert_eq!(status(&m.handle(&req, 64)), Status::BadMsg as u32);
    }

    #[test]
    fn set_params_validation() {
        let ok = set_params(0, 19200, 4800, 0, 2, 5, 7);
        let cases: &[(Vec<u8>, Status)] = &[
            (set_params(2, 19200, 4800, 0, 2, 5, 7), Status::BadMsg), // stream id
            (set_params(0, 0, 4800, 0, 2, 5, 7), Status::BadMsg),     // buffer 0
            (set_params(0, 19200, 0, 0, 2, 5, 7), Status::BadMsg),    // period 0
            (set_params(0, 4800, 9600, 0, 2, 5, 7), Status::BadMsg),  // period > buffer
            (set_params(0, 19200, 4801, 0, 2, 5, 7), Status::BadMsg), // not whole frames
            (set_params(0, 19200, 4800, 1, 2, 5, 7), Status::NotSupp), // features
            (set_params(0, 19200, 4800, 0, 0, 5, 7), Status::NotSupp), // channels 0
            (set_params(0, 19200, 4800, 0, 9, 5, 7), Status::NotSupp), // channels 9
            (set_params(0, 19200, 4800, 0, 2, 0, 7), Status::NotSupp), // IMA ADPCM
            (set_params(0, 19200, 4800, 0, 2, 3, 7), Status::NotSupp), // S8: not in caps
            (set_params(0, 19200, 4800, 0, 2, 200, 7), Status::NotSupp), // no such format
            (set_params(0, 19200, 4800, 0, 2, 5, 0), Status::NotSupp), // 5512 Hz not in caps
            (set_params(0, 19200, 4800, 0, 2, 5, 99), Status::NotSupp), // no such rate
            (set_params(0, u32::MAX, 4800, 0, 2, 5, 7), Status::NotSupp),
            (ok[..20].to_vec(), Status::BadMsg), // short
        ];
        for (req, want) in cases {
            let mut m = model();
            let o = m.handle(req, 64);
            assert_eq!(status(&o), *want as u32, "request {req:?}");
            assert!(o.effect.is_none());
            assert_eq!(m.stream(Direction::Output).state(), PcmState::Initial);
        }
        let mut m = model();
        let o = m.handle(&ok, 64);
        assert_eq!(status(&o), Status::Ok as u32);
        assert!(matches!(
            o.effect,
            Some(DeviceMsg::SetParams {
                direction: Direction::Output,
                ..
            })
        ));
    }

    #[test]
    fn invalid_transitions_are_bad_msg() {
        let mut m = model();
        assert_eq!(
            status(&m.handle(&hdr(R_PCM_PREPARE, 1), 64)),
            Status::BadMsg as u32
        );
        assert_eq!(
            status(&m.handle(&hdr(R_PCM_START, 1), 64)),
            Status::BadMsg as u32
        );
        assert_eq!(
            status(&m.handle(&set_params(1, 960, 480, 0, 1, 5, 7), 64)),
            Status::Ok as u32
        );
        assert_eq!(
            status(&m.handle(&hdr(R_PCM_STOP, 1), 64)),
            Status::BadMsg as u32
        );
        assert_eq!(
            status(&m.handle(&hdr(R_PCM_PREPARE, 1), 64)),
            Status::Ok as u32
        );
        let o = m.handle(&hdr(R_PCM_START, 1), 64);
        assert_eq!(
            o.effect,
            Some(DeviceMsg::Start {
                direction: Direction::Input
            })
        );
        assert_eq!(
            status(&m.handle(&hdr(R_PCM_RELEASE, 1), 64)),
            Status::BadMsg as u32
        );
        assert_eq!(
            status(&m.handle(&set_params(1, 960, 480, 0, 1, 5, 7), 64)),
            Status::BadMsg as u32
        );
        assert_eq!(
            status(&m.handle(&hdr(R_PCM_START, 7), 64)),
            Status::BadMsg as u32
        );
    }

    #[test]
    fn chmaps_cover_both_directions() {
        let mut m = model();
        let o = m.handle(&query(R_CHMAP_INFO, 0, 10, 24), 4096);
        let items: Vec<&[u8]> = o.response[4..].chunks(24).collect();
        assert_eq!(items[1][4..8], [D_OUTPUT, 2, CHMAP_FL, CHMAP_FR]);
        assert_eq!(items[5][4..7], [D_INPUT, 1, CHMAP_MONO]);
        assert_eq!(items[9][5], 8);
    }
}
