//! vsnd-sandbox-probe: a stand-in for `vsnd-device` that enters exactly the
//! device's sandbox and then tries ONE escape, so that `tests/sandbox.rs` can
//! watch what the sandbox does with it.
//!
//! The real `vsnd-broker` starts it (`--device-path <dir>/probe-<action>`),
//! so the broker's real spawn path applies: the device user (`nobody` when
//! the broker is root), an empty bounding set, descriptors 3 (listener) and
//! 4 (channel) and nothing else, a clean environment, stderr a pipe that
//! the broker relays as `vsnd-device[PID]: ...`. It receives the device's
//! command line (`--listen-fd 3 --ipc-fd 4 --seccomp kill|log --broker-pid N`)
//! and runs the device library's own code, in the device's order:
//! `sandbox::restrict(&[3, 4], broker_pid)` then `sandbox::apply_seccomp`.
//!
//! The action comes from the file name (`argv[0]`, which the broker sets to
//! the path it was given, so a symlink works; `/proc/self/exe` would name the
//! symlink's target instead). Paths the action needs are in the probe's own
//! directory, the one fixed convention shared with the test:
//!
//! | file name               | attempt (one raw system call unless noted) |
//! |-------------------------|--------------------------------------------|
//! | `probe-open-passwd`     | `openat("/etc/passwd", O_RDONLY)` |
//! | `probe-create-file`     | `openat("<dir>/created-by-probe", O_WRONLY\|O_CREAT\|O_EXCL)` |
//! | `probe-socket-unix`     | `socket(AF_UNIX, SOCK_STREAM)` |
//! | `probe-socket-inet`     | `socket(AF_INET, SOCK_STREAM)` |
//! | `probe-connect-unix`    | `socket(AF_UNIX)`, then `connect` to `<dir>/pw.sock` (a stand-in for a PipeWire socket) |
//! | `probe-connect-held`    | `connect(3, <dir>/pw.sock)` on an unconnected `AF_UNIX` socket the probe created BEFORE the sandbox and put on fd 3 (in place of the listener), so that `connect` itself is what the sandbox meets |
//! | `probe-exec-true`       | `execve("/bin/true")` |
//! | `probe-ptrace-broker`   | `ptrace(PTRACE_ATTACH, <--broker-pid>)` |
//! | `probe-kill-victim`     | `kill(<pid in <dir>/victim.pid>, SIGTERM)` |
//!
//! Everything an action needs (paths, the victim's pid, the held socket) is
//! prepared before the sandbox. Output on stderr, one line each:
//!
//! * `vsnd-sandbox-probe: sandbox: landlock ABI N, ...` after `restrict`;
//! * `PROBE <action>: attempting <what>` once seccomp is on;
//! * `PROBE <action>: returned <value>` or
//!   `PROBE <action>: failed with errno <N> (<NAME>)` if the probe survived
//!   the call; it then exits 0. If seccomp kills it, the device's SIGSYS
//!   reporter prints `vsnd-device: seccomp: blocked system call N (name) ...`
//!   instead and the probe dies of SIGSYS.
//!
//! Setup failures print `vsnd-sandbox-probe: ...` and exit 2 (usage) or 4
//! (cannot enter the sandbox, like the device).

use std::ffi::{CString, OsStr};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use vsnd_device::sandbox::{self, SeccompMode};

/// Exit status for a bad command line or program name.
const EXIT_USAGE: u8 = 2;
/// Exit status when the sandbox cannot be entered (the device's too).
const EXIT_NO_SANDBOX: u8 = 4;

/// File the `create-file` action tries to create, in the probe's directory.
const CREATED_FILE: &str = "created-by-probe";
/// The pathname socket the `connect-*` actions try, in the probe's directory.
const UNIX_SOCKET: &str = "pw.sock";
/// File holding the pid the `kill-victim` action signals, in the probe's
/// directory.
const VICTIM_PID_FILE: &str = "victim.pid";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    OpenPasswd,
    CreateFile,
    SocketUnix,
    SocketInet,
    ConnectUnix,
    ConnectHeld,
    ExecTrue,
    PtraceBroker,
    KillVictim,
}

impl Action {
    const ALL: [Action; 9] = [
        Action::OpenPasswd,
        Action::CreateFile,
        Action::SocketUnix,
        Action::SocketInet,
        Action::ConnectUnix,
        Action::ConnectHeld,
        Action::ExecTrue,
        Action::PtraceBroker,
        Action::KillVictim,
    ];

