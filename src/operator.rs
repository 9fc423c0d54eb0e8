//! What an operator asks about one execution, and what an operator can make happen to it:
//! `barrier_explain` tells its whole story (read-only), `barrier_recover` queues its recovery
//! now, stranded or not.

use crate::plan::{self, Statement};
use crate::validate::{self, invalid};
use crate::{guc, reap};
use pg_reaper_protocol::{Action, State};
use pgrx::prelude::*;
use serde_json::{Value, json};

/// The barrier with the terms of the stranded predicate. `stranded_at` is when the predicate
/// becomes (or became) true under the current settings: the deadline, or the last progress
/// plus the stuck timeout, whichever comes first.
const EXPLAIN_BARRIER: Statement = Statement {
    sql: "SELECT pg_catalog.jsonb_build_object(
                     'organization_id', b.organization_id,
                     'remaining', b.remaining,
                     'created_at', b.created_at,
                     'expires_at', b.expires_at,
                     'last_progress_at', b.last_progress_at,
                     'stranded_at', least(b.expires_at, b.last_progress_at + $2),
                     'has_callback', b.callback IS NOT NULL),
                 b.remaining,
                 @extschema@.barrier_is_stranded(b.expires_at, b.last_progress_at, b.created_at, $2),
                 b.expires_at < now()
            FROM @extschema@.pg_barrier_state b
           WHERE b.execution_id = $1",
    args: &[pg_sys::TEXTOID, pg_sys::INTERVALOID],
    writes: false,
};

const EXPLAIN_MARKERS: Statement = Statement {
    sql: "SELECT count(*) FROM @extschema@.pg_batch_dedup WHERE execution_id = $1",
    args: &[pg_sys::TEXTOID],
    writes: false,
};

/// Every intent of the execution, oldest first.
const EXPLAIN_INTENTS: Statement = Statement {
    sql: "SELECT coalesce(pg_catalog.jsonb_agg(pg_catalog.jsonb_build_object(
                     'id', id, 'state', state, 'outcome', outcome, 'attempts', attempts,
                     'failures', failures, 'action', action, 'last_error', last_error,
                     'created_at', created_at, 'updated_at', updated_at) ORDER BY id),
                 '[]'::jsonb)
            FROM @extschema@.pg_reaper_outbox
           WHERE execution_id = $1",
    args: &[pg_sys::TEXTOID],
    writes: false,
};

/// The barrier an operator's recovery needs: it names the organization the status API wants.
const RECOVER_BARRIER: Statement = Statement {
    sql: "SELECT organization_id, remaining, callback IS NOT NULL
            FROM @extschema@.pg_barrier_state WHERE execution_id = $1",
    args: &[pg_sys::TEXTOID],
    writes: false,
};

/// One live intent per execution still holds: an existing one wins.
const RECOVER_QUEUE: Statement = Statement {
    sql:
        "INSERT INTO @extschema@.pg_reaper_outbox (execution_id, organization_id, remaining, action)
          VALUES ($1, $2, $3, $4)
          ON CONFLICT (execution_id) WHERE state <> 'done' DO NOTHING
          RETURNING id",
    args: &[
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::INT4OID,
        pg_sys::TEXTOID,
    ],
    writes: true,
};

const LIVE_INTENT: Statement = Statement {
    sql: "SELECT id, state FROM @extschema@.pg_reaper_outbox
           WHERE execution_id = $1 AND state <> 'done'",
    args: &[pg_sys::TEXTOID],
    writes: false,
};

