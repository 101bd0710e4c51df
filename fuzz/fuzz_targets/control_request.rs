//! The device's control-request parser and PCM state machine
//! (`vsnd_device::control::SndModel`), fed a sequence of guest requests with
//! varying response-buffer sizes, gate changes and queue resets.
//!
//! Input: see `vsnd_fuzz::control_request`.
//!
//! Invariants checked besides "no panic":
//! * the response is a known status, never larger than the guest's buffer
//!   (the device only asks when the buffer holds a status) nor than
//!   `MAX_CONTROL_RESPONSE`; an OK item query has exactly
//!   `4 + count * size` bytes;
//! * a stream's state changes only on OK, exactly as virtio 1.2 §5.14.6.6.1
//!   allows (checked against a table written here from the spec); the
//!   broker is told (`effect`) exactly when a PCM request succeeded;
//! * parameters sent to the broker are ones the broker accepts (in the
//!   advertised capabilities, whole frames, period within buffer);
//! * jack info reports each jack connected exactly when the gate lets its
//!   direction through.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vsnd_device::control::{SndModel, JACKS, MAX_CONTROL_RESPONSE, STREAMS};
use vsnd_device::virtio_snd::*;
use vsnd_fuzz::control_request::*;
use vsnd_fuzz::Reader;
use vsnd_ipc::lifecycle::PcmState;
use vsnd_ipc::{Capabilities, DeviceMsg, Direction, GateState, SampleFormat, MAX_BUFFER_BYTES};

/// The spec's transition table (independent of `vsnd_ipc::lifecycle`).
fn spec_next(from: PcmState, code: u32) -> Option<PcmState> {
    use PcmState::*;
    match code {
        R_PCM_SET_PARAMS => {
            matches!(from, Initial | ParamsSet | Prepared | Released).then_some(ParamsSet)
        }
        R_PCM_PREPARE => matches!(from, ParamsSet | Prepared | Released).then_some(Prepared),
        R_PCM_START => matches!(from, Prepared | Stopped).then_some(Running),
        R_PCM_STOP => matches!(from, Running).then_some(Stopped),
        R_PCM_RELEASE => matches!(from, Prepared | Stopped).then_some(Released),
        _ => None,
    }
}

fn le32_at(b: &[u8], off: usize) -> u32 {
    match b.get(off..off + 4) {
        Some(s) => u32::from_le_bytes([s[0], s[1], s[2], s[3]]),
        None => 0,
    }
}

