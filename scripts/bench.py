#!/usr/bin/python3
"""`make bench`: pg_reaper against the baselines a user would otherwise pick, every figure a
ratio against a baseline measured in the same run on the same cluster. Writes
docs/benchmarks.md and its plots (docs/bench-*.png). With BENCH_SMOKE=1: tiny sizes, debug
builds, report and plots to /tmp; that smoke run is part of `make test`, so the benchmark code
cannot rot.

Runs with Debian's Python (its matplotlib draws the plots); everything else is the standard
library, pgbench, psql and the project's own binaries. scripts/bench.sh builds and installs
first, then runs this."""

import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.environ.get("BENCH_SMOKE", "0") == "1"
PG_CONFIG = os.environ.get("PG_CONFIG", "/usr/lib/postgresql/15/bin/pg_config")
BIN = os.path.dirname(PG_CONFIG)
HZ = os.sysconf("SC_CLK_TCK")


@dataclass
class Sizes:
    seconds: int  # one pgbench run
    rounds: int  # alternating rounds per side
    live: list  # live barriers around the strands (section 3)
    strands: int
    drain: int  # intents drained at concurrency 16 (section 4)
    drain_one: int  # ... and at concurrency 1
    ttr: int  # time-to-recover barriers (section 5)
    ttr_spread: int
    idle: int  # seconds of idling (section 6)
    backlog: int  # executions stranded at once (section 7)
    backlog_in: int  # seconds until they strand
    soak: int  # seconds of soak (section 8; 0: none)
    report: str
    profile: str


if SMOKE:
    S = Sizes(1, 1, [1000, 10000], 100, 300, 60, 40, 2, 2, 500, 2, 0,
              "/tmp/pg-reaper-bench-smoke.md", "debug")
else:
    S = Sizes(int(os.environ.get("BENCH_SECONDS", "10")), 3, [10000, 100000, 1000000], 1000,
              10000, 1000, 300, 30, 60, int(os.environ.get("BACKLOG_N", "100000")), 20,
              int(os.environ.get("SOAK_SECONDS", "60")), os.path.join(ROOT, "docs/benchmarks.md"),
              "release")
PLOTS = os.path.dirname(S.report)
PG_PORT = int(os.environ.get("BENCH_PG_PORT", "25449"))
API_PORT = int(os.environ.get("BENCH_API_PORT", "25450"))
RELAY = os.path.join(ROOT, "target", S.profile, "pg-reaper-relay")
SAMPLE_API = os.path.join(ROOT, "target", S.profile, "pg-reaper-sample-api")
PORTABLE_SQL = os.path.join(ROOT, "target", "portable", "pg_reaper.sql")
KEY = "benchkey"


def as_pg(cmd):
    return ["runuser", "-u", "postgres", "--"] + cmd if os.geteuid() == 0 else cmd


def ratio(a, b):
    return a / b


def shown(r):
    """A ratio cut (not rounded) to three decimals, so that what the table shows is never on
    the other side of its target from what was measured (0.8996 reads 0.899, not 0.90)."""
    return f"{math.floor(r * 1000) / 1000:.3f}"


def verdict(value, target, at_least=True):
    return "met" if (value >= target if at_least else value <= target) else "MISSED"


