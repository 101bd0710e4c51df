//! A hostile guest against the real `vsnd-broker` + `vsnd-device`.
//!
//! Every test sends malformed or abusive input through the test frontend's
//! raw API and checks what the spec (virtio 1.2 §2.7, §5.14) says the guest
//! gets back: the status it names (`S_BAD_MSG`, `S_NOT_SUPP`), or — where a
//! chain cannot be answered at all — the chain returned with `used.len` 0
//! (or, for a head outside the queue, not returned). After each hostile
//! request a valid one still works, the device process that served the
//! connection is still alive (not restarted), and the broker logged no crash
//! or protocol violation.

use std::time::{Duration, Instant};

use vsnd_tests::fixture::{
    self, add_rx, add_rx_tracked, add_tx, assert_responsive, assert_same_bytes,
    expect_nothing_used, expect_status, looped, pcm_pattern, setup_stream, tx_status, wait_used,
    Broker, BrokerOptions, PcmConfig,
};
use vsnd_tests::frontend::{
    Error as FeError, Frontend, FrontendOptions, RawDesc, Used, DEFAULT_QUEUE_SIZE, DESC_SIZE,
    POISON, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
};
use vsnd_tests::snd::{self, PcmStatus};

const OUT: u32 = 0;
const IN: u32 = 1;
const Q_CTL: usize = snd::QUEUE_CONTROL;
const Q_EVT: usize = snd::QUEUE_EVENT;
const Q_TX: usize = snd::QUEUE_TX;
const Q_RX: usize = snd::QUEUE_RX;

/// Generous bound for anything that should happen "at once".
const PROMPT: Duration = Duration::from_secs(2);
/// How long a test watches for a chain the device must not return.
const QUIET: Duration = Duration::from_millis(300);

/// A broker, a connected frontend, and the pid of the device serving it.
struct Guest {
    // Field order is drop order: disconnect before the broker stops.
    fe: Frontend,
    pid: u32,
    broker: Broker,
}

impl Guest {
    fn start(tag: &str, opts: FrontendOptions) -> Self {
        Self::start_with(tag, BrokerOptions::default(), opts)
    }

    fn start_with(tag: &str, bopts: BrokerOptions, opts: FrontendOptions) -> Self {
        let broker = Broker::start_with(tag, bopts);
        let fe = broker.connect(opts);
        let pid = broker.device_pid(PROMPT);
        Self { fe, pid, broker }
    }

    /// A valid request is still answered and the same device is alive.
    fn alive(&mut self, context: &str) {
        assert_responsive(&mut self.fe, &self.broker, self.pid, context);
    }

    fn bytes(&mut self, data: &[u8]) -> u64 {
        self.fe.alloc_bytes(data).expect("guest memory")
    }

    fn poisoned(&mut self, len: usize) -> u64 {
        self.bytes(&vec![POISON; len])
    }

