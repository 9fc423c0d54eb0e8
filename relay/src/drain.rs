//! The drain loop: claim due intents (woken by NOTIFY, or by the poll interval), work on up to
//! `--concurrency` of them at once, each through [`recovery`](crate::recovery), and stop
//! cleanly: in-flight intents finish, or are released to other relays after a grace period.

use crate::Error;
use crate::api::Api;
use crate::circuit::{Circuit, Gate};
use crate::metrics::Metrics;
use crate::protocol::HandedBack;
use crate::recovery::{End, Intent, Policy, Recovery, hand_back};
use crate::store::Store;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

pub struct Settings {
    pub database: crate::db::Target,
    pub concurrency: usize,
    pub policy: Policy,
    pub poll_interval: Duration,
    pub http_timeout: Duration,
    /// Drive the extension-free edition's ticks this often (see [`crate::ticker`]).
    pub reap_interval: Option<Duration>,
    pub once: bool,
}

impl Settings {
    /// The longest a healthy relay keeps a transaction idle: its recovery transaction waits for
    /// one HTTP request at most. Beyond that the server ends the session (a paused relay).
    pub fn transaction_idle(&self) -> Duration {
        self.http_timeout + Duration::from_secs(10)
    }
}

/// The longest a claim may take before the relay gives up on that connection (the server's
/// statement_timeout is 30 s; this also covers a server that cannot answer at all).
const CLAIM_TIMEOUT: Duration = Duration::from_secs(45);

/// What the drain's tasks share.
struct Shared {
    settings: Settings,
    api: Api,
    metrics: Arc<Metrics>,
    circuit: Mutex<Circuit>,
    pool: Mutex<Vec<Store>>,
    /// Intents being worked on, to release them if a shutdown has to cut work short.
    in_flight: Mutex<HashMap<i64, Intent>>,
}

/// An intent in the in-flight map and gauge for as long as this lives: however its task ends
/// (done, an error, a panic), dropping it takes the intent out of both.
struct InFlight {
    shared: Arc<Shared>,
    id: i64,
}

