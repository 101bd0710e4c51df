//! The command line of vsnd-broker: drop-in for vhost-device-sound users
//! (`--socket`, `--socket-fd`, `--backend`, `--streams`), plus vsnd's own.
//! Every option except the `--insecure-*` ones can also be set in a
//! `--config` file (see [`crate::config`]); the command line wins.

use std::path::PathBuf;

use clap::{ArgGroup, Parser, ValueEnum};
use serde::Deserialize;

/// vsnd-broker's exit status for bad arguments, a bad config file or an
/// environment that cannot work (nothing was started).
pub const EXIT_USAGE: u8 = 2;
/// vsnd-broker's exit status for a fatal error at run time.
pub const EXIT_FATAL: u8 = 1;

/// Host audio backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// No host audio: playback is discarded and capture is silence, both at
    /// the real-time rate.
    Null,
    /// Playback appended to --playback-file, capture read from
    /// --capture-file (raw PCM in the guest's format), at the real-time rate.
    File,
    /// ALSA PCMs (--alsa-playback-device, --alsa-capture-device).
    Alsa,
    /// A PipeWire daemon (the user's session, or --pipewire-remote).
    Pipewire,
}

/// vsnd-broker: a vhost-user virtio-sound device for VMs, split so that the
/// process parsing guest requests never holds the host audio connection and
/// never decides whether the microphone is on.
#[derive(Debug, Parser)]
#[command(name = "vsnd-broker", version, about, long_about = None)]
#[command(
    override_usage = "vsnd-broker [--socket PATH | --socket-fd FD] [--config FILE] [OPTIONS]"
)]
// Not `required`: the listener may also come from --config or from socket
// activation (LISTEN_FDS); main checks that there is one.
#[command(group(ArgGroup::new("listener").args(["socket", "socket_fd"])))]
pub struct Cli {
    /// Read settings from this TOML file (keys are the long option names,
    /// e.g. `initial-streams = "output"`); options given on the command line
    /// override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Path of the vhost-user socket to create and listen on (for QEMU's
    /// `-chardev socket,path=PATH`). Without --socket and --socket-fd the
    /// broker uses the socket a service manager passed (LISTEN_FDS).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// An already listening Unix socket inherited from the parent (e.g.
    /// systemd socket activation), instead of --socket.
    #[arg(long, value_name = "FD")]
    pub socket_fd: Option<i32>,

    /// Host audio backend.
    #[arg(long, value_enum, default_value = "null")]
    pub backend: BackendKind,

