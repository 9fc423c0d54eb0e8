//! Recovery of one claimed intent, the part of the relay's work that happens in Postgres.
//!
//! After its status read, a relay that may have to mark the execution ERROR opens a
//! transaction and calls `recovery_lock`: it renews the claim (fenced by `attempt`), locks the
//! barrier row `FOR UPDATE` and re-checks the stranded predicate. The relay keeps that
//! transaction open across its HTTP mark and commits it with `outbox_resolve`, so a re-enqueue
//! or a decrement can never slip between the check and the mark (the window the reference
//! implementation left open), and a second relay blocks on the same row instead of marking
//! twice. `outbox_resolve` records the outcome and, for every outcome that confirms the
//! recovery, deletes the barrier (guarded by the same predicate) and its markers: the handle is
//! never deleted before that.

use crate::plan::{self, Statement};
use crate::validate::{self, invalid};
use crate::{barrier, guc, outbox};
use pg_reaper_protocol::{Action, Outcome, Verdict};
use pgrx::prelude::*;

/// `$3`: an operator forced this recovery (barrier_recover), which skips the stranded check.
const LOCK_BARRIER: Statement = Statement {
    sql: "SELECT remaining, callback IS NOT NULL,
                 @extschema@.barrier_is_stranded(expires_at, last_progress_at, created_at, $2) OR $3
            FROM @extschema@.pg_barrier_state
           WHERE execution_id = $1
             FOR UPDATE",
    args: &[pg_sys::TEXTOID, pg_sys::INTERVALOID, pg_sys::BOOLOID],
    writes: true,
};

/// A reaped re-fire needs every batch done and the barrier still stranded; an operator's
/// (`$3`) only the callback.
const REFIRE_INPUT: Statement = Statement {
    sql: "SELECT callback, results FROM @extschema@.pg_barrier_state
           WHERE execution_id = $1 AND callback IS NOT NULL
             AND ((remaining = 0
                   AND @extschema@.barrier_is_stranded(expires_at, last_progress_at, created_at, $2))
                  OR $3)
             FOR UPDATE",
    args: &[pg_sys::TEXTOID, pg_sys::INTERVALOID, pg_sys::BOOLOID],
    writes: true,
};

/// `to_regprocedure` parses the setting as a name, never as SQL, so nothing in it can run.
/// The hook's owner is the identity it runs as.
const RESOLVE_HOOK: Statement = Statement {
    sql: "SELECT p.oid::pg_catalog.regproc::pg_catalog.text, p.proowner
            FROM pg_catalog.pg_proc p
           WHERE p.oid = pg_catalog.to_regprocedure($1 || '(text, text, jsonb, jsonb)')",
    args: &[pg_sys::TEXTOID],
    writes: false,
};

/// Whether `name` is a function name, optionally schema-qualified: plain identifiers or
/// double-quoted ones (`""` inside quotes). Anything else would be a syntax error for
/// `to_regprocedure`, which PG 15 raises instead of returning NULL.
pub(crate) fn is_function_name(name: &str) -> bool {
    /// Consumes one identifier at the start of `s`; returns what follows it.
    fn identifier(s: &str) -> Option<&str> {
        if let Some(rest) = s.strip_prefix('"') {
            let mut chars = rest.char_indices().peekable();
            while let Some((i, c)) = chars.next() {
                if c == '"' {
                    if chars.peek().map(|(_, c)| *c) == Some('"') {
                        chars.next();
                    } else {
                        return (i > 0).then(|| &rest[i + 1..]);
                    }
                }
            }
            None
        } else {
            let first = s.chars().next()?;
            let end = s
                .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
                .unwrap_or(s.len());
            (first.is_alphabetic() || first == '_').then(|| &s[end..])
        }
    }
    let Some(rest) = identifier(name) else {
        return false;
    };
    match rest.strip_prefix('.') {
        Some(second) => identifier(second) == Some(""),
        None => rest.is_empty(),
    }
}

/// The configured re-fire hook: its name, schema-qualified and quoted (`regproc` output under
/// this function's search_path), and its owner; None when the setting is empty.
struct Hook {
    name: String,
    owner: pg_sys::Oid,
}

