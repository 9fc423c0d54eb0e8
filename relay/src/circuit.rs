//! Whether the status API is reachable at all, for the relay as a whole: a pure state machine,
//! the time passed in, the events it returns logged and counted by the caller.
//!
//! A systemic failure says nothing about the execution it happened on: every intent would fail
//! the same way. Those are refused or broken connections, timeouts, 502/503/504, 401/403 (the
//! key), 429 (the API sheds load), and a 500 once it is the answer for many executions at once
//! (see [`STORM`]). The first one opens an episode; from then on the relay claims no more than
//! one intent per backoff step (the probe), never before a 429's `Retry-After`, until an answer
//! that is about an execution (any 2xx, a 404 `not found`, another status) ends the episode.
//! The intents themselves wait in the outbox, uncounted, and proceed once it is over.

use crate::api::Failure;
use crate::backoff::backoff;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// A 500 is about its execution, and counts toward `--max-attempts`, until this many distinct
/// executions got one in a row with no usable answer in between: then the API itself is
/// failing (the platform's backend answers 500 for its own database trouble), and 500s are
/// systemic until it answers again. An outage's onset so costs at most `STORM - 1` intents one
/// counted failure each.
pub const STORM: usize = 3;

/// What the drain loop may claim now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// The API answers: claim as many as there are free slots.
    Open,
    /// In an episode, the next probe is due: claim one intent.
    Probe,
    /// In an episode: claim nothing until then.
    WaitUntil(Instant),
}

/// How a failed request counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// About this execution: counted toward `--max-attempts`.
    PerIntent,
    /// About the API: not counted; the intent waits at least `at_least` (a 429's Retry-After).
    Systemic { at_least: Duration },
}

/// A change the caller reports (one log line, the `api_reachable` gauge).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Opened { failure: Failure },
    Closed { after: Duration, probes: u32 },
}

#[derive(Debug)]
struct Episode {
    since: Instant,
    /// Probes sent so far; the backoff step grows with them.
    probes: u32,
    next_probe: Instant,
    probe_out: bool,
}

#[derive(Debug)]
pub struct Circuit {
    base: Duration,
    max: Duration,
    rng: fastrand::Rng,
    episode: Option<Episode>,
    /// Executions answered 500 since the last usable answer.
    errors_500: BTreeSet<String>,
}

impl Circuit {
    pub fn new(base: Duration, max: Duration, rng: fastrand::Rng) -> Circuit {
        Circuit {
            base,
            max,
            rng,
            episode: None,
            errors_500: BTreeSet::new(),
        }
    }

    pub fn is_open(&self) -> bool {
        self.episode.is_some()
    }

    fn step(&mut self, probes: u32) -> Duration {
        backoff(
            self.base,
            self.max,
            probes.saturating_add(1) as i32,
            &mut self.rng,
        )
    }

    /// The API answered about an execution (a status, a mark, a 404 `not found`, or a failure
    /// that is this execution's own): an episode, if any, is over.
    pub fn answered(&mut self, now: Instant) -> Option<Event> {
        self.errors_500.clear();
        self.episode.take().map(|e| Event::Closed {
            after: now.saturating_duration_since(e.since),
            probes: e.probes,
        })
    }

    /// A request about `execution_id` failed with `failure`: how it counts, and whether an
    /// episode began.
    pub fn failed(
        &mut self,
        execution_id: &str,
        failure: &Failure,
        now: Instant,
    ) -> (Class, Option<Event>) {
        let systemic = match failure {
            Failure::Status(500, _) => {
                self.errors_500.insert(execution_id.to_string());
                self.episode.is_some() || self.errors_500.len() >= STORM
            }
            f if f.is_systemic() => true,
            // Any other failure is an answer about this execution.
            _ => return (Class::PerIntent, self.answered(now)),
        };
        if !systemic {
            return (Class::PerIntent, None);
        }
        let at_least = failure.retry_after().unwrap_or(Duration::ZERO);
        let step = self.step(self.episode.as_ref().map_or(0, |e| e.probes + 1));
        let event = match self.episode.as_mut() {
            None => {
                self.episode = Some(Episode {
                    since: now,
                    probes: 0,
                    next_probe: now + step.max(at_least),
                    probe_out: false,
                });
                Some(Event::Opened {
                    failure: failure.clone(),
                })
            }
            // Only the probe's failure moves the episode on; the intents that were already
            // in flight when it began fail on their own and are just held.
            Some(e) if e.probe_out => {
                e.probe_out = false;
                e.probes += 1;
                e.next_probe = now + step.max(at_least);
                None
            }
            Some(e) => {
                e.next_probe = e.next_probe.max(now + at_least);
                None
            }
        };
        (Class::Systemic { at_least }, event)
    }

    /// What may be claimed now. `busy`: whether any intent is still being worked on (a probe
    /// whose task ended without reaching the API, on a database error, is written off).
    pub fn gate(&mut self, busy: bool, now: Instant) -> Gate {
        let base = self.base;
        let Some(probes) = self.episode.as_ref().map(|e| e.probes) else {
            return Gate::Open;
        };
        let step = self.step(probes);
        let Some(e) = self.episode.as_mut() else {
            return Gate::Open;
        };
        if e.probe_out {
            if busy {
                return Gate::WaitUntil(now + base);
            }
            e.probe_out = false;
            e.next_probe = now + step;
        }
        if now < e.next_probe {
            return Gate::WaitUntil(e.next_probe);
        }
        e.probe_out = true;
        Gate::Probe
    }

