//! One claimed intent, start to end: the decisions as pure functions of what was observed
//! (each returns the next step), and the one executor that carries them out over two small
//! interfaces, the outbox and the status API. The relay runs it over Postgres and HTTP; the
//! simulation runs the same executor over in-memory models.
//!
//! ```text
//! status read → gone / already terminal: resolve (clean up only)
//!             → indeterminate, or a failure: fail (counted) or defer (systemic, uncounted)
//!             → non-terminal: hold the claim for the settle delay ("a mark may leave");
//!               BEGIN; lock the barrier and re-check it:
//!                 lost → end; rearmed → resolve; refire (the hook ran and took the
//!                 callback) → resolve 'refired';
//!                 mark → POST ERROR; 2xx → resolve, COMMIT; else ROLLBACK and fail or
//!                 defer (an unanswered mark: for the settle delay, so the next status read
//!                 comes after the API had time to apply it).
//! ```
//!
//! The transaction that holds the barrier's row lock commits only after the mark succeeded,
//! so the barrier (the recovery handle) goes exactly when recovery is confirmed; dropped
//! uncommitted (an error, a panic, a killed task) it rolls back.

use crate::Error;
use crate::api::{Execution, Failure, Mark, idempotency_key, stranded_message};
use crate::backoff::backoff;
use crate::circuit::{Circuit, Class, Event};
use crate::protocol::{Cause, HandedBack, Outcome, Verdict};
use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One claimed intent; `attempt` is the claim's fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub id: i64,
    pub execution_id: String,
    pub organization_id: String,
    pub remaining: i32,
    pub attempt: i32,
}

impl Intent {
    /// The execution id as log lines show it: whole up to 128 bytes, else its start and its
    /// length (ids come from the platform's rows; one line must not carry a 150 kB id).
    pub fn log_id(&self) -> String {
        const SHOWN: usize = 128;
        let id = &self.execution_id;
        if id.len() <= SHOWN {
            return id.clone();
        }
        let mut end = SHOWN;
        while !id.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} bytes)", &id[..end], id.len())
    }
}

/// The platform's internal status API.
pub trait StatusApi: Sync {
    /// The execution's status, and how long the request took (whatever its result).
    fn status(
        &self,
        execution_id: &str,
        org: &str,
    ) -> impl Future<Output = (Result<Execution, Failure>, Duration)> + Send;

    /// Marks the execution ERROR with `message`; how long the request took.
    fn mark_error(
        &self,
        execution_id: &str,
        org: &str,
        message: &str,
        idempotency_key: &str,
    ) -> impl Future<Output = (Result<Mark, Failure>, Duration)> + Send;
}

/// The outbox's fenced transitions for one claimed intent (each a compare-and-set on the
/// claim's `attempt`), on one connection.
pub trait Outbox: Send {
    type Tx<'a>: RecoveryTx + Send
    where
        Self: 'a;

