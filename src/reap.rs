//! Reaping: turn every stranded barrier into exactly one live outbox intent.
//!
//! The barrier row itself is left alone: it is the recovery handle, removed only by the relay
//! once the recovery was confirmed. Concurrent reapers (the worker, an operator in psql, a
//! second worker on another node) are harmless: the partial unique index on live intents makes
//! the INSERT a compare-and-set, and a loser's row simply counts as already queued.

use crate::guc;
use crate::plan::{self, Statement};
use crate::validate::invalid;
use pg_reaper_protocol::CHANNEL;
use pgrx::prelude::*;

/// `reap_expired()`: the stranded barriers, whether each already has a live intent, and an
/// intent queued for each that has none and has an organization (at most $2, oldest deadline
/// first; rows already queued do not use the budget up). A dry run (`$3`) inserts nothing and
/// reports what it would have queued. Returns the counters and up to ten org-less ids.
const REAP: Statement = Statement {
    sql: "WITH stranded AS (
              SELECT b.execution_id, b.organization_id, b.remaining, b.expires_at,
                     EXISTS (SELECT 1 FROM @extschema@.pg_reaper_outbox o
                              WHERE o.execution_id = b.execution_id AND o.state <> 'done') AS queued
                FROM @extschema@.pg_barrier_state b
               WHERE @extschema@.barrier_is_stranded(b.expires_at, b.last_progress_at, b.created_at, $1)
          ), todo AS (
              SELECT execution_id, organization_id, remaining FROM stranded
               WHERE NOT queued AND organization_id <> ''
               ORDER BY expires_at
               LIMIT $2
          ), queued AS (
              INSERT INTO @extschema@.pg_reaper_outbox (execution_id, organization_id, remaining)
              SELECT execution_id, organization_id, remaining FROM todo WHERE NOT $3
              ON CONFLICT (execution_id) WHERE state <> 'done' DO NOTHING
              RETURNING 1
          )
          SELECT (SELECT count(*) FROM stranded)::int4,
                 (CASE WHEN $3 THEN (SELECT count(*) FROM todo)
                       ELSE (SELECT count(*) FROM queued) END)::int4,
                 (SELECT count(*) FROM todo)::int4,
                 (SELECT count(*) FROM stranded WHERE queued AND organization_id <> '')::int4,
                 (SELECT count(*) FROM stranded WHERE organization_id = '')::int4,
                 (SELECT array_agg(execution_id ORDER BY execution_id)
                    FROM (SELECT execution_id FROM stranded WHERE organization_id = ''
                           ORDER BY execution_id LIMIT 10) s)",
    args: &[pg_sys::INTERVALOID, pg_sys::INT8OID, pg_sys::BOOLOID],
    writes: true,
};

// The worker's walk: the next strands after the last ones it queued, in index order, at most
// $1 in all, those already queued (or without an organization) skipped. Expired barriers go by
// (expires_at, execution_id) from ($2, $3); the others that are stranded (no progress for the
// stuck timeout $6) by (created_at, execution_id) from ($4, $5), with what the expired ones
// left of the budget. Each kind is one index range with a limit, and no barrier is in both:
// resuming after the last key makes a step cost the same however many strands are already
// queued ahead of it. Whether a strand has a live intent is one probe of the outbox's unique
// index per strand (a lateral subquery with a limit, which the planner cannot turn into a join
// over the whole outbox). Returns how many of each kind were picked, how many were queued, and
// the key of the last one picked of each kind.
const WALK: Statement = Statement {
    sql: "WITH expired AS (
              SELECT b.execution_id, b.organization_id, b.remaining, b.expires_at AS key
                FROM @extschema@.pg_barrier_state b
                LEFT JOIN LATERAL (SELECT o.id FROM @extschema@.pg_reaper_outbox o
                                    WHERE o.execution_id = b.execution_id AND o.state <> 'done'
                                    LIMIT 1) live ON true
               WHERE b.expires_at < now()
                 AND (b.expires_at, b.execution_id) > ($2, $3)
                 AND b.organization_id <> ''
                 AND @extschema@.barrier_is_stranded(b.expires_at, b.last_progress_at, b.created_at, $6)
                 AND live.id IS NULL
               ORDER BY b.expires_at, b.execution_id
               LIMIT $1
          ), stale AS (
              SELECT b.execution_id, b.organization_id, b.remaining, b.created_at AS key
                FROM @extschema@.pg_barrier_state b
                LEFT JOIN LATERAL (SELECT o.id FROM @extschema@.pg_reaper_outbox o
                                    WHERE o.execution_id = b.execution_id AND o.state <> 'done'
                                    LIMIT 1) live ON true
               WHERE b.created_at < now() - $6
                 AND (b.created_at, b.execution_id) > ($4, $5)
                 AND b.expires_at >= now()
                 AND b.organization_id <> ''
                 AND @extschema@.barrier_is_stranded(b.expires_at, b.last_progress_at, b.created_at, $6)
                 AND live.id IS NULL
               ORDER BY b.created_at, b.execution_id
               LIMIT $1 - (SELECT count(*) FROM expired)
          ), queued AS (
              INSERT INTO @extschema@.pg_reaper_outbox (execution_id, organization_id, remaining)
              SELECT execution_id, organization_id, remaining FROM expired
              UNION ALL
              SELECT execution_id, organization_id, remaining FROM stale
              ON CONFLICT (execution_id) WHERE state <> 'done' DO NOTHING
              RETURNING 1
          ), last_expired AS (
              SELECT key, execution_id FROM expired ORDER BY key DESC, execution_id DESC LIMIT 1
          ), last_stale AS (
              SELECT key, execution_id FROM stale ORDER BY key DESC, execution_id DESC LIMIT 1
          )
          SELECT (SELECT count(*) FROM expired)::int8, (SELECT count(*) FROM stale)::int8,
                 (SELECT count(*) FROM queued)::int4,
                 (SELECT key FROM last_expired), (SELECT execution_id FROM last_expired),
                 (SELECT key FROM last_stale), (SELECT execution_id FROM last_stale)",
    args: &[
        pg_sys::INT8OID,
        pg_sys::TIMESTAMPTZOID,
        pg_sys::TEXTOID,
        pg_sys::TIMESTAMPTZOID,
        pg_sys::TEXTOID,
        pg_sys::INTERVALOID,
    ],
    writes: true,
};

