#!/usr/bin/env bash
# `make package`: a release's artifacts in target/package/, built from this tree (release builds):
#   postgresql-15-pg-reaper_<version>_amd64.deb  the extension: library, control file and every
#                                                SQL script, in Debian's PostgreSQL 15 layout
#   pg-reaper-relay_<version>_amd64.deb          the relay, its systemd unit, an environment file
#   pg_reaper-<version>.sql                      the extension-free edition (also in the first
#                                                package's docs)
#   SHA256SUMS                                   of the three, for `sha256sum --check`
# It prints the packages' paths.
# Only PostgreSQL 15 is packaged: the other majors' test installations are relocatable builds
# with their own configuration, not Debian's, so a library built against them is not one to ship
# for Debian's packages of that major.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
cd "$(dirname "$0")/.."
SETUP_FOR=build bash scripts/setup.sh >&2
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
VERSION="$(sed -nE 's/^version = "([0-9.]+)"$/\1/p' Cargo.toml | head -1)"
ARCH="$(dpkg --print-architecture)"
# PACKAGE_PROFILE=debug packages debug builds (the package test reuses the tests' builds).
PROFILE="${PACKAGE_PROFILE:-release}"
if [ "$PROFILE" = debug ]; then PGRX_FLAGS=(--debug); CARGO_FLAGS=(); else PGRX_FLAGS=(); CARGO_FLAGS=(--release); fi
OUT=target/package
rm -rf "$OUT" && mkdir -p "$OUT"

# --- the extension ------------------------------------------------------------------------
ext="$OUT/postgresql-15-pg-reaper"
cargo pgrx package "${PGRX_FLAGS[@]}" --pg-config "$PG_CONFIG" --out-dir "$OUT/pgrx" >&2
mkdir -p "$ext/DEBIAN" "$ext/usr/share/doc/postgresql-15-pg-reaper"
# pgrx lays the files out under the paths pg_config names, which are Debian's.
cp -r "$OUT/pgrx/usr" "$ext/"
# pgrx puts the SQL of this version in; the upgrade scripts come from sql/.
cp sql/pg_reaper--*--*.sql "$ext/usr/share/postgresql/15/extension/"
cp -r README.md ARCHITECTURE.md docs "$ext/usr/share/doc/postgresql-15-pg-reaper/"
# The extension-free edition, for databases where the library cannot be loaded.
python3 scripts/sql.py portable >/dev/null
cp target/portable/pg_reaper.sql "$ext/usr/share/doc/postgresql-15-pg-reaper/pg_reaper-extension-free.sql"
# The re-fire hook for the reference platform's queue (docs/unstract.md).
cp integrations/unstract/refire.sql "$ext/usr/share/doc/postgresql-15-pg-reaper/unstract-refire.sql"
cat > "$ext/DEBIAN/control" <<CONTROL
Package: postgresql-15-pg-reaper
Version: $VERSION
Architecture: $ARCH
Maintainer: pg_reaper developers <pg-reaper@localhost>
Depends: postgresql-15, libc6
Section: database
Priority: optional
Description: fan-in barrier and stranded-work safety net for Postgres job queues
 pg_reaper is a PostgreSQL extension: a fan-in barrier API for job queues, an outbox of
 recovery intents for the executions whose workers died, and a background worker that finds
 them. Add pg_reaper to shared_preload_libraries and run CREATE EXTENSION pg_reaper.
CONTROL
dpkg-deb --root-owner-group -Zxz --build "$ext" "$OUT/postgresql-15-pg-reaper_${VERSION}_${ARCH}.deb" >&2

# --- the relay ----------------------------------------------------------------------------
relay="$OUT/pg-reaper-relay"
cargo build --locked "${CARGO_FLAGS[@]}" -q -p pg-reaper-relay
install -D -m 0755 "target/$PROFILE/pg-reaper-relay" "$relay/usr/bin/pg-reaper-relay"
install -D -m 0644 deploy/debian/pg-reaper-relay.service "$relay/lib/systemd/system/pg-reaper-relay.service"
install -D -m 0644 deploy/debian/relay.env "$relay/etc/pg-reaper-relay/relay.env"
install -D -m 0644 README.md "$relay/usr/share/doc/pg-reaper-relay/README.md"
install -D -m 0644 docs/relay.md "$relay/usr/share/doc/pg-reaper-relay/relay.md"
mkdir -p "$relay/DEBIAN"
echo /etc/pg-reaper-relay/relay.env > "$relay/DEBIAN/conffiles"
cat > "$relay/DEBIAN/control" <<CONTROL
Package: pg-reaper-relay
Version: $VERSION
Architecture: $ARCH
Maintainer: pg_reaper developers <pg-reaper@localhost>
Depends: libc6
Suggests: systemd
Section: database
Priority: optional
Description: drains pg_reaper's outbox into the platform's internal status API
 The relay claims pg_reaper's recovery intents, reads each execution's status over HTTP, and
 marks a stranded execution ERROR (or re-fires its callback) under a row lock in Postgres.
 Configure /etc/pg-reaper-relay/relay.env and /etc/pg-reaper-relay/api.key, then
 systemctl enable --now pg-reaper-relay.
CONTROL
# Enabled by hand once configured: starting it unconfigured would only fail and restart.
cat > "$relay/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload >/dev/null 2>&1 || true
fi
POSTINST
cat > "$relay/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl stop pg-reaper-relay.service >/dev/null 2>&1 || true
fi
PRERM
chmod 0755 "$relay/DEBIAN/postinst" "$relay/DEBIAN/prerm"
dpkg-deb --root-owner-group -Zxz --build "$relay" "$OUT/pg-reaper-relay_${VERSION}_${ARCH}.deb" >&2

# --- the release artifacts: the packages, the edition's file, their checksums -------------
cp target/portable/pg_reaper.sql "$OUT/pg_reaper-$VERSION.sql"
rm -rf "$OUT/pgrx" "$ext" "$relay"
(cd "$OUT" && sha256sum ./*.deb "pg_reaper-$VERSION.sql" | sed 's| \./| |' > SHA256SUMS)
ls "$OUT"/*.deb