    /// Records `outcome` and cleans up; false when the claim is no longer ours.
    fn resolve(
        &mut self,
        intent: &Intent,
        outcome: Outcome,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Commits that an ERROR mark may leave and holds the claim for at least `hold`; false
    /// when the claim is no longer ours (then no mark may be sent).
    fn mark_sending(
        &mut self,
        intent: &Intent,
        hold: Duration,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    /// Opens the recovery transaction.
    fn begin(&mut self) -> impl Future<Output = Result<Self::Tx<'_>, Error>> + Send;

    /// Gives the intent back after a failure about its execution: pending after `backoff`,
    /// dead at `max_attempts` failures, or lost.
    fn fail(
        &mut self,
        intent: &Intent,
        error: &str,
        backoff: Duration,
        max_attempts: i32,
    ) -> impl Future<Output = Result<HandedBack, Error>> + Send;

    /// Gives the intent back after a failure that says nothing about its execution: pending
    /// after `backoff`, uncounted, never dead; or lost.
    fn defer(
        &mut self,
        intent: &Intent,
        error: &str,
        backoff: Duration,
    ) -> impl Future<Output = Result<HandedBack, Error>> + Send;
}

/// The recovery transaction: it holds the barrier's row lock from `lock` until `commit`;
/// dropped uncommitted, it rolls back.
pub trait RecoveryTx {
    /// Renews the claim for `lease`, locks the barrier, re-checks it.
    fn lock(
        &mut self,
        intent: &Intent,
        lease: Duration,
    ) -> impl Future<Output = Result<Verdict, Error>> + Send;

    /// Records `outcome` in this transaction (a re-fire runs the hook here).
    fn resolve(
        &mut self,
        intent: &Intent,
        outcome: Outcome,
    ) -> impl Future<Output = Result<bool, Error>> + Send;

    fn commit(self) -> impl Future<Output = Result<(), Error>> + Send;
}

/// What a recovery reports besides its end: every HTTP attempt, and the circuit's changes.
pub trait Observer: Sync {
    /// One HTTP attempt: how long it took and how it ended (`answered`, or a failure cause).
    fn http(&self, took: Duration, result: &'static str);
    fn circuit(&self, event: &Event);
}

/// The recovery settings of `--lease`, `--settle-delay`, `--backoff-*`, `--max-attempts`.
#[derive(Debug, Clone)]
pub struct Policy {
    pub lease: Duration,
    /// How long after an unanswered ERROR mark the status is read again.
    pub settle_delay: Duration,
    /// One HTTP request's timeout: also the longest this relay may take from holding its claim
    /// to sending the ERROR mark (see `recheck_and_mark`).
    pub http_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub max_attempts: i32,
}

/// How one attempt at an intent ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Resolved (and committed) with this outcome.
    Resolved(Outcome),
    /// The claim is no longer ours: another relay took it over, or it is done.
    Lost,
    /// A failure about this execution: counted toward --max-attempts.
    Failed { cause: Cause, error: String },
    /// A failure that says nothing about this execution: not counted, retried after `after`.
    Deferred {
        cause: Cause,
        error: String,
        after: Duration,
    },
}

/// The next step after an observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Record this outcome (in the recovery transaction when one is open).
    Resolve(Outcome),
    /// Hold the claim for the settle delay, open the transaction, lock and re-check.
    Recheck,
    /// Send the ERROR mark, its message from the barrier's `remaining` read under the lock.
    Mark {
        remaining: Option<i32>,
    },
    /// A failed HTTP request; the circuit says how it counts. `settle`: it may have applied
    /// (an unanswered mark), so the status is read again only after the settle delay.
    Http {
        what: &'static str,
        failure: Failure,
        settle: bool,
    },
    End(End),
}

/// After the status read.
pub fn after_status(answer: Result<Execution, Failure>) -> Next {
    match answer {
        Ok(Execution::Gone) => Next::Resolve(Outcome::Gone),
        Ok(Execution::Terminal(_)) => Next::Resolve(Outcome::AlreadyTerminal),
        Ok(Execution::Indeterminate) => Next::End(End::Failed {
            cause: Cause::Indeterminate,
            error: "status read returned no status (indeterminate); not marking".to_string(),
        }),
        Ok(Execution::NonTerminal(_)) => Next::Recheck,
        Err(failure) => Next::Http {
            what: "status read",
            failure,
            settle: false,
        },
    }
}

/// After holding the claim before a mark may leave.
pub fn after_hold(held: bool) -> Next {
    if held {
        Next::Recheck
    } else {
        Next::End(End::Lost)
    }
}

/// After the re-check under the barrier's row lock (where a re-fire runs the hook). A hook's
/// error is a failure of this intent, retried; another error is the database's.
pub fn after_verdict(verdict: Result<Verdict, Error>) -> Next {
    match verdict {
        Err(e) if e.is_refire_hook() => Next::End(End::Failed {
            cause: Cause::RefireHook,
            error: e.to_string(),
        }),
        Err(e) => Next::End(End::Failed {
            cause: Cause::Database,
            error: format!("re-check: {e}"),
        }),
        Ok(Verdict::Lost) => Next::End(End::Lost),
        Ok(Verdict::Rearmed) => Next::Resolve(Outcome::Rearmed),
        Ok(Verdict::Refire) => Next::Resolve(Outcome::Refired),
        Ok(Verdict::Mark { remaining }) => Next::Mark { remaining },
    }
}

/// Just before the ERROR mark leaves, `since_hold` after the claim was held: a mark may only
/// leave within one HTTP timeout of the hold, else the status is read again (uncounted).
pub fn before_mark(next: Next, since_hold: Duration, http_timeout: Duration) -> Next {
    if since_hold <= http_timeout {
        return next;
    }
    Next::End(End::Deferred {
        cause: Cause::Stalled,
        error: format!(
            "{} s passed between holding the claim and the ERROR mark (more than the HTTP \
             timeout): not sending it; the status is read again",
            since_hold.as_secs()
        ),
        after: Duration::ZERO,
    })
}

/// After the ERROR mark.
pub fn after_mark(answer: Result<Mark, Failure>) -> Next {
    match answer {
        Ok(Mark::Marked) => Next::Resolve(Outcome::MarkedError),
        Ok(Mark::AlreadyFinal) => Next::Resolve(Outcome::AlreadyTerminal),
        Err(failure) => Next::Http {
            what: "ERROR mark",
            settle: failure.may_have_applied(),
            failure,
        },
    }
}

/// After recording `outcome`; an error is the database's, and ends the attempt with it.
pub fn after_resolve(outcome: Outcome, applied: Result<bool, Error>) -> Result<End, Error> {
    match applied {
        Ok(true) => Ok(End::Resolved(outcome)),
        Ok(false) => Ok(End::Lost),
        Err(e) => Err(e),
    }
}

/// Whether the canary's answer says the API itself is failing: a 500, or no answer at all.
pub fn canary_failing(answer: &Result<Execution, Failure>) -> bool {
    match answer {
        Err(f) => matches!(f, Failure::Status(500, _)) || f.is_systemic(),
        Ok(_) => false,
    }
}

/// A failed HTTP request as the circuit classed it.
pub fn after_http(what: &str, failure: &Failure, class: Class, settle: Option<Duration>) -> End {
    let error = format!("{what}: {failure}");
    match class {
        Class::PerIntent => End::Failed {
            cause: failure.cause(),
            error,
        },
        Class::Systemic { at_least } => End::Deferred {
            cause: failure.cause(),
            error,
            after: at_least.max(settle.unwrap_or(Duration::ZERO)),
        },
    }
}

fn result_label(failure: Option<&Failure>) -> &'static str {
    failure.map_or("answered", |f| f.cause().as_str())
}