    fn name(self) -> &'static str {
        match self {
            Action::OpenPasswd => "open-passwd",
            Action::CreateFile => "create-file",
            Action::SocketUnix => "socket-unix",
            Action::SocketInet => "socket-inet",
            Action::ConnectUnix => "connect-unix",
            Action::ConnectHeld => "connect-held",
            Action::ExecTrue => "exec-true",
            Action::PtraceBroker => "ptrace-broker",
            Action::KillVictim => "kill-victim",
        }
    }

    fn from_program_name(file_name: &str) -> Result<Action, String> {
        let name = file_name
            .strip_prefix("probe-")
            .ok_or_else(|| format!("program name {file_name:?} does not start with `probe-`"))?;
        Action::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| format!("unknown action `{name}`"))
    }
}

/// The device's command line, as the broker passes it.
struct Args {
    program: PathBuf,
    listen_fd: RawFd,
    ipc_fd: RawFd,
    broker_pid: Option<i32>,
    seccomp: SeccompMode,
}

fn parse_args(mut argv: impl Iterator<Item = std::ffi::OsString>) -> Result<Args, String> {
    let program = PathBuf::from(argv.next().ok_or("no argv[0]")?);
    let mut args = Args {
        program,
        listen_fd: 3,
        ipc_fd: 4,
        broker_pid: None,
        seccomp: SeccompMode::Kill,
    };
    while let Some(a) = argv.next() {
        let mut num = |what: &str| -> Result<i32, String> {
            argv.next()
                .and_then(|v| v.to_str().and_then(|s| s.parse().ok()))
                .filter(|v: &i32| *v >= 0)
                .ok_or_else(|| format!("{what} needs a number"))
        };
        match a.to_str().unwrap_or("") {
            "--listen-fd" => args.listen_fd = num("--listen-fd")?,
            "--ipc-fd" => args.ipc_fd = num("--ipc-fd")?,
            "--broker-pid" => args.broker_pid = Some(num("--broker-pid")?),
            "--seccomp" => {
                args.seccomp = match argv.next().as_deref().and_then(OsStr::to_str) {
                    Some("kill") => SeccompMode::Kill,
                    Some("log") => SeccompMode::Log,
                    _ => return Err("--seccomp needs `kill` or `log`".into()),
                }
            }
            "--insecure-no-sandbox" => {
                return Err(
                    "the probe always enters the sandbox; do not pass --insecure-no-sandbox".into(),
                )
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

/// Everything an attempt needs, prepared before the sandbox.
struct Prepared {
    passwd: CString,
    created: CString,
    socket_path: libc::sockaddr_un,
    true_path: CString,
    broker_pid: i32,
    victim_pid: i32,
}

fn cstring(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| format!("{} contains a NUL", p.display()))
}

fn sockaddr(p: &Path) -> Result<libc::sockaddr_un, String> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = p.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(format!(
            "{} is too long for a Unix socket address",
            p.display()
        ));
    }
    for (slot, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *slot = b as libc::c_char;
    }
    Ok(addr)
}

fn prepare(action: Action, args: &Args) -> Result<Prepared, String> {
    let dir = args
        .program
        .parent()
        .filter(|d| d.is_absolute())
        .ok_or_else(|| {
            format!(
                "argv[0] {} is not an absolute path; start the probe with an absolute --device-path",
                args.program.display()
            )
        })?;
    let victim_pid = if action == Action::KillVictim {
        let f = dir.join(VICTIM_PID_FILE);
        std::fs::read_to_string(&f)
            .map_err(|e| format!("cannot read {}: {e}", f.display()))?
            .trim()
            .parse()
            .map_err(|e| format!("{} does not hold a pid: {e}", f.display()))?
    } else {
        0
    };
    let socket_path = sockaddr(&dir.join(UNIX_SOCKET))?;
    if action == Action::ConnectHeld {
        // SAFETY: plain system calls on integers; the new descriptor replaces
        // the listener on fd 3 (this probe serves no VM), so the sandbox
        // keeps it like the device keeps its listener.
        unsafe {
            let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            if s < 0 || libc::dup2(s, args.listen_fd) < 0 || libc::close(s) < 0 {
                return Err(format!(
                    "cannot create the held socket: {}",
                    std::io::Error::last_os_error()
                ));
            }
        }
    }
    Ok(Prepared {
        passwd: cstring(Path::new("/etc/passwd"))?,
        created: cstring(&dir.join(CREATED_FILE))?,
        socket_path,
        true_path: cstring(Path::new("/bin/true"))?,
        broker_pid: args.broker_pid.unwrap_or(0),
        victim_pid,
    })
}

fn describe(action: Action, p: &Prepared) -> String {
    match action {
        Action::OpenPasswd => "openat(/etc/passwd, O_RDONLY)".into(),
        Action::CreateFile => format!("openat({:?}, O_WRONLY|O_CREAT|O_EXCL)", p.created),
        Action::SocketUnix => "socket(AF_UNIX, SOCK_STREAM)".into(),
        Action::SocketInet => "socket(AF_INET, SOCK_STREAM)".into(),
        Action::ConnectUnix => format!("socket(AF_UNIX) + connect to {UNIX_SOCKET}"),
        Action::ConnectHeld => {
            format!("connect(fd 3, {UNIX_SOCKET}) on a socket made before the sandbox")
        }
        Action::ExecTrue => "execve(/bin/true)".into(),
        Action::PtraceBroker => format!("ptrace(PTRACE_ATTACH, {})", p.broker_pid),
        Action::KillVictim => format!("kill({}, SIGTERM)", p.victim_pid),
    }
}

/// The attempt: the raw call's return value, or the errno it failed with.
fn attempt(action: Action, p: &Prepared, listen_fd: RawFd) -> Result<i64, i32> {
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let addr_len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    let addr = std::ptr::addr_of!(p.socket_path).cast::<libc::sockaddr>();
    // SAFETY: each call gets valid NUL-terminated strings, a valid socket
    // address of the stated length, and null-terminated argv/envp arrays;
    // none of them writes to memory of ours.
    let rc: i64 = unsafe {
        match action {
            Action::OpenPasswd => libc::openat(
                libc::AT_FDCWD,
                p.passwd.as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
            .into(),
            Action::CreateFile => libc::openat(
                libc::AT_FDCWD,
                p.created.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC,
                0o644 as libc::c_uint,
            )
            .into(),
            Action::SocketUnix => {
                libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0).into()
            }
            Action::SocketInet => {
                libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0).into()
            }
            Action::ConnectUnix => {
                let s = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                if s < 0 {
                    return Err(errno());
                }
                libc::connect(s, addr, addr_len).into()
            }
            Action::ConnectHeld => libc::connect(listen_fd, addr, addr_len).into(),
            Action::ExecTrue => {
                let argv = [p.true_path.as_ptr(), std::ptr::null()];
                let envp = [std::ptr::null()];
                libc::execve(p.true_path.as_ptr(), argv.as_ptr(), envp.as_ptr()).into()
            }
            Action::PtraceBroker => libc::ptrace(
                libc::PTRACE_ATTACH,
                p.broker_pid,
                std::ptr::null_mut::<libc::c_void>(),
                std::ptr::null_mut::<libc::c_void>(),
            ),
            Action::KillVictim => libc::kill(p.victim_pid, libc::SIGTERM).into(),
        }
    };
    if rc < 0 {
        Err(errno())
    } else {
        Ok(rc)
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vsnd-sandbox-probe: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let file_name = args
        .program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let action = match Action::from_program_name(&file_name) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vsnd-sandbox-probe: {e}; link the probe as probe-<action>");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let prepared = match prepare(action, &args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vsnd-sandbox-probe: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let what = describe(action, &prepared);

    // Exactly the device's sandbox, in the device's order.
    let report = match sandbox::restrict(&[args.listen_fd, args.ipc_fd], args.broker_pid) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vsnd-sandbox-probe: cannot enter the sandbox: {e}");
            return ExitCode::from(EXIT_NO_SANDBOX);
        }
    };
    eprintln!(
        "vsnd-sandbox-probe: sandbox: {}; {} bounding-set entries kept",
        report.landlock, report.bounding_left
    );
    if let Err(e) = sandbox::apply_seccomp(args.seccomp) {
        eprintln!("vsnd-sandbox-probe: cannot apply the seccomp profile: {e}");
        return ExitCode::from(EXIT_NO_SANDBOX);
    }
    let mode = match args.seccomp {
        SeccompMode::Kill => "kill",
        SeccompMode::Log => "log",
    };
    let name = action.name();
    eprintln!("PROBE {name}: sandboxed (seccomp {mode}); attempting {what}");
    match attempt(action, &prepared, args.listen_fd) {
        Ok(v) => eprintln!("PROBE {name}: returned {v}"),
        Err(e) => eprintln!(
            "PROBE {name}: failed with errno {e} ({:?})",
            nix::errno::Errno::from_raw(e)
        ),
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_come_from_the_program_name() {
        for a in Action::ALL {
            assert_eq!(
                Action::from_program_name(&format!("probe-{}", a.name())),
                Ok(a)
            );
        }
        assert!(Action::from_program_name("probe-nothing").is_err());
        assert!(Action::from_program_name("vsnd-device").is_err());
    }
}
