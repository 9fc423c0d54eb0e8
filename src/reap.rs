//! Reaping: turn every stranded barrier into exactly one live outbox intent.
//!
//! The barrier row itself is left alone: it is the recovery handle, removed only by the relay
//! once the recovery was confirmed. Concurrent reapers (the worker, an operator in psql, a
//! second worker on another node) are harmless: the partial unique index on live intents makes
//! the INSERT a compare-and-set, and a loser's row simply counts as already queued.

use crate::guc;
use crate::plan::{self, Statement};
use crate::validate::invalid;
use pgrx::prelude::*;

/// Stranded rows, whether each already has a live intent, and the ones to queue now (at most
/// $2, oldest deadline first; rows already queued do not use the budget up).
macro_rules! stranded_cte {
    () => {
        "WITH stranded AS (
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
         )"
    };
}

/// The counters, given a CTE `queued` holding one row per intent (to be) queued.
macro_rules! summary {
    () => {
        " SELECT (SELECT count(*) FROM stranded)::int4,
                 (SELECT count(*) FROM queued)::int4,
                 (SELECT count(*) FROM todo)::int4,
                 (SELECT count(*) FROM stranded WHERE queued AND organization_id <> '')::int4,
                 (SELECT count(*) FROM stranded WHERE organization_id = '')::int4,
                 (SELECT array_agg(execution_id ORDER BY execution_id)
                    FROM (SELECT execution_id FROM stranded WHERE organization_id = ''
                           ORDER BY execution_id LIMIT 10) s)"
    };
}

const REAP: Statement = Statement {
    sql: concat!(
        stranded_cte!(),
        ", queued AS (
             INSERT INTO @extschema@.pg_reaper_outbox (execution_id, organization_id, remaining)
             SELECT execution_id, organization_id, remaining FROM todo
             ON CONFLICT (execution_id) WHERE state <> 'done' DO NOTHING
             RETURNING 1
         )",
        summary!()
    ),
    args: &[pg_sys::INTERVALOID, pg_sys::INT8OID],
    writes: true,
};

/// The same scan, writing nothing: every row of `todo` would be queued.
const REAP_DRY_RUN: Statement = Statement {
    sql: concat!(
        stranded_cte!(),
        ", queued AS (SELECT 1 FROM todo)",
        summary!()
    ),
    args: &[pg_sys::INTERVALOID, pg_sys::INT8OID],
    writes: false,
};

/// Wakes the relays; delivered when the reaping transaction commits.
const WAKE_RELAYS: Statement = Statement {
    sql: "SELECT pg_catalog.pg_notify('pg_reaper_outbox', '')",
    args: &[],
    writes: true,
};

/// Sends the relays' wake-up (delivered at commit).
pub fn wake_relays(
    client: &mut pgrx::spi::SpiClient<'_>,
    schema: pg_sys::Oid,
) -> pgrx::spi::SpiResult<()> {
    plan::run(client, schema, &WAKE_RELAYS, &[]).map(|_| ())
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
    if unsafe { pg_sys::RecoveryInProgress() } {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "reap_expired: the server is a standby (in recovery); reap on the primary"
        );
    }
    let stmt = if dry_run { &REAP_DRY_RUN } else { &REAP };
    let (counts, no_org_sample) = Spi::connect_mut(|client| {
        let args = [guc::stuck_timeout().into(), max_rows.into()];
        let row = plan::run(client, schema, stmt, &args)?.first();
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

/// The WARNING that names the strands nobody can recover.
pub fn warn_no_org(counts: &Counts, sample: &[String]) {
    if counts.skipped_no_org == 0 {
        return;
    }
    let more = counts.skipped_no_org as usize - sample.len();
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    warning!(
        "pg_reaper: {} stranded barrier(s) have no organization_id and are left untouched \
         (the org-scoped status API cannot recover them): {}{more}",
        counts.skipped_no_org,
        sample.join(", ")
    );
}

/// Queues one recovery intent per stranded barrier; see the README for the counters.
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
    warn_no_org(&c, &no_org);
    TableIterator::once((c.stranded, c.queued, c.already_queued, c.skipped_no_org))
}
