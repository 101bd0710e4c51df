//! The virtio-snd protocol as a guest sees it (virtio 1.2 §5.14), against
//! the real `vsnd-broker` + `vsnd-device` with the broker's `file` backend.
//!
//! Each test starts its own broker in a private directory
//! (`vsnd_tests::fixture::Broker`), connects the test frontend, and checks
//! what a guest driver would notice: negotiated features, config, the
//! answers to info queries, the stream state machine, and the bytes that
//! arrive in `played.raw` or come out of `capture.raw`.

use std::time::{Duration, Instant};

use vsnd_tests::fixture::{
    self, add_rx, add_rx_tracked, add_tx, assert_responsive, assert_same_bytes,
    expect_nothing_used, expect_status, looped, pcm_pattern, query_all, setup_stream, tx_status,
    wait_used, Broker, BrokerOptions, PcmConfig, RxBuffer,
};
use vsnd_tests::frontend::{
    Frontend, FrontendOptions, F_EVENT_IDX, F_INDIRECT_DESC, F_PROTOCOL_FEATURES, F_VERSION_1,
};
use vsnd_tests::snd::{self, ChmapInfo, Config, Event, JackInfo, PcmInfo, PcmStatus};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::VhostUserFrontend;

const OUT: u32 = 0;
const IN: u32 = 1;

/// How long a test watches for buffers that must not come back yet.
const QUIET_WINDOW: Duration = Duration::from_millis(300);
/// Generous bound for anything that should happen "at once".
const PROMPT: Duration = Duration::from_secs(2);

fn mask(bits: impl IntoIterator<Item = u8>) -> u64 {
    bits.into_iter().fold(0, |m, b| m | 1u64 << b)
}

/// Every virtio rate from 8 kHz to 192 kHz.
fn expected_rates() -> u64 {
    mask(snd::PCM_RATE_8000..=snd::PCM_RATE_192000)
}

fn config_of(fe: &Frontend) -> Config {
    Config::parse(fe.config_bytes()).unwrap_or_else(|e| panic!("device config: {e}"))
}

#[test]
fn negotiation_and_config() {
    let broker = Broker::start("proto-negotiation");
    let mut fe = broker.connect(FrontendOptions {
        event_idx: true,
        indirect_desc: true,
        ..FrontendOptions::default()
    });

    let offered = fe.backend_features();
    for (bit, name) in [
        (F_VERSION_1, "VIRTIO_F_VERSION_1"),
        (F_EVENT_IDX, "VIRTIO_RING_F_EVENT_IDX"),
        (F_INDIRECT_DESC, "VIRTIO_RING_F_INDIRECT_DESC"),
        (F_PROTOCOL_FEATURES, "VHOST_USER_F_PROTOCOL_FEATURES"),
    ] {
        assert_ne!(
            offered & bit,
            0,
            "expected the device to offer {name}; it offered {offered:#x}"
        );
    }
    assert_eq!(
        offered & (1 << snd::F_CTLS),
        0,
        "the device has no control elements, so it must not offer VIRTIO_SND_F_CTLS; offered {offered:#x}"
    );
    let want = F_VERSION_1 | F_EVENT_IDX | F_INDIRECT_DESC | F_PROTOCOL_FEATURES;
    assert_eq!(
        fe.features() & want,
        want,
        "negotiated features {:#x}",
        fe.features()
    );
    let pf = VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK;
    assert_eq!(
        fe.protocol_features(),
        pf,
        "expected protocol features CONFIG|MQ|REPLY_ACK to be offered and acked"
    );
    let queues = fe.vhost_user().get_queue_num().expect("GET_QUEUE_NUM");
    assert_eq!(
        queues, 4,
        "expected 4 queues (control, event, tx, rx), the device reports {queues}"
    );

    assert_eq!(fe.config_bytes().len(), 16, "config bytes read at connect");
    let cfg = config_of(&fe);
    assert_eq!(
        (cfg.jacks, cfg.streams, cfg.chmaps, cfg.controls),
        (2, 2, 10, Some(0)),
        "expected config jacks=2 streams=2 chmaps=10 controls=0, got {cfg:?}"
    );
    // A partial read at an offset returns those fields.
    let part = fe.get_config(4, 8).expect("GET_CONFIG at offset 4");
    assert_eq!(
        part,
        [2, 0, 0, 0, 10, 0, 0, 0],
        "GET_CONFIG(offset 4, size 8): streams, chmaps"
    );

    // The same device without the optional ring features.
    drop(fe);
    let fe = broker.connect(FrontendOptions::default());
    assert_eq!(
        fe.features() & (F_EVENT_IDX | F_INDIRECT_DESC),
        0,
        "features {:#x}",
        fe.features()
    );
    assert_eq!(config_of(&fe).streams, 2);
    broker.assert_no_device_crash("after negotiation");
}