def percentile(values, p):
    """Linear interpolation between the closest ranks, as Postgres's percentile_cont."""
    v = sorted(values)
    pos = p * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def status_kb(pid, key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


class Bench:
    def __init__(self):
        self.procs = []
        self.data = tempfile.mkdtemp(prefix="pg-reaper-bench.", dir="/tmp")
        self.report = []
        self.api_proc = None

    # -- processes and the cluster ------------------------------------------------------------

    def start_cluster(self):
        if os.geteuid() == 0:
            shutil.chown(self.data, "postgres")
        pg = os.path.join(self.data, "pg")
        subprocess.run(as_pg([f"{BIN}/initdb", "-D", pg, "-A", "trust", "-U", "postgres",
                              "--locale=C.UTF-8"]), check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(pg, "postgresql.conf"), "a") as conf:
            conf.write(f"""port = {PG_PORT}
listen_addresses = '127.0.0.1'
unix_socket_directories = '{self.data}'
shared_buffers = 512MB
synchronous_commit = off
max_wal_size = 4GB
checkpoint_timeout = 30min
shared_preload_libraries = 'pg_reaper'
pg_reaper.database = 'bench'
pg_reaper.naptime = 1
pg_reaper.enabled = off
""")
        subprocess.run(as_pg([f"{BIN}/pg_ctl", "-D", pg, "-l", f"{pg}/server.log", "-w", "start"]),
                       check=True, stdout=subprocess.DEVNULL)

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        subprocess.run(as_pg([f"{BIN}/pg_ctl", "-D", os.path.join(self.data, "pg"), "-m", "fast",
                              "-w", "stop"]), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(self.data, ignore_errors=True)

    def spawn(self, cmd, **env):
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, **env})
        self.procs.append(p)
        return p

    def relay(self, *args, db="bench"):
        return self.spawn([RELAY, "--database-url",
                           f"host=127.0.0.1 port={PG_PORT} user=postgres dbname={db}",
                           "--api-base-url", f"http://127.0.0.1:{API_PORT}/internal", *args],
                          PG_REAPER_API_KEY=KEY)

    @staticmethod
    def stop(p):
        p.terminate()
        p.wait()

    # -- SQL ----------------------------------------------------------------------------------

    def psql(self, sql, db="bench", timing=False):
        cmd = [f"{BIN}/psql", "-X", "-q", "-At", "-h", "127.0.0.1", "-p", str(PG_PORT), "-U",
               "postgres", "-d", db, "-v", "ON_ERROR_STOP=1"]
        if timing:
            sql = "\\timing on\n" + sql
        out = subprocess.run(cmd, input=sql, capture_output=True, text=True, check=True)
        return out.stdout

    def q(self, sql, db="bench"):
        return self.psql(sql, db).strip()

    def setting(self, assignment):
        self.psql(f"ALTER SYSTEM SET {assignment}; SELECT pg_reload_conf();")
        time.sleep(1.2)

    def quiesce(self):
        """The worker off (its reaping locks the outbox and the barriers) and no other session
        left (a stopped relay's backends end a moment after it): nothing holds a lock."""
        self.setting("pg_reaper.enabled = off")
        while self.q("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
                     " AND pid <> pg_backend_pid()") != "0":
            time.sleep(0.1)
        while self.q("SELECT worker_state FROM pg_reaper_status") != "disabled":
            time.sleep(0.1)

    def pgbench(self, script, db="bench"):
        out = subprocess.run([f"{BIN}/pgbench", "-h", "127.0.0.1", "-p", str(PG_PORT), "-U",
                              "postgres", "-n", "-M", "prepared", "-c", "4", "-j", "2", "-T",
                              str(S.seconds), "-f", os.path.join(ROOT, "bench", script), db],
                             capture_output=True, text=True, check=True).stdout
        return float(re.search(r"^tps = ([0-9.]+)", out, re.M).group(1))

    # -- the sample API and the relay's metrics -----------------------------------------------

    def api(self, method, path, body=None):
        req = urllib.request.Request(f"http://127.0.0.1:{API_PORT}{path}", method=method,
                                     data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {KEY}",
                                              "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read() or b"null")

    def executing(self, ids):
        self.api("POST", "/_admin/executions",
                 {i: {"organization_id": "org", "status": "EXECUTING"} for i in ids})

    @staticmethod
    def wait_for_port(port):
        import socket
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise SystemExit(f"nothing listens on port {port}")

    # -- the report ---------------------------------------------------------------------------

    def out(self, *lines):
        for line in lines:
            print(line)
            self.report.append(line)


DECR_SETUP = """TRUNCATE pg_barrier_state, pg_batch_dedup;
  SELECT count(barrier_enqueue('b' || i, 'org', 1000000000)) FROM generate_series(1, 10000) i;
  VACUUM ANALYZE pg_barrier_state;"""


def hot_path_table(b, db, targets):
    """The hot path's pairs in database `db`, as table rows against `targets` (decrement, claim,
    enqueue)."""
    b.out("| operation | pg_reaper (tps) | baseline (tps) | ratio | target | |",
          "|---|---|---|---|---|---|")
    decr_setup = DECR_SETUP
    pairs = [
        ("`barrier_decrement` vs `UPDATE … RETURNING` (10,000 barriers)", decr_setup,
         "decrement_ext.sql", "decrement_sql.sql", targets[0]),
        ("`barrier_claim` vs `INSERT … ON CONFLICT DO NOTHING RETURNING`",
         "TRUNCATE pg_batch_dedup", "claim_ext.sql", "claim_sql.sql", targets[1]),
        ("`barrier_enqueue` vs UPSERT + dedup DELETE in a client transaction",
         "TRUNCATE pg_barrier_state, pg_batch_dedup", "enqueue_ext.sql", "enqueue_sql.sql", targets[2]),
    ]
    for name, setup, ext, sql, target in pairs:
        e, s = [], []
        for _ in range(S.rounds):  # alternating, so drift hits both sides alike
            b.psql(setup, db)
            e.append(b.pgbench(ext, db))
            b.psql(setup, db)
            s.append(b.pgbench(sql, db))
        em, sm = statistics.median(e), statistics.median(s)
        r = ratio(em, sm)
        b.out(f"| {name} | {em:.0f} | {sm:.0f} | {shown(r)} | ≥ {target} | {verdict(r, target)} |")


def hot_path(b):
    print("== 1. hot path against plain SQL")
    b.out("## 1. The hot path against the plain SQL it replaces", "")
    hot_path_table(b, "bench", (0.9, 0.9, 1.0))
    decr_setup = DECR_SETUP
    b.out("", "`barrier_decrement` returns the aggregated results only to the caller that completes the",
          "barrier; the baseline (the reference worker's statement) ships the whole array back on every",
          "decrement. `barrier_enqueue` is one round trip where the baseline needs four.", "")
    return decr_setup


RENEW_SETUP = """TRUNCATE pg_batch_dedup;
  INSERT INTO pg_batch_dedup (execution_id, batch_index, created_at, lease_token, lease_expires_at)
  SELECT 'r' || i, 0, now(), i, now() + interval '1 hour' FROM generate_series(1, 10000) i;
  VACUUM ANALYZE pg_batch_dedup;"""


def leases(b, decr_setup):
    """What a lease costs on the hot path: the leased calls against the lease-less ones."""
    print("== 1b. leases on the hot path")
    b.out("## 1b. What a lease costs on the hot path", "",
          "The leased calls against the lease-less ones, alternating rounds in the same run. A batch",
          "is a claim and its decrement in one statement (10,000 barriers, a new batch index each",
          "time); a renewal moves one lease's end (10,000 leases), against a lease-less claim.", "",
          "| operation | with a lease (tps) | without (tps) | ratio | target | |",
          "|---|---|---|---|---|---|")
    pairs = [
        ("`barrier_claim_lease` vs `barrier_claim`", "TRUNCATE pg_batch_dedup", "TRUNCATE pg_batch_dedup",
         "claim_lease_ext.sql", "claim_ext.sql"),
        ("a batch: `barrier_claim_lease` + `barrier_decrement_lease` vs `barrier_claim` + `barrier_decrement`",
         decr_setup, decr_setup, "batch_lease_ext.sql", "batch_ext.sql"),
        ("`barrier_renew_lease` vs `barrier_claim`", RENEW_SETUP, "TRUNCATE pg_batch_dedup",
         "renew_lease_ext.sql", "claim_ext.sql"),
    ]
    for name, setup_lease, setup_plain, lease, plain in pairs:
        e, s = [], []
        for _ in range(S.rounds):
            b.psql(setup_lease)
            e.append(b.pgbench(lease))
            b.psql(setup_plain)
            s.append(b.pgbench(plain))
        em, sm = statistics.median(e), statistics.median(s)
        r = ratio(em, sm)
        b.out(f"| {name} | {em:.0f} | {sm:.0f} | {shown(r)} | ≥ 0.9 | {verdict(r, 0.9)} |")
    b.out("")


PROFILE_SQL = {
    # name: (the setup, the prepared statement); the floor is an empty PL/pgSQL function of the
    # same signature: what any PL/pgSQL call costs before its body does anything.
    "claim": ("TRUNCATE pg_batch_dedup", {
        "plain SQL": "INSERT INTO pg_batch_dedup (execution_id, batch_index, created_at)"
                     " VALUES ($1, $2, now()) ON CONFLICT (execution_id, batch_index) DO NOTHING"
                     " RETURNING execution_id",
        "pg_reaper": "SELECT barrier_claim($1, $2)",
        "empty PL/pgSQL function": "SELECT floor_claim($1, $2)"}),
    "decrement": (DECR_SETUP.replace("10000", "{n}"), {
        "plain SQL": "UPDATE pg_barrier_state SET remaining = remaining - 1, results = results"
                     " || jsonb_build_array('{\"files\": 10}'::jsonb), last_progress_at = now()"
                     " WHERE execution_id = $1 RETURNING remaining, results",
        "pg_reaper": "SELECT * FROM barrier_decrement($1, '{\"files\": 10}')",
        "empty PL/pgSQL function": "SELECT * FROM floor_decrement($1, '{\"files\": 10}')"}),
}
FLOORS = [
    "CREATE FUNCTION floor_claim(execution_id text, batch_index integer) RETURNS boolean"
    " LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp"
    " AS $$ BEGIN RETURN true; END $$",
    "CREATE FUNCTION floor_decrement(execution_id text, result jsonb) RETURNS barrier_decrement_result"
    " LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp"
    " AS $$ BEGIN RETURN NULL; END $$",
]


def single(pg, script, *wrap):
    """Runs `script` in `postgres --single` (one statement per line), under `wrap` if given;
    single-user mode goes on after an error, so one in its output fails the run here."""
    out = subprocess.run(as_pg([*wrap, f"{BIN}/postgres", "--single", "-D", pg, "-c",
                                "shared_preload_libraries=pg_reaper", "bench"]),
                         input=script, text=True, capture_output=True, check=True)
    if "ERROR:" in out.stderr or "ERROR:" in out.stdout:
        raise SystemExit("postgres --single: " + (out.stderr + out.stdout)[-2000:])


def callgrind(b, pg, script):
    """Instructions postgres --single executes for `script`, and the inclusive count of
    ExecConstraints (the table's CHECK constraints) within them."""
    out = os.path.join(b.data, "callgrind.out")
    single(pg, script, "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}")
    total = int(re.search(r"^totals: (\d+)", open(out).read(), re.M).group(1))
    ann = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", out],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"^\s*([\d,]+) \([^)]*\)\s+\S*:ExecConstraints\b", ann, re.M)
    os.unlink(out)
    return total, int(m.group(1).replace(",", "")) if m else 0


