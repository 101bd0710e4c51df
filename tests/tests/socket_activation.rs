//! `vsnd-broker` under a service manager: socket activation by the systemd
//! convention (`LISTEN_PID`, `LISTEN_FDS`, the socket as descriptor 3) and
//! readiness notification (`NOTIFY_SOCKET`), the way systemd starts the
//! packaged `vsnd@.service` — played here by the test itself (a shell sets
//! `LISTEN_PID=$$` and execs the broker), so systemd is not needed.
//!
//! Run the real binaries (`cargo build --workspace --bins` first).

mod support;

use std::fs;
use std::net::TcpListener;
use std::os::fd::AsRawFd as _;
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::fs::FileTypeExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::path::Path;
use std::time::Duration;

use support::{
    activated_command, assert_served, broker_command, environ, run_to_exit, Broker, WAIT,
};
use vsnd_tests::fixture::TempDir;
use vsnd_tests::process::open_fds;

/// Variables a service manager sets that the device must never see.
const MANAGER_VARS: [&str; 4] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
];

fn is_socket(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

/// The next datagram on `rx`, or what came instead.
fn next_notification(rx: &UnixDatagram, broker: &Broker, expect: &str) -> String {
    rx.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 4096];
    match rx.recv(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) => panic!(
            "expected a notification with {expect} within {WAIT:?}, got: {e}\n{}",
            broker.logs()
        ),
    }
}

/// `socket:[inode]` of one of our descriptors, as /proc shows it.
fn socket_id(pid: &str, fd: i32) -> String {
    fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|e| format!("<{e}>"))
}

#[test]
fn a_passed_socket_is_served_the_device_sees_no_manager_variables_and_it_stays() {
    let dir = TempDir::new("activation");
    let sock = dir.path().join("vm1.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let notify_name = format!("vsnd-test-notify-{}", std::process::id());
    let rx =
        UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&notify_name).unwrap()).unwrap();
    let mut cmd = activated_command(Vec::<&str>::new(), listener.as_raw_fd(), "1", None);
    cmd.env("NOTIFY_SOCKET", format!("@{notify_name}"));
    let mut broker = Broker::spawn(cmd);

    let ready = next_notification(&rx, &broker, "READY=1");
    assert!(
        ready.lines().next() == Some("READY=1")
            && ready.contains("STATUS=serving inherited socket fd 3"),
        "expected READY=1 and a STATUS line, got {ready:?}\n{}",
        broker.logs()
    );
    let line = broker.wait_log("listening on inherited socket fd 3", 1, support::WAIT);
    assert!(
        line.contains("LISTEN_FDS") && line.contains("vm1.sock"),
        "expected the log to say the socket came from the service manager, got {line:?}"
    );
    assert_served(&sock, &broker, "a VM connecting to the passed socket");

    let device = broker.wait_device(1, support::WAIT);
    let env = environ(device);
    for var in MANAGER_VARS {
        assert!(
            !env.iter().any(|e| e.starts_with(&format!("{var}="))),
            "expected the device (pid {device}) not to see {var}; its environment: {env:?}\n{}",
            broker.logs()
        );
    }

    broker.stop(support::WAIT, "SIGTERM with a passed socket");
    // A device started for the next VM may have sent a STATUS first.
    let mut stopping = next_notification(&rx, &broker, "STOPPING=1");
    for _ in 0..4 {
        if !stopping.starts_with("STATUS=serving") {
            break;
        }
        stopping = next_notification(&rx, &broker, "STOPPING=1");
    }
    assert!(
        stopping.starts_with("STOPPING=1"),
        "expected STOPPING=1 at shutdown, got {stopping:?}\n{}",
        broker.logs()
    );
    assert!(
        is_socket(&sock),
        "expected the broker to leave the service manager's socket {} in place",
        sock.display()
    );
}

