//! The relay's side of Postgres: calls to the extension's outbox and recovery functions (the
//! [`Outbox`] the recovery executor works with). The state transitions live in the extension;
//! this module only names them. Every statement is here, with `@extschema@` replaced by the
//! extension's (quoted) schema found at connect time.

use crate::Error;
use crate::db::Target;
use crate::protocol::{CHANNEL, HandedBack, Outcome, Verdict};
use crate::recovery::{Intent, Outbox, RecoveryTx};
use bytes::BytesMut;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, accepts, to_sql_checked};
use tokio_postgres::{Client, GenericClient, Row, Statement, Transaction};

/// The extension's schema or, without the extension, the schema the extension-free edition was
/// installed into (the one with its tick function); more than one of those is an error.
const FIND_SCHEMA: &str = "SELECT pg_catalog.quote_ident(n.nspname)
                             FROM pg_catalog.pg_extension e
                             JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
                            WHERE e.extname = 'pg_reaper'
                           UNION ALL
                           SELECT pg_catalog.quote_ident(n.nspname)
                             FROM pg_catalog.pg_proc p
                             JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
                            WHERE p.proname = 'pg_reaper_tick'
                              AND NOT EXISTS (SELECT FROM pg_catalog.pg_extension
                                               WHERE extname = 'pg_reaper')";
/// A recovery transaction must not wait forever behind a row lock, nor a statement run for
/// ever; either fails and is retried. The idle-in-transaction timeout (set per connection, just
/// above the HTTP timeout) makes the server end the recovery transaction of a relay that was
/// paused or cut off while it held a barrier's row lock, so nothing waits on it for longer.
const SESSION_SETUP: &str = "SET lock_timeout = '10s'; SET statement_timeout = '30s';
                             SET jit = off; SET application_name = 'pg-reaper-relay'";
const IDLE_IN_TRANSACTION: &str =
    "SELECT pg_catalog.set_config('idle_in_transaction_session_timeout', $1, false)";
const CLAIM: &str = "SELECT id, execution_id, organization_id, remaining, attempt
                       FROM @extschema@.outbox_claim($1, $2::interval, $3::timestamptz)";
const NOW: &str = "SELECT pg_catalog.now()";
const LOCK: &str = "SELECT verdict, remaining FROM @extschema@.recovery_lock($1, $2, $3::interval)";
const RESOLVE: &str = "SELECT @extschema@.outbox_resolve($1, $2, $3)";
const FAIL: &str = "SELECT @extschema@.outbox_fail($1, $2, $3, $4::interval, $5)";
const RELEASE: &str = "SELECT @extschema@.outbox_release($1, $2)";
const DEFER: &str = "SELECT @extschema@.outbox_defer($1, $2, $3, $4::interval)";
/// One tick of the extension-free edition's reaping: NULL when another driver is ticking.
const TICK: &str = "SELECT @extschema@.pg_reaper_tick()";
const MARK_SENDING: &str = "SELECT @extschema@.outbox_mark_sending($1, $2, $3::interval)";
/// The database side of the metrics; its role needs SELECT on the view and EXECUTE on
/// reaper_status().
const STATUS: &str = "SELECT outbox_pending, outbox_in_flight, outbox_dead, outbox_done,
                             extract(epoch FROM oldest_pending_age)::float8,
                             barriers_live, barriers_stranded, leader_pid IS NOT NULL,
                             extract(epoch FROM pg_catalog.now() - last_tick_at)::float8,
                             failed_ticks, tables_drift
                        FROM @extschema@.pg_reaper_status";

/// A Postgres `interval` from a Duration, sent in the binary form (microseconds, no days or
/// months), so no text ever stands for a time span.
#[derive(Debug, Clone, Copy)]
pub struct Interval(pub Duration);

impl ToSql for Interval {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let micros = i64::try_from(self.0.as_micros())?;
        out.extend_from_slice(&micros.to_be_bytes());
        out.extend_from_slice(&0i32.to_be_bytes()); // days
        out.extend_from_slice(&0i32.to_be_bytes()); // months
        Ok(IsNull::No)
    }

    accepts!(INTERVAL);
    to_sql_checked!();
}

/// Column `i` of `row`, or an error naming it: a column whose type drifted (a newer
/// extension?) fails this attempt instead of panicking its task.
fn column<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> Result<T, Error> {
    row.try_get(i).map_err(|e| {
        let name = row.columns().get(i).map_or("?", |c| c.name());
        Error::Protocol(format!("column {i} ({name}): {e}"))
    })
}