def where_the_time_goes(b):
    """One call of claim and decrement under callgrind: instruction counts are exact, so this
    part of the report is free of the machine's noise that tps ratios carry."""
    print("== 1c. where a call's time goes")
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (scripts/setup.sh installs it)")
    pg = os.path.join(b.data, "profile")
    subprocess.run(as_pg([f"{BIN}/initdb", "-D", pg, "-A", "trust", "-U", "postgres",
                          "--locale=C.UTF-8"]), check=True, stdout=subprocess.DEVNULL)
    subprocess.run(as_pg([f"{BIN}/postgres", "--single", "-D", pg, "postgres"]),
                   input="CREATE DATABASE bench\n", text=True, check=True, capture_output=True)
    single(pg, "CREATE EXTENSION pg_reaper\n" + "\n".join(FLOORS) + "\n")
    calls, barriers = (50, 200) if SMOKE else (3000, 10000)
    b.out("## 1c. Where a call's time goes", "",
          f"Instructions per call, counted by callgrind (`postgres --single`, {calls} calls of one",
          "prepared statement, each its own transaction, less a run without them): exact counts,",
          "free of the noise in the tps ratios above. The floor is an empty PL/pgSQL function of",
          "the same signature; `ExecConstraints` is the share spent checking the table's CHECK",
          "constraints, which Postgres rebuilds from their stored form in every statement.", "",
          "| call | instructions | against plain SQL | of which `ExecConstraints` |",
          "|---|---|---|---|")
    rnd = random.Random(1)
    for name, (setup_sql, statements) in PROFILE_SQL.items():
        setup_sql = "\n".join(line.strip() for line in setup_sql.format(n=barriers).splitlines()) + "\n"
        if name == "claim":
            args = [f"('c{rnd.randrange(10**8)}', {rnd.randrange(1000)})" for _ in range(calls)]
            types = "(text, integer)"
        else:
            args = [f"('b{rnd.randrange(1, barriers + 1)}')" for _ in range(calls)]
            types = "(text)"
        base, base_constraints = callgrind(b, pg, setup_sql)
        per = {}
        for label, stmt in statements.items():
            script = setup_sql + f"PREPARE p{types} AS {stmt}\n" + "".join(f"EXECUTE p{a}\n" for a in args)
            total, constraints = callgrind(b, pg, script)
            per[label] = ((total - base) / calls, (constraints - base_constraints) / calls)
        plain = per["plain SQL"][0]
        for label, (instr, cons) in per.items():
            b.out(f"| {name}: {label} | {instr / 1000:.1f} k | {instr / plain:.2f} | {cons / 1000:.1f} k |")
    b.out("", "A PL/pgSQL call pays its floor (the call, the SECURITY DEFINER switch, a fresh",
          "executor state per statement) before its statement runs; whatever the body tests costs",
          "again in every transaction, as PL/pgSQL sets up its expressions anew in each. So the",
          "functions test their arguments in one expression and raise through a helper only when",
          "that test fails, and `barrier_decrement` checks the id only when no barrier matched.",
          "What is left is the floor and the statement itself: in PL/pgSQL a call cannot get",
          "nearer the plain statement than the floor allows.", "")


def hot_updates(b, decr_setup):
    print("== 2. HOT decrements")
    # The same run on the reference platform's own tables, adopted by CREATE EXTENSION.
    b.psql("CREATE DATABASE adopted", db="postgres")
    schema = open(os.path.join(ROOT, "tests/fixtures/unstract_queue_schema.sql")).read()
    b.psql(schema + "\nCREATE EXTENSION pg_reaper SCHEMA unstract;\n"
           "ALTER DATABASE adopted SET search_path = unstract, public;", db="adopted")

    def hot(db):
        b.psql(decr_setup + "\nSELECT pg_stat_reset_single_table_counters('pg_barrier_state'::regclass);",
               db=db)
        b.pgbench("decrement_ext.sql", db)
        time.sleep(1)  # the statistics collector's flush
        hot_n, all_n = map(int, b.q("SELECT n_tup_hot_upd || '|' || n_tup_upd FROM pg_stat_user_tables"
                                    " WHERE relname = 'pg_barrier_state'", db=db).split("|"))
        return hot_n / all_n if all_n else 0.0, hot_n, all_n

    h, ha = hot("bench"), hot("adopted")
    b.out("## 2. Decrements stay HOT", "",
          f"Over one {S.seconds} s `barrier_decrement` run: `n_tup_hot_upd / n_tup_upd` on `pg_barrier_state` = "
          f"**{h[0]:.3f} ({h[1]} of {h[2]})**",
          f"(target ≥ 0.9: {verdict(h[0], 0.9)}). Nothing a decrement writes is indexed, and the table's",
          "fillfactor of 70 leaves room for the new row version on its page.", "",
          "The same run on the reference platform's own `pg_barrier_state`, adopted by `CREATE EXTENSION",
          "pg_reaper SCHEMA unstract` (its migration's extra `text_pattern_ops` index on `execution_id`",
          f"included), barriers armed after the adoption: **{ha[0]:.3f} ({ha[1]} of {ha[2]})** (target ≥ 0.9:",
          f"{verdict(ha[0], 0.9)}). Adoption sets fillfactor 70, which applies to pages written",
          "from then on; barriers live for one execution, so the table is rewritten by use.", "")