fn refire_hook(client: &mut pgrx::spi::SpiClient<'_>, schema: pg_sys::Oid) -> Option<Hook> {
    let setting = guc::REFIRE_FUNCTION
        .get()
        .and_then(|s| s.into_string().ok())?;
    if setting.trim().is_empty() {
        return None;
    }
    let resolved = if is_function_name(&setting) {
        plan::run(client, schema, &RESOLVE_HOOK, &[setting.as_str().into()])
            .and_then(|t| {
                if t.is_empty() {
                    return Ok(None);
                }
                let row = t.first();
                Ok(row.get::<String>(1)?.zip(row.get::<pg_sys::Oid>(2)?))
            })
            .unwrap_or_else(|e| error!("pg_reaper.refire_function: {e}"))
    } else {
        None
    };
    match resolved {
        Some((name, owner)) => Some(Hook { name, owner }),
        None => {
            ereport!(
                ERROR,
                PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION,
                format!(
                    "pg_reaper.refire_function = '{setting}' does not name a function \
                     f(text, text, jsonb, jsonb); fix the setting (or set it to '' to mark \
                     ERROR instead)"
                )
            );
        }
    }
}

/// The current user and security context, put back when dropped.
struct SavedIdentity {
    user: pg_sys::Oid,
    context: i32,
}

impl SavedIdentity {
    /// Runs as `owner` from now on, the way Postgres runs a SECURITY DEFINER function or the
    /// index expressions of a table it maintains: as a restricted operation, so that nothing
    /// the callee does (temp objects, LISTEN, SET ROLE) outlives the call with our privileges.
    fn become_user(owner: pg_sys::Oid) -> SavedIdentity {
        let mut saved = SavedIdentity {
            user: pg_sys::InvalidOid,
            context: 0,
        };
        // SAFETY: plain reads and writes of the backend's current user; an ERROR in between
        // is handled by the transaction abort, which restores the identity it started with.
        unsafe {
            pg_sys::GetUserIdAndSecContext(&mut saved.user, &mut saved.context);
            pg_sys::SetUserIdAndSecContext(
                owner,
                saved.context
                    | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                    | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
            );
        }
        saved
    }
}

impl Drop for SavedIdentity {
    fn drop(&mut self) {
        // SAFETY: restores exactly what become_user read.
        unsafe { pg_sys::SetUserIdAndSecContext(self.user, self.context) };
    }
}

/// Renews the claim, locks the barrier and decides: `lost` (the claim is no longer the
/// caller's), `rearmed` (no barrier, or not stranded any more), `refire` or `mark`. Call it in
/// the transaction that will run `outbox_resolve`: the row lock is held until then.
#[pg_extern(security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn recovery_lock(
    id: Option<i64>,
    attempt: Option<i32>,
    lease: default!(Option<Interval>, "'60 seconds'"),
    fcinfo: pg_sys::FunctionCallInfo,
) -> TableIterator<'static, (name!(verdict, &'static str), name!(remaining, Option<i32>))> {
    const F: &str = "recovery_lock";
    crate::version::require_current(F);
    let (id, attempt) = validate::claim(F, id, attempt);
    let lease = validate::positive_interval(F, "lease", lease);
    let schema = plan::schema_of_call(fcinfo);
    let (verdict, remaining) = Spi::connect_mut(|client| {
        let Some(claim) = outbox::renew_claim(client, schema, id, attempt, lease)? else {
            return Ok((Verdict::Lost, None));
        };
        let execution_id = claim.execution_id;
        let args = [
            execution_id.as_str().into(),
            guc::stuck_timeout().into(),
            claim.action.is_some().into(),
        ];
        let barrier = plan::run(client, schema, &LOCK_BARRIER, &args)?;
        if barrier.is_empty() {
            return Ok((Verdict::Rearmed, None));
        }
        let barrier = barrier.first();
        let remaining = barrier.get::<i32>(1)?;
        let has_callback = barrier.get::<bool>(2)?.unwrap_or(false);
        let stranded = barrier.get::<bool>(3)?.unwrap_or(false);
        let verdict = match claim.action {
            // An operator's choice (barrier_recover), checked again now: the callback or the
            // hook may have gone since.
            Some(Action::Refire) => {
                if !has_callback || refire_hook(client, schema).is_none() {
                    error!(
                        "cannot re-fire execution {execution_id} as asked by barrier_recover(): \
                         its barrier has no callback or pg_reaper.refire_function is empty"
                    );
                }
                Verdict::Refire
            }
            Some(Action::Error) => Verdict::Mark,
            None if !stranded => Verdict::Rearmed,
            None if remaining == Some(0)
                && has_callback
                && refire_hook(client, schema).is_some() =>
            {
                Verdict::Refire
            }
            None => Verdict::Mark,
        };
        Ok::<_, pgrx::spi::SpiError>((verdict, remaining))
    })
    .unwrap_or_else(|e| error!("{F}: {e}"));
    TableIterator::once((verdict.as_str(), remaining))
}

