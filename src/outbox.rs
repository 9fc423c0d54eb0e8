//! The outbox of recovery intents. `reap` fills it; relays drain it through the functions here;
//! the worker hands intents whose relay died back to the others.
//!
//! Every transition is a compare-and-set on the intent row. A claim takes due `pending` rows
//! with `FOR UPDATE SKIP LOCKED`, so any number of relays can run side by side, and increments
//! `attempts`, which is the claim's fencing token: a relay can push back or release only the
//! claim it holds (`attempts` unchanged since its claim), never one another relay made since.

use crate::plan::{self, Statement};
use crate::validate::{self, invalid};
use pg_reaper_protocol::{Action, LOST, Outcome};
use pgrx::prelude::*;
use pgrx::spi::{SpiClient, SpiResult};

/// Claims due intents: `pending` ones whose backoff is over and `in_flight` ones whose lease
/// expired (their relay died or stalled), so leases heal without the background worker. Each
/// kind is read in its own index order with a limit, never sorted as a whole. An intent whose
/// `attempts` reached the integer maximum cannot be claimed again (the counter would
/// overflow and fail every claim): it is set aside as `dead` instead, and not returned.
const CLAIM: Statement = Statement {
    sql: "WITH expired AS (
              SELECT id FROM @extschema@.pg_reaper_outbox
               WHERE state = 'in_flight' AND lease_expires_at < coalesce($3, now())
               ORDER BY lease_expires_at
               LIMIT $1
               FOR UPDATE SKIP LOCKED
          ), due AS (
              SELECT id FROM @extschema@.pg_reaper_outbox
               WHERE state = 'pending' AND next_attempt_at <= coalesce($3, now())
               ORDER BY next_attempt_at, id
               LIMIT $1
               FOR UPDATE SKIP LOCKED
          ), picked AS (
              SELECT id FROM expired UNION ALL SELECT id FROM due LIMIT $1
          ), claimed AS (
              UPDATE @extschema@.pg_reaper_outbox o
                 SET state = CASE WHEN o.attempts < 2147483647 THEN 'in_flight' ELSE 'dead' END,
                     attempts = CASE WHEN o.attempts < 2147483647 THEN o.attempts + 1
                                     ELSE o.attempts END,
                     lease_expires_at = CASE WHEN o.attempts < 2147483647 THEN now() + $2 END,
                     last_error = CASE WHEN o.attempts < 2147483647 THEN o.last_error
                                       ELSE 'set aside: its attempts counter is at the maximum; '
                                            || 'replay it with outbox_replay()' END,
                     updated_at = now()
                FROM picked
               WHERE o.id = picked.id
           RETURNING o.id, o.execution_id, o.organization_id, o.remaining, o.attempts, o.state
          )
          SELECT id, execution_id, organization_id, remaining, attempts, state = 'dead'
            FROM claimed",
    args: &[pg_sys::INT4OID, pg_sys::INTERVALOID, pg_sys::TIMESTAMPTZOID],
    writes: true,
};

/// A claimed intent given back after a failed attempt, due again after `$4`. A failure about
/// the execution (`$6`) is counted, and the last one allowed (`$5`) makes the intent dead; one
/// that says nothing about the execution (the API unreachable, a mark whose answer never came)
/// is never counted and never kills.
const GIVE_BACK: Statement = Statement {
    sql: "UPDATE @extschema@.pg_reaper_outbox
             SET state = CASE WHEN $6 AND failures + 1 >= $5 THEN 'dead' ELSE 'pending' END,
                 failures = failures + CASE WHEN $6 THEN 1 ELSE 0 END,
                 lease_expires_at = NULL, next_attempt_at = now() + $4, last_error = $3,
                 updated_at = now()
           WHERE id = $1 AND state = 'in_flight' AND attempts = $2
       RETURNING state",
    args: &[
        pg_sys::INT8OID,
        pg_sys::INT4OID,
        pg_sys::TEXTOID,
        pg_sys::INTERVALOID,
        pg_sys::INT4OID,
        pg_sys::BOOLOID,
    ],
    writes: true,
};

/// Holds the caller's claim for at least `$3` more. A recovery does so as it starts
/// (`recovery_lock`); before an ERROR mark may leave (`$4`), the time is recorded too and the
/// hold is the settle delay, so that if this relay dies with the request in flight, no relay
/// reads the status again before the API had that long to apply it.
const HOLD_CLAIM: Statement = Statement {
    sql: "UPDATE @extschema@.pg_reaper_outbox
             SET lease_expires_at = greatest(lease_expires_at, now() + $3),
                 mark_sent_at = CASE WHEN $4 THEN now() ELSE mark_sent_at END,
                 updated_at = now()
           WHERE id = $1 AND state = 'in_flight' AND attempts = $2
       RETURNING execution_id, organization_id, action",
    args: &[
        pg_sys::INT8OID,
        pg_sys::INT4OID,
        pg_sys::INTERVALOID,
        pg_sys::BOOLOID,
    ],
    writes: true,
};