/// The statements bound to the extension's schema, each prepared once per connection (a
/// recovery runs four or five of them: preparing each time would double the round trips and
/// the server's parsing).
struct Prepared {
    schema: String,
    cache: Mutex<HashMap<&'static str, Statement>>,
}

impl Prepared {
    async fn get<C: GenericClient + Sync>(
        &self,
        client: &C,
        statement: &'static str,
    ) -> Result<Statement, Error> {
        let cached = self
            .cache
            .lock()
            .ok()
            .and_then(|p| p.get(statement).cloned());
        if let Some(s) = cached {
            return Ok(s);
        }
        let s = client
            .prepare(&statement.replace("@extschema@", &self.schema))
            .await?;
        if let Ok(mut p) = self.cache.lock() {
            p.insert(statement, s.clone());
        }
        Ok(s)
    }

    async fn one<C: GenericClient + Sync>(
        &self,
        client: &C,
        statement: &'static str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        let s = self.get(client, statement).await?;
        Ok(client.query_one(&s, args).await?)
    }
}

async fn resolve_on<C: GenericClient + Sync>(
    prepared: &Prepared,
    client: &C,
    intent: &Intent,
    outcome: Outcome,
) -> Result<bool, Error> {
    let row = prepared
        .one(
            client,
            RESOLVE,
            &[&intent.id, &intent.attempt, &outcome.as_str()],
        )
        .await?;
    column(&row, 0)
}

/// A connection to the extension's database.
pub struct Store {
    client: Client,
    prepared: Prepared,
}

/// The open recovery transaction; dropped uncommitted, it rolls back.
pub struct StoreTx<'a> {
    tx: Transaction<'a>,
    prepared: &'a Prepared,
}

impl Store {
    /// Connects, finds the extension's schema and sets the session up. The connection's
    /// driver runs as a task; `on_notify` gets every NOTIFY (for the listener connection).
    pub async fn connect(
        target: &Target,
        on_notify: Option<tokio::sync::mpsc::UnboundedSender<()>>,
        transaction_idle: Duration,
    ) -> Result<Store, Error> {
        let setup = |what: &str, e: tokio_postgres::Error| {
            Error::Connect(format!("{what}: {}", Error::Db(e)))
        };
        let (client, mut connection) = target
            .connect()
            .await
            .map_err(|e| setup("connecting to Postgres", e))?;
        tokio::spawn(async move {
            use futures_util::StreamExt;
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                        if let Some(tx) = &on_notify {
                            let _ = tx.send(());
                        }
                    }
                    // A WARNING from the extension (an intent set aside, say) is the relay's too.
                    Ok(tokio_postgres::AsyncMessage::Notice(n)) => {
                        tracing::warn!(sqlstate = n.code().code(), "postgres: {}", n.message());
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "postgres connection lost");
                        break;
                    }
                }
            }
        });
        let schema = client
            .query(FIND_SCHEMA, &[])
            .await
            .map_err(|e| setup("looking for the pg_reaper extension", e))?;
        let schema = match schema.as_slice() {
            [row] => column(row, 0)?,
            [] => {
                return Err(Error::Connect(
                    "pg_reaper is not installed in this database (neither CREATE EXTENSION \
                     pg_reaper nor the extension-free edition)"
                        .into(),
                ));
            }
            _ => {
                return Err(Error::Connect(
                    "the extension-free edition of pg_reaper is installed in more than one \
                     schema of this database; keep one"
                        .into(),
                ));
            }
        };
        client
            .batch_execute(SESSION_SETUP)
            .await
            .map_err(|e| setup("session setup", e))?;
        client
            .execute(
                IDLE_IN_TRANSACTION,
                &[&format!("{}ms", transaction_idle.as_millis())],
            )
            .await
            .map_err(|e| setup("session setup", e))?;
        Ok(Store {
            client,
            prepared: Prepared {
                schema,
                cache: Mutex::default(),
            },
        })
    }

    async fn one(
        &self,
        statement: &'static str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, Error> {
        self.prepared.one(&self.client, statement, args).await
    }

    pub async fn listen(&self) -> Result<(), Error> {
        Ok(self
            .client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await?)
    }

    /// Claims up to `n` intents due by `due_by` (None: now).
    pub async fn claim(
        &self,
        n: i32,
        lease: Duration,
        due_by: Option<SystemTime>,
    ) -> Result<Vec<Intent>, Error> {
        let statement = self.prepared.get(&self.client, CLAIM).await?;
        let rows = self
            .client
            .query(&statement, &[&n, &Interval(lease), &due_by])
            .await?;
        rows.iter()
            .map(|r| {
                Ok(Intent {
                    id: column(r, 0)?,
                    execution_id: column(r, 1)?,
                    organization_id: column(r, 2)?,
                    remaining: column(r, 3)?,
                    attempt: column(r, 4)?,
                })
            })
            .collect()
    }

    /// The database's clock.
    pub async fn now(&self) -> Result<SystemTime, Error> {
        column(&self.client.query_one(NOW, &[]).await?, 0)
    }

    /// The gauges of `pg_reaper_status`.
    pub async fn status(&self) -> Result<crate::metrics::DbGauges, Error> {
        let r = self.one(STATUS, &[]).await?;
        Ok(crate::metrics::DbGauges {
            intents: [
                column(&r, 0)?,
                column(&r, 1)?,
                column(&r, 2)?,
                column(&r, 3)?,
            ],
            oldest_pending_age_seconds: column(&r, 4)?,
            barriers_live: column(&r, 5)?,
            barriers_stranded: column(&r, 6)?,
            worker_leader: column(&r, 7)?,
            worker_last_tick_age_seconds: column(&r, 8)?,
            worker_failed_ticks: column(&r, 9)?,
            tables_drift: column(&r, 10)?,
        })
    }

    /// One tick of the extension-free edition (queue the strands, re-offer expired leases,
    /// sweep, prune): how many intents it queued, or None when another driver was ticking.
    pub async fn tick(&self) -> Result<Option<i32>, Error> {
        column(&self.one(TICK, &[]).await?, 0)
    }

    /// Hands a claimed intent back untouched; false when it was not held.
    pub async fn release(&self, intent: &Intent) -> Result<bool, Error> {
        column(&self.one(RELEASE, &[&intent.id, &intent.attempt]).await?, 0)
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    async fn handed_back(
        &self,
        statement: &'static str,
        args: &[&(dyn ToSql + Sync)],
    ) -> Result<HandedBack, Error> {
        let row = self.one(statement, args).await?;
        HandedBack::parse(column(&row, 0)?)
    }
}

