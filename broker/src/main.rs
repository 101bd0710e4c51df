//! vsnd-broker: the program users run. It holds the host audio backend and
//! the enable flags, and supervises the unprivileged vsnd-device that talks
//! to the VM.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::rc::Rc;

use clap::error::ErrorKind;
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use log::{error, info, warn};

use vsnd_broker::audio::{
    alsa::AlsaAudio, file::FileAudio, null::Null, pipewire::PipeWireAudio, Audio,
};
use vsnd_broker::audit::AuditLog;
use vsnd_broker::cli::{self, BackendKind, Cli, SeccompMode, EXIT_USAGE};
use vsnd_broker::config;
use vsnd_broker::control_socket::ControlServer;
use vsnd_broker::gate::Gate;
use vsnd_broker::socket_path::clear_stale_socket;
use vsnd_broker::supervisor::{handled_signals, DeviceSpec, RunEnd, Supervisor};
use vsnd_broker::systemd::{self, Activation, Notifier};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    // First, while there is one thread: take the service manager's variables
    // out of the environment, so that nothing the broker starts sees them.
    let activation = systemd::take_activation();
    let notifier = Notifier::from_env().map(Rc::new);

    let matches = Cli::command().get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let listener = match settle(&mut cli, &matches, activation) {
        Ok(l) => l,
        Err(msg) => return usage_error(msg),
    };

    // Before anything else (and before any thread): our signals are read from
    // a signalfd, never delivered asynchronously.
    if let Err(e) = handled_signals().thread_block() {
        eprintln!("vsnd-broker: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }

    let prepared = match prepare(&cli, &listener) {
        Ok(p) => p,
        Err(msg) => return usage_error(msg),
    };
    let Prepared {
        listener,
        created_socket,
        serving,
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
    if let Some(n) = notifier.clone() {
        sup.on_device_started(move |pid| n.device_started(&serving, pid));
    }
    let end = sup.run();
    if let Some(n) = &notifier {
        n.stopping(&match &end {
            RunEnd::Shutdown => "stopping".to_string(),
            RunEnd::Fatal(msg) => format!("failed: {msg}"),
        });
    }
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

/// Report a usage error (bad argument, config file or environment) the way
/// clap does, and exit with [`EXIT_USAGE`]: nothing was started.
fn usage_error(msg: String) -> ExitCode {
    let mut cmd = Cli::command();
    cmd.error(ErrorKind::InvalidValue, msg).print().ok();
    ExitCode::from(EXIT_USAGE)
}

/// Where the vhost-user listener comes from.
enum ListenerSpec {
    /// Bind a new socket here (`--socket`).
    Path(PathBuf),
    /// An inherited listening descriptor; `what` names it in messages.
    Fd { fd: i32, what: String },
}

/// Complete `cli` from the --config file (the command line wins) and
/// decide where the listener comes from: --socket or --socket-fd on the
/// command line; else a socket passed by the service manager (LISTEN_FDS);
/// else `socket` or `socket-fd` of the config file.
fn settle(
    cli: &mut Cli,
    matches: &ArgMatches,
    activation: Result<Option<Activation>, String>,
) -> Result<ListenerSpec, String> {
    if let Some(path) = cli.config.clone() {
        let file = config::load(&path).map_err(|e| e.to_string())?;
        config::merge(cli, matches, file, &config::base_dir(&path))
            .map_err(|e| format!("config file {}: {e}", path.display()))?;
        info!("settings from {}", path.display());
    }
    let on_cli = config::given_on_command_line(matches, "socket")
        || config::given_on_command_line(matches, "socket_fd");
    let activation = match activation {
        Err(e) if on_cli => {
            warn!("{e}; ignored: the listener is given on the command line");
            None
        }
        other => other?,
    };
    match activation {
        Some(a) if !on_cli => {
            if cli.socket.is_some() || cli.socket_fd.is_some() {
                warn!(
                    "socket activation: serving the socket the service manager passed \
                     (LISTEN_FDS), not `socket`/`socket-fd` of the config file"
                );
                cli.socket = None;
                cli.socket_fd = None;
            }
            let fd = a.listener_fd()?;
            return Ok(ListenerSpec::Fd {
                fd,
                what: format!("the socket passed by the service manager (LISTEN_FDS, fd {fd})"),
            });
        }
        Some(a) => {
            info!(
                "ignoring the {} socket(s) passed by the service manager (LISTEN_FDS): \
                 --socket or --socket-fd given",
                a.count
            );
            a.set_cloexec();
        }
        None => {}
    }
    match (&cli.socket, cli.socket_fd) {
        (Some(path), None) => Ok(ListenerSpec::Path(path.clone())),
        (None, Some(fd)) => Ok(ListenerSpec::Fd {
            fd,
            what: if on_cli {
                format!("--socket-fd {fd}")
            } else {
                format!("socket-fd = {fd} (config file)")
            },
        }),
        (None, None) => Err(
            "no vhost-user socket: give --socket PATH or --socket-fd FD \
             (or `socket` in the --config file, or start the broker through socket \
             activation, LISTEN_FDS)"
                .into(),
        ),
        (Some(_), Some(_)) => Err("give exactly one of --socket PATH and --socket-fd FD".into()),
    }
}

struct Prepared {
    listener: OwnedFd,
    created_socket: Option<PathBuf>,
    /// What is served, for the service manager's status line.
    serving: String,
    device: DeviceSpec,
    audio: Box<dyn Audio>,
    gate: Gate,
    control: Option<ControlServer>,
}

/// Check every argument and open every resource, those with side effects
/// last (the socket, then the audio files), so that a bad argument leaves
/// nothing behind.
fn prepare(cli: &Cli, spec: &ListenerSpec) -> Result<Prepared, String> {
    let (output, input) =
        cli::parse_streams(&cli.initial_streams).map_err(|e| format!("--initial-streams: {e}"))?;
    if !cli.control_allow_uid.is_empty() && cli.control_socket.is_none() {
        return Err(
            "--control-allow-uid (control-allow-uid in the config file) needs --control-socket"
                .into(),
        );
    }

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
    if cli.seccomp == SeccompMode::Log && !cli.insecure_no_sandbox {
        warn!(
            "*** INSECURE: --seccomp log: the device's system-call filter only reports, it \
             blocks nothing (socket and connect included); for diagnosing the profile only ***"
        );
    }
    let device = DeviceSpec {
        path: device_path,
        user,
        seccomp: cli.seccomp,
        insecure: cli.insecure_no_sandbox,
    };

    let audit = AuditLog::open(cli.audit_log.as_deref())?;

    let (listener, created_socket) = match spec {
        ListenerSpec::Path(path) => (bind_socket(path)?, Some(path.clone())),
        ListenerSpec::Fd { fd, what } => (inherit_socket(*fd, what)?, None),
    };
    // The socket's path names the VM's streams by default, inherited too.
    let listener_path = created_socket.clone().or_else(|| bound_path(&listener));
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
        BackendKind::Pipewire => PipeWireAudio::new(
            &stream_name(cli, listener_path.as_deref()),
            cli.pipewire_remote.as_deref(),
        )
        .map(|a| Box::new(a) as Box<dyn Audio>),
    };
    let audio = match opened {
        Ok(a) => a,
        Err(e) => {
            remove_socket(created_socket.as_deref());
            drop(control);
            return Err(e);
        }
    };
    let serving = match spec {
        ListenerSpec::Path(p) => {
            info!("listening on {}", p.display());
            p.display().to_string()
        }
        ListenerSpec::Fd { what, .. } => {
            let path = listener_path
                .as_deref()
                .map(|p| format!(" ({})", p.display()))
                .unwrap_or_default();
            info!(
                "listening on inherited socket fd {}{path}: {what}",
                listener.as_raw_fd()
            );
            format!("inherited socket fd {}{path}", listener.as_raw_fd())
        }
    };
    let gate = Gate::new(output, input, audit);
    Ok(Prepared {
        listener,
        created_socket,
        serving,
        device,
        audio,
        gate,
        control,
    })
}

/// The name mixers show: --name, else the socket's file stem, else "vm".
fn stream_name(cli: &Cli, socket: Option<&Path>) -> String {
    let raw = cli.name.clone().unwrap_or_else(|| {
        socket
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
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| format!("cannot read /proc/self/status to check capabilities: {e}"))?;
    let missing = missing_capabilities(&status, DEVICE_SPAWN_CAPS);
    if !missing.is_empty() {
        return Err(format!(
            "running as root without {}: the broker needs CAP_SETUID, CAP_SETGID and \
             CAP_SETPCAP to start its device as {name} with no capabilities, and CAP_KILL to \
             stop it; grant them (systemd: CapabilityBoundingSet=CAP_SETUID CAP_SETGID \
             CAP_SETPCAP CAP_KILL) or run vsnd-broker as an unprivileged user",
            missing.join(", ")
        ));
    }
    info!(
        "the device runs as {name} (uid {}, gid {})",
        user.uid, user.gid
    );
    Ok(Some((user.uid.as_raw(), user.gid.as_raw())))
}

/// What a root broker needs to run its device as another user and stop
/// it: (capability number, name).
const DEVICE_SPAWN_CAPS: &[(u32, &str)] = &[
    (5, "CAP_KILL"),
    (6, "CAP_SETGID"),
    (7, "CAP_SETUID"),
    (8, "CAP_SETPCAP"),
];

/// The names of `caps` missing from the `CapEff:` line of a
/// `/proc/PID/status` text (all of them if the line is missing).
fn missing_capabilities(status: &str, caps: &[(u32, &'static str)]) -> Vec<&'static str> {
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    caps.iter()
        .filter(|(bit, _)| eff & (1u64 << bit) == 0)
        .map(|&(_, name)| name)
        .collect()
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

/// Take ownership of the inherited listener `fd` (`what` names it in
/// messages), after checking that it is a listening Unix stream socket.
///
/// The device later gets it as its descriptor 3; the broker's own copy may
/// already be 3 (socket activation), which the spawn handles (it moves both
/// of the device's descriptors above 10 before placing them).
fn inherit_socket(fd: i32, what: &str) -> Result<OwnedFd, String> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, AddressFamily, SockaddrLike as _};
    if fd < 3 {
        return Err(format!(
            "{what} is a standard stream, not a listening socket"
        ));
    }
    // SAFETY: F_GETFD only asks whether the number is an open descriptor.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("{what} is not an open file descriptor"));
    }
    // SAFETY: fd is open (checked above) and handed to us by our parent; we
    // take ownership of it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    match getsockopt(&owned, sockopt::AcceptConn) {
        Ok(true) => {}
        Ok(false) => return Err(format!("{what} is a socket but is not listening")),
        Err(_) => return Err(format!("{what} is not a socket")),
    }
    let family = getsockname::<nix::sys::socket::SockaddrStorage>(owned.as_raw_fd())
        .ok()
        .and_then(|a| a.family());
    if family != Some(AddressFamily::Unix) {
        return Err(format!(
            "{what} is not a Unix socket (AF_UNIX); vhost-user needs a Unix stream socket"
        ));
    }
    match getsockopt(&owned, sockopt::SockType) {
        Ok(nix::sys::socket::SockType::Stream) => {}
        _ => return Err(format!("{what} is not a stream socket (SOCK_STREAM)")),
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

/// The filesystem path a Unix socket is bound to, if any.
fn bound_path(fd: &OwnedFd) -> Option<PathBuf> {
    let addr = nix::sys::socket::getsockname::<nix::sys::socket::UnixAddr>(fd.as_raw_fd()).ok()?;
    addr.path().map(Path::to_path_buf)
}

fn remove_socket(path: Option<&Path>) {
    if let Some(p) = path {
        if let Err(e) = std::fs::remove_file(p) {
            warn!("cannot remove {}: {e}", p.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_capabilities_reads_cap_eff() {
        let all = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert!(missing_capabilities(all, DEVICE_SPAWN_CAPS).is_empty());
        // Everything but CAP_KILL (bit 5).
        let no_kill = "CapEff:\t000001ffffffffdf\n";
        assert_eq!(
            missing_capabilities(no_kill, DEVICE_SPAWN_CAPS),
            vec!["CAP_KILL"]
        );
        assert_eq!(
            missing_capabilities("CapEff:\t0000000000000000\n", DEVICE_SPAWN_CAPS).len(),
            4
        );
        assert_eq!(missing_capabilities("", DEVICE_SPAWN_CAPS).len(), 4);
    }
}