impl InFlight {
    fn enter(shared: &Arc<Shared>, intent: &Intent) -> InFlight {
        if let Ok(mut m) = shared.in_flight.lock() {
            m.insert(intent.id, intent.clone());
        }
        shared.metrics.in_flight(1);
        InFlight {
            shared: shared.clone(),
            id: intent.id,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // A panic while the map was held leaves it poisoned: the data is still right.
        let mut map = match self.shared.in_flight.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.remove(&self.id);
        self.shared.metrics.in_flight(-1);
    }
}

impl Shared {
    async fn store(&self) -> Result<Store, Error> {
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

    /// One intent, start to end, on a pooled connection.
    async fn work(&self, intent: &Intent) {
        let mut store = match self.store().await {
            Ok(s) => s,
            Err(e) => {
                warn!(intent = intent.id, error = %e, "no database connection; the intent returns when its lease expires");
                return;
            }
        };
        let recovery = Recovery {
            api: &self.api,
            circuit: &self.circuit,
            policy: &self.settings.policy,
            observer: &*self.metrics,
        };
        let mut rng = fastrand::Rng::new();
        let result = async {
            let end = recovery.run(&mut store, intent).await?;
            let handed_back =
                hand_back(&mut store, intent, &end, &self.settings.policy, &mut rng).await?;
            Ok::<_, Error>((end, handed_back))
        }
        .await;
        match result {
            Ok((end, handed_back)) => {
                self.report(intent, end, handed_back);
                self.give_back(store);
            }
            // The transaction, if any, dies with the connection; the lease brings the intent back.
            Err(e) => {
                warn!(intent = intent.id, error = %e, "database error; the intent returns when its lease expires")
            }
        }
    }

    /// The one place where outcomes and failures are counted and logged.
    fn report(&self, intent: &Intent, end: End, handed_back: Option<HandedBack>) {
        let id = intent.log_id();
        let m = &self.metrics;
        match (end, handed_back) {
            (End::Resolved(outcome), _) => {
                m.outcome(outcome);
                info!(
                    intent = intent.id, execution_id = %id, remaining_at_reap = intent.remaining,
                    outcome = outcome.as_str(), "recovered"
                );
            }
            (End::Lost, _) => {
                m.lost();
                info!(
                    intent = intent.id,
                    "claim taken over by another relay, or already done; leaving it"
                );
            }
            (
                End::Deferred {
                    cause,
                    error,
                    after,
                },
                state,
            ) => {
                m.failure(cause, state.unwrap_or(HandedBack::Lost));
                // The episode's start and end are logged once (see `circuit`); not every intent.
                debug!(intent = intent.id, execution_id = %id, %error, retry_in_ms = after.as_millis() as u64,
                       "systemic failure; the intent waits, uncounted");
            }
            (End::Failed { cause, error }, state) => {
                let state = state.unwrap_or(HandedBack::Lost);
                m.failure(cause, state);
                match state {
                    HandedBack::Dead => error!(
                        intent = intent.id, execution_id = %id, %error,
                        "recovery failed for the last time; the intent is dead (kept: replay it with outbox_replay())"
                    ),
                    HandedBack::Pending => warn!(
                        intent = intent.id, execution_id = %id, attempt = intent.attempt, %error,
                        "recovery attempt failed; barrier kept, retrying"
                    ),
                    HandedBack::Lost => {
                        info!(intent = intent.id, %error, "attempt failed, but the claim was already taken over")
                    }
                }
            }
        }
    }
}

/// Reads `pg_reaper_status` into the metrics every poll interval, on a connection of its own.
/// A change of the barrier tables that breaks pg_reaper's functions is logged as an ERROR from
/// the first read on (at start, too), and once more when it is fixed. With `gauges` (metrics
/// served), a role without the grants for the view gets one WARNING, and the database gauges
/// stay absent.
fn watch_status(
    target: crate::db::Target,
    transaction_idle: Duration,
    every: Duration,
    metrics: Arc<Metrics>,
    gauges: bool,
) {
    tokio::spawn(async move {
        let mut store: Option<Store> = None;
        let mut warned = false;
        let mut drift: Option<String> = None;
        loop {
            if store.as_ref().is_none_or(Store::is_closed) {
                store = Store::connect(&target, None, transaction_idle).await.ok();
            }
            if let Some(s) = &store {
                match s.status().await {
                    Ok(g) => {
                        if g.tables_drift != drift {
                            match &g.tables_drift {
                                Some(d) => error!(
                                    drift = %d,
                                    "the barrier tables changed under pg_reaper: barrier_enqueue \
                                     and barrier_claim fail until this is fixed"
                                ),
                                None => info!("the barrier tables are usable again"),
                            }
                            drift = g.tables_drift.clone();
                        }
                        metrics.database(Some(g));
                        warned = false;
                    }
                    Err(e) => {
                        metrics.database(None);
                        if gauges && !warned {
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
                    Err(e) => warn!(error = %e, "LISTEN failed"),
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

/// --once with --reap-interval: one tick before the pass, so that what it queues is drained.
async fn tick_once(settings: &Settings) {
    let ticked = match Store::connect(&settings.database, None, settings.transaction_idle()).await {
        Ok(store) => crate::ticker::tick(&store).await.map(|_| ()),
        Err(e) => Err(e),
    };
    if let Err(e) = ticked {
        warn!(error = %e, "tick failed; draining what is queued");
    }
}

/// `work` unless shutdown is asked for first (then None): SIGTERM is honoured while Postgres
/// does not answer.
async fn unless_stopped<F: std::future::Future>(
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

/// What one round of the loop decided.
enum Round {
    /// Every slot was filled: claim again at once.
    Again,
    /// Wait this long, or for a wake-up, a finished task or the shutdown.
    Pause(Duration),
    /// Leave the loop; the exit code.
    Stop(i32),
}

struct Drain {
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    tasks: JoinSet<()>,
    claimer: Option<Store>,
    /// --once is one pass over what was due when it started: an intent that fails during the
    /// pass is not claimed again by it.
    pass_start: Option<SystemTime>,
    db_failures: u32,
    shutdown: watch::Receiver<bool>,
    wake: mpsc::UnboundedReceiver<()>,
}

/// Runs until `shutdown` (or, with `once`, until nothing is due). Returns the process exit code.
pub async fn run(
    settings: Settings,
    api: Api,
    metrics: Arc<Metrics>,
    database_gauges: bool,
    shutdown: watch::Receiver<bool>,
) -> i32 {
    if !settings.once {
        watch_status(
            settings.database.clone(),
            settings.transaction_idle(),
            settings.poll_interval,
            metrics.clone(),
            database_gauges,
        );
    }
    metrics.api_reachable(true);
    let circuit = Circuit::new(
        settings.policy.backoff_base,
        settings.policy.backoff_max,
        fastrand::Rng::new(),
    );
    if let Some(every) = settings.reap_interval {
        if settings.once {
            tick_once(&settings).await;
        } else {
            crate::ticker::spawn(
                settings.database.clone(),
                settings.transaction_idle(),
                every,
            );
        }
    }
    let (wake_tx, wake) = mpsc::unbounded_channel();
    if !settings.once {
        listen(
            settings.database.clone(),
            settings.transaction_idle(),
            wake_tx.clone(),
        );
    }
    info!(
        concurrency = settings.concurrency,
        once = settings.once,
        "relay started"
    );
    let permits = Arc::new(Semaphore::new(settings.concurrency));
    let mut drain = Drain {
        shared: Arc::new(Shared {
            settings,
            api,
            metrics,
            circuit: Mutex::new(circuit),
            pool: Mutex::default(),
            in_flight: Mutex::default(),
        }),
        permits,
        tasks: JoinSet::new(),
        claimer: None,
        pass_start: None,
        db_failures: 0,
        shutdown,
        wake,
    };
    let code = loop {
        if *drain.shutdown.borrow() {
            break 0;
        }
        match drain.round().await {
            Round::Again => {}
            Round::Pause(pause) => drain.pause(pause).await,
            Round::Stop(code) => break code,
        }
    };
    drop(wake_tx);
    if code == 0 {
        drain.finish().await;
    }
    code
}

impl Drain {
    fn gate(&self) -> Gate {
        let busy = !self.tasks.is_empty();
        let now = tokio::time::Instant::now().into_std();
        self.shared
            .circuit
            .lock()
            .map_or(Gate::Open, |mut c| c.gate(busy, now))
    }

    async fn round(&mut self) -> Round {
        while self.tasks.try_join_next().is_some() {}
        let once = self.shared.settings.once;
        // In a systemic episode: one probe per backoff step, nothing else.
        let gate = self.gate();
        if once && gate != Gate::Open && self.tasks.is_empty() {
            info!(
                "stopping (--once): the status API is unreachable; the intents wait in the outbox"
            );
            return Round::Stop(0);
        }
        let free = match gate {
            Gate::Open => self.permits.available_permits(),
            Gate::Probe => self.permits.available_permits().min(1),
            Gate::WaitUntil(_) => 0,
        };
        if free > 0 {
            if let Some(stop) = self.connect().await {
                return stop;
            }
            if let Some(round) = self.claim(free, gate).await {
                return round;
            }
        }
        Round::Pause(match gate {
            Gate::WaitUntil(t) => t.saturating_duration_since(std::time::Instant::now()),
            _ if self.claimer.is_none() => Duration::from_secs(1),
            _ => self.shared.settings.poll_interval,
        })
    }

    /// Makes sure the claiming connection is up; `Some` to leave the loop.
    async fn connect(&mut self) -> Option<Round> {
        let s = &self.shared.settings;
        if self.claimer.as_ref().is_none_or(Store::is_closed) {
            let connecting = Store::connect(&s.database, None, s.transaction_idle());
            let Some(connected) = unless_stopped(&mut self.shutdown, connecting).await else {
                return Some(Round::Stop(0));
            };
            match connected {
                Ok(c) => self.claimer = Some(c),
                Err(e) => {
                    self.db_failures += 1;
                    if self.shared.settings.once && self.db_failures >= 3 {
                        error!(error = %e, "cannot reach Postgres");
                        return Some(Round::Stop(1));
                    }
                    warn!(error = %e, "Postgres or the extension is not ready; retrying");
                    self.claimer = None;
                }
            }
        }
        if self.shared.settings.once && self.pass_start.is_none() {
            let read = match &self.claimer {
                Some(c) => Some(c.now().await),
                None => None,
            };
            match read {
                Some(Ok(t)) => self.pass_start = Some(t),
                Some(Err(e)) => {
                    warn!(error = %e, "reading the database clock failed; reconnecting");
                    self.claimer = None;
                }
                None => {}
            }
        }
        None
    }

    /// Claims up to `free` intents and starts them; `Some` when the round is decided here.
    async fn claim(&mut self, free: usize, gate: Gate) -> Option<Round> {
        let s = &self.shared.settings;
        let claimer = self.claimer.as_ref()?;
        // Bounded on this side too: a partitioned server cannot cancel the statement.
        let claiming = tokio::time::timeout(
            CLAIM_TIMEOUT,
            claimer.claim(free as i32, s.policy.lease, self.pass_start),
        );
        let once = s.once;
        let claimed = match unless_stopped(&mut self.shutdown, claiming).await? {
            Ok(claimed) => claimed,
            Err(_) => Err(Error::Protocol(format!(
                "no answer to the claim within {CLAIM_TIMEOUT:?}"
            ))),
        };
        let intents = match claimed {
            Ok(intents) => intents,
            Err(e) => {
                warn!(error = %e, "claiming from the outbox failed; reconnecting");
                self.claimer = None;
                return None;
            }
        };
        self.db_failures = 0;
        self.shared.metrics.claimed(intents.len());
        if gate == Gate::Probe && intents.is_empty() {
            let now = tokio::time::Instant::now().into_std();
            if let Ok(mut c) = self.shared.circuit.lock() {
                c.nothing_to_probe(now);
            }
        }
        if once && intents.is_empty() && self.tasks.is_empty() {
            return Some(Round::Stop(0));
        }
        let full = gate == Gate::Open && intents.len() == free;
        for intent in intents {
            self.start(intent).await;
        }
        full.then_some(Round::Again)
    }

    async fn start(&mut self, intent: Intent) {
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return;
        };
        let shared = self.shared.clone();
        let in_flight = InFlight::enter(&shared, &intent);
        self.tasks.spawn(async move {
            shared.work(&intent).await;
            drop(in_flight);
            drop(permit);
        });
    }

    async fn pause(&mut self, pause: Duration) {
        tokio::select! {
            _ = self.wake.recv() => while self.wake.try_recv().is_ok() {},
            _ = tokio::time::sleep(pause) => {}
            Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => {}
            _ = self.shutdown.changed() => {}
        }
    }

    /// Lets in-flight intents finish; whatever is still running after the grace period is cut
    /// (its transaction rolls back with its connection) and its intent released to other relays.
    async fn finish(mut self) {
        let n = self.tasks.len();
        if n > 0 {
            info!(in_flight = n, "stopping: finishing in-flight intents");
        }
        let s = &self.shared.settings;
        let grace = s.http_timeout * 2 + Duration::from_secs(5);
        let tasks = &mut self.tasks;
        let finished =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if finished.is_err() {
            self.tasks.shutdown().await;
            let left: Vec<Intent> = self
                .shared
                .in_flight
                .lock()
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            match Store::connect(&s.database, None, s.transaction_idle()).await {
                Ok(store) => {
                    for intent in &left {
                        if let Err(e) = store.release(intent).await {
                            warn!(intent = intent.id, error = %e, "release failed; its lease will expire");
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
}
