//! pg_reaper: a fan-in barrier for Postgres-backed job queues, and the safety net that finds
//! executions stranded by a crashed worker and queues their recovery in an outbox.
//!
//! Modules follow the domain: `barrier` (enqueue, decrement, finish, abort), `claim` (per-batch
//! dedup), `reap` (stranded barriers into outbox intents), `status` (the status view),
//! `outbox` (recovery intents), `worker` (the background worker), `guc` (settings), `plan`
//! (prepared statements bound to the extension's schema), `version` (library versus SQL objects
//! between a package upgrade and ALTER EXTENSION UPDATE).

// pgrx reads the column names of a set-returning function from `name!` in its signature,
// so those signatures cannot be factored into type aliases.
#![allow(clippy::type_complexity)]

use pgrx::prelude::*;

mod barrier;
mod claim;
mod guc;
mod operator;
mod outbox;
mod plan;
mod raw_jsonb;
mod reap;
mod recovery;
mod status;
mod validate;
mod version;
mod worker;

::pgrx::pg_module_magic!();

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
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

#[cfg(any(test, feature = "pg_test"))]
mod pg_tests;

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
