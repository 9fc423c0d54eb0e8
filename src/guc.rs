//! Settings. All of them are read by the background worker, which never sees a session `SET`,
//! so they are `sighup` (postgresql.conf, ALTER SYSTEM), except the worker's database (postmaster)
//! and the re-fire hook (superuser only).

use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// Database the background worker connects to (fixed at postmaster start).
pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
/// Seconds between two worker ticks.
pub static NAPTIME: GucSetting<f64> = GucSetting::<f64>::new(5.0);
/// Seconds without a decrement after which a barrier counts as stranded.
pub static STUCK_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(STUCK_TIMEOUT_DEFAULT);
const STUCK_TIMEOUT_DEFAULT: i32 = 9000;
/// Most barriers one worker tick turns into intents.
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(BATCH_SIZE_DEFAULT);
const BATCH_SIZE_DEFAULT: i32 = 1000;
/// Seconds an orphaned dedup marker is kept.
pub static DEDUP_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(RETENTION_DEFAULT);
/// Seconds a `done` intent is kept (its outcome is the audit trail) before the worker deletes it.
pub static OUTBOX_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(RETENTION_DEFAULT);
const RETENTION_DEFAULT: i32 = 86400;
/// Seconds the worker stands by while a session that is not a pg_reaper worker holds the
/// leader lock, before it reaps without the lock.
pub static LEADER_GRACE: GucSetting<i32> = GucSetting::<i32>::new(30);
/// Whether the worker leads and reaps.
pub static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
/// Seconds after a barrier's last batch within which its callback must finish it, before the
/// worker strands it for a re-fire (only with a callback and a re-fire hook). 0: off.
pub static CALLBACK_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(CALLBACK_TIMEOUT_DEFAULT);
const CALLBACK_TIMEOUT_DEFAULT: i32 = 300;
/// Seconds a batch's lapsed lease waits for another claim before its execution is stranded.
pub static RECLAIM_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(RECLAIM_TIMEOUT_DEFAULT);
const RECLAIM_TIMEOUT_DEFAULT: i32 = 600;
/// Function the relay calls instead of marking ERROR when all batches finished.
pub static REFIRE_FUNCTION: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub fn init() {
    // A postmaster-context GUC may only be defined while preloading; a plain LOAD or a
    // CREATE EXTENSION in a backend must not try (Postgres would raise FATAL).
    // SAFETY: a plain read of a backend global that Postgres sets before loading libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        GucRegistry::define_string_guc(
            c"pg_reaper.database",
            c"Database the pg_reaper background worker connects to.",
            c"Create the extension in this database. Needs a server restart to change.",
            &DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    GucRegistry::define_float_guc(
        c"pg_reaper.naptime",
        c"Seconds between two pg_reaper worker ticks.",
        c"",
        &NAPTIME,
        0.1,
        86400.0,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_reaper.stuck_timeout",
        c"Seconds without progress after which a barrier is stranded.",
        c"A barrier is stranded when expires_at has passed or its last decrement is older than this.",
        &STUCK_TIMEOUT,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_reaper.batch_size",
        c"Most stranded barriers the worker queues per tick.",
        c"The rest are queued on the following ticks.",
        &BATCH_SIZE,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_reaper.dedup_retention",
        c"Seconds a dedup marker whose barrier is gone is kept.",
        c"Keep it above the longest execution so that a late redelivery is still skipped.",
        &DEDUP_RETENTION,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_reaper.outbox_retention",
        c"Seconds a done recovery intent is kept before the worker deletes it.",
        c"Pending, in-flight and dead intents are never deleted.",
        &OUTBOX_RETENTION,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_reaper.leader_grace",
        c"Seconds the worker stands by while a session that is not a pg_reaper worker holds the leader lock.",
        c"Any role can take an advisory lock; after this long the worker reaps without it. To stop reaping, set pg_reaper.enabled = off.",
        &LEADER_GRACE,
        1,
        30,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"pg_reaper.enabled",
        c"Whether the pg_reaper worker leads and reaps.",
        c"Off releases the leader lock and leaves the worker idle.",
        &ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_reaper.callback_timeout",
        c"Seconds after its last batch within which a barrier with a callback must be finished.",
        c"Past it the worker strands the barrier and the relay re-fires its callback (with pg_reaper.refire_function set). 0: off, wait for the stuck timeout.",
        &CALLBACK_TIMEOUT,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"pg_reaper.reclaim_timeout",
        c"Seconds a batch whose lease lapsed waits for another claim before its execution is stranded.",
        c"Keep it above the queue's redelivery delay (its visibility timeout and reaper interval).",
        &RECLAIM_TIMEOUT,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"pg_reaper.refire_function",
        c"Function the relay calls to re-fire a stranded callback instead of marking ERROR.",
        c"Called as f(execution_id text, organization_id text, callback jsonb, results jsonb). Empty: off.",
        &REFIRE_FUNCTION,
        GucContext::Suset,
        GucFlags::default(),
    );
    // From 15 on, the prefix is reserved: an unknown `pg_reaper.x` is refused (42602). 14 can
    // only warn about (and drop) the placeholders set so far; later ones are accepted there.
    // SAFETY: a static NUL-terminated string, called from _PG_init as Postgres documents.
    #[cfg(not(feature = "pg14"))]
    unsafe {
        pg_sys::MarkGUCPrefixReserved(c"pg_reaper".as_ptr())
    };
    // SAFETY: as above.
    #[cfg(feature = "pg14")]
    unsafe {
        pg_sys::EmitWarningsOnPlaceholders(c"pg_reaper".as_ptr())
    };
}

/// The value of setting `name` as the SQL functions read it (`pg_reaper_setting` in
/// sql/settings.sql): NULL while the GUC is at its default, so that the `pg_reaper_settings`
/// table (then the default) decides; durations in seconds. Reading the library's own variables
/// costs nothing, where the `pg_settings` view builds a row for every GUC of the server on each
/// read (a recovery reads settings several times). Calling it loads this library, so that a
/// value is read only as Postgres checked it. The extension-free edition has an SQL function of
/// the same name in its place.
#[pg_extern(stable, parallel_safe)]
fn pg_reaper_guc(name: &str) -> Option<String> {
    let int = |setting: &GucSetting<i32>, default: i32| {
        let value = setting.get();
        (value != default).then(|| value.to_string())
    };
    match name {
        "pg_reaper.stuck_timeout" => int(&STUCK_TIMEOUT, STUCK_TIMEOUT_DEFAULT),
        "pg_reaper.batch_size" => int(&BATCH_SIZE, BATCH_SIZE_DEFAULT),
        "pg_reaper.dedup_retention" => int(&DEDUP_RETENTION, RETENTION_DEFAULT),
        "pg_reaper.outbox_retention" => int(&OUTBOX_RETENTION, RETENTION_DEFAULT),
        "pg_reaper.callback_timeout" => int(&CALLBACK_TIMEOUT, CALLBACK_TIMEOUT_DEFAULT),
        "pg_reaper.reclaim_timeout" => int(&RECLAIM_TIMEOUT, RECLAIM_TIMEOUT_DEFAULT),
        "pg_reaper.refire_function" => REFIRE_FUNCTION
            .get()
            .map(|f| f.to_string_lossy().into_owned())
            .filter(|f| !f.is_empty()),
        other => error!("pg_reaper_guc: {other:?} is not a setting the SQL functions read"),
    }
}
