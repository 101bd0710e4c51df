//! vsnd-device: the unprivileged half of vsnd. Started only by vsnd-broker,
//! with the vhost-user listening socket and the broker channel as its only
//! file descriptors. It serves one frontend connection and exits when the
//! frontend disconnects; the broker starts a fresh device for the next one.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use log::{error, info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vsnd_ipc::{BrokerMsg, Channel, DeviceMsg, MAGIC, PROTOCOL_VERSION};

use vsnd_device::backend::{SndBackend, BROKER_EVENT, TIMER_EVENT};
use vsnd_device::control::SndModel;
use vsnd_device::sandbox::{self, SeccompMode};

/// Exit status when the broker speaks another protocol version.
const EXIT_VERSION_MISMATCH: u8 = 3;
/// Exit status when the sandbox cannot be entered.
const EXIT_NO_SANDBOX: u8 = 4;
/// Exit status after a panic (Rust's own for a panicking main thread).
const EXIT_PANIC: i32 = 101;

struct Args {
    listen_fd: RawFd,
    ipc_fd: RawFd,
    broker_pid: Option<i32>,
    seccomp: SeccompMode,
    insecure_no_sandbox: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen_fd: 3,
        ipc_fd: 4,
        broker_pid: None,
        seccomp: SeccompMode::Kill,
        insecure_no_sandbox: false,
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
            "--broker-pid" => args.broker_pid = Some(fd("--broker-pid")?),
            "--seccomp" => {
                args.seccomp = match it.next().as_deref() {
                    Some("kill") => SeccompMode::Kill,
                    Some("log") => SeccompMode::Log,
                    _ => return Err("--seccomp needs `kill` or `log`".into()),
                }
            }
            "--insecure-no-sandbox" => args.insecure_no_sandbox = true,
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
    // Colours are decided now, not at the first log line: a terminal check
    // (an ioctl) after the sandbox is up would be refused.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_target(false)
        .write_style(env_logger::WriteStyle::Never)
        .format_timestamp_millis()
        .init();
    // A panic ends the device (the release profile aborts; the broker
    // starts a new one). It exits with status 101 after the panic message,
    // as an unwinding panic would, instead of abort(), whose tgkill the
    // sandbox refuses: the broker would report SIGSYS, as if the sandbox
    // had stopped something.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::exit(EXIT_PANIC);
    }));
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vsnd-device: {e}");
            return ExitCode::from(2);
        }
    };
    if args.insecure_no_sandbox {
        warn!("*** INSECURE: running WITHOUT the sandbox (--insecure-no-sandbox). A guest that exploits this process gets this user's rights on the host. Use only for debugging. ***");
        // Still die with the broker.
        if let Err(e) = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL) {
            error!("cannot set the parent-death signal: {e}");
            return ExitCode::FAILURE;
        }
    } else {
        // Before the first guest byte and before any thread.
        let report = match sandbox::restrict(&[args.listen_fd, args.ipc_fd], args.broker_pid) {
            Ok(r) => r,
            Err(e) => {
                error!("cannot enter the sandbox, refusing to serve: {e}");
                return ExitCode::from(EXIT_NO_SANDBOX);
            }
        };
        if let Err(e) = sandbox::apply_seccomp(args.seccomp) {
            error!("cannot apply the seccomp profile, refusing to serve: {e}");
            return ExitCode::from(EXIT_NO_SANDBOX);
        }
        info!(
            "sandbox: {}; seccomp {} ({}); no_new_privs; capabilities dropped{}",
            report.landlock,
            match args.seccomp {
                SeccompMode::Kill => "enforcing",
                SeccompMode::Log => "in LOG mode (violations allowed and logged by the kernel)",
            },
            sandbox::PROFILE_PATH,
            if report.bounding_left > 0 {
                format!(
                    " ({} bounding-set entries kept: no CAP_SETPCAP)",
                    report.bounding_left
                )
            } else {
                String::new()
            }
        );
    }
    let sandboxed = !args.insecure_no_sandbox;
    match run(args, sandboxed) {
        Ok(code) => code,
        Err(e) => {
            error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args, sandboxed: bool) -> Result<ExitCode, String> {
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
    let (caps, gate, pacing) = match broker.recv::<BrokerMsg>() {
        Ok(BrokerMsg::Hello {
            magic,
            version,
            caps,
            gate,
            pacing,
        }) if magic == MAGIC && version == PROTOCOL_VERSION => (caps, gate, pacing),
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
    let backend = SndBackend::new(SndModel::new(&caps, gate), gate, pacing, broker)
        .map_err(|e| format!("cannot create the device: {e}"))?;
    let timer_raw = backend.timer_fd();
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
    worker
        .register_listener(timer_raw, EventSet::IN, u64::from(TIMER_EVENT))
        .map_err(|e| format!("cannot watch the pacing timer: {e}"))?;

    let mut listener = Listener::from(listener);
    info!("waiting for a vhost-user frontend");
    daemon
        .start(&mut listener)
        .map_err(|e| format!("cannot accept a frontend: {e}"))?;
    info!("frontend connected");
    if sandboxed {
        // Both threads exist now; no more processes or threads.
        sandbox::forbid_new_tasks().map_err(|e| format!("cannot lower RLIMIT_NPROC: {e}"))?;
    }
    match daemon.wait() {
        Ok(()) => info!("frontend disconnected"),
        Err(e) => info!("frontend connection ended: {e}"),
    }
    Ok(ExitCode::SUCCESS)
}
