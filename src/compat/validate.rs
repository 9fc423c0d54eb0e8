//! The argument checks of 0.1.0's entry points (see `compat`): each returns the value or raises
//! 22023 naming the function, the argument and the rule, before any statement ran.

use super::raw_jsonb::RawJsonb;
use pgrx::prelude::*;

/// Longest execution id, in bytes. Ids are keys of btree indexes, whose entries must fit in a
/// third of a page (about 2.7 kB): longer ids would fail later with an index error that names
/// no argument. Real ids are UUIDs (36 bytes).
pub const MAX_EXECUTION_ID_BYTES: usize = 1024;

/// Raises an ERROR naming `arg` of `func` and the rule it broke.
pub fn invalid(func: &'static str, arg: &str, rule: &str) -> ! {
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        format!("{func}: {arg} {rule}"),
        func,
    )
    .report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// A non-empty execution id of at most [`MAX_EXECUTION_ID_BYTES`].
pub fn execution_id<'a>(func: &'static str, value: Option<&'a str>) -> &'a str {
    match value {
        None | Some("") => invalid(func, "execution_id", "must not be NULL or empty"),
        Some(id) if id.len() > MAX_EXECUTION_ID_BYTES => invalid(
            func,
            "execution_id",
            &format!(
                "must be at most {MAX_EXECUTION_ID_BYTES} bytes long (got {} bytes)",
                id.len()
            ),
        ),
        Some(id) => id,
    }
}

/// An execution id that starts a recovery handle (a new barrier, an operator's intent): an
/// [`execution_id`] without control characters. The relay puts the id into a URL path, and the
/// URL standard drops a tab, newline or carriage return wherever it stands, so `"a\tb"` would
/// reach the status API as `ab`: another execution. No real id has one.
pub fn new_execution_id<'a>(func: &'static str, value: Option<&'a str>) -> &'a str {
    let id = execution_id(func, value);
    if let Some((at, c)) = id.char_indices().find(|(_, c)| c.is_ascii_control()) {
        invalid(
            func,
            "execution_id",
            &format!(
                "must not contain control characters (U+{:04X} at byte {at})",
                c as u32
            ),
        );
    }
    id
}

/// An argument that must not be NULL.
pub fn required<T>(func: &'static str, arg: &str, value: Option<T>) -> T {
    value.unwrap_or_else(|| invalid(func, arg, "must not be NULL"))
}

/// An interval that moves the clock forward: `now() + value > now()`. Checked on the clock,
/// because an interval mixes months, days and microseconds (`-1 mon 30 days 1 hour` is
/// negative in a 31-day month and positive in a 30-day one), exactly as the table's
/// `expires_at > created_at` constraint will see it.
pub fn positive_interval(func: &'static str, arg: &str, value: Option<Interval>) -> Interval {
    let value = required(func, arg, value);
    if !moves_forward(value, false) {
        invalid(func, arg, "must be a positive interval");
    }
    value
}

fn moves_forward(value: Interval, or_stays: bool) -> bool {
    // SAFETY: a plain read of the transaction's start time, the value now() returns.
    let now = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    let later = unsafe {
        pgrx::direct_function_call::<pg_sys::TimestampTz>(
            pg_sys::timestamptz_pl_interval,
            &[now.into_datum(), value.into_datum()],
        )
    };
    match later {
        Some(t) if or_stays => t >= now,
        Some(t) => t > now,
        None => false,
    }
}

/// A callback descriptor must be a JSON object (SQL NULL means none): the re-fire hook
/// receives it as the job to enqueue, and `null`, a string or an array is no job.
pub fn callback(func: &'static str, value: &Option<RawJsonb>) {
    if let Some(jsonb) = value {
        // SAFETY: the datum is a jsonb argument of this call; jsonb_typeof only reads it.
        let kind = unsafe {
            pgrx::direct_function_call::<String>(pg_sys::jsonb_typeof, &[Some(jsonb.datum())])
        };
        if kind.as_deref() != Some("object") {
            invalid(
                func,
                "callback",
                &format!(
                    "must be a JSON object or SQL NULL (got a JSON {})",
                    kind.as_deref().unwrap_or("value")
                ),
            );
        }
    }
}
