//! Per-batch dedup: a redelivered batch must not be counted down twice.

use crate::plan::{self, Statement};
use crate::validate::{self, invalid};
use pgrx::prelude::*;

const CLAIM: Statement = Statement {
    sql: "INSERT INTO @extschema@.pg_batch_dedup (execution_id, batch_index, created_at)
          VALUES ($1, $2, pg_catalog.now())
          ON CONFLICT DO NOTHING
          RETURNING true",
    args: &[pg_sys::TEXTOID, pg_sys::INT4OID],
    writes: true,
};

/// True for the first delivery of a batch, false for every redelivery. On the hot path: no
/// per-call `SET search_path` (see `barrier::DECREMENT`); CLAIM qualifies its one function. It
/// names created_at because an adopted dedup table has no column defaults.
#[pg_extern(security_definer, parallel_unsafe)]
fn barrier_claim(
    execution_id: Option<&str>,
    batch_index: Option<i32>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> bool {
    const F: &str = "barrier_claim";
    let id = validate::execution_id(F, execution_id);
    let index = match batch_index {
        Some(i) if i >= 0 => i,
        Some(_) => invalid(F, "batch_index", "must not be negative"),
        None => invalid(F, "batch_index", "must not be NULL"),
    };
    let schema = plan::schema_of_call(fcinfo);
    Spi::connect_mut(|client| {
        plan::run(client, schema, &CLAIM, &[id.into(), index.into()]).map(|t| !t.is_empty())
    })
    .unwrap_or_else(|e| error!("{F}: {e}"))
}

/// Markers outlive their barrier on purpose (a redelivery after an abort must still be
/// skipped), but not forever: past the retention, a marker whose execution has no barrier row
/// is garbage. A live barrier's markers are never touched, however old.
const SWEEP_ORPHAN_MARKERS: Statement = Statement {
    sql: "DELETE FROM @extschema@.pg_batch_dedup d
           WHERE d.created_at < now() - $1
             AND NOT EXISTS (SELECT 1 FROM @extschema@.pg_barrier_state b
                              WHERE b.execution_id = d.execution_id)",
    args: &[pg_sys::INTERVALOID],
    writes: true,
};

/// Deletes orphaned markers older than `retention`; returns how many.
pub fn sweep_orphan_markers(schema: pg_sys::Oid, retention: Interval) -> usize {
    Spi::connect_mut(|client| {
        plan::run(client, schema, &SWEEP_ORPHAN_MARKERS, &[retention.into()]).map(|t| t.len())
    })
    .unwrap_or_else(|e| error!("pg_reaper: sweeping dedup markers: {e}"))
}
