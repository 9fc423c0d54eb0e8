//! The worker's walk over the strands: where it stands between ticks, and one step of it
//! (`pg_reaper_walk` in `sql/reap.sql`, which queues the strands).

use crate::plan::{self, Statement};
use pgrx::prelude::*;

const WALK: Statement = Statement {
    sql: "SELECT queued, caught_up, next_expired_at, next_expired_id, next_stale_at, next_stale_id
            FROM @extschema@.pg_reaper_walk($1, $2, $3, $4, $5)",
    args: &[
        pg_sys::INT8OID,
        pg_sys::TIMESTAMPTZOID,
        pg_sys::TEXTOID,
        pg_sys::TIMESTAMPTZOID,
        pg_sys::TEXTOID,
    ],
    writes: true,
};

const CUT_DEADLINES: Statement = Statement {
    sql: "SELECT cut, lapsed, full_ FROM @extschema@.pg_reaper_cut_deadlines(
                     @extschema@.pg_reaper_setting('pg_reaper.batch_size')::int8)",
    args: &[],
    writes: true,
};

const ORGLESS: Statement = Statement {
    sql: "SELECT n, sample FROM @extschema@.pg_reaper_orgless()",
    args: &[],
    writes: false,
};

const WARN_NO_ORG: Statement = Statement {
    sql: "SELECT @extschema@.pg_reaper_warn_no_org($1, $2)",
    args: &[pg_sys::INT4OID, pg_sys::TEXTARRAYOID],
    writes: false,
};

const DRIFT: Statement = Statement {
    sql: "SELECT @extschema@.pg_reaper_drift()",
    args: &[],
    writes: false,
};

const WARN_DRIFT: Statement = Statement {
    sql: "SELECT @extschema@.pg_reaper_warn_drift($1)",
    args: &[pg_sys::TEXTOID],
    writes: false,
};

const BATCH_SIZE: Statement = Statement {
    sql: "SELECT @extschema@.pg_reaper_setting('pg_reaper.batch_size')::int8",
    args: &[],
    writes: false,
};

/// A position in one of the walk's index orders: after this (timestamp, execution id).
#[derive(Clone, Debug, PartialEq)]
pub struct Key(TimestampWithTimeZone, String);

impl Default for Key {
    /// Before every row.
    fn default() -> Key {
        Key(TimestampWithTimeZone::negative_infinity(), String::new())
    }
}

/// Where the worker's walk over the strands stands, one position per kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Walk {
    expired: Key,
    stale: Key,
}

/// What one step of the walk did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub queued: i32,
    /// Both kinds were walked to their end: every strand there was is queued (or has no
    /// organization); the next step starts over.
    pub caught_up: bool,
}

/// Queues up to pg_reaper.batch_size strands after `walk`'s positions, in the current
/// transaction, and returns the walk's next positions (to keep once the transaction committed).
pub fn walk_step(schema: pg_sys::Oid, walk: &Walk) -> (Step, Walk) {
    Spi::connect_mut(|client| {
        let budget = plan::run(client, schema, &BATCH_SIZE, &[])?
            .first()
            .get_one::<i64>()?
            .unwrap_or(1000);
        let args = [
            budget.into(),
            walk.expired.0.into(),
            walk.expired.1.as_str().into(),
            walk.stale.0.into(),
            walk.stale.1.as_str().into(),
        ];
        let row = plan::run(client, schema, &WALK, &args)?.first();
        let key = |at, id| -> pgrx::spi::SpiResult<Key> {
            Ok(Key(
                row.get::<TimestampWithTimeZone>(at)?
                    .unwrap_or_else(TimestampWithTimeZone::negative_infinity),
                row.get::<String>(id)?.unwrap_or_default(),
            ))
        };
        let next = Walk {
            expired: key(3, 4)?,
            stale: key(5, 6)?,
        };
        let step = Step {
            queued: row.get::<i32>(1)?.unwrap_or_default(),
            caught_up: row.get::<bool>(2)?.unwrap_or(false),
        };
        Ok::<_, pgrx::spi::SpiError>((step, next))
    })
    .unwrap_or_else(|e| error!("pg_reaper: reaping: {e}"))
}

/// What one cut of deadlines did (see `cut_deadlines`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// Completed barriers whose callback is overdue, stranded for a re-fire.
    pub callbacks: i32,
    /// Batch leases that lapsed and were not claimed again: given up, their barriers stranded.
    pub leases: i32,
    /// A kind filled its batch: more may be waiting.
    pub full: bool,
}

/// Strands what is known to be lost before its deadline (`pg_reaper_cut_deadlines` in
/// `sql/reap.sql`), before the walk queues it.
pub fn cut_deadlines(schema: pg_sys::Oid) -> Cut {
    Spi::connect_mut(|client| {
        let row = plan::run(client, schema, &CUT_DEADLINES, &[])?.first();
        Ok::<_, pgrx::spi::SpiError>(Cut {
            callbacks: row.get::<i32>(1)?.unwrap_or_default(),
            leases: row.get::<i32>(2)?.unwrap_or_default(),
            full: row.get::<bool>(3)?.unwrap_or(false),
        })
    })
    .unwrap_or_else(|e| error!("pg_reaper: cutting deadlines: {e}"))
}

/// What changed in the barrier tables under pg_reaper (None while its functions can work on
/// them), logged when it is not `last`.
pub fn drift(schema: pg_sys::Oid, last: Option<&str>) -> Option<String> {
    Spi::connect_mut(|client| {
        let now = plan::run(client, schema, &DRIFT, &[])?
            .first()
            .get::<String>(1)?;
        if now.as_deref() != last {
            plan::run(client, schema, &WARN_DRIFT, &[now.clone().into()])?;
        }
        Ok::<_, pgrx::spi::SpiError>(now)
    })
    .unwrap_or_else(|e| error!("pg_reaper: checking the barrier tables: {e}"))
}

/// Counts the strands nobody can recover (no organization) and, when their number is not
/// `last`, names them in a WARNING. Returns the number.
pub fn orgless(schema: pg_sys::Oid, last: i32) -> i32 {
    Spi::connect_mut(|client| {
        let row = plan::run(client, schema, &ORGLESS, &[])?.first();
        let n = row.get::<i32>(1)?.unwrap_or_default();
        if n != last {
            let sample = row.get::<Vec<String>>(2)?.unwrap_or_default();
            plan::run(client, schema, &WARN_NO_ORG, &[n.into(), sample.into()])?;
        }
        Ok::<_, pgrx::spi::SpiError>(n)
    })
    .unwrap_or_else(|e| error!("pg_reaper: counting org-less strands: {e}"))
}
