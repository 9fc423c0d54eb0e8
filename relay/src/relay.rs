//! The drain loop: claim due intents (woken by NOTIFY, or by the poll interval), work on up to
//! `--concurrency` of them at once, and carry each through these steps:
//!
//! status read → gone / already terminal: resolve (clean up only)
//!             → indeterminate, or a failure about this execution: fail (counted, backoff)
//!             → a systemic failure: defer (uncounted) and open an episode (see `circuit`)
//!             → non-terminal: commit "a mark may leave" (holds the claim for the settle
//!               delay); BEGIN; recovery_lock (row lock + re-check);
//!                 rearmed → resolve; refire → resolve 'refired' (the hook runs in it);
//!                 mark → POST ERROR; 2xx → resolve, COMMIT; else ROLLBACK and fail or
//!                 defer (an unanswered mark: for the settle delay, so the next status read
//!                 comes after the API had time to apply it).
//!
//! The transaction that holds the barrier's row lock is committed only after the mark
//! succeeded, so the barrier (the recovery handle) disappears exactly when recovery is
//! confirmed, and a killed relay leaves nothing half-done: its transaction rolls back and its
//! claim is held until the settle delay has passed.

use crate::api::{Api, Execution, Failure, Mark, idempotency_key, stranded_message};
use crate::circuit::{Circuit, Gate};
use crate::metrics::Metrics;
use crate::protocol::{Cause, HandedBack, Outcome, Verdict};
use crate::store::{Intent, Store, StoreError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

pub struct Settings {
    pub database: crate::db::Target,
    pub concurrency: usize,
    pub lease: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub max_attempts: i32,
    pub poll_interval: Duration,
    pub http_timeout: Duration,
    /// How long after an unanswered ERROR mark the status is read again.
    pub settle_delay: Duration,
    pub once: bool,
}

impl Settings {
    /// The longest a healthy relay keeps a transaction idle: its recovery transaction waits for
    /// one HTTP request at most. Beyond that the server ends the session (a paused relay).
    pub fn transaction_idle(&self) -> Duration {
        self.http_timeout + Duration::from_secs(10)
    }
}

struct Context {
    settings: Settings,
    api: Api,
    metrics: Arc<Metrics>,
    circuit: Circuit,
    pool: Mutex<Vec<Store>>,
    /// Intents being worked on, to release them if a shutdown has to cut work short.
    in_flight: Mutex<HashMap<i64, Intent>>,
}

/// Exponential backoff with jitter: base × 2^(attempt−1), capped, times a random 50–100 %.
pub fn backoff(base: Duration, max: Duration, attempt: i32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << (attempt.clamp(1, 31) - 1) as u32)
        .min(max);
    exp.mul_f64(0.5 + fastrand::f64() / 2.0)
}

/// How one attempt at an intent ended. `record` writes it back and reports it: the one place
/// where outcomes and failures are counted and logged.
enum End {
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

impl Context {
    async fn store(&self) -> Result<Store, String> {
        let idle = self.pool.lock().ok().and_then(|mut p| p.pop());
        match idle {
            Some(s) if !s.is_closed() => Ok(s),
            _ => {
                Store::connect(
                    &self.settings.database,
                    None,
                    self.settings.transaction_idle(),
                )
                .await
            }
        }
    }

    fn give_back(&self, store: Store) {
        if !store.is_closed()
            && let Ok(mut p) = self.pool.lock()
        {
            p.push(store);
        }
    }

    /// One intent, start to end. Errors are Postgres errors; HTTP trouble is an `End`.
    async fn recover(&self, store: &Store, intent: &Intent) -> Result<(), StoreError> {
        let end = self.attempt(store, intent).await?;
        self.record(store, intent, end).await
    }

