#!/usr/bin/env bash
# `make soak`: the sustained-load test of relay/tests/soak.rs for SOAK_SECONDS (default 300),
# with its invariants checked at the end. `make test` runs the same test for 12 s.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
export PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo pgrx install --pg-config "$PG_CONFIG" >/dev/null
SOAK_SECONDS="${SOAK_SECONDS:-300}" cargo test --locked -p pg-reaper-relay --test soak -- --nocapture
