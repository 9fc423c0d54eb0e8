//! The background worker: one per server, started by `shared_preload_libraries`.
//!
//! Each naptime it runs one tick, like pg_cron's and pg_net's loops. The tick finds out, in one
//! short transaction, what the worker may do (is there a database, the extension, a primary,
//! is it enabled, does it hold the leader lock) and, as leader, runs its chores, each in a
//! transaction of its own with a lock and a statement timeout: reap, re-offer intents whose
//! relay lease expired, sweep orphaned dedup markers, prune done intents, check the barrier
//! tables (the platform's migrations change them: a drift is named in a WARNING). A failing chore is
//! rolled back and logged with its SQLSTATE, the others still run, and the next tick runs: the
//! worker never takes the server down and never spins in a crash-restart loop. It shows what it
//! is doing in `pg_stat_activity`, flushes its table statistics after its commits (autovacuum
//! sees its deletes), and SIGTERM interrupts it even inside a statement. Leadership only avoids
//! duplicate work; every write is a compare-and-set on rows, so two leaders would be harmless.

use crate::{guc, outbox, reap};
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::lwlock::PgLwLock;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::{PgTryBuilder, pg_shmem_init};
use std::ffi::CString;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The leader lock: `pg_try_advisory_lock(8099568234601145714)`, the bytes of "pgreaper".
/// Advisory locks are per database, so it is scoped to the extension's database.
pub const LEADER_LOCK_KEY: i64 = 0x7067_7265_6170_6572;

/// What the worker is doing; shown as `worker_state` in the status view.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    #[default]
    Starting,
    WaitingForDatabase,
    WaitingForExtension,
    Recovery,
    Disabled,
    Standby,
    Leader,
    /// Reaping without the leader lock: a session that is not a pg_reaper worker has held it
    /// for longer than `pg_reaper.leader_grace`.
    Contested,
    /// The database's SQL objects are an earlier version than the library (a package upgrade
    /// before `ALTER EXTENSION pg_reaper UPDATE`): reaping waits for the update.
    Outdated,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::WaitingForDatabase => "waiting_for_database",
            State::WaitingForExtension => "waiting_for_extension",
            State::Recovery => "recovery",
            State::Disabled => "disabled",
            State::Standby => "standby",
            State::Leader => "leader",
            State::Contested => "contested",
            State::Outdated => "outdated",
        }
    }
}

/// Worker state shared with the backends that read the status view.
#[derive(Clone, Copy, Default)]
pub struct Stats {
    pub state: State,
    pub ticks: i64,
    pub last_tick_at: Option<pg_sys::TimestampTz>,
    pub last_tick_queued: i32,
    pub failed_ticks: i64,
    /// The worker's process and the database it serves (InvalidOid until connected).
    pub pid: i32,
    pub database: pg_sys::Oid,
    /// Set when a start could not connect (the database did not exist): the next start waits
    /// for the database without connecting. Unset in fresh shared memory, so that a server
    /// start connects at once.
    database_missing: bool,
    database_wait_logged: bool,
}

// SAFETY: plain Copy data, no pointers.
unsafe impl PGRXSharedMemory for Stats {}

// SAFETY: the lock is initialised by pg_shmem_init! while preloading, before any use.
static STATS: PgLwLock<Stats> = unsafe { PgLwLock::new(c"pg_reaper_worker") };
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Registers the worker and its shared memory; only while preloading.
pub fn register() {
    PRELOADED.store(true, Ordering::Relaxed);
    pg_shmem_init!(STATS);
    BackgroundWorkerBuilder::new("pg_reaper leader")
        .set_type("pg_reaper")
        .set_library("pg_reaper")
        .set_function("pg_reaper_worker_main")
        .enable_spi_access()
        // Start on a hot standby too, so that it can say it is idle, and lead once promoted.
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(Duration::from_secs(2)))
        .load();
}

