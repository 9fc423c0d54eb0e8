//! The relay's side of Postgres: calls to the extension's outbox and recovery functions. The
//! state transitions live in the extension; this module only names them. Every statement is
//! here, with `@extschema@` replaced by the extension's (quoted) schema found at connect time.

use std::time::Duration;
use tokio_postgres::{Client, NoTls};

const FIND_SCHEMA: &str = "SELECT pg_catalog.quote_ident(n.nspname)
                             FROM pg_catalog.pg_extension e
                             JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace
                            WHERE e.extname = 'pg_reaper'";
/// A recovery transaction must not wait forever behind a row lock; it fails and is retried.
const SESSION_SETUP: &str = "SET lock_timeout = '10s'; SET application_name = 'pg-reaper-relay'";
const CLAIM: &str = "SELECT id, execution_id, organization_id, remaining, attempt
                       FROM @extschema@.outbox_claim($1, $2::text::interval)";
const LOCK: &str =
    "SELECT verdict, remaining FROM @extschema@.recovery_lock($1, $2, $3::text::interval)";
const RESOLVE: &str = "SELECT @extschema@.outbox_resolve($1, $2)";
const FAIL: &str = "SELECT @extschema@.outbox_fail($1, $2, $3, $4::text::interval, $5)";
const RELEASE: &str = "SELECT @extschema@.outbox_release($1, $2)";
const LISTEN: &str = "LISTEN pg_reaper_outbox";

/// One claimed intent; `attempt` is the claim's fencing token.
#[derive(Debug, Clone)]
pub struct Intent {
    pub id: i64,
    pub execution_id: String,
    pub organization_id: String,
    pub remaining: i32,
    pub attempt: i32,
}

/// What the re-check under the barrier's row lock decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The claim is no longer ours: another relay holds or resolved the intent.
    Lost,
    /// Re-enqueued, progressed or torn down since it was reaped: not ours to mark.
    Rearmed,
    Refire,
    Mark {
        remaining: Option<i32>,
    },
}

/// The outcome vocabulary of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    MarkedError,
    AlreadyTerminal,
    Gone,
    Rearmed,
    Refired,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::MarkedError,
        Outcome::AlreadyTerminal,
        Outcome::Gone,
        Outcome::Rearmed,
        Outcome::Refired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::MarkedError => "marked_error",
            Outcome::AlreadyTerminal => "already_terminal",
            Outcome::Gone => "gone",
            Outcome::Rearmed => "rearmed",
            Outcome::Refired => "refired",
        }
    }
}

/// Postgres intervals from a Duration, in the text form the functions cast.
fn interval(d: Duration) -> String {
    format!("{} milliseconds", d.as_millis())
}

/// A connection with the statements bound to the extension's schema.
pub struct Store {
    pub client: Client,
    schema: String,
}

impl Store {
    /// Connects, finds the extension's schema and sets the session up. The connection's
    /// driver runs as a task; `on_message` gets every NOTIFY (for the listener connection).
    pub async fn connect(
        url: &str,
        on_notify: Option<tokio::sync::mpsc::UnboundedSender<()>>,
    ) -> Result<Store, String> {
        let (client, mut connection) = tokio_postgres::connect(url, NoTls)
            .await
            .map_err(|e| format!("connecting to Postgres: {e}"))?;
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
            .map_err(|e| format!("looking for the pg_reaper extension: {e}"))?
            .ok_or_else(|| "the pg_reaper extension is not created in this database".to_string())?
            .get(0);
        client
            .batch_execute(SESSION_SETUP)
            .await
            .map_err(|e| format!("session setup: {e}"))?;
        Ok(Store { client, schema })
    }

    fn sql(&self, statement: &str) -> String {
        statement.replace("@extschema@", &self.schema)
    }

    pub async fn listen(&self) -> Result<(), tokio_postgres::Error> {
        self.client.batch_execute(LISTEN).await
    }

    pub async fn claim(
        &self,
        n: i32,
        lease: Duration,
    ) -> Result<Vec<Intent>, tokio_postgres::Error> {
        let rows = self
            .client
            .query(&self.sql(CLAIM), &[&n, &interval(lease)])
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
    pub async fn lock(
        &self,
        intent: &Intent,
        lease: Duration,
    ) -> Result<Verdict, tokio_postgres::Error> {
        let row = self
            .client
            .query_one(
                &self.sql(LOCK),
                &[&intent.id, &intent.attempt, &interval(lease)],
            )
            .await?;
        let verdict: &str = row.get(0);
        Ok(match verdict {
            "lost" => Verdict::Lost,
            "rearmed" => Verdict::Rearmed,
            "refire" => Verdict::Refire,
            _ => Verdict::Mark {
                remaining: row.get(1),
            },
        })
    }

    /// Records the outcome (and cleans up); false when the intent was already done.
    pub async fn resolve(
        &self,
        intent: &Intent,
        outcome: Outcome,
    ) -> Result<bool, tokio_postgres::Error> {
        let row = self
            .client
            .query_one(&self.sql(RESOLVE), &[&intent.id, &outcome.as_str()])
            .await?;
        Ok(row.get(0))
    }

    /// Pushes the intent back with a backoff; returns `pending`, `dead` or `lost`.
    pub async fn fail(
        &self,
        intent: &Intent,
        error: &str,
        backoff: Duration,
        max_attempts: i32,
    ) -> Result<String, tokio_postgres::Error> {
        let row = self
            .client
            .query_one(
                &self.sql(FAIL),
                &[
                    &intent.id,
                    &intent.attempt,
                    &error,
                    &interval(backoff),
                    &max_attempts,
                ],
            )
            .await?;
        Ok(row.get(0))
    }

    pub async fn release(&self, intent: &Intent) -> Result<bool, tokio_postgres::Error> {
        let row = self
            .client
            .query_one(&self.sql(RELEASE), &[&intent.id, &intent.attempt])
            .await?;
        Ok(row.get(0))
    }

    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}