/// The strands nobody can recover (no organization): how many, and up to ten ids.
const ORGLESS: Statement = Statement {
    sql: "WITH orgless AS (
              SELECT b.execution_id FROM @extschema@.pg_barrier_state b
               WHERE b.organization_id = ''
                 AND @extschema@.barrier_is_stranded(b.expires_at, b.last_progress_at, b.created_at, $1)
          )
          SELECT (SELECT count(*) FROM orgless)::int4,
                 (SELECT array_agg(execution_id ORDER BY execution_id)
                    FROM (SELECT execution_id FROM orgless ORDER BY execution_id LIMIT 10) s)",
    args: &[pg_sys::INTERVALOID],
    writes: false,
};

const WALK_PLAN: Statement = Statement {
    sql: "SELECT pg_catalog.set_config(name, 'off', true)
            FROM pg_catalog.unnest(ARRAY['enable_sort', 'enable_seqscan']) name",
    args: &[],
    writes: false,
};

/// A position in one of the walk's index orders: after this (timestamp, execution id).
#[derive(Clone, Debug, PartialEq)]
pub struct Key(TimestampWithTimeZone, String);

impl Default for Key {
    /// Before every row.
    fn default() -> Key {
        Key(TimestampWithTimeZone::negative_infinity(), String::new())
    }
}

/// Where the worker's walk over the strands stands, one position per kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Walk {
    expired: Key,
    stale: Key,
}

/// What one step of the walk did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub queued: i32,
    /// Both kinds were walked to their end: every strand there was is queued (or has no
    /// organization); the next step starts over.
    pub caught_up: bool,
}

/// Where a kind's walk goes on from: the start when it ended, else after the last strand it
/// picked, or where it was when it picked none (it was not asked for any).
fn next_key(ended: bool, last: Option<(TimestampWithTimeZone, String)>, now: &Key) -> Key {
    match (ended, last) {
        (true, _) => Key::default(),
        (false, Some((at, id))) => Key(at, id),
        (false, None) => now.clone(),
    }
}

/// Queues up to `budget` strands after `walk`'s positions, in the current transaction, and
/// returns the walk's next positions (to keep once the transaction committed).
pub fn walk_step(schema: pg_sys::Oid, walk: &Walk, budget: i64) -> (Step, Walk) {
    // SAFETY: a plain read of shared recovery state, valid in any backend.
    if unsafe { pg_sys::RecoveryInProgress() } {
        error!("pg_reaper: the server is a standby (in recovery)");
    }
    Spi::connect_mut(|client| {
        // Each kind must be read in its index's order, stopping at the limit, and each
        // candidate checked against the outbox by one index probe: that is what makes a step
        // cost the same however large the backlog. Statistics taken before a mass strand (a few
        // strands among many live barriers, an empty outbox) make the planner prefer sorting
        // every strand, or scanning the outbox for each. With sorts and sequential scans ruled
        // out, the intended plan is the only one left; the settings last until the end of this
        // step's transaction.
        plan::run(client, schema, &WALK_PLAN, &[])?;
        let args = [
            budget.into(),
            walk.expired.0.into(),
            walk.expired.1.as_str().into(),
            walk.stale.0.into(),
            walk.stale.1.as_str().into(),
            guc::stuck_timeout().into(),
        ];
        let row = plan::run(client, schema, &WALK, &args)?.first();
        let expired = row.get::<i64>(1)?.unwrap_or_default();
        let stale = row.get::<i64>(2)?.unwrap_or_default();
        let queued = row.get::<i32>(3)?.unwrap_or_default();
        // A kind that gave fewer than it was asked for is walked to its end: it starts over
        // next time. The stale kind is asked only for what the expired one left.
        let left = budget - expired;
        let expired_ended = expired < budget;
        let stale_ended = left > 0 && stale < left;
        let next = Walk {
            expired: next_key(expired_ended, row.get(4)?.zip(row.get(5)?), &walk.expired),
            stale: next_key(stale_ended, row.get(6)?.zip(row.get(7)?), &walk.stale),
        };
        if queued > 0 {
            wake_relays(client, schema)?;
        }
        let step = Step {
            queued,
            caught_up: expired_ended && stale_ended,
        };
        Ok::<_, pgrx::spi::SpiError>((step, next))
    })
    .unwrap_or_else(|e| error!("pg_reaper: reaping: {e}"))
}