/// Fenced by the claim: only the relay whose claim (`attempts`) is current resolves, so a role
/// that may call `outbox_resolve` cannot clean up an intent it never claimed.
const RESOLVE: Statement = Statement {
    sql: "UPDATE @extschema@.pg_reaper_outbox
             SET state = 'done', outcome = $3, lease_expires_at = NULL, last_error = NULL,
                 updated_at = now()
           WHERE id = $1 AND state = 'in_flight' AND attempts = $2
       RETURNING execution_id, organization_id, action",
    args: &[pg_sys::INT8OID, pg_sys::INT4OID, pg_sys::TEXTOID],
    writes: true,
};

const RELEASE: Statement = Statement {
    sql: "UPDATE @extschema@.pg_reaper_outbox
             SET state = 'pending', lease_expires_at = NULL, next_attempt_at = now(),
                 updated_at = now()
           WHERE id = $1 AND state = 'in_flight' AND attempts = $2",
    args: &[pg_sys::INT8OID, pg_sys::INT4OID],
    writes: true,
};

/// A replay gives the failure budget back. `attempts` stays (it is the fencing token: reset, a
/// stale claim's token could match again), unless it is at the maximum, set aside for that.
const REPLAY: Statement = Statement {
    sql: "UPDATE @extschema@.pg_reaper_outbox
             SET state = 'pending', failures = 0,
                 attempts = CASE WHEN attempts < 2147483647 THEN attempts ELSE 0 END,
                 next_attempt_at = now(), updated_at = now()
           WHERE state = 'dead' AND ($1::int8 IS NULL OR id = $1)",
    args: &[pg_sys::INT8OID],
    writes: true,
};

/// An intent stays `in_flight` only while its relay's lease runs; after that any relay may
/// claim it, and the worker shows it as `pending` again. A row still locked by a relay's open
/// transaction (a paused relay) is skipped, never waited for: the next tick gets it.
const REOFFER_EXPIRED_LEASES: Statement = Statement {
    sql: "UPDATE @extschema@.pg_reaper_outbox
             SET state = 'pending', lease_expires_at = NULL, next_attempt_at = now(),
                 updated_at = now()
           WHERE id IN (SELECT id FROM @extschema@.pg_reaper_outbox
                         WHERE state = 'in_flight' AND lease_expires_at < now()
                           FOR UPDATE SKIP LOCKED)",
    args: &[],
    writes: true,
};

/// Done intents are the audit trail of recoveries; past the retention they go. Nothing else
/// is ever deleted: pending, in-flight and dead intents are work.
const PRUNE_DONE: Statement = Statement {
    sql: "DELETE FROM @extschema@.pg_reaper_outbox WHERE state = 'done' AND updated_at < now() - $1",
    args: &[pg_sys::INTERVALOID],
    writes: true,
};

/// A backlog fills the outbox within seconds, long before autovacuum's next look at it: plans
/// made from the statistics of a nearly empty outbox would read all of it on every claim.
const ANALYZE: Statement = Statement {
    sql: "ANALYZE @extschema@.pg_reaper_outbox",
    args: &[],
    writes: true,
};

/// The intent a claim holds, as a recovery sees it.
pub(crate) struct Claimed {
    pub execution_id: String,
    pub organization_id: String,
    /// What an operator asked for with `barrier_recover()`; None for a reaped strand.
    pub action: Option<Action>,
}

/// Renews the caller's claim on intent `id` for at least `lease`; None when the claim is no
/// longer the caller's.
pub(crate) fn renew_claim(
    client: &mut SpiClient<'_>,
    schema: pg_sys::Oid,
    id: i64,
    attempt: i32,
    lease: Interval,
) -> SpiResult<Option<Claimed>> {
    let args = [id.into(), attempt.into(), lease.into(), false.into()];
    claimed(plan::run(client, schema, &HOLD_CLAIM, &args)?)
}

/// Marks the caller's claimed intent `id` done with `outcome`; None when the claim is no
/// longer the caller's.
pub(crate) fn resolve(
    client: &mut SpiClient<'_>,
    schema: pg_sys::Oid,
    id: i64,
    attempt: i32,
    outcome: Outcome,
) -> SpiResult<Option<Claimed>> {
    let args = [id.into(), attempt.into(), outcome.as_str().into()];
    claimed(plan::run(client, schema, &RESOLVE, &args)?)
}

