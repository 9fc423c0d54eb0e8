//! The one-row status view: what the worker is doing, and the gauges of the tables.

use crate::plan::{self, Statement};
use crate::{guc, worker};
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
    let args = [guc::stuck_timeout().into()];
    let g = Spi::connect_mut(|client| {
        let row = plan::run(client, schema, &GAUGES, &args)?.first();
        let n = |i| row.get::<i64>(i).map(Option::unwrap_or_default);
        Ok::<_, pgrx::spi::SpiError>((
            [n(1)?, n(2)?, n(3)?, n(4)?],
            row.get::<Interval>(5)?,
            [n(6)?, n(7)?],
        ))
    })
    .unwrap_or_else(|e| error!("reaper_status: {e}"));
    // The holder of the leader lock, from the lock table (the source of truth): a pg_reaper
    // worker (`leader_pid`), or any other session (`lock_holder_*`, which delays reaping by
    // `pg_reaper.leader_grace`).
    let holder = worker::lock_holder();
    let holder_pid = holder.as_ref().map(|h| h.pid);
    let holder_is_worker = holder.as_ref().is_some_and(|h| h.is_worker);
    let (holder_role, holder_application) = holder
        .map(|h| (Some(h.role), Some(h.application)))
        .unwrap_or((None, None));
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
        g.0[0],
        g.0[1],
        g.0[2],
        g.0[3],
        g.1,
        g.2[0],
        g.2[1],
        worker_state,
        w.map(|w| w.failed_ticks),
        holder_pid.filter(|_| other),
        holder_role.filter(|_| other),
        holder_application.filter(|_| other),
    ))
}