def reap_cost(b):
    print("== 3. reap cost against table size")
    b.out("## 3. `reap_expired()` cost follows the strands, not the table", "",
          f"{S.strands} stranded barriers among N live ones (live: created 10 minutes ago, progressing, deadline",
          "6 h ahead). Time of `BEGIN; SELECT * FROM reap_expired(); ROLLBACK`, median of 7.", "",
          "| live barriers | expired strands (ms) | stale-progress strands (ms) |", "|---|---|---|")
    kinds = {
        "expired": "now() - interval '7 hours', now() - interval '1 hour', now() - interval '30 minutes'",
        "stale": "now() - interval '5 hours', now() + interval '1 hour', now() - interval '3 hours'",
    }
    ms = {}
    plan = ""
    for n in S.live:
        row = f"| {n} |"
        for kind, strand in kinds.items():
            b.psql(f"""TRUNCATE pg_barrier_state, pg_reaper_outbox;
INSERT INTO pg_barrier_state (execution_id, organization_id, remaining, created_at, expires_at, last_progress_at)
SELECT 'live-' || i, 'org', 3, now() - interval '10 minutes', now() + interval '6 hours', now() - interval '1 minute'
  FROM generate_series(1, {n}) i;
INSERT INTO pg_barrier_state (execution_id, organization_id, remaining, created_at, expires_at, last_progress_at)
SELECT 'strand-' || i, 'org', 3, {strand} FROM generate_series(1, {S.strands}) i;
VACUUM ANALYZE pg_barrier_state;""")
            out = b.psql("BEGIN;\nSELECT * FROM reap_expired();\nROLLBACK;\n" * 7, timing=True)
            times = [float(t) for t in re.findall(r"^Time: ([0-9.]+) ms", out, re.M)]
            ms[(n, kind)] = statistics.median(times[1::3])  # BEGIN, the reap, ROLLBACK
            row += f" {ms[(n, kind)]:.3f} |"
            if n == S.live[-1]:
                plan = b.psql("EXPLAIN (COSTS OFF) SELECT execution_id FROM pg_barrier_state b WHERE "
                              "barrier_is_stranded(b.expires_at, b.last_progress_at, b.created_at, "
                              "interval '9000 seconds')")
        b.out(row)
    first, last = S.live[0], S.live[-1]
    for kind in kinds:
        r = ratio(ms[(last, kind)], ms[(first, kind)])
        b.out("", f"{kind}: time at {last} live / time at {first} live = **{r:.2f}** (target ≤ 2: "
                  f"{verdict(r, 2, at_least=False)})")
    b.out("", f"The scan's plan at {last} live barriers (the same for both kinds):", "", "```",
          plan.rstrip(), "```", "",
          "How targets 2 and 3 are both met: a decrement moves `last_progress_at`, so indexing it would",
          "make every decrement a non-HOT update. The predicate instead also states `created_at <",
          "now() - stuck_timeout`, which progress implies (a barrier cannot progress before it was",
          "created), and `created_at` and `expires_at` are indexed but never written by a decrement. The",
          "planner ORs the two index scans and rechecks `last_progress_at` only on their few rows. The",
          "limit of the design: barriers that are old *and* still progressing are candidates of the",
          "`created_at` scan too (they are rechecked, not reaped).", "")


def strand_fleet(b, n, prefix):
    """n stranded executions known to the API as EXECUTING, reaped into intents."""
    b.quiesce()
    b.psql(f"""TRUNCATE pg_barrier_state, pg_reaper_outbox, pg_batch_dedup;
INSERT INTO pg_barrier_state (execution_id, organization_id, remaining, created_at, expires_at, last_progress_at)
SELECT '{prefix}' || i, 'org', 2, now() - interval '7 hours', now() - interval '1 hour', now() - interval '1 hour'
  FROM generate_series(1, {n}) i;""")
    b.executing([f"{prefix}{i}" for i in range(1, n + 1)])
    b.q("SELECT queued FROM reap_expired()")


@dataclass
class Drain:
    n: int
    concurrency: int
    seconds: float
    http_sum: float
    http_count: int

    @property
    def rate(self):
        return self.n / self.seconds


def drain(b, n, concurrency):
    port = API_PORT + 1
    strand_fleet(b, n, f"d{concurrency}-")
    t0 = time.time()
    relay = b.relay("--concurrency", str(concurrency), "--listen", f"127.0.0.1:{port}")
    while int(b.q("SELECT count(*) FROM pg_reaper_outbox WHERE state = 'done'")) < n:
        time.sleep(0.1)
    t1 = time.time()
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    b.stop(relay)

    def series(name):
        m = re.search(rf'^pg_reaper_relay_http_request_duration_seconds_{name}{{result="answered"}} (\S+)',
                      metrics, re.M)
        return float(m.group(1))

    return Drain(n, concurrency, t1 - t0, series("sum"), int(series("count")))


def relay_drain(b):
    print("== 4. relay drain")
    b.api("POST", "/_admin/faults", {"delay_ms": 5})
    many, one = drain(b, S.drain, 16), drain(b, S.drain_one, 1)
    rr = ratio(many.rate, one.rate)
    b.out("## 4. Relay drain: parallel relay against one-at-a-time", "",
          "Stranded executions, all EXECUTING in the sample API, which adds 5 ms to every request; each",
          "recovery is a status read, the row-locked re-check, the ERROR mark and the cleanup.", "",
          "| concurrency | intents | seconds | recoveries/s | mean HTTP request (ms) | HTTP time / wall time |",
          "|---|---|---|---|---|---|")
    for d in (many, one):
        rate = f"{d.rate:.0f}" if d.concurrency > 1 else f"{d.rate:.1f}"
        b.out(f"| {d.concurrency} | {d.n} | {d.seconds:.2f} | {rate} | {1000 * d.http_sum / d.http_count:.1f}"
              f" | {100 * d.http_sum / d.seconds / d.concurrency:.0f} % |")
    b.out("", f"Ratio of rates, concurrency 16 / 1: **{rr:.2f}** (target ≥ 10: {verdict(rr, 10)}).",
          "The last column is the share of each in-flight slot's time spent waiting on HTTP; the rest",
          "is Postgres (claim, lock, resolve, commit) and scheduling. One at a time, the floor is two",
          "5 ms requests per recovery; with 16 in flight on 2 cores the relay, the API and Postgres",
          "share the CPUs.", "")
    return many


