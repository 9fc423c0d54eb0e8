//! A deterministic simulation of the recovery protocol. Each seed is a schedule: the strands,
//! the relays (each the library's real recovery executor and circuit), the API's answers and
//! outages, kills and pauses at any step, lease expiry, all in virtual time on one thread. The
//! invariants are checked after every step that could break them.

pub mod model;

use model::{Db, Defects, Shared, State, lock};
use pg_reaper_relay::Error;
use pg_reaper_relay::api::{Execution, Failure, Mark};
use pg_reaper_relay::circuit::{Circuit, Event, Gate};
use pg_reaper_relay::protocol::{HandedBack, Outcome, Verdict};
use pg_reaper_relay::recovery::{
    Intent, Observer, Outbox, Policy, Recovery, RecoveryTx, StatusApi, hand_back,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{Instant, sleep};

const S: Duration = Duration::from_secs(1);
/// The stuck timeout after which a re-fired barrier strands again.
const REFIRE_STUCK: Duration = Duration::from_secs(1800);

/// What can make a schedule fail: the defects of earlier rounds, put back one at a time.
#[derive(Debug, Clone, Copy, Default)]
pub struct Config {
    pub defects: Defects,
    /// The relay re-reads the status right after an unanswered mark (no settle delay).
    pub no_settle_delay: bool,
}

/// How the API misbehaves during an outage window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    /// Connection refused.
    Down,
    /// No answer; nothing applied.
    Silent,
    /// No answer in time; a mark is applied after the client gave up.
    Late,
    Unavailable,
    Throttled,
    /// 500 for everything (the backend's own database trouble).
    Errors,
}

#[derive(Debug, Clone)]
struct Window {
    kind: Outage,
    from: Instant,
    to: Instant,
}

#[derive(Debug, Clone)]
struct Exec {
    status: &'static str,
    exists: bool,
    /// Marks the API applied (an ERROR over ERROR counts again: the platform re-applies it).
    marks: u32,
    /// Only queue-transport executions have the platform's already_final guard.
    guarded: bool,
}

/// The platform's status API.
#[derive(Clone)]
struct Api(Arc<ApiState>);

impl std::ops::Deref for Api {
    type Target = ApiState;
    fn deref(&self) -> &ApiState {
        &self.0
    }
}

struct ApiState {
    execs: Mutex<BTreeMap<String, Exec>>,
    windows: Vec<Window>,
    rng: Mutex<fastrand::Rng>,
    db: Shared,
    timeout: Duration,
    settle: Duration,
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "COMPLETED" | "STOPPED" | "ERROR")
}

impl ApiState {
    fn outage(&self) -> Option<Outage> {
        let now = Instant::now();
        self.windows
            .iter()
            .find(|w| w.from <= now && now < w.to)
            .map(|w| w.kind)
    }

    fn roll(&self, n: u32) -> u32 {
        self.rng.lock().map_or(0, |mut r| r.u32(0..n))
    }

    /// Applies an ERROR mark as the platform does; checks the invariants. `late`: applied
    /// after the relay stopped waiting for its answer.
    fn apply_mark(&self, execution_id: &str, late: bool) -> Mark {
        let mut execs = self.execs.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = execs.get_mut(execution_id) else {
            return Mark::Marked;
        };
        if e.guarded && matches!(e.status, "COMPLETED" | "STOPPED") {
            return Mark::AlreadyFinal;
        }
        let mut db = lock(&self.db);
        if matches!(e.status, "COMPLETED" | "STOPPED") && late {
            // The relay released the barrier when no answer came; the platform's late callback
            // finished it and completed the execution before the API applied the mark.
            db.late_overwrites += 1;
            db.note(format!(
                "API: late mark over {} {execution_id} (the known window)",
                e.status
            ));
        } else if matches!(e.status, "COMPLETED" | "STOPPED") {
            db.violations.push(format!(
                "execution {execution_id} was {} and got an ERROR mark",
                e.status
            ));
        }
        e.marks += 1;
        db.note(format!(
            "API: ERROR mark applied to {execution_id} (now {})",
            e.marks
        ));
        if e.marks > 1 {
            db.violations.push(format!(
                "execution {execution_id} got {} applied ERROR marks",
                e.marks
            ));
        }
        e.status = "ERROR";
        Mark::Marked
    }

