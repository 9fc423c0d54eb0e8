//! The worker's housekeeping of the outbox and the markers: each chore one call of its SQL
//! function (`sql/outbox.sql`, `sql/barrier.sql`), which reads its retention setting itself.

use crate::plan::{self, Statement};
use pgrx::prelude::*;

const REOFFER_EXPIRED_LEASES: Statement = Statement {
    sql: "SELECT @extschema@.pg_reaper_reoffer_expired_leases()",
    args: &[],
    writes: true,
};

const PRUNE_DONE: Statement = Statement {
    sql: "SELECT @extschema@.pg_reaper_prune_done(
                     @extschema@.pg_reaper_duration('pg_reaper.outbox_retention'))",
    args: &[],
    writes: true,
};

const SWEEP_ORPHAN_MARKERS: Statement = Statement {
    sql: "SELECT @extschema@.pg_reaper_sweep_orphan_markers(
                     @extschema@.pg_reaper_duration('pg_reaper.dedup_retention'))",
    args: &[],
    writes: true,
};

/// A backlog fills the outbox within seconds, long before autovacuum's next look at it: plans
/// made from the statistics of a nearly empty outbox would read all of it on every claim.
const ANALYZE: Statement = Statement {
    sql: "ANALYZE @extschema@.pg_reaper_outbox",
    args: &[],
    writes: true,
};

/// Runs a housekeeping statement that returns how many rows it changed.
fn count(schema: pg_sys::Oid, stmt: &'static Statement, what: &str) -> usize {
    Spi::connect_mut(|client| {
        plan::run(client, schema, stmt, &[])?
            .first()
            .get_one::<i64>()
            .map(|n| usize::try_from(n.unwrap_or_default()).unwrap_or_default())
    })
    .unwrap_or_else(|e| error!("pg_reaper: {what}: {e}"))
}

/// Makes intents whose lease expired claimable again; returns how many.
pub fn reoffer_expired_leases(schema: pg_sys::Oid) -> usize {
    count(
        schema,
        &REOFFER_EXPIRED_LEASES,
        "re-offering expired leases",
    )
}

/// Deletes done intents older than pg_reaper.outbox_retention; returns how many.
pub fn prune_done(schema: pg_sys::Oid) -> usize {
    count(schema, &PRUNE_DONE, "pruning done intents")
}

/// Deletes orphaned markers older than pg_reaper.dedup_retention; returns how many.
pub fn sweep_orphan_markers(schema: pg_sys::Oid) -> usize {
    count(schema, &SWEEP_ORPHAN_MARKERS, "sweeping dedup markers")
}

/// Refreshes the outbox's statistics.
pub fn analyze(schema: pg_sys::Oid) {
    Spi::connect_mut(|client| plan::run(client, schema, &ANALYZE, &[]).map(|_| ()))
        .unwrap_or_else(|e| error!("pg_reaper: analyzing the outbox: {e}"))
}
