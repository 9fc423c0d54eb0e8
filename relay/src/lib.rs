//! pg-reaper-relay: drains pg_reaper's outbox of recovery intents into the platform's internal
//! status API. Postgres never makes the HTTP call; this process does, and reports back to
//! Postgres through the extension's functions.
//!
//! The library's parts, outside in: [`config`] (flags and their environment twins), [`drain`]
//! (claim due intents, work on them, shut down cleanly), [`recovery`] (one intent: the pure
//! decisions and the executor over the [`recovery::Outbox`] and [`recovery::StatusApi`]
//! interfaces), [`circuit`] (whether the API is reachable at all), [`api`] and [`store`] (the
//! HTTP and Postgres sides of those interfaces), [`ticker`] (the extension-free edition's
//! reaping, driven with `--reap-interval`), [`metrics`], [`protocol`] (the extension's words),
//! [`db`] (libpq-style connection strings) and [`backoff`].

pub mod api;
pub mod backoff;
pub mod circuit;
pub mod config;
pub mod db;
pub mod drain;
pub mod metrics;
pub mod protocol;
pub mod recovery;
pub mod store;
pub mod ticker;

/// What can go wrong outside the HTTP answers (those are [`api::Failure`]s, a recovery's
/// input, not errors): Postgres, a word of the extension this relay does not know, setting up.
#[derive(Debug)]
pub enum Error {
    Db(tokio_postgres::Error),
    /// The extension answered something this relay does not understand.
    Protocol(String),
    /// Connecting or setting a session up.
    Connect(String),
    /// A flag or file the relay cannot start with.
    Config(String),
}

impl Error {
    /// An error the re-fire hook raised (the extension marks its message).
    pub fn is_refire_hook(&self) -> bool {
        match self {
            Error::Db(e) => e.as_db_error().is_some_and(|db| {
                db.message()
                    .starts_with(pg_reaper_protocol::REFIRE_HOOK_ERROR)
            }),
            _ => false,
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Error {
        Error::Db(e)
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Protocol(m) | Error::Connect(m) | Error::Config(m) => f.write_str(m),
            Error::Db(e) => match e.as_db_error() {
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

impl std::error::Error for Error {}
