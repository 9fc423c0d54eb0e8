//! The words of pg_reaper's outbox protocol, defined once for the extension and the relay: the
//! intent states and outcomes (the schema's CHECK constraints hold the same lists, and a pg_test
//! holds them equal), the verdicts of `recovery_lock`, the operator's actions, and the channel
//! relays listen on. Parsing is strict: a word that is not here is `None`, never the nearest
//! known one.
//!
//! ```text
//!             reap / barrier_recover
//!                       │
//!                       ▼
//!   ┌────────────► pending ◄──────────── outbox_fail / outbox_defer (backoff),
//!   │                   │                 outbox_release, lease expired
//!   │      outbox_claim │ (attempts + 1: the claim's fencing token)
//!   │                   ▼
//!   │              in_flight ──── outbox_resolve(outcome) ────► done (kept for the
//!   │                   │                                        retention, then pruned)
//!   │    outbox_fail    │
//!   │    (last failure) ▼
//!   └── outbox_replay ─ dead (kept until an operator replays it)
//! ```

/// The channel `pg_notify` wakes relays on when intents become due.
pub const CHANNEL: &str = "pg_reaper_outbox";

/// The state of an intent (the `state` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Pending,
    InFlight,
    Done,
    Dead,
}

impl State {
    pub const ALL: [State; 4] = [State::Pending, State::InFlight, State::Done, State::Dead];

    pub fn parse(word: &str) -> Option<State> {
        State::ALL.into_iter().find(|s| s.as_str() == word)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::InFlight => "in_flight",
            State::Done => "done",
            State::Dead => "dead",
        }
    }
}

/// How a done intent was resolved (the `outcome` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    MarkedError,
    AlreadyTerminal,
    Gone,
    Rearmed,
    Refired,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::MarkedError,
        Outcome::AlreadyTerminal,
        Outcome::Gone,
        Outcome::Rearmed,
        Outcome::Refired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::MarkedError => "marked_error",
            Outcome::AlreadyTerminal => "already_terminal",
            Outcome::Gone => "gone",
            Outcome::Rearmed => "rearmed",
            Outcome::Refired => "refired",
        }
    }

    pub fn parse(word: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == word)
    }

    /// Every outcome, for an error message: `marked_error, already_terminal, …`.
    pub fn listed() -> String {
        Outcome::ALL.map(Outcome::as_str).join(", ")
    }
}

/// What `recovery_lock` decided under the barrier's row lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The claim is no longer the caller's.
    Lost,
    /// No barrier, or not stranded any more: resolve as `rearmed`.
    Rearmed,
    /// Re-fire the callback: resolve as `refired`.
    Refire,
    /// Mark the execution ERROR through the status API.
    Mark,
}

impl Verdict {
    pub const ALL: [Verdict; 4] = [
        Verdict::Lost,
        Verdict::Rearmed,
        Verdict::Refire,
        Verdict::Mark,
    ];

    pub fn parse(word: &str) -> Option<Verdict> {
        Verdict::ALL.into_iter().find(|v| v.as_str() == word)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Lost => "lost",
            Verdict::Rearmed => "rearmed",
            Verdict::Refire => "refire",
            Verdict::Mark => "mark",
        }
    }
}

/// How the message of an error the re-fire hook raised in `recovery_lock` starts (the hook's
/// own SQLSTATE is kept): the relay counts it as the hook's failure, not the database's.
pub const REFIRE_HOOK_ERROR: &str = "re-fire hook ";

/// What `outbox_fail` and `outbox_defer` answer when the caller's claim matched no row (they
/// answer the intent's new state otherwise).
pub const LOST: &str = "lost";

/// What an operator asked `barrier_recover` to do (the `action` column; NULL for intents
/// reaping queued).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Error,
    Refire,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Error => "error",
            Action::Refire => "refire",
        }
    }

    pub fn parse(word: &str) -> Option<Action> {
        [Action::Error, Action::Refire]
            .into_iter()
            .find(|a| a.as_str() == word)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_parses_back_and_nothing_else_does() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        for o in Outcome::ALL {
            assert_eq!(Outcome::parse(o.as_str()), Some(o));
        }
        for v in Verdict::ALL {
            assert_eq!(Verdict::parse(v.as_str()), Some(v));
        }
        for a in [Action::Error, Action::Refire] {
            assert_eq!(Action::parse(a.as_str()), Some(a));
        }
        for unknown in ["", "MARK", "mark ", "refired ", "Done", "skip"] {
            assert_eq!(Verdict::parse(unknown), None, "{unknown:?}");
            assert_eq!(Outcome::parse(unknown), None, "{unknown:?}");
            assert_eq!(State::parse(unknown), None, "{unknown:?}");
        }
        assert_eq!(
            Outcome::listed(),
            "marked_error, already_terminal, gone, rearmed, refired"
        );
    }
}
