//! A guest sound driver on the test frontend: keeps playback (TX) and
//! capture (RX) buffers queued like the Linux virtio-snd driver does, and
//! records when each one comes back against the ideal real-time schedule.
//!
//! Buffers live in fixed slots of guest memory allocated once, so a guest
//! can run for hours. Playback buffer number `seq` holds `seq` as a
//! little-endian u32 in every 4-byte frame, so what the host played can be
//! checked byte for byte (see `soak`).
//!
//! Two ways to pace:
//! * [`Pace::Device`]: a buffer is resubmitted as soon as one comes back,
//!   `depth` per direction always queued — the device's clock paces the guest
//!   (what vsnd does, and what a real driver relies on);
//! * [`Pace::Frontend`]: the guest submits one playback period every period
//!   by its own clock — for a device that does not pace (upstream returns
//!   every playback buffer at once and never returns capture buffers with
//!   its null backend).
//!
//! An **xrun** here is a buffer that came back more than one period later
//! than its place on the ideal schedule (START + (k+1) × period for the k-th
//! buffer), or a capture buffer that came back short or with an error
//! status. After a late buffer the schedule is re-anchored at it, so one
//! stall counts once; a buffer that comes back "early" moves the schedule
//! back (the device cannot run ahead of its own START: this process saw
//! the START answer or an earlier buffer late), and the total moved back is
//! reported, so a device whose clock runs fast would still show.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use vsnd_tests::fixture::PcmConfig;
use vsnd_tests::frontend::{Frontend, RawDesc};
use vsnd_tests::snd::{self, PcmStatus};

/// A device that returns nothing for this long while buffers are queued is
/// considered stuck.
pub const STALL: Duration = Duration::from_secs(2);

pub type Res<T> = Result<T, String>;

/// Who paces the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pace {
    Device,
    Frontend,
}

struct Slot {
    hdr: u64,
    data: u64,
    status: u64,
}

/// One direction of the guest.
pub struct Lane {
    pub q: usize,
    pub stream: u32,
    pub input: bool,
    period: u32,
    period_dur: Duration,
    depth: usize,
    slots: Vec<Slot>,
    free: Vec<usize>,
    in_flight: HashMap<u16, (usize, u64)>,
    /// Sequence number of the next buffer submitted.
    pub next_seq: u64,
    /// Buffers that came back.
    pub completed: u64,
    /// Completions counted since the schedule's anchor.
    k: u64,
    anchor: Option<Instant>,
    /// Seconds the schedule was moved later by late buffers and not yet
    /// moved back.
    shifted: f64,
    /// Seconds the schedule was moved earlier by early buffers (after the
    /// warm-up: see [`Guest::reset_stats`]).
    pub moved_back: f64,
    /// |completion − ideal time| of every completion, µs.
    pub dev_us: Vec<f64>,
    /// Late completions (see the module doc).
    pub late: u64,
    /// Capture buffers that came back short, or any buffer with a bad
    /// status.
    pub bad: u64,
    /// Frontend pacing: when the next playback period is due.
    next_due: Option<Instant>,
    /// Frontend pacing: periods that were due while every slot was queued.
    pub overflow: u64,
    /// Capture buffers: (when it came back, whether it held non-silence),
    /// when recording is on.
    pub rx_log: Option<Vec<(Instant, bool)>>,
    last_progress: Instant,
    pending_kick: bool,
    scratch: Vec<u8>,
}

impl Lane {
    fn new(
        fe: &mut Frontend,
        q: usize,
        stream: u32,
        input: bool,
        cfg: &PcmConfig,
        depth: usize,
        first_seq: u64,
    ) -> Res<Lane> {
        let period = cfg.period_bytes;
        let mut slots = Vec::with_capacity(depth);
        for _ in 0..depth {
            let hdr = fe
                .alloc_bytes(&snd::pcm_xfer(stream))
                .map_err(|e| e.to_string())?;
            let data = fe.alloc(u64::from(period)).map_err(|e| e.to_string())?;
            let status = fe
                .alloc(snd::PCM_STATUS_SIZE as u64)
                .map_err(|e| e.to_string())?;
            slots.push(Slot { hdr, data, status });
        }
        Ok(Lane {
            q,
            stream,
            input,
            period,
            period_dur: cfg.period(),
            depth,
            slots,
            free: (0..depth).rev().collect(),
            in_flight: HashMap::new(),
            next_seq: first_seq,
            completed: 0,
            k: 0,
            anchor: None,
            shifted: 0.0,
            moved_back: 0.0,
            dev_us: Vec::new(),
            late: 0,
            bad: 0,
            next_due: None,
            overflow: 0,
            rx_log: None,
            last_progress: Instant::now(),
            pending_kick: false,
            scratch: vec![0; period as usize],
        })
    }

    /// Sequence numbers of the buffers queued now.
    pub fn in_flight_seqs(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.in_flight.values().map(|&(_, s)| s).collect();
        v.sort_unstable();
        v
    }

