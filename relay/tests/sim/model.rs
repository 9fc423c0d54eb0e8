//! The world a simulated relay works in: the outbox, the barriers and the worker as the
//! extension implements them (every transition a compare-and-set on the claim's `attempt`, row
//! locks held by a transaction until it ends, sessions ended by the server's idle timeout), and
//! the platform's status API with its faults. The time is tokio's (paused: virtual).
//!
//! The fencing rules here are checked against the real SQL functions by the cases in
//! `outbox_cases.rs`, run on this model and on Postgres alike.

use pg_reaper_relay::Error;
use pg_reaper_relay::protocol::{HandedBack, Outcome, Verdict};
use pg_reaper_relay::recovery::Intent;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// An intent's state: the protocol's words.
pub use pg_reaper_protocol::State;

/// One outbox row.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: i64,
    pub execution_id: String,
    pub organization_id: String,
    pub remaining: i32,
    pub state: State,
    pub outcome: Option<Outcome>,
    pub attempts: i32,
    pub failures: i32,
    pub lease_expires_at: Option<Instant>,
    pub next_attempt_at: Instant,
    lock: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Barrier {
    pub remaining: i32,
    pub callback: bool,
    /// The stranded predicate's value (the simulation strands barriers or re-arms them).
    pub stranded: bool,
    /// When a re-fire stamped it (it stays until the execution is terminal).
    pub refired_at: Option<Instant>,
    /// Whether the hook takes its callback (it declines a Celery-transport one).
    pub refirable: bool,
    lock: Option<u64>,
}

/// The defects fixed in earlier rounds, put back one at a time to show the simulation finds
/// them. All off is the extension as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Defects {
    /// outbox_resolve without the claim's fence (`attempts = $2`).
    pub unfenced_resolve: bool,
    /// The worker's re-offer of expired leases waits for a locked row instead of skipping it.
    pub reoffer_waits: bool,
    /// A re-fire removes the barrier at once, before the callback made the execution terminal.
    pub refire_removes_barrier: bool,
    /// A re-fire leaves no stamp: a re-fired barrier that strands again is re-fired again.
    pub refire_unstamped: bool,
}

/// What an open transaction changed, to undo on rollback.
#[derive(Debug, Default)]
struct Undo {
    rows: Vec<(i64, Option<Row>)>,
    barriers: Vec<(String, Option<Barrier>)>,
    refires: Vec<String>,
    /// Barriers deleted by this transaction, with the outcome that deleted them.
    deleted: Vec<(String, Outcome)>,
}

#[derive(Debug)]
struct Session {
    alive: bool,
    tx: Option<Undo>,
    last_active: Instant,
}

/// The database: outbox, barriers, sessions; and what the invariants need.
pub struct Db {
    pub rows: BTreeMap<i64, Row>,
    next_id: i64,
    pub barriers: BTreeMap<String, Barrier>,
    sessions: BTreeMap<u64, Session>,
    next_session: u64,
    /// Committed re-fires, per execution.
    pub refired: BTreeMap<String, u32>,
    pub hook: bool,
    pub defects: Defects,
    /// The server's idle_in_transaction_session_timeout for relay sessions.
    pub idle_timeout: Duration,
    pub lock_timeout: Duration,
    pub violations: Vec<String>,
    /// ERROR marks applied late (after the relay stopped waiting for the answer) over an
    /// unguarded execution the platform completed meanwhile: the documented window.
    pub late_overwrites: u32,
    /// What happened, in order, for a replayed seed.
    pub trace: Vec<String>,
    started: Instant,
    /// Checks a barrier's removal against what the API knows (set by the world).
    pub confirmed: Option<Confirmation>,
}

pub type Shared = Arc<Mutex<Db>>;

/// Whether the API confirms the recovery of an execution with this outcome (why not, if not).
pub type Confirmation = Arc<dyn Fn(&str, Outcome) -> Result<(), String> + Send + Sync>;

pub fn lock(db: &Shared) -> MutexGuard<'_, Db> {
    match db.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

fn closed() -> Error {
    Error::Connect("server closed the connection unexpectedly".into())
}

