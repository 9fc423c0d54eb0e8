//! 0.1.0's barrier functions (enqueue, decrement, finish, abort), for its SQL objects in the
//! window between a package upgrade and `ALTER EXTENSION pg_reaper UPDATE`. Since 0.2.0 the
//! barrier API is SQL (`sql/barrier.sql`); these keep 0.1.0's behaviour, frozen.

use super::raw_jsonb::RawJsonb;
use super::validate::{self, invalid};
use crate::plan::{self, Statement};
use pgrx::PgTupleDesc;
use pgrx::prelude::*;

const ENQUEUE: Statement = Statement {
    sql: "WITH armed AS (
              INSERT INTO @extschema@.pg_barrier_state AS b
                  (execution_id, organization_id, remaining, results, callback,
                   created_at, expires_at, last_progress_at)
              VALUES ($1, $2, $3, '[]', $5, now(), now() + $4, now())
              ON CONFLICT (execution_id) DO UPDATE SET
                  organization_id = excluded.organization_id,
                  remaining = excluded.remaining,
                  results = '[]',
                  callback = excluded.callback,
                  created_at = excluded.created_at,
                  expires_at = excluded.expires_at,
                  last_progress_at = excluded.last_progress_at
              RETURNING b.expires_at
          ), cleared AS (
              DELETE FROM @extschema@.pg_batch_dedup WHERE execution_id = $1
          )
          SELECT expires_at FROM armed",
    args: &[
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::INT4OID,
        pg_sys::INTERVALOID,
        pg_sys::JSONBOID,
    ],
    writes: true,
};

// The hot path (decrement, claim) runs on every batch, so its functions skip the per-call
// `SET search_path` of the others: their statements name every operator, function and type
// with its schema instead, which makes them mean the same under any caller's search_path
// (tested with a hostile one). The aggregated results are returned only to the one caller
// that sees 0: shipping the growing array back on every pending decrement would make a
// fan-out of n batches cost O(n^2).
const DECREMENT: Statement = Statement {
    sql: "UPDATE @extschema@.pg_barrier_state
             SET remaining = remaining OPERATOR(pg_catalog.-) 1,
                 results = results OPERATOR(pg_catalog.||) pg_catalog.jsonb_build_array($2),
                 last_progress_at = pg_catalog.now()
           WHERE execution_id OPERATOR(pg_catalog.=) $1
       RETURNING remaining, CASE WHEN remaining OPERATOR(pg_catalog.=) 0 THEN results END",
    args: &[pg_sys::TEXTOID, pg_sys::JSONBOID],
    writes: true,
};

const TEAR_DOWN_NEGATIVE: Statement = Statement {
    sql: "DELETE FROM @extschema@.pg_barrier_state
           WHERE execution_id OPERATOR(pg_catalog.=) $1 AND remaining OPERATOR(pg_catalog.<) 0",
    args: &[pg_sys::TEXTOID],
    writes: true,
};

/// Tearing a barrier down, the one statement for it: deletes the row (with `$2`, only if it is
/// still stranded under that stuck timeout) and, when the row went and `$3` does not keep them,
/// its markers. Only the caller whose DELETE removed the row sees true, and only it clears the
/// markers: a second finish, or a finish after an abort that kept the markers, changes nothing.
const TEAR_DOWN: Statement = Statement {
    sql: "WITH gone AS (
              DELETE FROM @extschema@.pg_barrier_state b
               WHERE b.execution_id = $1
                 AND ($2::interval IS NULL
                      OR @extschema@.barrier_is_stranded(b.expires_at, b.last_progress_at,
                                                         b.created_at, $2))
           RETURNING 1
          ), markers AS (
              DELETE FROM @extschema@.pg_batch_dedup
               WHERE execution_id = $1 AND NOT $3 AND EXISTS (SELECT 1 FROM gone)
          )
          SELECT EXISTS (SELECT 1 FROM gone)",
    args: &[pg_sys::TEXTOID, pg_sys::INTERVALOID, pg_sys::BOOLOID],
    writes: true,
};

/// Deletes the barrier of `execution_id` and its markers (see [`TEAR_DOWN`]): only while it is
/// stranded under `if_stranded_after` when given, the markers kept when `keep_markers`.
/// Returns whether this call deleted the barrier.
fn tear_down(
    client: &mut pgrx::spi::SpiClient<'_>,
    schema: pg_sys::Oid,
    execution_id: &str,
    if_stranded_after: Option<Interval>,
    keep_markers: bool,
) -> pgrx::spi::SpiResult<bool> {
    let args = [
        execution_id.into(),
        if_stranded_after.into(),
        keep_markers.into(),
    ];
    plan::run(client, schema, &TEAR_DOWN, &args)?
        .first()
        .get_one::<bool>()
        .map(|gone| gone.unwrap_or(false))
}