/// The intent a fenced transition returned (execution id, organization id, action), if any.
fn claimed(rows: pgrx::spi::SpiTupleTable<'_>) -> SpiResult<Option<Claimed>> {
    if rows.is_empty() {
        return Ok(None);
    }
    let row = rows.first();
    // The action's CHECK constraint limits it to the known words.
    let action = row.get::<String>(3)?.map(|word| {
        Action::parse(&word)
            .unwrap_or_else(|| error!("pg_reaper: an intent has the unknown action {word:?}"))
    });
    Ok(Some(Claimed {
        execution_id: row.get::<String>(1)?.unwrap_or_default(),
        organization_id: row.get::<String>(2)?.unwrap_or_default(),
        action,
    }))
}

/// Refreshes the outbox's statistics.
pub fn analyze(schema: pg_sys::Oid) {
    Spi::connect_mut(|client| plan::run(client, schema, &ANALYZE, &[]).map(|_| ()))
        .unwrap_or_else(|e| error!("pg_reaper: analyzing the outbox: {e}"))
}

/// Deletes done intents older than `retention`; returns how many.
pub fn prune_done(schema: pg_sys::Oid, retention: Interval) -> usize {
    Spi::connect_mut(|client| {
        plan::run(client, schema, &PRUNE_DONE, &[retention.into()]).map(|t| t.len())
    })
    .unwrap_or_else(|e| error!("pg_reaper: pruning done intents: {e}"))
}

/// Makes intents whose lease expired claimable again; returns how many.
pub fn reoffer_expired_leases(schema: pg_sys::Oid) -> usize {
    Spi::connect_mut(|client| {
        plan::run(client, schema, &REOFFER_EXPIRED_LEASES, &[]).map(|t| t.len())
    })
    .unwrap_or_else(|e| error!("pg_reaper: re-offering expired leases: {e}"))
}

/// Claims up to `max_intents` intents due by `due_by` (NULL: now) for `lease`; each row's
/// `attempt` is its fencing token. A single pass over what was due at its start (a relay's
/// `--once`) passes that time, so that intents failing during the pass wait for the next.
///
/// The Rust name differs from the SQL name so that 0.1.0's two-argument SQL function finds no
/// symbol of this library with another argument list (see `outbox_resolve`).
#[pg_extern(security_definer, parallel_unsafe, name = "outbox_claim")]
#[search_path(pg_catalog, pg_temp)]
fn outbox_claim_due(
    max_intents: default!(Option<i32>, 16),
    lease: default!(Option<Interval>, "'60 seconds'"),
    due_by: default!(Option<TimestampWithTimeZone>, "NULL"),
    fcinfo: pg_sys::FunctionCallInfo,
) -> TableIterator<
    'static,
    (
        name!(id, i64),
        name!(execution_id, String),
        name!(organization_id, String),
        name!(remaining, i32),
        name!(attempt, i32),
    ),
> {
    const F: &str = "outbox_claim";
    let n = match max_intents {
        Some(n) if n >= 1 => n,
        _ => invalid(F, "max_intents", "must be at least 1"),
    };
    let lease = validate::positive_interval(F, "lease", lease);
    let schema = plan::schema_of_call(fcinfo);
    let (rows, set_aside) = Spi::connect_mut(|client| {
        let mut rows = Vec::new();
        let mut set_aside = Vec::new();
        for row in plan::run(
            client,
            schema,
            &CLAIM,
            &[n.into(), lease.into(), due_by.into()],
        )? {
            let id = row.get::<i64>(1)?.unwrap_or_default();
            if row.get::<bool>(6)?.unwrap_or(false) {
                set_aside.push(id);
                continue;
            }
            rows.push((
                id,
                row.get::<String>(2)?.unwrap_or_default(),
                row.get::<String>(3)?.unwrap_or_default(),
                row.get::<i32>(4)?.unwrap_or_default(),
                row.get::<i32>(5)?.unwrap_or_default(),
            ));
        }
        Ok::<_, pgrx::spi::SpiError>((rows, set_aside))
    })
    .unwrap_or_else(|e| error!("{F}: {e}"));
    if !set_aside.is_empty() {
        warning!(
            "{F}: set aside {} intent(s) whose attempts counter is at its maximum, as dead: ids {:?}; \
             replay them with outbox_replay()",
            set_aside.len(),
            set_aside
        );
    }
    TableIterator::new(rows)
}

