//! The outbox of recovery intents. `reap` fills it; the relay drains it; the worker hands
//! intents whose relay died back to the other relays.

use crate::plan::{self, Statement};
use pgrx::prelude::*;

/// An intent stays `in_flight` only while its relay's lease runs. A relay that was killed never
/// comes back for it: the compare-and-set on the lease makes it claimable again, immediately.
const REOFFER_EXPIRED_LEASES: Statement = Statement {
    sql: "UPDATE @extschema@.pg_reaper_outbox
             SET state = 'pending', lease_expires_at = NULL, next_attempt_at = now(),
                 updated_at = now()
           WHERE state = 'in_flight' AND lease_expires_at < now()",
    args: &[],
    writes: true,
};

/// Makes intents whose lease expired claimable again; returns how many.
pub fn reoffer_expired_leases(schema: pg_sys::Oid) -> usize {
    Spi::connect_mut(|client| {
        plan::run(client, schema, &REOFFER_EXPIRED_LEASES, &[]).map(|t| t.len())
    })
    .unwrap_or_else(|e| error!("pg_reaper: re-offering expired leases: {e}"))
}