    /// The probe claim found nothing due: nothing needs the API until the next step.
    pub fn nothing_to_probe(&mut self, now: Instant) {
        let Some(probes) = self.episode.as_ref().map(|e| e.probes) else {
            return;
        };
        let step = self.step(probes);
        if let Some(e) = self.episode.as_mut() {
            e.probe_out = false;
            e.next_probe = now + step;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn circuit() -> Circuit {
        Circuit::new(S, 8 * S, fastrand::Rng::with_seed(7))
    }

    fn http(code: u16) -> Failure {
        Failure::Status(code, String::new())
    }

    #[test]
    fn a_systemic_failure_opens_one_episode_and_an_answer_closes_it() {
        let (mut c, t0) = (circuit(), Instant::now());
        assert_eq!(c.gate(false, t0), Gate::Open);
        let (class, event) = c.failed("e1", &Failure::Timeout, t0);
        assert_eq!(class, Class::Systemic { at_least: Duration::ZERO });
        assert!(matches!(event, Some(Event::Opened { .. })));
        // Others in flight fail too: no second event.
        assert_eq!(c.failed("e2", &http(503), t0).1, None);
        let Gate::WaitUntil(until) = c.gate(false, t0) else {
            panic!("waits")
        };
        assert!(until > t0 && until <= t0 + S, "first step within base");
        assert_eq!(c.gate(false, until), Gate::Probe);
        // The probe is out: nothing more while it runs.
        assert!(matches!(c.gate(true, until), Gate::WaitUntil(_)));
        assert_eq!(
            c.answered(until + S),
            Some(Event::Closed {
                after: until + S - t0,
                probes: 0
            })
        );
        assert_eq!(c.gate(false, until + S), Gate::Open);
        assert_eq!(c.answered(until + S), None, "closed once");
    }

    #[test]
    fn failed_probes_back_off_up_to_the_cap() {
        let (mut c, mut now) = (circuit(), Instant::now());
        c.failed("e", &Failure::Connect("refused".into()), now);
        let mut steps = Vec::new();
        for _ in 0..8 {
            let Gate::WaitUntil(t) = c.gate(false, now) else {
                panic!("waits")
            };
            steps.push(t - now);
            now = t;
            assert_eq!(c.gate(false, now), Gate::Probe);
            c.failed("e", &Failure::Connect("refused".into()), now);
        }
        assert!(steps.iter().all(|s| *s <= 8 * S), "{steps:?}");
        assert!(steps[5] >= 4 * S, "grows to the cap: {steps:?}");
    }

    #[test]
    fn per_intent_failures_count_and_end_an_episode() {
        let (mut c, t0) = (circuit(), Instant::now());
        assert_eq!(c.failed("e", &http(404), t0), (Class::PerIntent, None));
        c.failed("e", &http(401), t0);
        assert!(c.is_open());
        let (class, event) = c.failed("e", &Failure::Body("not JSON".into()), t0);
        assert_eq!(class, Class::PerIntent);
        assert!(matches!(event, Some(Event::Closed { .. })));
    }

    #[test]
    fn a_500_counts_until_many_executions_get_one_in_a_row() {
        let (mut c, t0) = (circuit(), Instant::now());
        for e in ["a", "a", "b"] {
            assert_eq!(c.failed(e, &http(500), t0).0, Class::PerIntent, "{e}");
        }
        let (class, event) = c.failed("c", &http(500), t0);
        assert!(matches!(class, Class::Systemic { .. }));
        assert!(matches!(event, Some(Event::Opened { .. })));
        assert!(matches!(c.failed("a", &http(500), t0).0, Class::Systemic { .. }));
        // Back to normal: a 500 is one execution's again.
        c.answered(t0);
        assert_eq!(c.failed("d", &http(500), t0).0, Class::PerIntent);
        // An answer in between breaks the row.
        c.answered(t0);
        c.failed("x", &http(500), t0);
        c.answered(t0);
        c.failed("y", &http(500), t0);
        assert_eq!(c.failed("z", &http(500), t0).0, Class::PerIntent);
    }

    #[test]
    fn a_429_is_systemic_and_its_retry_after_holds_the_next_probe() {
        let (mut c, t0) = (circuit(), Instant::now());
        let busy = Failure::Throttled(Some(30 * S));
        assert_eq!(
            c.failed("e", &busy, t0).0,
            Class::Systemic { at_least: 30 * S }
        );
        assert_eq!(c.gate(false, t0), Gate::WaitUntil(t0 + 30 * S));
        assert_eq!(c.gate(false, t0 + 30 * S), Gate::Probe);
        // A probe answered 429 again without a Retry-After: the backoff step alone.
        assert_eq!(
            c.failed("e", &Failure::Throttled(None), t0 + 30 * S).0,
            Class::Systemic { at_least: Duration::ZERO }
        );
    }

    #[test]
    fn a_probe_that_never_reached_the_api_is_written_off() {
        let (mut c, t0) = (circuit(), Instant::now());
        c.failed("e", &Failure::Timeout, t0);
        let later = t0 + 10 * S;
        assert_eq!(c.gate(false, later), Gate::Probe);
        // The probe's task ended on a database error: not busy any more, a new step begins.
        assert!(matches!(c.gate(false, later), Gate::WaitUntil(_)));
        c.nothing_to_probe(later);
        assert!(matches!(c.gate(false, later), Gate::WaitUntil(t) if t > later));
    }
}
