//! The relay's side of Postgres: calls to the extension's outbox and recovery functions. The
//! state transitions live in the extension; this module only names them. Every statement is
//! here, with `@extschema@` replaced by the extension's (quoted) schema found at connect time.

use crate::db::Target;
use crate::protocol::{CHANNEL, HandedBack, Outcome, Unknown, Verdict};
use std::time::Duration;
use tokio_postgres::{Client, Statement};

const FIND_SCHEMA: &str = "SELECT pg_catalog.quote_ident(n.nspname)
                             FROM pg_catalog.pg_extension e
                             JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
                            WHERE e.extname = 'pg_reaper'";
/// A recovery transaction must not wait forever behind a row lock, nor a statement run for
/// ever; either fails and is retried. The idle-in-transaction timeout (set per connection, just
/// above the HTTP timeout) makes the server end the recovery transaction of a relay that was
/// paused or cut off while it held a barrier's row lock, so nothing waits on it for longer.
const SESSION_SETUP: &str = "SET lock_timeout = '10s'; SET statement_timeout = '30s';
                             SET jit = off; SET application_name = 'pg-reaper-relay'";
const IDLE_IN_TRANSACTION: &str =
    "SELECT pg_catalog.set_config('idle_in_transaction_session_timeout', $1, false)";
const CLAIM: &str = "SELECT id, execution_id, organization_id, remaining, attempt
                       FROM @extschema@.outbox_claim($1, $2::text::interval, $3::text::timestamptz)";
const NOW: &str = "SELECT pg_catalog.now()::text";
const LOCK: &str =
    "SELECT verdict, remaining FROM @extschema@.recovery_lock($1, $2, $3::text::interval)";
const RESOLVE: &str = "SELECT @extschema@.outbox_resolve($1, $2, $3)";
const FAIL: &str = "SELECT @extschema@.outbox_fail($1, $2, $3, $4::text::interval, $5)";
const RELEASE: &str = "SELECT @extschema@.outbox_release($1, $2)";
const DEFER: &str = "SELECT @extschema@.outbox_defer($1, $2, $3, $4::text::interval)";
const MARK_SENDING: &str = "SELECT @extschema@.outbox_mark_sending($1, $2, $3::text::interval)";
/// The database side of the metrics; its role needs SELECT on the view and EXECUTE on
/// reaper_status().
const STATUS: &str = "SELECT outbox_pending, outbox_in_flight, outbox_dead, outbox_done,
                             extract(epoch FROM oldest_pending_age)::float8,
                             barriers_live, barriers_stranded, leader_pid IS NOT NULL,
                             extract(epoch FROM pg_catalog.now() - last_tick_at)::float8,
                             failed_ticks
                        FROM @extschema@.pg_reaper_status";

/// One claimed intent; `attempt` is the claim's fencing token.
#[derive(Debug, Clone)]
pub struct Intent {
    pub id: i64,
    pub execution_id: String,
    pub organization_id: String,
    pub remaining: i32,
    pub attempt: i32,
}

impl Intent {
    /// The execution id as log lines show it: whole up to 128 bytes, else its start and its
    /// length (ids come from the platform's rows; one line must not carry a 150 kB id).
    pub fn log_id(&self) -> String {
        const SHOWN: usize = 128;
        let id = &self.execution_id;
        if id.len() <= SHOWN {
            return id.clone();
        }
        let mut end = SHOWN;
        while !id.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} bytes)", &id[..end], id.len())
    }
}

/// A failed call to Postgres, described with what Postgres said: its message and SQLSTATE.
#[derive(Debug)]
pub enum StoreError {
    Db(tokio_postgres::Error),
    /// The extension answered something this relay does not understand.
    Protocol(String),
}

