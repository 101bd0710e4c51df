//! The one bincode configuration of the protocol.

use bincode::config::{self, Config};
use bincode::{Decode, Encode};

/// Largest encoded message, in bytes. Every receive buffer is this size plus
/// one, and the decoder refuses to allocate past it.
pub const MAX_FRAME: usize = crate::message::MAX_PCM_CHUNK + 256;

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The frame is larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    Oversized(usize),
    /// The frame had bytes after the message.
    #[error("frame has {0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// The bytes are not a valid message.
    #[error("malformed frame: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    /// The message could not be encoded within the limit.
    #[error("cannot encode message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
}

fn config() -> impl Config {
    config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<MAX_FRAME>()
}

/// Encode a message; fails if it would exceed [`MAX_FRAME`].
pub fn encode<M: Encode>(msg: &M) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::encode_to_vec(msg, config())?;
    if bytes.len() > MAX_FRAME {
        return Err(CodecError::Oversized(bytes.len()));
    }
    Ok(bytes)
}

/// Decode exactly one message from `frame`. Oversized frames, trailing
/// bytes, unknown variants and length prefixes beyond the limit are refused
/// before any allocation larger than [`MAX_FRAME`].
pub fn decode<M: Decode<()>>(frame: &[u8]) -> Result<M, CodecError> {
    if frame.len() > MAX_FRAME {
        return Err(CodecError::Oversized(frame.len()));
    }
    let (msg, used) = bincode::decode_from_slice(frame, config())?;
    match frame.len().checked_sub(used) {
        Some(0) => Ok(msg),
        Some(extra) => Err(CodecError::TrailingBytes(extra)),
        None => Err(CodecError::TrailingBytes(0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;

    fn roundtrip<M: Encode + Decode<()> + PartialEq + std::fmt::Debug>(m: M) {
        let bytes = encode(&m).expect("encode");
        let back: M = decode(&bytes).expect("decode");
        assert_eq!(back, m);
    }

    #[test]
    fn every_message_roundtrips() {
        let params = PcmParams {
            format: SampleFormat::S16,
            rate: 48_000,
            channels: 2,
            buffer_bytes: 19_200,
            period_bytes: 4_800,
        };
        roundtrip(DeviceMsg::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
        });
        roundtrip(DeviceMsg::SetParams {
            direction: Direction::Input,
            params,
        });
        roundtrip(DeviceMsg::Prepare {
            direction: Direction::Output,
        });
        roundtrip(DeviceMsg::Start {
            direction: Direction::Output,
        });
        roundtrip(DeviceMsg::Stop {
            direction: Direction::Input,
        });
        roundtrip(DeviceMsg::Release {
            direction: Direction::Input,
        });
        roundtrip(DeviceMsg::Playback {
            data: vec![1; MAX_PCM_CHUNK],
        });
        roundtrip(DeviceMsg::Capture {
            buffer: u64::MAX,
            len: MAX_BUFFER_BYTES,
        });
        roundtrip(BrokerMsg::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            caps: Capabilities {
                formats: SampleFormat::ALL.to_vec(),
                rates: vec![8000, 48000, 192000],
                channels_min: 1,
                channels_max: 8,
            },
            gate: GateState {
                output: true,
                input: false,
            },
            pacing: Pacing {
                unpaced: false,
                playback_batch_ms: 40,
                host_capture: true,
            },
        });
        roundtrip(BrokerMsg::CaptureData {
            buffer: 3,
            last: false,
            data: vec![0; MAX_PCM_CHUNK],
        });
        roundtrip(BrokerMsg::Gate(GateState {
            output: false,
            input: true,
        }));
    }

    #[test]
    fn largest_chunk_fits_in_a_frame() {
        let m = DeviceMsg::Playback {
            data: vec![0xff; MAX_PCM_CHUNK],
        };
        let bytes = encode(&m).expect("a full chunk must fit in MAX_FRAME");
        assert!(bytes.len() <= MAX_FRAME);
    }

    #[test]
    fn oversized_payload_is_refused_on_encode() {
        let m = DeviceMsg::Playback {
            data: vec![0; MAX_FRAME],
        };
        assert!(
            encode(&m).is_err(),
            "a payload larger than the frame must not encode"
        );
    }

    #[test]
    fn truncated_frames_are_refused() {
        let bytes = encode(&DeviceMsg::Playback { data: vec![7; 100] }).unwrap();
        for cut in 0..bytes.len() {
            assert!(
                decode::<DeviceMsg>(&bytes[..cut]).is_err(),
                "a frame cut to {cut} of {} bytes was accepted",
                bytes.len()
            );
        }
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&DeviceMsg::Start {
            direction: Direction::Output,
        })
        .unwrap();
        bytes.push(0);
        match decode::<DeviceMsg>(&bytes) {
            Err(CodecError::TrailingBytes(1)) => {}
            other => panic!("expected TrailingBytes(1), got {other:?}"),
        }
    }

    #[test]
    fn oversized_frames_are_refused() {
        let frame = vec![0u8; MAX_FRAME + 1];
        assert!(matches!(
            decode::<DeviceMsg>(&frame),
            Err(CodecError::Oversized(_))
        ));
    }

    #[test]
    fn unknown_variants_are_refused() {
        // Variant indices are varints; 200 is no message of either enum.
        assert!(decode::<DeviceMsg>(&[200]).is_err());
        assert!(decode::<BrokerMsg>(&[200]).is_err());
        // Direction has two variants: index 2 inside Start is invalid.
        let start = encode(&DeviceMsg::Start {
            direction: Direction::Input,
        })
        .unwrap();
        let mut bad = start.clone();
        *bad.last_mut().unwrap() = 2;
        assert!(decode::<DeviceMsg>(&bad).is_err());
    }

    #[test]
    fn huge_length_prefix_is_refused_without_allocating() {
        // Playback { data: <len = u64::MAX> }: variant 6, then a varint
        // length marker 253 (u64 follows) = 0xffff_ffff_ffff_ffff.
        let mut frame = vec![6u8, 253];
        frame.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<DeviceMsg>(&frame).is_err());
        // A length just past the limit (but plausible) is refused too.
        let mut frame = vec![6u8, 252];
        frame.extend_from_slice(&((MAX_FRAME as u32) * 2).to_le_bytes());
        assert!(decode::<DeviceMsg>(&frame).is_err());
        // And the same for the broker's capture vector in its hello.
        let mut frame = vec![0u8, 0, 0, 253];
        frame.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode::<BrokerMsg>(&frame).is_err());
    }

    #[test]
    fn hello_prefix_is_stable() {
        // Variant 0 with magic and version first: an older or newer peer can
        // always read them. Freeze the encoding.
        let bytes = encode(&DeviceMsg::Hello {
            magic: MAGIC,
            version: 1,
        })
        .unwrap();
        assert_eq!(bytes, [0, 252, b'V', b'S', b'N', b'D', 1]);
    }
}