/// The worker's shared state, or None when the library was not preloaded (no worker).
pub fn stats() -> Option<Stats> {
    PRELOADED.load(Ordering::Relaxed).then(|| *STATS.share())
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn pg_reaper_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // SIGTERM as in any backend: `die` sets the interrupt that the next CHECK_FOR_INTERRUPTS
    // (inside a lock wait, a scan, or at the latch) turns into a clean FATAL exit, so a
    // shutdown or pg_terminate_backend() never waits for a long chore to end.
    // SAFETY: installs Postgres's own handler for this process, as bgworker.c documents.
    // (PostgreSQL 18 names the backend's function pqsignal_be; pqsignal is a macro there.)
    #[cfg(not(feature = "pg18"))]
    unsafe {
        pg_sys::pqsignal(pg_sys::SIGTERM as i32, Some(postgres_die))
    };
    // SAFETY: as above.
    #[cfg(feature = "pg18")]
    unsafe {
        pg_sys::pqsignal_be(pg_sys::SIGTERM as i32, Some(postgres_die))
    };
    let database = guc::DATABASE
        .get()
        .and_then(|s| s.into_string().ok())
        .unwrap_or_else(|| "postgres".to_string());

    if STATS.share().database_missing {
        wait_for_database(&database);
    }
    // Until the connection succeeds, a restart must wait for the database (the FATAL "database
    // does not exist" of a failed connection would otherwise repeat every restart interval).
    // A start that connects at once needs no restart, which the postmaster can make late (seen:
    // a minute after the exit, on a loaded machine).
    STATS.exclusive().database_missing = true;
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    {
        let mut s = STATS.exclusive();
        s.database_missing = false;
        s.database_wait_logged = false;
        // SAFETY: plain reads of this backend's globals, set by the connection above.
        unsafe {
            s.pid = pg_sys::MyProcPid;
            s.database = pg_sys::MyDatabaseId;
        }
    }
    // The worker runs as a superuser: resolve every name of its statements in pg_catalog, never
    // through a search_path a database owner could have set (ALTER DATABASE … SET).
    // No JIT either: its statements are short, and compiling one costs more than running it
    // (hundreds of milliseconds a step when stale statistics inflate a plan's cost).
    for (name, value) in [(c"search_path", c"pg_catalog, pg_temp"), (c"jit", c"off")] {
        // SAFETY: both strings are static and NUL-terminated; the GUCs exist in every backend.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            );
        }
    }
    log!("pg_reaper: worker started in database \"{database}\"");

    let mut worker = Worker::default();
    loop {
        if BackgroundWorker::sighup_received() {
            // SAFETY: re-reads the configuration between ticks, as the postmaster asked.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
            log!(
                "pg_reaper: configuration reloaded: naptime {} s, batch_size {}, stuck_timeout {} s, \
                 leader_grace {} s, enabled {}",
                guc::NAPTIME.get(),
                guc::BATCH_SIZE.get(),
                guc::STUCK_TIMEOUT.get(),
                guc::LEADER_GRACE.get(),
                guc::ENABLED.get()
            );
        }
        // Catching up on a backlog, the next tick starts at once; it still passes through the
        // latch (postmaster death), the reload above and the interrupts of every statement.
        let nap = if worker.tick() {
            naptime()
        } else {
            Duration::ZERO
        };
        report_activity(None);
        // Returns false only on postmaster death: SIGTERM exits through `die` (a FATAL with
        // exit code 1, so the postmaster starts the worker again after pg_terminate_backend();
        // during a server shutdown it starts nothing).
        if !BackgroundWorker::wait_latch(Some(nap)) {
            break;
        }
    }
    log!("pg_reaper: worker shutting down");
    // SAFETY: ends the process the way a backend does.
    unsafe { pg_sys::proc_exit(1) };
}

// SAFETY: `die` is exported by the postgres binary with this signature (postgres.h).
unsafe extern "C-unwind" {
    /// Postgres's own SIGTERM handler (pgrx's `pg_sys::die` is a Rust wrapper, not a handler).
    #[link_name = "die"]
    fn postgres_die(signal: std::ffi::c_int);
}

/// Shows what the worker is doing in `pg_stat_activity` (`query`, `state`): a chore while it
/// runs, idle between ticks.
fn report_activity(chore: Option<&'static std::ffi::CStr>) {
    // SAFETY: pgstat copies the string; both are valid for the call.
    unsafe {
        match chore {
            Some(what) => {
                pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, what.as_ptr())
            }
            None => {
                pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null())
            }
        }
    }
}

fn naptime() -> Duration {
    Duration::from_secs_f64(guc::NAPTIME.get().max(0.1))
}

