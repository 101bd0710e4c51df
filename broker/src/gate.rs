//! The gate: the broker's authoritative output and input enable flags.
//!
//! This is the only code that changes them. The device has no message that
//! could (see `vsnd_ipc::DeviceMsg`); it only hears the result, to show the
//! guest its jacks. While input is off the session sends the guest silence
//! and never opens the host capture source.

use log::info;
use vsnd_ipc::{Direction, GateState};

/// Who changed a flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The broker's command line.
    StartUp,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::StartUp => f.write_str("start-up"),
        }
    }
}

/// The two flags.
#[derive(Debug)]
pub struct Gate {
    state: GateState,
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

impl Gate {
    /// The flags at start-up (from `--initial-streams`), logged as the first
    /// audit record.
    pub fn new(output: bool, input: bool) -> Self {
        let gate = Gate {
            state: GateState { output, input },
        };
        for d in Direction::ALL {
            info!(
                "audit: {d} {} (source: {})",
                on_off(gate.state.get(d)),
                Source::StartUp
            );
        }
        gate
    }

    /// Current flags.
    pub fn state(&self) -> GateState {
        self.state
    }
}
