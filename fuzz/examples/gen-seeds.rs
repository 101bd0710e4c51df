//! Writes the seed corpora into `fuzz/seeds/<target>/`, built with the same
//! request builders the integration tests use (`vsnd_tests::snd`) and the
//! protocol's own encoder (`vsnd_ipc::encode`), in the input formats of
//! `vsnd_fuzz`. Run from `fuzz/`:
//!
//! ```text
//! cargo run --example gen-seeds
//! ```
//!
//! The output is deterministic; the checked-in seeds are its output.

use std::path::{Path, PathBuf};

use vsnd_fuzz::{control_request as cr, ipc_decode as ipc, transfer as tr};
use vsnd_ipc::{encode, DeviceMsg, Direction, PcmParams, SampleFormat, MAGIC, PROTOCOL_VERSION};
use vsnd_tests::snd::*;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// SET_PARAMS for 48 kHz stereo S16, 4 periods of 10 ms.
fn set_params(stream: u32) -> Vec<u8> {
    pcm_set_params(stream, 7680, 1920, 0, 2, PCM_FMT_S16, PCM_RATE_48000)
}

fn control_request(dir: &Path) {
    let all = cr::header(0x3ff, 0x3fff, 1, 8);
    let ops = |reqs: &[(Vec<u8>, usize)]| -> Vec<u8> {
        let mut v = all.clone();
        for (req, room) in reqs {
            v.extend(cr::request(req, *room));
        }
        v
    };
    let mut lifecycle = Vec::new();
    for stream in [0, 1] {
        lifecycle.push((set_params(stream), 4));
        for code in [
            R_PCM_PREPARE,
            R_PCM_START,
            R_PCM_STOP,
            R_PCM_START,
            R_PCM_STOP,
            R_PCM_RELEASE,
        ] {
            lifecycle.push((pcm_hdr(code, stream), 4));
        }
        lifecycle.push((set_params(stream), 8));
        lifecycle.push((pcm_hdr(R_PCM_PREPARE, stream), 8));
    }
    write(dir, "lifecycle", &ops(&lifecycle));
    write(
        dir,
        "queries",
        &ops(&[
            (
                query_info(R_JACK_INFO, 0, 2, JACK_INFO_SIZE as u32),
                4 + 2 * 24,
            ),
            (query_info(R_PCM_INFO, 0, 2, PCM_INFO_SIZE as u32), 68),
            (query_info(R_CHMAP_INFO, 0, 10, CHMAP_INFO_SIZE as u32), 244),
            (query_info(R_PCM_INFO, 1, 1, 40), 44),
            (query_info(R_PCM_INFO, 0, 2, PCM_INFO_SIZE as u32), 67),
        ]),
    );
    let mut gate = all.clone();
    gate.extend([cr::TAG_GATE, 0b10]);
    gate.extend(cr::request(&query_info(R_JACK_INFO, 0, 2, 24), 100));
    gate.extend([cr::TAG_RESET, 0]);
    gate.extend(cr::request(&pcm_hdr(R_PCM_START, 0), 4));
    write(dir, "gate-and-reset", &gate);
    write(
        dir,
        "hostile",
        &ops(&[
            (jack_remap(1, 0, 0), 4),
            (jack_remap(2, 0, 0), 4),
            (hdr(0xdead), 4),
            (vec![1, 1], 4),
            (
                pcm_set_params(0, 0, 1920, 0, 2, PCM_FMT_S16, PCM_RATE_48000),
                4,
            ),
            (
                pcm_set_params(0, u32::MAX, 1920, 0, 2, PCM_FMT_S16, PCM_RATE_48000),
                4,
            ),
            (
                pcm_set_params(0, 7680, 1921, 0, 2, PCM_FMT_S16, PCM_RATE_48000),
                4,
            ),
            (
                pcm_set_params(0, 7680, 1920, 1 << PCM_F_EVT_XRUNS, 2, PCM_FMT_U8, 99),
                4,
            ),
            (query_info(R_PCM_INFO, u32::MAX, 2, 32), 4096),
            (pcm_hdr(R_PCM_START, 7), 4),
            (hdr(R_CTL_INFO), 4),
        ]),
    );
}