    /// Write `descs` (raw), publish, kick queue `q`, and wait up to `window`
    /// for the chain: `Some(used)` when the device returned it, `None` when
    /// it did not (its descriptors are then forgotten).
    fn raw(&mut self, q: usize, descs: &[RawDesc], window: Duration, what: &str) -> Option<Used> {
        let head = self
            .fe
            .add_raw_chain(q, descs)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        self.fe.publish(q, head).unwrap();
        self.fe.kick(q).unwrap();
        match self.fe.wait_used(q, window) {
            Ok(Some(u)) => {
                assert_eq!(
                    u.id,
                    u32::from(head),
                    "{what}: expected head {head} back, the device returned head {}",
                    u.id
                );
                Some(u)
            }
            Ok(None) => {
                self.fe.forget_chain(q, head).unwrap();
                None
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }

    /// The chain cannot be answered: it must come back with `used.len` 0.
    fn expect_len0(&mut self, q: usize, descs: &[RawDesc], what: &str) {
        match self.raw(q, descs, PROMPT, what) {
            Some(u) => assert_eq!(
                u.len, 0,
                "{what}: expected the chain back with used.len 0 (it cannot be answered), \
                 got used.len {} and bytes {:02x?}",
                u.len, u.writable_bytes
            ),
            None => panic!(
                "{what}: expected the chain back with used.len 0, the device kept it \
                 (a guest driver waiting for it would hang)"
            ),
        }
        self.alive(what);
    }

    /// A control chain answered with a status-only response `want`.
    fn expect_control(&mut self, descs: &[RawDesc], want: u32, what: &str) {
        let u = self
            .raw(Q_CTL, descs, PROMPT, what)
            .unwrap_or_else(|| panic!("{what}: expected an answer, the chain was not returned"));
        let st = snd::status(&u.writable_bytes);
        assert_eq!(
            (st.clone(), u.len),
            (Ok(want), 4),
            "{what}: expected {} with used.len 4, got {st:?} with used.len {} ({:02x?})",
            snd::status_name(want),
            u.len,
            u.writable_bytes
        );
        self.alive(what);
    }

    /// A control request (readable, then a 64-byte response) as raw
    /// descriptors at fresh addresses.
    fn control_descs(&mut self, req: &[u8]) -> [RawDesc; 2] {
        let r = self.bytes(req);
        let w = self.poisoned(64);
        [
            RawDesc::readable(r, req.len() as u32).then(1),
            RawDesc::writable(w, 64),
        ]
    }

    /// A TX chain (header, payload, status) as raw descriptors.
    fn tx_descs(&mut self, stream: u32, payload: &[u8], status_len: u32) -> Vec<RawDesc> {
        let h = self.bytes(&snd::pcm_xfer(stream));
        let mut d = vec![RawDesc::readable(h, 4).then(1)];
        if !payload.is_empty() {
            let p = self.bytes(payload);
            d.push(RawDesc::readable(p, payload.len() as u32).then(2));
        }
        if status_len > 0 {
            let s = self.poisoned(status_len as usize);
            d.push(RawDesc::writable(s, status_len));
        } else if let Some(last) = d.last_mut() {
            last.flags &= !VIRTQ_DESC_F_NEXT;
        }
        d
    }

    fn pcm_info_request(&self) -> Vec<u8> {
        snd::query_info(snd::R_PCM_INFO, 0, 1, snd::PCM_INFO_SIZE as u32)
    }

    /// The answer to a valid PCM_INFO of stream 0, for comparisons.
    fn pcm_info_answer(&mut self) -> Vec<u8> {
        let req = self.pcm_info_request();
        self.fe.control(&req, 36).expect("PCM_INFO")
    }
}

/// Every used entry of queue `q` until none arrives for `window`, as
/// (id, len); entries for heads the frontend no longer tracks (a head
/// published twice) are counted too.
fn drain(fe: &mut Frontend, q: usize, window: Duration) -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    loop {
        match fe.wait_used(q, window) {
            Ok(Some(u)) => out.push((u.id, u.len)),
            Ok(None) => return out,
            Err(FeError::UnknownUsedId { id, len, .. }) => out.push((id, len)),
            Err(e) => panic!("queue {q}: {e}"),
        }
    }
}

fn status_of_tx(u: &Used, what: &str) -> u32 {
    tx_status(u, what).status
}

fn assert_tx_status(u: &Used, want: u32, what: &str) {
    let got = status_of_tx(u, what);
    assert_eq!(
        got,
        want,
        "{what}: expected TX status {}, got {} ({got:#x})",
        snd::status_name(want),
        snd::status_name(got)
    );
}

// ---------------------------------------------------------------------------
// Stream ids and directions
// ---------------------------------------------------------------------------

const BAD_STREAMS: [u32; 5] = [2, 3, 0x100, 0x8000_0000, u32::MAX];

#[test]
fn control_requests_for_streams_that_do_not_exist() {
    let mut g = Guest::start("hostile-ctl-ids", FrontendOptions::default());
    let cfg = PcmConfig::s16_stereo_48k(10);
    for id in BAD_STREAMS {
        let what = format!("SET_PARAMS of stream {id}");
        expect_status(
            &mut g.fe,
            &cfg.set_params_request(id),
            snd::S_BAD_MSG,
            &what,
        );
        for code in [
            snd::R_PCM_PREPARE,
            snd::R_PCM_START,
            snd::R_PCM_STOP,
            snd::R_PCM_RELEASE,
        ] {
            let what = format!("{} of stream {id}", snd::code_name(code));
            expect_status(&mut g.fe, &snd::pcm_hdr(code, id), snd::S_BAD_MSG, &what);
        }
        let what = format!("JACK_REMAP of jack {id}");
        expect_status(&mut g.fe, &snd::jack_remap(id, 0, 0), snd::S_BAD_MSG, &what);
        let what = format!("PCM_INFO starting at stream {id}");
        let resp =
            g.fe.control(&snd::query_info(snd::R_PCM_INFO, id, 1, 32), 36)
                .unwrap();
        assert_eq!(resp, snd::S_BAD_MSG.to_le_bytes(), "{what}");
    }
    // None of them touched a real stream (no id was wrapped onto 0 or 1).
    for id in [OUT, IN] {
        expect_status(
            &mut g.fe,
            &snd::pcm_hdr(snd::R_PCM_PREPARE, id),
            snd::S_BAD_MSG,
            &format!("PREPARE of stream {id}, which was never given parameters"),
        );
    }
    g.alive("after requests for missing streams");
}

#[test]
fn transfers_for_wrong_or_missing_streams() {
    let mut g = Guest::start("hostile-xfer-ids", FrontendOptions::default());
    let cfg = PcmConfig::s16_stereo_48k(10);
    let period = pcm_pattern(5, cfg.period_bytes as usize);

    // Streams not prepared yet.
    let h = add_tx(&mut g.fe, OUT, &period);
    g.fe.kick(Q_TX).unwrap();
    let u = wait_used(&mut g.fe, Q_TX, PROMPT, "TX before PREPARE");
    assert_eq!(u.id, u32::from(h));
    assert_tx_status(&u, snd::S_BAD_MSG, "TX on a stream without parameters");
    let rx = add_rx_tracked(&mut g.fe, IN, 192);
    g.fe.kick(Q_RX).unwrap();
    let u = wait_used(&mut g.fe, Q_RX, PROMPT, "RX before PREPARE");
    assert_eq!(
        (u.id, u.len),
        (u32::from(rx.head), 8),
        "RX before PREPARE: status only"
    );
    assert_eq!(
        rx.status(&g.fe).status,
        snd::S_BAD_MSG,
        "RX on a stream without parameters"
    );

    setup_stream(&mut g.fe, OUT, &cfg);
    setup_stream(&mut g.fe, IN, &cfg);
    fixture::start(&mut g.fe, OUT);
    fixture::start(&mut g.fe, IN);

    // TX naming the input stream or no stream; RX naming the output stream
    // or no stream: refused at once, nothing played or captured.
    for id in std::iter::once(IN).chain(BAD_STREAMS) {
        let what = format!("TX naming stream {id}");
        add_tx(&mut g.fe, id, &period);
        g.fe.kick(Q_TX).unwrap();
        let u = wait_used(&mut g.fe, Q_TX, PROMPT, &what);
        assert_tx_status(&u, snd::S_BAD_MSG, &what);
    }
    for id in std::iter::once(OUT).chain(BAD_STREAMS) {
        let what = format!("RX naming stream {id}");
        let rx = add_rx_tracked(&mut g.fe, id, 192);
        g.fe.kick(Q_RX).unwrap();
        let u = wait_used(&mut g.fe, Q_RX, PROMPT, &what);
        assert_eq!(
            u.len, 8,
            "{what}: expected used.len 8 (status only), got {}",
            u.len
        );
        let st = rx.status(&g.fe).status;
        assert_eq!(
            st,
            snd::S_BAD_MSG,
            "{what}: expected S_BAD_MSG, got {st:#x}"
        );
        let data = g.fe.read_mem(rx.data_gpa, 192).unwrap();
        assert!(
            data.iter().all(|&b| b == POISON),
            "{what}: the refused buffer was written to"
        );
    }
    g.alive("after transfers for wrong streams");

    // The streams still work, and only the valid period was played.
    add_tx(&mut g.fe, OUT, &period);
    g.fe.kick(Q_TX).unwrap();
    let u = wait_used(&mut g.fe, Q_TX, PROMPT, "valid TX after refused ones");
    assert_tx_status(&u, snd::S_OK, "valid TX after refused ones");
    add_rx(&mut g.fe, IN, cfg.period_bytes);
    g.fe.kick(Q_RX).unwrap();
    let u = wait_used(&mut g.fe, Q_RX, PROMPT, "valid RX after refused ones");
    assert_eq!(u.len, cfg.period_bytes + 8, "valid RX used.len");
    let (data, st) = PcmStatus::split_rx(&u.writable_bytes).unwrap();
    assert_eq!(st.status, snd::S_OK, "valid RX status");
    assert_same_bytes(
        "valid RX data",
        data,
        &looped(g.broker.capture_bytes(), data.len()),
    );
    assert_same_bytes(
        "played.raw after refused TX buffers",
        &g.broker.wait_played(period.len(), PROMPT),
        &period,
    );

    // Released streams refuse transfers again.
    for id in [OUT, IN] {
        fixture::stop(&mut g.fe, id);
        fixture::release(&mut g.fe, id);
    }
    add_tx(&mut g.fe, OUT, &period);
    g.fe.kick(Q_TX).unwrap();
    let u = wait_used(&mut g.fe, Q_TX, PROMPT, "TX after RELEASE");
    assert_tx_status(&u, snd::S_BAD_MSG, "TX on a released stream");
    let rx = add_rx_tracked(&mut g.fe, IN, 192);
    g.fe.kick(Q_RX).unwrap();
    let u = wait_used(&mut g.fe, Q_RX, PROMPT, "RX after RELEASE");
    assert_eq!(u.len, 8, "RX on a released stream: used.len");
    assert_eq!(
        rx.status(&g.fe).status,
        snd::S_BAD_MSG,
        "RX on a released stream"
    );
    g.alive("after transfers on released streams");
}

// ---------------------------------------------------------------------------
// Short requests, small responses
// ---------------------------------------------------------------------------

#[test]
fn requests_shorter_than_their_header() {
    let mut g = Guest::start("hostile-short", FrontendOptions::default());
    let cfg = PcmConfig::s16_stereo_48k(10);

    // Control: no readable bytes at all, then 1..3 bytes of a header.
    let w = g.poisoned(64);
    g.expect_control(
        &[RawDesc::writable(w, 64)],
        snd::S_BAD_MSG,
        "control chain without a request",
    );
    for n in 1..4 {
        let req = snd::R_PCM_INFO.to_le_bytes();
        let d = g.control_descs(&req[..n]);
        g.expect_control(&d, snd::S_BAD_MSG, &format!("control request of {n} bytes"));
    }
    // Each request cut short anywhere after its code.
    let full: Vec<(Vec<u8>, &str)> = vec![
        (snd::query_info(snd::R_PCM_INFO, 0, 1, 32), "PCM_INFO"),
        (snd::query_info(snd::R_JACK_INFO, 0, 1, 24), "JACK_INFO"),
        (snd::query_info(snd::R_CHMAP_INFO, 0, 1, 24), "CHMAP_INFO"),
        (snd::jack_remap(0, 0, 0), "JACK_REMAP"),
        (cfg.set_params_request(OUT), "SET_PARAMS"),
        (snd::pcm_hdr(snd::R_PCM_PREPARE, OUT), "PREPARE"),
        (snd::pcm_hdr(snd::R_PCM_START, OUT), "START"),
        (snd::pcm_hdr(snd::R_PCM_STOP, OUT), "STOP"),
        (snd::pcm_hdr(snd::R_PCM_RELEASE, OUT), "RELEASE"),
    ];
    for (req, name) in &full {
        for n in 4..req.len() {
            let resp = g.fe.control(&req[..n], 64).unwrap();
            assert_eq!(
                resp,
                snd::S_BAD_MSG.to_le_bytes(),
                "{name} cut to {n} of its {} bytes: expected S_BAD_MSG",
                req.len()
            );
        }
    }
    // The truncated SET_PARAMS did not set anything.
    expect_status(
        &mut g.fe,
        &snd::pcm_hdr(snd::R_PCM_PREPARE, OUT),
        snd::S_BAD_MSG,
        "PREPARE after only truncated SET_PARAMS requests",
    );
    g.alive("after truncated control requests");

    // Transfers without a whole xfer header, on running streams.
    setup_stream(&mut g.fe, OUT, &cfg);
    setup_stream(&mut g.fe, IN, &cfg);
    fixture::start(&mut g.fe, OUT);
    fixture::start(&mut g.fe, IN);
    for n in 0..4usize {
        let hdr = snd::pcm_xfer(OUT);
        let s = g.poisoned(8);
        let mut d = Vec::new();
        if n > 0 {
            let h = g.bytes(&hdr[..n]);
            d.push(RawDesc::readable(h, n as u32).then(1));
        }
        d.push(RawDesc::writable(s, 8));
        let what = format!("TX with a {n}-byte header");
        let u = g
            .raw(Q_TX, &d, PROMPT, &what)
            .unwrap_or_else(|| panic!("{what}: not returned"));
        assert_tx_status(&u, snd::S_BAD_MSG, &what);

        let hdr = snd::pcm_xfer(IN);
        let data = g.poisoned(64);
        let s = g.poisoned(8);
        let mut d = Vec::new();
        if n > 0 {
            let h = g.bytes(&hdr[..n]);
            d.push(RawDesc::readable(h, n as u32).then(1));
        }
        let k = d.len() as u16;
        d.push(RawDesc::writable(data, 64).then(k + 1));
        d.push(RawDesc::writable(s, 8));
        let what = format!("RX with a {n}-byte header");
        let u = g
            .raw(Q_RX, &d, PROMPT, &what)
            .unwrap_or_else(|| panic!("{what}: not returned"));
        assert_eq!(
            u.len, 8,
            "{what}: expected used.len 8 (status only), got {}",
            u.len
        );
        let st = PcmStatus::parse(&g.fe.read_mem(s, 8).unwrap()).unwrap();
        assert_eq!(st.status, snd::S_BAD_MSG, "{what}: status {:#x}", st.status);
    }
    assert_eq!(
        g.broker.played().len(),
        0,
        "bytes of header-less TX buffers were played"
    );
    g.alive("after header-less transfers");
}

#[test]
fn response_buffers_too_small() {
    let mut g = Guest::start("hostile-small-resp", FrontendOptions::default());
    let cfg = PcmConfig::s16_stereo_48k(10);

    // Control: fewer than 4 writable bytes (none at all, 1, 2, 3).
    for n in 0..4u32 {
        let req = g.pcm_info_request();
        let r = g.bytes(&req);
        let w = g.poisoned(4);
        let mut d = vec![RawDesc::readable(r, 16)];
        if n > 0 {
            d[0] = d[0].then(1);
            d.push(RawDesc::writable(w, n));
        }
        g.expect_len0(
            Q_CTL,
            &d,
            &format!("PCM_INFO with a {n}-byte response buffer"),
        );
        assert_eq!(
            g.fe.read_mem(w, 4).unwrap(),
            [POISON; 4],
            "a {n}-byte response buffer was written"
        );
    }
    // A command that cannot be answered is not carried out either.
    fixture::set_params(&mut g.fe, OUT, &cfg);
    let r = g.bytes(&snd::pcm_hdr(snd::R_PCM_PREPARE, OUT));
    let w = g.poisoned(3);
    g.expect_len0(
        Q_CTL,
        &[RawDesc::readable(r, 8).then(1), RawDesc::writable(w, 3)],
        "PREPARE with a 3-byte response buffer",
    );
    expect_status(
        &mut g.fe,
        &snd::pcm_hdr(snd::R_PCM_START, OUT),
        snd::S_BAD_MSG,
        "START after a PREPARE that could not be answered (the stream must not be prepared)",
    );

    // Transfers: fewer than 8 writable bytes for the status.
    fixture::prepare(&mut g.fe, OUT);
    setup_stream(&mut g.fe, IN, &cfg);
    fixture::start(&mut g.fe, OUT);
    fixture::start(&mut g.fe, IN);
    let period = pcm_pattern(9, cfg.period_bytes as usize);
    for n in 0..8u32 {
        let d = g.tx_descs(OUT, &period, n);
        g.expect_len0(Q_TX, &d, &format!("TX with a {n}-byte status buffer"));

        let h = g.bytes(&snd::pcm_xfer(IN));
        let w = g.poisoned(8);
        let mut d = vec![RawDesc::readable(h, 4)];
        if n > 0 {
            d[0] = d[0].then(1);
            d.push(RawDesc::writable(w, n));
        }
        g.expect_len0(Q_RX, &d, &format!("RX with only {n} writable bytes"));
        assert_eq!(
            g.fe.read_mem(w, 8).unwrap(),
            [POISON; 8],
            "RX with {n} writable bytes was written"
        );
    }
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        g.broker.played().len(),
        0,
        "TX buffers without room for a status were played"
    );
    // A valid transfer still plays.
    add_tx(&mut g.fe, OUT, &period);
    g.fe.kick(Q_TX).unwrap();
    let u = wait_used(&mut g.fe, Q_TX, PROMPT, "valid TX");
    assert_tx_status(&u, snd::S_OK, "valid TX after short ones");
    assert_same_bytes(
        "played.raw",
        &g.broker.wait_played(period.len(), PROMPT),
        &period,
    );
    g.alive("after short response buffers");
}