fn gate_of(bits: u8) -> GateState {
    GateState {
        output: bits & 1 != 0,
        input: bits & 2 != 0,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let formats_mask = r.u16();
    let rates_mask = r.u16();
    let caps = Capabilities {
        formats: SampleFormat::ALL
            .iter()
            .enumerate()
            .filter(|(i, _)| formats_mask & (1 << i) != 0)
            .map(|(_, f)| *f)
            .collect(),
        rates: RATES
            .iter()
            .enumerate()
            .filter(|(i, _)| rates_mask & (1 << i) != 0)
            .map(|(_, r)| *r)
            .collect(),
        channels_min: r.u8(),
        channels_max: r.u8(),
    };
    let mut gate = gate_of(0b01);
    let mut model = SndModel::new(&caps, gate);
    let (ch_min, ch_max) = {
        let max = caps.channels_max.clamp(1, 8);
        (caps.channels_min.clamp(1, max), max)
    };

    while !r.is_empty() {
        match r.u8() % TAGS {
            TAG_GATE => {
                gate = gate_of(r.u8());
                model.set_gate(gate);
            }
            TAG_RESET => {
                let d = if r.u8() & 1 == 0 {
                    Direction::Output
                } else {
                    Direction::Input
                };
                model.reset_stream(d);
                assert_eq!(model.stream(d).state(), PcmState::Initial);
            }
            _ => {
                let room = room(r.u8());
                let len = usize::from(r.u8());
                let req = r.bytes(len);
                if room < HDR_SIZE {
                    // The device completes such a chain unanswered and
                    // never consults the model.
                    continue;
                }
                let before = [
                    model.stream(Direction::Output).state(),
                    model.stream(Direction::Input).state(),
                ];
                let out = model.handle(req, room);
                let resp = &out.response;
                assert!(
                    resp.len() >= HDR_SIZE,
                    "response without a status: {resp:?}"
                );
                assert!(
                    resp.len() <= room,
                    "response of {} bytes for a {room}-byte buffer",
                    resp.len()
                );
                assert!(resp.len() <= MAX_CONTROL_RESPONSE);
                let status = le32_at(resp, 0);
                assert!(
                    [Status::Ok, Status::BadMsg, Status::NotSupp, Status::IoErr]
                        .iter()
                        .any(|s| *s as u32 == status),
                    "unknown status {status:#x}"
                );
                let ok = status == Status::Ok as u32;
                if !ok {
                    assert_eq!(resp.len(), HDR_SIZE, "an error carries only the status");
                    assert!(
                        out.effect.is_none(),
                        "a refused request changed the broker's stream"
                    );
                }
                let code = le32_at(req, 0);
                let stream_id = le32_at(req, 4);
                let pcm_dir = STREAMS.get(stream_id as usize).copied();
                let after = [
                    model.stream(Direction::Output).state(),
                    model.stream(Direction::Input).state(),
                ];
                let is_pcm_cmd = matches!(
                    code,
                    R_PCM_SET_PARAMS | R_PCM_PREPARE | R_PCM_START | R_PCM_STOP | R_PCM_RELEASE
                );
                if ok && is_pcm_cmd {
                    let d = pcm_dir.expect("OK for a stream that does not exist");
                    let i = d as usize;
                    assert_eq!(
                        Some(after[i]),
                        spec_next(before[i], code),
                        "{d}: {code:#x} from {:?}",
                        before[i]
                    );
                    assert_eq!(after[1 - i], before[1 - i], "the other stream changed");
                    let effect = out
                        .effect
                        .clone()
                        .expect("OK PCM request without telling the broker");
                    match (code, effect) {
                        (R_PCM_SET_PARAMS, DeviceMsg::SetParams { direction, params }) => {
                            assert_eq!(direction, d);
                            // What the broker's check_params demands.
                            assert!(caps.formats.contains(&params.format));
                            assert!(caps.rates.contains(&params.rate));
                            assert!((ch_min..=ch_max).contains(&params.channels));
                            assert!(
                                params.period_bytes > 0
                                    && params.period_bytes <= params.buffer_bytes
                            );
                            assert!(params.period_bytes <= MAX_BUFFER_BYTES);
                            assert!(params.frame_bytes() > 0);
                            assert_eq!(params.period_bytes % params.frame_bytes(), 0);
                        }
                        (R_PCM_PREPARE, DeviceMsg::Prepare { direction })
                        | (R_PCM_START, DeviceMsg::Start { direction })
                        | (R_PCM_STOP, DeviceMsg::Stop { direction })
                        | (R_PCM_RELEASE, DeviceMsg::Release { direction }) => {
                            assert_eq!(direction, d)
                        }
                        (code, e) => panic!("request {code:#x} told the broker {e:?}"),
                    }
                } else {
                    assert_eq!(
                        after, before,
                        "request {code:#x} with status {status:#x} changed a stream"
                    );
                    assert!(
                        out.effect.is_none(),
                        "request {code:#x} told the broker {:?}",
                        out.effect
                    );
                }
                if ok && matches!(code, R_JACK_INFO | R_PCM_INFO | R_CHMAP_INFO) {
                    let (start, count, size) = (
                        le32_at(req, 4) as usize,
                        le32_at(req, 8) as usize,
                        le32_at(req, 12) as usize,
                    );
                    assert_eq!(
                        resp.len(),
                        HDR_SIZE + count * size,
                        "query of {count} items of {size} bytes"
                    );
                    if code == R_JACK_INFO {
                        for k in 0..count {
                            let dir = JACKS[start + k];
                            assert_eq!(
                                resp[HDR_SIZE + k * size + 16],
                                u8::from(gate.get(dir)),
                                "{dir} jack does not follow the gate {gate:?}"
                            );
                        }
                    }
                }
            }
        }
    }
});
