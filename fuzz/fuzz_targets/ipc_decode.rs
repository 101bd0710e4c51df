//! The broker's side of the device channel: `vsnd_ipc::decode` of every
//! frame with the production limits, then the same frames sent over a real
//! SEQPACKET socketpair into a real `vsnd_broker::session::Session`,
//! interleaved with clock ticks, gate changes and floods of repeated
//! frames. This is what a fully
//! compromised vsnd-device can do to the broker.
//!
//! Input: see `vsnd_fuzz::ipc_decode`.
//!
//! Invariants checked besides "no panic":
//! * a decoded message re-encodes and decodes to itself;
//! * the host backend is never asked for capture data (nor to open the
//!   capture source) while input is off, and never given playback while
//!   output is off — whatever the device sends;
//! * everything the broker sends back decodes, and no PCM chunk is larger
//!   than `MAX_PCM_CHUNK`;
//! * a session ends only with Closed, Violation or VersionMismatch, never a
//!   local encoding or I/O error.
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use vsnd_broker::audio::{raw_capabilities, Audio};
use vsnd_broker::session::{Session, SessionError};
use vsnd_fuzz::ipc_decode::*;
use vsnd_fuzz::Reader;
use vsnd_ipc::{
    codec, socketpair, BrokerMsg, Capabilities, Channel, ChannelError, DeviceMsg, GateState,
    Pacing, PcmParams, MAGIC, MAX_PCM_CHUNK, PROTOCOL_VERSION,
};

/// A host backend that checks the gate is obeyed and hands out non-silent
/// "microphone" samples, so a leak would be visible.
struct GuardedAudio {
    gate: GateState,
}

impl Audio for GuardedAudio {
    fn capabilities(&self) -> Capabilities {
        raw_capabilities()
    }
    fn open_output(&mut self, p: &PcmParams) -> Result<(), String> {
        assert!(p.frame_bytes() > 0);
        Ok(())
    }
    fn play(&mut self, p: &PcmParams, data: &[u8]) {
        assert!(
            self.gate.output,
            "playback reached the host while output is off"
        );
        assert!(data.len() <= vsnd_ipc::MAX_QUEUED_PLAYBACK_BYTES);
        assert!(p.frame_bytes() > 0);
    }
    fn open_capture(&mut self, _p: &PcmParams) -> Result<(), String> {
        assert!(self.gate.input, "host capture opened while input is off");
        Ok(())
    }
    fn capture(&mut self, _p: &PcmParams, buf: &mut [u8]) {
        assert!(self.gate.input, "host capture read while input is off");
        buf.fill(0x55);
    }
    fn close_capture(&mut self) {}
}

fn drain(device: &mut Channel) {
    loop {
        match device.try_recv::<BrokerMsg>() {
            Ok(BrokerMsg::CaptureData { data, .. }) => assert!(data.len() <= MAX_PCM_CHUNK),
            Ok(_) => {}
            Err(ChannelError::WouldBlock) => return,
            Err(e) => panic!("the broker sent something undecodable: {e}"),
        }
    }
}

fn check_end(e: SessionError) {
    match e {
        SessionError::Closed
        | SessionError::Violation(_)
        | SessionError::VersionMismatch { .. } => {}
        SessionError::Io(e) => panic!("session ended with a local error: {e}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let header = r.u8();
    let mut audio = GuardedAudio {
        gate: GateState {
            output: header & H_GATE_OUTPUT != 0,
            input: header & H_GATE_INPUT != 0,
        },
    };
    let (a, b) = socketpair().unwrap();
    let pacing = Pacing {
        unpaced: false,
        playback_batch_ms: 0,
        host_capture: true,
    };
    let mut session =
        Session::new(Channel::new(a), raw_capabilities(), audio.gate, pacing).unwrap();
    let mut device = Channel::new(b);
    device.set_nonblocking(true).unwrap();
    let t0 = Instant::now();
    let mut now = t0;
    if header & H_HELLO != 0 {
        device
            .send(&DeviceMsg::Hello {
                magic: MAGIC,
                version: PROTOCOL_VERSION,
            })
            .unwrap();
        session.on_readable(&mut audio, now).unwrap();
    }
    let mut last: &[u8] = &[];
    while !r.is_empty() {
        let res = match r.u8() % TAGS {
            T_FRAME => {
                let len = usize::from(r.u16());
                let frame = r.bytes(len);
                last = frame;
                if let Ok(msg) = codec::decode::<DeviceMsg>(frame) {
                    let again = codec::encode(&msg).expect("a decoded message re-encodes");
                    assert_eq!(codec::decode::<DeviceMsg>(&again).unwrap(), msg);
                }
                match device.send_frame(frame) {
                    Ok(()) => session.on_readable(&mut audio, now),
                    // The session stopped reading (it would have ended).
                    Err(ChannelError::WouldBlock) => Ok(()),
                    Err(e) => panic!("cannot send to the session: {e}"),
                }
            }
            T_TICK => {
                now += Duration::from_micros(u64::from(r.u16()) * 250);
                session.on_tick(&mut audio, now)
            }
            T_GATE => {
                let bits = r.u8();
                audio.gate = GateState {
                    output: bits & 1 != 0,
                    input: bits & 2 != 0,
                };
                session.set_gate(audio.gate, &mut audio)
            }
            T_JUMP => {
                if let Some(t) = now.checked_add(Duration::from_secs(u64::from(r.u32()))) {
                    now = t;
                }
                session.on_tick(&mut audio, now)
            }
            T_REPEAT => {
                let mut res = Ok(());
                for i in 0..r.u16() % 4096 {
                    match device.send_frame(last) {
                        Ok(()) => {}
                        Err(ChannelError::WouldBlock) => break,
                        Err(e) => panic!("cannot send to the session: {e}"),
                    }
                    // The broker's loop reads whenever the socket fills.
                    if i % 64 == 63 {
                        res = session.on_readable(&mut audio, now);
                        drain(&mut device);
                        if res.is_err() {
                            break;
                        }
                    }
                }
                res.and_then(|()| session.on_readable(&mut audio, now))
            }
            _ => session.on_writable(),
        };
        drain(&mut device);
        if let Err(e) = res {
            // The broker kills and respawns such a device.
            check_end(e);
            return;
        }
        let _ = session.next_deadline();
        let _ = session.wants_write();
    }
});