    /// Which directions are enabled at start: a comma-separated list of
    /// `output` and `input`, or `none`. The microphone (input) is off unless
    /// listed here. `--streams` is an alias (as in vhost-device-sound).
    #[arg(
        long,
        visible_alias = "streams",
        value_name = "LIST",
        default_value = "output"
    )]
    pub initial_streams: String,

    /// File backend: append everything the guest plays to this file (raw
    /// PCM in the guest's format; a WAV file, rewritten at start, if the
    /// name ends in `.wav`).
    #[arg(long, value_name = "PATH")]
    pub playback_file: Option<PathBuf>,

    /// File backend: the guest records the bytes of this file, as raw PCM in
    /// the format it asked for, looping at the end.
    #[arg(long, value_name = "PATH")]
    pub capture_file: Option<PathBuf>,

    /// PipeWire backend: the daemon to connect to (its remote name, e.g.
    /// `pipewire-0`); default: the usual one of this user's session.
    #[arg(long, value_name = "NAME")]
    pub pipewire_remote: Option<String>,

    /// The name mixers show for this VM's streams (default: the vhost-user
    /// socket's file name without extension).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,

    /// ALSA backend: the playback PCM.
    #[arg(long, value_name = "PCM", default_value = "default")]
    pub alsa_playback_device: String,

    /// ALSA backend: the capture PCM, opened only while input is on and the
    /// guest records.
    #[arg(long, value_name = "PCM", default_value = "default")]
    pub alsa_capture_device: String,

    /// The vsnd-device executable (default: `vsnd-device` next to this
    /// program).
    #[arg(long, value_name = "PATH")]
    pub device_path: Option<PathBuf>,

    /// Create a control socket at PATH (mode 0600) for QUERY, SET and
    /// SUBSCRIBE requests (see vsnd-ctl).
    #[arg(long, value_name = "PATH")]
    pub control_socket: Option<PathBuf>,

    /// Also let this uid use the control socket (besides root and the
    /// broker's own uid); repeatable. The socket file's mode is 0600, so the
    /// uid also needs a way to reach it (e.g. a group-owned directory, or
    /// pass the socket with a service manager). Needs --control-socket.
    #[arg(long, value_name = "UID")]
    pub control_allow_uid: Vec<u32>,

    /// Append every change of the enable flags to FILE (one line each,
    /// flushed), besides the log.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,

    /// When the broker runs as root: the user vsnd-device runs as (its
    /// primary group too). Ignored otherwise: the device then runs as the
    /// broker's own user, and the broker makes itself non-dumpable.
    #[arg(long, value_name = "USER", default_value = "nobody")]
    pub device_user: String,

    /// What the device's seccomp filter does with a system call outside
    /// policy/seccomp: `kill` the device, or `log` it and let it run (for
    /// diagnosing a profile; the kernel logs each call).
    #[arg(long, value_enum, default_value = "kill")]
    pub seccomp: SeccompMode,

    /// Debugging only: run the device without its sandbox (no seccomp,
    /// landlock, capability drop or rlimits). A loud warning is logged on
    /// every device start.
    #[arg(long)]
    pub insecure_no_sandbox: bool,

    /// Measurement only, never for production (hidden from --help): the
    /// broker consumes playback and answers capture as fast as the device
    /// sends them, without real-time pacing, so `vsnd-bench compare` can
    /// measure the pipeline's sustained throughput. A guest served this way
    /// plays and records at the wrong speed. A command-line flag only, on
    /// purpose: no configuration file can turn it on.
    #[arg(long, hide = true)]
    pub unpaced_for_benchmark: bool,
}

/// The device's seccomp mismatch action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SeccompMode {
    /// Kill the device (after it names the call on stderr).
    Kill,
    /// Allow the call and let the kernel log it.
    Log,
}

impl SeccompMode {
    /// The device's spelling.
    pub fn arg(self) -> &'static str {
        match self {
            SeccompMode::Kill => "kill",
            SeccompMode::Log => "log",
        }
    }
}

/// Parse `--initial-streams`: returns (output, input).
pub fn parse_streams(list: &str) -> Result<(bool, bool), String> {
    let (mut output, mut input) = (false, false);
    for item in list.split(',').map(str::trim) {
        match item {
            "output" => output = true,
            "input" => input = true,
            "none" | "" => {}
            other => {
                return Err(format!(
                    "unknown stream {other:?} in {list:?}: use `output`, `input`, `output,input` or `none`"
                ))
            }
        }
    }
    Ok((output, input))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn streams() {
        assert_eq!(parse_streams("output"), Ok((true, false)));
        assert_eq!(parse_streams("output,input"), Ok((true, true)));
        assert_eq!(parse_streams("input"), Ok((false, true)));
        assert_eq!(parse_streams("none"), Ok((false, false)));
        assert!(parse_streams("mic").is_err());
    }

    #[test]
    fn streams_alias_and_default() {
        let c = Cli::try_parse_from(["vsnd-broker", "--socket", "/x"]).unwrap();
        assert_eq!(c.initial_streams, "output");
        let c =
            Cli::try_parse_from(["vsnd-broker", "--socket", "/x", "--streams", "input"]).unwrap();
        assert_eq!(c.initial_streams, "input");
        // No listener on the command line is for main to judge (the config
        // file or socket activation may provide one); two is always wrong.
        assert!(Cli::try_parse_from(["vsnd-broker"]).is_ok());
        assert!(
            Cli::try_parse_from(["vsnd-broker", "--socket", "/x", "--socket-fd", "3"]).is_err()
        );
    }
}