#[test]
fn info_queries_describe_the_configured_device() {
    let broker = Broker::start("proto-info");
    let mut fe = broker.connect(FrontendOptions::default());
    let cfg = config_of(&fe);

    // PCM_INFO: stream 0 plays, stream 1 records, both offer everything the
    // file backend carries.
    let items = query_all(&mut fe, snd::R_PCM_INFO, cfg.streams, snd::PCM_INFO_SIZE);
    let infos: Vec<PcmInfo> = items.iter().map(|b| PcmInfo::parse(b).unwrap()).collect();
    for (id, (info, dir)) in infos.iter().zip([snd::D_OUTPUT, snd::D_INPUT]).enumerate() {
        assert_eq!(info.direction, dir, "stream {id}: direction, in {info:?}");
        assert_eq!(
            info.formats,
            mask(snd::VSND_FORMATS),
            "stream {id}: formats {:#x} in {info:?}",
            info.formats
        );
        assert_eq!(
            info.rates,
            expected_rates(),
            "stream {id}: rates {:#x} in {info:?}",
            info.rates
        );
        assert_eq!(
            (info.channels_min, info.channels_max),
            (1, 8),
            "stream {id}: channels in {info:?}"
        );
        assert_eq!(info.features, 0, "stream {id}: features in {info:?}");
        assert_eq!(info.padding, [0; 5], "stream {id}: padding in {info:?}");
    }

    // CHMAP_INFO: per direction mono, stereo, quad, 5.1, 7.1, each within the
    // stream's channel range and without repeated positions.
    let items = query_all(&mut fe, snd::R_CHMAP_INFO, cfg.chmaps, snd::CHMAP_INFO_SIZE);
    let maps: Vec<ChmapInfo> = items.iter().map(|b| ChmapInfo::parse(b).unwrap()).collect();
    for dir in [snd::D_OUTPUT, snd::D_INPUT] {
        let mut counts: Vec<u8> = maps
            .iter()
            .filter(|m| m.direction == dir)
            .map(|m| m.channels)
            .collect();
        counts.sort_unstable();
        assert_eq!(
            counts,
            [1, 2, 4, 6, 8],
            "direction {dir}: channel maps by channel count, in {maps:?}"
        );
    }
    for (i, m) in maps.iter().enumerate() {
        let pos = m.valid_positions();
        let mut uniq = pos.to_vec();
        uniq.sort_unstable();
        uniq.dedup();
        assert_eq!(
            uniq.len(),
            pos.len(),
            "chmap {i}: repeated positions in {m:?}"
        );
        assert!(
            pos.iter().all(|&p| p >= snd::CHMAP_MONO),
            "chmap {i}: NONE/NA position in {m:?}"
        );
        assert_eq!(
            m.positions[pos.len()..].iter().filter(|&&p| p != 0).count(),
            0,
            "chmap {i}: junk after the valid positions: {m:?}"
        );
        if m.channels == 1 {
            assert_eq!(pos, [snd::CHMAP_MONO], "chmap {i}: mono map");
        }
        if m.channels == 2 {
            assert_eq!(pos, [snd::CHMAP_FL, snd::CHMAP_FR], "chmap {i}: stereo map");
        }
        let stream = &infos[usize::from(m.direction)];
        assert!(
            (stream.channels_min..=stream.channels_max).contains(&m.channels),
            "chmap {i} has {} channels, outside its stream's {}..={}",
            m.channels,
            stream.channels_min,
            stream.channels_max
        );
    }

    // JACK_INFO: both jacks exist, both connected (output and input are on).
    let items = query_all(&mut fe, snd::R_JACK_INFO, cfg.jacks, snd::JACK_INFO_SIZE);
    let jacks: Vec<JackInfo> = items.iter().map(|b| JackInfo::parse(b).unwrap()).collect();
    for (id, j) in jacks.iter().enumerate() {
        assert_eq!(
            j.connected, 1,
            "jack {id} should be connected while its direction is on: {j:?}"
        );
        assert_eq!(
            j.features & (1 << snd::JACK_F_REMAP),
            0,
            "jack {id} must not claim REMAP: {j:?}"
        );
        assert_eq!(j.padding, [0; 7], "jack {id}: padding in {j:?}");
    }

    // One item at a time gives the same bytes; a larger item size is
    // zero-padded.
    for (code, n, size, all) in [
        (
            snd::R_PCM_INFO,
            cfg.streams,
            snd::PCM_INFO_SIZE,
            query_all(&mut fe, snd::R_PCM_INFO, cfg.streams, snd::PCM_INFO_SIZE),
        ),
        (
            snd::R_CHMAP_INFO,
            cfg.chmaps,
            snd::CHMAP_INFO_SIZE,
            query_all(&mut fe, snd::R_CHMAP_INFO, cfg.chmaps, snd::CHMAP_INFO_SIZE),
        ),
        (
            snd::R_JACK_INFO,
            cfg.jacks,
            snd::JACK_INFO_SIZE,
            query_all(&mut fe, snd::R_JACK_INFO, cfg.jacks, snd::JACK_INFO_SIZE),
        ),
    ] {
        let name = snd::code_name(code);
        for i in 0..n {
            let resp = fe
                .control(&snd::query_info(code, i, 1, size as u32), (4 + size) as u32)
                .unwrap();
            assert_eq!(snd::status(&resp), Ok(snd::S_OK), "{name} item {i} alone");
            assert_eq!(
                &resp[4..],
                &all[i as usize][..],
                "{name} item {i} alone differs from the full query"
            );
            let big = size as u32 + 8;
            let resp = fe
                .control(&snd::query_info(code, i, 1, big), 4 + big)
                .unwrap();
            assert_eq!(
                snd::status(&resp),
                Ok(snd::S_OK),
                "{name} item {i} with size {big}"
            );
            assert_eq!(
                resp.len(),
                4 + big as usize,
                "{name} item {i} with size {big}: used.len"
            );
            assert_eq!(
                &resp[4..4 + size],
                &all[i as usize][..],
                "{name} item {i} with size {big}"
            );
            assert_eq!(
                &resp[4 + size..],
                &[0u8; 8],
                "{name} item {i} with size {big}: padding"
            );
        }
    }
    broker.assert_no_device_crash("after info queries");
}