    /// The answer a request gets during `outage`, or None to answer normally.
    async fn failure(&self, outage: Option<Outage>) -> Option<Failure> {
        Some(match outage? {
            Outage::Down => Failure::Connect("connection refused".into()),
            Outage::Silent | Outage::Late => {
                sleep(self.timeout).await;
                Failure::Timeout
            }
            Outage::Unavailable => Failure::Status(503, String::new()),
            Outage::Throttled => {
                Failure::Throttled(Some(Duration::from_secs(u64::from(self.roll(120)))))
            }
            Outage::Errors => Failure::Status(500, String::new()),
        })
    }

    async fn latency(&self) {
        sleep(Duration::from_millis(u64::from(self.roll(2000)))).await;
    }
}

impl StatusApi for Api {
    async fn status(
        &self,
        execution_id: &str,
        _org: &str,
    ) -> (Result<Execution, Failure>, Duration) {
        let started = Instant::now();
        self.latency().await;
        if let Some(f) = self.failure(self.outage()).await {
            return (Err(f), started.elapsed());
        }
        let execs = self.execs.lock().unwrap_or_else(|p| p.into_inner());
        let answer = match execs.get(execution_id) {
            Some(e) if e.exists && is_terminal(e.status) => Execution::Terminal(e.status.into()),
            Some(e) if e.exists => Execution::NonTerminal(e.status.into()),
            _ => Execution::Gone,
        };
        (Ok(answer), started.elapsed())
    }

    async fn mark_error(
        &self,
        execution_id: &str,
        _org: &str,
        _message: &str,
        _key: &str,
    ) -> (Result<Mark, Failure>, Duration) {
        let started = Instant::now();
        self.latency().await;
        let outage = self.outage();
        // A request that gets no answer in time may still be applied, within the settle
        // delay of its sending (the assumption the settle delay rests on).
        let late = outage == Some(Outage::Late) || (outage.is_none() && self.roll(30) == 0);
        if late {
            let api = self.clone();
            let id = execution_id.to_string();
            lock(&self.db).note(format!("API: mark of {execution_id} will apply late"));
            let after = self.timeout
                + Duration::from_millis(u64::from(
                    self.roll((self.settle - self.timeout).as_millis() as u32 / 2),
                ));
            tokio::spawn(async move {
                sleep(after).await;
                api.apply_mark(&id, true);
            });
            sleep(self.timeout).await;
            return (Err(Failure::Timeout), started.elapsed());
        }
        if let Some(f) = self.failure(outage).await {
            return (Err(f), started.elapsed());
        }
        (Ok(self.apply_mark(execution_id, false)), started.elapsed())
    }
}

/// A relay's connection to the model database; a statement may be paused (SIGSTOP) first.
struct Conn {
    db: Shared,
    session: u64,
    rng: fastrand::Rng,
}

