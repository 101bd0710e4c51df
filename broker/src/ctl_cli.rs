//! The command line of `vsnd-ctl` (the program is `src/bin/vsnd-ctl.rs`),
//! here in the library so that the man page and shell completions are
//! generated from the very definition the program parses.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Exit status: the broker refused the request (`ERR …`).
pub const EXIT_REFUSED: u8 = 1;
/// Exit status: bad usage (clap's own).
pub const EXIT_USAGE: u8 = 2;
/// Exit status: the broker could not be reached or closed the connection.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Exit status: the broker does not let this user in.
pub const EXIT_DENIED: u8 = 4;

/// Query and change vsnd-broker's output and input flags
///
/// Query and change vsnd-broker's enable flags (output: the guest's
/// playback reaches the host; input: the host microphone reaches the guest)
/// through its control socket.
#[derive(Debug, Parser)]
#[command(name = "vsnd-ctl", version)]
pub struct Cli {
    /// The broker's control socket (its --control-socket).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The requests.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the flags: `output=on input=off`.
    Query,
    /// Turn a direction on or off, and print the flags after the change.
    Set {
        /// `output` or `input`.
        direction: DirectionArg,
        /// `on` or `off`.
        value: OnOff,
    },
    /// Print the flags, then one line on every change, until interrupted.
    Subscribe,
}

/// A direction.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DirectionArg {
    /// The guest's playback.
    Output,
    /// The host microphone.
    Input,
}

/// A flag's value.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OnOff {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

impl Command {
    /// The control protocol's request line (without its newline).
    pub fn request(&self) -> String {
        match self {
            Command::Query => "QUERY".to_string(),
            Command::Subscribe => "SUBSCRIBE".to_string(),
            Command::Set { direction, value } => format!(
                "SET {} {}",
                match direction {
                    DirectionArg::Output => "output",
                    DirectionArg::Input => "input",
                },
                match value {
                    OnOff::On => "on",
                    OnOff::Off => "off",
                }
            ),
        }
    }
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
    fn requests() {
        let c = Cli::try_parse_from(["vsnd-ctl", "--socket", "/c", "set", "input", "on"]).unwrap();
        assert_eq!(c.command.request(), "SET input on");
        let c = Cli::try_parse_from(["vsnd-ctl", "--socket", "/c", "query"]).unwrap();
        assert_eq!(c.command.request(), "QUERY");
    }
}