def time_to_recover(b):
    print("== 5. time to recover")
    b.api("POST", "/_admin/faults", {})
    b.quiesce()
    b.psql("""TRUNCATE pg_barrier_state, pg_reaper_outbox, pg_batch_dedup;
CREATE TABLE IF NOT EXISTS bench_strand_at (execution_id text PRIMARY KEY, stranded_at timestamptz);
TRUNCATE bench_strand_at;""")
    b.setting("pg_reaper.enabled = on")
    b.executing([f"t-{i}" for i in range(1, S.ttr + 1)])
    b.api("POST", "/_admin/reset")
    relay = b.relay("--concurrency", "16")
    time.sleep(1)
    b.psql(f"""WITH b AS (
  SELECT 't-' || i AS id, now() + interval '2 seconds' + (i % {S.ttr_spread}) * interval '1 second'
                               + (i * 37 % 1000) * interval '1 millisecond' AS at
    FROM generate_series(1, {S.ttr}) i
), armed AS (
  INSERT INTO pg_barrier_state (execution_id, organization_id, remaining, created_at, expires_at, last_progress_at)
  SELECT id, 'org', 2, now() - interval '1 minute', at, now() FROM b
)
INSERT INTO bench_strand_at SELECT id, at FROM b;""")
    while int(b.q("SELECT count(*) FROM pg_reaper_outbox WHERE state = 'done'")) < S.ttr:
        time.sleep(0.5)
    b.stop(relay)
    stranded = dict(line.split("|") for line in
                    b.psql("SELECT execution_id, extract(epoch FROM stranded_at) FROM bench_strand_at").split())
    delays = []
    for call in b.api("GET", "/_admin/calls"):
        m = re.search(r"/workflow-execution/([^/]+)/update_status/$", call["path"])
        if call["method"] == "POST" and m and m.group(1) in stranded:
            delays.append(call["at_ms"] / 1000 - float(stranded[m.group(1)]))
    p50, p99 = percentile(delays, 0.5), percentile(delays, 0.99)
    b.out("## 5. Time to recover", "",
          f"{S.ttr} barriers reaching their deadline over {S.ttr_spread} s, `pg_reaper.naptime = 1s`, the worker",
          "leading and one relay (concurrency 16) listening. Delay from the moment a barrier became",
          f"stranded to its ERROR mark arriving at the API, over {len(delays)} marks:", "",
          "| p50 | p99 | max | target |", "|---|---|---|---|",
          f"| {p50:.3f} s | {p99:.3f} s | {max(delays):.3f} s | p99 ≤ naptime + 1 s = 2 s: {verdict(p99, 2, False)} |",
          "", "![Time from stranded to ERROR mark](bench-latency.png)", "",
          "The worker's tick finds a strand within one naptime, its commit's NOTIFY wakes the relay at",
          "once, and the relay's recovery takes a few milliseconds.", "")
    return delays


HEAL_LEASE = 2  # seconds: the lease the killed workers hold, renewed every quarter of it
HEAL_RECLAIM = 2  # pg_reaper.reclaim_timeout during this section
HEAL_POLL = 0.1  # seconds between the queue's redeliveries