/// The time the circuit sees: tokio's clock, so a simulation's virtual time drives it too.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The parts one recovery works with.
pub struct Recovery<'a, A: StatusApi, R: Observer> {
    pub api: &'a A,
    pub circuit: &'a Mutex<Circuit>,
    pub policy: &'a Policy,
    pub observer: &'a R,
}

impl<A: StatusApi, R: Observer> Recovery<'_, A, R> {
    fn circuit(&self, change: impl FnOnce(&mut Circuit) -> Option<Event>) {
        let event = self.circuit.lock().ok().and_then(|mut c| change(&mut c));
        if let Some(event) = event {
            self.observer.circuit(&event);
        }
    }

    /// An HTTP answer: an answer about the execution ends an episode; a failure is classed.
    fn answered<T>(&self, answer: &Result<T, Failure>, took: Duration) {
        self.observer
            .http(took, result_label(answer.as_ref().err()));
        if answer.is_ok() {
            self.circuit(|c| c.answered(now()));
        }
    }

    /// Classes a failed request (a 500 after asking the API about the canary, see
    /// [`CANARY`](crate::circuit::CANARY)) and ends the attempt accordingly.
    async fn classify(&self, intent: &Intent, what: &str, failure: &Failure, settle: bool) -> End {
        let doubts = self.circuit.lock().is_ok_and(|c| c.doubts(failure));
        let canary_failing = if doubts {
            let (answer, took) = self
                .api
                .status(crate::circuit::CANARY, &intent.organization_id)
                .await;
            self.observer
                .http(took, result_label(answer.as_ref().err()));
            canary_failing(&answer)
        } else {
            false
        };
        let mut class = Class::PerIntent;
        self.circuit(|c| {
            let (k, event) = c.failed(failure, canary_failing, now());
            class = k;
            event
        });
        after_http(
            what,
            failure,
            class,
            settle.then_some(self.policy.settle_delay),
        )
    }

    /// Carries one intent through its steps; `Err` is a database error outside the recovery
    /// transaction (the connection is then suspect).
    pub async fn run<O: Outbox>(&self, outbox: &mut O, intent: &Intent) -> Result<End, Error> {
        let (status, took) = self
            .api
            .status(&intent.execution_id, &intent.organization_id)
            .await;
        self.answered(&status, took);
        match after_status(status) {
            Next::Resolve(outcome) => after_resolve(outcome, outbox.resolve(intent, outcome).await),
            Next::Recheck => self.recheck_and_mark(outbox, intent).await,
            Next::Http { what, failure, .. } => {
                Ok(self.classify(intent, what, &failure, false).await)
            }
            Next::End(end) => Ok(end),
            Next::Mark { .. } => unreachable!("a status read never asks for a mark"),
        }
    }

    /// The non-terminal branch: hold the claim, then re-fire or mark under the row lock.
    ///
    /// The claim is held (committed) for the settle delay plus one HTTP timeout before the
    /// mark may leave, so no other relay reads the status again before a mark sent within that
    /// timeout had the settle delay to be applied, even if this relay dies with it in flight.
    /// A relay that stalled for longer between the hold and the POST (paused, say: its
    /// transaction may have been ended and the intent taken over meanwhile) does not send it.
    async fn recheck_and_mark<O: Outbox>(
        &self,
        outbox: &mut O,
        intent: &Intent,
    ) -> Result<End, Error> {
        let p = self.policy;
        let holding = tokio::time::Instant::now();
        let held = outbox
            .mark_sending(intent, p.settle_delay + p.http_timeout)
            .await?;
        if let Next::End(end) = after_hold(held) {
            return Ok(end);
        }
        let mut tx = outbox.begin().await?;
        let mut next = after_verdict(tx.lock(intent, p.lease).await);
        if let Next::Mark { .. } = next {
            next = before_mark(next, holding.elapsed(), p.http_timeout);
        }
        if let Next::Mark { remaining } = next {
            let (mark, took) = self
                .api
                .mark_error(
                    &intent.execution_id,
                    &intent.organization_id,
                    &stranded_message(remaining),
                    &idempotency_key(intent.id, &intent.execution_id),
                )
                .await;
            self.answered(&mark, took);
            next = after_mark(mark);
        }
        let end = match next {
            Next::Resolve(outcome) => after_resolve(outcome, tx.resolve(intent, outcome).await)?,
            Next::Http {
                what,
                failure,
                settle,
            } => self.classify(intent, what, &failure, settle).await,
            Next::End(end) => end,
            Next::Recheck | Next::Mark { .. } => unreachable!("decided above"),
        };
        if matches!(end, End::Resolved(_)) {
            tx.commit().await?;
        }
        Ok(end)
    }
}