impl Conn {
    fn new(db: &Shared, seed: u64) -> Conn {
        let session = lock(db).open_session();
        Conn {
            db: db.clone(),
            session,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// Sometimes the relay stops for a while before (or after) a statement: a VM pause.
    async fn maybe_pause(&mut self) {
        if self.rng.u32(0..60) == 0 {
            let pause = Duration::from_secs(u64::from(self.rng.u32(1..120)));
            lock(&self.db).note(format!(
                "session {}: paused {} s",
                self.session,
                pause.as_secs()
            ));
            sleep(pause).await;
        }
    }

    /// Waits while another transaction holds a row this statement needs (lock_timeout).
    async fn wait_for_locks(&self, intent: &Intent, barrier: bool) -> Result<(), Error> {
        let started = Instant::now();
        loop {
            let (blocked, timeout) = {
                let mut db = lock(&self.db);
                db.end_idle_sessions();
                (db.blocked(self.session, intent, barrier), db.lock_timeout)
            };
            if !blocked {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(Error::Protocol(
                    "canceling statement due to lock timeout".into(),
                ));
            }
            sleep(Duration::from_millis(500)).await;
        }
    }

    async fn on_row<T>(
        &mut self,
        intent: &Intent,
        barrier: bool,
        op: impl FnOnce(&mut Db, u64) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.maybe_pause().await;
        self.wait_for_locks(intent, barrier).await?;
        let out = op(&mut lock(&self.db), self.session);
        self.maybe_pause().await;
        out
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        lock(&self.db).close_session(self.session);
    }
}

struct Tx<'a> {
    conn: &'a mut Conn,
    done: bool,
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        if !self.done {
            lock(&self.conn.db).rollback(self.conn.session);
        }
    }
}

impl Outbox for Conn {
    type Tx<'a> = Tx<'a>;

    async fn resolve(&mut self, intent: &Intent, outcome: Outcome) -> Result<bool, Error> {
        self.on_row(intent, true, |db, s| db.resolve(s, intent, outcome))
            .await
    }

    async fn mark_sending(&mut self, intent: &Intent, hold: Duration) -> Result<bool, Error> {
        self.on_row(intent, false, |db, s| db.hold(s, intent, hold))
            .await
    }

    async fn begin(&mut self) -> Result<Tx<'_>, Error> {
        self.maybe_pause().await;
        lock(&self.db).begin(self.session)?;
        Ok(Tx {
            conn: self,
            done: false,
        })
    }

    async fn fail(
        &mut self,
        intent: &Intent,
        _error: &str,
        backoff: Duration,
        max_attempts: i32,
    ) -> Result<HandedBack, Error> {
        self.on_row(intent, false, |db, s| {
            db.give_back(s, intent, backoff, true, max_attempts)
        })
        .await
    }

    async fn defer(
        &mut self,
        intent: &Intent,
        _error: &str,
        backoff: Duration,
    ) -> Result<HandedBack, Error> {
        self.on_row(intent, false, |db, s| {
            db.give_back(s, intent, backoff, false, i32::MAX)
        })
        .await
    }
}

impl RecoveryTx for Tx<'_> {
    async fn lock(&mut self, intent: &Intent, lease: Duration) -> Result<Verdict, Error> {
        self.conn
            .on_row(intent, true, |db, s| db.recovery_lock(s, intent, lease))
            .await
    }

    async fn resolve(&mut self, intent: &Intent, outcome: Outcome) -> Result<bool, Error> {
        self.conn
            .on_row(intent, true, |db, s| db.resolve(s, intent, outcome))
            .await
    }

    async fn commit(mut self) -> Result<(), Error> {
        self.conn.maybe_pause().await;
        self.done = true;
        lock(&self.conn.db).commit(self.conn.session)
    }
}

/// Counts what the relays report (nothing to log in a simulation).
#[derive(Default)]
struct Quiet;