/// Records the outcome of an intent and, for every outcome but `rearmed`, deletes the barrier
/// (if still stranded) and its markers. `refired` first calls the re-fire hook with the
/// barrier's callback and results, in this transaction: if the hook raises, nothing is
/// recorded or deleted. The caller must hold the intent's current claim (`attempt`, from
/// `outbox_claim`): without it nothing happens and the result is false.
///
/// The Rust name differs from the SQL name on purpose: the C symbol of 0.1.0's two-argument
/// `outbox_resolve(id, outcome)` must not exist in this library, so that SQL objects of that
/// version fail with "could not find function" instead of calling this with a missing argument.
#[pg_extern(security_definer, parallel_unsafe, name = "outbox_resolve")]
#[search_path(pg_catalog, pg_temp)]
fn outbox_resolve_claimed(
    id: Option<i64>,
    attempt: Option<i32>,
    outcome: Option<&str>,
    fcinfo: pg_sys::FunctionCallInfo,
) -> bool {
    const F: &str = "outbox_resolve";
    let (id, attempt) = validate::claim(F, id, attempt);
    let outcome = match outcome.and_then(Outcome::parse) {
        Some(o) => o,
        None => invalid(
            F,
            "outcome",
            &format!("must be one of {}", Outcome::listed()),
        ),
    };
    let schema = plan::schema_of_call(fcinfo);
    Spi::connect_mut(|client| {
        let Some(intent) = outbox::resolve(client, schema, id, attempt, outcome)? else {
            return Ok(false);
        };
        let execution_id = intent.execution_id.as_str();
        let forced = intent.action.is_some();
        // A reaped strand's barrier goes only while it is still stranded; an operator's, always.
        let if_stranded_after = (!forced).then(guc::stuck_timeout);
        if outcome == Outcome::Refired {
            let Some(hook) = refire_hook(client, schema) else {
                error!("{F}: cannot re-fire: pg_reaper.refire_function is empty")
            };
            let args = [
                execution_id.into(),
                guc::stuck_timeout().into(),
                forced.into(),
            ];
            let input = plan::run(client, schema, &REFIRE_INPUT, &args)?;
            if input.is_empty() {
                error!(
                    "{F}: cannot re-fire execution {execution_id}: its barrier is gone, not \
                     stranded, not at remaining 0 or has no callback"
                );
            }
            let input = input.first();
            let callback = input.get::<pgrx::JsonB>(1)?;
            let results = input.get::<pgrx::JsonB>(2)?;
            // The hook's name was resolved and quoted by regproc; its arguments are parameters.
            // It runs as its owner: never with the privileges of this SECURITY DEFINER function.
            let call = format!("SELECT {}($1, $2, $3, $4)", hook.name);
            let _as_owner = SavedIdentity::become_user(hook.owner);
            client.update(
                call.as_str(),
                None,
                &[
                    execution_id.into(),
                    intent.organization_id.as_str().into(),
                    callback.into(),
                    results.into(),
                ],
            )?;
        }
        if outcome != Outcome::Rearmed {
            barrier::tear_down(client, schema, execution_id, if_stranded_after, false)?;
        }
        Ok::<_, pgrx::spi::SpiError>(true)
    })
    .unwrap_or_else(|e| error!("{F}: {e}"))
}
