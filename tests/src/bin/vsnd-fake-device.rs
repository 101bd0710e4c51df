//! vsnd-fake-device: a stand-in for `vsnd-device` that speaks (or breaks)
//! the device⇄broker protocol on purpose, so that tests can watch how the
//! real `vsnd-broker` copes. It is the seed of the rogue-device suite.
//!
//! The broker starts its device with a fixed command line (`--listen-fd 3
//! --ipc-fd 4`, plus sandbox options the fake ignores) and an environment
//! emptied of everything but `RUST_LOG`, so the only thing a test controls
//! is the *program name*: the test symlinks (or copies) this binary as
//! `fake-<mode>` (or `vsnd-fake-device-<mode>`) and passes that path as
//! `--device-path`. The mode is taken from the file name in `argv[0]`:
//!
//! | file name           | behaviour |
//! |---------------------|-----------|
//! | `fake-idle`         | a well-behaved device that never gets a frontend: hello, then wait |
//! | `fake-spy`          | like `idle`, but first appends its pid to `<argv[0]>.started` (the directory must be writable by the device's user), so a test can tell whether the broker started a device at all |
//! | `fake-version[-N]`  | says hello with protocol version `N` (default 999), then waits |
//! | `fake-garbage`      | proper hello exchange, then an undecodable frame, then waits |
//! | `fake-exit-early`   | exits at once with status [`EXIT_EARLY_STATUS`] |
//!
//! "Waits" means: blocks until the broker closes the channel (then exits 0)
//! or kills it. Like the real device it asks for SIGKILL when the broker
//! dies, so it never outlives its supervisor. It logs to stderr (which ends
//! up in the broker's log) with a `vsnd-fake-device[<mode>]:` prefix.

use std::ffi::OsString;
use std::io::Write as _;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use vsnd_ipc::{BrokerMsg, Channel, ChannelError, DeviceMsg, MAGIC, PROTOCOL_VERSION};

/// Exit status of the `exit-early` mode.
const EXIT_EARLY_STATUS: u8 = 7;

/// Protocol version the `version` mode claims when the name gives none.
const DEFAULT_WRONG_VERSION: u32 = 999;

/// A frame no `DeviceMsg` decodes from: variant index 200 does not exist.
const GARBAGE_FRAME: &[u8] = &[200, 0xff, 0xff, 0xff];

/// Exit status for a bad command line or program name.
const EXIT_USAGE: u8 = 2;

/// What this fake device does, chosen by its program name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Hello, then wait.
    Idle,
    /// Record that it was started, then behave like [`Mode::Idle`].
    Spy,
    /// Hello with this protocol version, then wait.
    Version(u32),
    /// Hello exchange, then one undecodable frame, then wait.
    Garbage,
    /// Exit at once with [`EXIT_EARLY_STATUS`].
    ExitEarly,
}

impl Mode {
    /// The mode named by a program file name such as `fake-version-42`.
    fn from_program_name(file_name: &str) -> Result<Mode, String> {
        let name = file_name
            .strip_prefix("vsnd-fake-device-")
            .or_else(|| file_name.strip_prefix("fake-"))
            .ok_or_else(|| format!("program name {file_name:?} does not start with `fake-`"))?;
        match name {
            "idle" => Ok(Mode::Idle),
            "spy" => Ok(Mode::Spy),
            "version" => Ok(Mode::Version(DEFAULT_WRONG_VERSION)),
            "garbage" => Ok(Mode::Garbage),
            "exit-early" => Ok(Mode::ExitEarly),
            other => match other.strip_prefix("version-") {
                Some(v) => v.parse().map(Mode::Version).map_err(|_| {
                    format!("`{v}` in {file_name:?} is not a protocol version number")
                }),
                None => Err(format!("unknown mode `{other}`")),
            },
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Idle => "idle",
            Mode::Spy => "spy",
            Mode::Version(_) => "version",
            Mode::Garbage => "garbage",
            Mode::ExitEarly => "exit-early",
        }
    }
}

/// What the fake needs from the command line the broker gives every device.
struct Args {
    program: PathBuf,
    ipc_fd: RawFd,
}

/// Take `argv[0]` and `--ipc-fd N` (default 4). Everything else the broker
/// passes (`--listen-fd 3`, sandbox options, …) is ignored, so the fake keeps
/// working as the real device's command line grows.
fn parse_args(mut argv: impl Iterator<Item = OsString>) -> Result<Args, String> {
    let program = PathBuf::from(argv.next().ok_or("no argv[0]")?);
    let mut ipc_fd = 4;
    while let Some(a) = argv.next() {
        if a == "--ipc-fd" {
            ipc_fd = argv
                .next()
                .and_then(|v| v.to_str().and_then(|s| s.parse().ok()))
                .filter(|v: &RawFd| *v >= 0)
                .ok_or("--ipc-fd needs a file descriptor number")?;
        }
    }
    Ok(Args { program, ipc_fd })
}