impl Observer for Quiet {
    fn http(&self, _took: Duration, _result: &'static str) {}
    fn circuit(&self, _event: &Event) {}
}

/// One relay: its circuit, up to `concurrency` intents at once, each on a connection of its
/// own, as the drain loop does.
async fn relay(db: Shared, api: Api, policy: Policy, concurrency: usize, seed: u64) {
    let circuit = Mutex::new(Circuit::new(
        policy.backoff_base,
        policy.backoff_max,
        fastrand::Rng::with_seed(seed),
    ));
    let shared = Arc::new((circuit, api, policy));
    let mut tasks = tokio::task::JoinSet::new();
    let mut claimer = Conn::new(&db, seed);
    let mut n = 0u64;
    loop {
        while tasks.try_join_next().is_some() {}
        let now = Instant::now().into_std();
        let gate = shared
            .0
            .lock()
            .map_or(Gate::Open, |mut c| c.gate(!tasks.is_empty(), now));
        let free = match gate {
            Gate::Open => concurrency - tasks.len(),
            Gate::Probe => (concurrency - tasks.len()).min(1),
            Gate::WaitUntil(_) => 0,
        };
        if free > 0 {
            let lease = shared.2.lease;
            let claimed = lock(&db).claim(claimer.session, free, lease);
            match claimed {
                Ok(intents) => {
                    if gate == Gate::Probe
                        && intents.is_empty()
                        && let Ok(mut c) = shared.0.lock()
                    {
                        c.nothing_to_probe(now);
                    }
                    for intent in intents {
                        n += 1;
                        let (db, shared) = (db.clone(), shared.clone());
                        let task_seed = seed.wrapping_mul(1_000_003).wrapping_add(n);
                        tasks.spawn(async move {
                            let mut conn = Conn::new(&db, task_seed);
                            let (circuit, api, policy) = &*shared;
                            let recovery = Recovery {
                                api,
                                circuit,
                                policy,
                                observer: &Quiet,
                            };
                            let mut rng = fastrand::Rng::with_seed(task_seed);
                            if let Ok(end) = recovery.run(&mut conn, &intent).await {
                                let _ = hand_back(&mut conn, &intent, &end, policy, &mut rng).await;
                            }
                        });
                    }
                }
                Err(_) => claimer = Conn::new(&db, seed.wrapping_add(n)),
            }
        }
        let pause = match gate {
            Gate::WaitUntil(t) => t
                .saturating_duration_since(Instant::now().into_std())
                .min(15 * S),
            _ => 15 * S,
        };
        tokio::select! {
            biased;
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = sleep(pause) => {}
        }
    }
}

/// What one schedule did, for the report.
#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub executions: usize,
    pub outcomes: BTreeMap<&'static str, usize>,
    pub kills: usize,
    pub virtual_seconds: u64,
    pub late_overwrites: u32,
}

/// Runs the schedule of `seed`; Err names the first invariant broken. With `trace`, prints
/// what happened.
pub fn run(seed: u64, config: Config) -> Result<Stats, String> {
    run_traced(seed, config, false)
}

pub fn run_traced(seed: u64, config: Config, trace: bool) -> Result<Stats, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(schedule(seed, config, trace))
}

/// A broken invariant, with the trace printed when asked for.
fn broken(db: &Db, what: String, trace: bool) -> String {
    if trace {
        for line in &db.trace {
            println!("{line}");
        }
    }
    what
}