#[test]
fn info_query_errors() {
    let broker = Broker::start("proto-info-errors");
    let mut fe = broker.connect(FrontendOptions::default());
    let pid = broker.device_pid(PROMPT);
    for (code, n, size) in [
        (snd::R_PCM_INFO, 2u32, snd::PCM_INFO_SIZE as u32),
        (snd::R_CHMAP_INFO, 10, snd::CHMAP_INFO_SIZE as u32),
        (snd::R_JACK_INFO, 2, snd::JACK_INFO_SIZE as u32),
    ] {
        let name = snd::code_name(code);
        let room = 4 + (n + 2) * (size + 8);
        for (start, count, sz, why) in [
            (0, n + 1, size, "count past the end"),
            (n, 1, size, "start at the end"),
            (n - 1, 2, size, "start+count past the end"),
            (u32::MAX, 2, size, "start+count overflowing"),
            (1, u32::MAX, size, "huge count"),
            (0, 1, size - 1, "item size smaller than the struct"),
            (0, 1, 0, "item size 0"),
        ] {
            let resp = fe
                .control(&snd::query_info(code, start, count, sz), room)
                .unwrap();
            assert_eq!(
                (snd::status(&resp), resp.len()),
                (Ok(snd::S_BAD_MSG), 4),
                "{name} start {start} count {count} size {sz} ({why}): expected S_BAD_MSG with used.len 4, got {resp:02x?}"
            );
        }
        // The response buffer cannot hold the items asked for.
        let resp = fe
            .control(&snd::query_info(code, 0, n, size), 4 + n * size - 1)
            .unwrap();
        assert_eq!(
            (snd::status(&resp), resp.len()),
            (Ok(snd::S_BAD_MSG), 4),
            "{name} of {n} items into a buffer one byte short: expected S_BAD_MSG, got {resp:02x?}"
        );
        // count 0 is a valid, empty query.
        let resp = fe.control(&snd::query_info(code, 0, 0, size), 64).unwrap();
        assert_eq!(resp, snd::S_OK.to_le_bytes(), "{name} of 0 items");
    }
    // JACK_REMAP: a valid jack cannot be remapped (no jack has REMAP); an
    // invalid jack id is a bad message.
    for jack in [0, 1] {
        expect_status(
            &mut fe,
            &snd::jack_remap(jack, 0, 0),
            snd::S_NOT_SUPP,
            &format!("JACK_REMAP of jack {jack}"),
        );
    }
    for jack in [2, 1000, u32::MAX] {
        expect_status(
            &mut fe,
            &snd::jack_remap(jack, 0, 0),
            snd::S_BAD_MSG,
            &format!("JACK_REMAP of jack {jack}"),
        );
    }
    // An unknown code is not supported.
    expect_status(
        &mut fe,
        &snd::hdr(0x0777),
        snd::S_NOT_SUPP,
        "unknown request code 0x777",
    );
    assert_responsive(&mut fe, &broker, pid, "after info query errors");
}

#[test]
fn jacks_follow_the_initial_streams() {
    for (streams, want) in [("output", [1u8, 0]), ("input", [0, 1]), ("none", [0, 0])] {
        let broker = Broker::start_with(
            "proto-jacks",
            BrokerOptions {
                initial_streams: streams.into(),
                ..BrokerOptions::default()
            },
        );
        let mut fe = broker.connect(FrontendOptions::default());
        let items = query_all(&mut fe, snd::R_JACK_INFO, 2, snd::JACK_INFO_SIZE);
        let got: Vec<u8> = items
            .iter()
            .map(|b| JackInfo::parse(b).unwrap().connected)
            .collect();
        assert_eq!(
            got, want,
            "--initial-streams {streams}: expected jacks (output, input) connected = {want:?}, got {got:?}"
        );
    }
}