/// Connected to no database (shared catalogs only), polls for `database`; once it exists,
/// exits so that the next start connects to it. Says so once, however long it waits.
fn wait_for_database(database: &str) -> ! {
    BackgroundWorker::connect_worker_to_spi(None, None);
    let name = CString::new(database).unwrap_or_default();
    loop {
        let exists = in_transaction(|| database_exists(&name));
        match exists {
            Ok(true) => {
                STATS.exclusive().database_missing = false;
                // SAFETY: ends the process the way a backend does; the next start connects.
                unsafe { pg_sys::proc_exit(1) };
            }
            Ok(false) => {
                let mut s = STATS.exclusive();
                s.state = State::WaitingForDatabase;
                if !s.database_wait_logged {
                    s.database_wait_logged = true;
                    log!(
                        "pg_reaper: database \"{database}\" (pg_reaper.database) does not exist; \
                         waiting for it"
                    );
                }
            }
            Err(e) => warning!("pg_reaper: looking for database \"{database}\": {e}"),
        }
        if !BackgroundWorker::wait_latch(Some(naptime().max(Duration::from_secs(1)))) {
            // SAFETY: the postmaster died; end the process the way a backend does.
            unsafe { pg_sys::proc_exit(1) };
        }
    }
}

/// Whether `name` is in pg_database. A heap scan, like the autovacuum launcher's: without a
/// database, an index lookup (`get_database_oid`) can need pg_class and fail.
fn database_exists(name: &std::ffi::CStr) -> bool {
    // SAFETY: catalog scan inside a transaction; every tuple is a pg_database row.
    unsafe {
        let rel = pg_sys::table_open(pg_sys::DatabaseRelationId, pg_sys::AccessShareLock as _);
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        let mut found = false;
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let row = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
            if std::ffi::CStr::from_ptr((*row).datname.data.as_ptr()) == name {
                found = true;
                break;
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as _);
        found
    }
}

/// Runs `f` in its own transaction; an ERROR anywhere (including at commit) rolls it back
/// and comes back as the error's message instead of ending the process.
fn in_transaction<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    // SAFETY: called between transactions only (the main loop, never nested); every path below
    // ends the transaction it starts, by commit or by abort.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    PgTryBuilder::new(AssertUnwindSafe(|| {
        let result = f();
        // SAFETY: pops the snapshot pushed above and commits the transaction started above.
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(result)
    }))
    .catch_others(|e| {
        // SAFETY: the ERROR left the transaction aborted; this cleans it up and forgets the
        // error's state, as PostgresMain's error recovery does.
        unsafe {
            pg_sys::AbortCurrentTransaction();
            pg_sys::FlushErrorState();
        }
        Err(match e {
            pgrx::pg_sys::panic::CaughtError::PostgresError(r)
            | pgrx::pg_sys::panic::CaughtError::ErrorReport(r)
            | pgrx::pg_sys::panic::CaughtError::RustPanic { ereport: r, .. } => {
                // SAFETY: unpack_sql_state returns a pointer to a static buffer of 5 chars.
                let code = unsafe {
                    std::ffi::CStr::from_ptr(pg_sys::unpack_sql_state(r.sql_error_code() as i32))
                }
                .to_string_lossy()
                .into_owned();
                format!("{} (SQLSTATE {code})", r.message())
            }
        })
    })
    .execute()
}

const FIND_EXTENSION: &str =
    "SELECT extnamespace, extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_reaper'";
const TRY_LEAD: &str = "SELECT pg_catalog.pg_try_advisory_lock($1)";
/// Who holds the leader lock in this database, when the worker could not take it.
const LOCK_HOLDER: &str = "SELECT a.pid, a.usename::text, a.application_name,
                                  a.backend_type = 'pg_reaper'
                             FROM pg_catalog.pg_locks l
                             JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid
                            WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
                              AND l.database = (SELECT oid FROM pg_catalog.pg_database
                                                 WHERE datname = pg_catalog.current_database())
                              AND l.classid::int8 * 4294967296 + l.objid::int8 = $1
                            LIMIT 1";
const STOP_LEADING: &str = "SELECT pg_catalog.pg_advisory_unlock_all()";
/// A chore must not hang behind somebody else's lock, nor run away; the next tick tries again.
const CHORE_TIMEOUTS: &str = "SELECT pg_catalog.set_config('lock_timeout', '5s', true),
                                    pg_catalog.set_config('statement_timeout', '60s', true)";