async fn schedule(seed: u64, config: Config, trace: bool) -> Result<Stats, String> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let t0 = Instant::now();
    // The defaults, or the short timings of a test run (where a lease is shorter than a
    // recovery transaction can last).
    let (http_timeout, lease) = if rng.bool() {
        (30 * S, 60 * S)
    } else {
        (3 * S, 3 * S)
    };
    let settle = 2 * http_timeout;
    let policy = Policy {
        lease,
        settle_delay: if config.no_settle_delay {
            Duration::from_millis(1)
        } else {
            settle
        },
        http_timeout,
        backoff_base: S,
        backoff_max: 300 * S,
        max_attempts: 20,
    };
    let db: Shared = Arc::new(Mutex::new(Db::new(
        http_timeout + 10 * S,
        rng.bool(),
        config.defects,
    )));

    // The strands: executions in every state the API can report.
    let n = rng.usize(1..7);
    let mut execs = BTreeMap::new();
    for i in 0..n {
        let id = format!("e{i}");
        let (status, exists) = match rng.u32(0..20) {
            0..=11 => ("EXECUTING", true),
            12 => ("PENDING", true),
            13..=14 => ("COMPLETED", true),
            15 => ("STOPPED", true),
            16 => ("ERROR", true),
            _ => ("EXECUTING", false),
        };
        let remaining = rng.i32(-1..3);
        // One callback in four is on the Celery transport: the hook declines it.
        let refirable = rng.u32(0..4) != 0;
        lock(&db).arm(
            &id,
            remaining,
            remaining == 0 && rng.bool(),
            refirable,
            true,
        );
        execs.insert(
            id,
            Exec {
                status,
                exists,
                marks: 0,
                guarded: rng.bool(),
            },
        );
    }
    let windows: Vec<Window> = (0..rng.usize(0..3))
        .map(|_| {
            let from = t0 + Duration::from_secs(rng.u64(0..600));
            let kind = [
                Outage::Down,
                Outage::Silent,
                Outage::Late,
                Outage::Unavailable,
                Outage::Throttled,
                Outage::Errors,
            ][rng.usize(0..6)];
            Window {
                kind,
                from,
                // One in four outlasts the whole failure budget (20 attempts of up to 300 s).
                to: from
                    + Duration::from_secs(if rng.u32(0..4) == 0 {
                        rng.u64(3600..3 * 3600)
                    } else {
                        rng.u64(10..900)
                    }),
            }
        })
        .collect();
    let api = Api(Arc::new(ApiState {
        execs: Mutex::new(execs),
        windows: windows.clone(),
        rng: Mutex::new(fastrand::Rng::with_seed(seed ^ 0xA11CE)),
        db: db.clone(),
        timeout: http_timeout,
        settle,
    }));
    {
        let api = api.clone();
        lock(&db).confirmed = Some(Arc::new(move |e: &str, outcome: Outcome| {
            let execs = api.execs.lock().unwrap_or_else(|p| p.into_inner());
            let Some(x) = execs.get(e) else {
                return Err("no such execution".into());
            };
            let ok = match outcome {
                Outcome::Gone => !x.exists,
                Outcome::AlreadyTerminal => x.exists && is_terminal(x.status),
                Outcome::MarkedError => x.marks > 0 || x.status == "ERROR",
                Outcome::Refired => false, // a re-fire confirms nothing: the callback only queued
                Outcome::Rearmed => false,
            };
            if ok {
                Ok(())
            } else {
                Err(format!("the API says {} (exists: {})", x.status, x.exists))
            }
        }));
    }

    // The worker: queue strands, re-offer expired leases; a tick never waits on a relay.
    let worker = {
        let db = db.clone();
        let waits = config.defects.reoffer_waits;
        tokio::spawn(async move {
            loop {
                let started = Instant::now();
                loop {
                    let blocked = {
                        let mut d = lock(&db);
                        d.end_idle_sessions();
                        d.strand_refired(REFIRE_STUCK);
                        d.reap();
                        d.reoffer_expired_leases()
                    };
                    if blocked.is_empty() || !waits {
                        break;
                    }
                    sleep(S).await;
                }
                if started.elapsed() > 5 * S {
                    lock(&db).violations.push(format!(
                        "a worker tick waited {} s on a relay's locked row",
                        started.elapsed().as_secs()
                    ));
                }
                sleep(15 * S).await;
            }
        })
    };

    // The platform moves some strands on while relays work on them: a re-enqueue or a late
    // batch (the barrier is no longer stranded), or a late callback (barrier_finish, then the
    // callback's COMPLETED, as the platform orders them).
    for i in 0..n {
        let (db, api) = (db.clone(), api.clone());
        let (at, kind) = (Duration::from_secs(rng.u64(0..300)), rng.u32(0..8));
        let id = format!("e{i}");
        match kind {
            0 => tokio::spawn(async move {
                sleep(at).await;
                while !lock(&db).rearm(&id) {
                    sleep(S).await;
                }
            }),
            1 => tokio::spawn(async move {
                sleep(at).await;
                while !lock(&db).finish(&id) {
                    sleep(S).await;
                }
                sleep(5 * S).await;
                let mut execs = api.execs.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(x) = execs.get_mut(&id)
                    && x.exists
                    && !is_terminal(x.status)
                {
                    x.status = "COMPLETED";
                }
            }),
            _ => continue,
        };
    }

    // A re-fired callback completes its execution some time later, or dies without a trace.
    for i in 0..n {
        let (db, api) = (db.clone(), api.clone());
        let (completes, after) = (rng.bool(), Duration::from_secs(rng.u64(1..1200)));
        let id = format!("e{i}");
        tokio::spawn(async move {
            loop {
                match lock(&db).barriers.get(&id) {
                    None => return,
                    Some(b) if b.refired_at.is_some() => break,
                    Some(_) => {}
                }
                sleep(10 * S).await;
            }
            sleep(after).await;
            let mut execs = api.execs.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(x) = execs.get_mut(&id)
                && completes
                && x.exists
                && !is_terminal(x.status)
            {
                x.status = "COMPLETED";
            }
        });
    }

    // Relays, some killed at any moment and started again.
    let mut stats = Stats {
        executions: n,
        ..Stats::default()
    };
    let relays = rng.usize(1..4);
    let mut handles = Vec::new();
    for r in 0..relays {
        let concurrency = rng.usize(1..4);
        let kills: Vec<u64> = (0..rng.usize(0..3)).map(|_| rng.u64(1..900)).collect();
        stats.kills += kills.len();
        let (db, api, policy) = (db.clone(), api.clone(), policy.clone());
        let relay_seed = seed.wrapping_mul(31).wrapping_add(r as u64);
        handles.push(tokio::spawn(async move {
            let mut life = 0u64;
            for kill_at in kills {
                let run = relay(
                    db.clone(),
                    api.clone(),
                    policy.clone(),
                    concurrency,
                    relay_seed + life,
                );
                // Killed: every future of it dropped, its transactions rolled back.
                let _ = tokio::time::timeout(Duration::from_secs(kill_at), run).await;
                life += 1;
                sleep(Duration::from_secs(relay_seed % 60)).await;
            }
            relay(db, api, policy, concurrency, relay_seed + life).await;
        }));
    }

    // Until every intent is over, or long after the last outage ended.
    let calm = windows
        .iter()
        .map(|w| w.to)
        .max()
        .unwrap_or(t0)
        .max(t0 + 900 * S);
    let deadline = calm + Duration::from_secs(3 * 3600);
    loop {
        sleep(60 * S).await;
        let d = lock(&db);
        if let Some(v) = d.violations.first() {
            return Err(broken(&d, v.clone(), trace));
        }
        let settled = Instant::now() > calm
            && d.barriers
                .values()
                .all(|b| !b.stranded && b.refired_at.is_none())
            && d.rows.values().all(|r| r.state == State::Done);
        if settled {
            break;
        }
        if Instant::now() > deadline {
            let open: Vec<String> = d
                .rows
                .values()
                .filter(|r| r.state != State::Done)
                .map(|r| {
                    format!(
                        "intent {} of {}: {:?}, {} failures",
                        r.id, r.execution_id, r.state, r.failures
                    )
                })
                .chain(
                    d.barriers
                        .iter()
                        .filter(|(_, b)| b.stranded || b.refired_at.is_some())
                        .map(|(e, b)| {
                            format!("barrier {e} still there (stranded: {})", b.stranded)
                        }),
                )
                .collect();
            let what = format!(
                "not over 3 h after the last outage (nothing may be lost, nothing dead from an outage): {}",
                open.join("; ")
            );
            return Err(broken(&d, what, trace));
        }
    }
    worker.abort();
    for h in handles {
        h.abort();
    }
    let d = lock(&db);
    if trace {
        broken(&d, String::new(), true);
    }
    if let Some(v) = d.violations.first() {
        return Err(broken(&d, v.clone(), trace));
    }
    for r in d.rows.values() {
        *stats
            .outcomes
            .entry(r.outcome.map_or("none", |o| o.as_str()))
            .or_default() += 1;
    }
    stats.virtual_seconds = (Instant::now() - t0).as_secs();
    stats.late_overwrites = d.late_overwrites;
    Ok(stats)
}