impl From<Unknown> for StoreError {
    fn from(e: Unknown) -> StoreError {
        StoreError::Protocol(e.0)
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> StoreError {
        StoreError::Db(e)
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreError::Protocol(m) => f.write_str(m),
            StoreError::Db(e) => match e.as_db_error() {
                // Message and SQLSTATE only: a DETAIL can be long (pgrx puts a Rust backtrace
                // there when the server runs with RUST_BACKTRACE set).
                Some(db) => write!(f, "{} (SQLSTATE {})", db.message(), db.code().code()),
                // Not a server error (a closed connection, a timeout): its own words and cause.
                None => {
                    write!(f, "{e}")?;
                    if let Some(cause) = std::error::Error::source(e) {
                        write!(f, ": {cause}")?;
                    }
                    Ok(())
                }
            },
        }
    }
}

/// Postgres intervals from a Duration, in the text form the functions cast.
fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

/// A connection with the statements bound to the extension's schema, each prepared once on
/// it (a recovery runs four or five of them: preparing each time would double the round trips
/// and the server's parsing).
pub struct Store {
    pub client: Client,
    schema: String,
    prepared: std::sync::Mutex<std::collections::HashMap<&'static str, Statement>>,
}

impl Store {
    /// Connects, finds the extension's schema and sets the session up. The connection's
    /// driver runs as a task; `on_message` gets every NOTIFY (for the listener connection).
    pub async fn connect(
        target: &Target,
        on_notify: Option<tokio::sync::mpsc::UnboundedSender<()>>,
        transaction_idle: Duration,
    ) -> Result<Store, String> {
        let (client, mut connection) = target
            .connect()
            .await
            .map_err(|e| format!("connecting to Postgres: {}", StoreError::from(e)))?;
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
        let schema: String = client
            .query_opt(FIND_SCHEMA, &[])
            .await
            .map_err(|e| {
                format!(
                    "looking for the pg_reaper extension: {}",
                    StoreError::from(e)
                )
            })?
            .ok_or_else(|| "the pg_reaper extension is not created in this database".to_string())?
            .get(0);
        client
            .batch_execute(SESSION_SETUP)
            .await
            .map_err(|e| format!("session setup: {}", StoreError::from(e)))?;
        client
            .execute(
                IDLE_IN_TRANSACTION,
                &[&format!("{}ms", transaction_idle.as_millis())],
            )
            .await
            .map_err(|e| format!("session setup: {}", StoreError::from(e)))?;
        Ok(Store {
            client,
            schema,
            prepared: Default::default(),
        })
    }

    /// `statement` bound to the extension's schema, prepared on this connection once.
    async fn sql(&self, statement: &'static str) -> Result<Statement, tokio_postgres::Error> {
        let cached = self
            .prepared
            .lock()
            .ok()
            .and_then(|p| p.get(statement).cloned());
        if let Some(s) = cached {
            return Ok(s);
        }
        let s = self
            .client
            .prepare(&statement.replace("@extschema@", &self.schema))
            .await?;
        if let Ok(mut p) = self.prepared.lock() {
            p.insert(statement, s.clone());
        }
        Ok(s)
    }

    pub async fn listen(&self) -> Result<(), tokio_postgres::Error> {
        self.client
            .batch_execute(&format!("LISTEN {CHANNEL}"))
            .await
    }

    /// Claims up to `n` intents due by `due_by` (a time read with `now`; None: now).
    pub async fn claim(
        &self,
        n: i32,
        lease: Duration,
        due_by: Option<&str>,
    ) -> Result<Vec<Intent>, StoreError> {
        let rows = self
            .client
            .query(&self.sql(CLAIM).await?, &[&n, &interval(lease), &due_by])
            .await?;
        Ok(rows
            .iter()
            .map(|r| Intent {
                id: r.get(0),
                execution_id: r.get(1),
                organization_id: r.get(2),
                remaining: r.get(3),
                attempt: r.get(4),
            })
            .collect())
    }

    /// The database's clock, as text for `claim`.
    pub async fn now(&self) -> Result<String, tokio_postgres::Error> {
        Ok(self.client.query_one(NOW, &[]).await?.get(0))
    }

