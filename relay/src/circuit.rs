//! Whether the status API is reachable at all, for the relay as a whole.
//!
//! A systemic failure (refused or broken connections, timeouts, 502/503/504, 401/403) says
//! nothing about the execution it happened on: every intent would fail the same way. So the
//! first one opens an episode: one ERROR line, `pg_reaper_relay_api_reachable` 0, and from then
//! on the relay claims no more than one intent per backoff step (the probe) until an answer
//! that is about an execution (any 2xx, a 404 `not found`, another status) ends the episode
//! with one line. The intents themselves wait in the outbox, uncounted, and proceed by
//! themselves once the episode is over.

use crate::api::Failure;
use crate::metrics::Metrics;
use crate::protocol::Cause;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::{error, info};

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

struct Episode {
    since: Instant,
    /// Probes sent so far; the backoff step grows with them.
    probes: u32,
    next_probe: Instant,
    probe_out: bool,
}

pub struct Circuit {
    base: Duration,
    max: Duration,
    metrics: Arc<Metrics>,
    episode: Mutex<Option<Episode>>,
}

impl Circuit {
    pub fn new(base: Duration, max: Duration, metrics: Arc<Metrics>) -> Circuit {
        metrics.api_reachable(true);
        Circuit {
            base,
            max,
            metrics,
            episode: Mutex::new(None),
        }
    }

    fn step(&self, probes: u32) -> Duration {
        crate::relay::backoff(self.base, self.max, probes.saturating_add(1) as i32)
    }

    /// A systemic failure was seen.
    pub fn unreachable(&self, failure: &Failure) {
        let Ok(mut episode) = self.episode.lock() else {
            return;
        };
        let now = Instant::now();
        match episode.as_mut() {
            None => {
                let step = self.step(0);
                let hint = if failure.cause() == Cause::Unauthorized {
                    " (the API refused the key: a configuration problem, check the API key)"
                } else {
                    ""
                };
                error!(
                    cause = failure.cause().as_str(), error = %failure,
                    "status API unreachable{hint}: likely systemic, not one execution; intents wait \
                     uncounted, one probe per backoff step until it answers"
                );
                self.metrics.api_reachable(false);
                *episode = Some(Episode {
                    since: now,
                    probes: 0,
                    next_probe: now + step,
                    probe_out: false,
                });
            }
            // Only the probe's failure moves the episode on; the intents that were already
            // in flight when it began fail on their own and are just held.
            Some(e) if e.probe_out => {
                e.probe_out = false;
                e.probes += 1;
                e.next_probe = now + self.step(e.probes);
            }
            Some(_) => {}
        }
    }

    /// The API answered about an execution: an episode, if any, is over.
    pub fn reachable(&self) {
        let Ok(mut episode) = self.episode.lock() else {
            return;
        };
        if let Some(e) = episode.take() {
            info!(
                after_s = e.since.elapsed().as_secs_f64(),
                probes = e.probes,
                "status API reachable again; resuming every waiting intent"
            );
            self.metrics.api_reachable(true);
        }
    }

    /// What may be claimed now. `busy`: whether any intent is still being worked on (a probe
    /// whose task ended without reaching the API, on a database error, is written off).
    pub fn gate(&self, busy: bool) -> Gate {
        let Ok(mut episode) = self.episode.lock() else {
            return Gate::Open;
        };
        let Some(e) = episode.as_mut() else {
            return Gate::Open;
        };
        let now = Instant::now();
        if e.probe_out {
            if busy {
                return Gate::WaitUntil(now + self.base);
            }
            e.probe_out = false;
            e.next_probe = now + self.step(e.probes);
        }
        if now < e.next_probe {
            return Gate::WaitUntil(e.next_probe);
        }
        e.probe_out = true;
        Gate::Probe
    }

    /// The probe claim found nothing due: nothing needs the API until the next step.
    pub fn nothing_to_probe(&self) {
        if let Ok(mut episode) = self.episode.lock()
            && let Some(e) = episode.as_mut()
        {
            e.probe_out = false;
            e.next_probe = Instant::now() + self.step(e.probes);
        }
    }
}