fn transfer(dir: &Path) {
    use tr::*;
    let h = H_GATE_OUTPUT | H_OUTPUT_PREPARED | H_INPUT_PREPARED | H_START;
    // Control: PCM_INFO through the control queue.
    let mut v = vec![0];
    v.extend(write(0x0, &query_info(R_PCM_INFO, 0, 2, 32)));
    v.extend(desc(0, 0, 0x0, 16, F_NEXT, 1));
    v.extend(desc(0, 1, 0x100, 68, F_WRITE, 0));
    v.extend(publish(0, 0));
    v.extend(kick(0));
    // … and SET_PARAMS/PREPARE/START of the output the same way.
    for (i, req) in [
        set_params(0),
        pcm_hdr(R_PCM_PREPARE, 0),
        pcm_hdr(R_PCM_START, 0),
    ]
    .iter()
    .enumerate()
    {
        let at = 0x40 * (i as u64 + 1);
        v.extend(write(at as u16, req));
        v.extend(desc(0, 2, at, req.len() as u32, F_NEXT, 3));
        v.extend(desc(0, 3, 0x100, 4, F_WRITE, 0));
        v.extend(publish(0, 2));
        v.extend(kick(0));
    }
    write_seed(dir, "control", &v);

    // Playback: two periods, returned at once (unpaced) and then when the
    // pacing timer fires.
    let mut v = vec![h | H_UNPACED];
    let mut pcm = pcm_xfer(0);
    pcm.extend((0..192u32).map(|i| i as u8));
    v.extend(write(0x200, &pcm));
    v.extend(desc(2, 0, 0x200, pcm.len() as u32, F_NEXT, 1));
    v.extend(desc(2, 1, 0x800, PCM_STATUS_SIZE as u32, F_WRITE, 0));
    v.extend(publish(2, 0));
    v.extend(desc(2, 2, 0x200, 4, F_NEXT, 3));
    v.extend(desc(2, 3, 0x300, 96, F_NEXT, 4));
    v.extend(desc(2, 4, 0x810, PCM_STATUS_SIZE as u32, F_WRITE, 0));
    v.extend(publish(2, 2));
    v.extend(kick(2));
    v.extend(broker(0, 0, 0));
    v.extend(broker(0, 1, 0));
    write_seed(dir, "playback", &v);

    // Capture: one period, asked for at once (unpaced), filled by the
    // broker.
    let mut v = vec![h | H_GATE_INPUT | H_UNPACED];
    v.extend(write(0x200, &pcm_xfer(1)));
    v.extend(desc(3, 0, 0x200, 4, F_NEXT, 1));
    v.extend(desc(3, 1, 0x1000, 192, F_WRITE | F_NEXT, 2));
    v.extend(desc(3, 2, 0x1100, PCM_STATUS_SIZE as u32, F_WRITE, 0));
    v.extend(publish(3, 0));
    v.extend(kick(3));
    v.extend(broker(2, 0, 100));
    v.extend(broker(1, 0, 92));
    write_seed(dir, "capture", &v);

    // An indirect table holding a control request and its response.
    let mut v = vec![0];
    v.extend(write(0x0, &query_info(R_JACK_INFO, 0, 2, 24)));
    let mut table = Vec::new();
    for (addr, len, flags, next) in [
        (DATA_START, 16u32, F_NEXT, 1u16),
        (DATA_START + 0x100, 52, F_WRITE, 0),
    ] {
        table.extend(addr.to_le_bytes());
        table.extend(len.to_le_bytes());
        table.extend(flags.to_le_bytes());
        table.extend(next.to_le_bytes());
    }
    v.extend(write(0x300, &table));
    v.extend(desc(0, 0, 0x300, 32, F_INDIRECT, 0));
    v.extend(publish(0, 0));
    v.extend(kick(0));
    write_seed(dir, "indirect", &v);

    // Event buffers, then the gate flips; a looping chain; a stop.
    let mut v = vec![H_GATE_OUTPUT];
    v.extend(desc(1, 0, 0x400, EVENT_SIZE as u32, F_WRITE, 0));
    v.extend(desc(1, 1, 0x408, EVENT_SIZE as u32, F_WRITE, 0));
    v.extend(publish(1, 0));
    v.extend(publish(1, 1));
    v.extend(kick(1));
    v.extend(broker(3, 0, 0b10));
    v.extend(desc(0, 5, 0x0, 4, F_NEXT, 5));
    v.extend(publish(0, 5));
    v.extend(kick(0));
    v.extend(stop(2));
    write_seed(dir, "events-loop-stop", &v);

    // With EVENT_IDX, an available index more than a queue ahead (17
    // publications on a 16-entry queue): the worker once spun on it.
    let mut v = vec![H_EVENT_IDX];
    v.extend(desc(0, 0, 0x0, 4, F_NEXT, 1));
    v.extend(desc(0, 1, 0x100, 4, F_WRITE, 0));
    for _ in 0..17 {
        v.extend(publish(0, 0));
    }
    v.extend(kick(0));
    write_seed(dir, "avail-index-too-far", &v);
}

