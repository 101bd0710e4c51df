//! Input formats of vsnd's fuzz targets, shared by the targets
//! (`fuzz_targets/`, which decode them) and the seed generator
//! (`examples/gen-seeds.rs`, which encodes the tests' requests into them).
//!
//! Every format is a byte-oriented op list that any byte string decodes to
//! (missing bytes read as zero), so libFuzzer's mutations always reach the
//! code under test instead of a harness-level parse error.

/// A forgiving little-endian reader over the fuzz input.
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Read from the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data }
    }

    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// The next `n` bytes, or fewer if the input ends first.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.data.len());
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        head
    }

    /// The next byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        self.bytes(1).first().copied().unwrap_or(0)
    }

    /// The next little-endian u16 (missing bytes are 0).
    pub fn u16(&mut self) -> u16 {
        let mut b = [0u8; 2];
        let got = self.bytes(2);
        b[..got.len()].copy_from_slice(got);
        u16::from_le_bytes(b)
    }

    /// The next little-endian u32 (missing bytes are 0).
    pub fn u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let got = self.bytes(4);
        b[..got.len()].copy_from_slice(got);
        u32::from_le_bytes(b)
    }

    /// The next little-endian u64 (missing bytes are 0).
    pub fn u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        let got = self.bytes(8);
        b[..got.len()].copy_from_slice(got);
        u64::from_le_bytes(b)
    }
}

/// `control_request`: a device model, then requests with response-buffer
/// sizes, gate changes and queue resets applied to it in order.
pub mod control_request {
    /// Tag of a request op: `[TAG_REQUEST, room, len, req[len]]`.
    pub const TAG_REQUEST: u8 = 0;
    /// Tag of a gate op: `[TAG_GATE, bits]` (bit 0 output, bit 1 input).
    pub const TAG_GATE: u8 = 1;
    /// Tag of a stream reset (its queue stopped): `[TAG_RESET, direction]`.
    pub const TAG_RESET: u8 = 2;
    /// Number of tags; a tag byte is taken modulo this.
    pub const TAGS: u8 = 3;

    /// Response-buffer sizes the `room` byte selects when below 16; larger
    /// values mean `room * 4` bytes.
    pub const ROOMS: [usize; 16] = [
        0,
        1,
        3,
        4,
        5,
        7,
        8,
        28,
        36,
        67,
        68,
        100,
        4095,
        4096,
        4097,
        usize::MAX,
    ];

    /// The response-buffer size a `room` byte means.
    pub fn room(b: u8) -> usize {
        ROOMS
            .get(usize::from(b))
            .copied()
            .unwrap_or(usize::from(b) * 4)
    }

    /// The header: capabilities as bit masks (formats: bit i is
    /// `SampleFormat::ALL[i]`; rates: bit i is the virtio rate code i) and
    /// the channel range.
    pub fn header(formats: u16, rates: u16, channels_min: u8, channels_max: u8) -> Vec<u8> {
        let mut v = formats.to_le_bytes().to_vec();
        v.extend_from_slice(&rates.to_le_bytes());
        v.extend_from_slice(&[channels_min, channels_max]);
        v
    }

    /// A request op with a response buffer of `room` bytes (an exact
    /// multiple of 4 below 1024, or one of [`ROOMS`]).
    pub fn request(req: &[u8], room: usize) -> Vec<u8> {
        let b = match ROOMS.iter().position(|&r| r == room) {
            Some(i) => i as u8,
            None => u8::try_from(room / 4).unwrap_or(u8::MAX),
        };
        let mut v = vec![TAG_REQUEST, b, u8::try_from(req.len()).unwrap_or(u8::MAX)];
        v.extend_from_slice(&req[..req.len().min(255)]);
        v
    }
}