/// The extension's schema and the version of its SQL objects in this database.
fn extension() -> Option<(pg_sys::Oid, String)> {
    Spi::connect(|client| {
        let table = client.select(FIND_EXTENSION, Some(1), &[])?;
        if table.is_empty() {
            return Ok(None);
        }
        let (schema, version) = table.first().get_two::<pg_sys::Oid, String>()?;
        Ok::<_, pgrx::spi::SpiError>(schema.zip(version))
    })
    .unwrap_or_else(|e| error!("{e}"))
}

/// A session holding the leader lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: i32,
    pub role: String,
    pub application: String,
    /// Another pg_reaper worker: waited for as long as it holds the lock.
    pub is_worker: bool,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {}, role \"{}\", application \"{}\"",
            self.pid, self.role, self.application
        )
    }
}

/// Who holds the leader lock in this database (the worker and the status view ask).
pub fn lock_holder() -> Option<Holder> {
    Spi::connect(|client| {
        let t = client.select(LOCK_HOLDER, Some(1), &[LEADER_LOCK_KEY.into()])?;
        if t.is_empty() {
            return Ok(None);
        }
        let row = t.first();
        Ok::<_, pgrx::spi::SpiError>(Some(Holder {
            pid: row.get::<i32>(1)?.unwrap_or_default(),
            role: row.get::<String>(2)?.unwrap_or_default(),
            application: row.get::<String>(3)?.unwrap_or_default(),
            is_worker: row.get::<bool>(4)?.unwrap_or(false),
        }))
    })
    .unwrap_or_else(|e| error!("{e}"))
}

#[derive(Default)]
struct Worker {
    state: State,
    leader: bool,
    /// Since when the lock was held by somebody else, and by whom (for the log).
    standby_since: Option<std::time::Instant>,
    holder: Option<Holder>,
    /// The SQL objects' version when it is not the library's (for the log).
    installed_version: String,
    consecutive_failures: u64,
    /// Set when a chore failed because DROP EXTENSION committed while the tick ran: the tick's
    /// other chores are skipped, and nothing counts as failed (the next tick waits for the
    /// extension and says so).
    dropped_mid_tick: bool,
    last_no_org: i32,
    /// What changed in the barrier tables, as last logged (None: usable).
    last_drift: Option<String>,
    /// Where the walk over the strands stands (see `reap::walk_step`).
    walk: reap::Walk,
    /// When the sweep and the prune last ran: once per naptime, also while catching up.
    last_housekeeping: Option<std::time::Instant>,
    /// When the outbox was last analyzed (once per naptime at most, while catching up).
    last_analyze: Option<std::time::Instant>,
    /// What the ticks did since the last log line, and when that was.
    unreported: Work,
    last_report: Option<std::time::Instant>,
}

/// The leader's chores, in the order a tick runs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chore {
    /// Overdue callbacks and lapsed leases stranded now (see `reap::cut_deadlines`).
    CutDeadlines,
    /// A step of the walk over the strands (see `reap::walk_step`).
    Reap,
    /// While catching up: the outbox's statistics, for the relays' claims.
    AnalyzeOutbox,
    /// Once the walk caught up: the strands nobody can recover.
    CountOrgless,
    ReofferLeases,
    SweepMarkers,
    PruneDone,
    /// Once per naptime: the barrier tables as the platform's migrations left them.
    CheckTables,
}

impl Chore {
    /// What it is called in the log.
    fn name(self) -> &'static str {
        match self {
            Chore::CutDeadlines => "cut deadlines",
            Chore::Reap => "reap",
            Chore::AnalyzeOutbox => "analyze the outbox",
            Chore::CountOrgless => "count org-less strands",
            Chore::ReofferLeases => "re-offer expired leases",
            Chore::SweepMarkers => "sweep dedup markers",
            Chore::PruneDone => "prune done intents",
            Chore::CheckTables => "check the barrier tables",
        }
    }

    /// What `pg_stat_activity` shows while it runs.
    fn activity(self) -> &'static std::ffi::CStr {
        match self {
            Chore::CutDeadlines => c"pg_reaper: cut deadlines",
            Chore::Reap => c"pg_reaper: reap",
            Chore::AnalyzeOutbox => c"pg_reaper: analyze the outbox",
            Chore::CountOrgless => c"pg_reaper: count org-less strands",
            Chore::ReofferLeases => c"pg_reaper: re-offer expired leases",
            Chore::SweepMarkers => c"pg_reaper: sweep dedup markers",
            Chore::PruneDone => c"pg_reaper: prune done intents",
            Chore::CheckTables => c"pg_reaper: check the barrier tables",
        }
    }
}

