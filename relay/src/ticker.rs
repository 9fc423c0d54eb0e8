//! The extension-free edition has no background worker: something must call its
//! `pg_reaper_tick()` (queue the strands, re-offer expired leases, sweep, prune). With
//! `--reap-interval` the relay does, on a connection of its own. The tick's record row is its
//! try-lock, so any number of relays may tick: one runs, the others skip at once.

use crate::Error;
use crate::db::Target;
use crate::store::Store;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tracing::{debug, error, info, warn};

/// What one attempt to tick came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Tick {
    /// This relay ticked and queued that many intents.
    Ran(i32),
    /// Another driver (a relay, pg_cron) was ticking.
    Skipped,
    /// There is nothing to tick: the native extension, whose worker reaps, is installed.
    NoTickFunction,
}

/// One tick on `store`, logged.
pub async fn tick(store: &Store) -> Result<Tick, Error> {
    match store.tick().await {
        Ok(Some(queued)) => {
            if queued > 0 {
                info!(queued, "tick: queued stranded executions for recovery");
            } else {
                debug!("tick: nothing stranded");
            }
            Ok(Tick::Ran(queued))
        }
        Ok(None) => {
            debug!("tick skipped: another driver is ticking");
            Ok(Tick::Skipped)
        }
        Err(Error::Db(e)) if e.code() == Some(&SqlState::UNDEFINED_FUNCTION) => {
            error!(
                "--reap-interval: there is no pg_reaper_tick(): the pg_reaper extension is \
                 installed, and its background worker reaps; ticking stopped (drop --reap-interval)"
            );
            Ok(Tick::NoTickFunction)
        }
        Err(e) => Err(e),
    }
}

/// Ticks every `every` until the process ends, reconnecting after a failure.
pub fn spawn(target: Target, transaction_idle: Duration, every: Duration) {
    tokio::spawn(async move {
        let mut store: Option<Store> = None;
        loop {
            if store.as_ref().is_none_or(Store::is_closed) {
                match Store::connect(&target, None, transaction_idle).await {
                    Ok(s) => store = Some(s),
                    Err(e) => warn!(error = %e, "tick: cannot connect; trying again next interval"),
                }
            }
            if let Some(s) = &store {
                match tick(s).await {
                    Ok(Tick::NoTickFunction) => return,
                    Ok(_) => {}
                    Err(e) => {
                        warn!(error = %e, "tick failed; trying again next interval");
                        store = None;
                    }
                }
            }
            tokio::time::sleep(every).await;
        }
    });
}
