#!/usr/bin/env bash
# release.sh VERSION: builds a released version of the extension from git history, once, and
# prints the directory that holds its files laid out like an install (lib/ and extension/).
# The upgrade test installs those files, creates rows under that version, then upgrades.
set -euo pipefail
export PATH="$HOME/.cargo/bin:$PATH"
export PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
cd "$(dirname "$0")/.."
root="$PWD"

# Every released version and the commit that released it.
case "${1:?usage: release.sh VERSION}" in
  0.1.0) commit=a076d8204810ce3c427b70a1662f292c52b1d86a ;;
  *) echo "release.sh: no released version $1 (known: 0.1.0)" >&2; exit 2 ;;
esac

major="$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')"
out="$root/target/releases/$1-pg$major"
if [ -f "$out/.built" ]; then echo "$out"; exit 0; fi

if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
  echo "release.sh: commit $commit (release $1) is not in this clone; a shallow clone cannot build it" >&2
  exit 1
fi
src="$root/target/releases/src-$1"
rm -rf "$src" "$out"
mkdir -p "$src"
git archive "$commit" | tar -x -C "$src"
# The released tree's own lock file pins what it was built with. It builds in a target
# directory of its own: in the tree's, its library would overwrite this version's build
# artifacts, and the next `cargo pgrx install` (which does not relink an unchanged crate) would
# install the old library under the new version's name.
(cd "$src" && CARGO_TARGET_DIR="$root/target/releases/build" cargo pgrx package --debug \
   --pg-config "$PG_CONFIG" --out-dir "$out/pkg") >&2
mkdir -p "$out/lib" "$out/extension"
find "$out/pkg" -name 'pg_reaper.so' -exec cp {} "$out/lib/" \;
find "$out/pkg" -path '*/extension/*' -name 'pg_reaper*' -exec cp {} "$out/extension/" \;
rm -rf "$out/pkg" "$src"
touch "$out/.built"
echo "$out"
