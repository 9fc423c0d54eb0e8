#!/usr/bin/env bash
# `make images`: the database and relay images of deploy/containers, built with podman from a
# Debian 12 root file system (mmdebstrap, from Debian's mirror) and this tree's Debian packages,
# without any image registry:
#   localhost/pg-reaper-debian:bookworm   Debian 12 minbase with PostgreSQL 15 (built once)
#   localhost/pg-reaper-db:<version>      pg_reaper preloaded, pg-reaper-init inside
#   localhost/pg-reaper-relay:<version>   the relay, as nobody
# PACKAGE_PROFILE=debug packages the debug builds; DEBS="a.deb b.deb" takes packages already
# built instead (the container test, right after the package test built them).
set -euo pipefail
cd "$(dirname "$0")/.."
SETUP_FOR=images bash scripts/setup.sh >&2
source scripts/lib.sh
VERSION="$(sed -nE 's/^version = "([0-9.]+)"$/\1/p' Cargo.toml | head -1)"
BASE=localhost/pg-reaper-debian:bookworm
work=target/containers
mkdir -p "$work"

if ! pod image exists "$BASE"; then
  echo "== $BASE: a Debian 12 root file system with PostgreSQL 15 (mmdebstrap)" >&2
  mmdebstrap --quiet --variant=minbase --include=postgresql-15,ca-certificates bookworm "$work/rootfs.tar" >&2
  pod import --quiet "$work/rootfs.tar" "$BASE" >/dev/null
  rm -f "$work/rootfs.tar"
fi

if [ -n "${DEBS:-}" ]; then
  read -r -a debs <<< "$DEBS"
else
  mapfile -t debs < <(bash scripts/package.sh)
fi
context="$work/context"
rm -rf "$context" && mkdir -p "$context"
cp deploy/containers/* "${debs[@]}" "$context/"
for image in db relay; do
  echo "== localhost/pg-reaper-$image:$VERSION" >&2
  pod build --quiet --network host --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 \
    --build-arg BASE="$BASE" -f "$context/Containerfile.$image" -t "localhost/pg-reaper-$image:$VERSION" "$context" >/dev/null
  echo "localhost/pg-reaper-$image:$VERSION"
done
# A rebuild leaves the previous images untagged: remove them rather than fill the disk.
pod image prune -f >/dev/null
