//! The drain loop: claim due intents (woken by NOTIFY, or by the poll interval), work on up to
//! `--concurrency` of them at once, and carry each through contract §5:
//!
//! status read → gone / already terminal: resolve (clean up only)
//!             → indeterminate / failure: push back with backoff (barrier kept, nothing marked)
//!             → non-terminal: BEGIN; recovery_lock (row lock + re-check);
//!                 rearmed → resolve; refire → resolve 'refired' (the hook runs in it);
//!                 mark → POST ERROR; 2xx → resolve; else ROLLBACK and push back; COMMIT.
//!
//! The transaction that holds the barrier's row lock is committed only after the mark
//! succeeded, so the barrier (the recovery handle) disappears exactly when recovery is
//! confirmed, and a killed relay leaves nothing half-done: its transaction rolls back and its
//! lease expires.

use crate::api::{Api, Execution, Failure, Mark, stranded_message};
use crate::metrics::Metrics;
use crate::store::{Intent, Outcome, Store, StoreError, Verdict};
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

pub struct Settings {
    pub database_url: String,
    pub concurrency: usize,
    pub lease: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    pub max_attempts: i32,
    pub poll_interval: Duration,
    pub http_timeout: Duration,
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
    pool: Mutex<Vec<Store>>,
    /// Intents being worked on, to release them if a shutdown has to cut work short.
    in_flight: Mutex<HashMap<i64, Intent>>,
}

/// Exponential backoff with jitter: base × 2^(attempt−1), capped, times a random 50–100 %.
pub fn backoff(base: Duration, max: Duration, attempt: i32) -> Duration {
    let exp = base
        .saturating_mul(1u32 << (attempt.clamp(1, 31) - 1) as u32)
        .min(max);
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    exp.mul_f64(0.5 + (random % 1000) as f64 / 2000.0)
}