/// What one leader tick's chores did.
#[derive(Default)]
struct Done {
    work: Work,
    /// The walk over the strands reached its end: the worker may nap.
    caught_up: bool,
    /// A chore failed (rolled back and logged).
    failed: bool,
}

/// What leader ticks did.
#[derive(Default)]
struct Work {
    overdue_callbacks: i64,
    lapsed_leases: i64,
    queued: i64,
    reoffered: usize,
    swept: usize,
    pruned: usize,
}

impl Worker {
    /// One tick. Returns whether the worker may nap: false while it is catching up on a
    /// backlog (the last step filled its batch), so that it goes on at once.
    fn tick(&mut self) -> bool {
        report_activity(Some(c"pg_reaper: deciding"));
        let decided = in_transaction(AssertUnwindSafe(|| self.decide()));
        let (state, schema) = match decided {
            Ok(d) => d,
            Err(message) => {
                self.failed("deciding", &message);
                // The lock may have been taken in the failed transaction: session advisory
                // locks survive a rollback. Start again from a known state: not leading.
                if let Err(e) = in_transaction(|| Spi::run(STOP_LEADING)) {
                    warning!("pg_reaper: releasing the leader lock: {e}");
                }
                self.leader = false;
                return true;
            }
        };
        let failures = self.consecutive_failures;
        self.dropped_mid_tick = false;
        let done = schema.map(|schema| self.chores(schema));
        let ok = self.consecutive_failures == failures;
        if ok && self.consecutive_failures > 0 {
            log!(
                "pg_reaper: ticks succeed again after {} failure(s)",
                self.consecutive_failures
            );
            self.consecutive_failures = 0;
        }
        self.enter(state);
        match done {
            Some(done) => {
                self.report(done.work, done.caught_up);
                // A failed chore naps like a caught-up walk: a failing statement must not spin.
                done.caught_up || done.failed
            }
            None => true,
        }
    }

    /// Runs one chore in a transaction of its own, with the chores' lock and statement
    /// timeouts, shown in `pg_stat_activity` while it runs. None when it failed: rolled back,
    /// counted and logged (the other chores still run), or when the extension was dropped
    /// under the tick.
    fn run_chore<R>(
        &mut self,
        schema: pg_sys::Oid,
        chore: Chore,
        work: impl FnOnce() -> R,
    ) -> Option<R> {
        if self.dropped_mid_tick {
            return None;
        }
        report_activity(Some(chore.activity()));
        let result = in_transaction(AssertUnwindSafe(|| {
            Spi::run(CHORE_TIMEOUTS).unwrap_or_else(|e| error!("{e}"));
            work()
        }));
        // SAFETY: flushes this backend's pending table statistics (rate-limited inside).
        unsafe { pg_sys::pgstat_report_stat(false) };
        match result {
            Ok(r) => Some(r),
            Err(message) => {
                // A DROP EXTENSION committed after this tick found the extension fails its
                // chores ("relation … does not exist"): that is no failed tick.
                match in_transaction(extension) {
                    Ok(found) if found.as_ref().is_none_or(|(s, _)| *s != schema) => {
                        self.dropped_mid_tick = true
                    }
                    _ => self.failed(chore.name(), &message),
                }
                None
            }
        }
    }