// ---------------------------------------------------------------------------
// Descriptors
// ---------------------------------------------------------------------------

#[test]
fn descriptors_outside_guest_memory() {
    let mut g = Guest::start("hostile-oob", FrontendOptions::default());
    let cfg = PcmConfig::s16_stereo_48k(10);
    let end = g.fe.mem_size();
    // Places for a buffer of `len` bytes that are not wholly inside guest
    // memory.
    let outside = |len: u64| -> [(u64, &'static str); 4] {
        [
            (end, "just past the end of memory"),
            (end - len / 2, "straddling the end of memory"),
            (1 << 48, "far beyond the end of memory"),
            (u64::MAX - len / 2, "wrapping around the address space"),
        ]
    };
    for (addr, where_) in outside(16) {
        let w = g.poisoned(64);
        g.expect_control(
            &[
                RawDesc::readable(addr, 16).then(1),
                RawDesc::writable(w, 64),
            ],
            snd::S_BAD_MSG,
            &format!("control request {where_}"),
        );
    }
    for (addr, where_) in outside(64) {
        let req = g.pcm_info_request();
        let r = g.bytes(&req);
        g.expect_len0(
            Q_CTL,
            &[
                RawDesc::readable(r, 16).then(1),
                RawDesc::writable(addr, 64),
            ],
            &format!("control response buffer {where_}"),
        );
    }

    setup_stream(&mut g.fe, OUT, &cfg);
    setup_stream(&mut g.fe, IN, &cfg);
    fixture::start(&mut g.fe, OUT);
    fixture::start(&mut g.fe, IN);
    let payload = pcm_pattern(3, 192);
    for (addr, where_) in outside(4) {
        let p = g.bytes(&payload);
        let s = g.poisoned(8);
        let what = format!("TX header {where_}");
        let u = g
            .raw(
                Q_TX,
                &[
                    RawDesc::readable(addr, 4).then(1),
                    RawDesc::readable(p, 192).then(2),
                    RawDesc::writable(s, 8),
                ],
                PROMPT,
                &what,
            )
            .unwrap_or_else(|| panic!("{what}: not returned"));
        assert_tx_status(&u, snd::S_BAD_MSG, &what);
    }
    let mut payloads: Vec<(u64, u32, String)> = outside(192)
        .into_iter()
        .map(|(a, w)| (a, 192, w.to_string()))
        .collect();
    payloads.push((
        0,
        64 << 20,
        "of 64 MiB, larger than guest memory".to_string(),
    ));
    for (addr, len, where_) in payloads {
        let h = g.bytes(&snd::pcm_xfer(OUT));
        let s = g.poisoned(8);
        let what = format!("TX payload {where_}");
        let u = g
            .raw(
                Q_TX,
                &[
                    RawDesc::readable(h, 4).then(1),
                    RawDesc::readable(addr, len).then(2),
                    RawDesc::writable(s, 8),
                ],
                PROMPT,
                &what,
            )
            .unwrap_or_else(|| panic!("{what}: not returned"));
        assert_tx_status(&u, snd::S_BAD_MSG, &what);
    }
    // A chain longer than 4 GiB in total is illegal (§2.7.5.2) and cannot be
    // answered, even though each descriptor alone looks fine.
    let h = g.bytes(&snd::pcm_xfer(OUT));
    let s8 = g.poisoned(8);
    g.expect_len0(
        Q_TX,
        &[
            RawDesc::readable(h, 4).then(1),
            RawDesc::readable(0, u32::MAX).then(2),
            RawDesc::writable(s8, 8),
        ],
        "TX chain of more than 4 GiB",
    );
    for (addr, where_) in outside(8) {
        // An empty TX whose status cannot be written: it cannot be answered.
        let h = g.bytes(&snd::pcm_xfer(OUT));
        g.expect_len0(
            Q_TX,
            &[RawDesc::readable(h, 4).then(1), RawDesc::writable(addr, 8)],
            &format!("TX status buffer {where_}"),
        );
        // RX data inside memory, status outside.
        let h = g.bytes(&snd::pcm_xfer(IN));
        let d = g.poisoned(192);
        g.expect_len0(
            Q_RX,
            &[
                RawDesc::readable(h, 4).then(1),
                RawDesc::writable(d, 192).then(2),
                RawDesc::writable(addr, 8),
            ],
            &format!("RX status {where_}"),
        );
        g.fe.reset_alloc();
    }
    for (addr, where_) in outside(200) {
        // RX data and status outside memory.
        let h = g.bytes(&snd::pcm_xfer(IN));
        g.expect_len0(
            Q_RX,
            &[
                RawDesc::readable(h, 4).then(1),
                RawDesc::writable(addr, 200),
            ],
            &format!("RX buffer {where_}"),
        );
    }
    // Nothing was played: every TX above was refused or empty.
    assert_eq!(
        g.broker.played().len(),
        0,
        "bytes were played from refused TX buffers"
    );
    g.alive("after descriptors outside guest memory");
}

#[test]
fn zero_length_descriptors_and_arbitrary_framing() {
    let mut g = Guest::start("hostile-framing", FrontendOptions::default());
    let cfg = PcmConfig::s16_stereo_48k(10);
    let want = g.pcm_info_answer();

    // Only zero-length buffers.
    let req = g.pcm_info_request();
    let r = g.bytes(&req);
    let w = g.poisoned(64);
    g.expect_control(
        &[RawDesc::readable(r, 0).then(1), RawDesc::writable(w, 64)],
        snd::S_BAD_MSG,
        "control request of zero length",
    );
    g.expect_len0(
        Q_CTL,
        &[RawDesc::readable(r, 16).then(1), RawDesc::writable(w, 0)],
        "control response buffer of zero length",
    );
    g.expect_len0(
        Q_CTL,
        &[RawDesc::writable(w, 0)],
        "control chain of one zero-length writable descriptor",
    );

    // The device must not assume any arrangement of descriptors (§2.6.4):
    // a request in 1-byte pieces, zero-length pieces between them, and the
    // response spread over 4-byte pieces, is answered as usual.
    let req = g.pcm_info_request();
    let mut d = Vec::new();
    for (i, b) in req.iter().enumerate() {
        let a = g.bytes(&[*b]);
        d.push(RawDesc::readable(a, 1));
        if i % 5 == 0 {
            d.push(RawDesc::readable(a, 0));
        }
    }
    let mut pieces = Vec::new();
    for _ in 0..9 {
        let a = g.poisoned(4);
        pieces.push(a);
        d.push(RawDesc::writable(a, 4));
    }
    d.push(RawDesc::writable(pieces[0], 0));
    let n = d.len();
    for (i, desc) in d.iter_mut().enumerate().take(n - 1) {
        *desc = desc.then((i + 1) as u16);
    }
    let u = g
        .raw(Q_CTL, &d, PROMPT, "PCM_INFO in pieces")
        .expect("PCM_INFO in pieces was not answered");
    assert_eq!(u.len, 36, "PCM_INFO in pieces: used.len");
    let got: Vec<u8> = pieces
        .iter()
        .flat_map(|&a| g.fe.read_mem(a, 4).unwrap())
        .collect();
    assert_same_bytes("PCM_INFO answer written in 4-byte pieces", &got, &want);
    g.alive("after a request in pieces");

    // TX and RX in pieces.
    setup_stream(&mut g.fe, OUT, &cfg);
    setup_stream(&mut g.fe, IN, &cfg);
    fixture::start(&mut g.fe, OUT);
    fixture::start(&mut g.fe, IN);
    let period = pcm_pattern(11, cfg.period_bytes as usize);
    let hdr = snd::pcm_xfer(OUT);
    let a = g.bytes(&hdr[..1]);
    let b = g.bytes(&hdr[1..]);
    let (p1, p2) = period.split_at(1000);
    let (p2, p3) = p2.split_at(7);
    let (x1, x2, x3) = (g.bytes(p1), g.bytes(p2), g.bytes(p3));
    let (s1, s2) = (g.poisoned(4), g.poisoned(4));
    let d = [
        RawDesc::readable(a, 1).then(1),
        RawDesc::readable(a, 0).then(2),
        RawDesc::readable(b, 3).then(3),
        RawDesc::readable(x1, p1.len() as u32).then(4),
        RawDesc::readable(x2, p2.len() as u32).then(5),
        RawDesc::readable(x2, 0).then(6),
        RawDesc::readable(x3, p3.len() as u32).then(7),
        RawDesc::writable(s1, 4).then(8),
        RawDesc::writable(s1, 0).then(9),
        RawDesc::writable(s2, 4),
    ];
    let u = g
        .raw(Q_TX, &d, PROMPT + cfg.period() * 2, "TX in pieces")
        .expect("TX in pieces was not returned");
    assert_eq!(u.len, 8, "TX in pieces: used.len");
    let mut st = g.fe.read_mem(s1, 4).unwrap();
    st.extend(g.fe.read_mem(s2, 4).unwrap());
    assert_eq!(
        PcmStatus::parse(&st).unwrap().status,
        snd::S_OK,
        "TX in pieces: status"
    );
    assert_same_bytes(
        "played.raw of a TX in pieces",
        &g.broker.wait_played(period.len(), PROMPT),
        &period,
    );

    let h = g.bytes(&snd::pcm_xfer(IN));
    let (d1, d2, d3) = (g.poisoned(1000), g.poisoned(7), g.poisoned(913));
    let (s1, s2) = (g.poisoned(3), g.poisoned(5));
    let d = [
        RawDesc::readable(h, 4).then(1),
        RawDesc::writable(d1, 1000).then(2),
        RawDesc::writable(d2, 7).then(3),
        RawDesc::writable(d2, 0).then(4),
        RawDesc::writable(d3, 913).then(5),
        RawDesc::writable(s1, 3).then(6),
        RawDesc::writable(s2, 5),
    ];
    let u = g
        .raw(Q_RX, &d, PROMPT + cfg.period() * 2, "RX in pieces")
        .expect("RX in pieces was not returned");
    assert_eq!(u.len, 1920 + 8, "RX in pieces: used.len");
    let mut data = g.fe.read_mem(d1, 1000).unwrap();
    data.extend(g.fe.read_mem(d2, 7).unwrap());
    data.extend(g.fe.read_mem(d3, 913).unwrap());
    assert_same_bytes(
        "RX in pieces: data",
        &data,
        &looped(g.broker.capture_bytes(), 1920),
    );
    let mut st = g.fe.read_mem(s1, 3).unwrap();
    st.extend(g.fe.read_mem(s2, 5).unwrap());
    assert_eq!(
        PcmStatus::parse(&st).unwrap().status,
        snd::S_OK,
        "RX in pieces: status"
    );
    g.alive("after transfers in pieces");
}

#[test]
fn looping_and_overlong_chains() {
    let mut g = Guest::start(
        "hostile-loops",
        FrontendOptions {
            indirect_desc: true,
            ..FrontendOptions::default()
        },
    );
    let cfg = PcmConfig::s16_stereo_48k(10);
    let size = DEFAULT_QUEUE_SIZE;

    // A chain that loops back to its head, to its middle, or to itself.
    let req = g.pcm_info_request();
    let r = g.bytes(&req);
    let w = g.poisoned(64);
    for (descs, what) in [
        (
            vec![
                RawDesc::readable(r, 16).then(1),
                RawDesc::writable(w, 64).then(0),
            ],
            "control chain looping back to its head",
        ),
        (
            vec![
                RawDesc::readable(r, 16).then(1),
                RawDesc::writable(w, 32).then(2),
                RawDesc::writable(w, 32).then(1),
            ],
            "control chain looping in its writable part",
        ),
        (
            vec![RawDesc::readable(r, 16).then(0)],
            "control descriptor that is its own next",
        ),
    ] {
        g.expect_len0(Q_CTL, &descs, what);
    }
    // `next` outside the descriptor table.
    for next in [size, size + 1, 1000, u16::MAX] {
        g.expect_len0(
            Q_CTL,
            &[
                RawDesc::readable(r, 16).then(1),
                RawDesc::writable(w, 64).then(next),
            ],
            &format!("control chain whose last next is {next} (the table has {size})"),
        );
    }

    // A looping START must not start the stream.
    setup_stream(&mut g.fe, OUT, &cfg);
    let start = g.bytes(&snd::pcm_hdr(snd::R_PCM_START, OUT));
    g.expect_len0(
        Q_CTL,
        &[
            RawDesc::readable(start, 8).then(1),
            RawDesc::writable(w, 64).then(0),
        ],
        "START in a looping chain",
    );
    expect_status(
        &mut g.fe,
        &snd::pcm_hdr(snd::R_PCM_STOP, OUT),
        snd::S_BAD_MSG,
        "STOP after a looping START (the stream must not be running)",
    );
    fixture::start(&mut g.fe, OUT);

    // A looping TX chain is not played.
    let mut d = g.tx_descs(OUT, &pcm_pattern(1, 192), 8);
    *d.last_mut().unwrap() = d.last().unwrap().then(0);
    g.expect_len0(Q_TX, &d, "TX chain looping back to its head");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(
        g.broker.played().len(),
        0,
        "bytes of a looping TX chain were played"
    );

    // As long as the queue: fine. 16 one-byte pieces, zero-length fillers,
    // one response buffer.
    let mut d: Vec<RawDesc> = req
        .iter()
        .map(|b| {
            let a = g.bytes(&[*b]);
            RawDesc::readable(a, 1)
        })
        .collect();
    while d.len() < usize::from(size) - 1 {
        d.push(RawDesc::readable(r, 0));
    }
    d.push(RawDesc::writable(w, 64));
    for i in 0..d.len() - 1 {
        d[i] = d[i].then((i + 1) as u16);
    }
    let u = g
        .raw(Q_CTL, &d, PROMPT, "control chain as long as the queue")
        .expect("a chain as long as the queue was not answered");
    assert_eq!(
        (snd::status(&u.writable_bytes), u.len),
        (Ok(snd::S_OK), 36),
        "a chain of exactly the queue size ({size} descriptors) is valid and must be answered"
    );

    // Longer than the queue, through an indirect table of 2000 entries.
    let mut table: Vec<RawDesc> = req
        .iter()
        .map(|b| {
            let a = g.bytes(&[*b]);
            RawDesc::readable(a, 1)
        })
        .collect();
    while table.len() < 1999 {
        table.push(RawDesc::readable(r, 0));
    }
    table.push(RawDesc::writable(w, 64));
    for i in 0..table.len() - 1 {
        table[i] = table[i].then((i + 1) as u16);
    }
    let t = g.fe.write_indirect_table(&table).unwrap();
    g.expect_len0(
        Q_CTL,
        &[RawDesc {
            addr: t,
            len: (table.len() as u64 * DESC_SIZE) as u32,
            flags: VIRTQ_DESC_F_INDIRECT,
            next: 0,
        }],
        "an indirect chain of 2000 descriptors",
    );
    // An indirect table that loops.
    let t =
        g.fe.write_indirect_table(&[
            RawDesc::readable(r, 16).then(1),
            RawDesc::writable(w, 64).then(0),
        ])
        .unwrap();
    g.expect_len0(
        Q_CTL,
        &[RawDesc {
            addr: t,
            len: 32,
            flags: VIRTQ_DESC_F_INDIRECT,
            next: 0,
        }],
        "an indirect table that loops",
    );
    g.alive("after looping and overlong chains");
}

#[test]
fn bad_indirect_tables() {
    let mut g = Guest::start(
        "hostile-indirect",
        FrontendOptions {
            indirect_desc: true,
            ..FrontendOptions::default()
        },
    );
    let end = g.fe.mem_size();
    let req = g.pcm_info_request();
    let r = g.bytes(&req);
    let w = g.poisoned(64);
    let good = [RawDesc::readable(r, 16).then(1), RawDesc::writable(w, 64)];
    let indirect = |addr: u64, len: u32| RawDesc {
        addr,
        len,
        flags: VIRTQ_DESC_F_INDIRECT,
        next: 0,
    };

    // A well-formed indirect table works (the baseline).
    let t = g.fe.write_indirect_table(&good).unwrap();
    let u = g
        .raw(Q_CTL, &[indirect(t, 32)], PROMPT, "valid indirect table")
        .expect("a valid indirect request was not answered");
    assert_eq!(u.len, 36, "valid indirect PCM_INFO: used.len");

    for (addr, len, what) in [
        (end, 32, "an indirect table just past the end of memory"),
        (
            end - 16,
            32,
            "an indirect table straddling the end of memory",
        ),
        (
            u64::MAX - 15,
            32,
            "an indirect table at the top of the address space",
        ),
        (t, 0, "an indirect table of length 0"),
        (t, 8, "an indirect table of 8 bytes"),
        (
            t,
            24,
            "an indirect table whose length is not a multiple of 16",
        ),
        (t, 33, "an indirect table of 33 bytes"),
    ] {
        g.expect_len0(Q_CTL, &[indirect(addr, len)], what);
    }

    // Indirect inside indirect, first or after a descriptor.
    let inner = g.fe.write_indirect_table(&good).unwrap();
    let t = g.fe.write_indirect_table(&[indirect(inner, 32)]).unwrap();
    g.expect_len0(
        Q_CTL,
        &[indirect(t, 16)],
        "an indirect table whose entry is indirect",
    );
    let t =
        g.fe.write_indirect_table(&[RawDesc::readable(r, 16).then(1), indirect(inner, 32)])
            .unwrap();
    g.expect_len0(
        Q_CTL,
        &[indirect(t, 32)],
        "an indirect table ending in an indirect entry",
    );
    // An entry whose next points outside the table.
    let t =
        g.fe.write_indirect_table(&[
            RawDesc::readable(r, 16).then(1),
            RawDesc::writable(w, 64).then(2),
        ])
        .unwrap();
    g.expect_len0(
        Q_CTL,
        &[indirect(t, 32)],
        "an indirect table whose last next is outside it",
    );
    let t =
        g.fe.write_indirect_table(&[RawDesc::readable(r, 16).then(7), RawDesc::writable(w, 64)])
            .unwrap();
    g.expect_len0(
        Q_CTL,
        &[indirect(t, 32)],
        "an indirect table whose first next is outside it",
    );
    // Entries pointing outside memory.
    let t =
        g.fe.write_indirect_table(&[RawDesc::readable(end, 16).then(1), RawDesc::writable(w, 64)])
            .unwrap();
    let what = "an indirect request outside memory";
    g.fe.write_mem(w, &[POISON; 64]).unwrap();
    let u = g
        .raw(Q_CTL, &[indirect(t, 32)], PROMPT, what)
        .unwrap_or_else(|| panic!("{what}: not answered"));
    // (The frontend does not gather writable bytes through indirect tables:
    // read the response buffer itself.)
    let st = snd::status(&g.fe.read_mem(w, 4).unwrap()).unwrap();
    assert_eq!(
        (st, u.len),
        (snd::S_BAD_MSG, 4),
        "{what}: expected S_BAD_MSG with used.len 4, got {st:#x} with used.len {}",
        u.len
    );
    g.alive(what);
    let t =
        g.fe.write_indirect_table(&[RawDesc::readable(r, 16).then(1), RawDesc::writable(end, 64)])
            .unwrap();
    g.expect_len0(
        Q_CTL,
        &[indirect(t, 32)],
        "an indirect response buffer outside memory",
    );
    g.alive("after bad indirect tables");
}

#[test]
fn heads_outside_the_queue_are_ignored() {
    let mut g = Guest::start("hostile-heads", FrontendOptions::default());
    let size = DEFAULT_QUEUE_SIZE;
    for q in [Q_CTL, Q_EVT, Q_TX, Q_RX] {
        for head in [size, size + 1, 1000, u16::MAX] {
            g.fe.publish(q, head).unwrap();
        }
        g.fe.kick(q).unwrap();
        expect_nothing_used(
            &mut g.fe,
            q,
            QUIET,
            &format!(
                "queue {q} after publishing heads {size}, {}, 1000, {}",
                size + 1,
                u16::MAX
            ),
        );
        g.alive(&format!("after out-of-range heads on queue {q}"));
    }
    // Every queue still carries valid buffers.
    let cfg = PcmConfig::s16_stereo_48k(10);
    setup_stream(&mut g.fe, OUT, &cfg);
    setup_stream(&mut g.fe, IN, &cfg);
    fixture::start(&mut g.fe, OUT);
    fixture::start(&mut g.fe, IN);
    let period = pcm_pattern(4, cfg.period_bytes as usize);
    add_tx(&mut g.fe, OUT, &period);
    g.fe.kick(Q_TX).unwrap();
    let u = wait_used(&mut g.fe, Q_TX, PROMPT, "TX after bad heads");
    assert_tx_status(&u, snd::S_OK, "TX after bad heads");
    add_rx(&mut g.fe, IN, cfg.period_bytes);
    g.fe.kick(Q_RX).unwrap();
    let u = wait_used(&mut g.fe, Q_RX, PROMPT, "RX after bad heads");
    assert_eq!(u.len, cfg.period_bytes + 8, "RX after bad heads: used.len");
    assert_same_bytes(
        "played.raw",
        &g.broker.wait_played(period.len(), PROMPT),
        &period,
    );
    g.alive("after bad heads");
}

// ---------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------

#[test]
fn unknown_request_codes() {
    let mut g = Guest::start("hostile-codes", FrontendOptions::default());
    let codes = [
        0,
        3,
        0xff,
        0x0106,
        0x01ff,
        0x0201,
        // Control elements (virtio 1.3) without VIRTIO_SND_F_CTLS offered.
        snd::R_CTL_INFO,
        snd::R_CTL_ENUM_ITEMS,
        snd::R_CTL_READ,
        snd::R_CTL_WRITE,
        snd::R_CTL_TLV_READ,
        snd::R_CTL_TLV_WRITE,
        snd::R_CTL_TLV_COMMAND,
        // Event and status codes are not requests.
        snd::EVT_JACK_CONNECTED,
        snd::EVT_PCM_XRUN,
        snd::S_OK,
        snd::S_BAD_MSG,
        0x7fff_ffff,
        u32::MAX,
    ];
    for code in codes {
        expect_status(
            &mut g.fe,
            &snd::hdr(code),
            snd::S_NOT_SUPP,
            &format!("request code {code:#x} alone"),
        );
        let mut req = snd::hdr(code);
        req.extend_from_slice(&[0u8; 28]);
        expect_status(
            &mut g.fe,
            &req,
            snd::S_NOT_SUPP,
            &format!("request code {code:#x} with a body"),
        );
    }
    g.alive("after unknown request codes");
}

/// The PCM stream states of virtio 1.2 §5.14.6.6.1, modelled here
/// independently of `vsnd_ipc::lifecycle`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Initial,
    ParamsSet,
    Prepared,
    Running,
    Stopped,
    Released,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    SetParams,
    Prepare,
    Start,
    Stop,
    Release,
}