#[test]
fn ready_is_sent_only_once_a_device_serves_the_listener() {
    let dir = TempDir::new("ready");
    let sock = dir.path().join("vm.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let ours = socket_id("self", listener.as_raw_fd());
    let notify = dir.path().join("notify.sock");
    let rx = UnixDatagram::bind(&notify).unwrap();
    let mut cmd = activated_command(Vec::<&str>::new(), listener.as_raw_fd(), "1", None);
    cmd.env("NOTIFY_SOCKET", &notify);
    let broker = Broker::spawn(cmd);

    let ready = next_notification(&rx, &broker, "READY=1");
    assert!(
        ready.starts_with("READY=1\n"),
        "expected the first notification to be READY=1, got {ready:?}\n{}",
        broker.logs()
    );
    // At this moment a device exists and holds our listener as its fd 3.
    let pid = ready
        .split("device pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("expected the device pid in {ready:?}"));
    let theirs = socket_id(pid, 3);
    assert_eq!(
        theirs,
        ours,
        "expected device {pid} to hold the listener as fd 3 when READY=1 arrives\n{}",
        broker.logs()
    );
    // The broker's own fd 3 (the passed socket) and the device's fd 3/4
    // did not collide: fd 4 is the broker channel, nothing else inherited.
    let fds = open_fds(pid.parse().expect("a pid"));
    let channel = fds.iter().find(|(n, _)| *n == 4).map(|(_, t)| t.clone());
    assert!(
        channel
            .as_deref()
            .is_some_and(|t| t.starts_with("socket:") && *t != ours),
        "expected fd 4 of the device to be its channel to the broker, got {fds:?}"
    );
    let strays: Vec<_> = fds
        .iter()
        .filter(|(n, t)| *n > 4 && !t.starts_with("anon_inode:"))
        .collect();
    assert!(
        strays.is_empty(),
        "expected no descriptors beyond 0-4 in the device, found {strays:?}"
    );
    assert_served(&sock, &broker, "a VM connecting right after READY=1");
    // One READY only: a device started for the next VM gives a STATUS.
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 4096];
    while let Ok(n) = rx.recv(&mut buf) {
        let msg = String::from_utf8_lossy(&buf[..n]);
        assert!(
            !msg.contains("READY=1"),
            "expected READY=1 only once, got another: {msg:?}\n{}",
            broker.logs()
        );
    }
}

#[test]
fn listen_pid_of_another_process_is_ignored() {
    let dir = TempDir::new("otherpid");
    let sock = dir.path().join("vm.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    // Meant for pid 1, not for the broker: it must not take fd 3.
    let (status, stderr) = run_to_exit(
        activated_command(Vec::<&str>::new(), listener.as_raw_fd(), "1", Some(1)),
        "LISTEN_PID=1",
    );
    assert_eq!(
        status.code(),
        Some(2),
        "expected exit status 2 (no socket to serve), got {status}\n{stderr}"
    );
    for s in ["LISTEN_PID=1 is not this process", "no vhost-user socket"] {
        assert!(stderr.contains(s), "expected {s:?} on stderr\n{stderr}");
    }

    // With --socket it serves that socket, and says why fd 3 is not used.
    let own = dir.path().join("own.sock");
    let mut broker = Broker::spawn(activated_command(
        ["--socket".as_ref(), own.as_os_str()],
        listener.as_raw_fd(),
        "1",
        Some(1),
    ));
    broker.wait_log("LISTEN_PID=1 is not this process", 1, support::WAIT);
    support::wait_for_path(&own, &mut broker);
    assert_served(&own, &broker, "a VM on --socket");
}

#[test]
fn the_command_line_socket_wins_over_a_passed_one() {
    let dir = TempDir::new("cliwins");
    let passed = dir.path().join("passed.sock");
    let listener = UnixListener::bind(&passed).unwrap();
    let own = dir.path().join("own.sock");
    let mut broker = Broker::spawn(activated_command(
        ["--socket".as_ref(), own.as_os_str()],
        listener.as_raw_fd(),
        "1",
        None,
    ));
    broker.wait_log(
        "ignoring the 1 socket(s) passed by the service manager",
        1,
        support::WAIT,
    );
    support::wait_for_path(&own, &mut broker);
    // The unused passed socket reaches no device: its fd 3 is --socket's.
    let passed_id = socket_id("self", listener.as_raw_fd());
    let device = broker.wait_device(1, support::WAIT).to_string();
    let fds = open_fds(device.parse().expect("a pid"));
    assert!(
        fds.iter().any(|(n, t)| *n == 3 && t.starts_with("socket:")),
        "expected the device's fd 3 to be a socket, got {fds:?}\n{}",
        broker.logs()
    );
    assert!(
        !fds.iter().any(|(_, t)| *t == passed_id),
        "expected the passed, unused socket {passed_id} not to reach the device, got {fds:?}\n{}",
        broker.logs()
    );
    assert_served(&own, &broker, "a VM on --socket");
}

#[test]
fn a_passed_socket_wins_over_the_config_files_socket() {
    let dir = TempDir::new("filesock");
    let passed = dir.path().join("passed.sock");
    let listener = UnixListener::bind(&passed).unwrap();
    let from_file = dir.path().join("from-file.sock");
    let config = dir.path().join("vm.toml");
    fs::write(&config, "socket = \"from-file.sock\"\n").unwrap();
    let broker = Broker::spawn(activated_command(
        ["--config".as_ref(), config.as_os_str()],
        listener.as_raw_fd(),
        "1",
        None,
    ));
    assert_served(&passed, &broker, "a VM on the passed socket");
    assert!(
        broker
            .log
            .text()
            .contains("not `socket`/`socket-fd` of the config file"),
        "expected a warning that the file's socket is not used\n{}",
        broker.logs()
    );
    assert!(
        fs::symlink_metadata(&from_file).is_err(),
        "expected the config file's socket {} not to be created",
        from_file.display()
    );
}

#[test]
fn a_passed_descriptor_that_is_not_one_listening_unix_stream_socket_is_refused() {
    let dir = TempDir::new("badpass");
    let dgram = UnixDatagram::bind(dir.path().join("dgram.sock")).unwrap();
    let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
    let unix = UnixListener::bind(dir.path().join("ok.sock")).unwrap();
    let cases = [
        ("a datagram socket", dgram.as_raw_fd(), "1", "not listening"),
        ("a TCP listener", tcp.as_raw_fd(), "1", "AF_UNIX"),
        ("two sockets", unix.as_raw_fd(), "2", "exactly one"),
        ("LISTEN_FDS=abc", unix.as_raw_fd(), "abc", "LISTEN_FDS"),
    ];
    for (what, fd, count, says) in cases {
        let (status, stderr) =
            run_to_exit(activated_command(Vec::<&str>::new(), fd, count, None), what);
        assert_eq!(
            status.code(),
            Some(2),
            "{what}: expected exit status 2, got {status}\n{stderr}"
        );
        assert!(
            stderr.contains(says) && stderr.contains("LISTEN_FDS"),
            "{what}: expected the message to mention {says:?} and LISTEN_FDS\n{stderr}"
        );
        assert!(
            !stderr.contains(support::DEVICE_STARTED),
            "{what}: expected no device to be started\n{stderr}"
        );
    }
}

#[test]
fn without_a_socket_or_activation_the_broker_says_what_to_give() {
    let (status, stderr) = run_to_exit(broker_command(Vec::<&str>::new(), None), "no socket");
    assert_eq!(status.code(), Some(2), "{stderr}");
    for s in ["--socket", "--socket-fd", "LISTEN_FDS"] {
        assert!(stderr.contains(s), "expected {s:?} in\n{stderr}");
    }
}
