//! The one-row status view: what the worker is doing, and the gauges of the tables.

use crate::plan::{self, Statement};
use crate::{guc, worker};
use pgrx::prelude::*;

/// The holder of the leader lock comes from the lock table, the source of truth: a pg_reaper
/// worker (`leader_pid`), or any other session (`lock_holder_*`, which delays reaping by
/// `pg_reaper.leader_grace`).
const GAUGES: Statement = Statement {
    sql: "SELECT h.pid, h.is_worker, h.role, h.application,
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
                            FROM @extschema@.pg_barrier_state) x) b
            LEFT JOIN (SELECT l.pid, a.backend_type = 'pg_reaper' AS is_worker,
                              a.usename::text AS role, a.application_name AS application
                         FROM pg_catalog.pg_locks l
                         JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
                        WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                          AND l.database = (SELECT oid FROM pg_catalog.pg_database
                                             WHERE datname = pg_catalog.current_database())
                          AND l.classid::int8 * 4294967296 + l.objid::int8 = $2
                        LIMIT 1) h ON true",
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
        name!(lock_holder_pid, Option<i32>),
        name!(lock_holder_role, Option<String>),
        name!(lock_holder_application, Option<String>),
    ),
> {
    let schema = plan::schema_of_call(fcinfo);
    let args = [guc::stuck_timeout().into(), worker::LEADER_LOCK_KEY.into()];
    let g = Spi::connect_mut(|client| {
        let row = plan::run(client, schema, &GAUGES, &args)?.first();
        let n = |i| row.get::<i64>(i).map(Option::unwrap_or_default);
        let holder = (
            row.get::<i32>(1)?,
            row.get::<bool>(2)?.unwrap_or(false),
            row.get::<String>(3)?,
            row.get::<String>(4)?,
        );
        Ok::<_, pgrx::spi::SpiError>((
            holder,
            [n(5)?, n(6)?, n(7)?, n(8)?],
            row.get::<Interval>(9)?,
            [n(10)?, n(11)?],
        ))
    })
    .unwrap_or_else(|e| error!("reaper_status: {e}"));
    let (holder_pid, holder_is_worker, holder_role, holder_application) = g.0;
    // The worker's shared state describes the one database it serves; elsewhere it says so.
    // SAFETY: a plain read of this backend's database.
    let here = unsafe { pg_sys::MyDatabaseId };
    let (w, elsewhere) = match worker::stats() {
        Some(w) if w.database == here => (Some(w), false),
        Some(_) => (None, true),
        None => (None, false),
    };
    let leader_pid = match w {
        Some(w) if w.state == worker::State::Contested => Some(w.pid),
        _ => holder_pid.filter(|_| holder_is_worker),
    };
    let other = !holder_is_worker;
    let worker_state = match w {
        Some(w) => Some(w.state.name()),
        None if elsewhere => Some("other_database"),
        None => None,
    };
    let last_tick_at = w
        .and_then(|w| w.last_tick_at)
        .and_then(|t| TimestampWithTimeZone::try_from(t).ok());
    TableIterator::once((
        leader_pid,
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
        worker_state,
        w.map(|w| w.failed_ticks),
        holder_pid.filter(|_| other),
        holder_role.filter(|_| other),
        holder_application.filter(|_| other),
    ))
}