    async fn attempt(&self, store: &Store, intent: &Intent) -> Result<End, StoreError> {
        let (status, took) = self
            .api
            .status(&intent.execution_id, &intent.organization_id)
            .await;
        self.metrics.http(took);
        match status {
            Ok(answer) => {
                self.circuit.reachable();
                match answer {
                    Execution::Gone => self.resolve(store, intent, Outcome::Gone).await,
                    Execution::Terminal(_) => {
                        self.resolve(store, intent, Outcome::AlreadyTerminal).await
                    }
                    Execution::Indeterminate => Ok(End::Failed {
                        cause: Cause::Indeterminate,
                        error: "status read returned no status (indeterminate); not marking"
                            .to_string(),
                    }),
                    Execution::NonTerminal(_) => self.mark(store, intent).await,
                }
            }
            Err(f) => Ok(self.failed("status read", &f, Duration::ZERO)),
        }
    }

    /// Resolves outside any transaction (gone, already terminal: clean up only).
    async fn resolve(
        &self,
        store: &Store,
        intent: &Intent,
        outcome: Outcome,
    ) -> Result<End, StoreError> {
        Ok(if store.resolve(intent, outcome).await? {
            End::Resolved(outcome)
        } else {
            End::Lost
        })
    }

    /// The non-terminal branch: re-check under the barrier's row lock, then re-fire or mark.
    async fn mark(&self, store: &Store, intent: &Intent) -> Result<End, StoreError> {
        let settle = self.settings.settle_delay;
        if !store.mark_sending(intent, settle).await? {
            return Ok(End::Lost);
        }
        store.begin().await?;
        let end = match store.lock(intent, self.settings.lease).await {
            Err(e) => End::Failed {
                cause: Cause::Database,
                error: format!("re-check: {e}"),
            },
            Ok(Verdict::Lost) => End::Lost,
            Ok(Verdict::Rearmed) => self.resolve(store, intent, Outcome::Rearmed).await?,
            Ok(Verdict::Refire) => match store.resolve(intent, Outcome::Refired).await {
                Ok(true) => End::Resolved(Outcome::Refired),
                Ok(false) => End::Lost,
                Err(e) => End::Failed {
                    cause: Cause::RefireHook,
                    error: format!("re-fire hook: {}", StoreError::from(e)),
                },
            },
            Ok(Verdict::Mark { remaining }) => {
                let (mark, took) = self
                    .api
                    .mark_error(
                        &intent.execution_id,
                        &intent.organization_id,
                        &stranded_message(remaining),
                        &idempotency_key(intent.id, &intent.execution_id),
                    )
                    .await;
                self.metrics.http(took);
                match mark {
                    Ok(m) => {
                        self.circuit.reachable();
                        let outcome = match m {
                            Mark::AlreadyFinal => Outcome::AlreadyTerminal,
                            Mark::Marked => Outcome::MarkedError,
                        };
                        self.resolve(store, intent, outcome).await?
                    }
                    // An unanswered mark may still be applied: read the status only after the
                    // API had the settle delay to do so.
                    Err(f) if f.may_have_applied() => self.failed("ERROR mark", &f, settle),
                    Err(f) => self.failed("ERROR mark", &f, Duration::ZERO),
                }
            }
        };
        if matches!(end, End::Resolved(_)) {
            store.commit().await?;
        } else {
            store.rollback().await?;
        }
        Ok(end)
    }

    /// Classifies an HTTP failure of `what`: systemic ones open (or feed) an episode and are
    /// deferred by at least `after`; the others are the execution's own, and counted.
    fn failed(&self, what: &str, f: &Failure, after: Duration) -> End {
        let error = format!("{what}: {f}");
        if f.is_systemic() {
            self.circuit.unreachable(f);
            End::Deferred {
                cause: f.cause(),
                error,
                after,
            }
        } else {
            self.circuit.reachable();
            End::Failed {
                cause: f.cause(),
                error,
            }
        }
    }