/// Writes a failed attempt back to the outbox: counted with a backoff (`fail`), or deferred
/// uncounted (`defer`). None for an end that needs no write.
pub async fn hand_back<O: Outbox>(
    outbox: &mut O,
    intent: &Intent,
    end: &End,
    policy: &Policy,
    rng: &mut fastrand::Rng,
) -> Result<Option<HandedBack>, Error> {
    Ok(Some(match end {
        End::Resolved(_) | End::Lost => return Ok(None),
        End::Deferred { error, after, .. } => outbox.defer(intent, error, *after).await?,
        End::Failed { error, .. } => {
            let wait = backoff(policy.backoff_base, policy.backoff_max, intent.attempt, rng);
            outbox
                .fail(intent, error, wait, policy.max_attempts)
                .await?
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_decides_the_next_step() {
        assert_eq!(
            after_status(Ok(Execution::Gone)),
            Next::Resolve(Outcome::Gone)
        );
        for s in ["COMPLETED", "STOPPED", "ERROR"] {
            assert_eq!(
                after_status(Ok(Execution::Terminal(s.into()))),
                Next::Resolve(Outcome::AlreadyTerminal)
            );
        }
        assert_eq!(
            after_status(Ok(Execution::NonTerminal("EXECUTING".into()))),
            Next::Recheck
        );
        assert!(matches!(
            after_status(Ok(Execution::Indeterminate)),
            Next::End(End::Failed {
                cause: Cause::Indeterminate,
                ..
            })
        ));
        assert!(matches!(
            after_status(Err(Failure::Timeout)),
            Next::Http { settle: false, .. }
        ));
    }

    #[test]
    fn a_verdict_decides_whether_anything_is_sent() {
        assert_eq!(after_verdict(Ok(Verdict::Lost)), Next::End(End::Lost));
        assert_eq!(
            after_verdict(Ok(Verdict::Rearmed)),
            Next::Resolve(Outcome::Rearmed)
        );
        assert_eq!(
            after_verdict(Ok(Verdict::Refire)),
            Next::Resolve(Outcome::Refired)
        );
        assert_eq!(
            after_verdict(Ok(Verdict::Mark { remaining: Some(2) })),
            Next::Mark { remaining: Some(2) }
        );
        assert!(matches!(
            after_verdict(Err(Error::Protocol("unknown verdict".into()))),
            Next::End(End::Failed {
                cause: Cause::Database,
                ..
            })
        ));
    }

    #[test]
    fn the_canary_tells_a_failing_api_from_one_executions_500() {
        assert!(canary_failing(&Err(Failure::Status(500, String::new()))));
        assert!(canary_failing(&Err(Failure::Timeout)));
        assert!(canary_failing(&Err(Failure::Status(503, String::new()))));
        assert!(!canary_failing(&Ok(Execution::Gone)));
        assert!(!canary_failing(&Err(Failure::Status(
            404,
            "Not found.".into()
        ))));
        assert!(!canary_failing(&Err(Failure::Status(400, String::new()))));
    }

    #[test]
    fn a_mark_leaves_only_within_one_http_timeout_of_the_hold() {
        let mark = Next::Mark { remaining: Some(1) };
        let t = Duration::from_secs(30);
        assert_eq!(before_mark(mark.clone(), t, t), mark);
        assert!(matches!(
            before_mark(mark, t + Duration::from_millis(1), t),
            Next::End(End::Deferred {
                cause: Cause::Stalled,
                after: Duration::ZERO,
                ..
            })
        ));
    }

    #[test]
    fn an_unanswered_mark_settles_and_an_answered_one_resolves() {
        assert_eq!(
            after_mark(Ok(Mark::Marked)),
            Next::Resolve(Outcome::MarkedError)
        );
        assert_eq!(
            after_mark(Ok(Mark::AlreadyFinal)),
            Next::Resolve(Outcome::AlreadyTerminal)
        );
        for (failure, settle) in [
            (Failure::Timeout, true),
            (Failure::Transport("reset".into()), true),
            (Failure::Connect("refused".into()), false),
            (Failure::Status(500, String::new()), false),
        ] {
            assert!(
                matches!(after_mark(Err(failure.clone())), Next::Http { settle: s, .. } if s == settle),
                "{failure}"
            );
        }
    }

    #[test]
    fn a_resolve_error_ends_the_attempt() {
        assert_eq!(
            after_resolve(Outcome::Gone, Ok(true)).ok(),
            Some(End::Resolved(Outcome::Gone))
        );
        assert_eq!(
            after_resolve(Outcome::Gone, Ok(false)).ok(),
            Some(End::Lost)
        );
        assert!(after_resolve(Outcome::Refired, Err(Error::Protocol("db".into()))).is_err());
    }

    #[test]
    fn a_systemic_failure_waits_at_least_its_retry_after_and_the_settle_delay() {
        let f = Failure::Throttled(Some(Duration::from_secs(30)));
        let class = Class::Systemic {
            at_least: Duration::from_secs(30),
        };
        assert!(matches!(
            after_http("status read", &f, class, None),
            End::Deferred { after, .. } if after == Duration::from_secs(30)
        ));
        assert!(matches!(
            after_http("ERROR mark", &Failure::Timeout, Class::Systemic { at_least: Duration::ZERO }, Some(Duration::from_secs(60))),
            End::Deferred { after, .. } if after == Duration::from_secs(60)
        ));
        assert!(matches!(
            after_http(
                "status read",
                &Failure::Status(404, String::new()),
                Class::PerIntent,
                None
            ),
            End::Failed {
                cause: Cause::HttpStatus,
                ..
            }
        ));
    }
}
