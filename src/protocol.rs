//! The words of the outbox protocol, each defined once: the intent states and outcomes (the
//! schema's CHECK constraints hold the same lists), the verdicts of `recovery_lock`, the
//! operator's actions, and the channel relays listen on. The relay has the same words in its
//! `protocol` module and parses them strictly.
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

/// What `outbox_fail` and `outbox_defer` answer when the caller's claim matched no row.
pub const LOST: &str = "lost";

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
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Lost => LOST,
            Verdict::Rearmed => "rearmed",
            Verdict::Refire => "refire",
            Verdict::Mark => "mark",
        }
    }
}

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