/// Arms (or re-arms) the barrier of an execution for `total` batches.
#[pg_extern(sql = false)]
fn barrier_enqueue(
    execution_id: Option<&str>,
    organization_id: Option<&str>,
    total: Option<i32>,
    ttl: default!(Option<Interval>, "'6 hours'"),
    callback: default!(Option<RawJsonb>, "NULL"),
    fcinfo: pg_sys::FunctionCallInfo,
) -> TimestampWithTimeZone {
    const F: &str = "barrier_enqueue";
    let id = validate::new_execution_id(F, execution_id);
    let total = match total {
        Some(n) if n >= 1 => n,
        Some(_) => invalid(F, "total", "must be at least 1"),
        None => invalid(F, "total", "must not be NULL"),
    };
    let ttl = validate::positive_interval(F, "ttl", ttl);
    validate::callback(F, &callback);
    let org = organization_id.unwrap_or("");
    if org.is_empty() {
        warning!(
            "{F}: execution {id} has no organization_id; if it strands it cannot be recovered \
             through the org-scoped status API"
        );
    }
    let schema = plan::schema_of_call(fcinfo);
    Spi::connect_mut(|client| {
        let args = [
            id.into(),
            org.into(),
            total.into(),
            ttl.into(),
            callback.into(),
        ];
        plan::run(client, schema, &ENQUEUE, &args)?
            .first()
            .get_one::<TimestampWithTimeZone>()
    })
    .unwrap_or_else(|e| error!("{F}: {e}"))
    .unwrap_or_else(|| error!("{F}: the barrier row was not written"))
}

/// Counts one batch down and appends its result as one array element.
#[pg_extern(sql = false)]
fn barrier_decrement(
    execution_id: Option<&str>,
    result: default!(Option<RawJsonb>, "NULL"),
    fcinfo: pg_sys::FunctionCallInfo,
) -> pgrx::composite_type!('static, "barrier_decrement_result") {
    const F: &str = "barrier_decrement";
    let id = validate::execution_id(F, execution_id);
    let schema = plan::schema_of_call(fcinfo);
    let (remaining, results) = Spi::connect_mut(|client| {
        let table = plan::run(client, schema, &DECREMENT, &[id.into(), result.into()])?;
        if table.is_empty() {
            return Ok((None, None));
        }
        let table = table.first();
        let remaining = table.get::<i32>(1)?;
        let results = table.get::<pgrx::JsonB>(2)?;
        if remaining.is_some_and(|n| n < 0) {
            plan::run(client, schema, &TEAR_DOWN_NEGATIVE, &[id.into()])?;
        }
        Ok::<_, pgrx::spi::SpiError>((remaining, results))
    })
    .unwrap_or_else(|e| error!("{F}: {e}"));
    let status = match remaining {
        Some(n) if n > 0 => "pending",
        Some(0) => "complete",
        _ => "abandoned",
    };
    // The declared return type, barrier_decrement_result, in whatever schema it was created.
    // SAFETY: fcinfo is the live call frame Postgres passed in; its flinfo is set for every call.
    let rettype = unsafe { pg_sys::get_fn_expr_rettype((*fcinfo).flinfo) };
    let tupdesc = PgTupleDesc::for_composite_type_by_oid(rettype).unwrap_or_else(|| {
        error!("{F}: its return type (oid {rettype:?}) is not a composite type")
    });
    let datums = [
        status.into_datum(),
        remaining.into_datum(),
        results.into_datum(),
    ];
    // SAFETY: three datums of the types of barrier_decrement_result, in its column order.
    unsafe { PgHeapTuple::from_datums(tupdesc, datums) }.unwrap_or_else(|e| error!("{F}: {e}"))
}

/// Deletes the barrier and its dedup markers once the callback was enqueued.
#[pg_extern(sql = false)]
fn barrier_finish(execution_id: Option<&str>, fcinfo: pg_sys::FunctionCallInfo) -> bool {
    const F: &str = "barrier_finish";
    let id = validate::execution_id(F, execution_id);
    let schema = plan::schema_of_call(fcinfo);
    Spi::connect_mut(|client| tear_down(client, schema, id, None, false))
        .unwrap_or_else(|e| error!("{F}: {e}"))
}

/// Tears the barrier down after a failed batch; exactly one caller sees `aborted`.
#[pg_extern(sql = false)]
fn barrier_abort(
    execution_id: Option<&str>,
    preserve_dedup: default!(Option<bool>, false),
    fcinfo: pg_sys::FunctionCallInfo,
) -> &'static str {
    const F: &str = "barrier_abort";
    let id = validate::execution_id(F, execution_id);
    let Some(preserve) = preserve_dedup else {
        invalid(F, "preserve_dedup", "must not be NULL")
    };
    let schema = plan::schema_of_call(fcinfo);
    let aborted = Spi::connect_mut(|client| tear_down(client, schema, id, None, preserve))
        .unwrap_or_else(|e| error!("{F}: {e}"));
    if aborted {
        "aborted"
    } else {
        "already_aborted"
    }
}
