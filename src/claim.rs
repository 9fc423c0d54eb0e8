//! Per-batch dedup: a redelivered batch must not be counted down twice.

use crate::barrier::{invalid, require_execution_id};
use crate::plan::{self, Statement};
use pgrx::prelude::*;

const CLAIM: Statement = Statement {
    sql: "INSERT INTO @extschema@.pg_batch_dedup (execution_id, batch_index) VALUES ($1, $2)
          ON CONFLICT DO NOTHING
          RETURNING true",
    args: &[pg_sys::TEXTOID, pg_sys::INT4OID],
};

/// True for the first delivery of a batch, false for every redelivery.
#[pg_extern(security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn barrier_claim(
    execution_id: Option<&str>,
    batch_index: Option<i32>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> bool {
    const F: &str = "barrier_claim";
    let id = require_execution_id(F, execution_id);
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
