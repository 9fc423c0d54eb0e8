//! Whether the status API is reachable at all, for the relay as a whole: a pure state machine,
//! the time passed in, the events it returns logged and counted by the caller.
//!
//! A systemic failure says nothing about the execution it happened on: every intent would fail
//! the same way. Those are refused or broken connections, timeouts, 502/503/504, 401/403 (the
//! key), 429 (the API sheds load), and a 500 when the API answers 500 about any execution (see
//! [`CANARY`]). The first one opens an episode; from then on the relay claims no more than
//! one intent per backoff step (the probe), never before a 429's `Retry-After`, until an answer
//! that is about an execution (any 2xx, a 404 `not found`, another status) ends the episode.
//! The intents themselves wait in the outbox, uncounted, and proceed once it is over.

use crate::api::Failure;
use crate::backoff::backoff;
use std::time::{Duration, Instant};

/// The execution asked about when a 500 needs telling apart: an id that never exists (the nil
/// UUID, so that it matches the platform's URL pattern). The platform's backend answers 500
/// for its own trouble (its database down, its key missing) whatever the execution, and 404
/// `not found` for this one when it is well. So a 500 about an execution is that execution's
/// own (counted toward `--max-attempts`) when the canary gets any other answer, and systemic
/// when the canary gets a 500 or no answer: one extra GET per 500, and the rule holds with one
/// waiting execution as with thousands. During an episode every 500 is systemic, unasked.
pub const CANARY: &str = "00000000-0000-0000-0000-000000000000";

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
}

impl Circuit {
    pub fn new(base: Duration, max: Duration, rng: fastrand::Rng) -> Circuit {
        Circuit {
            base,
            max,
            rng,
            episode: None,
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
        self.episode.take().map(|e| Event::Closed {
            after: now.saturating_duration_since(e.since),
            probes: e.probes,
        })
    }

    /// Whether `failure` needs the canary's answer to be classed: a 500 outside an episode.
    pub fn doubts(&self, failure: &Failure) -> bool {
        matches!(failure, Failure::Status(500, _)) && self.episode.is_none()
    }

    /// A request failed with `failure`: how it counts, and whether an episode began.
    /// `canary_failing`: for a 500 the circuit [`doubts`](Circuit::doubts), whether the canary
    /// got a 500 or no answer too.
    pub fn failed(
        &mut self,
        failure: &Failure,
        canary_failing: bool,
        now: Instant,
    ) -> (Class, Option<Event>) {
        let systemic = match failure {
            Failure::Status(500, _) => self.episode.is_some() || canary_failing,
            f => f.is_systemic(),
        };
        if !systemic {
            // An answer about this execution: the API works.
            return (Class::PerIntent, self.answered(now));
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
        let (class, event) = c.failed(&Failure::Timeout, false, t0);
        assert_eq!(
            class,
            Class::Systemic {
                at_least: Duration::ZERO
            }
        );
        assert!(matches!(event, Some(Event::Opened { .. })));
        // Others in flight fail too: no second event.
        assert_eq!(c.failed(&http(503), false, t0).1, None);
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
        c.failed(&Failure::Connect("refused".into()), false, now);
        let mut steps = Vec::new();
        for _ in 0..8 {
            let Gate::WaitUntil(t) = c.gate(false, now) else {
                panic!("waits")
            };
            steps.push(t - now);
            now = t;
            assert_eq!(c.gate(false, now), Gate::Probe);
            c.failed(&Failure::Connect("refused".into()), false, now);
        }
        assert!(steps.iter().all(|s| *s <= 8 * S), "{steps:?}");
        assert!(steps[5] >= 4 * S, "grows to the cap: {steps:?}");
    }

    #[test]
    fn per_intent_failures_count_and_end_an_episode() {
        let (mut c, t0) = (circuit(), Instant::now());
        assert_eq!(c.failed(&http(404), false, t0), (Class::PerIntent, None));
        c.failed(&http(401), false, t0);
        assert!(c.is_open());
        let (class, event) = c.failed(&Failure::Body("not JSON".into()), false, t0);
        assert_eq!(class, Class::PerIntent);
        assert!(matches!(event, Some(Event::Closed { .. })));
    }

    #[test]
    fn a_500_is_systemic_when_the_canary_gets_one_too() {
        let (mut c, t0) = (circuit(), Instant::now());
        assert!(c.doubts(&http(500)));
        assert!(!c.doubts(&http(503)) && !c.doubts(&http(404)));
        assert_eq!(c.failed(&http(500), false, t0), (Class::PerIntent, None));
        let (class, event) = c.failed(&http(500), true, t0);
        assert!(matches!(class, Class::Systemic { .. }));
        assert!(matches!(event, Some(Event::Opened { .. })));
        // In the episode, a 500 is systemic without asking.
        assert!(!c.doubts(&http(500)));
        assert!(matches!(
            c.failed(&http(500), false, t0).0,
            Class::Systemic { .. }
        ));
        c.answered(t0);
        assert_eq!(c.failed(&http(500), false, t0).0, Class::PerIntent);
    }

    #[test]
    fn a_429_is_systemic_and_its_retry_after_holds_the_next_probe() {
        let (mut c, t0) = (circuit(), Instant::now());
        let busy = Failure::Throttled(Some(30 * S));
        assert_eq!(
            c.failed(&busy, false, t0).0,
            Class::Systemic { at_least: 30 * S }
        );
        assert_eq!(c.gate(false, t0), Gate::WaitUntil(t0 + 30 * S));
        assert_eq!(c.gate(false, t0 + 30 * S), Gate::Probe);
        // A probe answered 429 again without a Retry-After: the backoff step alone.
        assert_eq!(
            c.failed(&Failure::Throttled(None), false, t0 + 30 * S).0,
            Class::Systemic {
                at_least: Duration::ZERO
            }
        );
    }

    #[test]
    fn a_probe_that_never_reached_the_api_is_written_off() {
        let (mut c, t0) = (circuit(), Instant::now());
        c.failed(&Failure::Timeout, false, t0);
        let later = t0 + 10 * S;
        assert_eq!(c.gate(false, later), Gate::Probe);
        // The probe's task ended on a database error: not busy any more, a new step begins.
        assert!(matches!(c.gate(false, later), Gate::WaitUntil(_)));
        c.nothing_to_probe(later);
        assert!(matches!(c.gate(false, later), Gate::WaitUntil(t) if t > later));
    }
}