    fn submit(&mut self, fe: &mut Frontend) -> Res<bool> {
        let Some(slot) = self.free.pop() else {
            return Ok(false);
        };
        let s = &self.slots[slot];
        let seq = self.next_seq;
        let data = if self.input {
            RawDesc::writable(s.data, self.period)
        } else {
            fill_seq(&mut self.scratch, seq);
            fe.write_mem(s.data, &self.scratch)
                .map_err(|e| e.to_string())?;
            RawDesc::readable(s.data, self.period)
        };
        let head = fe
            .add_raw_chain(
                self.q,
                &[
                    RawDesc::readable(s.hdr, snd::PCM_XFER_SIZE as u32).then(1),
                    data.then(2),
                    RawDesc::writable(s.status, snd::PCM_STATUS_SIZE as u32),
                ],
            )
            .map_err(|e| e.to_string())?;
        fe.publish(self.q, head).map_err(|e| e.to_string())?;
        if self.in_flight.is_empty() {
            self.last_progress = Instant::now();
        }
        self.in_flight.insert(head, (slot, seq));
        self.next_seq += 1;
        self.pending_kick = true;
        Ok(true)
    }

    fn kick(&mut self, fe: &mut Frontend) -> Res<()> {
        if std::mem::take(&mut self.pending_kick) {
            fe.kick_if_needed(self.q).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Take every returned buffer; true if any came back.
    fn reap(&mut self, fe: &mut Frontend) -> Res<bool> {
        let mut any = false;
        while let Some(u) = fe.poll_used(self.q).map_err(|e| e.to_string())? {
            let now = Instant::now();
            any = true;
            self.last_progress = now;
            let head = u16::try_from(u.id).map_err(|_| format!("used id {}", u.id))?;
            let (slot, _seq) = self
                .in_flight
                .remove(&head)
                .ok_or_else(|| format!("queue {}: unknown used head {head}", self.q))?;
            self.free.push(slot);
            self.completed += 1;
            let want_len = if self.input {
                self.period as usize + snd::PCM_STATUS_SIZE
            } else {
                snd::PCM_STATUS_SIZE
            };
            let len = u.len as usize;
            let ok_status = len >= snd::PCM_STATUS_SIZE
                && u.writable_bytes.len() == len
                && PcmStatus::parse(&u.writable_bytes[len - snd::PCM_STATUS_SIZE..])
                    .is_ok_and(|s| s.status == snd::S_OK);
            if len != want_len || !ok_status {
                self.bad += 1;
            }
            if let Some(log) = self.rx_log.as_mut() {
                let data = &u.writable_bytes[..len.saturating_sub(snd::PCM_STATUS_SIZE)];
                log.push((now, data.iter().any(|&b| b != 0)));
            }
            if let Some(anchor) = self.anchor {
                let ideal = anchor + self.period_dur * (self.k + 1) as u32;
                let mut dev = if now >= ideal {
                    (now - ideal).as_secs_f64()
                } else {
                    -(ideal - now).as_secs_f64()
                };
                let period = self.period_dur.as_secs_f64();
                if dev > period {
                    // Late by more than a period: an xrun. The schedule
                    // moves to this buffer, so one stall counts once…
                    self.late += 1;
                    self.anchor = now.checked_sub(self.period_dur * (self.k + 1) as u32);
                    self.shifted += dev;
                } else if dev < 0.0 {
                    // …and moves back (without counting) when a buffer
                    // comes back before its time: the device's clock cannot
                    // run early against its own START, so either this
                    // process saw the START answer (or a buffer before)
                    // late, or the device runs fast — the total moved back
                    // is reported, so a fast clock shows.
                    let back = -dev;
                    self.shifted = (self.shifted - back).max(0.0);
                    self.moved_back += back;
                    dev = 0.0;
                    self.anchor = self
                        .anchor
                        .and_then(|a| a.checked_sub(Duration::from_secs_f64(back)));
                }
                self.dev_us.push(dev.abs() * 1e6);
                self.k += 1;
            }
        }
        Ok(any)
    }
}

/// Playback buffer `seq`: the u32 `seq` in every 4-byte frame.
pub fn fill_seq(buf: &mut [u8], seq: u64) {
    let w = (seq as u32).to_le_bytes();
    for c in buf.chunks_exact_mut(4) {
        c.copy_from_slice(&w);
    }
}

/// A guest driving one playback and/or one capture stream.
pub struct Guest {
    pub fe: Frontend,
    pub cfg: PcmConfig,
    pub pace: Pace,
    pub tx: Option<Lane>,
    pub rx: Option<Lane>,
}

/// Which streams a guest drives: (stream id, buffers queued).
#[derive(Debug, Clone, Copy)]
pub struct Streams {
    pub tx: Option<(u32, usize)>,
    pub rx: Option<(u32, usize)>,
}

impl Guest {
    pub fn new(
        mut fe: Frontend,
        cfg: PcmConfig,
        streams: Streams,
        pace: Pace,
        first_seq: u64,
    ) -> Res<Guest> {
        let tx = match streams.tx {
            Some((id, depth)) => Some(Lane::new(
                &mut fe,
                snd::QUEUE_TX,
                id,
                false,
                &cfg,
                depth,
                first_seq,
            )?),
            None => None,
        };
        let rx = match streams.rx {
            Some((id, depth)) => Some(Lane::new(&mut fe, snd::QUEUE_RX, id, true, &cfg, depth, 0)?),
            None => None,
        };
        Ok(Guest {
            fe,
            cfg,
            pace,
            tx,
            rx,
        })
    }

    fn lanes_mut(&mut self) -> impl Iterator<Item = &mut Lane> {
        self.tx.iter_mut().chain(self.rx.iter_mut())
    }

    pub fn lanes(&self) -> impl Iterator<Item = &Lane> {
        self.tx.iter().chain(self.rx.iter())
    }

    fn command(&mut self, req: &[u8], what: &str) -> Res<()> {
        let resp = self
            .fe
            .control(req, snd::HDR_SIZE as u32)
            .map_err(|e| format!("{what}: {e}"))?;
        match snd::status(&resp) {
            Ok(snd::S_OK) => Ok(()),
            Ok(st) => Err(format!("{what}: device answered {}", snd::status_name(st))),
            Err(e) => Err(format!("{what}: {e}")),
        }
    }

    /// SET_PARAMS and PREPARE on every stream.
    pub fn setup(&mut self) -> Res<()> {
        let ids: Vec<u32> = self.lanes().map(|l| l.stream).collect();
        for id in ids {
            let req = self.cfg.set_params_request(id);
            self.command(&req, &format!("SET_PARAMS of stream {id}"))?;
            self.command(
                &snd::pcm_hdr(snd::R_PCM_PREPARE, id),
                &format!("PREPARE of stream {id}"),
            )?;
        }
        Ok(())
    }

    /// Queue the first buffers (device pacing: `depth` each; frontend
    /// pacing: only capture buffers).
    pub fn prefill(&mut self) -> Res<()> {
        let pace = self.pace;
        let mut lanes: Vec<&mut Lane> = self.tx.iter_mut().chain(self.rx.iter_mut()).collect();
        for lane in lanes.iter_mut() {
            if pace == Pace::Device || lane.input {
                for _ in 0..lane.depth {
                    lane.submit(&mut self.fe)?;
                }
            }
            lane.kick(&mut self.fe)?;
        }
        Ok(())
    }

    /// START every stream; the schedules are anchored at the answers.
    pub fn start(&mut self) -> Res<()> {
        let ids: Vec<u32> = self.lanes().map(|l| l.stream).collect();
        for id in ids {
            self.command(
                &snd::pcm_hdr(snd::R_PCM_START, id),
                &format!("START of stream {id}"),
            )?;
            let now = Instant::now();
            let pace = self.pace;
            for lane in self.lanes_mut().filter(|l| l.stream == id) {
                lane.k = 0;
                lane.shifted = 0.0;
                lane.last_progress = now;
                match pace {
                    Pace::Device => lane.anchor = Some(now),
                    Pace::Frontend if !lane.input => lane.next_due = Some(now),
                    Pace::Frontend => {}
                }
            }
        }
        Ok(())
    }

    /// Forget the measurements so far (after a warm-up), keep running.
    pub fn reset_stats(&mut self) {
        for l in self.lanes_mut() {
            l.dev_us.clear();
            l.moved_back = 0.0;
            l.late = 0;
            l.bad = 0;
            l.overflow = 0;
        }
    }

    /// Completed buffers of both directions.
    pub fn completed(&self) -> u64 {
        self.lanes().map(|l| l.completed).sum()
    }

    /// Drive the streams until `end`.
    pub fn run_until(&mut self, end: Instant) -> Res<()> {
        loop {
            let now = Instant::now();
            if now >= end {
                return Ok(());
            }
            self.step(now, end)?;
        }
    }

    /// One round: take returned buffers, queue new ones, kick, then sleep
    /// until a buffer returns, the next period is due, or `until`.
    pub fn step(&mut self, now: Instant, until: Instant) -> Res<()> {
        let pace = self.pace;
        let mut wake = until;
        let mut queues = Vec::with_capacity(2);
        for lane in self.tx.iter_mut().chain(self.rx.iter_mut()) {
            lane.reap(&mut self.fe)?;
            match (pace, lane.next_due) {
                (Pace::Frontend, Some(mut due)) => {
                    while due <= now {
                        if !lane.submit(&mut self.fe)? {
                            lane.overflow += 1;
                        }
                        due += lane.period_dur;
                    }
                    lane.next_due = Some(due);
                    wake = wake.min(due);
                }
                _ => while lane.in_flight.len() < lane.depth && lane.submit(&mut self.fe)? {},
            }
            lane.kick(&mut self.fe)?;
            if pace == Pace::Device
                && !lane.in_flight.is_empty()
                && now.duration_since(lane.last_progress) > STALL
            {
                return Err(format!(
                    "queue {}: no buffer came back for {STALL:?} ({} queued)",
                    lane.q,
                    lane.in_flight.len()
                ));
            }
            queues.push(lane.q);
        }
        let timeout = wake.saturating_duration_since(Instant::now());
        self.fe
            .wait_calls(&queues, timeout)
            .map_err(|e| e.to_string())
    }
}
