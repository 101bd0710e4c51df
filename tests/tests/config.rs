//! `vsnd-broker --config FILE` as an administrator uses it: the real broker
//! started from a TOML file (sockets, backend, initial streams from the
//! file), a command-line option overriding the file, and bad files refused
//! with exit status 2, a message naming the line, and nothing started or
//! created.
//!
//! Run the real binaries (`cargo build --workspace --bins` first).

mod support;

use std::ffi::OsString;
use std::fs;
use std::path::Path;

use support::{assert_served, broker_command, run_to_exit, wait_for_path, Broker};
use vsnd_tests::ctl::CtlClient;
use vsnd_tests::fixture::TempDir;

/// QUERY through the control socket at `ctl`.
fn query(ctl: &Path, broker: &Broker) -> String {
    let mut c = CtlClient::connect(ctl).unwrap_or_else(|e| {
        panic!(
            "expected the control socket {} to accept, got {e}\n{}",
            ctl.display(),
            broker.logs()
        )
    });
    c.request("QUERY")
        .unwrap_or_else(|e| panic!("{e}\n{}", broker.logs()))
}

fn args(list: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    list.iter().map(|a| a.as_ref().to_os_string()).collect()
}

#[test]
fn the_broker_runs_from_a_config_file() {
    let dir = TempDir::new("config");
    fs::write(dir.path().join("capture.raw"), [7u8; 256]).unwrap();
    let config = dir.path().join("vm1.toml");
    // Relative paths: relative to the file's directory, wherever the broker
    // is started from.
    fs::write(
        &config,
        "# vm1\n\
         socket = \"vm1.sock\"\n\
         control-socket = \"vm1.ctl\"\n\
         initial-streams = \"none\"\n\
         backend = \"file\"\n\
         playback-file = \"played.raw\"\n\
         capture-file = \"capture.raw\"\n\
         audit-log = \"vm1.audit\"\n\
         device-user = \"nobody\"\n",
    )
    .unwrap();
    let mut cmd = broker_command(args(&[&"--config", &config]), None);
    cmd.current_dir("/");
    let mut broker = Broker::spawn(cmd);
    let sock = dir.path().join("vm1.sock");
    let ctl = dir.path().join("vm1.ctl");
    wait_for_path(&sock, &mut broker);
    wait_for_path(&ctl, &mut broker);
    assert_served(&sock, &broker, "a VM on the config file's socket");
    assert_eq!(
        query(&ctl, &broker),
        "OK output=off input=off",
        "expected initial-streams = \"none\" from the file\n{}",
        broker.logs()
    );
    assert!(
        broker
            .log
            .text()
            .contains(&format!("settings from {}", config.display())),
        "expected the log to name the config file\n{}",
        broker.logs()
    );
    broker.stop(support::WAIT, "SIGTERM");
    assert!(
        fs::symlink_metadata(&sock).is_err() && fs::symlink_metadata(&ctl).is_err(),
        "expected both sockets from the file to be removed at exit"
    );
}

#[test]
fn the_command_line_overrides_the_file() {
    let dir = TempDir::new("override");
    let config = dir.path().join("vm.toml");
    let file_sock = dir.path().join("from-file.sock");
    fs::write(
        &config,
        format!(
            "socket = \"{}\"\ncontrol-socket = \"vm.ctl\"\ninitial-streams = \"none\"\n",
            file_sock.display()
        ),
    )
    .unwrap();
    let cli_sock = dir.path().join("from-cli.sock");
    let mut broker = Broker::spawn(broker_command(
        args(&[
            &"--config",
            &config,
            &"--socket",
            &cli_sock,
            &"--initial-streams",
            &"output,input",
        ]),
        None,
    ));
    let ctl = dir.path().join("vm.ctl");
    wait_for_path(&cli_sock, &mut broker);
    wait_for_path(&ctl, &mut broker);
    assert_served(&cli_sock, &broker, "a VM on --socket");
    assert_eq!(
        query(&ctl, &broker),
        "OK output=on input=on",
        "expected --initial-streams to override the file\n{}",
        broker.logs()
    );
    assert!(
        fs::symlink_metadata(&file_sock).is_err(),
        "expected the file's socket {} not to be created: --socket overrides it\n{}",
        file_sock.display(),
        broker.logs()
    );
}

#[test]
fn a_bad_file_exits_2_naming_the_line_and_starts_nothing() {
    let dir = TempDir::new("badconfig");
    let sock = dir.path().join("vm.sock");
    let ctl = dir.path().join("vm.ctl");
    let played = dir.path().join("played.wav");
    let head = format!(
        "socket = \"{}\"\ncontrol-socket = \"{}\"\nbackend = \"file\"\nplayback-file = \"{}\"\n",
        sock.display(),
        ctl.display(),
        played.display()
    );
    let cases: &[(&str, String, &[&str])] = &[
        (
            "an unknown key",
            format!("{head}\nmicrophone = \"on\"\n"),
            &["line 6, column 1", "unknown field `microphone`"],
        ),
        (
            "a misspelt stream",
            format!("{head}initial-streams = \"output,mic\"\n"),
            &["line 5, column 19", "mic"],
        ),
        (
            "a uid that is not a number",
            format!("{head}control-allow-uid = [\"bob\"]\n"),
            &["line 5", "bob"],
        ),
        (
            "a TOML syntax error",
            format!("{head}backend = \n"),
            &["line 5"],
        ),
        (
            "an insecure option",
            format!("{head}insecure-no-sandbox = true\n"),
            &["line 5, column 1", "insecure-no-sandbox"],
        ),
    ];
    for (what, text, says) in cases {
        let config = dir.path().join("bad.toml");
        fs::write(&config, text).unwrap();
        let (status, stderr) =
            run_to_exit(broker_command(args(&[&"--config", &config]), None), what);
        assert_eq!(
            status.code(),
            Some(2),
            "{what}: expected exit status 2, got {status}\n{stderr}"
        );
        assert!(
            stderr.contains(&format!("config file {}", config.display())),
            "{what}: expected the message to name the file\n{stderr}"
        );
        for s in *says {
            assert!(
                stderr.contains(s),
                "{what}: expected {s:?} in the message\n{stderr}"
            );
        }
        assert!(
            !stderr.contains(support::DEVICE_STARTED) && !stderr.contains("listening on"),
            "{what}: expected nothing to start\n{stderr}"
        );
        for p in [&sock, &ctl, &played] {
            assert!(
                fs::symlink_metadata(p).is_err(),
                "{what}: expected {} not to be created",
                p.display()
            );
        }
    }

    let (status, stderr) = run_to_exit(
        broker_command(args(&[&"--config", &dir.path().join("missing.toml")]), None),
        "a missing file",
    );
    assert_eq!(status.code(), Some(2), "a missing file\n{stderr}");
    assert!(
        stderr.contains("missing.toml") && stderr.contains("cannot open"),
        "a missing file: expected the message to name it\n{stderr}"
    );

    // control-allow-uid needs a control socket, from either source.
    let config = dir.path().join("uids.toml");
    fs::write(
        &config,
        format!(
            "socket = \"{}\"\ncontrol-allow-uid = [1000]\n",
            sock.display()
        ),
    )
    .unwrap();
    let (status, stderr) = run_to_exit(
        broker_command(args(&[&"--config", &config]), None),
        "control-allow-uid without a control socket",
    );
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("needs --control-socket"), "{stderr}");
    assert!(fs::symlink_metadata(&sock).is_err(), "{stderr}");
}