/// The one sentence for a person.
fn advice(state: &str, org: &str, intents: &Value) -> String {
    let live = intents.as_array().and_then(|all| {
        all.iter()
            .rev()
            .find(|i| i["state"] != State::Done.as_str())
    });
    let live_id = live.map(|i| i["id"].to_string()).unwrap_or_default();
    match (state, live.and_then(|i| i["state"].as_str())) {
        ("absent", _) if intents.as_array().is_some_and(|a| !a.is_empty()) => {
            "No barrier: the execution finished, was recovered or was aborted; its recovery \
             intents are listed."
                .to_string()
        }
        ("absent", _) => {
            "No barrier and no recovery intent: the execution never had a barrier here, or it \
             finished and was cleaned up."
                .to_string()
        }
        ("torn_down", _) => "The barrier was torn down (remaining < 0) but its row is still \
                             here; the next decrement or barrier_finish() removes it."
            .to_string(),
        (_, Some(s)) if s == State::Dead.as_str() => format!(
            "Its recovery intent {live_id} is dead: read last_error, fix the cause, then \
             SELECT outbox_replay({live_id})."
        ),
        (_, Some(s)) => format!(
            "Recovery intent {live_id} is {s}: a relay carries it out (if it stays so, check that \
             a relay runs and can reach the status API)."
        ),
        ("stranded_expired" | "stranded_no_progress", None) if org.is_empty() => {
            "Stranded, but it has no organization_id: the org-scoped status API cannot recover \
             it; mark the execution yourself, then remove the barrier with barrier_abort()."
                .to_string()
        }
        ("stranded_expired" | "stranded_no_progress", None) => {
            "Stranded and not queued yet: the worker queues it within one naptime, or run \
             SELECT * FROM reap_expired()."
                .to_string()
        }
        ("complete_awaiting_finish", None) => {
            "Every batch is done: the caller that saw 'complete' must fire the callback and call \
             barrier_finish(); if it died, the barrier strands at stranded_at and is recovered \
             then, or now with barrier_recover()."
                .to_string()
        }
        _ => "Live: batches are still running; it strands at stranded_at if none completes \
              before then, or recover it now with barrier_recover()."
            .to_string(),
    }
}

/// The whole story of one execution, for a person: docs/sql.md lists every key.
#[pg_extern(security_definer, parallel_unsafe, stable)]
#[search_path(pg_catalog, pg_temp)]
fn barrier_explain(execution_id: Option<&str>, fcinfo: pg_sys::FunctionCallInfo) -> pgrx::JsonB {
    const F: &str = "barrier_explain";
    let id = validate::execution_id(F, execution_id);
    let schema = plan::schema_of_call(fcinfo);
    let args = [id.into(), guc::stuck_timeout().into()];
    let (barrier, markers, intents) = Spi::connect_mut(|client| {
        let b = plan::run(client, schema, &EXPLAIN_BARRIER, &args)?;
        let barrier = if b.is_empty() {
            None
        } else {
            let row = b.first();
            Some((
                row.get::<pgrx::JsonB>(1)?
                    .map(|j| j.0)
                    .unwrap_or(Value::Null),
                row.get::<i32>(2)?.unwrap_or_default(),
                row.get::<bool>(3)?.unwrap_or(false),
                row.get::<bool>(4)?.unwrap_or(false),
            ))
        };
        let markers = plan::run(client, schema, &EXPLAIN_MARKERS, &[id.into()])?
            .first()
            .get_one::<i64>()?
            .unwrap_or_default();
        let intents = plan::run(client, schema, &EXPLAIN_INTENTS, &[id.into()])?
            .first()
            .get_one::<pgrx::JsonB>()?
            .map(|j| j.0)
            .unwrap_or(Value::Null);
        Ok::<_, pgrx::spi::SpiError>((barrier, markers, intents))
    })
    .unwrap_or_else(|e| error!("{F}: {e}"));
    let (mut story, state) = match barrier {
        None => (json!({}), "absent"),
        Some((fields, remaining, stranded, expired)) => {
            let state = if remaining < 0 {
                "torn_down"
            } else if stranded && expired {
                "stranded_expired"
            } else if stranded {
                "stranded_no_progress"
            } else if remaining == 0 {
                "complete_awaiting_finish"
            } else {
                "live"
            };
            (fields, state)
        }
    };
    let org = story["organization_id"].as_str().unwrap_or("").to_string();
    for key in [
        "organization_id",
        "remaining",
        "created_at",
        "expires_at",
        "last_progress_at",
        "stranded_at",
        "has_callback",
    ] {
        if story.get(key).is_none() {
            story[key] = Value::Null;
        }
    }
    story["execution_id"] = json!(id);
    story["state"] = json!(state);
    story["markers"] = json!(markers);
    story["advice"] = json!(advice(state, &org, &intents));
    story["intents"] = intents;
    pgrx::JsonB(story)
}

