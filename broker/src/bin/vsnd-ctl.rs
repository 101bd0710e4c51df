//! vsnd-ctl: query and change vsnd-broker's output and input flags through
//! its control socket.
//!
//! Exit status: 0 done; 1 the broker refused the request (`ERR …`); 2 bad
//! usage; 3 the broker could not be reached or closed the connection; 4 the
//! broker does not let this user in (`ERR permission denied`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use vsnd_broker::ctl_cli::{Cli, Command, EXIT_DENIED, EXIT_REFUSED, EXIT_UNREACHABLE};

/// How long to wait for an answer to QUERY or SET.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stream = match UnixStream::connect(&cli.socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "vsnd-ctl: cannot connect to {}: {e} (is vsnd-broker running with --control-socket {}?)",
                cli.socket.display(),
                cli.socket.display()
            );
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    let request = cli.command.request();
    let subscribe = matches!(cli.command, Command::Subscribe);
    if !subscribe {
        let _ = stream.set_read_timeout(Some(ANSWER_TIMEOUT));
    }
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("vsnd-ctl: {e}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    };
    // The broker may have refused us before reading a word (`ERR
    // permission denied`, `ERR too many clients`) and closed the
    // connection, so that sending fails: its reason is still there to read.
    let send_error = writer.write_all(format!("{request}\n").as_bytes()).err();
    let mut lines = BufReader::new(stream).lines();
    loop {
        let line = match (lines.next(), &send_error) {
            (Some(Ok(l)), _) => l,
            (_, Some(e)) => {
                eprintln!("vsnd-ctl: cannot send the request: {e}");
                return ExitCode::from(EXIT_UNREACHABLE);
            }
            (Some(Err(e)), None) => {
                eprintln!("vsnd-ctl: no answer from the broker: {e}");
                return ExitCode::from(EXIT_UNREACHABLE);
            }
            (None, None) => {
                if subscribe {
                    eprintln!("vsnd-ctl: the broker closed the connection");
                } else {
                    eprintln!("vsnd-ctl: the broker closed the connection without answering");
                }
                return ExitCode::from(EXIT_UNREACHABLE);
            }
        };
        if let Some(state) = line
            .strip_prefix("OK ")
            .or_else(|| line.strip_prefix("EVENT "))
        {
            println!("{state}");
            let _ = std::io::stdout().flush();
            if !subscribe {
                return ExitCode::SUCCESS;
            }
        } else if let Some(why) = line.strip_prefix("ERR ") {
            eprintln!("vsnd-ctl: the broker refused: {why}");
            return ExitCode::from(if why == "permission denied" {
                EXIT_DENIED
            } else {
                EXIT_REFUSED
            });
        } else {
            eprintln!("vsnd-ctl: unexpected answer {line:?}");
            return ExitCode::from(EXIT_UNREACHABLE);
        }
    }
}
