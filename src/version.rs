//! Library versus SQL objects. A package upgrade replaces the shared library first; the
//! database keeps the previous version's SQL objects until `ALTER EXTENSION pg_reaper UPDATE`.
//! In between, the worker waits, and 0.1.0's entry points behave as `compat` says.

use pgrx::prelude::*;

/// This library's version, the one its SQL objects must have.
pub const LIBRARY: &str = env!("CARGO_PKG_VERSION");

const INSTALLED: &str =
    "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_reaper'";

/// The version of the SQL objects in this database (None when the extension is not created).
fn installed() -> Option<String> {
    Spi::get_one::<String>(INSTALLED)
        .unwrap_or_else(|e| error!("pg_reaper: reading extversion: {e}"))
}

/// The ERROR for a call the database's SQL objects are too old for: it names the versions and
/// the fix.
pub fn refuse(func: &'static str) -> ! {
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
