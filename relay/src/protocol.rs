//! The relay's side of the protocol's words (defined once, with the extension, in the
//! `pg_reaper_protocol` crate): a word this relay does not know (a newer extension?) is a
//! protocol error, never read as the nearest known one, so an unknown answer fails closed (no
//! mark, nothing counted wrongly). The failure causes of the metrics are the relay's own.

use crate::Error;
pub use pg_reaper_protocol::{CHANNEL, Outcome};
use pg_reaper_protocol::{LOST, State};

/// What `recovery_lock`'s re-check under the barrier's row lock decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The claim is no longer ours: another relay holds or resolved the intent.
    Lost,
    /// Re-enqueued, progressed or torn down since it was reaped: not ours to mark.
    Rearmed,
    Refire,
    Mark {
        remaining: Option<i32>,
    },
}

impl Verdict {
    pub fn parse(word: &str, remaining: Option<i32>) -> Result<Verdict, Error> {
        use pg_reaper_protocol::Verdict as Word;
        match Word::parse(word) {
            Some(Word::Lost) => Ok(Verdict::Lost),
            Some(Word::Rearmed) => Ok(Verdict::Rearmed),
            Some(Word::Refire) => Ok(Verdict::Refire),
            Some(Word::Mark) => Ok(Verdict::Mark { remaining }),
            None => Err(Error::Protocol(format!(
                "recovery_lock returned the unknown verdict {word:?}; not marking"
            ))),
        }
    }
}

/// Where a claimed intent handed back after a failure went (`outbox_fail`, `outbox_defer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandedBack {
    /// Due again after its backoff.
    Pending,
    /// Out of attempts: kept for an operator's `outbox_replay()`.
    Dead,
    /// The claim was no longer ours; nothing changed.
    Lost,
}

impl HandedBack {
    pub fn parse(word: &str) -> Result<HandedBack, Error> {
        match State::parse(word) {
            Some(State::Pending) => Ok(HandedBack::Pending),
            Some(State::Dead) => Ok(HandedBack::Dead),
            _ if word == LOST => Ok(HandedBack::Lost),
            _ => Err(Error::Protocol(format!(
                "the outbox answered {word:?} for a handed-back intent, not pending, dead or lost"
            ))),
        }
    }
}

/// Why an attempt failed: the `cause` label of `pg_reaper_relay_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Cause {
    HttpStatus,
    Throttled,
    BadRequest,
    Unauthorized,
    Timeout,
    Connect,
    Transport,
    BadBody,
    UnknownStatus,
    Indeterminate,
    RefireHook,
    Database,
    /// The relay itself stalled between holding a claim and its ERROR mark.
    Stalled,
}

impl Cause {
    pub const ALL: [Cause; 13] = [
        Cause::HttpStatus,
        Cause::Throttled,
        Cause::BadRequest,
        Cause::Unauthorized,
        Cause::Timeout,
        Cause::Connect,
        Cause::Transport,
        Cause::BadBody,
        Cause::UnknownStatus,
        Cause::Indeterminate,
        Cause::RefireHook,
        Cause::Database,
        Cause::Stalled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::HttpStatus => "http_status",
            Cause::Throttled => "throttled",
            Cause::BadRequest => "bad_request",
            Cause::Unauthorized => "unauthorized",
            Cause::Timeout => "timeout",
            Cause::Connect => "connect",
            Cause::Transport => "transport",
            Cause::BadBody => "bad_body",
            Cause::UnknownStatus => "unknown_status",
            Cause::Indeterminate => "indeterminate",
            Cause::RefireHook => "refire_hook",
            Cause::Database => "database",
            Cause::Stalled => "stalled",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_parse_strictly_and_an_unknown_one_never_marks() {
        assert_eq!(
            Verdict::parse("mark", Some(2)).ok(),
            Some(Verdict::Mark { remaining: Some(2) })
        );
        assert_eq!(Verdict::parse("lost", None).ok(), Some(Verdict::Lost));
        assert_eq!(Verdict::parse("rearmed", None).ok(), Some(Verdict::Rearmed));
        assert_eq!(
            Verdict::parse("refire", Some(0)).ok(),
            Some(Verdict::Refire)
        );
        for unknown in ["MARK", "mark ", "", "refired", "skip"] {
            let e = Verdict::parse(unknown, Some(1)).expect_err(unknown);
            assert!(e.to_string().contains("not marking"), "{e}");
        }
    }

    #[test]
    fn handed_back_states_parse_strictly() {
        assert_eq!(HandedBack::parse("pending").ok(), Some(HandedBack::Pending));
        assert_eq!(HandedBack::parse("dead").ok(), Some(HandedBack::Dead));
        assert_eq!(HandedBack::parse("lost").ok(), Some(HandedBack::Lost));
        for unknown in ["done", "in_flight", "Pending", ""] {
            assert!(HandedBack::parse(unknown).is_err(), "{unknown}");
        }
    }

    #[test]
    fn every_cause_is_distinct() {
        let causes: std::collections::HashSet<_> = Cause::ALL.iter().map(|c| c.as_str()).collect();
        assert_eq!(causes.len(), Cause::ALL.len());
    }
}