fn write_seed(dir: &Path, name: &str, bytes: &[u8]) {
    write(dir, name, bytes)
}

fn ipc_decode(dir: &Path) {
    let frame = |m: DeviceMsg| ipc::frame(&encode(&m).unwrap());
    let params = PcmParams {
        format: SampleFormat::S16,
        rate: 48_000,
        channels: 2,
        buffer_bytes: 7680,
        period_bytes: 1920,
    };
    let stream = |d: Direction| {
        let mut v = frame(DeviceMsg::SetParams {
            direction: d,
            params,
        });
        v.extend(frame(DeviceMsg::Prepare { direction: d }));
        v
    };
    let mut v = vec![ipc::H_GATE_OUTPUT];
    v.extend(frame(DeviceMsg::Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
    }));
    v.extend(stream(Direction::Output));
    for b in 0..3 {
        v.extend(frame(DeviceMsg::Playback {
            data: vec![b as u8; 192],
        }));
    }
    v.extend(frame(DeviceMsg::Start {
        direction: Direction::Output,
    }));
    v.extend(ipc::tick(4));
    v.extend(ipc::tick(40));
    v.extend(ipc::gate(false, false));
    v.extend(ipc::tick(40));
    v.extend(frame(DeviceMsg::Stop {
        direction: Direction::Output,
    }));
    v.extend(frame(DeviceMsg::Release {
        direction: Direction::Output,
    }));
    write(dir, "playback", &v);

    let mut v = vec![ipc::H_HELLO | ipc::H_GATE_OUTPUT];
    v.extend(stream(Direction::Input));
    for b in 0..4 {
        v.extend(frame(DeviceMsg::Capture {
            buffer: b,
            len: 192,
        }));
    }
    v.extend(frame(DeviceMsg::Start {
        direction: Direction::Input,
    }));
    v.extend(ipc::tick(4));
    v.extend(ipc::gate(true, true));
    v.extend(ipc::tick(4));
    v.extend(ipc::gate(true, false));
    v.extend(ipc::tick(8));
    v.extend([ipc::T_JUMP, 0, 0, 1, 0]);
    v.extend([ipc::T_WRITABLE]);
    v.extend(frame(DeviceMsg::Stop {
        direction: Direction::Input,
    }));
    write(dir, "capture-gate", &v);

    // A device flooding the broker with empty chunks and capture requests.
    let mut v = vec![ipc::H_HELLO];
    v.extend(stream(Direction::Output));
    v.extend(frame(DeviceMsg::Playback { data: Vec::new() }));
    v.extend(ipc::repeat(2000));
    v.extend(stream(Direction::Input));
    v.extend(frame(DeviceMsg::Capture { buffer: 1, len: 4 }));
    v.extend(ipc::repeat(1100));
    write(dir, "flood", &v);

    // Protocol violations the rogue-device tests send.
    let mut v = vec![ipc::H_HELLO];
    v.extend(frame(DeviceMsg::Capture { buffer: 0, len: 4 }));
    write(dir, "capture-before-prepare", &v);
    let mut v = vec![0];
    v.extend(frame(DeviceMsg::Hello {
        magic: MAGIC,
        version: 999,
    }));
    write(dir, "version-mismatch", &v);
    let mut v = vec![ipc::H_HELLO];
    v.extend(ipc::frame(&[
        6, 0, 0, 253, 255, 255, 255, 255, 255, 255, 255, 255,
    ]));
    v.extend(ipc::frame(&[200]));
    write(dir, "malformed", &v);
}

fn control_line(dir: &Path) {
    for (name, text) in [
        ("query", &b"QUERY\n"[..]),
        ("set", b"SET input on\nSET output off\nquery\r\n"),
        ("subscribe", b"SUBSCRIBE\nset  input\ton\nSET input off\n"),
        (
            "errors",
            b"BOGUS\nSET mic on\nSET input\nQUERY me\n\xff\n\n",
        ),
    ] {
        write(dir, name, text);
    }
    let mut long = b"QUERY\n".to_vec();
    long.extend([b'x'; 300]);
    long.push(b'\n');
    write(dir, "long-line", &long);
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds");
    control_request(&root.join("control_request"));
    transfer(&root.join("transfer"));
    ipc_decode(&root.join("ipc_decode"));
    control_line(&root.join("control_line"));
    println!("seeds written to {}", root.display());
}