def heal_latency(b):
    """A worker holding a lease is SIGKILLed; how long until its batch runs again (the queue
    redelivers it), and, where nothing redelivers, until the execution is queued for recovery."""
    print("== 5b. time to heal a crashed batch")
    n = 3 if SMOKE else 30
    b.quiesce()
    b.psql(f"""TRUNCATE pg_barrier_state, pg_reaper_outbox, pg_batch_dedup;
CREATE TABLE IF NOT EXISTS bench_heal (execution_id text PRIMARY KEY, rerun_at timestamptz);
TRUNCATE bench_heal;
INSERT INTO bench_heal SELECT 'h-' || i FROM generate_series(1, {n}) i;
SELECT count(barrier_enqueue(p || i, 'org', 1)) FROM generate_series(1, {n}) i, unnest('{{h-,q-}}'::text[]) p;""")
    b.setting(f"pg_reaper.reclaim_timeout = {HEAL_RECLAIM}")
    b.setting("pg_reaper.enabled = on")
    lease = f"'{HEAL_LEASE} seconds'"
    workers = {}
    for prefix in ("h-", "q-"):
        for i in range(1, n + 1):
            eid = f"{prefix}{i}"
            # A worker: claims the batch with a lease, then renews it until it is killed.
            p = subprocess.Popen([f"{BIN}/psql", "-X", "-q", "-h", "127.0.0.1", "-p", str(PG_PORT),
                                  "-U", "postgres", "-d", "bench", "-v", "ON_ERROR_STOP=1"],
                                 stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
            b.procs.append(p)
            p.stdin.write(f"SELECT barrier_claim_lease('{eid}', 0, {lease}) AS token \\gset\n"
                          f"SELECT barrier_renew_lease('{eid}', 0, :token, {lease}) \\watch {HEAL_LEASE / 4}\n")
            p.stdin.flush()
            workers[eid] = p
    deadline = time.time() + 120
    while int(b.q("SELECT count(*) FROM pg_batch_dedup WHERE lease_token IS NOT NULL")) < 2 * n:
        if time.time() > deadline:
            raise SystemExit("the workers did not claim their batches")
        time.sleep(0.1)
    # Killed one by one at random moments over a few seconds, so that the kills fall anywhere
    # in the renewal cycle and the worker's tick.
    rnd = random.Random(2)
    order = list(workers)
    start = time.time() + HEAL_LEASE
    kill_at = {eid: start + rnd.uniform(0, 3) for eid in order}
    killed = {}
    redeliver = f"""WITH claimed AS MATERIALIZED (
  SELECT h.execution_id, t.token FROM bench_heal h
   CROSS JOIN LATERAL barrier_claim_lease(h.execution_id, 0, {lease}) AS t(token)
   WHERE h.rerun_at IS NULL
), counted AS (
  SELECT execution_id, (barrier_decrement_lease(execution_id, 0, token)).status FROM claimed
   WHERE token IS NOT NULL
)
UPDATE bench_heal h SET rerun_at = clock_timestamp() FROM counted WHERE h.execution_id = counted.execution_id;"""
    deadline = time.time() + 120
    while True:
        now = time.time()
        for eid in order:
            if eid not in killed and kill_at[eid] <= now:
                workers[eid].kill()
                killed[eid] = time.time()
        b.psql(redeliver)  # the queue redelivers every batch not yet run again
        rerun = int(b.q("SELECT count(rerun_at) FROM bench_heal"))
        queued = int(b.q("SELECT count(*) FROM pg_reaper_outbox WHERE execution_id LIKE 'q-%'"))
        if rerun == n and queued == n:
            break
        if time.time() > deadline:
            raise SystemExit(f"after 120 s: {rerun} of {n} batches re-run, {queued} of {n} queued")
        time.sleep(HEAL_POLL)
    for p in workers.values():
        p.wait()
    b.setting("pg_reaper.reclaim_timeout = DEFAULT")

    def delays(sql):
        rows = dict(line.split("|") for line in b.psql(sql).split())
        return [float(at) - killed[eid] for eid, at in rows.items()]

    rerun = delays("SELECT execution_id, extract(epoch FROM rerun_at) FROM bench_heal")
    queued = delays("SELECT execution_id, extract(epoch FROM created_at) FROM pg_reaper_outbox"
                    " WHERE execution_id LIKE 'q-%'")
    b.psql("TRUNCATE pg_barrier_state, pg_reaper_outbox, pg_batch_dedup")
    bound_rerun = HEAL_LEASE + HEAL_POLL + 0.5
    bound_queued = HEAL_LEASE + HEAL_RECLAIM + 1 + 1  # + naptime + the tick's own time
    b.out("## 5b. Time to heal a crashed batch", "",
          f"{2 * n} workers each claim one batch with a {HEAL_LEASE} s lease (`barrier_claim_lease`) and renew it",
          f"every {HEAL_LEASE / 4} s (`barrier_renew_lease`), until each is SIGKILLed at a random moment. For",
          f"{n} of them the queue redelivers the batch (a claim every {HEAL_POLL} s, as a visibility timeout",
          f"would, compressed); for the other {n} nothing redelivers, and `pg_reaper.reclaim_timeout = {HEAL_RECLAIM}`,",
          "`pg_reaper.naptime = 1s`. Delay from the SIGKILL:", "",
          "| from a worker's SIGKILL to | p50 | p99 | max | bound | |", "|---|---|---|---|---|---|",
          f"| its batch running again (the next claim gets a new token) | {percentile(rerun, 0.5):.3f} s "
          f"| {percentile(rerun, 0.99):.3f} s | {max(rerun):.3f} s | lease + redelivery + 0.5 s = {bound_rerun:.1f} s "
          f"| {verdict(percentile(rerun, 0.99), bound_rerun, False)} |",
          f"| its execution queued for recovery (nothing redelivers) | {percentile(queued, 0.5):.3f} s "
          f"| {percentile(queued, 0.99):.3f} s | {max(queued):.3f} s | lease + reclaim + naptime + 1 s = "
          f"{bound_queued:.0f} s | {verdict(percentile(queued, 0.99), bound_queued, False)} |", "",
          "The lease a worker holds when it dies has between three quarters and all of its length",
          "left; the batch is claimed again at the first redelivery after it lapsed. Where nothing",
          "redelivers, the worker's next tick after the reclaim timeout strands the execution. With",
          "the defaults (a 60 s lease, `pg_reaper.reclaim_timeout = 600`) the same sums give about a",
          "minute to re-run and about 11 minutes to be queued, against the stuck timeout's 2.5 h.", "")


def idle_cost(b):
    print("== 6. idle cost")
    b.setting("pg_reaper.naptime = 5")
    relay = b.relay()
    time.sleep(2)
    worker = int(b.q("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_reaper'"))
    w0, r0 = cpu_ticks(worker), cpu_ticks(relay.pid)
    time.sleep(S.idle)
    w1, r1 = cpu_ticks(worker), cpu_ticks(relay.pid)

    def cpu(a, z):
        return f"{100 * (z - a) / HZ / S.idle:.3f} % ({(z - a) / HZ:.2f} s)"

    b.out("## 6. Cost of idling", "",
          f"Nothing to do for {S.idle} s, default naptime (5 s) and poll interval (5 s):", "",
          f"| process | CPU over {S.idle} s | resident memory |", "|---|---|---|",
          f"| worker (pid {worker}) | {cpu(w0, w1)} | {status_kb(worker, 'VmRSS')} kB (mostly shared buffers it touched) |",
          f"| relay | {cpu(r0, r1)} | {status_kb(relay.pid, 'VmRSS')} kB |", "")
    b.stop(relay)


@dataclass
class Backlog:
    relays: int
    queued_after: float
    drain_s: float
    rate: float
    rss_kb: int
    relay_cpu: float
    pg_cpu: float
    api_cpu: float
    once: int
    marks: int
    samples: list = field(default_factory=list)  # (t, queued, done)


def backlog(b, relays, db="bench"):
    """S.backlog executions stranding at once, drained by `relays` relays (concurrency 16). In
    database `bench` the worker queues them; in another (the extension-free edition's) the relays
    tick it every second."""
    tag = f"bl{relays}{db}-"
    b.api("POST", "/_admin/reset")
    b.quiesce()
    b.psql(f"""TRUNCATE pg_barrier_state, pg_reaper_outbox, pg_batch_dedup;
INSERT INTO pg_barrier_state (execution_id, organization_id, remaining, created_at, expires_at, last_progress_at)
SELECT '{tag}' || i, 'org', 2, now() - interval '1 hour', now() + interval '{S.backlog_in} seconds', now()
  FROM generate_series(1, {S.backlog}) i;""", db)
    if db == "bench":
        b.setting("pg_reaper.enabled = on")
        tick = []
    else:
        tick = ["--reap-interval", "1s"]
    stranded_at = float(b.q("SELECT extract(epoch FROM max(expires_at)) FROM pg_barrier_state", db))
    b.executing([f"{tag}{i}" for i in range(1, S.backlog + 1)])
    procs = [b.relay("--concurrency", "16", *tick, db=db) for _ in range(relays)]
    postmaster = int(open(os.path.join(b.data, "pg", "postmaster.pid")).readline())

    def pg_ticks():
        """The postmaster and every process it started that is still running."""
        children = subprocess.run(["ps", "-o", "pid=", "--ppid", str(postmaster)],
                                  capture_output=True, text=True).stdout.split()
        total = 0
        for pid in [postmaster] + [int(c) for c in children]:
            try:
                total += cpu_ticks(pid)
            except OSError:
                pass
        return total

    pg0, api0 = pg_ticks(), cpu_ticks(b.api_proc.pid)
    samples, done = [], 0
    while done < S.backlog:
        queued, done = map(int, b.q("SELECT count(*) || '|' || count(*) FILTER (WHERE state = 'done')"
                                    " FROM pg_reaper_outbox", db).split("|"))
        now = time.time()
        samples.append((now, queued, done))
        time.sleep(1)
    pg1, api1 = pg_ticks(), cpu_ticks(b.api_proc.pid)
    rss = max(status_kb(p.pid, "VmHWM") for p in procs)
    relay_cpu = sum(cpu_ticks(p.pid) for p in procs) / HZ
    for p in procs:
        b.stop(p)
    mine = [v for k, v in b.api("GET", "/_admin/executions").items() if k.startswith(tag)]
    # The rows' own times, not the 1 s samples: a small backlog drains between two samples.
    queued_after, drain = map(float, b.q(
        "SELECT extract(epoch FROM max(created_at)) - " + repr(stranded_at) + " || '|' ||"
        " extract(epoch FROM max(updated_at) - min(created_at)) FROM pg_reaper_outbox", db).split("|"))
    return Backlog(relays, queued_after, drain, S.backlog / drain, rss,
                   relay_cpu, (pg1 - pg0) / HZ, (api1 - api0) / HZ,
                   sum(1 for v in mine if v["status"] == "ERROR" and v["error_marks"] == 1),
                   sum(v["error_marks"] for v in mine), samples)


def backlog_section(b, many):
    print("== 7. backlog")
    # The shipped defaults: what a user has who tuned nothing.
    b.psql("ALTER SYSTEM RESET pg_reaper.naptime; ALTER SYSTEM RESET pg_reaper.batch_size;"
           " SELECT pg_reload_conf();")
    b.api("POST", "/_admin/faults", {"delay_ms": 5})
    one, two = backlog(b, 1), backlog(b, 2)
    per = ratio(one.rate, many.rate)
    n = S.backlog
    b.out(f"## 7. A backlog: {n} executions stranded at once", "",
          f"{n} barriers reach their deadline at the same moment (a platform-wide outage, a mass",
          "crash), every execution EXECUTING in the sample API (5 ms added per request). Shipped",
          "defaults: `pg_reaper.naptime = 5s`, `pg_reaper.batch_size = 1000`; relays at concurrency 16.",
          "Queued: from the deadline until every strand has its intent. Drained: from the first intent",
          "until the last is done. CPU: user + system time of the relays, and of the postmaster and",
          "every process it started that was still running at the end (the worker, the relays'",
          "backends), and of the sample API, over the whole run.", "",
          "| relays | queued all after (s) | drain (s) | recoveries/s | relay peak RSS | CPU per recovery: relay | Postgres | sample API | CPU in all (s): relay, Postgres, API | marked exactly once |",
          "|---|---|---|---|---|---|---|---|---|---|")
    for r in (one, two):
        b.out(f"| {r.relays} | {r.queued_after:.1f} | {r.drain_s:.1f} | {r.rate:.0f} | {r.rss_kb // 1024} MiB"
              f" | {1e6 * r.relay_cpu / n:.0f} µs | {1e6 * r.pg_cpu / n:.0f} µs | {1e6 * r.api_cpu / n:.0f} µs"
              f" | {r.relay_cpu:.1f}, {r.pg_cpu:.1f}, {r.api_cpu:.1f} | {r.once} of {n} ({r.marks} marks) |")
    exact = all(r.once == n and r.marks == n for r in (one, two))
    b.out("", f"- queued within 30 s of becoming stranded: {one.queued_after:.1f} s ({verdict(one.queued_after, 30, False)})",
          f"- drain rate on the backlog against the {S.drain}-intent rate of section 4 (same run, one relay):",
          f"  {one.rate:.0f} / {many.rate:.0f} = **{per:.2f}** (target ≥ 0.8: {verdict(per, 0.8)})",
          f"- relay peak RSS {one.rss_kb // 1024} MiB (target < 64 MiB: {verdict(one.rss_kb, 65535, False)})",
          f"- every execution marked exactly once: {'met' if exact else 'MISSED'}",
          f"- two relays against one: {ratio(two.rate, one.rate):.2f}× the rate",
          f"- where the time goes (one relay): over its {one.drain_s:.1f} s the relay kept {one.relay_cpu / one.drain_s:.2f} of the",
          f"  machine's {os.cpu_count()} cores busy, Postgres {one.pg_cpu / one.drain_s:.2f} and the sample API {one.api_cpu / one.drain_s:.2f}: the three share",
          "  the CPUs, and Postgres (each recovery is a claim share, the row-locked re-check, the",
          "  committed `mark_sending`, the guarded delete and the resolve, each a WAL-logged update of",
          "  the outbox or the barrier) is the largest part; a second relay adds in-flight slots, not CPU.",
          "", "![Intents queued and recovered over time](bench-backlog.png)", "",
          "Intents queued and recovered over time, one relay (every 5 s):", "",
          "| t (s) | queued | recovered | recoveries/s in the last 5 s |", "|---|---|---|---|")
    t0 = one.samples[0][0]
    next_t, prev = 0.0, None
    for t, queued, done in one.samples:
        t -= t0
        if prev is None or t >= next_t:
            rate = "" if prev is None else f"{(done - prev[1]) / (t - prev[0]):.0f}"
            b.out(f"| {t:.0f} | {queued} | {done} | {rate} |")
            prev, next_t = (t, done), t + 5
    b.out("")
    return one, two


def edition_section(b):
    print("== 9. the extension-free edition")
    b.out("## 9. The extension-free edition", "",
          "The same functions installed from `target/portable/pg_reaper.sql` in database",
          "`bench_portable` of the same cluster (no extension there), and the same plain SQL baselines,",
          "measured in this run.", "")
    hot_path_table(b, "bench_portable", (0.9, 0.9, 1.5))
    r = backlog(b, 1, db="bench_portable")
    n = S.backlog
    b.out("", f"A backlog of {n} executions stranding at once, with no worker: one relay (concurrency",
          "16) ticks the edition every second (`--reap-interval 1s`) and drains what the ticks queue.", "",
          "| queued all after (s) | drain (s) | recoveries/s | marked exactly once |", "|---|---|---|---|",
          f"| {r.queued_after:.1f} | {r.drain_s:.1f} | {r.rate:.0f} | {r.once} of {n} ({r.marks} marks) |", "",
          f"- queued within 60 s of becoming stranded: {r.queued_after:.1f} s ({verdict(r.queued_after, 60, False)})",
          f"- every execution marked exactly once: {'met' if r.once == n and r.marks == n else 'MISSED'}", "")


def soak(b):
    if not S.soak:
        return
    print("== 8. soak")
    report = os.path.join(b.data, "soak.md")
    run = subprocess.run(["cargo", "test", "--locked", "-q", "-p", "pg-reaper-relay", "--test", "soak",
                          "--", "--nocapture"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "SOAK_SECONDS": str(S.soak), "SOAK_REPORT": report})
    if run.returncode != 0:
        # The soak's own account of what broke (which invariant, which execution) is the point.
        sys.stderr.write(run.stdout[-20000:] + run.stderr[-20000:])
        raise SystemExit(f"the soak failed (exit status {run.returncode})")
    b.out("## 8. Sustained load with the invariants checked", "",
          "`relay/tests/soak.rs` (`make soak`): 2 producers, 4 workers of which a share \"crash\" (3 % of",
          "batch deliveries skip the decrement, 5 % of completions skip the callback, 5 % of callbacks",
          "skip `barrier_finish`), 10 % of batches delivered twice, the worker (naptime 0.2 s) and two",
          "relays (concurrency 8) against the sample API, on its own cluster, in two modes. Without",
          "leases (stuck timeout 3 s) a crashed batch is gone; with leases (1 s, renewed once; reclaim",
          "timeout 10 s, callback timeout 3 s, stuck timeout 60 s) the soak's queue delivers a crashed",
          "batch again after a visibility timeout of 1.2 s, as the platform's queue does. Afterwards",
          "every execution must have ended exactly once: COMPLETED by its callback with no mark, ERROR",
          "with exactly one mark and only if a batch crashed, or COMPLETED by its re-fired callback",
          "(only if its callback was lost); no batch counted twice; no error surfaced to a caller;",
          "barriers, outbox and dedup empty.", "",
          "| mode | load | executions | executions/s | batches/s | by callback | by re-fired callback | one ERROR mark | completed | batches run again | stale tokens refused | counted twice | finish lost | redeliveries skipped | drained after load | errors |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
          open(report + ".soak").read().rstrip(), open(report + ".soakl").read().rstrip(), "",
          "All invariants held (the test fails otherwise).")


def plots(delays, one, two):
    """The recoveries of the backlog over time, and the time-to-recover distribution."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for run, style in ((one, "-"), (two, "--")):
        t0 = run.samples[0][0]
        ts = [t - t0 for t, _, _ in run.samples]
        ax.plot(ts, [q for _, q, _ in run.samples], style, color="tab:blue",
                label=f"queued ({run.relays} relay{'s' if run.relays > 1 else ''})")
        ax.plot(ts, [d for _, _, d in run.samples], style, color="tab:green",
                label=f"recovered ({run.relays} relay{'s' if run.relays > 1 else ''})")
    ax.set(xlabel="seconds since the barriers were armed", ylabel="intents",
           title=f"A backlog of {S.backlog} executions stranded at once")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(PLOTS, "bench-backlog.png"))

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    xs = sorted(delays)
    ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], drawstyle="steps-post")
    for p in (0.5, 0.99):
        ax.axvline(percentile(delays, p), linestyle=":", color="grey")
        ax.annotate(f"p{int(p * 100)} {percentile(delays, p):.2f} s", (percentile(delays, p), p),
                    textcoords="offset points", xytext=(5, -12))
    ax.set(xlabel="seconds from stranded to ERROR mark at the API", ylabel="share of executions",
           title=f"Time to recover, {len(delays)} executions (naptime 1 s)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(PLOTS, "bench-latency.png"))
    plt.close("all")


def machine(b):
    cpu = next((line.split(":", 1)[1].strip() for line in
                subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                if line.startswith("Model name:")), "?")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**30
    pg = subprocess.run([f"{BIN}/postgres", "--version"], capture_output=True, text=True).stdout.strip()
    b.out("# pg_reaper benchmarks", "",
          f"Generated by `make bench` (`scripts/bench.py`) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Every ratio compares",
          "pg_reaper with a baseline measured in the same run, on the same throwaway cluster; absolute",
          "numbers on this shared 2-core machine are noisy and only indicative.", "",
          "## Machine and setup", "",
          f"- {os.cpu_count()} CPUs ({cpu}), {mem} GiB RAM, {os.uname().sysname} {os.uname().release}",
          f"- {pg}, pg_reaper {S.profile} build, relay {S.profile} build",
          "- cluster: shared_buffers 512MB, synchronous_commit off (so the CPU cost of the statements, not",
          f"  fsync, is what is compared), everything else default; pgbench {S.seconds} s per run, 4 clients, 2",
          f"  threads, `-M prepared`, {S.rounds} alternating rounds per side, median taken",
          "- reproduce: `make bench` (about 13 minutes once built; `BENCH_SECONDS=30 make bench` for longer runs)",
          "")


def timed(section, *args):
    """Runs one section and says how long it took (where a run's time goes)."""
    start = time.monotonic()
    result = section(*args)
    print(f"   {section.__name__} took {time.monotonic() - start:.0f} s", flush=True)
    return result


def main():
    b = Bench()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        b.start_cluster()
        b.psql("CREATE DATABASE bench", db="postgres")
        b.psql("CREATE EXTENSION pg_reaper")
        b.psql("CREATE DATABASE bench_portable", db="postgres")
        b.psql(open(PORTABLE_SQL).read(), db="bench_portable")
        timed(machine, b)
        decr_setup = timed(hot_path, b)
        timed(leases, b, decr_setup)
        timed(where_the_time_goes, b)
        timed(hot_updates, b, decr_setup)
        timed(reap_cost, b)
        key_file = os.path.join(b.data, "key")
        with open(key_file, "w") as f:
            f.write(KEY + "\n")
        b.api_proc = b.spawn([SAMPLE_API, "--listen", f"127.0.0.1:{API_PORT}", "--api-key-file", key_file])
        b.wait_for_port(API_PORT)
        many = timed(relay_drain, b)
        delays = timed(time_to_recover, b)
        timed(heal_latency, b)
        timed(idle_cost, b)
        one, two = timed(backlog_section, b, many)
        timed(edition_section, b)
        timed(soak, b)
        plots(delays, one, two)
        with open(S.report + ".tmp", "w") as f:
            f.write("\n".join(b.report) + "\n")
        os.replace(S.report + ".tmp", S.report)
        print(f"== report written to {S.report}, plots to {PLOTS}/bench-*.png")
    finally:
        b.cleanup()


if __name__ == "__main__":
    main()
