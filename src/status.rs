//! The one-row status view: what the worker last did, and the gauges of the tables.

use crate::guc;
use crate::plan::{self, Statement};
use pgrx::prelude::*;

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
};

/// The row behind the `pg_reaper_status` view.
#[pg_extern(security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
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
    ),
> {
    let schema = plan::schema_of_call(fcinfo);
    let row = Spi::connect_mut(|client| {
        let row = plan::run(client, schema, &GAUGES, &[guc::stuck_timeout().into()])?.first();
        let n = |i| row.get::<i64>(i).map(Option::unwrap_or_default);
        Ok::<_, pgrx::spi::SpiError>((
            n(1)?,
            n(2)?,
            n(3)?,
            n(4)?,
            row.get::<Interval>(5)?,
            n(6)?,
            n(7)?,
        ))
    })
    .unwrap_or_else(|e| error!("reaper_status: {e}"));
    // The worker's columns arrive with the background worker.
    TableIterator::once((
        None, None, None, None, row.0, row.1, row.2, row.3, row.4, row.5, row.6,
    ))
}