    pub async fn begin(&self) -> Result<(), tokio_postgres::Error> {
        self.client.batch_execute("BEGIN").await
    }

    pub async fn commit(&self) -> Result<(), tokio_postgres::Error> {
        self.client.batch_execute("COMMIT").await
    }

    pub async fn rollback(&self) -> Result<(), tokio_postgres::Error> {
        self.client.batch_execute("ROLLBACK").await
    }

    /// In the open transaction: renew the claim, lock the barrier, re-check it.
    pub async fn lock(&self, intent: &Intent, lease: Duration) -> Result<Verdict, StoreError> {
        let row = self
            .client
            .query_one(
                &self.sql(LOCK).await?,
                &[&intent.id, &intent.attempt, &interval(lease)],
            )
            .await?;
        let verdict: &str = row.get(0);
        Ok(Verdict::parse(verdict, row.get(1))?)
    }

    /// Records the outcome (and cleans up); false when the claim is no longer ours.
    pub async fn resolve(
        &self,
        intent: &Intent,
        outcome: Outcome,
    ) -> Result<bool, tokio_postgres::Error> {
        let row = self
            .client
            .query_one(
                &self.sql(RESOLVE).await?,
                &[&intent.id, &intent.attempt, &outcome.as_str()],
            )
            .await?;
        Ok(row.get(0))
    }

    /// Pushes the intent back with a backoff: pending again, dead, or lost.
    pub async fn fail(
        &self,
        intent: &Intent,
        error: &str,
        backoff: Duration,
        max_attempts: i32,
    ) -> Result<HandedBack, StoreError> {
        let row = self
            .client
            .query_one(
                &self.sql(FAIL).await?,
                &[
                    &intent.id,
                    &intent.attempt,
                    &error,
                    &interval(backoff),
                    &max_attempts,
                ],
            )
            .await?;
        Ok(HandedBack::parse(row.get(0))?)
    }

    /// Pushes the intent back after a failure that says nothing about the execution: not
    /// counted, never dead: pending again, or lost.
    pub async fn defer(
        &self,
        intent: &Intent,
        error: &str,
        backoff: Duration,
    ) -> Result<HandedBack, StoreError> {
        let row = self
            .client
            .query_one(
                &self.sql(DEFER).await?,
                &[&intent.id, &intent.attempt, &error, &interval(backoff)],
            )
            .await?;
        Ok(HandedBack::parse(row.get(0))?)
    }

    /// Commits that an ERROR mark may now leave, holding the claim for at least `hold`; false
    /// when the claim is no longer ours (then no mark may be sent).
    pub async fn mark_sending(
        &self,
        intent: &Intent,
        hold: Duration,
    ) -> Result<bool, tokio_postgres::Error> {
        let row = self
            .client
            .query_one(
                &self.sql(MARK_SENDING).await?,
                &[&intent.id, &intent.attempt, &interval(hold)],
            )
            .await?;
        Ok(row.get(0))
    }

    /// The gauges of `pg_reaper_status`.
    pub async fn status(&self) -> Result<crate::metrics::DbGauges, StoreError> {
        let r = self.client.query_one(&self.sql(STATUS).await?, &[]).await?;
        Ok(crate::metrics::DbGauges {
            intents: [r.get(0), r.get(1), r.get(2), r.get(3)],
            oldest_pending_age_seconds: r.get(4),
            barriers_live: r.get(5),
            barriers_stranded: r.get(6),
            worker_leader: r.get(7),
            worker_last_tick_age_seconds: r.get(8),
            worker_failed_ticks: r.get(9),
        })
    }

    pub async fn release(&self, intent: &Intent) -> Result<bool, tokio_postgres::Error> {
        let row = self
            .client
            .query_one(&self.sql(RELEASE).await?, &[&intent.id, &intent.attempt])
            .await?;
        Ok(row.get(0))
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}
