//! 0.1.0's C entry points, for the window between a package upgrade and
//! `ALTER EXTENSION pg_reaper UPDATE`: the database still has 0.1.0's SQL objects, which call
//! this library by symbol. Since 0.2.0 every function is SQL (`sql/`), shared by both editions;
//! here the barrier API, `reap_expired` and the status view keep working as 0.1.0 had them
//! (frozen), while the recovery protocol is refused with the fix in the hint: its statements
//! need the outbox of this version. Nothing here is part of a fresh install (`sql = false`).
//! Delete this module when upgrades from 0.1.0 are no longer supported.

mod barrier;
mod claim;
mod raw_jsonb;
mod validate;

use crate::plan::{self, Statement};
use crate::{status, version};
use pgrx::prelude::*;
use validate::invalid;

/// 0.1.0's `reap_expired`: the stranded barriers, whether each already has a live intent, and
/// an intent queued for each that has none and has an organization (at most $2, oldest
/// deadline first). A dry run (`$3`) inserts nothing.
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
          ), woken AS (
              SELECT pg_catalog.pg_notify('pg_reaper_outbox', '')
               WHERE EXISTS (SELECT FROM queued)
          )
          SELECT (SELECT count(*) FROM stranded)::int4,
                 (CASE WHEN $3 THEN (SELECT count(*) FROM todo)
                       ELSE (SELECT count(*) FROM queued) END)::int4,
                 (SELECT count(*) FROM todo)::int4,
                 (SELECT count(*) FROM stranded WHERE queued AND organization_id <> '')::int4,
                 (SELECT count(*) FROM stranded WHERE organization_id = '')::int4,
                 (SELECT count(*) FROM woken)::int4",
    args: &[pg_sys::INTERVALOID, pg_sys::INT8OID, pg_sys::BOOLOID],
    writes: true,
};

/// 0.1.0's gauges for its status view.
const GAUGES: Statement = Statement {
    sql: "SELECT o.pending, o.in_flight, o.dead, o.done, o.oldest_pending_age, b.live, b.stranded
            FROM (SELECT count(*) FILTER (WHERE state = 'pending') AS pending,
                         count(*) FILTER (WHERE state = 'in_flight') AS in_flight,
                         count(*) FILTER (WHERE state = 'dead') AS dead,
                         count(*) FILTER (WHERE state = 'done') AS done,
                         now() - min(created_at) FILTER (WHERE state = 'pending') AS oldest_pending_age
                    FROM @extschema@.pg_reaper_outbox) o,
                 (SELECT count(*) FILTER (WHERE NOT s) AS live, count(*) FILTER (WHERE s) AS stranded
                    FROM (SELECT @extschema@.barrier_is_stranded(
                                     expires_at, last_progress_at, created_at, $1) AS s
                            FROM @extschema@.pg_barrier_state) x) b",
    args: &[pg_sys::INTERVALOID],
    writes: false,
};

/// The stuck timeout of the GUC (0.1.0 had no settings table).
fn stuck_timeout() -> Interval {
    Interval::from_seconds(f64::from(crate::guc::STUCK_TIMEOUT.get()))
}

#[pg_extern(sql = false)]
fn reap_expired(
    max_rows: Option<i32>,
    dry_run: Option<bool>,
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
    let schema = plan::schema_of_call(fcinfo);
    let counts = Spi::connect_mut(|client| {
        let args = [
            stuck_timeout().into(),
            max_rows.map(i64::from).into(),
            dry_run.into(),
        ];
        let row = plan::run(client, schema, &REAP, &args)?.first();
        let int = |i| row.get::<i32>(i).map(Option::unwrap_or_default);
        let (stranded, queued, candidates) = (int(1)?, int(2)?, int(3)?);
        Ok::<_, pgrx::spi::SpiError>((stranded, queued, int(4)? + (candidates - queued), int(5)?))
    })
    .unwrap_or_else(|e| error!("{F}: {e}"));
    TableIterator::once(counts)
}

#[pg_extern(sql = false)]
fn reaper_status(
    fcinfo: pg_sys::FunctionCallInfo,
) -> TableIterator<
    'static,
    (
        name!(leader_pid, Option<i32>),
        name!(last_tick_at, Option<TimestampWithTimeZone>),
        name!(ticks, Option<i64>),
        name!(last_tick_queued, Option<i32>),
        name!(outbox_pending, i64),
        name!(outbox_in_flight, i64),
        name!(outbox_dead, i64),
        name!(outbox_done, i64),
        name!(oldest_pending_age, Option<Interval>),
        name!(barriers_live, i64),
        name!(barriers_stranded, i64),
        name!(worker_state, Option<&'static str>),
        name!(failed_ticks, Option<i64>),
    ),
> {
    let schema = plan::schema_of_call(fcinfo);
    let g = Spi::connect_mut(|client| {
        let row = plan::run(client, schema, &GAUGES, &[stuck_timeout().into()])?.first();
        let n = |i| row.get::<i64>(i).map(Option::unwrap_or_default);
        Ok::<_, pgrx::spi::SpiError>((
            [n(1)?, n(2)?, n(3)?, n(4)?],
            row.get::<Interval>(5)?,
            [n(6)?, n(7)?],
        ))
    })
    .unwrap_or_else(|e| error!("reaper_status: {e}"));
    let w = status::worker_row();
    TableIterator::once((
        w.leader_pid,
        w.last_tick_at,
        w.ticks,
        w.last_tick_queued,
        g.0[0],
        g.0[1],
        g.0[2],
        g.0[3],
        g.1,
        g.2[0],
        g.2[1],
        w.worker_state,
        w.failed_ticks,
    ))
}

// 0.1.0's recovery protocol: refused, naming the fix.

#[pg_extern(sql = false)]
fn outbox_claim() -> bool {
    version::refuse("outbox_claim")
}

#[pg_extern(sql = false)]
fn outbox_resolve() -> bool {
    version::refuse("outbox_resolve")
}

#[pg_extern(sql = false)]
fn outbox_fail() -> bool {
    version::refuse("outbox_fail")
}

#[pg_extern(sql = false)]
fn outbox_release() -> bool {
    version::refuse("outbox_release")
}

#[pg_extern(sql = false)]
fn outbox_replay() -> bool {
    version::refuse("outbox_replay")
}

#[pg_extern(sql = false)]
fn recovery_lock() -> bool {
    version::refuse("recovery_lock")
}