impl Db {
    pub fn new(idle_timeout: Duration, hook: bool, defects: Defects) -> Db {
        Db {
            rows: BTreeMap::new(),
            next_id: 1,
            barriers: BTreeMap::new(),
            sessions: BTreeMap::new(),
            next_session: 1,
            refired: BTreeMap::new(),
            hook,
            defects,
            idle_timeout,
            lock_timeout: Duration::from_secs(10),
            violations: Vec::new(),
            late_overwrites: 0,
            trace: Vec::new(),
            started: Instant::now(),
            confirmed: None,
        }
    }

    pub fn note(&mut self, what: String) {
        let t = Instant::now().duration_since(self.started).as_secs_f64();
        self.trace.push(format!("{t:9.3}s {what}"));
    }

    pub fn arm(
        &mut self,
        execution_id: &str,
        remaining: i32,
        callback: bool,
        refirable: bool,
        stranded: bool,
    ) {
        self.barriers.insert(
            execution_id.to_string(),
            Barrier {
                remaining,
                callback,
                stranded,
                refired_at: None,
                refirable,
                lock: None,
            },
        );
    }

    pub fn open_session(&mut self) -> u64 {
        let id = self.next_session;
        self.next_session += 1;
        self.sessions.insert(
            id,
            Session {
                alive: true,
                tx: None,
                last_active: Instant::now(),
            },
        );
        id
    }