/// `transfer`: guest memory, four split virtqueues, and a script of
/// descriptor writes, publications, kicks and broker answers played
/// against the real vhost-user backend.
pub mod transfer {
    /// Guest memory: one region of this size at address 0 …
    pub const MEM_SIZE: u64 = 0x1_0000;
    /// … and a small second one after a hole.
    pub const MEM2_START: u64 = 0x2_0000;
    /// Size of the second region.
    pub const MEM2_SIZE: u64 = 0x1000;
    /// Entries per virtqueue.
    pub const QUEUE_SIZE: u16 = 16;
    /// Queue `q`'s descriptor table is at `q * QUEUE_STRIDE`.
    pub const QUEUE_STRIDE: u64 = 0x400;
    /// Offset of the available ring from the descriptor table.
    pub const AVAIL_OFFSET: u64 = 0x100;
    /// Offset of the used ring from the descriptor table.
    pub const USED_OFFSET: u64 = 0x200;
    /// Where data buffers (and indirect tables) live.
    pub const DATA_START: u64 = 0x1000;

    /// Header bits: output stream prepared before the script runs.
    pub const H_OUTPUT_PREPARED: u8 = 1;
    /// Header bits: input stream prepared before the script runs.
    pub const H_INPUT_PREPARED: u8 = 2;
    /// Header bits: VIRTIO_RING_F_EVENT_IDX negotiated.
    pub const H_EVENT_IDX: u8 = 4;
    /// Header bits: output enabled by the gate.
    pub const H_GATE_OUTPUT: u8 = 8;
    /// Header bits: input enabled by the gate.
    pub const H_GATE_INPUT: u8 = 16;
    /// Header bits: both streams start (after prepare).
    pub const H_START: u8 = 32;
    /// Header bits: the device does not pace (`Pacing::unpaced`): buffers
    /// complete as soon as they are taken.
    pub const H_UNPACED: u8 = 64;

    /// `[T_DESC, queue, index, addr u64, len u32, flags u16, next u16]`:
    /// write a descriptor table entry (see [`addr`] and [`len`] for how the
    /// raw values map into guest memory).
    pub const T_DESC: u8 = 0;
    /// `[T_PUBLISH, queue, head u16]`: put `head` in the available ring.
    pub const T_PUBLISH: u8 = 1;
    /// `[T_KICK, queue]`: the guest notifies the queue.
    pub const T_KICK: u8 = 2;
    /// `[T_WRITE, addr u16, len u8, bytes]`: write guest memory at
    /// `DATA_START + addr` (requests, xfer headers, indirect tables).
    pub const T_WRITE: u8 = 3;
    /// `[T_BROKER, kind, buffer u8, arg u16]`: the broker answers:
    /// kind 0 the pacing timer fires instead, 1 CaptureData (arg bytes,
    /// last), 2 CaptureData
    /// (not last), 3 a gate change (arg bits).
    pub const T_BROKER: u8 = 4;
    /// `[T_STOP, queue]`: the frontend stops a queue.
    pub const T_STOP: u8 = 5;
    /// Number of tags; a tag byte is taken modulo this.
    pub const TAGS: u8 = 6;

    /// Descriptor flags.
    pub const F_NEXT: u16 = 1;
    /// Device-writable.
    pub const F_WRITE: u16 = 2;
    /// Indirect table.
    pub const F_INDIRECT: u16 = 4;

    /// A raw descriptor address: below 2^48 it means `DATA_START +
    /// (raw % 0x10000)` (mostly valid, sometimes past the end of memory);
    /// otherwise it is used as is (out of range, wrapping, the hole).
    pub fn addr(raw: u64) -> u64 {
        if raw < 1 << 48 {
            DATA_START + raw % 0x1_0000
        } else {
            raw
        }
    }

    /// A raw descriptor length: below 2^31 it means `raw % 0x2000`;
    /// otherwise it is used as is (huge lengths).
    pub fn len(raw: u32) -> u32 {
        if raw < 1 << 31 {
            raw % 0x2000
        } else {
            raw
        }
    }

    /// Inverse of [`addr`] for a data offset below 0x10000.
    pub fn raw_addr(data_offset: u64) -> u64 {
        data_offset
    }

