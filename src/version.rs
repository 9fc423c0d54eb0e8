//! Library versus SQL objects. A package upgrade replaces the shared library first; the
//! database keeps the previous version's SQL objects until `ALTER EXTENSION pg_reaper UPDATE`.
//! In between, the barrier API, `reap_expired()` and the status view keep working (their
//! statements and signatures are the same in every release), while the recovery protocol (the
//! relay's functions, and the worker's reaping) waits for the update: its statements need the
//! outbox of this version. Calls that would need it are refused with an error naming the fix.

use pgrx::prelude::*;

/// This library's version, the one its SQL objects must have.
pub const LIBRARY: &str = env!("CARGO_PKG_VERSION");

const INSTALLED: &str =
    "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_reaper'";

/// The version of the SQL objects in this database (None when the extension is not created).
pub fn installed() -> Option<String> {
    Spi::get_one::<String>(INSTALLED)
        .unwrap_or_else(|e| error!("pg_reaper: reading extversion: {e}"))
}

/// Refuses the call when the database's SQL objects are not this library's version.
pub fn require_current(func: &'static str) {
    if installed().as_deref() != Some(LIBRARY) {
        refuse(func);
    }
}

/// The ERROR that names the versions and the fix.
fn refuse(func: &'static str) -> ! {
    let installed = installed().unwrap_or_else(|| "unknown".into());
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!(
            "{func}: pg_reaper's SQL objects in this database are version {installed}, its library is \
             version {LIBRARY}"
        ),
        func,
    )
    .set_hint("Run ALTER EXTENSION pg_reaper UPDATE in this database; recovery resumes after it.")
    .report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

// Entry points that only 0.1.0's SQL objects name (their signatures changed in 0.2.0, and the
// new functions have new symbols). Without them such a call would fail with "could not find
// function in file"; with them it names the fix. No SQL is generated for them.

/// 0.1.0's `outbox_claim(max_intents, lease)`.
#[pg_extern(sql = false)]
fn outbox_claim() -> bool {
    refuse("outbox_claim")
}

/// 0.1.0's `outbox_resolve(id, outcome)`.
#[pg_extern(sql = false)]
fn outbox_resolve() -> bool {
    refuse("outbox_resolve")
}
