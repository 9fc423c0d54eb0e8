//! 0.1.0's `barrier_claim`, for its SQL objects in the upgrade window (see `barrier`).

use super::validate::{self, invalid};
use crate::plan::{self, Statement};
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
#[pg_extern(sql = false)]
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