    /// A descriptor op.
    pub fn desc(
        queue: u8,
        index: u8,
        data_offset: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Vec<u8> {
        let mut v = vec![T_DESC, queue, index];
        v.extend_from_slice(&raw_addr(data_offset).to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v.extend_from_slice(&flags.to_le_bytes());
        v.extend_from_slice(&next.to_le_bytes());
        v
    }

    /// A publish op.
    pub fn publish(queue: u8, head: u16) -> Vec<u8> {
        let mut v = vec![T_PUBLISH, queue];
        v.extend_from_slice(&head.to_le_bytes());
        v
    }

    /// A kick op.
    pub fn kick(queue: u8) -> Vec<u8> {
        vec![T_KICK, queue]
    }

    /// A memory write op (`bytes` truncated to 255).
    pub fn write(data_offset: u16, bytes: &[u8]) -> Vec<u8> {
        let n = bytes.len().min(255);
        let mut v = vec![T_WRITE];
        v.extend_from_slice(&data_offset.to_le_bytes());
        v.push(n as u8);
        v.extend_from_slice(&bytes[..n]);
        v
    }

    /// A broker op.
    pub fn broker(kind: u8, buffer: u8, arg: u16) -> Vec<u8> {
        let mut v = vec![T_BROKER, kind, buffer];
        v.extend_from_slice(&arg.to_le_bytes());
        v
    }

    /// A queue-stop op.
    pub fn stop(queue: u8) -> Vec<u8> {
        vec![T_STOP, queue]
    }
}

/// `ipc_decode`: device→broker frames, clock ticks and gate changes played
/// against a real broker session.
pub mod ipc_decode {
    /// Header bits: the harness greets the broker with a valid hello first.
    pub const H_HELLO: u8 = 1;
    /// Header bits: output enabled at start.
    pub const H_GATE_OUTPUT: u8 = 2;
    /// Header bits: input enabled at start.
    pub const H_GATE_INPUT: u8 = 4;

    /// `[T_FRAME, len u16, bytes]`: one SEQPACKET frame from the device.
    pub const T_FRAME: u8 = 0;
    /// `[T_TICK, n u16]`: the clock advances by `n * 250 µs`.
    pub const T_TICK: u8 = 1;
    /// `[T_GATE, bits]`: an administrator sets the flags.
    pub const T_GATE: u8 = 2;
    /// `[T_JUMP, secs u32]`: the clock jumps ahead (suspend, or hours of
    /// playback at once).
    pub const T_JUMP: u8 = 3;
    /// `[T_WRITABLE]`: the channel polled writable.
    pub const T_WRITABLE: u8 = 4;
    /// `[T_REPEAT, n u16]`: the device floods: the last frame again
    /// `n % 4096` times (reaches the queue-length limits).
    pub const T_REPEAT: u8 = 5;
    /// Number of tags; a tag byte is taken modulo this.
    pub const TAGS: u8 = 6;

    /// A frame op.
    pub fn frame(bytes: &[u8]) -> Vec<u8> {
        let n = bytes.len().min(usize::from(u16::MAX));
        let mut v = vec![T_FRAME];
        v.extend_from_slice(&(n as u16).to_le_bytes());
        v.extend_from_slice(&bytes[..n]);
        v
    }

    /// A tick op of `quarter_ms * 250 µs`.
    pub fn tick(quarter_ms: u16) -> Vec<u8> {
        let mut v = vec![T_TICK];
        v.extend_from_slice(&quarter_ms.to_le_bytes());
        v
    }

    /// A gate op.
    pub fn gate(output: bool, input: bool) -> Vec<u8> {
        vec![T_GATE, u8::from(output) | u8::from(input) << 1]
    }

    /// A repeat op.
    pub fn repeat(n: u16) -> Vec<u8> {
        let mut v = vec![T_REPEAT];
        v.extend_from_slice(&n.to_le_bytes());
        v
    }
}