#[test]
fn stream_lifecycle_full_sequence() {
    use snd::{
        R_PCM_PREPARE as PREPARE, R_PCM_RELEASE as RELEASE, R_PCM_START as START,
        R_PCM_STOP as STOP,
    };
    const SET: u32 = snd::R_PCM_SET_PARAMS;
    let broker = Broker::start("proto-lifecycle");
    let mut fe = broker.connect(FrontendOptions::default());
    let pid = broker.device_pid(PROMPT);
    let a = PcmConfig::s16_stereo_48k(10);
    let b = PcmConfig {
        channels: 1,
        format: snd::PCM_FMT_FLOAT,
        rate: snd::PCM_RATE_44100,
        period_bytes: 4 * 441,
        buffer_bytes: 4 * 441 * 3,
    };
    for stream in [OUT, IN] {
        let seq = [
            (SET, a),
            (PREPARE, a),
            (START, a),
            (STOP, a),
            (START, a),
            (STOP, a),
            (RELEASE, a),
            (SET, b),
            (PREPARE, b),
            (PREPARE, b),
            (SET, a),
            (SET, b),
            (PREPARE, b),
            (START, b),
            (STOP, b),
            (RELEASE, b),
            (PREPARE, b),
            (RELEASE, b),
            (SET, a),
            (PREPARE, a),
            (RELEASE, a),
        ];
        for (i, (code, cfg)) in seq.iter().enumerate() {
            let req = if *code == SET {
                cfg.set_params_request(stream)
            } else {
                snd::pcm_hdr(*code, stream)
            };
            expect_status(
                &mut fe,
                &req,
                snd::S_OK,
                &format!(
                    "stream {stream}, step {i}: {} (a valid transition)",
                    snd::code_name(*code)
                ),
            );
        }
    }
    assert_responsive(&mut fe, &broker, pid, "after the lifecycle sequence");
}

/// What a playback run looked like.
struct PlaybackRun {
    /// From START to the last buffer's return.
    elapsed: Duration,
}

/// Queue `n` periods on stream 0 while it is only prepared, check none comes
/// back, START, collect them all and check `played.raw`.
fn play_periods(
    broker: &Broker,
    fe: &mut Frontend,
    cfg: &PcmConfig,
    n: usize,
    indirect: bool,
    seed: u64,
) -> PlaybackRun {
    let periods: Vec<Vec<u8>> = (0..n)
        .map(|i| pcm_pattern(seed + i as u64, cfg.period_bytes as usize))
        .collect();
    let played_before = broker.played().len();
    setup_stream(fe, OUT, cfg);
    let xfer = snd::pcm_xfer(OUT);
    let mut heads = Vec::new();
    for p in &periods {
        let head = if indirect {
            fe.add_chain_indirect(snd::QUEUE_TX, &[&xfer, p], &[snd::PCM_STATUS_SIZE as u32])
                .expect("add indirect TX buffer")
        } else {
            add_tx(fe, OUT, p)
        };
        heads.push(head);
    }
    fe.kick(snd::QUEUE_TX).unwrap();

    expect_nothing_used(
        fe,
        snd::QUEUE_TX,
        QUIET_WINDOW,
        "playback buffers queued before START",
    );
    assert_eq!(
        broker.played().len(),
        played_before,
        "bytes reached played.raw before START"
    );

    fixture::start(fe, OUT);
    let t0 = Instant::now();
    let nominal = cfg.period() * n as u32;
    let total = n as u64 * u64::from(cfg.period_bytes);
    let mut returned = Vec::new();
    let mut last_latency = None;
    for i in 0..n {
        let u = wait_used(
            fe,
            snd::QUEUE_TX,
            nominal * 5 + PROMPT,
            &format!("playback buffer {i} of {n}"),
        );
        let st = tx_status(&u, &format!("playback buffer {i}"));
        assert_eq!(
            st.status,
            snd::S_OK,
            "playback buffer {i}: expected S_OK, got {} ({:#x})",
            snd::status_name(st.status),
            st.status
        );
        assert!(
            u64::from(st.latency_bytes) <= total,
            "playback buffer {i}: latency_bytes {} exceeds all {total} bytes queued",
            st.latency_bytes
        );
        returned.push(u.id as u16);
        last_latency = Some(st.latency_bytes);
    }
    let elapsed = t0.elapsed();
    assert_eq!(
        last_latency,
        Some(0),
        "the last buffer returned should report no bytes queued behind it"
    );
    let mut sorted = returned.clone();
    sorted.sort_unstable();
    let mut want = heads.clone();
    want.sort_unstable();
    assert_eq!(sorted, want, "expected every queued head back exactly once");

    let want_bytes: Vec<u8> = periods.concat();
    let played = broker.wait_played(played_before + want_bytes.len(), PROMPT);
    assert_same_bytes(
        "played.raw (bytes of this run)",
        &played[played_before.min(played.len())..],
        &want_bytes,
    );

    fixture::stop(fe, OUT);
    fixture::release(fe, OUT);
    assert!(
        fe.notifications(snd::QUEUE_TX).unwrap() > 0,
        "the device never signalled the TX queue's call eventfd"
    );
    PlaybackRun { elapsed }
}

