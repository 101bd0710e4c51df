//! vsnd-broker: the program users run. It holds the host audio backend and
//! the enable flags, and supervises the unprivileged vsnd-device that talks
//! to the VM.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};
use log::{error, info, warn};

use vsnd_broker::audio::{
    alsa::AlsaAudio, file::FileAudio, null::Null, pipewire::PipeWireAudio, Audio,
};
use vsnd_broker::audit::AuditLog;
use vsnd_broker::cli::{self, BackendKind, Cli};
use vsnd_broker::control_socket::ControlServer;
use vsnd_broker::gate::Gate;
use vsnd_broker::socket_path::clear_stale_socket;
use vsnd_broker::supervisor::{handled_signals, DeviceSpec, RunEnd, Supervisor};

/// Exit status for bad arguments or an environment that cannot work
/// (nothing was started).
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();

    // Before anything else (and before any thread): our signals are read from
    // a signalfd, never delivered asynchronously.
    if let Err(e) = handled_signals().thread_block() {
        eprintln!("vsnd-broker: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }

    let prepared = match prepare(&cli) {
        Ok(p) => p,
        Err(msg) => {
            let mut cmd = Cli::command();
            cmd.error(ErrorKind::InvalidValue, msg).print().ok();
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let Prepared {
        listener,
        created_socket,
        device,
        audio,
        gate,
        control,
    } = prepared;

    let mut sup = match Supervisor::new(listener, device, audio, gate, control) {
        Ok(s) => s,
        Err(e) => {
            error!("cannot set up signal handling: {e}");
            remove_socket(created_socket.as_deref());
            return ExitCode::FAILURE;
        }
    };
    if cli.unpaced_for_benchmark {
        warn!("*** MEASUREMENT ONLY: --unpaced-for-benchmark: audio is not paced in real time; never use this for a VM ***");
        sup.set_unpaced_for_benchmark(true);
    }
    let end = sup.run();
    remove_socket(created_socket.as_deref());
    match end {
        RunEnd::Shutdown => {
            info!("stopped");
            ExitCode::SUCCESS
        }
        RunEnd::Fatal(msg) => {
            error!("{msg}");
            ExitCode::FAILURE
        }
    }
}

struct Prepared {
    listener: OwnedFd,
    created_socket: Option<PathBuf>,
    device: DeviceSpec,
    audio: Box<dyn Audio>,
    gate: Gate,
    control: Option<ControlServer>,
}

/// Check every argument and open every resource, those with side effects
/// last (the socket, then the audio files), so that a bad argument leaves
/// nothing behind.
fn prepare(cli: &Cli) -> Result<Prepared, String> {
    let (output, input) = cli::parse_streams(&cli.initial_streams)?;

    match cli.backend {
        BackendKind::Null | BackendKind::Alsa | BackendKind::Pipewire
            if cli.playback_file.is_some() || cli.capture_file.is_some() =>
        {
            return Err("--playback-file and --capture-file need --backend file".into());
        }
        BackendKind::File if cli.playback_file.is_none() && cli.capture_file.is_none() => {
            return Err("--backend file needs --playback-file and/or --capture-file".into());
        }
        _ => {}
    }

    let device_path = match &cli.device_path {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this program's location: {e}; pass --device-path"))?
            .with_file_name("vsnd-device"),
    };
    check_executable(&device_path)?;
    let user = device_user(&cli.device_user)?;
    // No process of our user may ptrace us or read our memory: the device
    // may run as that user too.
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } < 0 {
        return Err(format!(
            "cannot make the broker non-dumpable: {}",
            std::io::Error::last_os_error()
        ));
    }
    if cli.insecure_no_sandbox {
        warn!("*** INSECURE: --insecure-no-sandbox: the device will run WITHOUT its sandbox; debugging only ***");
    }
    let device = DeviceSpec {
        path: device_path,
        user,
        seccomp: cli.seccomp,
        insecure: cli.insecure_no_sandbox,
    };

    let audit = AuditLog::open(cli.audit_log.as_deref())?;

    let (listener, created_socket) = match (&cli.socket, cli.socket_fd) {
        (Some(path), None) => (bind_socket(path)?, Some(path.clone())),
        (None, Some(fd)) => (inherit_socket(fd)?, None),
        _ => return Err("give exactly one of --socket PATH and --socket-fd FD".into()),
    };
    let control = match &cli.control_socket {
        None => None,
        Some(p) => match ControlServer::bind(p, cli.control_allow_uid.clone()) {
            Ok(c) => Some(c),
            Err(e) => {
                remove_socket(created_socket.as_deref());
                return Err(e);
            }
        },
    };
    // The audio files are opened last, after the socket: opening rewrites a
    // .wav playback file, so no later check may fail (a second broker on a
    // busy socket, a typo in another argument must not wipe a recording).
    // Only the socket we just created has to be undone.
    let opened: Result<Box<dyn Audio>, String> = match cli.backend {
        BackendKind::Null => Ok(Box::new(Null)),
        BackendKind::File => {
            FileAudio::open(cli.playback_file.as_deref(), cli.capture_file.as_deref())
                .map(|a| Box::new(a) as Box<dyn Audio>)
        }
        BackendKind::Alsa => AlsaAudio::open(&cli.alsa_playback_device, &cli.alsa_capture_device)
            .map(|a| Box::new(a) as Box<dyn Audio>),
        BackendKind::Pipewire => {
            PipeWireAudio::new(&stream_name(cli), cli.pipewire_remote.as_deref())
                .map(|a| Box::new(a) as Box<dyn Audio>)
        }
    };
    let audio = match opened {
        Ok(a) => a,
        Err(e) => {
            remove_socket(created_socket.as_deref());
            drop(control);
            return Err(e);
        }
    };
    match &created_socket {
        Some(p) => info!("listening on {}", p.display()),
        None => info!("listening on inherited socket fd {}", listener.as_raw_fd()),
    }
    let gate = Gate::new(output, input, audit);
    Ok(Prepared {
        listener,
        created_socket,
        device,
        audio,
        gate,
        control,
    })
}

/// The name mixers show: --name, else the socket's file stem, else "vm".
fn stream_name(cli: &Cli) -> String {
    let raw = cli.name.clone().unwrap_or_else(|| {
        cli.socket
            .as_deref()
            .and_then(|p| p.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "vm".into())
    });
    // Node names are identifiers: keep them to a safe character set.
    raw.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The (uid, gid) the device runs as: `name`'s when the broker is root,
/// none (the broker's own) otherwise.
fn device_user(name: &str) -> Result<Option<(u32, u32)>, String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = match nix::unistd::User::from_name(name) {
        Ok(Some(u)) => u,
        Ok(None) => {
            return Err(format!(
                "--device-user {name:?}: no such user; create it or name another unprivileged user"
            ))
        }
        Err(e) => return Err(format!("--device-user {name:?}: cannot look it up: {e}")),
    };
    if user.uid.is_root() {
        return Err(format!(
            "--device-user {name:?} is root; the device must run unprivileged"
        ));
    }
    info!(
        "the device runs as {name} (uid {}, gid {})",
        user.uid, user.gid
    );
    Ok(Some((user.uid.as_raw(), user.gid.as_raw())))
}

fn check_executable(p: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(p).map_err(|e| {
        format!("vsnd-device not found at {} ({e}): install it beside vsnd-broker or pass --device-path", p.display())
    })?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(format!(
            "{} is not an executable file (--device-path)",
            p.display()
        ));
    }
    Ok(())
}

fn bind_socket(path: &Path) -> Result<OwnedFd, String> {
    clear_stale_socket(path, "--socket")?;
    let l = UnixListener::bind(path)
        .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    Ok(OwnedFd::from(l))
}

fn inherit_socket(fd: i32) -> Result<OwnedFd, String> {
    use nix::sys::socket::{getsockopt, sockopt};
    if fd < 3 {
        return Err(format!(
            "--socket-fd {fd} is a standard stream, not a listening socket"
        ));
    }
    // SAFETY: F_GETFD only asks whether the number is an open descriptor.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("--socket-fd {fd} is not an open file descriptor"));
    }
    // SAFETY: fd is open (checked above) and handed to us by our parent; we
    // take ownership of it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    match getsockopt(&owned, sockopt::AcceptConn) {
        Ok(true) => {}
        Ok(false) => return Err(format!("--socket-fd {fd} is a socket but is not listening")),
        Err(_) => return Err(format!("--socket-fd {fd} is not a socket")),
    }
    match getsockopt(&owned, sockopt::SockType) {
        Ok(nix::sys::socket::SockType::Stream) => {}
        _ => return Err(format!("--socket-fd {fd} is not a stream socket")),
    }
    // The device accepts with blocking calls; a non-blocking listener would
    // make it spin.
    let flags =
        nix::fcntl::fcntl(&owned, nix::fcntl::FcntlArg::F_GETFL).map_err(|e| e.to_string())?;
    let mut flags = nix::fcntl::OFlag::from_bits_truncate(flags);
    flags.remove(nix::fcntl::OFlag::O_NONBLOCK);
    nix::fcntl::fcntl(&owned, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(|e| e.to_string())?;
    nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| e.to_string())?;
    Ok(owned)
}

fn remove_socket(path: Option<&Path>) {
    if let Some(p) = path {
        if let Err(e) = std::fs::remove_file(p) {
            warn!("cannot remove {}: {e}", p.display());
        }
    }
}
