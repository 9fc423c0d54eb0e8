//! Prepared statements bound to the extension's schema.
//!
//! Every statement of the extension is a [`Statement`] constant in the module of its domain
//! (one place per statement). Its text names objects as `@extschema@.<name>`, the same
//! placeholder the install script uses; it is replaced by the quoted schema the extension was
//! created in, so nothing depends on the caller's `search_path`. Each backend prepares a
//! statement once and keeps the plan (`SPI_keepplan`): the hot path never re-parses SQL. The
//! cache is keyed by schema OID, so a DROP / CREATE EXTENSION in another schema within the same
//! session re-prepares instead of using stale text.

use pgrx::PgOid;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult, SpiTupleTable};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;

/// One SQL statement of the extension and the types of its parameters.
pub struct Statement {
    pub sql: &'static str,
    pub args: &'static [pg_sys::Oid],
    /// Whether it modifies data. Only writers go through `SpiClient::update`, which assigns a
    /// transaction id: a reader must also work on a hot standby.
    pub writes: bool,
}

#[derive(Default)]
struct Cache {
    schema: pg_sys::Oid,
    plans: HashMap<usize, Rc<OwnedPreparedStatement>>,
}

thread_local! {
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
}

/// Runs `stmt` (prepared on first use in this backend) with `args`.
pub fn run<'conn>(
    client: &mut SpiClient<'conn>,
    schema: pg_sys::Oid,
    stmt: &'static Statement,
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> SpiResult<SpiTupleTable<'conn>> {
    let plan = prepared(client, schema, stmt)?;
    if stmt.writes {
        client.update(&*plan, None, args)
    } else {
        client.select(&*plan, None, args)
    }
}

fn prepared(
    client: &SpiClient<'_>,
    schema: pg_sys::Oid,
    stmt: &'static Statement,
) -> SpiResult<Rc<OwnedPreparedStatement>> {
    let key = stmt as *const Statement as usize;
    let cached = CACHE.with_borrow_mut(|cache| {
        if cache.schema != schema {
            cache.plans.clear();
            cache.schema = schema;
        }
        cache.plans.get(&key).cloned()
    });
    if let Some(plan) = cached {
        return Ok(plan);
    }
    let sql = stmt.sql.replace("@extschema@", &quoted_schema_name(schema));
    let types: Vec<PgOid> = stmt.args.iter().map(|oid| PgOid::from(*oid)).collect();
    let plan = Rc::new(client.prepare_mut(sql.as_str(), &types)?.keep());
    CACHE.with_borrow_mut(|cache| cache.plans.insert(key, plan.clone()));
    Ok(plan)
}

fn quoted_schema_name(schema: pg_sys::Oid) -> String {
    // SAFETY: both functions return palloc'd (or static) C strings or NULL; NULL is checked.
    unsafe {
        let name = pg_sys::get_namespace_name(schema);
        if name.is_null() {
            error!("pg_reaper: the extension's schema (oid {schema:?}) no longer exists");
        }
        CStr::from_ptr(pg_sys::quote_identifier(name))
            .to_string_lossy()
            .into_owned()
    }
}

/// The schema of the SQL function being called, which is the extension's schema: a cheap
/// syscache lookup, done on every call so a re-created extension is never missed.
pub fn schema_of_call(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Oid {
    // SAFETY: fcinfo and its flinfo are valid for the duration of a V1 function call.
    unsafe { pg_sys::get_func_namespace((*(*fcinfo).flinfo).fn_oid) }
}