fn playback_variant(tag: &str, opts: FrontendOptions, indirect: bool) {
    let broker = Broker::start(tag);
    let mut fe = broker.connect(opts);
    let pid = broker.device_pid(PROMPT);
    let cfg = PcmConfig::s16_stereo_48k(10);
    const N: usize = 20;
    let run = play_periods(&broker, &mut fe, &cfg, N, indirect, 1000);
    // The pacing contract: the host consumes at the real-time rate, so the
    // guest cannot get its buffers back faster than they play. Only a lower
    // bound (80 %), since a loaded machine may be slower.
    let nominal = cfg.period() * N as u32;
    eprintln!(
        "{N} periods ({nominal:?} of audio) came back {:?} after START",
        run.elapsed
    );
    assert!(
        run.elapsed >= nominal * 4 / 5,
        "{N} periods of {:?} came back {:?} after START; expected at least 80% of the {nominal:?} they take to play",
        cfg.period(),
        run.elapsed
    );
    assert_responsive(&mut fe, &broker, pid, "after playback");
}

#[test]
fn playback_is_paced_and_byte_exact() {
    playback_variant("proto-play", FrontendOptions::default(), false);
}

#[test]
fn playback_with_event_idx_and_indirect_descriptors() {
    playback_variant(
        "proto-play-evidx",
        FrontendOptions {
            event_idx: true,
            indirect_desc: true,
            ..FrontendOptions::default()
        },
        true,
    );
}

#[test]
fn playback_with_event_idx_and_direct_descriptors() {
    playback_variant(
        "proto-play-evidx-direct",
        FrontendOptions {
            event_idx: true,
            ..FrontendOptions::default()
        },
        false,
    );
}

#[test]
fn stop_pauses_playback_and_start_resumes() {
    let broker = Broker::start("proto-pause");
    let mut fe = broker.connect(FrontendOptions::default());
    let pid = broker.device_pid(PROMPT);
    let cfg = PcmConfig::s16_stereo_48k(10);
    const N: usize = 10;
    let periods: Vec<Vec<u8>> = (0..N + 1)
        .map(|i| pcm_pattern(300 + i as u64, cfg.period_bytes as usize))
        .collect();
    setup_stream(&mut fe, OUT, &cfg);
    for p in &periods[..N] {
        add_tx(&mut fe, OUT, p);
    }
    fe.kick(snd::QUEUE_TX).unwrap();
    fixture::start(&mut fe, OUT);
    let mut done = 0;
    while done < 3 {
        let u = wait_used(&mut fe, snd::QUEUE_TX, PROMPT, "playback before STOP");
        assert_eq!(tx_status(&u, "playback before STOP").status, snd::S_OK);
        done += 1;
    }
    fixture::stop(&mut fe, OUT);
    // A completion the host had already sent may still land just after
    // STOP; after that the stream is paused: nothing comes back.
    while fe
        .wait_used(snd::QUEUE_TX, Duration::from_millis(30))
        .unwrap()
        .is_some()
    {
        done += 1;
    }
    assert!(
        done <= 5,
        "{done} of {N} buffers came back around STOP; expected the stream to pause after ~3"
    );
    expect_nothing_used(
        &mut fe,
        snd::QUEUE_TX,
        QUIET_WINDOW,
        "playback buffers while the stream is stopped",
    );
    let stopped_at = broker.played().len();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        broker.played().len(),
        stopped_at,
        "bytes were played while the stream was stopped"
    );
    // A stopped stream still accepts buffers (they play after START).
    add_tx(&mut fe, OUT, &periods[N]);
    fe.kick(snd::QUEUE_TX).unwrap();
    expect_nothing_used(
        &mut fe,
        snd::QUEUE_TX,
        Duration::from_millis(50),
        "a buffer queued while stopped",
    );

    fixture::start(&mut fe, OUT);
    while done < N + 1 {
        let u = wait_used(&mut fe, snd::QUEUE_TX, PROMPT, "playback after START again");
        assert_eq!(tx_status(&u, "playback after resuming").status, snd::S_OK);
        done += 1;
    }
    let want: Vec<u8> = periods.concat();
    assert_same_bytes(
        "played.raw across STOP/START",
        &broker.wait_played(want.len(), PROMPT),
        &want,
    );
    fixture::stop(&mut fe, OUT);
    fixture::release(&mut fe, OUT);
    assert_responsive(&mut fe, &broker, pid, "after pausing and resuming");
}