/// Gives a claimed intent back after a failure about this execution: `pending` again after
/// `backoff`, or `dead` once it has failed `max_attempts` times (failures, not claims). Returns the new state, or `lost` when the claim is no
/// longer this caller's (its lease expired and the intent was claimed again or resolved).
#[pg_extern(security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_fail(
    id: Option<i64>,
    attempt: Option<i32>,
    error: Option<&str>,
    backoff: Option<Interval>,
    max_attempts: Option<i32>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> String {
    const F: &str = "outbox_fail";
    crate::version::require_current(F);
    let (id, attempt) = validate::claim(F, id, attempt);
    let backoff = validate::non_negative_interval(F, "backoff", backoff);
    let max = match max_attempts {
        Some(m) if m >= 1 => m,
        _ => invalid(F, "max_attempts", "must be at least 1"),
    };
    let error = error.unwrap_or("");
    let schema = plan::schema_of_call(fcinfo);
    let args = [
        id.into(),
        attempt.into(),
        error.into(),
        backoff.into(),
        max.into(),
        true.into(),
    ];
    fenced_state(F, schema, &GIVE_BACK, &args)
}

/// Runs a fenced transition that returns the intent's new state: `lost` when it matched no
/// row (the claim is no longer the caller's).
fn fenced_state(
    func: &'static str,
    schema: pg_sys::Oid,
    stmt: &'static Statement,
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> String {
    Spi::connect_mut(|client| {
        let t = plan::run(client, schema, stmt, args)?;
        if t.is_empty() {
            Ok(None)
        } else {
            t.first().get_one::<String>()
        }
    })
    .unwrap_or_else(|e| error!("{func}: {e}"))
    .unwrap_or_else(|| LOST.to_string())
}

/// Gives a claimed intent back after a failure that says nothing about the execution (the
/// status API unreachable, or an ERROR mark whose answer never came): `pending` again after
/// `backoff`, not counted toward `max_attempts`, never `dead`. Returns `pending`, or `lost`
/// when the claim is no longer the caller's.
#[pg_extern(security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_defer(
    id: Option<i64>,
    attempt: Option<i32>,
    error: Option<&str>,
    backoff: Option<Interval>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> String {
    const F: &str = "outbox_defer";
    let (id, attempt) = validate::claim(F, id, attempt);
    let backoff = validate::non_negative_interval(F, "backoff", backoff);
    let error = error.unwrap_or("");
    let schema = plan::schema_of_call(fcinfo);
    let args = [
        id.into(),
        attempt.into(),
        error.into(),
        backoff.into(),
        i32::MAX.into(),
        false.into(),
    ];
    fenced_state(F, schema, &GIVE_BACK, &args)
}

/// Records, and commits before the request leaves, that an ERROR mark may be sent for the
/// caller's claim, and holds the claim for at least `hold` (the relay's settle delay). False
/// when the claim is no longer the caller's: then no mark may be sent.
#[pg_extern(security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_mark_sending(
    id: Option<i64>,
    attempt: Option<i32>,
    hold: Option<Interval>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> bool {
    const F: &str = "outbox_mark_sending";
    let (id, attempt) = validate::claim(F, id, attempt);
    let hold = validate::positive_interval(F, "hold", hold);
    let schema = plan::schema_of_call(fcinfo);
    Spi::connect_mut(|client| {
        plan::run(
            client,
            schema,
            &HOLD_CLAIM,
            &[id.into(), attempt.into(), hold.into(), true.into()],
        )
        .map(|t| !t.is_empty())
    })
    .unwrap_or_else(|e| error!("{F}: {e}"))
}

/// Hands a claimed intent back untouched (a relay shutting down); false when it was not held.
#[pg_extern(security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_release(id: Option<i64>, attempt: Option<i32>, fcinfo: pg_sys::FunctionCallInfo) -> bool {
    const F: &str = "outbox_release";
    crate::version::require_current(F);
    let (id, attempt) = validate::claim(F, id, attempt);
    let schema = plan::schema_of_call(fcinfo);
    Spi::connect_mut(|client| {
        plan::run(client, schema, &RELEASE, &[id.into(), attempt.into()]).map(|t| t.len() == 1)
    })
    .unwrap_or_else(|e| error!("{F}: {e}"))
}

/// Makes `dead` intents (one, or all when `id` is NULL) pending again with fresh attempts.
#[pg_extern(security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn outbox_replay(id: default!(Option<i64>, "NULL"), fcinfo: pg_sys::FunctionCallInfo) -> i64 {
    crate::version::require_current("outbox_replay");
    let schema = plan::schema_of_call(fcinfo);
    Spi::connect_mut(|client| {
        let n = plan::run(client, schema, &REPLAY, &[id.into()])?.len();
        if n > 0 {
            crate::reap::wake_relays(client, schema)?;
        }
        Ok::<_, pgrx::spi::SpiError>(n as i64)
    })
    .unwrap_or_else(|e| error!("outbox_replay: {e}"))
}