const USAGE: &str = "vsnd-fake-device is a test double started by vsnd-broker as \
    `fake-<mode> --listen-fd 3 --ipc-fd 4 ...`; symlink it as fake-idle, fake-spy, \
    fake-version[-N], fake-garbage or fake-exit-early";

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vsnd-fake-device: {e}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let file_name = args
        .program
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mode = match Mode::from_program_name(&file_name) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("vsnd-fake-device: {e}\n{USAGE}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let log = |msg: &str| eprintln!("vsnd-fake-device[{}]: {msg}", mode.name());
    match run(mode, &args, log) {
        Ok(code) => code,
        Err(e) => {
            log(&e);
            ExitCode::FAILURE
        }
    }
}

fn run(mode: Mode, args: &Args, log: impl Fn(&str)) -> Result<ExitCode, String> {
    let mut ch = match mode {
        Mode::ExitEarly => {
            log(&format!("exiting at once with status {EXIT_EARLY_STATUS}"));
            return Ok(ExitCode::from(EXIT_EARLY_STATUS));
        }
        Mode::Spy => {
            record_start(&args.program).map_err(|e| format!("cannot record the start: {e}"))?;
            take_channel(args)?
        }
        Mode::Idle | Mode::Version(_) | Mode::Garbage => take_channel(args)?,
    };
    match mode {
        Mode::Version(v) => {
            send(
                &ch,
                &DeviceMsg::Hello {
                    magic: MAGIC,
                    version: v,
                },
            )?;
            log(&format!("claimed protocol version {v}"));
        }
        Mode::Garbage => {
            hello(&mut ch, PROTOCOL_VERSION)?;
            ch.send_frame(GARBAGE_FRAME)
                .map_err(|e| format!("cannot send garbage: {e}"))?;
            log(&format!("sent an undecodable frame {GARBAGE_FRAME:02x?}"));
        }
        Mode::Idle | Mode::Spy | Mode::ExitEarly => hello(&mut ch, PROTOCOL_VERSION)?,
    }
    wait_for_close(&mut ch)?;
    log("the broker closed the channel; exiting");
    Ok(ExitCode::SUCCESS)
}

/// Like the real device: never outlive the broker, then take the channel.
fn take_channel(args: &Args) -> Result<Channel, String> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(|e| format!("cannot set the parent-death signal: {e}"))?;
    // SAFETY: the broker hands us this descriptor open; nothing else in this
    // process refers to it, and it is taken only once.
    let ipc = unsafe { OwnedFd::from_raw_fd(args.ipc_fd) };
    Ok(Channel::new(ipc))
}

fn send(ch: &Channel, msg: &DeviceMsg) -> Result<(), String> {
    ch.send(msg)
        .map_err(|e| format!("cannot send {msg:?}: {e}"))
}

/// Say hello with `version` and read the broker's answer.
fn hello(ch: &mut Channel, version: u32) -> Result<(), String> {
    send(
        ch,
        &DeviceMsg::Hello {
            magic: MAGIC,
            version,
        },
    )?;
    match ch.recv::<BrokerMsg>() {
        Ok(BrokerMsg::Hello { .. }) => Ok(()),
        Ok(other) => Err(format!("expected the broker's hello, got {other:?}")),
        Err(e) => Err(format!("no hello from the broker: {e}")),
    }
}

/// Block, ignoring whatever the broker sends, until it closes the channel.
fn wait_for_close(ch: &mut Channel) -> Result<(), String> {
    loop {
        match ch.recv::<BrokerMsg>() {
            Ok(_) | Err(ChannelError::Codec(_)) => {}
            Err(ChannelError::Closed) => return Ok(()),
            Err(e) => return Err(format!("channel error: {e}")),
        }
    }
}

/// Append this process's pid to `<program>.started`.
fn record_start(program: &Path) -> std::io::Result<()> {
    let mut marker = program.as_os_str().to_owned();
    marker.push(".started");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(marker)?;
    writeln!(f, "{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_come_from_the_program_name() {
        assert_eq!(Mode::from_program_name("fake-idle"), Ok(Mode::Idle));
        assert_eq!(Mode::from_program_name("fake-spy"), Ok(Mode::Spy));
        assert_eq!(
            Mode::from_program_name("fake-version"),
            Ok(Mode::Version(DEFAULT_WRONG_VERSION))
        );
        assert_eq!(
            Mode::from_program_name("fake-version-42"),
            Ok(Mode::Version(42))
        );
        assert_eq!(
            Mode::from_program_name("vsnd-fake-device-garbage"),
            Ok(Mode::Garbage)
        );
        assert_eq!(
            Mode::from_program_name("fake-exit-early"),
            Ok(Mode::ExitEarly)
        );
        assert!(Mode::from_program_name("vsnd-fake-device").is_err());
        assert!(Mode::from_program_name("fake-version-x").is_err());
        assert!(Mode::from_program_name("vsnd-device").is_err());
    }
}