impl Context {
    async fn store(&self) -> Result<Store, String> {
        let idle = self.pool.lock().ok().and_then(|mut p| p.pop());
        match idle {
            Some(s) if !s.is_closed() => Ok(s),
            _ => {
                Store::connect(
                    &self.settings.database_url,
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

    async fn fail(
        &self,
        store: &Store,
        intent: &Intent,
        cause: &str,
        error: &str,
    ) -> Result<(), StoreError> {
        let wait = backoff(
            self.settings.backoff_base,
            self.settings.backoff_max,
            intent.attempt,
        );
        let state = store
            .fail(intent, error, wait, self.settings.max_attempts)
            .await?;
        self.metrics.failure(cause, &state);
        match state.as_str() {
            "dead" => error!(
                intent = intent.id, execution_id = %intent.log_id(), attempts = intent.attempt, %error,
                "recovery failed for the last time; the intent is dead (kept: replay it with outbox_replay())"
            ),
            "pending" => warn!(
                intent = intent.id, execution_id = %intent.log_id(), attempt = intent.attempt, %error,
                retry_in_ms = wait.as_millis() as u64, "recovery attempt failed; barrier kept, retrying"
            ),
            _ => {
                info!(intent = intent.id, %error, "attempt failed, but the claim was already taken over")
            }
        }
        Ok(())
    }

    async fn resolved(
        &self,
        store: &Store,
        intent: &Intent,
        outcome: Outcome,
    ) -> Result<(), StoreError> {
        if store.resolve(intent, outcome).await? {
            self.metrics.outcome(outcome);
            info!(
                intent = intent.id, execution_id = %intent.log_id(), remaining_at_reap = intent.remaining,
                outcome = outcome.as_str(), "recovered"
            );
        }
        Ok(())
    }

    /// One intent, start to end. Errors are Postgres errors; HTTP trouble is handled inside.
    async fn recover(&self, store: &Store, intent: &Intent) -> Result<(), StoreError> {
        let (status, took) = self
            .api
            .status(&intent.execution_id, &intent.organization_id)
            .await;
        if !took.is_zero() {
            self.metrics.http(took);
        }
        let failure = |f: &Failure| {
            if f.cause() == "unauthorized" {
                error!(%f, "the status API refused the key: a configuration problem (check the API key); retrying");
            }
            f.to_string()
        };
        match status {
            Ok(Execution::Gone) => self.resolved(store, intent, Outcome::Gone).await,
            Ok(Execution::Terminal(_)) => {
                self.resolved(store, intent, Outcome::AlreadyTerminal).await
            }
            Ok(Execution::Indeterminate) => {
                let msg = "status read returned no status (indeterminate); not marking";
                self.fail(store, intent, "indeterminate", msg).await
            }
            Err(f) => {
                self.fail(
                    store,
                    intent,
                    f.cause(),
                    &format!("status read: {}", failure(&f)),
                )
                .await
            }
            Ok(Execution::NonTerminal(_)) => {
                store.begin().await?;
                let verdict = match store.lock(intent, self.settings.lease).await {
                    Ok(v) => v,
                    Err(e) => {
                        store.rollback().await?;
                        return self
                            .fail(store, intent, "database", &format!("re-check: {e}"))
                            .await;
                    }
                };
                match verdict {
                    Verdict::Lost => {
                        store.rollback().await?;
                        self.metrics.lost();
                        info!(
                            intent = intent.id,
                            "claim taken over by another relay; leaving it"
                        );
                        Ok(())
                    }
                    Verdict::Rearmed => {
                        self.resolved(store, intent, Outcome::Rearmed).await?;
                        Ok(store.commit().await?)
                    }
                    Verdict::Refire => match store.resolve(intent, Outcome::Refired).await {
                        Ok(true) => {
                            store.commit().await?;
                            self.metrics.outcome(Outcome::Refired);
                            info!(intent = intent.id, execution_id = %intent.log_id(), outcome = "refired", "recovered");
                            Ok(())
                        }
                        Ok(false) => {
                            store.rollback().await?;
                            self.metrics.lost();
                            info!(
                                intent = intent.id,
                                "claim taken over by another relay; leaving it"
                            );
                            Ok(())
                        }
                        Err(e) => {
                            store.rollback().await?;
                            let msg = format!("re-fire hook: {}", StoreError::from(e));
                            self.fail(store, intent, "refire_hook", &msg).await
                        }
                    },
                    Verdict::Mark { remaining } => {
                        let message = stranded_message(remaining);
                        let (mark, took) = self
                            .api
                            .mark_error(&intent.execution_id, &intent.organization_id, &message)
                            .await;
                        if !took.is_zero() {
                            self.metrics.http(took);
                        }
                        match mark {
                            Ok(m) => {
                                let outcome = if m == Mark::AlreadyFinal {
                                    Outcome::AlreadyTerminal
                                } else {
                                    Outcome::MarkedError
                                };
                                self.resolved(store, intent, outcome).await?;
                                Ok(store.commit().await?)
                            }
                            Err(f) => {
                                store.rollback().await?;
                                self.fail(
                                    store,
                                    intent,
                                    f.cause(),
                                    &format!("ERROR mark: {}", failure(&f)),
                                )
                                .await
                            }
                        }
                    }
                }
            }
        }
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

/// Keeps a LISTEN connection up and turns every notification into a wake-up.
fn listen(url: String, transaction_idle: Duration, wake: mpsc::UnboundedSender<()>) {
    tokio::spawn(async move {
        loop {
            match Store::connect(&url, Some(wake.clone()), transaction_idle).await {
                Ok(store) => match store.listen().await {
                    Ok(()) => {
                        debug!("listening on pg_reaper_outbox");
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

/// Runs until `shutdown` (or, with `once`, until nothing is due). Returns the process exit code.
pub async fn run(
    settings: Settings,
    api: Api,
    metrics: Arc<Metrics>,
    mut shutdown: watch::Receiver<bool>,
) -> i32 {
    let ctx = Arc::new(Context {
        settings,
        api,
        metrics,
        pool: Mutex::new(Vec::new()),
        in_flight: Mutex::default(),
    });
    let s = &ctx.settings;
    let (wake_tx, mut wake) = mpsc::unbounded_channel();
    if !s.once {
        listen(
            s.database_url.clone(),
            s.transaction_idle(),
            wake_tx.clone(),
        );
    }
    let permits = Arc::new(Semaphore::new(s.concurrency));
    let mut tasks = JoinSet::new();
    let mut claimer: Option<Store> = None;
    let mut db_failures = 0u32;
    info!(concurrency = s.concurrency, once = s.once, "relay started");
    loop {
        if *shutdown.borrow() {
            break;
        }
        while tasks.try_join_next().is_some() {}
        let free = permits.available_permits();
        let mut more = false;
        if free > 0 {
            if claimer.as_ref().is_none_or(Store::is_closed) {
                claimer = match Store::connect(&s.database_url, None, s.transaction_idle()).await {
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
            if let Some(c) = &claimer {
                match c.claim(free as i32, s.lease).await {
                    Ok(intents) => {
                        db_failures = 0;
                        ctx.metrics.claimed(intents.len());
                        more = intents.len() == free;
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
                        warn!(error = %StoreError::from(e), "claiming from the outbox failed; reconnecting");
                        claimer = None;
                    }
                }
            }
        }
        if more {
            continue;
        }
        let pause = if claimer.is_none() {
            Duration::from_secs(1)
        } else {
            s.poll_interval
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
            &ctx.settings.database_url,
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