/// Queues a recovery of one execution now, stranded or not: `error` marks it ERROR, `refire`
/// re-fires its callback through the hook. The relay carries it out with every safety rule but
/// the stranded re-check. Returns the intent's id (an existing live intent's, with a NOTICE).
#[pg_extern(security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn barrier_recover(
    execution_id: Option<&str>,
    action: default!(Option<&str>, "'error'"),
    fcinfo: pg_sys::FunctionCallInfo,
) -> i64 {
    const F: &str = "barrier_recover";
    let id = validate::new_execution_id(F, execution_id);
    let Some(action) = action.and_then(Action::parse) else {
        invalid(F, "action", "must be 'error' or 'refire'")
    };
    // SAFETY: a plain read of shared recovery state, valid in any backend.
    if unsafe { pg_sys::RecoveryInProgress() } {
        ereport!(
            ERROR,
            PgSqlErrorCode::ERRCODE_READ_ONLY_SQL_TRANSACTION,
            "barrier_recover: the server is a standby (in recovery); recover on the primary"
        );
    }
    let schema = plan::schema_of_call(fcinfo);
    Spi::connect_mut(|client| {
        let b = plan::run(client, schema, &RECOVER_BARRIER, &[id.into()])?;
        if b.is_empty() {
            invalid(
                F,
                "execution_id",
                &format!(
                    "has no barrier ('{id}'): there is nothing to recover (barrier_explain() \
                     tells what happened to it)"
                ),
            );
        }
        let row = b.first();
        let org = row.get::<String>(1)?.unwrap_or_default();
        let remaining = row.get::<i32>(2)?.unwrap_or_default();
        let has_callback = row.get::<bool>(3)?.unwrap_or(false);
        if org.is_empty() {
            invalid(
                F,
                "execution_id",
                "has a barrier without organization_id: the org-scoped status API cannot recover it",
            );
        }
        if action == Action::Refire {
            let hook = guc::REFIRE_FUNCTION
                .get()
                .and_then(|s| s.into_string().ok())
                .unwrap_or_default();
            if !has_callback || hook.trim().is_empty() {
                invalid(
                    F,
                    "action",
                    "'refire' needs a barrier with a callback and pg_reaper.refire_function set",
                );
            }
        }
        let args = [
            id.into(),
            org.as_str().into(),
            remaining.into(),
            action.as_str().into(),
        ];
        let queued = plan::run(client, schema, &RECOVER_QUEUE, &args)?;
        if !queued.is_empty() {
            reap::wake_relays(client, schema)?;
            return queued.first().get_one::<i64>().map(Option::unwrap_or_default);
        }
        let live = plan::run(client, schema, &LIVE_INTENT, &[id.into()])?;
        let live = live.first();
        let live_id = live.get::<i64>(1)?.unwrap_or_default();
        let state = live.get::<String>(2)?.unwrap_or_default();
        notice!(
            "{F}: execution {id} already has a live recovery intent ({live_id}, {state}); \
             returning it{}",
            if State::parse(&state) == Some(State::Dead) {
                ": replay it with outbox_replay()"
            } else {
                ""
            }
        );
        Ok::<_, pgrx::spi::SpiError>(live_id)
    })
    .unwrap_or_else(|e| error!("{F}: {e}"))
}