#[test]
fn release_returns_pending_buffers_at_once() {
    let broker = Broker::start("proto-release");
    let mut fe = broker.connect(FrontendOptions::default());
    let pid = broker.device_pid(PROMPT);
    let cfg = PcmConfig::s16_stereo_48k(10);
    setup_stream(&mut fe, OUT, &cfg);
    setup_stream(&mut fe, IN, &cfg);
    let tx: Vec<u16> = (0..5)
        .map(|i| add_tx(&mut fe, OUT, &pcm_pattern(i, cfg.period_bytes as usize)))
        .collect();
    let rx: Vec<RxBuffer> = (0..5)
        .map(|_| add_rx_tracked(&mut fe, IN, cfg.period_bytes))
        .collect();
    fe.kick(snd::QUEUE_TX).unwrap();
    fe.kick(snd::QUEUE_RX).unwrap();
    expect_nothing_used(
        &mut fe,
        snd::QUEUE_TX,
        QUIET_WINDOW,
        "TX buffers of a prepared, not started stream",
    );
    expect_nothing_used(
        &mut fe,
        snd::QUEUE_RX,
        Duration::from_millis(50),
        "RX buffers of a prepared, not started stream",
    );

    fixture::release(&mut fe, OUT);
    let mut got = Vec::new();
    for i in 0..tx.len() {
        let u = wait_used(
            &mut fe,
            snd::QUEUE_TX,
            PROMPT,
            &format!("TX buffer {i} after RELEASE"),
        );
        let st = tx_status(&u, "TX buffer after RELEASE");
        assert_eq!(
            st.status,
            snd::S_OK,
            "TX buffer returned by RELEASE: status {:#x}",
            st.status
        );
        got.push(u.id as u16);
    }
    got.sort_unstable();
    assert_eq!(got, tx, "RELEASE should return every pending TX buffer");

    fixture::release(&mut fe, IN);
    let mut got = Vec::new();
    for i in 0..rx.len() {
        let u = wait_used(
            &mut fe,
            snd::QUEUE_RX,
            PROMPT,
            &format!("RX buffer {i} after RELEASE"),
        );
        let buf = rx
            .iter()
            .find(|b| u32::from(b.head) == u.id)
            .unwrap_or_else(|| panic!("RELEASE returned RX head {} that was not queued", u.id));
        // Nothing was captured: used.len is the status alone, and the status
        // sits at its place after the (untouched) data area.
        assert_eq!(
            u.len, 8,
            "RX buffer returned by RELEASE before START: expected used.len 8 (status only), got {}",
            u.len
        );
        let st = buf.status(&fe);
        assert_eq!(
            st.status,
            snd::S_OK,
            "RX buffer returned by RELEASE: expected S_OK, got {} ({:#x})",
            snd::status_name(st.status),
            st.status
        );
        got.push(buf.head);
    }
    got.sort_unstable();
    let want: Vec<u16> = rx.iter().map(|b| b.head).collect();
    assert_eq!(got, want, "RELEASE should return every pending RX buffer");

    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        broker.played().len(),
        0,
        "released playback buffers must not be played"
    );
    assert_responsive(&mut fe, &broker, pid, "after RELEASE with pending buffers");
}

/// Queue `n` RX periods on stream 1 before START, check none comes back,
/// START, and return the captured data in order.
fn capture_periods(fe: &mut Frontend, cfg: &PcmConfig, n: usize) -> Vec<u8> {
    for _ in 0..n {
        add_rx(fe, IN, cfg.period_bytes);
    }
    fe.kick(snd::QUEUE_RX).unwrap();
    expect_nothing_used(
        fe,
        snd::QUEUE_RX,
        QUIET_WINDOW,
        "capture buffers queued before START",
    );
    fixture::start(fe, IN);
    collect_capture(fe, cfg, n)
}

fn collect_capture(fe: &mut Frontend, cfg: &PcmConfig, n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let u = wait_used(
            fe,
            snd::QUEUE_RX,
            cfg.period() * n as u32 * 5 + PROMPT,
            &format!("capture buffer {i} of {n}"),
        );
        assert_eq!(
            u.len,
            cfg.period_bytes + 8,
            "capture buffer {i}: expected used.len {} (period + status), got {}",
            cfg.period_bytes + 8,
            u.len
        );
        let (data, st) = PcmStatus::split_rx(&u.writable_bytes).unwrap();
        assert_eq!(
            st.status,
            snd::S_OK,
            "capture buffer {i}: expected S_OK, got {:#x}",
            st.status
        );
        out.extend_from_slice(data);
    }
    out
}

