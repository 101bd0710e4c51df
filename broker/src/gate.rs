//! The gate: the broker's authoritative output and input enable flags.
//!
//! This is the only code that changes them, and every change goes through
//! [`Gate::set`], which writes the audit record. The device has no message
//! that could change them (see `vsnd_ipc::DeviceMsg`); it only hears the
//! result, to show the guest its jacks. While input is off the session
//! sends the guest silence and does not open the host capture source.

use vsnd_ipc::{Direction, GateState};

use crate::audit::AuditLog;

/// Who changed a flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The broker's command line.
    StartUp,
    /// A client of the control socket.
    Control {
        /// The client's uid (SO_PEERCRED).
        uid: u32,
        /// The client's pid (SO_PEERCRED).
        pid: i32,
        /// The client's command name (/proc/PID/comm), if readable.
        comm: String,
    },
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::StartUp => f.write_str("source=start-up"),
            Source::Control { uid, pid, comm } => {
                write!(f, "uid={uid} pid={pid} comm={comm:?} source=control-socket")
            }
        }
    }
}

/// `on` or `off`.
pub fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// `output=on input=off`.
pub fn describe(s: GateState) -> String {
    format!("output={} input={}", on_off(s.output), on_off(s.input))
}

/// The two flags and their audit trail.
pub struct Gate {
    state: GateState,
    audit: AuditLog,
}

impl Gate {
    /// The flags at start-up (from `--initial-streams`); each is recorded.
    pub fn new(output: bool, input: bool, mut audit: AuditLog) -> Self {
        let state = GateState { output, input };
        for d in Direction::ALL {
            audit.record(&format!(
                "{d} {} (initial) {}",
                on_off(state.get(d)),
                Source::StartUp
            ));
        }
        Gate { state, audit }
    }

    /// Current flags.
    pub fn state(&self) -> GateState {
        self.state
    }

    /// Set one flag; true if it changed (then an audit record was written).
    pub fn set(&mut self, d: Direction, on: bool, source: &Source) -> bool {
        let old = self.state.get(d);
        if old == on {
            return false;
        }
        match d {
            Direction::Output => self.state.output = on,
            Direction::Input => self.state.input = on,
        }
        self.audit
            .record(&format!("{d} {} -> {} {source}", on_off(old), on_off(on)));
        true
    }
}
