//! vsnd-device: the unprivileged half of vsnd. Started only by vsnd-broker,
//! with the vhost-user listening socket and the broker channel as its only
//! file descriptors. It serves one frontend connection and exits when the
//! frontend disconnects; the broker starts a fresh device for the next one.

mod backend;
mod control;
mod sg;
mod virtio_snd;

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use log::{error, info};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vsnd_ipc::{BrokerMsg, Channel, DeviceMsg, MAGIC, PROTOCOL_VERSION};

use backend::{SndBackend, BROKER_EVENT};
use control::SndModel;

/// Exit status when the broker speaks another protocol version.
const EXIT_VERSION_MISMATCH: u8 = 3;

struct Args {
    listen_fd: RawFd,
    ipc_fd: RawFd,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen_fd: 3,
        ipc_fd: 4,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut fd = |name: &str| -> Result<RawFd, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .filter(|v: &RawFd| *v >= 0)
                .ok_or_else(|| format!("{name} needs a file descriptor number"))
        };
        match a.as_str() {
            "--listen-fd" => args.listen_fd = fd("--listen-fd")?,
            "--ipc-fd" => args.ipc_fd = fd("--ipc-fd")?,
            "-V" | "--version" => {
                println!(
                    "vsnd-device {} (protocol {PROTOCOL_VERSION})",
                    env!("CARGO_PKG_VERSION")
                );
                std::process::exit(0);
            }
            other => {
                return Err(format!(
                    "unknown argument {other:?}; vsnd-device is started by vsnd-broker, not by hand"
                ))
            }
        }
    }
    Ok(args)
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .init();
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vsnd-device: {e}");
            return ExitCode::from(2);
        }
    };
    // The device must not outlive the broker that supervises it.
    if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
        error!("cannot set the parent-death signal: {e}");
        return ExitCode::FAILURE;
    }
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<ExitCode, String> {
    // SAFETY: the broker passes these descriptors to us open and owned by
    // this process; nothing else in the process refers to them.
    let ipc = unsafe { OwnedFd::from_raw_fd(args.ipc_fd) };
    // SAFETY: as above, for the listening socket.
    let listener = unsafe { UnixListener::from_raw_fd(args.listen_fd) };

    let mut broker = Channel::new(ipc);
    broker
        .send(&DeviceMsg::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
        })
        .map_err(|e| format!("cannot greet the broker: {e}"))?;
    let (caps, gate) = match broker.recv::<BrokerMsg>() {
        Ok(BrokerMsg::Hello {
            magic,
            version,
            caps,
            gate,
        }) if magic == MAGIC && version == PROTOCOL_VERSION => (caps, gate),
        Ok(BrokerMsg::Hello { magic, version, .. }) if magic == MAGIC => {
            error!(
                "the broker speaks protocol version {version}, this vsnd-device speaks {PROTOCOL_VERSION}: \
                 install vsnd-broker and vsnd-device from the same release"
            );
            return Ok(ExitCode::from(EXIT_VERSION_MISMATCH));
        }
        Ok(other) => return Err(format!("expected the broker's hello, got {other:?}")),
        Err(e) => return Err(format!("no hello from the broker: {e}")),
    };
    info!(
        "broker hello: {} formats, {} rates, {}-{} channels; output {}, input {}",
        caps.formats.len(),
        caps.rates.len(),
        caps.channels_min,
        caps.channels_max,
        if gate.output { "on" } else { "off" },
        if gate.input { "on" } else { "off" }
    );

    let ipc_raw = std::os::fd::AsRawFd::as_raw_fd(&broker);
    let backend = SndBackend::new(SndModel::new(&caps, gate), gate, broker)
        .map_err(|e| format!("cannot create the device: {e}"))?;
    let backend = Arc::new(Mutex::new(backend));
    let mut daemon = VhostUserDaemon::new(
        "vsnd-device".to_string(),
        backend,
        GuestMemoryAtomic::new(GuestMemoryMmap::new()),
    )
    .map_err(|e| format!("cannot start the vhost-user daemon: {e}"))?;
    let handlers = daemon.get_epoll_handlers();
    let worker = handlers
        .first()
        .ok_or("the vhost-user daemon has no worker")?;
    worker
        .register_listener(ipc_raw, EventSet::IN, u64::from(BROKER_EVENT))
        .map_err(|e| format!("cannot watch the broker channel: {e}"))?;

    let mut listener = Listener::from(listener);
    info!("waiting for a vhost-user frontend");
    daemon
        .start(&mut listener)
        .map_err(|e| format!("cannot accept a frontend: {e}"))?;
    info!("frontend connected");
    match daemon.wait() {
        Ok(()) => info!("frontend disconnected"),
        Err(e) => info!("frontend connection ended: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}