    /// The server ends sessions idle in a transaction for longer than the timeout.
    pub fn end_idle_sessions(&mut self) {
        let now = Instant::now();
        let idle: Vec<u64> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.alive && s.tx.is_some() && now.duration_since(s.last_active) > self.idle_timeout
            })
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            self.note(format!(
                "session {id}: ended by the idle timeout, rolled back"
            ));
            self.rollback(id);
            if let Some(s) = self.sessions.get_mut(&id) {
                s.alive = false;
            }
        }
    }

    /// A statement on `session`: refused on a dead one; marks it active.
    fn statement(&mut self, session: u64) -> Result<(), Error> {
        self.end_idle_sessions();
        let s = self.sessions.get_mut(&session).ok_or_else(closed)?;
        if !s.alive {
            return Err(closed());
        }
        s.last_active = Instant::now();
        Ok(())
    }

    pub fn close_session(&mut self, session: u64) {
        self.rollback(session);
        self.sessions.remove(&session);
    }

    fn in_tx(&self, session: u64) -> bool {
        self.sessions.get(&session).is_some_and(|s| s.tx.is_some())
    }

    fn row_free(&self, id: i64, session: u64) -> bool {
        self.rows
            .get(&id)
            .is_none_or(|r| r.lock.is_none_or(|l| l == session))
    }

    fn barrier_free(&self, execution_id: &str, session: u64) -> bool {
        self.barriers
            .get(execution_id)
            .is_none_or(|b| b.lock.is_none_or(|l| l == session))
    }

    /// Records the row's old value for a rollback and locks it, in a transaction.
    fn touch_row(&mut self, session: u64, id: i64) {
        let old = self.rows.get(&id).cloned();
        if let Some(tx) = self.sessions.get_mut(&session).and_then(|s| s.tx.as_mut())
            && !tx.rows.iter().any(|(i, _)| *i == id)
        {
            tx.rows.push((id, old));
        }
        if self.in_tx(session)
            && let Some(r) = self.rows.get_mut(&id)
        {
            r.lock = Some(session);
        }
    }

    fn touch_barrier(&mut self, session: u64, execution_id: &str) {
        let old = self.barriers.get(execution_id).cloned();
        if let Some(tx) = self.sessions.get_mut(&session).and_then(|s| s.tx.as_mut())
            && !tx.barriers.iter().any(|(e, _)| e == execution_id)
        {
            tx.barriers.push((execution_id.to_string(), old));
        }
        if self.in_tx(session)
            && let Some(b) = self.barriers.get_mut(execution_id)
        {
            b.lock = Some(session);
        }
    }

    pub fn begin(&mut self, session: u64) -> Result<(), Error> {
        self.statement(session)?;
        if let Some(s) = self.sessions.get_mut(&session) {
            s.tx = Some(Undo::default());
        }
        Ok(())
    }

    fn unlock(&mut self, session: u64) {
        for r in self.rows.values_mut() {
            if r.lock == Some(session) {
                r.lock = None;
            }
        }
        for b in self.barriers.values_mut() {
            if b.lock == Some(session) {
                b.lock = None;
            }
        }
    }

    pub fn commit(&mut self, session: u64) -> Result<(), Error> {
        self.statement(session)?;
        let undo = self
            .sessions
            .get_mut(&session)
            .and_then(|s| s.tx.take())
            .unwrap_or_default();
        self.unlock(session);
        for e in undo.refires {
            let n = self.refired.entry(e.clone()).or_default();
            *n += 1;
            if *n > 1 {
                self.violations
                    .push(format!("execution {e} re-fired {n} times"));
            }
        }
        for (e, outcome) in undo.deleted {
            self.check_removal(&e, outcome);
        }
        Ok(())
    }

    pub fn rollback(&mut self, session: u64) {
        let Some(undo) = self.sessions.get_mut(&session).and_then(|s| s.tx.take()) else {
            return;
        };
        for (id, old) in undo.rows.into_iter().rev() {
            match old {
                Some(r) => self.rows.insert(id, r),
                None => self.rows.remove(&id),
            };
        }
        for (e, old) in undo.barriers.into_iter().rev() {
            match old {
                Some(b) => self.barriers.insert(e, b),
                None => self.barriers.remove(&e),
            };
        }
        self.unlock(session);
    }

    fn check_removal(&mut self, execution_id: &str, outcome: Outcome) {
        if let Some(check) = &self.confirmed
            && let Err(why) = check(execution_id, outcome)
        {
            self.violations.push(format!(
                "barrier of {execution_id} removed as {} before recovery was confirmed: {why}",
                outcome.as_str()
            ));
        }
    }

    /// The worker's (and reap_expired's) queueing: one live intent per stranded barrier.
    pub fn reap(&mut self) -> usize {
        let live = |rows: &BTreeMap<i64, Row>, e: &str| {
            rows.values()
                .any(|r| r.execution_id == e && r.state != State::Done)
        };
        let stranded: Vec<(String, i32)> = self
            .barriers
            .iter()
            .filter(|(e, b)| b.stranded && !live(&self.rows, e))
            .map(|(e, b)| (e.clone(), b.remaining))
            .collect();
        for (e, remaining) in &stranded {
            let id = self.next_id;
            self.next_id += 1;
            self.rows.insert(
                id,
                Row {
                    id,
                    execution_id: e.clone(),
                    organization_id: "org".into(),
                    remaining: *remaining,
                    state: State::Pending,
                    outcome: None,
                    attempts: 0,
                    failures: 0,
                    lease_expires_at: None,
                    next_attempt_at: Instant::now(),
                    lock: None,
                },
            );
        }
        stranded.len()
    }

    /// The row as other sessions see it: its committed version while a transaction holds it.
    fn committed(&self, id: i64) -> Option<Row> {
        let row = self.rows.get(&id)?;
        let held = row
            .lock
            .and_then(|s| self.sessions.get(&s))
            .and_then(|s| s.tx.as_ref())
            .and_then(|tx| tx.rows.iter().find(|(i, _)| *i == id));
        match held {
            Some((_, old)) => old.clone(),
            None => Some(row.clone()),
        }
    }

    /// Expired leases back to pending (their committed version decides), skipping rows a
    /// transaction holds. Returns the ids a re-offer that waits for locks would wait for.
    pub fn reoffer_expired_leases(&mut self) -> Vec<i64> {
        let now = Instant::now();
        let ids: Vec<i64> = self.rows.keys().copied().collect();
        let mut waits = Vec::new();
        for id in ids {
            let Some(seen) = self.committed(id) else {
                continue;
            };
            if seen.state != State::InFlight || seen.lease_expires_at.is_none_or(|t| t >= now) {
                continue;
            }
            if let Some(r) = self.rows.get_mut(&id) {
                if r.lock.is_some() {
                    waits.push(id);
                    continue;
                }
                r.state = State::Pending;
                r.lease_expires_at = None;
                r.next_attempt_at = now;
            }
        }
        waits
    }

    /// outbox_claim: expired leases first, then due pending rows, skipping locked ones.
    pub fn claim(&mut self, session: u64, n: usize, lease: Duration) -> Result<Vec<Intent>, Error> {
        self.statement(session)?;
        let now = Instant::now();
        let mut expired: Vec<&Row> = self
            .rows
            .values()
            .filter(|r| {
                r.state == State::InFlight
                    && r.lease_expires_at.is_some_and(|t| t < now)
                    && r.lock.is_none()
            })
            .collect();
        expired.sort_by_key(|r| (r.lease_expires_at, r.id));
        let mut due: Vec<&Row> = self
            .rows
            .values()
            .filter(|r| r.state == State::Pending && r.next_attempt_at <= now && r.lock.is_none())
            .collect();
        due.sort_by_key(|r| (r.next_attempt_at, r.id));
        let picked: Vec<i64> = expired
            .iter()
            .chain(due.iter())
            .take(n)
            .map(|r| r.id)
            .collect();
        let mut claimed = Vec::new();
        for id in picked {
            if let Some(r) = self.rows.get_mut(&id) {
                r.state = State::InFlight;
                r.attempts += 1;
                r.lease_expires_at = Some(now + lease);
                let note = format!(
                    "session {session}: claimed intent {id} ({}) attempt {}",
                    r.execution_id, r.attempts
                );
                self.trace.push(note);
                claimed.push(Intent {
                    id,
                    execution_id: r.execution_id.clone(),
                    organization_id: r.organization_id.clone(),
                    remaining: r.remaining,
                    attempt: r.attempts,
                });
            }
        }
        Ok(claimed)
    }

    /// The claim of `intent` is current: the compare of every fenced transition.
    fn holds(&self, intent: &Intent) -> bool {
        self.rows
            .get(&intent.id)
            .is_some_and(|r| r.state == State::InFlight && r.attempts == intent.attempt)
    }

    /// Whether a statement on `intent`'s row (and, for `barrier`, the barrier's) must wait
    /// for another transaction.
    pub fn blocked(&self, session: u64, intent: &Intent, barrier: bool) -> bool {
        !self.row_free(intent.id, session)
            || (barrier && !self.barrier_free(&intent.execution_id, session))
    }

    /// HOLD_CLAIM: lease extended to at least now + `hold`.
    pub fn hold(&mut self, session: u64, intent: &Intent, hold: Duration) -> Result<bool, Error> {
        self.statement(session)?;
        if !self.holds(intent) {
            return Ok(false);
        }
        self.note(format!(
            "session {session}: hold intent {} attempt {} for {} s",
            intent.id,
            intent.attempt,
            hold.as_secs()
        ));
        self.touch_row(session, intent.id);
        let now = Instant::now();
        if let Some(r) = self.rows.get_mut(&intent.id) {
            r.lease_expires_at = r.lease_expires_at.max(Some(now + hold));
        }
        Ok(true)
    }

    /// recovery_lock: renew the claim, lock the barrier, re-check it.
    pub fn recovery_lock(
        &mut self,
        session: u64,
        intent: &Intent,
        lease: Duration,
    ) -> Result<Verdict, Error> {
        if !self.hold(session, intent, lease)? {
            return Ok(Verdict::Lost);
        }
        let Some(b) = self.barriers.get(&intent.execution_id).cloned() else {
            return Ok(Verdict::Rearmed);
        };
        let e = intent.execution_id.clone();
        self.touch_barrier(session, &e);
        let verdict = if !b.stranded {
            Verdict::Rearmed
        } else if b.remaining == 0
            && b.callback
            && (b.refired_at.is_none() || self.defects.refire_unstamped)
            && self.hook
            && b.refirable
        {
            // The re-fire: the barrier stamped, the hook run; both commit with the resolve.
            if let Some(tx) = self.sessions.get_mut(&session).and_then(|s| s.tx.as_mut()) {
                tx.refires.push(e.clone());
            }
            if let Some(b) = self.barriers.get_mut(&e) {
                b.stranded = false;
                b.refired_at = Some(Instant::now());
            }
            Verdict::Refire
        } else {
            Verdict::Mark {
                remaining: Some(b.remaining),
            }
        };
        self.note(format!(
            "session {session}: recovery_lock intent {} attempt {}: {verdict:?}",
            intent.id, intent.attempt
        ));
        Ok(verdict)
    }

    /// outbox_resolve: the intent done with `outcome`; marked_error, already_terminal and gone
    /// tear the barrier down while it is still stranded; refired keeps the barrier, and needs
    /// the re-fire of recovery_lock in this transaction.
    pub fn resolve(
        &mut self,
        session: u64,
        intent: &Intent,
        outcome: Outcome,
    ) -> Result<bool, Error> {
        self.statement(session)?;
        let current = self.holds(intent);
        let applies = current
            || (self.defects.unfenced_resolve
                && self
                    .rows
                    .get(&intent.id)
                    .is_some_and(|r| r.state != State::Done));
        self.note(format!(
            "session {session}: resolve intent {} attempt {} {}: {}",
            intent.id,
            intent.attempt,
            outcome.as_str(),
            if applies { "applied" } else { "lost" }
        ));
        if !applies {
            return Ok(false);
        }
        if !current {
            self.violations.push(format!(
                "intent {} resolved by a claim that is not current (attempt {})",
                intent.id, intent.attempt
            ));
        }
        let e = intent.execution_id.clone();
        if outcome == Outcome::Refired
            && !self
                .barriers
                .get(&e)
                .is_some_and(|b| b.refired_at.is_some() && b.lock == Some(session))
        {
            return Err(Error::Protocol(format!(
                "execution {e} was not re-fired in this transaction"
            )));
        }
        let autocommit = !self.in_tx(session);
        if autocommit {
            self.begin(session)?;
        }
        self.touch_row(session, intent.id);
        if let Some(r) = self.rows.get_mut(&intent.id) {
            r.state = State::Done;
            r.outcome = Some(outcome);
            r.lease_expires_at = None;
        }
        if outcome == Outcome::Refired {
            if self.defects.refire_removes_barrier {
                self.barriers.remove(&e);
                if let Some(tx) = self.sessions.get_mut(&session).and_then(|s| s.tx.as_mut()) {
                    tx.deleted.push((e, outcome));
                }
            }
        } else if outcome != Outcome::Rearmed && self.barriers.get(&e).is_some_and(|b| b.stranded) {
            self.touch_barrier(session, &e);
            self.barriers.remove(&e);
            if let Some(tx) = self.sessions.get_mut(&session).and_then(|s| s.tx.as_mut()) {
                tx.deleted.push((e, outcome));
            }
        }
        if autocommit {
            self.commit(session)?;
        }
        Ok(true)
    }

    /// outbox_fail (`counted`) and outbox_defer: pending after `backoff`, dead at the budget.
    pub fn give_back(
        &mut self,
        session: u64,
        intent: &Intent,
        backoff: Duration,
        counted: bool,
        max_attempts: i32,
    ) -> Result<HandedBack, Error> {
        self.statement(session)?;
        if !self.holds(intent) {
            return Ok(HandedBack::Lost);
        }
        self.note(format!(
            "session {session}: give back intent {} attempt {} (counted: {counted}) for {} s",
            intent.id,
            intent.attempt,
            backoff.as_secs()
        ));
        let now = Instant::now();
        let r = self.rows.get_mut(&intent.id).ok_or_else(closed)?;
        let dead = counted && r.failures + 1 >= max_attempts;
        r.failures += i32::from(counted);
        r.state = if dead { State::Dead } else { State::Pending };
        r.lease_expires_at = None;
        r.next_attempt_at = now + backoff;
        Ok(if dead {
            HandedBack::Dead
        } else {
            HandedBack::Pending
        })
    }

    /// The platform's `barrier_finish` after a late callback was enqueued: deletes the barrier
    /// unless a transaction holds its row (then the caller waits and tries again).
    pub fn finish(&mut self, execution_id: &str) -> bool {
        match self.barriers.get(execution_id) {
            Some(b) if b.lock.is_some() => false,
            _ => {
                self.barriers.remove(execution_id);
                true
            }
        }
    }

    /// The stuck timeout passed since a re-fire: the barrier strands again (the relay then
    /// finds the re-fired callback's COMPLETED, or marks the execution ERROR).
    pub fn strand_refired(&mut self, after: Duration) {
        let now = Instant::now();
        for b in self.barriers.values_mut() {
            if !b.stranded && b.refired_at.is_some_and(|t| now.duration_since(t) >= after) {
                b.stranded = true;
            }
        }
    }

    /// The platform moves a stranded barrier on (re-enqueued, or a late batch decremented):
    /// it waits for the barrier's row lock like any statement.
    pub fn rearm(&mut self, execution_id: &str) -> bool {
        match self.barriers.get_mut(execution_id) {
            Some(b) if b.lock.is_none() => {
                b.stranded = false;
                true
            }
            Some(_) => false,
            None => true,
        }
    }
}
