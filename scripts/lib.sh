# shellcheck shell=bash
# Shared by run.sh and bench.sh: a throwaway cluster owned by the postgres OS user, processes
# started next to it, one request to the sample status API, and the cleanup of all of it.
export PATH="$HOME/.cargo/bin:$PATH"
export PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}"
BIN="$(dirname "$PG_CONFIG")"
PIDS=()

as_pg() { if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  as_pg "$BIN/pg_ctl" -D "$DATA/pg" -m fast -w stop >/dev/null 2>&1 || true
  rm -rf "$DATA"
}

# throwaway_cluster NAME PORT: initdb and start a cluster in a fresh directory ($DATA) with the
# lines on stdin appended to postgresql.conf. It and everything in PIDS go on exit or Ctrl-C.
throwaway_cluster() {
  DATA="$(mktemp -d "/tmp/pg-reaper-$1.XXXXXX")"
  if [ "$(id -u)" -eq 0 ]; then chown postgres "$DATA"; fi
  trap cleanup EXIT
  trap 'exit 130' INT TERM
  as_pg "$BIN/initdb" -D "$DATA/pg" -A trust -U postgres --locale=C.UTF-8 >/dev/null
  {
    echo "port = $2"
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = '$DATA'"
    cat
  } >> "$DATA/pg/postgresql.conf"
  as_pg "$BIN/pg_ctl" -D "$DATA/pg" -l "$DATA/pg/server.log" -w start >/dev/null
}

# api METHOD PATH [JSON]: one request to the sample API on $API_PORT with the key in $KEY_FILE,
# over bash's /dev/tcp (no curl needed); prints the response body.
api() {
  local body="${3:-}" reply
  exec 3<>"/dev/tcp/127.0.0.1/$API_PORT"
  printf '%s %s HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s' \
    "$1" "$2" "$(cat "$KEY_FILE")" "${#body}" "$body" >&3
  reply="$(cat <&3)"
  exec 3<&-
  printf '%s' "${reply#*$'\r\n\r\n'}"
}

# wait_for_port PORT: until something listens there (60 s at most: CI machines are loaded).
wait_for_port() {
  for _ in $(seq 600); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "nothing listens on port $1" >&2
  return 1
}

# podman as these machines need it (cgroups in hybrid mode, no CAP_SYS_RESOURCE): runc and
# cgroupfs; `pod_run` adds the limits crun's defaults would fail to set, and the host network.
pod() { podman --runtime runc --cgroup-manager cgroupfs "$@"; }
pod_run() { pod run --ulimit nofile=1024:1024 --ulimit nproc=4096:4096 --network host "$@"; }
