//! Validates the *test frontend itself* against an independent backend:
//! upstream `vhost-device-sound` (0.3.0, `--backend null`).
//!
//! Ignored by default because that binary is not part of this workspace.
//! To run:
//!
//! ```sh
//! cargo install vhost-device-sound --version 0.3.0 --no-default-features --root /tmp/upstream
//! UPSTREAM_VHOST_DEVICE_SOUND=/tmp/upstream/bin/vhost-device-sound \
//!     cargo test -p vsnd-tests --test frontend_selftest -- --ignored
//! ```
//!
//! Upstream's null backend returns every TX buffer at once (no pacing) and
//! never returns RX buffers, so only the TX path is exercised here. What is
//! under test is our negotiation, memory table, ring handling and the `snd`
//! wire helpers, not upstream.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use vsnd_tests::frontend::{
    Frontend, FrontendOptions, RawDesc, F_EVENT_IDX, F_INDIRECT_DESC, F_PROTOCOL_FEATURES,
    F_VERSION_1,
};
use vsnd_tests::snd::{self, PcmInfo, PcmStatus};

const ENV: &str = "UPSTREAM_VHOST_DEVICE_SOUND";

/// A running upstream backend; killed (by its pid) and reaped on drop.
struct Upstream {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Upstream {
    fn start(tag: &str) -> Self {
        let bin = std::env::var_os(ENV).unwrap_or_else(|| {
            panic!("set {ENV} to the path of an upstream vhost-device-sound 0.3.0 binary")
        });
        let dir = std::env::temp_dir().join(format!("vsnd-selftest-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let socket = dir.join("up.sock");
        let log = dir.join("upstream.log");
        let child = Command::new(bin)
            .arg("--socket")
            .arg(&socket)
            .args(["--backend", "null"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(File::create(&log).expect("create log"))
            .stderr(File::create(dir.join("upstream.err")).expect("create log"))
            .spawn()
            .expect("spawn upstream vhost-device-sound");
        Self {
            child,
            dir,
            socket,
            log,
        }
    }

    fn logs(&self) -> String {
        let out = std::fs::read_to_string(&self.log).unwrap_or_default();
        let err = std::fs::read_to_string(self.dir.join("upstream.err")).unwrap_or_default();
        format!("--- upstream stdout ---\n{out}\n--- upstream stderr ---\n{err}")
    }

    fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
            eprintln!("upstream files kept in {}", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn ok(resp: &[u8], what: &str) {
    let st = snd::status(resp).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(
        st,
        snd::S_OK,
        "{what}: expected S_OK, device answered {st:#x} ({})",
        snd::status_name(st)
    );
}

/// Push `n` TX buffers of `period` bytes on stream 0, `batch` at a time, and
/// check every one comes back with S_OK and the right used length.
fn push_tx(fe: &mut Frontend, n: usize, batch: usize, period: usize) {
    let data: Vec<u8> = (0..period).map(|i| (i % 251) as u8).collect();
    let xfer = snd::pcm_xfer(0);
    let mut sent = 0;
    while sent < n {
        let k = batch.min(n - sent);
        let mut heads = Vec::new();
        for _ in 0..k {
            heads.push(
                fe.add_chain(
                    snd::QUEUE_TX,
                    &[&xfer, &data],
                    &[snd::PCM_STATUS_SIZE as u32],
                )
                .expect("add TX chain"),
            );
        }
        fe.kick(snd::QUEUE_TX).expect("kick TX");
        for _ in 0..k {
            let u = fe
                .wait_used(snd::QUEUE_TX, Duration::from_secs(2))
                .expect("wait TX")
                .expect("TX buffer not returned within 2 s");
            assert!(
                heads.contains(&(u.id as u16)),
                "unexpected TX head {}",
                u.id
            );
            assert_eq!(
                u.len as usize,
                snd::PCM_STATUS_SIZE,
                "TX used.len is the status only"
            );
            let st = PcmStatus::parse(&u.writable_bytes).expect("status");
            assert_eq!(st.status, snd::S_OK, "TX status");
        }
        sent += k;
        fe.reset_alloc();
    }
}

fn exercise(opts: FrontendOptions, tag: &str) {
    let up = Upstream::start(tag);
    let queue_size = opts.queue_size;
    let want_event_idx = opts.event_idx;
    let want_indirect = opts.indirect_desc;
    let mut fe = Frontend::connect(up.socket(), opts).expect("connect and negotiate");

    // Negotiation.
    let f = fe.features();
    assert_eq!(f & F_VERSION_1, F_VERSION_1);
    assert_eq!(f & F_PROTOCOL_FEATURES, F_PROTOCOL_FEATURES);
    assert_eq!(
        f & F_EVENT_IDX != 0,
        want_event_idx,
        "EVENT_IDX negotiated as asked"
    );
    assert_eq!(
        f & F_INDIRECT_DESC != 0,
        want_indirect,
        "INDIRECT_DESC negotiated as asked"
    );

    // Config: upstream has 2 streams, 1 chmap, 0 jacks, 0 controls.
    let cfg = snd::Config::parse(fe.config_bytes()).expect("config");
    assert_eq!(fe.config_bytes().len(), 16);
    assert!(cfg.streams >= 1, "config reports no streams: {cfg:?}");

    // PCM_INFO for all streams.
    let n = cfg.streams;
    let resp = fe
        .control(
            &snd::query_info(snd::R_PCM_INFO, 0, n, snd::PCM_INFO_SIZE as u32),
            (snd::HDR_SIZE + n as usize * snd::PCM_INFO_SIZE) as u32,
        )
        .expect("PCM_INFO");
    let (st, items) = snd::split_info(&resp, snd::PCM_INFO_SIZE).expect("PCM_INFO shape");
    assert_eq!(st, snd::S_OK);
    assert_eq!(items.len(), n as usize);
    let infos: Vec<PcmInfo> = items.iter().map(|b| PcmInfo::parse(b).unwrap()).collect();
    for (i, info) in infos.iter().enumerate() {
        assert!(
            info.channels_min >= 1 && info.channels_min <= info.channels_max,
            "stream {i}: {info:?}"
        );
        assert!(info.direction == snd::D_OUTPUT || info.direction == snd::D_INPUT);
    }
    let out = &infos[0];
    assert_eq!(
        out.direction,
        snd::D_OUTPUT,
        "upstream's stream 0 is playback"
    );
    assert!(
        out.has_format(snd::PCM_FMT_S16) && out.has_rate(snd::PCM_RATE_48000),
        "{out:?}"
    );

    // CHMAP_INFO for all channel maps.
    if cfg.chmaps > 0 {
        let resp = fe
            .control(
                &snd::query_info(
                    snd::R_CHMAP_INFO,
                    0,
                    cfg.chmaps,
                    snd::CHMAP_INFO_SIZE as u32,
                ),
                (snd::HDR_SIZE + cfg.chmaps as usize * snd::CHMAP_INFO_SIZE) as u32,
            )
            .expect("CHMAP_INFO");
        let (st, items) = snd::split_info(&resp, snd::CHMAP_INFO_SIZE).expect("CHMAP_INFO shape");
        assert_eq!(st, snd::S_OK);
        let c = snd::ChmapInfo::parse(items[0]).unwrap();
        assert!(!c.valid_positions().is_empty(), "{c:?}");
    }

    // A request for a stream that does not exist gets an error status, and a
    // response buffer larger than needed is only written as far as used.len.
    let resp = fe
        .control(&snd::pcm_hdr(snd::R_PCM_PREPARE, n + 7), 64)
        .expect("bad PREPARE");
    assert_eq!(resp.len(), snd::HDR_SIZE, "used.len of a status-only reply");
    assert_ne!(
        snd::status(&resp).unwrap(),
        snd::S_OK,
        "PREPARE of stream {} succeeded",
        n + 7
    );

    // Stream 0: SET_PARAMS / PREPARE / START.
    let period = 1024u32;
    let set = snd::pcm_set_params(
        0,
        4 * period,
        period,
        0,
        2,
        snd::PCM_FMT_S16,
        snd::PCM_RATE_48000,
    );
    ok(
        &fe.control(&set, snd::HDR_SIZE as u32).expect("SET_PARAMS"),
        "SET_PARAMS",
    );
    ok(
        &fe.control(&snd::pcm_hdr(snd::R_PCM_PREPARE, 0), 4)
            .expect("PREPARE"),
        "PREPARE",
    );
    ok(
        &fe.control(&snd::pcm_hdr(snd::R_PCM_START, 0), 4)
            .expect("START"),
        "START",
    );

    // A few buffers, then enough to wrap the rings several times.
    push_tx(&mut fe, 4, 4, period as usize);
    push_tx(&mut fe, 10 * usize::from(queue_size), 16, period as usize);
    assert_eq!(
        fe.free_descriptors(snd::QUEUE_TX).unwrap(),
        usize::from(queue_size)
    );
    assert_eq!(fe.in_flight(snd::QUEUE_TX).unwrap(), 0);

    // The same TX request through the raw API: header and data split over
    // three readable descriptors, one of them zero-length.
    let hdr = fe.alloc_bytes(&snd::pcm_xfer(0)).unwrap();
    let data = fe.alloc_bytes(&vec![7u8; period as usize]).unwrap();
    let status = fe.alloc(8).unwrap();
    let head = fe
        .add_raw_chain(
            snd::QUEUE_TX,
            &[
                RawDesc::readable(hdr, 4).then(1),
                RawDesc::readable(data, 0).then(2),
                RawDesc::readable(data, period).then(3),
                RawDesc::writable(status, 8),
            ],
        )
        .unwrap();
    fe.publish(snd::QUEUE_TX, head).unwrap();
    fe.kick(snd::QUEUE_TX).unwrap();
    let u = fe
        .wait_used(snd::QUEUE_TX, Duration::from_secs(2))
        .unwrap()
        .expect("raw TX returned");
    assert_eq!(u.id, u32::from(head));
    assert_eq!(
        PcmStatus::parse(&u.writable_bytes).unwrap().status,
        snd::S_OK
    );
    assert_eq!(fe.read_mem(status, 4).unwrap(), snd::S_OK.to_le_bytes());

    // Through an indirect table when negotiated.
    if want_indirect {
        let xfer = snd::pcm_xfer(0);
        let pcm = vec![1u8; period as usize];
        let head = fe
            .add_chain_indirect(
                snd::QUEUE_TX,
                &[&xfer, &pcm],
                &[snd::PCM_STATUS_SIZE as u32],
            )
            .unwrap();
        fe.kick(snd::QUEUE_TX).unwrap();
        let u = fe
            .wait_used(snd::QUEUE_TX, Duration::from_secs(2))
            .unwrap()
            .expect("indirect TX returned");
        assert_eq!(u.id, u32::from(head));
        assert_eq!(
            PcmStatus::parse(&u.writable_bytes).unwrap().status,
            snd::S_OK
        );
    }

    // Notifications arrived through the call eventfd.
    assert!(
        fe.notifications(snd::QUEUE_TX).unwrap() > 0,
        "no call notification on TX"
    );
    assert!(
        fe.notifications(snd::QUEUE_CONTROL).unwrap() > 0,
        "no call notification on control"
    );

    ok(
        &fe.control(&snd::pcm_hdr(snd::R_PCM_STOP, 0), 4)
            .expect("STOP"),
        "STOP",
    );
    ok(
        &fe.control(&snd::pcm_hdr(snd::R_PCM_RELEASE, 0), 4)
            .expect("RELEASE"),
        "RELEASE",
    );

    // A kick storm with nothing queued leaves the backend answering.
    fe.kick_storm(snd::QUEUE_TX, 10_000).unwrap();
    fe.ping().expect("backend alive after kick storm");

    // Disconnect; upstream serves the next connection.
    drop(fe);
    let mut fe = Frontend::connect(up.socket(), FrontendOptions::default()).expect("reconnect");
    let resp = fe
        .control(
            &snd::query_info(snd::R_PCM_INFO, 0, 1, snd::PCM_INFO_SIZE as u32),
            36,
        )
        .expect("PCM_INFO after reconnect");
    ok(&resp, "PCM_INFO after reconnect");
}

#[test]
#[ignore = "needs upstream vhost-device-sound 0.3.0: set UPSTREAM_VHOST_DEVICE_SOUND"]
fn frontend_drives_upstream() {
    exercise(FrontendOptions::default(), "plain");
}

#[test]
#[ignore = "needs upstream vhost-device-sound 0.3.0: set UPSTREAM_VHOST_DEVICE_SOUND"]
fn frontend_drives_upstream_with_event_idx_and_indirect() {
    exercise(
        FrontendOptions {
            event_idx: true,
            indirect_desc: true,
            ..FrontendOptions::default()
        },
        "evidx",
    );
}
