//! The control socket: the request-line parser
//! (`vsnd_broker::control_socket::parse_request`) on every line of the
//! input, then the whole input sent by a client to a real `ControlServer`
//! (its line buffering, length limit and answers).
//!
//! Input: raw bytes, as a client would write them.
//!
//! Invariants checked besides "no panic":
//! * a line parses only if it is ASCII and one of the documented forms; a
//!   parsed request rendered canonically parses to the same request;
//! * the server answers every complete line it reads with exactly one `OK`
//!   or `ERR` line (plus `EVENT` lines once subscribed), in order, and
//!   ends the connection after a line longer than `MAX_LINE`.
#![no_main]

use std::cell::RefCell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use nix::poll::PollFlags;
use vsnd_broker::audit::AuditLog;
use vsnd_broker::control_socket::{
    parse_request, ControlServer, Request, MAX_LINE, MAX_READ_PER_WAKEUP,
};
use vsnd_broker::gate::Gate;
use vsnd_ipc::Direction;

/// Poll results for `on_events`: every descriptor readable and writable
/// (the server copes with spurious readiness; its sockets are non-blocking).
fn all_ready(n: usize) -> Vec<PollFlags> {
    vec![PollFlags::POLLIN | PollFlags::POLLOUT; n]
}

struct Server {
    server: ControlServer,
    gate: Gate,
    path: PathBuf,
}

thread_local! {
    static SERVER: RefCell<Option<Server>> = const { RefCell::new(None) };
}

fn render(r: Request) -> String {
    match r {
        Request::Query => "QUERY".into(),
        Request::Subscribe => "SUBSCRIBE".into(),
        Request::Set(d, on) => format!(
            "SET {} {}",
            match d {
                Direction::Output => "output",
                Direction::Input => "input",
            },
            if on { "on" } else { "off" }
        ),
    }
}

fn check_parser(line: &[u8]) {
    let Ok(req) = parse_request(line) else { return };
    assert!(line.is_ascii(), "non-ASCII line {line:?} parsed as {req:?}");
    let text = std::str::from_utf8(line).unwrap();
    let words: Vec<&str> = text.split_ascii_whitespace().collect();
    assert!(
        words.len() == 1 || words.len() == 3,
        "{line:?} parsed as {req:?} from {} words",
        words.len()
    );
    assert_eq!(parse_request(render(req).as_bytes()), Ok(req));
    assert_eq!(
        parse_request(render(req).to_ascii_lowercase().as_bytes()),
        Ok(req)
    );
}

/// How many OK/ERR answers the server owes for `data`, and whether it
/// closes the connection (a line past `MAX_LINE`).
fn expected_answers(data: &[u8]) -> (usize, bool) {
    let mut answers = 0;
    let mut line = 0usize;
    for &b in data {
        if b == b'\n' {
            answers += 1;
            line = 0;
        } else if line >= MAX_LINE {
            return (answers + 1, true);
        } else {
            line += 1;
        }
    }
    (answers, false)
}

fn check_server(data: &[u8]) {
    // More than a socket buffer would block the single-threaded harness.
    let data = &data[..data.len().min(64 * 1024)];
    SERVER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let s = slot.get_or_insert_with(|| {
            // Removed again when the server is dropped at exit.
            let path =
                std::env::temp_dir().join(format!("vsnd-fuzz-ctl-{}.sock", std::process::id()));
            Server {
                server: ControlServer::bind(&path, vec![]).unwrap(),
                gate: Gate::new(true, false, AuditLog::open(None).unwrap()),
                path,
            }
        });
        let mut client = UnixStream::connect(&s.path).unwrap();
        client.write_all(data).unwrap();
        client.set_nonblocking(true).unwrap();
        let pump = |s: &mut Server| {
            let n = s.server.poll_set().len();
            s.server
                .on_events(&all_ready(n), &mut s.gate, Instant::now());
            s.server.flush_all();
        };
        // Accept, then read everything (a little per wakeup), answering.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        for _ in 0..data.len() / MAX_READ_PER_WAKEUP + 3 {
            pump(s);
            while let Ok(n) = client.read(&mut buf) {
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
        }
        let (want, closes) = expected_answers(data);
        let text = String::from_utf8(got).expect("answers are UTF-8");
        let answers: Vec<&str> = text.lines().filter(|l| !l.starts_with("EVENT ")).collect();
        for a in &answers {
            assert!(
                a.starts_with("OK ") || a.starts_with("ERR "),
                "answer {a:?}"
            );
        }
        assert_eq!(answers.len(), want, "answers {answers:?} for {data:?}");
        if closes {
            assert!(answers.last().unwrap().starts_with("ERR line longer"));
        }
        drop(client);
        // The server notices the hang-up and forgets the client.
        pump(s);
    });
}

fuzz_target!(|data: &[u8]| {
    check_parser(data);
    for line in data.split(|&b| b == b'\n') {
        check_parser(line);
    }
    check_server(data);
});
