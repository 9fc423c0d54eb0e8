//! The one-row status view: what the worker is doing, and the gauges of the tables.

use crate::plan::{self, Statement};
use crate::{guc, worker};
use pgrx::prelude::*;

/// `leader_pid` comes from the lock table, the source of truth: NULL when no pg_reaper worker
/// holds the leader lock (for example while an operator's session holds it).
const GAUGES: Statement = Statement {
    sql: "SELECT (SELECT l.pid
                    FROM pg_catalog.pg_locks l
                    JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
                   WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                     AND l.database = (SELECT oid FROM pg_catalog.pg_database
                                        WHERE datname = pg_catalog.current_database())
                     AND l.classid::int8 * 4294967296 + l.objid::int8 = $2
                     AND a.backend_type = 'pg_reaper'
                   LIMIT 1),
                 o.pending, o.in_flight, o.dead, o.done, o.oldest_pending_age, b.live, b.stranded
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
    args: &[pg_sys::INTERVALOID, pg_sys::INT8OID],
    writes: false,
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
        name!(worker_state, Option<&'static str>),
        name!(failed_ticks, Option<i64>),
    ),
> {
    let schema = plan::schema_of_call(fcinfo);
    let args = [guc::stuck_timeout().into(), worker::LEADER_LOCK_KEY.into()];
    let g = Spi::connect_mut(|client| {
        let row = plan::run(client, schema, &GAUGES, &args)?.first();
        let n = |i| row.get::<i64>(i).map(Option::unwrap_or_default);
        Ok::<_, pgrx::spi::SpiError>((
            row.get::<i32>(1)?,
            [n(2)?, n(3)?, n(4)?, n(5)?],
            row.get::<Interval>(6)?,
            [n(7)?, n(8)?],
        ))
    })
    .unwrap_or_else(|e| error!("reaper_status: {e}"));
    let w = worker::stats();
    let last_tick_at = w
        .and_then(|w| w.last_tick_at)
        .and_then(|t| TimestampWithTimeZone::try_from(t).ok());
    TableIterator::once((
        g.0,
        last_tick_at,
        w.map(|w| w.ticks),
        w.map(|w| w.last_tick_queued),
        g.1[0],
        g.1[1],
        g.1[2],
        g.1[3],
        g.2,
        g.3[0],
        g.3[1],
        w.map(|w| w.state.name()),
        w.map(|w| w.failed_ticks),
    ))
}