    async fn record(&self, store: &Store, intent: &Intent, end: End) -> Result<(), StoreError> {
        let id = intent.log_id();
        match end {
            End::Resolved(outcome) => {
                self.metrics.outcome(outcome);
                info!(
                    intent = intent.id, execution_id = %id, remaining_at_reap = intent.remaining,
                    outcome = outcome.as_str(), "recovered"
                );
            }
            End::Lost => {
                self.metrics.lost();
                info!(
                    intent = intent.id,
                    "claim taken over by another relay, or already done; leaving it"
                );
            }
            End::Deferred {
                cause,
                error,
                after,
            } => {
                let state = store.defer(intent, &error, after).await?;
                self.metrics.failure(cause, state);
                // The episode's start and end are logged once (see `circuit`); not every intent.
                debug!(intent = intent.id, execution_id = %id, %error, retry_in_ms = after.as_millis() as u64,
                       "systemic failure; the intent waits, uncounted");
            }
            End::Failed { cause, error } => {
                let s = &self.settings;
                let wait = backoff(s.backoff_base, s.backoff_max, intent.attempt);
                let state = store.fail(intent, &error, wait, s.max_attempts).await?;
                self.metrics.failure(cause, state);
                match state {
                    HandedBack::Dead => error!(
                        intent = intent.id, execution_id = %id, %error,
                        "recovery failed for the last time; the intent is dead (kept: replay it with outbox_replay())"
                    ),
                    HandedBack::Pending => warn!(
                        intent = intent.id, execution_id = %id, attempt = intent.attempt, %error,
                        retry_in_ms = wait.as_millis() as u64, "recovery attempt failed; barrier kept, retrying"
                    ),
                    HandedBack::Lost => {
                        info!(intent = intent.id, %error, "attempt failed, but the claim was already taken over")
                    }
                }
            }
        }
        Ok(())
    }
}

async fn work(ctx: Arc<Context>, intent: Intent) {
    ctx.metrics.in_flight(1);
    match ctx.store().await {
        Ok(store) => match ctx.recover(&store, &intent).await {
            Ok(()) => ctx.give_back(store),
            // The transaction, if any, dies with the connection; the lease brings the intent back.
            Err(e) => {
                warn!(intent = intent.id, error = %e, "database error; the intent returns when its lease expires")
            }
        },
        Err(e) => {
            warn!(intent = intent.id, error = %e, "no database connection; the intent returns when its lease expires")
        }
    }
    if let Ok(mut m) = ctx.in_flight.lock() {
        m.remove(&intent.id);
    }
    ctx.metrics.in_flight(-1);
}

/// Reads `pg_reaper_status` into the metrics every poll interval, on a connection of its own.
/// A role without the grants for it gets one WARNING, and the database gauges stay absent.
fn collect_database_gauges(
    target: crate::db::Target,
    transaction_idle: Duration,
    every: Duration,
    metrics: Arc<Metrics>,
) {
    tokio::spawn(async move {
        let mut store: Option<Store> = None;
        let mut warned = false;
        loop {
            if store.as_ref().is_none_or(Store::is_closed) {
                store = Store::connect(&target, None, transaction_idle).await.ok();
            }
            if let Some(s) = &store {
                match s.status().await {
                    Ok(g) => {
                        metrics.database(Some(g));
                        warned = false;
                    }
                    Err(e) => {
                        metrics.database(None);
                        if !warned {
                            warn!(error = %e, "cannot read pg_reaper_status for the database gauges \
                                   (the relay's role needs SELECT on it and EXECUTE on reaper_status())");
                            warned = true;
                        }
                    }
                }
            }
            tokio::time::sleep(every).await;
        }
    });
}

/// Keeps a LISTEN connection up and turns every notification into a wake-up.
fn listen(target: crate::db::Target, transaction_idle: Duration, wake: mpsc::UnboundedSender<()>) {
    tokio::spawn(async move {
        loop {
            match Store::connect(&target, Some(wake.clone()), transaction_idle).await {
                Ok(store) => match store.listen().await {
                    Ok(()) => {
                        debug!("listening on {}", crate::protocol::CHANNEL);
                        let _ = wake.send(()); // whatever was queued while we were away
                        while !store.is_closed() {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                    Err(e) => warn!(error = %StoreError::from(e), "LISTEN failed"),
                },
                Err(e) => warn!(error = %e, "listener connection failed; polling meanwhile"),
            }
            if wake.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

/// The longest a claim may take before the relay gives up on that connection (the server's
/// statement_timeout is 30 s; this also covers a server that cannot answer at all).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(45);

/// `work` unless shutdown is asked for first (then None): SIGTERM is honoured while Postgres
/// does not answer.
async fn until_shutdown<F: std::future::Future>(
    shutdown: &mut watch::Receiver<bool>,
    work: F,
) -> Option<F::Output> {
    if *shutdown.borrow() {
        return None;
    }
    tokio::select! {
        out = work => Some(out),
        _ = shutdown.changed() => None,
    }
}

/// Runs until `shutdown` (or, with `once`, until nothing is due). Returns the process exit code.
pub async fn run(
    settings: Settings,
    api: Api,
    metrics: Arc<Metrics>,
    database_gauges: bool,
    mut shutdown: watch::Receiver<bool>,
) -> i32 {
    if database_gauges {
        collect_database_gauges(
            settings.database.clone(),
            settings.transaction_idle(),
            settings.poll_interval,
            metrics.clone(),
        );
    }
    let circuit = Circuit::new(settings.backoff_base, settings.backoff_max, metrics.clone());
    let ctx = Arc::new(Context {
        settings,
        api,
        metrics,
        circuit,
        pool: Mutex::new(Vec::new()),
        in_flight: Mutex::default(),
    });
    let s = &ctx.settings;
    let (wake_tx, mut wake) = mpsc::unbounded_channel();
    if !s.once {
        listen(s.database.clone(), s.transaction_idle(), wake_tx.clone());
    }
    let permits = Arc::new(Semaphore::new(s.concurrency));
    let mut tasks = JoinSet::new();
    let mut claimer: Option<Store> = None;
    let mut pass_start: Option<String> = None;
    let mut db_failures = 0u32;
    info!(concurrency = s.concurrency, once = s.once, "relay started");
    loop {
        if *shutdown.borrow() {
            break;
        }
        while tasks.try_join_next().is_some() {}
        // In a systemic episode: one probe per backoff step, nothing else.
        let gate = ctx.circuit.gate(!tasks.is_empty());
        if s.once && gate != Gate::Open && tasks.is_empty() {
            info!(
                "stopping (--once): the status API is unreachable; the intents wait in the outbox"
            );
            break;
        }
        let free = match gate {
            Gate::Open => permits.available_permits(),
            Gate::Probe => permits.available_permits().min(1),
            Gate::WaitUntil(_) => 0,
        };
        let mut more = false;
        if free > 0 {
            if claimer.as_ref().is_none_or(Store::is_closed) {
                let connecting = Store::connect(&s.database, None, s.transaction_idle());
                let Some(connected) = until_shutdown(&mut shutdown, connecting).await else {
                    break;
                };
                claimer = match connected {
                    Ok(c) => Some(c),
                    Err(e) => {
                        db_failures += 1;
                        if s.once && db_failures >= 3 {
                            error!(error = %e, "cannot reach Postgres");
                            return 1;
                        }
                        warn!(error = %e, "Postgres or the extension is not ready; retrying");
                        None
                    }
                };
            }
            // --once is one pass over what was due when it started: an intent that fails
            // during the pass is not claimed again by it.
            if s.once
                && pass_start.is_none()
                && let Some(c) = &claimer
            {
                match c.now().await {
                    Ok(t) => pass_start = Some(t),
                    Err(e) => {
                        warn!(error = %StoreError::from(e), "reading the database clock failed; reconnecting");
                        claimer = None;
                    }
                }
            }
            if let Some(c) = &claimer {
                // Bounded on this side too: a partitioned server cannot cancel the statement.
                let claiming = tokio::time::timeout(
                    CLAIM_TIMEOUT,
                    c.claim(free as i32, s.lease, pass_start.as_deref()),
                );
                let Some(claimed) = until_shutdown(&mut shutdown, claiming).await else {
                    break;
                };
                let claimed = claimed.unwrap_or_else(|_| {
                    Err(StoreError::Protocol(format!(
                        "no answer to the claim within {CLAIM_TIMEOUT:?}"
                    )))
                });
                match claimed {
                    Ok(intents) => {
                        db_failures = 0;
                        ctx.metrics.claimed(intents.len());
                        if gate == Gate::Probe && intents.is_empty() {
                            ctx.circuit.nothing_to_probe();
                        }
                        more = gate == Gate::Open && intents.len() == free;
                        if s.once && intents.is_empty() && tasks.is_empty() {
                            break;
                        }
                        for intent in intents {
                            let Ok(permit) = permits.clone().acquire_owned().await else {
                                break;
                            };
                            if let Ok(mut m) = ctx.in_flight.lock() {
                                m.insert(intent.id, intent.clone());
                            }
                            let ctx = ctx.clone();
                            tasks.spawn(async move {
                                work(ctx, intent).await;
                                drop(permit);
                            });
                        }
                    }
                    Err(e) => {
                        warn!(error = %e, "claiming from the outbox failed; reconnecting");
                        claimer = None;
                    }
                }
            }
        }
        if more {
            continue;
        }
        let pause = match gate {
            Gate::WaitUntil(t) => t.saturating_duration_since(std::time::Instant::now()),
            _ if claimer.is_none() => Duration::from_secs(1),
            _ => s.poll_interval,
        };
        tokio::select! {
            _ = wake.recv() => while wake.try_recv().is_ok() {},
            _ = tokio::time::sleep(pause) => {}
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = shutdown.changed() => {}
        }
    }
    drop(wake_tx);
    finish(&ctx, tasks).await;
    0
}

/// Lets in-flight intents finish; whatever is still running after the grace period is cut
/// (its transaction rolls back with its connection) and its intent released to other relays.
async fn finish(ctx: &Arc<Context>, mut tasks: JoinSet<()>) {
    let n = tasks.len();
    if n > 0 {
        info!(in_flight = n, "stopping: finishing in-flight intents");
    }
    let grace = ctx.settings.http_timeout * 2 + Duration::from_secs(5);
    let finished =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        tasks.shutdown().await;
        let left: Vec<Intent> = ctx
            .in_flight
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        match Store::connect(
            &ctx.settings.database,
            None,
            ctx.settings.transaction_idle(),
        )
        .await
        {
            Ok(store) => {
                for intent in &left {
                    if let Err(e) = store.release(intent).await {
                        warn!(intent = intent.id, error = %StoreError::from(e), "release failed; its lease will expire");
                    }
                }
                info!(
                    released = left.len(),
                    "released the intents that did not finish in time"
                );
            }
            Err(e) => {
                warn!(error = %e, "cannot release unfinished intents; their leases will expire")
            }
        }
    }
    info!("relay stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters_within_half() {
        let (base, max) = (Duration::from_secs(1), Duration::from_secs(300));
        for attempt in 1..40 {
            let full = base
                .saturating_mul(1 << (attempt.min(31) - 1) as u32)
                .min(max);
            let b = backoff(base, max, attempt);
            assert!(
                b >= full / 2 && b <= full,
                "attempt {attempt}: {b:?} vs {full:?}"
            );
        }
        let samples: std::collections::HashSet<_> =
            (0..20).map(|_| backoff(base, max, 5)).collect();
        assert!(samples.len() > 1, "jitter varies");
    }
}