impl Outbox for Store {
    type Tx<'a> = StoreTx<'a>;

    async fn resolve(&mut self, intent: &Intent, outcome: Outcome) -> Result<bool, Error> {
        resolve_on(&self.prepared, &self.client, intent, outcome).await
    }

    async fn mark_sending(&mut self, intent: &Intent, hold: Duration) -> Result<bool, Error> {
        let row = self
            .one(
                MARK_SENDING,
                &[&intent.id, &intent.attempt, &Interval(hold)],
            )
            .await?;
        column(&row, 0)
    }

    async fn begin(&mut self) -> Result<StoreTx<'_>, Error> {
        Ok(StoreTx {
            tx: self.client.transaction().await?,
            prepared: &self.prepared,
        })
    }

    async fn fail(
        &mut self,
        intent: &Intent,
        error: &str,
        backoff: Duration,
        max_attempts: i32,
    ) -> Result<HandedBack, Error> {
        self.handed_back(
            FAIL,
            &[
                &intent.id,
                &intent.attempt,
                &error,
                &Interval(backoff),
                &max_attempts,
            ],
        )
        .await
    }

    async fn defer(
        &mut self,
        intent: &Intent,
        error: &str,
        backoff: Duration,
    ) -> Result<HandedBack, Error> {
        self.handed_back(
            DEFER,
            &[&intent.id, &intent.attempt, &error, &Interval(backoff)],
        )
        .await
    }
}

impl RecoveryTx for StoreTx<'_> {
    async fn lock(&mut self, intent: &Intent, lease: Duration) -> Result<Verdict, Error> {
        let row = self
            .prepared
            .one(
                &self.tx,
                LOCK,
                &[&intent.id, &intent.attempt, &Interval(lease)],
            )
            .await?;
        Verdict::parse(column(&row, 0)?, column(&row, 1)?)
    }

    async fn resolve(&mut self, intent: &Intent, outcome: Outcome) -> Result<bool, Error> {
        resolve_on(self.prepared, &self.tx, intent, outcome).await
    }

    async fn commit(self) -> Result<(), Error> {
        Ok(self.tx.commit().await?)
    }
}
