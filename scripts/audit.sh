#!/usr/bin/env bash
# Dependency audit over Cargo.lock with cargo-deny (installed from the Rust package registry when
# missing): licenses on the allow list, crates from crates.io only, no wildcard versions, no
# banned crates; then clippy with warnings as errors. The RustSec advisory check needs the
# advisory database from GitHub: ADVISORIES=1 adds it where that is reachable.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."
DENY_VERSION=0.20.2
if ! cargo deny --version 2>/dev/null | grep -qx "cargo-deny $DENY_VERSION"; then
  echo "audit: installing cargo-deny $DENY_VERSION"
  cargo install cargo-deny --version "$DENY_VERSION" --locked
fi
checks=(bans licenses sources)
if [ "${ADVISORIES:-0}" = 1 ]; then
  checks+=(advisories)
else
  echo "audit: advisories not checked (the RustSec database is on GitHub; ADVISORIES=1 to fetch it)"
fi
cargo deny --locked check "${checks[@]}"
cargo clippy --workspace --all-targets --locked -q -- -D warnings
echo "audit: passed (${checks[*]}, clippy)"