const STATES: [St; 6] = [
    St::Initial,
    St::ParamsSet,
    St::Prepared,
    St::Running,
    St::Stopped,
    St::Released,
];
const CMDS: [Cmd; 5] = [
    Cmd::SetParams,
    Cmd::Prepare,
    Cmd::Start,
    Cmd::Stop,
    Cmd::Release,
];

/// The spec's table: SET_PARAMS from initial/ParamsSet/Prepared/Released,
/// PREPARE from ParamsSet/Prepared/Released, START from Prepared/Stopped,
/// STOP from Running, RELEASE from Prepared/Stopped.
fn next(s: St, c: Cmd) -> Option<St> {
    use Cmd as C;
    use St as S;
    match (s, c) {
        (S::Initial | S::ParamsSet | S::Prepared | S::Released, C::SetParams) => Some(S::ParamsSet),
        (S::ParamsSet | S::Prepared | S::Released, C::Prepare) => Some(S::Prepared),
        (S::Prepared | S::Stopped, C::Start) => Some(S::Running),
        (S::Running, C::Stop) => Some(S::Stopped),
        (S::Prepared | S::Stopped, C::Release) => Some(S::Released),
        _ => None,
    }
}

/// Where `c` leads when it is allowed.
fn target(c: Cmd) -> St {
    match c {
        Cmd::SetParams => St::ParamsSet,
        Cmd::Prepare => St::Prepared,
        Cmd::Start => St::Running,
        Cmd::Stop => St::Stopped,
        Cmd::Release => St::Released,
    }
}