/// The org-less strands, for the WARNING that names them.
pub fn orgless(schema: pg_sys::Oid) -> (i32, Vec<String>) {
    Spi::connect_mut(|client| {
        let row = plan::run(client, schema, &ORGLESS, &[guc::stuck_timeout().into()])?.first();
        Ok::<_, pgrx::spi::SpiError>((
            row.get::<i32>(1)?.unwrap_or_default(),
            row.get::<Vec<String>>(2)?.unwrap_or_default(),
        ))
    })
    .unwrap_or_else(|e| error!("pg_reaper: counting org-less strands: {e}"))
}

/// Wakes the relays; delivered when the reaping transaction commits.
const WAKE_RELAYS: Statement = Statement {
    sql: "SELECT pg_catalog.pg_notify($1, '')",
    args: &[pg_sys::TEXTOID],
    writes: true,
};

/// Sends the relays' wake-up (delivered at commit).
pub fn wake_relays(
    client: &mut pgrx::spi::SpiClient<'_>,
    schema: pg_sys::Oid,
) -> pgrx::spi::SpiResult<()> {
    plan::run(client, schema, &WAKE_RELAYS, &[CHANNEL.into()]).map(|_| ())
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub stranded: i32,
    pub queued: i32,
    pub already_queued: i32,
    pub skipped_no_org: i32,
}

/// One reaping pass in the current transaction; the worker and `reap_expired()` share it.
/// Also returns up to ten ids of the org-less strands, for the caller to log.
pub fn reap(schema: pg_sys::Oid, max_rows: Option<i64>, dry_run: bool) -> (Counts, Vec<String>) {
    // SAFETY: a plain read of shared recovery state, valid in any backend.
    if unsafe { pg_sys::RecoveryInProgress() } {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "reap_expired: the server is a standby (in recovery); reap on the primary"
        );
    }
    let (counts, no_org_sample) = Spi::connect_mut(|client| {
        let args = [guc::stuck_timeout().into(), max_rows.into(), dry_run.into()];
        let row = plan::run(client, schema, &REAP, &args)?.first();
        let int = |i| row.get::<i32>(i).map(Option::unwrap_or_default);
        let (stranded, queued, candidates) = (int(1)?, int(2)?, int(3)?);
        let counts = Counts {
            stranded,
            queued,
            // Candidates another reaper queued first were already queued too.
            already_queued: int(4)? + (candidates - queued),
            skipped_no_org: int(5)?,
        };
        let sample = row.get::<Vec<String>>(6)?.unwrap_or_default();
        if counts.queued > 0 && !dry_run {
            wake_relays(client, schema)?;
        }
        Ok::<_, pgrx::spi::SpiError>((counts, sample))
    })
    .unwrap_or_else(|e| error!("reap_expired: {e}"));
    (counts, no_org_sample)
}

/// The WARNING that names the strands nobody can recover: `count` of them, `sample` their ids.
pub fn warn_no_org(count: i32, sample: &[String]) {
    if count <= 0 {
        return;
    }
    let more = count as usize - sample.len();
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    warning!(
        "pg_reaper: {} stranded barrier(s) have no organization_id and are left untouched \
         (the org-scoped status API cannot recover them): {}{more}",
        count,
        sample.join(", ")
    );
}

/// Queues one recovery intent per stranded barrier; docs/sql.md explains the counters.
#[pg_extern(security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn reap_expired(
    max_rows: default!(Option<i32>, "NULL"),
    dry_run: default!(Option<bool>, false),
    fcinfo: pg_sys::FunctionCallInfo,
) -> TableIterator<
    'static,
    (
        name!(stranded, i32),
        name!(queued, i32),
        name!(already_queued, i32),
        name!(skipped_no_org, i32),
    ),
> {
    const F: &str = "reap_expired";
    if max_rows.is_some_and(|n| n < 1) {
        invalid(F, "max_rows", "must be at least 1 (NULL: no limit)");
    }
    let Some(dry_run) = dry_run else {
        invalid(F, "dry_run", "must not be NULL")
    };
    let (c, no_org) = reap(
        plan::schema_of_call(fcinfo),
        max_rows.map(i64::from),
        dry_run,
    );
    warn_no_org(c.skipped_no_org, &no_org);
    TableIterator::once((c.stranded, c.queued, c.already_queued, c.skipped_no_org))
}
