//! Transfer parsing: descriptor chains from guest memory, as the real
//! vhost-user backend (`vsnd_device::backend::SndBackend`) pops and parses
//! them — `vsnd_device::sg::split_chain`, the control request read, the
//! TX/RX `virtio_snd_pcm_xfer` header check, the status written at the end
//! of the writable part, event buffers, and capture data written back when
//! the broker answers.
//!
//! The harness builds guest memory (two `GuestMemoryMmap` regions with a
//! hole), four split virtqueues (`VringRwLock`, as vhost-user-backend sets
//! them up), and plays a script from the input: raw descriptor table
//! entries (chains, indirect tables, loops, out-of-range addresses, zero and
//! huge lengths), publications, kicks, broker answers and queue stops. The
//! broker end of the channel is a thread that decodes everything the device
//! sends.
//!
//! Input: see `vsnd_fuzz::transfer`.
//!
//! Invariants checked besides "no panic" (and no exit: a device that
//! thinks the broker is gone exits):
//! * every message to the broker decodes and is within the protocol's
//!   limits;
//! * the device never returns more buffers on a queue than the guest made
//!   available there, and only heads that exist.
#![no_main]

use std::os::fd::OwnedFd;
use std::thread;

use libfuzzer_sys::fuzz_target;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vsnd_device::backend::{SndBackend, BROKER_EVENT, TIMER_EVENT};
use vsnd_device::control::SndModel;
use vsnd_device::virtio_snd::{NUM_QUEUES, R_PCM_PREPARE, R_PCM_SET_PARAMS, R_PCM_START};
use vsnd_fuzz::transfer::*;
use vsnd_fuzz::Reader;
use vsnd_ipc::{
    socketpair, BrokerMsg, Channel, ChannelError, DeviceMsg, GateState, Pacing, MAX_BUFFER_BYTES,
    MAX_PCM_CHUNK,
};

fn le32s(fields: &[u32]) -> Vec<u8> {
    fields.iter().flat_map(|f| f.to_le_bytes()).collect()
}

fn gate_of(bits: u8) -> GateState {
    GateState {
        output: bits & 1 != 0,
        input: bits & 2 != 0,
    }
}

/// The broker's end: decode and check every frame until the device hangs up.
fn broker_end(fd: OwnedFd) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut ch = Channel::new(fd);
        loop {
            match ch.recv::<DeviceMsg>() {
                Ok(DeviceMsg::Playback { data, .. }) => assert!(data.len() <= MAX_PCM_CHUNK),
                Ok(DeviceMsg::Capture { len, .. }) => assert!(len <= MAX_BUFFER_BYTES),
                Ok(_) => {}
                Err(ChannelError::Closed) => return,
                Err(e) => panic!("the device sent an invalid frame: {e}"),
            }
        }
    })
}

