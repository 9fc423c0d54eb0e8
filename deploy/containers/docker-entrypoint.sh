#!/bin/bash
# Starts PostgreSQL 15 with pg_reaper preloaded, as the postgres and pgvector images start: on
# the first start (an empty $PGDATA) it creates the cluster with POSTGRES_USER (default
# postgres) as its superuser, password POSTGRES_PASSWORD, the database POSTGRES_DB (default the
# user's name), runs /docker-entrypoint-initdb.d/*.sh and *.sql (the platform mounts its
# db_setup.sh there), and sets pg_reaper.database to PG_REAPER_DATABASE (default POSTGRES_DB).
# Any other command runs as given.
set -euo pipefail
if [ "${1:-}" != postgres ]; then
  exec "$@"
fi
shift
: "${PGDATA:=/var/lib/postgresql/data}"
mkdir -p "$PGDATA" /run/postgresql
chown postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"
as_postgres() { runuser -u postgres -- "$@"; }

if [ ! -s "$PGDATA/PG_VERSION" ]; then
  : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set for the first start}"
  export POSTGRES_USER="${POSTGRES_USER:-postgres}"
  export POSTGRES_DB="${POSTGRES_DB:-$POSTGRES_USER}"
  pwfile="$(mktemp)"
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  chown postgres "$pwfile"
  as_postgres initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" \
    --auth-local=trust --auth-host=scram-sha-256 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  cat >> "$PGDATA/postgresql.conf" <<CONF
listen_addresses = '*'
shared_preload_libraries = 'pg_reaper'
pg_reaper.database = '${PG_REAPER_DATABASE:-$POSTGRES_DB}'
CONF
  # The first start listens on the socket only, for the initialisation scripts.
  as_postgres pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
  if [ "$POSTGRES_DB" != postgres ]; then
    as_postgres psql -X -q -U "$POSTGRES_USER" -d postgres -c "CREATE DATABASE \"$POSTGRES_DB\""
  fi
  for f in /docker-entrypoint-initdb.d/*; do
    case "$f" in
      *.sh) echo "running $f"; as_postgres env POSTGRES_USER="$POSTGRES_USER" POSTGRES_DB="$POSTGRES_DB" \
              POSTGRES_SCHEMA="${POSTGRES_SCHEMA:-}" bash "$f" ;;
      *.sql) echo "running $f"; as_postgres psql -X -q -U "$POSTGRES_USER" -d "$POSTGRES_DB" -f "$f" ;;
      *) ;;
    esac
  done
  as_postgres pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi
exec runuser -u postgres -- postgres -D "$PGDATA" "$@"
