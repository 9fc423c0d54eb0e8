//! The re-fire hook's call, the one part of a recovery that needs native code: the hook runs as
//! its owner, in a security-restricted operation, the way Postgres runs the index expressions of
//! a table it maintains. `pg_reaper_refire` (`sql/recovery.sql`) resolves the hook and calls this.

use pgrx::prelude::*;

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

/// Calls `hook(execution_id, organization_id, callback, results)` as the hook's owner: never
/// with the privileges of the SECURITY DEFINER function that calls this, and nothing the hook
/// does (temp objects, LISTEN, SET ROLE) outlives the call with them.
#[pg_extern(parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn pg_reaper_run_hook(
    hook: pg_sys::Oid,
    execution_id: &str,
    organization_id: &str,
    callback: pgrx::JsonB,
    results: pgrx::JsonB,
) {
    const OWNER: &str = "SELECT p.oid::pg_catalog.regproc::pg_catalog.text, p.proowner
                           FROM pg_catalog.pg_proc p WHERE p.oid = $1";
    let (name, owner) = Spi::connect(|client| {
        let t = client.select(OWNER, Some(1), &[hook.into()])?;
        if t.is_empty() {
            return Ok(None);
        }
        let row = t.first();
        Ok::<_, pgrx::spi::SpiError>(row.get::<String>(1)?.zip(row.get::<pg_sys::Oid>(2)?))
    })
    .unwrap_or_else(|e| error!("pg_reaper_run_hook: {e}"))
    .unwrap_or_else(|| error!("pg_reaper_run_hook: no function with oid {hook:?}"));
    // The name was resolved and quoted by regproc; the arguments are parameters.
    let call = format!("SELECT {name}($1, $2, $3, $4)");
    Spi::connect_mut(|client| {
        let _as_owner = SavedIdentity::become_user(owner);
        client
            .update(
                call.as_str(),
                None,
                &[
                    execution_id.into(),
                    organization_id.into(),
                    callback.into(),
                    results.into(),
                ],
            )
            .map(|_| ())
    })
    .unwrap_or_else(|e| error!("pg_reaper_run_hook: {e}"));
}