fn queue_base(q: u8) -> u64 {
    u64::from(q % NUM_QUEUES as u8) * QUEUE_STRIDE
}

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let header = r.u8();

    let mem = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), MEM_SIZE as usize),
        (GuestAddress(MEM2_START), MEM2_SIZE as usize),
    ])
    .unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());

    let caps = vsnd_broker::audio::raw_capabilities();
    let gate = GateState {
        output: header & H_GATE_OUTPUT != 0,
        input: header & H_GATE_INPUT != 0,
    };
    let mut model = SndModel::new(&caps, gate);
    for (stream, bit) in [(0u32, H_OUTPUT_PREPARED), (1, H_INPUT_PREPARED)] {
        if header & bit != 0 {
            // 48 kHz stereo S16, 25 ms periods.
            let mut sp = le32s(&[R_PCM_SET_PARAMS, stream, 19_200, 4_800, 0]);
            sp.extend_from_slice(&[2, 5, 7, 0]);
            model.handle(&sp, 64);
            model.handle(&le32s(&[R_PCM_PREPARE, stream]), 64);
            if header & H_START != 0 {
                model.handle(&le32s(&[R_PCM_START, stream]), 64);
            }
        }
    }

    let (dev_fd, broker_fd) = socketpair().unwrap();
    let broker_tx = Channel::new(broker_fd.try_clone().unwrap());
    let reader = broker_end(broker_fd);
    let pacing = Pacing {
        unpaced: header & H_UNPACED != 0,
        playback_batch_ms: 0,
        host_capture: true,
    };
    let mut backend = SndBackend::new(model, gate, pacing, Channel::new(dev_fd)).unwrap();
    let event_idx = header & H_EVENT_IDX != 0;
    backend.set_event_idx(event_idx);
    backend.update_memory(atomic.clone()).unwrap();

    let vrings: Vec<VringRwLock> = (0..NUM_QUEUES as u8)
        .map(|q| {
            let v = VringRwLock::new(atomic.clone(), QUEUE_SIZE).unwrap();
            let base = queue_base(q);
            v.set_queue_size(QUEUE_SIZE);
            v.set_queue_info(base, base + AVAIL_OFFSET, base + USED_OFFSET)
                .unwrap();
            v.set_queue_event_idx(event_idx);
            v.set_queue_ready(true);
            v.set_enabled(true);
            v
        })
        .collect();
    let mut published = [0u16; NUM_QUEUES];
    let mut returned = [0u16; NUM_QUEUES];

    while !r.is_empty() {
        match r.u8() % TAGS {
            T_DESC => {
                let q = r.u8();
                let index = u64::from(r.u8() % QUEUE_SIZE as u8);
                let addr = addr(r.u64());
                let len = len(r.u32());
                let flags = r.u16();
                let next = r.u16();
                let mut d = addr.to_le_bytes().to_vec();
                d.extend_from_slice(&len.to_le_bytes());
                d.extend_from_slice(&flags.to_le_bytes());
                d.extend_from_slice(&next.to_le_bytes());
                mem.write_slice(&d, GuestAddress(queue_base(q) + index * 16))
                    .unwrap();
            }
            T_PUBLISH => {
                let q = r.u8() % NUM_QUEUES as u8;
                let raw = r.u16();
                let head = if raw < 0x8000 { raw % QUEUE_SIZE } else { raw };
                let avail = GuestAddress(queue_base(q) + AVAIL_OFFSET);
                let idx: u16 = mem.read_obj(avail.unchecked_add(2)).unwrap();
                let slot = 4 + 2 * u64::from(idx % QUEUE_SIZE);
                mem.write_obj(head, avail.unchecked_add(slot)).unwrap();
                mem.write_obj(idx.wrapping_add(1), avail.unchecked_add(2))
                    .unwrap();
                published[usize::from(q)] = published[usize::from(q)].wrapping_add(1);
            }
            T_KICK => {
                let q = u16::from(r.u8() % NUM_QUEUES as u8);
                backend.handle_event(q, EventSet::IN, &vrings, 0).unwrap();
            }
            T_WRITE => {
                let off = r.u16();
                let len = usize::from(r.u8());
                let bytes = r.bytes(len);
                // May run past the end of memory: then it is not written.
                let _ = mem.write_slice(bytes, GuestAddress(DATA_START + u64::from(off)));
            }
            T_BROKER => {
                let kind = r.u8();
                let buffer = u64::from(r.u8());
                let arg = r.u16();
                let msg = match kind % 4 {
                    0 => {
                        // The pacing timer fires instead.
                        backend
                            .handle_event(TIMER_EVENT, EventSet::IN, &vrings, 0)
                            .unwrap();
                        continue;
                    }
                    k @ (1 | 2) => BrokerMsg::CaptureData {
                        buffer,
                        last: k == 1,
                        data: vec![0xa5; usize::from(arg).min(MAX_PCM_CHUNK)],
                    },
                    _ => BrokerMsg::Gate(gate_of(arg as u8)),
                };
                broker_tx.send(&msg).unwrap();
                backend
                    .handle_event(BROKER_EVENT, EventSet::IN, &vrings, 0)
                    .unwrap();
            }
            _ => {
                let q = u32::from(r.u8() % NUM_QUEUES as u8);
                backend.stop_vring(q).unwrap();
            }
        }
        for q in 0..NUM_QUEUES as u8 {
            let used = GuestAddress(queue_base(q) + USED_OFFSET);
            let idx: u16 = mem.read_obj(used.unchecked_add(2)).unwrap();
            let qi = usize::from(q);
            while returned[qi] != idx {
                let slot = 4 + 8 * u64::from(returned[qi] % QUEUE_SIZE);
                let id: u32 = mem.read_obj(used.unchecked_add(slot)).unwrap();
                assert!(id < u32::from(QUEUE_SIZE), "queue {q}: used head {id}");
                returned[qi] = returned[qi].wrapping_add(1);
            }
            assert!(
                returned[qi] <= published[qi],
                "queue {q}: {} buffers returned, {} made available",
                returned[qi],
                published[qi]
            );
        }
    }
    drop(backend);
    reader.join().unwrap();
});