/// Shortest sequence of allowed commands from `from` to `to`.
fn path(from: St, to: St) -> Vec<Cmd> {
    let mut frontier = vec![(from, Vec::new())];
    let mut seen = vec![from];
    while !frontier.is_empty() {
        let mut next_frontier = Vec::new();
        for (s, p) in frontier {
            if s == to {
                return p;
            }
            for c in CMDS {
                if let Some(n) = next(s, c) {
                    if !seen.contains(&n) {
                        seen.push(n);
                        let mut p2 = p.clone();
                        p2.push(c);
                        next_frontier.push((n, p2));
                    }
                }
            }
        }
        frontier = next_frontier;
    }
    panic!("state {to:?} cannot be reached from {from:?}");
}

fn send_cmd(fe: &mut Frontend, stream: u32, c: Cmd, cfg: &PcmConfig) -> u32 {
    let req = match c {
        Cmd::SetParams => cfg.set_params_request(stream),
        Cmd::Prepare => snd::pcm_hdr(snd::R_PCM_PREPARE, stream),
        Cmd::Start => snd::pcm_hdr(snd::R_PCM_START, stream),
        Cmd::Stop => snd::pcm_hdr(snd::R_PCM_STOP, stream),
        Cmd::Release => snd::pcm_hdr(snd::R_PCM_RELEASE, stream),
    };
    fixture::control_status(fe, &req, 4, &format!("{c:?} on stream {stream}"))
}

