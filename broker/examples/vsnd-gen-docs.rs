//! Man pages and shell completions for vsnd-broker and vsnd-ctl, generated
//! from the clap definitions the programs parse (`vsnd_broker::cli::Cli`,
//! `vsnd_broker::ctl_cli::Cli`), so that they cannot drift from `--help`.
//!
//! ```sh
//! cargo run -p vsnd-broker --example vsnd-gen-docs -- OUTDIR
//! ```
//!
//! writes exactly [`OUTPUTS`] under OUTDIR (directories are created) and
//! prints each path. broker/tests/docs.rs runs [`generate`] and checks the
//! result against the programs' `--help`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;
use clap_mangen::roff::{bold, italic, roman, Inline, Roff};
use clap_mangen::Man;

/// Every file written, relative to OUTDIR.
pub const OUTPUTS: [&str; 8] = [
    "man/vsnd-broker.1",
    "man/vsnd-ctl.1",
    "completions/bash/vsnd-broker",
    "completions/bash/vsnd-ctl",
    "completions/zsh/_vsnd-broker",
    "completions/zsh/_vsnd-ctl",
    "completions/fish/vsnd-broker.fish",
    "completions/fish/vsnd-ctl.fish",
];

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(out), None) = (args.next(), args.next()) else {
        eprintln!("usage: cargo run -p vsnd-broker --example vsnd-gen-docs -- OUTDIR");
        return ExitCode::from(2);
    };
    match generate(Path::new(&out)) {
        Ok(paths) => {
            for p in paths {
                println!("{}", p.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("vsnd-gen-docs: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Write the man pages and completions under `out`; returns the paths
/// written (those of [`OUTPUTS`]).
pub fn generate(out: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let mut write = |rel: &str, bytes: Vec<u8>| -> io::Result<()> {
        let path = out.join(rel);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(&path, bytes)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        written.push(path);
        Ok(())
    };
    write("man/vsnd-broker.1", one_preamble(broker_man()?))?;
    write("man/vsnd-ctl.1", one_preamble(ctl_man()?))?;
    for (name, cmd) in [
        ("vsnd-broker", vsnd_broker::cli::Cli::command()),
        ("vsnd-ctl", vsnd_broker::ctl_cli::Cli::command()),
    ] {
        for (shell, rel) in [
            (Shell::Bash, format!("completions/bash/{name}")),
            (Shell::Zsh, format!("completions/zsh/_{name}")),
            (Shell::Fish, format!("completions/fish/{name}.fish")),
        ] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut visible_only(&cmd), name, &mut buf);
            write(&rel, buf)?;
        }
    }
    debug_assert!(
        written.len() == OUTPUTS.len()
            && OUTPUTS
                .iter()
                .all(|o| written.iter().any(|w| w.ends_with(o)))
    );
    Ok(written)
}

/// `cmd` without its hidden options (clap_complete would offer them):
/// a measurement-only or debugging flag stays out of the user's way.
fn visible_only(cmd: &clap::Command) -> clap::Command {
    let hidden: Vec<&clap::Id> = cmd
        .get_arguments()
        .filter(|a| a.is_hide_set())
        .map(|a| a.get_id())
        .collect();
    // clap takes 'static names; this program runs once and exits.
    let leak = |s: &str| -> &'static str { Box::leak(s.to_string().into_boxed_str()) };
    let mut out = clap::Command::new(leak(cmd.get_name()))
        .args(cmd.get_arguments().filter(|a| !a.is_hide_set()).cloned());
    if let Some(v) = cmd.get_version() {
        out = out.version(leak(v));
    }
    if let Some(a) = cmd.get_about() {
        out = out.about(a.clone());
    }
    for g in cmd.get_groups() {
        let mut g = g.clone();
        let args: Vec<clap::Id> = g
            .get_args()
            .filter(|id| !hidden.contains(id))
            .cloned()
            .collect();
        let group = clap::ArgGroup::new(g.get_id().clone())
            .args(args)
            .multiple(g.is_multiple())
            .required(g.is_required_set());
        out = out.group(group);
    }
    for sub in cmd.get_subcommands() {
        out = out.subcommand(visible_only(sub));
    }
    out
}

/// A paragraph of a hand-written section.
enum Para {
    /// Plain text.
    Text(&'static str),
    /// A tagged paragraph: the tag in bold, then the text.
    Item(&'static str, &'static str),
}
use Para::{Item, Text};

/// Append a section of hand-written paragraphs.
fn section(roff: &mut Roff, title: &str, paras: &[Para]) {
    roff.control("SH", [title]);
    for p in paras {
        match p {
            Text(t) => {
                roff.control("PP", []).text([roman(*t)]);
            }
            Item(tag, t) => {
                roff.control("TP", []).text([bold(*tag)]).text([roman(*t)]);
            }
        }
    }
}

/// The title, NAME and SYNOPSIS clap_mangen makes from the definition.
fn head(man: &Man, out: &mut Vec<u8>) -> io::Result<()> {
    man.render_title(out)?;
    man.render_name_section(out)?;
    man.render_synopsis_section(out)
}

fn man_for(cmd: clap::Command) -> Man {
    Man::new(cmd).date(man_date()).manual("vsnd manual")
}

/// The page's date: `$SOURCE_DATE_EPOCH`'s (reproducible builds), else
/// today's, as YYYY-MM-DD.
fn man_date() -> String {
    let secs = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
        });
    // Days since 1970-01-01 to a civil date (proleptic Gregorian).
    let z = i64::try_from(secs / 86_400).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// roff's apostrophe preamble, which every clap_mangen and roff rendering
/// starts with; one at the top of the page is enough.
const PREAMBLE: &str = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n";

fn one_preamble(page: Vec<u8>) -> Vec<u8> {
    let text = String::from_utf8_lossy(&page).into_owned();
    match text.split_once(PREAMBLE) {
        Some((before, after)) => {
            format!("{PREAMBLE}{before}{}", after.replace(PREAMBLE, "")).into_bytes()
        }
        None => page,
    }
}

fn broker_man() -> io::Result<Vec<u8>> {
    let man = man_for(vsnd_broker::cli::Cli::command());
    let mut out = Vec::new();
    head(&man, &mut out)?;
    let mut r = Roff::new();
    section(
        &mut r,
        "DESCRIPTION",
        &[
            Text(
                "vsnd-broker is a vhost-user virtio-sound device for virtual machines \
                 (QEMU's vhost-user-snd-pci). It listens on a vhost-user socket, starts \
                 the unprivileged, sandboxed vsnd-device for each VM connection, and \
                 holds what the device must never hold: the host audio backend (null, \
                 file, ALSA or PipeWire) and the two enable flags, output (the guest's \
                 playback reaches the host) and input (the host microphone reaches the \
                 guest).",
            ),
            Text(
                "The flags start as --initial-streams says (output only, by default) and \
                 change only through the control socket (--control-socket), for example \
                 with vsnd-ctl(1). Every change is logged as an audit line, and appended \
                 to --audit-log when given. While input is off the guest records \
                 silence, paced in real time, and the host capture source is not \
                 opened.",
            ),
            Text(
                "If the device crashes or breaks the protocol, the broker logs why and \
                 starts a new one after a delay growing from 0.1 s to 5 s; the socket \
                 stays open and the VM can reconnect. One broker serves one VM.",
            ),
        ],
    );
    r.to_writer(&mut out)?;
    man.render_options_section(&mut out)?;
    let mut r = Roff::new();
    section(
        &mut r,
        "CONFIGURATION FILE",
        &[
            Text(
                "--config FILE reads settings from a TOML file. Its keys are the long \
                 option names without the leading dashes, with the same values, e.g. \
                 initial-streams = \"output\", backend = \"alsa\", control-allow-uid = \
                 [1000]. An option given on the command line overrides the file's key (a \
                 list replaces the file's list; --socket or --socket-fd replaces both \
                 socket and socket-fd). Relative paths in the file are relative to the \
                 file's directory. Unknown keys are an error.",
            ),
            Text(
                "The --insecure-* options and --seccomp exist on the command line only: \
                 no file can turn the device's sandbox off or make its system-call filter \
                 permissive. device-path names the program started as the device: protect a \
                 file that sets it like the broker's binary.",
            ),
            Text(
                "A file that cannot be read or parsed stops the broker before it starts \
                 anything, with exit status 2 and a message naming the file, the line, \
                 the column and what is wrong.",
            ),
        ],
    );
    section(
        &mut r,
        "SOCKET ACTIVATION AND READINESS",
        &[
            Text(
                "Without --socket and --socket-fd, the broker serves the socket a service \
                 manager passed by the systemd convention: when LISTEN_PID is the \
                 broker's pid and LISTEN_FDS is 1, descriptor 3 must be a listening Unix \
                 stream socket. Such a socket also takes precedence over socket or \
                 socket-fd in a config file. Variables meant for another process \
                 (LISTEN_PID of another pid) are ignored, with a log line.",
            ),
            Text(
                "When NOTIFY_SOCKET is set, the broker sends READY=1 (with a STATUS= line) \
                 once a device has been started on the listener, a new STATUS= whenever a \
                 device starts, and STOPPING=1 on shutdown, so that a unit of \
                 Type=notify works.",
            ),
            Text(
                "The broker removes LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES and \
                 NOTIFY_SOCKET from its environment at start; the device, which starts \
                 with a clean environment anyway, never sees them.",
            ),
        ],
    );
    section(
        &mut r,
        "SECURITY",
        &[
            Text(
                "The promise: a guest that fully compromises vsnd-device still cannot \
                 hear the host microphone while input is off, and cannot turn it on. The \
                 device parses the guest's bytes inside its sandbox (a seccomp \
                 allow-list, landlock with no path allowed, no capabilities, \
                 no_new_privs, tight rlimits; as --device-user when the broker runs as \
                 root), and its protocol to the broker has no message that turns a \
                 direction on. The broker treats every message from the device as \
                 hostile.",
            ),
            Text(
                "Whoever can use the control socket decides whether the VM hears the \
                 host microphone: give it only to the tool that decides that. Keep \
                 --audit-log on a filesystem the VM's user cannot write.",
            ),
        ],
    );
    section(
        &mut r,
        "EXIT STATUS",
        &[
            Item(
                "0",
                "Stopped by SIGTERM or SIGINT: the device was stopped and the socket file \
                 removed.",
            ),
            Item(
                "1",
                "A fatal error at run time, such as a vsnd-device from another release \
                 (protocol version mismatch).",
            ),
            Item(
                "2",
                "Bad arguments, a bad config file, or an unusable socket, file, user or \
                 device path; reported before anything was started.",
            ),
        ],
    );
    section(
        &mut r,
        "ENVIRONMENT",
        &[
            Item(
                "RUST_LOG",
                "Log level (error, warn, info (the default), debug, trace), on stderr. \
                 Passed on to the device, whose lines are relayed as vsnd-device[PID]:.",
            ),
            Item(
                "LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES",
                "Socket activation, see above.",
            ),
            Item(
                "NOTIFY_SOCKET",
                "Readiness notification: an absolute path, or @name for an abstract \
                 socket, of a datagram socket.",
            ),
        ],
    );
    section(
        &mut r,
        "FILES",
        &[
            Item(
                "/etc/vsnd/VM.toml",
                "A config file, by convention one per VM (the packaged vsnd@.service \
                 passes /etc/vsnd/%i.toml when it exists). \
                 /etc/vsnd/vsnd.example.toml explains every key.",
            ),
            Item(
                "vsnd-device",
                "The device executable, next to vsnd-broker's own unless --device-path \
                 names another.",
            ),
            Item(
                "/usr/share/doc/vsnd/policy/",
                "The device's seccomp profiles (the filter it applies is embedded at \
                 build time from them) and a guide for auditors.",
            ),
        ],
    );
    see_also(
        &mut r,
        &[
            ("vsnd-ctl", "1"),
            ("systemd.socket", "5"),
            ("sd_notify", "3"),
        ],
    );
    r.to_writer(&mut out)?;
    man.render_version_section(&mut out)?;
    Ok(out)
}

fn ctl_man() -> io::Result<Vec<u8>> {
    let cmd = vsnd_broker::ctl_cli::Cli::command();
    let man = man_for(cmd.clone());
    let mut out = Vec::new();
    head(&man, &mut out)?;
    let mut r = Roff::new();
    section(
        &mut r,
        "DESCRIPTION",
        &[
            Text(
                "vsnd-ctl sends one request to the control socket of a running \
                 vsnd-broker(1) and prints the answer: the broker's two enable flags, \
                 output (the guest's playback reaches the host) and input (the host \
                 microphone reaches the guest), as output=on input=off.",
            ),
            Text(
                "The broker checks every peer (SO_PEERCRED): root, the broker's own user \
                 and each --control-allow-uid of the broker are served; anyone else gets \
                 ERR permission denied.",
            ),
        ],
    );
    r.to_writer(&mut out)?;
    man.render_options_section(&mut out)?;
    let mut r = Roff::new();
    commands(&mut r, &cmd);
    section(
        &mut r,
        "PROTOCOL",
        &[Text(
            "The control socket speaks plain text, one ASCII request per line: QUERY; \
             SET output|input on|off; SUBSCRIBE. The broker answers OK output=... \
             input=..., then (after SUBSCRIBE) EVENT output=... input=... on every \
             change, or ERR and a reason. socat - UNIX-CONNECT:PATH works as well.",
        )],
    );
    section(
        &mut r,
        "SECURITY",
        &[Text(
            "Whoever can use the control socket decides whether the VM hears the host \
             microphone; the guest and the sandboxed device cannot. Give the socket only \
             to the tool that decides about the microphone.",
        )],
    );
    section(
        &mut r,
        "EXIT STATUS",
        &[
            Item("0", "Done; the flags were printed."),
            Item("1", "The broker refused the request (ERR ...)."),
            Item("2", "Bad usage."),
            Item(
                "3",
                "The broker could not be reached, or closed the connection.",
            ),
            Item(
                "4",
                "The broker does not let this user in (ERR permission denied).",
            ),
        ],
    );
    see_also(&mut r, &[("vsnd-broker", "1")]);
    r.to_writer(&mut out)?;
    man.render_version_section(&mut out)?;
    Ok(out)
}

/// COMMANDS: each subcommand with its arguments and their values, from the
/// definition (clap_mangen's own section would point at one page per
/// subcommand, which vsnd does not have).
fn commands(r: &mut Roff, cmd: &clap::Command) {
    r.control("SH", ["COMMANDS"]);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let mut tag: Vec<Inline> = vec![bold(sub.get_name())];
        for arg in sub.get_positionals() {
            let name = arg
                .get_value_names()
                .and_then(|n| n.first())
                .map(|n| n.to_string())
                .unwrap_or_else(|| arg.get_id().to_string().to_uppercase());
            tag.push(roman(" "));
            tag.push(italic(name));
        }
        r.control("TP", []).text(tag);
        if let Some(about) = sub.get_long_about().or(sub.get_about()) {
            r.text([roman(about.to_string())]);
        }
        for arg in sub.get_positionals() {
            let values: Vec<String> = arg
                .get_possible_values()
                .iter()
                .filter(|v| !v.is_hide_set())
                .map(|v| v.get_name().to_string())
                .collect();
            if !values.is_empty() {
                r.control("br", []).text([roman(format!(
                    "{}: {}",
                    arg.get_id().to_string().to_uppercase(),
                    values.join(", ")
                ))]);
            }
        }
    }
}

fn see_also(r: &mut Roff, pages: &[(&str, &str)]) {
    r.control("SH", ["SEE ALSO"]);
    let mut line = Vec::new();
    for (i, (name, sect)) in pages.iter().enumerate() {
        if i > 0 {
            line.push(roman(", "));
        }
        line.push(bold(*name));
        line.push(roman(format!("({sect})")));
    }
    r.text(line);
}
