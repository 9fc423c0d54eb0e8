#!/usr/bin/env bash
# `make check`: the inner loop, a few minutes on a warm tree: rustfmt, clippy (warnings are
# errors), the unit tests of the protocol, the relay and the sample API, the relay's
# simulation, and the in-database pg_tests on PostgreSQL 15. `make test` runs everything.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."
SETUP_FOR=build bash scripts/setup.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -q -- -D warnings
cargo test --locked -q -p pg_reaper_protocol -p pg-reaper-sample-api
cargo test --locked -q -p pg-reaper-relay --lib --test simulation
cargo pgrx test pg15 --runas postgres --pgdata /tmp/pgr-pgrx-test
