//! The PCM stream state machine of virtio 1.2, 5.14.6.6.1, shared by the
//! device (which answers the guest) and the broker (which checks that the
//! device's messages follow it).
//!
//! ```text
//! (initial) --SET_PARAMS--> ParamsSet --PREPARE--> Prepared --START--> Running
//!                              ^  |                  |  ^                 |
//!                              |  +--SET_PARAMS------+  +-----START-------+ STOP
//!                              |                     |                    v
//!               Released <-----+-- RELEASE ----------+------ RELEASE -- Stopped
//! ```
//!
//! Allowed: SET_PARAMS from initial, ParamsSet, Prepared, Released;
//! PREPARE from ParamsSet, Prepared, Released; START from Prepared, Stopped;
//! STOP from Running; RELEASE from Prepared, Stopped. Anything else is
//! answered `BAD_MSG` and leaves the state unchanged.

use crate::PcmParams;

/// Where a stream is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcmState {
    /// No parameters yet.
    Initial,
    /// SET_PARAMS succeeded.
    ParamsSet,
    /// PREPARE succeeded: transfers may be queued.
    Prepared,
    /// START succeeded: the clock runs.
    Running,
    /// STOP succeeded: the clock is paused, buffers are kept.
    Stopped,
    /// RELEASE succeeded: pending buffers were returned.
    Released,
}

/// A PCM command that changes state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcmCommand {
    SetParams,
    Prepare,
    Start,
    Stop,
    Release,
}

/// The refusal of a command in the current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidTransition {
    pub from: PcmState,
    pub command: PcmCommand,
}

/// One stream: its state and its last accepted parameters.
#[derive(Debug, Clone)]
pub struct Stream {
    state: PcmState,
    params: Option<PcmParams>,
}

impl Default for Stream {
    fn default() -> Self {
        Stream {
            state: PcmState::Initial,
            params: None,
        }
    }
}

impl Stream {
    /// Current state.
    pub fn state(&self) -> PcmState {
        self.state
    }

    /// The last accepted parameters, if any.
    pub fn params(&self) -> Option<&PcmParams> {
        self.params.as_ref()
    }

    /// Whether transfers may be queued on this stream now.
    pub fn accepts_transfers(&self) -> bool {
        matches!(
            self.state,
            PcmState::Prepared | PcmState::Running | PcmState::Stopped
        )
    }

    /// The state `command` would lead to, or why it is refused.
    pub fn next_state(&self, command: PcmCommand) -> Result<PcmState, InvalidTransition> {
        use PcmCommand as C;
        use PcmState as S;
        let next = match (self.state, command) {
            (S::Initial | S::ParamsSet | S::Prepared | S::Released, C::SetParams) => S::ParamsSet,
            (S::ParamsSet | S::Prepared | S::Released, C::Prepare) => S::Prepared,
            (S::Prepared | S::Stopped, C::Start) => S::Running,
            (S::Running, C::Stop) => S::Stopped,
            (S::Prepared | S::Stopped, C::Release) => S::Released,
            (from, command) => return Err(InvalidTransition { from, command }),
        };
        Ok(next)
    }

    /// Apply a command other than SET_PARAMS.
    pub fn apply(&mut self, command: PcmCommand) -> Result<(), InvalidTransition> {
        debug_assert!(command != PcmCommand::SetParams, "use set_params");
        self.state = self.next_state(command)?;
        Ok(())
    }

    /// Apply SET_PARAMS with already-validated parameters.
    pub fn set_params(&mut self, params: PcmParams) -> Result<(), InvalidTransition> {
        self.state = self.next_state(PcmCommand::SetParams)?;
        self.params = Some(params);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SampleFormat;
    use PcmCommand as C;
    use PcmState as S;

    const ALL_COMMANDS: [PcmCommand; 5] = [C::SetParams, C::Prepare, C::Start, C::Stop, C::Release];

    fn params() -> PcmParams {
        PcmParams {
            format: SampleFormat::S16,
            rate: 48000,
            channels: 2,
            buffer_bytes: 8,
            period_bytes: 4,
        }
    }

    fn stream_in(state: S) -> Stream {
        Stream {
            state,
            params: Some(params()),
        }
    }

    #[test]
    fn the_linux_sequence_is_accepted() {
        let mut s = Stream::default();
        s.set_params(params()).unwrap();
        for c in [
            C::Prepare,
            C::Start,
            C::Stop,
            C::Start,
            C::Stop,
            C::Release,
            C::Prepare,
            C::Start,
        ] {
            s.apply(c)
                .unwrap_or_else(|e| panic!("{c:?} refused: {e:?}"));
        }
        assert_eq!(s.state(), S::Running);
    }

    #[test]
    fn the_full_transition_table() {
        let allowed: &[(S, C, S)] = &[
            (S::Initial, C::SetParams, S::ParamsSet),
            (S::ParamsSet, C::SetParams, S::ParamsSet),
            (S::ParamsSet, C::Prepare, S::Prepared),
            (S::Prepared, C::SetParams, S::ParamsSet),
            (S::Prepared, C::Prepare, S::Prepared),
            (S::Prepared, C::Start, S::Running),
            (S::Prepared, C::Release, S::Released),
            (S::Running, C::Stop, S::Stopped),
            (S::Stopped, C::Start, S::Running),
            (S::Stopped, C::Release, S::Released),
            (S::Released, C::SetParams, S::ParamsSet),
            (S::Released, C::Prepare, S::Prepared),
        ];
        for from in [
            S::Initial,
            S::ParamsSet,
            S::Prepared,
            S::Running,
            S::Stopped,
            S::Released,
        ] {
            for c in ALL_COMMANDS {
                let expected = allowed
                    .iter()
                    .find(|(f, cc, _)| *f == from && *cc == c)
                    .map(|t| t.2);
                let got = stream_in(from).next_state(c).ok();
                assert_eq!(got, expected, "{c:?} from {from:?}");
            }
        }
    }

    #[test]
    fn refused_commands_leave_state_unchanged() {
        let mut s = stream_in(S::Running);
        assert!(s.apply(C::Release).is_err());
        assert!(s.set_params(params()).is_err());
        assert_eq!(s.state(), S::Running);
    }
}
