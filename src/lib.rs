//! pg_reaper: a fan-in barrier for Postgres-backed job queues, and the safety net that finds
//! executions stranded by a crashed worker and queues their recovery in an outbox.
//!
//! Every SQL function is written once, in `sql/`, and shipped by both editions: this native
//! extension and the extension-free file (`make portable`). The library adds what only native
//! code can do: the background worker (`worker`, with `reap` and `outbox` for its chores), its
//! shared state in the status view (`status`), the re-fire hook's security context
//! (`recovery`), the settings as GUCs (`guc`), and 0.1.0's entry points for the upgrade window
//! (`compat`).

// pgrx reads the column names of a set-returning function from `name!` in its signature,
// so those signatures cannot be factored into type aliases.
#![allow(clippy::type_complexity)]

use pgrx::prelude::*;

mod compat;
mod guc;
mod outbox;
mod plan;
mod reap;
mod recovery;
mod status;
mod version;
mod worker;

::pgrx::pg_module_magic!();

// The SQL objects, in the order they build on each other (a LANGUAGE sql function needs what it
// calls to exist already).
extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!(
    "../sql/settings.sql",
    name = "settings",
    requires = ["schema"]
);
extension_sql_file!(
    "../sql/barrier.sql",
    name = "barrier",
    requires = ["settings"]
);
extension_sql_file!("../sql/outbox.sql", name = "outbox", requires = ["barrier"]);
extension_sql_file!("../sql/reap.sql", name = "reap", requires = ["outbox"]);
extension_sql_file!(
    "../sql/recovery.sql",
    name = "recovery",
    requires = ["reap"]
);
extension_sql_file!(
    "../sql/operator.sql",
    name = "operator",
    requires = ["recovery"]
);
extension_sql_file!(
    "../sql/status.sql",
    name = "status",
    requires = ["operator", status::pg_reaper_worker]
);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
    // The worker and its shared memory exist only when preloaded; a plain LOAD or
    // CREATE EXTENSION gets the SQL API alone.
    // SAFETY: a plain read of a backend global that Postgres sets before loading libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        worker::register();
    }
}

/// Which edition this is (the extension-free one answers `extension-free`). Calling it loads
/// this library, which defines the settings as GUCs.
#[pg_extern(immutable, parallel_safe)]
fn pg_reaper_edition() -> &'static str {
    "native"
}

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