/// Run `c` expecting `want`; returns the model state afterwards.
fn step(fe: &mut Frontend, stream: u32, s: St, c: Cmd, cfg: &PcmConfig, why: &str) -> St {
    let got = send_cmd(fe, stream, c, cfg);
    let (want, after) = match next(s, c) {
        Some(n) => (snd::S_OK, n),
        None => (snd::S_BAD_MSG, s),
    };
    assert_eq!(
        got,
        want,
        "stream {stream} in state {s:?}: {c:?} ({why}) should be answered {}, got {} ({got:#x})",
        snd::status_name(want),
        snd::status_name(got)
    );
    after
}

#[test]
fn every_invalid_state_transition() {
    let mut g = Guest::start("hostile-states", FrontendOptions::default());
    let cfg = PcmConfig::s16_stereo_48k(10);
    let mut cases = 0;
    for stream in [OUT, IN] {
        let mut state = St::Initial;
        // Initial first (it cannot be reached again), then every other state.
        for s in STATES {
            for c in CMDS.into_iter().filter(|&c| next(s, c).is_none()) {
                for p in path(state, s) {
                    state = step(&mut g.fe, stream, state, p, &cfg, "on the way");
                }
                assert_eq!(state, s);
                // The invalid command: BAD_MSG, state unchanged.
                state = step(&mut g.fe, stream, state, c, &cfg, "an invalid transition");
                cases += 1;
                // Prove the state did not move to where `c` would lead: a
                // command whose answer differs between the two states (one
                // that is refused in `s` but allowed there is preferred,
                // since it leaves the state as it is).
                let t = target(c);
                let refused_here = CMDS
                    .into_iter()
                    .find(|&p| next(s, p).is_none() && next(t, p).is_some());
                let allowed_here = CMDS
                    .into_iter()
                    .find(|&p| next(s, p).is_some() && next(t, p).is_none());
                if let Some(p) = refused_here.or(allowed_here) {
                    state = step(&mut g.fe, stream, state, p, &cfg, "a probe of the state");
                }
            }
        }
        g.alive(&format!(
            "after every invalid transition of stream {stream}"
        ));
    }
    assert_eq!(cases, 2 * 18, "invalid (state, command) pairs tried");
}

