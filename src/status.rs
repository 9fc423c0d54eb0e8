//! What the background worker is doing, for the status view (`sql/status.sql` adds the
//! gauges): read from the worker's shared memory and the lock table.

use crate::worker;
use pgrx::prelude::*;

/// The worker's columns of the status view.
pub struct WorkerRow {
    pub leader_pid: Option<i32>,
    pub last_tick_at: Option<TimestampWithTimeZone>,
    pub ticks: Option<i64>,
    pub last_tick_queued: Option<i32>,
    pub worker_state: Option<&'static str>,
    pub failed_ticks: Option<i64>,
    pub lock_holder_pid: Option<i32>,
    pub lock_holder_role: Option<String>,
    pub lock_holder_application: Option<String>,
}

/// The worker's row: the holder of the leader lock comes from the lock table (the source of
/// truth): a pg_reaper worker (`leader_pid`), or any other session (`lock_holder_*`, which
/// delays reaping by `pg_reaper.leader_grace`). The worker's shared state describes the one
/// database it serves; elsewhere it says so.
pub fn worker_row() -> WorkerRow {
    let holder = worker::lock_holder();
    let holder_pid = holder.as_ref().map(|h| h.pid);
    let holder_is_worker = holder.as_ref().is_some_and(|h| h.is_worker);
    let (holder_role, holder_application) = holder
        .map(|h| (Some(h.role), Some(h.application)))
        .unwrap_or((None, None));
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
    WorkerRow {
        leader_pid,
        last_tick_at: w
            .and_then(|w| w.last_tick_at)
            .and_then(|t| TimestampWithTimeZone::try_from(t).ok()),
        ticks: w.map(|w| w.ticks),
        last_tick_queued: w.map(|w| w.last_tick_queued),
        worker_state: match w {
            Some(w) => Some(w.state.name()),
            None if elsewhere => Some("other_database"),
            None => None,
        },
        failed_ticks: w.map(|w| w.failed_ticks),
        lock_holder_pid: holder_pid.filter(|_| other),
        lock_holder_role: holder_role.filter(|_| other),
        lock_holder_application: holder_application.filter(|_| other),
    }
}

/// The worker's columns of `pg_reaper_status`, in the native edition.
#[pg_extern(security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
pub fn pg_reaper_worker() -> TableIterator<
    'static,
    (
        name!(leader_pid, Option<i32>),
        name!(last_tick_at, Option<TimestampWithTimeZone>),
        name!(ticks, Option<i64>),
        name!(last_tick_queued, Option<i32>),
        name!(worker_state, Option<&'static str>),
        name!(failed_ticks, Option<i64>),
        name!(lock_holder_pid, Option<i32>),
        name!(lock_holder_role, Option<String>),
        name!(lock_holder_application, Option<String>),
    ),
> {
    let w = worker_row();
    TableIterator::once((
        w.leader_pid,
        w.last_tick_at,
        w.ticks,
        w.last_tick_queued,
        w.worker_state,
        w.failed_ticks,
        w.lock_holder_pid,
        w.lock_holder_role,
        w.lock_holder_application,
    ))
}