    /// The leader's chores, each in its own transaction: one failing (a lock timeout, a
    /// dropped table) neither undoes nor stops the others.
    fn chores(&mut self, schema: pg_sys::Oid) -> Done {
        let mut done = Done::default();
        let housekeeping = self
            .last_housekeeping
            .is_none_or(|t| t.elapsed() >= naptime());
        let analyze_due = self.last_analyze.is_none_or(|t| t.elapsed() >= naptime());

        // Before the walk, which then queues what was cut in the same tick.
        let cut = self.run_chore(schema, Chore::CutDeadlines, || reap::cut_deadlines(schema));
        done.failed |= cut.is_none();
        let cut = cut.unwrap_or_default();
        done.work.overdue_callbacks = i64::from(cut.callbacks);
        done.work.lapsed_leases = i64::from(cut.leases);

        // The walk moves on only once its step committed: a rolled-back step is walked again.
        let current = self.walk.clone();
        let walked = self.run_chore(schema, Chore::Reap, || reap::walk_step(schema, &current));
        done.failed |= walked.is_none();
        let (step, next) = walked.map_or((reap::Step::default(), None), |(s, n)| (s, Some(n)));
        // Catching up on a backlog, the relays' claims need statistics that know the outbox
        // is full: autovacuum would take up to a minute to notice.
        if step.queued > 0 && !step.caught_up && analyze_due {
            let analyzed = self.run_chore(schema, Chore::AnalyzeOutbox, || outbox::analyze(schema));
            done.failed |= analyzed.is_none();
            if analyzed.is_some() {
                self.last_analyze = Some(std::time::Instant::now());
            }
        }
        if step.caught_up {
            // Named in a WARNING when their number changes, not every time.
            let last = self.last_no_org;
            let counted =
                self.run_chore(schema, Chore::CountOrgless, || reap::orgless(schema, last));
            done.failed |= counted.is_none();
            self.last_no_org = counted.unwrap_or(last);
        }
        let reoffered = self.run_chore(schema, Chore::ReofferLeases, || {
            outbox::reoffer_expired_leases(schema)
        });
        done.failed |= reoffered.is_none();
        done.work.reoffered = reoffered.unwrap_or(0);
        if housekeeping {
            let swept = self.run_chore(schema, Chore::SweepMarkers, || {
                outbox::sweep_orphan_markers(schema)
            });
            let pruned = self.run_chore(schema, Chore::PruneDone, || outbox::prune_done(schema));
            // Named in a WARNING when it changes, not every time.
            let last = self.last_drift.clone();
            let checked = self.run_chore(schema, Chore::CheckTables, || {
                reap::drift(schema, last.as_deref())
            });
            done.failed |= swept.is_none() || pruned.is_none() || checked.is_none();
            if let Some(drift) = checked {
                self.last_drift = drift;
            }
            done.work.swept = swept.unwrap_or(0);
            done.work.pruned = pruned.unwrap_or(0);
            self.last_housekeeping = Some(std::time::Instant::now());
        }
        if let Some(next) = next {
            self.walk = next;
        }
        done.work.queued = i64::from(step.queued);
        done.caught_up = step.caught_up && !cut.full;
        done
    }

    /// Counts and logs a failure (the first, then ever rarer ones: a table dropped under the
    /// worker must not write a line every naptime).
    fn failed(&mut self, what: &str, message: &str) {
        self.consecutive_failures += 1;
        let n = self.consecutive_failures;
        if n.is_power_of_two() {
            warning!(
                "pg_reaper: tick failed ({n} consecutive, rolled back; retrying every naptime): \
                 {what}: {message}"
            );
        }
        STATS.exclusive().failed_ticks += 1;
    }

    /// The state the worker is in now and, when it leads, the extension's schema.
    fn decide(&mut self) -> (State, Option<pg_sys::Oid>) {
        // SAFETY: a plain read of shared recovery state.
        if unsafe { pg_sys::RecoveryInProgress() } {
            return (State::Recovery, None);
        }
        let Some((schema, version)) = extension() else {
            self.stop_leading();
            return (State::WaitingForExtension, None);
        };
        if version != crate::version::LIBRARY {
            self.stop_leading();
            self.installed_version = version;
            return (State::Outdated, None);
        }
        if !guc::ENABLED.get() {
            self.stop_leading();
            return (State::Disabled, None);
        }
        let mut state = State::Leader;
        if !self.leader {
            self.leader = Spi::get_one_with_args::<bool>(TRY_LEAD, &[LEADER_LOCK_KEY.into()])
                .unwrap_or_else(|e| error!("{e}"))
                .unwrap_or(false);
        }
        if self.leader {
            self.standby_since = None;
        } else {
            // Any role may take an advisory lock. Leadership only saves duplicate work (every
            // write is a compare-and-set), so a session that is not a pg_reaper worker can
            // delay reaping by the grace period, never stop it.
            let since = *self
                .standby_since
                .get_or_insert_with(std::time::Instant::now);
            let grace = Duration::from_secs(guc::LEADER_GRACE.get().max(0) as u64);
            self.holder = lock_holder();
            match &self.holder {
                Some(h) if !h.is_worker && since.elapsed() >= grace => state = State::Contested,
                _ => return (State::Standby, None),
            }
        }
        (state, Some(schema))
    }

