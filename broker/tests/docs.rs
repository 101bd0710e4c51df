//! The man pages and completions that `examples/vsnd-gen-docs.rs` writes:
//! exactly the promised files, and every option the real programs' `--help`
//! shows appears in them, so the documentation cannot drift from the CLI.
//! No `man` or groff needed: the checks read the roff source.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[allow(dead_code)]
#[path = "../examples/vsnd-gen-docs.rs"]
mod gen;

struct Out(PathBuf);

impl Out {
    fn new(tag: &str) -> Out {
        let p = std::env::temp_dir().join(format!("vsnd-docs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        Out(p)
    }
}

impl Drop for Out {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("generated files kept in {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

fn files_under(dir: &Path, root: &Path, acc: &mut BTreeSet<String>) {
    for e in fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, root, acc);
        } else {
            acc.insert(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        }
    }
}

/// `program args… --help` of the real binary.
fn help(program: &str, args: &[&str]) -> String {
    let exe = match program {
        "vsnd-broker" => env!("CARGO_BIN_EXE_vsnd-broker"),
        "vsnd-ctl" => env!("CARGO_BIN_EXE_vsnd-ctl"),
        other => panic!("unknown program {other}"),
    };
    let out = Command::new(exe)
        .args(args)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {exe}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} --help: expected exit status 0, got {}",
        out.status
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Every `--long` option named in a help text.
fn long_options(help: &str) -> BTreeSet<String> {
    let mut set = BTreeSet::new();
    let mut rest = help;
    while let Some(i) = rest.find("--") {
        rest = &rest[i + 2..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if name.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
            set.insert(format!("--{name}"));
        }
    }
    set
}

/// A roff page as plain-ish text: `\-` is a hyphen, fonts dropped.
fn plain(roff: &str) -> String {
    roff.replace("\\-", "-")
        .replace("\\fB", "")
        .replace("\\fI", "")
        .replace("\\fR", "")
        .replace("\\*(Aq", "'")
}

fn read(out: &Path, rel: &str) -> String {
    fs::read_to_string(out.join(rel)).unwrap_or_else(|e| panic!("cannot read generated {rel}: {e}"))
}

#[test]
fn generates_exactly_the_promised_files() {
    let out = Out::new("files");
    let written = gen::generate(&out.0).expect("the generator runs");
    let mut found = BTreeSet::new();
    files_under(&out.0, &out.0, &mut found);
    let want: BTreeSet<String> = gen::OUTPUTS.iter().map(|s| s.to_string()).collect();
    assert_eq!(found, want, "files under OUTDIR");
    assert_eq!(written.len(), want.len(), "paths reported: {written:?}");
    for rel in gen::OUTPUTS {
        assert!(
            !read(&out.0, rel).trim().is_empty(),
            "expected {rel} not to be empty"
        );
    }
}

#[test]
fn man_pages_document_every_option_of_help() {
    let out = Out::new("man");
    gen::generate(&out.0).expect("the generator runs");
    for (program, subcommands) in [
        ("vsnd-broker", &[][..]),
        ("vsnd-ctl", &["query", "set", "subscribe"][..]),
    ] {
        let roff = read(&out.0, &format!("man/{program}.1"));
        let text = plain(&roff);
        let th = roff
            .lines()
            .find(|l| l.starts_with(".TH "))
            .unwrap_or_else(|| panic!("{program}.1: no .TH header:\n{roff}"));
        assert!(
            th.starts_with(&format!(".TH {program} 1 ")),
            "{program}.1: expected `.TH {program} 1 …`, got {th:?}"
        );
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            th.contains(version),
            "{program}.1: expected the version {version} in {th:?}"
        );
        for section in [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "OPTIONS",
            "\"EXIT STATUS\"",
            "SECURITY",
            "\"SEE ALSO\"",
        ] {
            assert!(
                roff.contains(&format!("\n.SH {section}\n")),
                "{program}.1: expected a {section} section"
            );
        }
        let mut helps = vec![help(program, &[])];
        for sub in subcommands {
            helps.push(help(program, &[sub]));
            assert!(
                text.contains(&format!("\n.TP\n{sub}")),
                "{program}.1: expected subcommand {sub} under COMMANDS"
            );
        }
        let options: BTreeSet<String> = helps.iter().flat_map(|h| long_options(h)).collect();
        assert!(
            options.contains("--help") && options.contains("--version"),
            "{program}: could not read the options of --help: {options:?}"
        );
        for opt in &options {
            assert!(
                text.contains(opt.as_str()),
                "{program}.1: --help shows {opt}, the man page does not mention it"
            );
        }
        // The exit statuses the programs use.
        let statuses: &[&str] = if program == "vsnd-broker" {
            &["0", "1", "2"]
        } else {
            &["0", "1", "2", "3", "4"]
        };
        for s in statuses {
            assert!(
                roff.contains(&format!(".TP\n\\fB{s}\\fR\n")),
                "{program}.1: expected exit status {s} under EXIT STATUS"
            );
        }
    }
    let broker = plain(&read(&out.0, "man/vsnd-broker.1"));
    for s in [
        "CONFIGURATION FILE",
        "ENVIRONMENT",
        "FILES",
        "LISTEN_FDS",
        "LISTEN_PID",
        "NOTIFY_SOCKET",
        "READY=1",
        "RUST_LOG",
        "/etc/vsnd/",
        "vsnd-ctl",
    ] {
        assert!(broker.contains(s), "vsnd-broker.1: expected {s:?}");
    }
}

#[test]
fn completions_offer_every_visible_option_and_no_hidden_one() {
    use clap::CommandFactory;
    let out = Out::new("completions");
    gen::generate(&out.0).expect("the generator runs");
    for (program, cmd) in [
        ("vsnd-broker", vsnd_broker::cli::Cli::command()),
        ("vsnd-ctl", vsnd_broker::ctl_cli::Cli::command()),
    ] {
        let files = [
            format!("completions/bash/{program}"),
            format!("completions/zsh/_{program}"),
            format!("completions/fish/{program}.fish"),
        ];
        let man = plain(&read(&out.0, &format!("man/{program}.1")));
        for arg in cmd.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            for rel in &files {
                let text = read(&out.0, rel);
                // fish spells `--name` as `-l name`.
                let present = text.contains(&format!("--{long}"))
                    || text.contains(&format!("-l {long} "))
                    || text.ends_with(&format!("-l {long}"));
                if arg.is_hide_set() {
                    assert!(!present, "{rel}: hidden option --{long} is offered");
                } else {
                    assert!(present, "{rel}: expected --{long} to be completed");
                }
            }
            if arg.is_hide_set() {
                assert!(
                    !man.contains(&format!("--{long}")),
                    "{program}.1: hidden option --{long} is documented"
                );
            }
        }
        for sub in cmd.get_subcommands() {
            for rel in &files {
                assert!(
                    read(&out.0, rel).contains(sub.get_name()),
                    "{rel}: expected subcommand {} to be completed",
                    sub.get_name()
                );
            }
        }
    }
    assert!(
        read(&out.0, "completions/bash/vsnd-broker").contains("complete -F"),
        "bash completion should register with `complete -F`"
    );
    assert!(
        read(&out.0, "completions/zsh/_vsnd-broker").starts_with("#compdef vsnd-broker"),
        "zsh completion should start with #compdef"
    );
}