#[test]
fn capture_delivers_the_capture_file() {
    let broker = Broker::start("proto-capture");
    let mut fe = broker.connect(FrontendOptions::default());
    let pid = broker.device_pid(PROMPT);
    let cfg = PcmConfig::s16_stereo_48k(10);
    setup_stream(&mut fe, IN, &cfg);
    const N: usize = 12; // 23 040 bytes: capture.raw (8 888 bytes) loops twice
    let got = capture_periods(&mut fe, &cfg, N);
    assert!(
        got.len() > 2 * broker.capture_bytes().len(),
        "the test should make the capture file loop"
    );
    assert_same_bytes(
        "captured bytes vs capture.raw, looping",
        &got,
        &looped(broker.capture_bytes(), got.len()),
    );
    fixture::stop(&mut fe, IN);
    fixture::release(&mut fe, IN);
    assert_responsive(&mut fe, &broker, pid, "after capture");
}

#[test]
fn duplex_playback_and_capture() {
    let broker = Broker::start("proto-duplex");
    let mut fe = broker.connect(FrontendOptions {
        event_idx: true,
        ..FrontendOptions::default()
    });
    let pid = broker.device_pid(PROMPT);
    let cfg = PcmConfig::s16_stereo_48k(10);
    const N: usize = 15;
    setup_stream(&mut fe, OUT, &cfg);
    setup_stream(&mut fe, IN, &cfg);
    let periods: Vec<Vec<u8>> = (0..N)
        .map(|i| pcm_pattern(77 + i as u64, cfg.period_bytes as usize))
        .collect();
    for p in &periods {
        add_tx(&mut fe, OUT, p);
    }
    for _ in 0..N {
        add_rx(&mut fe, IN, cfg.period_bytes);
    }
    fe.kick(snd::QUEUE_TX).unwrap();
    fe.kick(snd::QUEUE_RX).unwrap();
    fixture::start(&mut fe, OUT);
    fixture::start(&mut fe, IN);

    // Collect both queues as they come.
    let deadline = Instant::now() + cfg.period() * N as u32 * 5 + PROMPT;
    let (mut tx_done, mut rx_data) = (0, Vec::new());
    while tx_done < N || rx_data.len() < N * cfg.period_bytes as usize {
        assert!(
            Instant::now() < deadline,
            "duplex: only {tx_done}/{N} playback and {}/{} capture bytes after the deadline",
            rx_data.len(),
            N * cfg.period_bytes as usize
        );
        if let Some(u) = fe.poll_used(snd::QUEUE_TX).unwrap() {
            let st = tx_status(&u, "duplex playback buffer");
            assert_eq!(
                st.status,
                snd::S_OK,
                "duplex playback buffer status {:#x}",
                st.status
            );
            tx_done += 1;
        }
        if let Some(u) = fe.poll_used(snd::QUEUE_RX).unwrap() {
            assert_eq!(
                u.len,
                cfg.period_bytes + 8,
                "duplex capture buffer used.len"
            );
            let (data, st) = PcmStatus::split_rx(&u.writable_bytes).unwrap();
            assert_eq!(
                st.status,
                snd::S_OK,
                "duplex capture buffer status {:#x}",
                st.status
            );
            rx_data.extend_from_slice(data);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let want: Vec<u8> = periods.concat();
    assert_same_bytes(
        "duplex: played.raw",
        &broker.wait_played(want.len(), PROMPT),
        &want,
    );
    assert_same_bytes(
        "duplex: captured bytes vs capture.raw",
        &rx_data,
        &looped(broker.capture_bytes(), rx_data.len()),
    );
    for s in [OUT, IN] {
        fixture::stop(&mut fe, s);
        fixture::release(&mut fe, s);
    }
    assert_responsive(&mut fe, &broker, pid, "after duplex");
}

#[test]
fn reconnect_is_served_by_a_fresh_device() {
    let broker = Broker::start("proto-reconnect");
    let cfg = PcmConfig::s16_stereo_48k(10);
    let mut fe = broker.connect(FrontendOptions::default());
    let first = broker.device_pid(PROMPT);
    play_periods(&broker, &mut fe, &cfg, 3, false, 500);
    // Leave the stream prepared, with a buffer in flight, and go away.
    setup_stream(&mut fe, OUT, &cfg);
    add_tx(&mut fe, OUT, &pcm_pattern(999, cfg.period_bytes as usize));
    fe.kick(snd::QUEUE_TX).unwrap();
    drop(fe);

    let mut fe = broker.connect(FrontendOptions {
        event_idx: true,
        ..FrontendOptions::default()
    });
    let deadline = Instant::now() + PROMPT;
    let second = loop {
        let pid = broker.device_pid(PROMPT);
        if pid != first {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "the broker did not start a new device after the first frontend left"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        !fixture::process_alive(first),
        "the first device (pid {first}) should have exited with its frontend"
    );
    assert_eq!(config_of(&fe).streams, 2, "config on the new connection");
    // A fresh device: the stream starts over in its initial state.
    expect_status(
        &mut fe,
        &snd::pcm_hdr(snd::R_PCM_PREPARE, OUT),
        snd::S_BAD_MSG,
        "PREPARE before SET_PARAMS on the new connection",
    );
    let before = broker.played().len();
    assert_eq!(
        before,
        3 * cfg.period_bytes as usize,
        "the unplayed buffer of the first connection must not be played"
    );
    play_periods(&broker, &mut fe, &cfg, 3, false, 600);
    let log = broker.log();
    assert!(
        log.contains("device exited after its frontend disconnected"),
        "expected the broker to log the first device's orderly exit"
    );
    assert_responsive(&mut fe, &broker, second, "after reconnecting");
}

fn jacks(fe: &mut Frontend) -> Vec<u8> {
    query_all(fe, snd::R_JACK_INFO, 2, snd::JACK_INFO_SIZE)
        .iter()
        .map(|b| JackInfo::parse(b).unwrap().connected)
        .collect()
}

fn expect_event(fe: &mut Frontend, code: u32, jack: u32, what: &str) {
    let u = wait_used(fe, snd::QUEUE_EVENT, PROMPT, what);
    assert_eq!(
        u.len as usize,
        snd::EVENT_SIZE,
        "{what}: expected an event of {} bytes, used.len is {}",
        snd::EVENT_SIZE,
        u.len
    );
    let ev = Event::parse(&u.writable_bytes).unwrap();
    assert_eq!(
        (ev.code, ev.data),
        (code, jack),
        "{what}: expected {} for jack {jack}, got {} ({:#x}) for {}",
        snd::code_name(code),
        snd::code_name(ev.code),
        ev.code,
        ev.data
    );
}

#[test]
fn event_buffers_are_held_until_a_jack_event() {
    let broker = Broker::start_with(
        "proto-events",
        BrokerOptions {
            control_socket: true,
            ..BrokerOptions::default()
        },
    );
    let mut fe = broker.connect(FrontendOptions::default());
    let pid = broker.device_pid(PROMPT);
    for _ in 0..2 {
        fe.add_chain(snd::QUEUE_EVENT, &[], &[snd::EVENT_SIZE as u32])
            .unwrap();
    }
    fe.kick(snd::QUEUE_EVENT).unwrap();
    expect_nothing_used(
        &mut fe,
        snd::QUEUE_EVENT,
        QUIET_WINDOW,
        "event buffers with no event to report",
    );
    // Holding them does not block the other queues.
    let cfg = PcmConfig::s16_stereo_48k(10);
    play_periods(&broker, &mut fe, &cfg, 2, false, 42);
    expect_nothing_used(
        &mut fe,
        snd::QUEUE_EVENT,
        Duration::from_millis(50),
        "event buffers after playback",
    );
    assert_eq!(
        jacks(&mut fe),
        [1, 1],
        "jacks (output, input) before any change"
    );

    // The administrator turns input off, then on again: the guest hears of
    // each change through a held event buffer, and JACK_INFO agrees.
    let answer = broker.control("SET input off");
    assert!(
        answer.starts_with("OK"),
        "control socket: SET input off answered {answer:?}"
    );
    expect_event(
        &mut fe,
        snd::EVT_JACK_DISCONNECTED,
        1,
        "after SET input off",
    );
    assert_eq!(
        jacks(&mut fe),
        [1, 0],
        "jacks (output, input) after SET input off"
    );
    let answer = broker.control("SET input on");
    assert!(
        answer.starts_with("OK"),
        "control socket: SET input on answered {answer:?}"
    );
    expect_event(&mut fe, snd::EVT_JACK_CONNECTED, 1, "after SET input on");
    assert_eq!(
        jacks(&mut fe),
        [1, 1],
        "jacks (output, input) after SET input on"
    );

    // With no buffer held, an event waits for the next one.
    let answer = broker.control("SET output off");
    assert!(
        answer.starts_with("OK"),
        "control socket: SET output off answered {answer:?}"
    );
    expect_nothing_used(
        &mut fe,
        snd::QUEUE_EVENT,
        Duration::from_millis(100),
        "event queue with no buffer",
    );
    fe.add_chain(snd::QUEUE_EVENT, &[], &[snd::EVENT_SIZE as u32])
        .unwrap();
    fe.kick(snd::QUEUE_EVENT).unwrap();
    expect_event(
        &mut fe,
        snd::EVT_JACK_DISCONNECTED,
        0,
        "a buffer added after SET output off",
    );
    assert_eq!(
        jacks(&mut fe),
        [0, 1],
        "jacks (output, input) after SET output off"
    );
    assert_responsive(&mut fe, &broker, pid, "after jack events");
}