#[test]
fn set_params_with_each_field_invalid() {
    let mut g = Guest::start("hostile-set-params", FrontendOptions::default());
    let ok = PcmConfig::s16_stereo_48k(10);
    let req = |stream: u32, buffer: u32, period: u32, features: u32, ch: u8, fmt: u8, rate: u8| {
        snd::pcm_set_params(stream, buffer, period, features, ch, fmt, rate)
    };
    let (b, p, ch, f, r) = (
        ok.buffer_bytes,
        ok.period_bytes,
        2u8,
        snd::PCM_FMT_S16,
        snd::PCM_RATE_48000,
    );
    let mut cases: Vec<(Vec<u8>, u32, String)> = Vec::new();
    for id in BAD_STREAMS {
        cases.push((
            req(id, b, p, 0, ch, f, r),
            snd::S_BAD_MSG,
            format!("stream id {id}"),
        ));
    }
    cases.push((
        req(0, 0, p, 0, ch, f, r),
        snd::S_BAD_MSG,
        "buffer_bytes 0".into(),
    ));
    cases.push((
        req(0, b, 0, 0, ch, f, r),
        snd::S_BAD_MSG,
        "period_bytes 0".into(),
    ));
    cases.push((
        req(0, 0, 0, 0, ch, f, r),
        snd::S_BAD_MSG,
        "both sizes 0".into(),
    ));
    cases.push((
        req(0, p, p + 4, 0, ch, f, r),
        snd::S_BAD_MSG,
        "period_bytes > buffer_bytes".into(),
    ));
    cases.push((
        req(0, b, u32::MAX, 0, ch, f, r),
        snd::S_BAD_MSG,
        "period_bytes u32::MAX".into(),
    ));
    for period in [p + 1, p + 2, p + 3, 1, 3] {
        cases.push((
            req(0, b, period, 0, ch, f, r),
            snd::S_BAD_MSG,
            format!("period_bytes {period}: not whole 4-byte frames"),
        ));
    }
    for features in [
        1,
        1 << snd::PCM_F_EVT_XRUNS,
        1 << snd::PCM_F_MSG_POLLING,
        0x8000_0000,
        u32::MAX,
    ] {
        cases.push((
            req(0, b, p, features, ch, f, r),
            snd::S_NOT_SUPP,
            format!("features {features:#x}"),
        ));
    }
    for channels in [0u8, 9, 18, 255] {
        cases.push((
            req(0, b, p, 0, channels, f, r),
            snd::S_NOT_SUPP,
            format!("{channels} channels"),
        ));
    }
    let unsupported_formats = [
        snd::PCM_FMT_IMA_ADPCM,
        snd::PCM_FMT_MU_LAW,
        snd::PCM_FMT_A_LAW,
        snd::PCM_FMT_S18_3,
        snd::PCM_FMT_U18_3,
        snd::PCM_FMT_S20_3,
        snd::PCM_FMT_U20_3,
        snd::PCM_FMT_U24_3,
        snd::PCM_FMT_S20,
        snd::PCM_FMT_U20,
        snd::PCM_FMT_U24,
        snd::PCM_FMT_DSD_U8,
        snd::PCM_FMT_DSD_U16,
        snd::PCM_FMT_DSD_U32,
        snd::PCM_FMT_IEC958_SUBFRAME,
        snd::PCM_FMT_COUNT,
        63,
        64,
        200,
        255,
    ];
    for fmt in unsupported_formats {
        cases.push((
            req(0, b, p, 0, ch, fmt, r),
            snd::S_NOT_SUPP,
            format!("format code {fmt}"),
        ));
    }
    for rate in [snd::PCM_RATE_5512, snd::PCM_RATE_384000, 14, 63, 64, 255] {
        cases.push((
            req(0, b, p, 0, ch, f, rate),
            snd::S_NOT_SUPP,
            format!("rate code {rate}"),
        ));
    }
    let big = 4 << 20;
    cases.push((
        req(0, 4 * big, big + 4, 0, ch, f, r),
        snd::S_NOT_SUPP,
        "period_bytes of 4 MiB + 4".into(),
    ));

    // The largest accepted period, for reference: exactly 4 MiB.
    fixture::set_params(
        &mut g.fe,
        OUT,
        &PcmConfig {
            period_bytes: big,
            buffer_bytes: 2 * big,
            ..ok
        },
    );
    for (request, want, what) in &cases {
        // From a prepared stream: refused, and the stream stays prepared
        // (START is allowed only from there).
        fixture::set_params(&mut g.fe, OUT, &ok);
        fixture::prepare(&mut g.fe, OUT);
        expect_status(
            &mut g.fe,
            request,
            *want,
            &format!("SET_PARAMS with {what}"),
        );
        fixture::start(&mut g.fe, OUT);
        fixture::stop(&mut g.fe, OUT);
        fixture::release(&mut g.fe, OUT);
    }
    // From the initial state (stream 1 never had parameters): refused, and
    // nothing was set (PREPARE is refused).
    for (request, want, what) in &cases {
        let mut request = request.clone();
        if request[4..8] == OUT.to_le_bytes() {
            request[4..8].copy_from_slice(&IN.to_le_bytes());
        }
        expect_status(
            &mut g.fe,
            &request,
            *want,
            &format!("SET_PARAMS of stream 1 with {what}"),
        );
        expect_status(
            &mut g.fe,
            &snd::pcm_hdr(snd::R_PCM_PREPARE, IN),
            snd::S_BAD_MSG,
            &format!("PREPARE of stream 1 after a refused SET_PARAMS ({what})"),
        );
    }
    g.alive("after invalid SET_PARAMS requests");
}