    fn stop_leading(&mut self) {
        if self.leader {
            Spi::run(STOP_LEADING).unwrap_or_else(|e| error!("{e}"));
            self.leader = false;
        }
    }

    /// Records the new state, and logs a transition once.
    fn enter(&mut self, state: State) {
        {
            let mut s = STATS.exclusive();
            s.state = state;
            s.ticks += 1;
            // SAFETY: a plain read of the clock.
            s.last_tick_at = Some(unsafe { pg_sys::GetCurrentTimestamp() });
            if !matches!(state, State::Leader | State::Contested) {
                s.last_tick_queued = 0;
            }
        }
        if state == self.state {
            return;
        }
        self.state = state;
        match state {
            State::Leader => log!("pg_reaper: leading (advisory lock {LEADER_LOCK_KEY})"),
            State::Standby => match &self.holder {
                Some(h) if !h.is_worker => log!(
                    "pg_reaper: standing by: a session that is not a pg_reaper worker holds the \
                     leader lock ({LEADER_LOCK_KEY}): {h}; reaping resumes without the lock \
                     after pg_reaper.leader_grace ({} s)",
                    guc::LEADER_GRACE.get()
                ),
                Some(h) => log!(
                    "pg_reaper: standing by: another pg_reaper worker holds the leader lock \
                     ({LEADER_LOCK_KEY}): {h}"
                ),
                None => log!(
                    "pg_reaper: standing by: another session holds the leader lock ({LEADER_LOCK_KEY})"
                ),
            },
            State::Contested => log!(
                "pg_reaper: reaping without the leader lock ({LEADER_LOCK_KEY}): it has been held \
                 for more than pg_reaper.leader_grace ({} s) by a session that is not a pg_reaper \
                 worker: {}",
                guc::LEADER_GRACE.get(),
                self.holder
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            ),
            State::WaitingForExtension => {
                log!(
                    "pg_reaper: extension not created in this database; waiting for CREATE EXTENSION"
                )
            }
            State::Disabled => log!("pg_reaper: disabled (pg_reaper.enabled = off)"),
            State::Outdated => warning!(
                "pg_reaper: the extension's SQL objects in this database are version {}, the \
                 library is version {}; reaping waits for ALTER EXTENSION pg_reaper UPDATE",
                self.installed_version,
                crate::version::LIBRARY
            ),
            State::Recovery => log!("pg_reaper: server is a standby; idle until promoted"),
            State::Starting | State::WaitingForDatabase => {}
        }
    }

    /// Logs what the ticks did: one line per naptime at most while catching up, and one when
    /// caught up; names the org-less strands when their number changed.
    fn report(&mut self, work: Work, caught_up: bool) {
        STATS.exclusive().last_tick_queued = work.queued as i32;
        let u = &mut self.unreported;
        u.overdue_callbacks += work.overdue_callbacks;
        u.lapsed_leases += work.lapsed_leases;
        u.queued += work.queued;
        u.reoffered += work.reoffered;
        u.swept += work.swept;
        u.pruned += work.pruned;
        let due = caught_up || self.last_report.is_none_or(|t| t.elapsed() >= naptime());
        let any = u.overdue_callbacks > 0
            || u.lapsed_leases > 0
            || u.queued > 0
            || u.reoffered > 0
            || u.swept > 0
            || u.pruned > 0;
        if due && any {
            log!(
                "pg_reaper: stranded {} overdue callback(s) and {} lapsed batch lease(s), \
                 queued {} recovery intent(s){}, re-offered {} expired lease(s), \
                 swept {} orphaned dedup marker(s), pruned {} done intent(s)",
                u.overdue_callbacks,
                u.lapsed_leases,
                u.queued,
                if caught_up { "" } else { " (catching up)" },
                u.reoffered,
                u.swept,
                u.pruned
            );
            self.unreported = Work::default();
            self.last_report = Some(std::time::Instant::now());
        }
    }
}