// ---------------------------------------------------------------------------
// Floods and duplicates
// ---------------------------------------------------------------------------

#[test]
fn kick_and_request_floods() {
    let mut g = Guest::start(
        "hostile-flood",
        FrontendOptions {
            event_idx: true,
            ..FrontendOptions::default()
        },
    );
    let cfg = PcmConfig::s16_stereo_48k(10);
    for q in [Q_CTL, Q_EVT, Q_TX, Q_RX] {
        g.fe.kick_storm(q, 100_000).unwrap();
        g.alive(&format!(
            "after 100 000 kicks of queue {q} with nothing queued"
        ));
    }

    // 40 rounds of 20 control requests at once (valid, unknown, truncated,
    // for a missing stream), each round kicked 100 times.
    let t0 = Instant::now();
    let mut want_info = None;
    for round in 0..40 {
        let mut heads = Vec::new();
        for i in 0..20 {
            let (req, want): (Vec<u8>, u32) = match i % 4 {
                0 => (g.pcm_info_request(), snd::S_OK),
                1 => (snd::hdr(0xdead), snd::S_NOT_SUPP),
                2 => (
                    snd::pcm_hdr(snd::R_PCM_START, 7)[..6].to_vec(),
                    snd::S_BAD_MSG,
                ),
                _ => (snd::pcm_hdr(snd::R_PCM_PREPARE, 9), snd::S_BAD_MSG),
            };
            let h = g.fe.add_chain(Q_CTL, &[&req], &[64]).unwrap();
            heads.push((h, want));
        }
        g.fe.kick_storm(Q_CTL, 100).unwrap();
        for _ in 0..heads.len() {
            let u = wait_used(&mut g.fe, Q_CTL, PROMPT, &format!("flood round {round}"));
            let &(_, want) = heads
                .iter()
                .find(|(h, _)| u32::from(*h) == u.id)
                .unwrap_or_else(|| panic!("flood round {round}: unexpected head {}", u.id));
            let st = snd::status(&u.writable_bytes).unwrap();
            assert_eq!(
                st,
                want,
                "flood round {round}: head {} expected {}, got {} ({st:#x})",
                u.id,
                snd::status_name(want),
                snd::status_name(st)
            );
            if want == snd::S_OK {
                let info = want_info.get_or_insert_with(|| u.writable_bytes.clone());
                assert_eq!(
                    &u.writable_bytes, info,
                    "flood round {round}: PCM_INFO answers differ"
                );
            }
        }
        g.fe.reset_alloc();
    }
    eprintln!("800 control requests in {:?}", t0.elapsed());
    g.alive("after a flood of control requests");

    // A flood of tiny playback buffers (one frame each) with refused ones
    // mixed in: every valid byte is played, in order, once.
    setup_stream(&mut g.fe, OUT, &cfg);
    fixture::start(&mut g.fe, OUT);
    let mut want_played = Vec::new();
    for round in 0..30u64 {
        let mut valid = 0;
        for i in 0..20u64 {
            let frame = pcm_pattern(round * 100 + i, 4);
            if i % 5 == 4 {
                add_tx(&mut g.fe, IN, &frame);
            } else {
                add_tx(&mut g.fe, OUT, &frame);
                want_played.extend_from_slice(&frame);
                valid += 1;
            }
        }
        g.fe.kick_storm(Q_TX, 50).unwrap();
        let (mut ok, mut bad) = (0, 0);
        for _ in 0..20 {
            let u = wait_used(&mut g.fe, Q_TX, PROMPT, &format!("TX flood round {round}"));
            match status_of_tx(&u, "TX flood") {
                snd::S_OK => ok += 1,
                snd::S_BAD_MSG => bad += 1,
                other => panic!("TX flood round {round}: unexpected status {other:#x}"),
            }
        }
        assert_eq!(
            (ok, bad),
            (valid, 20 - valid),
            "TX flood round {round}: (S_OK, S_BAD_MSG) counts"
        );
        g.fe.reset_alloc();
    }
    assert_same_bytes(
        "played.raw after a TX flood",
        &g.broker.wait_played(want_played.len(), PROMPT),
        &want_played,
    );
    g.alive("after a flood of playback buffers");
}

#[test]
fn same_head_published_many_times() {
    let mut g = Guest::start(
        "hostile-dup-heads",
        FrontendOptions {
            event_idx: true,
            ..FrontendOptions::default()
        },
    );
    let cfg = PcmConfig::s16_stereo_48k(10);
    let size = u32::from(DEFAULT_QUEUE_SIZE);

    // Control: one PCM_INFO chain in the avail ring 20 times. Each copy the
    // device takes is answered as the request it is; none is lost mid-way.
    let req = g.pcm_info_request();
    let head = g.fe.add_chain(Q_CTL, &[&req], &[64]).unwrap();
    for _ in 1..20 {
        g.fe.publish(Q_CTL, head).unwrap();
    }
    g.fe.kick(Q_CTL).unwrap();
    let back = drain(&mut g.fe, Q_CTL, QUIET);
    assert!(
        !back.is_empty() && back.len() <= 20,
        "control head published 20 times: expected 1..=20 returns, got {}",
        back.len()
    );
    for (id, len) in &back {
        assert_eq!(
            (*id, *len),
            (u32::from(head), 36),
            "a duplicated PCM_INFO came back as {back:?}"
        );
    }
    g.alive("after a duplicated control head");

    // TX on a running stream: one frame published 10 times.
    setup_stream(&mut g.fe, OUT, &cfg);
    fixture::start(&mut g.fe, OUT);
    let head = add_tx(&mut g.fe, OUT, &pcm_pattern(8, 4));
    for _ in 1..10 {
        g.fe.publish(Q_TX, head).unwrap();
    }
    g.fe.kick(Q_TX).unwrap();
    let back = drain(&mut g.fe, Q_TX, QUIET);
    assert!(
        !back.is_empty() && back.len() <= 10,
        "TX head published 10 times: expected 1..=10 returns, got {back:?}"
    );
    assert!(
        back.iter()
            .all(|&(id, len)| id == u32::from(head) && len == 8),
        "{back:?}"
    );
    g.alive("after a duplicated TX head");

    // Event queue: one buffer published 300 times, in rounds the device
    // takes in full. A driver can never have more buffers outstanding than
    // the queue has entries, so the device must not hold more than that:
    // the excess comes back (with nothing in it) instead of piling up.
    let head =
        g.fe.add_chain(Q_EVT, &[], &[snd::EVENT_SIZE as u32])
            .unwrap();
    g.fe.kick(Q_EVT).unwrap();
    let avail_event = {
        let l = g.fe.ring(Q_EVT).unwrap().layout();
        l.used + 4 + 8 * u64::from(DEFAULT_QUEUE_SIZE)
    };
    let mut published = 1u32;
    let mut back = Vec::new();
    for round in 0..5 {
        for _ in 0..60 {
            g.fe.publish(Q_EVT, head).unwrap();
        }
        published += 60;
        g.fe.kick(Q_EVT).unwrap();
        // With EVENT_IDX the device writes avail_event as it catches up.
        let want = g.fe.ring(Q_EVT).unwrap().avail_idx();
        let deadline = Instant::now() + PROMPT;
        loop {
            let b = g.fe.read_mem(avail_event, 2).unwrap();
            if u16::from_le_bytes([b[0], b[1]]) == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "event round {round}: the device did not take the buffers"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        back.extend(drain(&mut g.fe, Q_EVT, Duration::from_millis(50)));
    }
    let held = published - back.len() as u32;
    assert!(
        held <= size,
        "event buffer published {published} times: the device holds {held} of them, more than \
         the queue's {size} entries (returned: {})",
        back.len()
    );
    assert!(
        back.iter()
            .all(|&(id, len)| id == u32::from(head) && len == 0),
        "{back:?}"
    );
    g.alive("after a duplicated event head");
}
