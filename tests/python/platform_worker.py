"""The reference platform's barrier flow, run through pg_reaper's functions the way a platform
worker runs it: psycopg2 (the driver and version the platform pins), one transaction per step, every connection through PgBouncer in
transaction pooling mode, against the platform's own (adopted) tables in schema `unstract`.

The steps are those of docs/unstract.md: enqueue arms the barrier with the callback
descriptor; each batch claims, works and decrements; the caller that sees `complete`
enqueues the callback onto the platform's queue and then calls barrier_finish; a failing
batch aborts keeping its markers so that its redelivery is skipped. Prints one JSON object
with what each scenario observed; the Rust test that starts the cluster and PgBouncer checks it.
"""

import json
import os
import sys
import threading

import psycopg2
from psycopg2.extras import Json

DSN = os.environ["PLATFORM_DSN"]


def connect():
    # Transaction pooling gives each transaction whichever server connection is free, so no
    # session state may be relied on: no server-side prepared statements (psycopg2 never
    # makes any), no SET search_path (every call below names its schema).
    return psycopg2.connect(DSN)


def one(conn, sql, args=()):
    """Runs one statement in a transaction of its own (committed as the platform commits each
    step); its first row."""
    with conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()


def enqueue(conn, execution_id, org, total, ttl_seconds, callback):
    return one(
        conn,
        "SELECT unstract.barrier_enqueue(%s, %s, %s, make_interval(secs => %s), %s)",
        (execution_id, org, total, ttl_seconds, Json(callback)),
    )[0]


def fire_callback(conn, callback, results):
    """What the platform does with a complete barrier: enqueue the aggregating callback."""
    message = {
        "task_name": callback["task_name"],
        "args": [results],
        "kwargs": {**callback["kwargs"], "_pg_transport": True},
    }
    one(
        conn,
        """INSERT INTO unstract.pg_queue_message
               (queue_name, message, org_id, enqueued_at, vt, read_ct, priority, state)
           VALUES (%s, %s, %s, now(), now(), 0, 5, 'ready')
           RETURNING msg_id""",
        (callback["queue"], Json(message), callback["kwargs"]["organization_id"]),
    )


def run_batch(execution_id, batch_index, work, callback):
    """run_batch_with_barrier: claim, work, decrement; the last batch fires the callback."""
    conn = connect()
    try:
        return batch(conn, execution_id, batch_index, work, callback)
    finally:
        conn.close()


def batch(conn, execution_id, batch_index, work, callback):
    first = one(conn, "SELECT unstract.barrier_claim(%s, %s)", (execution_id, batch_index))[0]
    if not first:
        return {"status": "skipped_redelivery"}
    try:
        result = work()
    except Exception:
        # The platform marks the execution ERROR through its API first; then it tears the
        # barrier down keeping the markers, so that a redelivery is skipped.
        status = one(
            conn, "SELECT unstract.barrier_abort(%s, preserve_dedup => true)", (execution_id,)
        )[0]
        return {"status": status}
    status, remaining, results = one(
        conn,
        "SELECT status, remaining, results FROM unstract.barrier_decrement(%s, %s)",
        (execution_id, Json(result)),
    )
    if status == "complete":
        fire_callback(conn, callback, results)
        # Only after the callback is safely enqueued: a crash before this line leaves
        # the barrier for pg_reaper, which re-fires or marks the execution.
        one(conn, "SELECT unstract.barrier_finish(%s)", (execution_id,))
    return {"status": status, "remaining": remaining}


def descriptor(execution_id):
    return {
        "task_name": "process_batch_callback",
        "kwargs": {"execution_id": execution_id, "pipeline_id": "p-1", "organization_id": "org-a"},
        "queue": "callback",
        "fairness_headers": None,
        "transport": "pg_queue",
    }


def main():
    out = {}
    conn = connect()
    try:
        # 1. Four batches, one of them redelivered: the last decrement fires the callback.
        cb = descriptor("exec-fanout")
        enqueue(conn, "exec-fanout", "org-a", 4, 21600, cb)
        seen = [run_batch("exec-fanout", i, lambda i=i: {"file": i}, cb) for i in range(3)]
        seen.append(run_batch("exec-fanout", 2, lambda: {"file": "again"}, cb))
        seen.append(run_batch("exec-fanout", 3, lambda: {"file": 3}, cb))
        out["fanout"] = [s["status"] for s in seen]

        # 2. A failing batch aborts, keeping its marker; its redelivery is skipped.
        cb = descriptor("exec-failing")
        enqueue(conn, "exec-failing", "org-a", 2, 21600, cb)

        def boom():
            raise RuntimeError("the file could not be processed")

        out["failing"] = [
            run_batch("exec-failing", 0, boom, cb)["status"],
            run_batch("exec-failing", 0, lambda: {"file": 0}, cb)["status"],
        ]

        # 3. Eight batches on eight threads (more than PgBouncer's pool): one completes.
        cb = descriptor("exec-parallel")
        enqueue(conn, "exec-parallel", "org-a", 8, 21600, cb)
        statuses = []
        lock = threading.Lock()

        def worker(i):
            s = run_batch("exec-parallel", i, lambda: {"file": i}, cb)["status"]
            with lock:
                statuses.append(s)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out["parallel"] = sorted(statuses)

        # 4. A worker that dies between its final decrement and the callback: the barrier
        #    stays at remaining 0 for pg_reaper.
        cb = descriptor("exec-crashed")
        enqueue(conn, "exec-crashed", "org-a", 1, 21600, cb)
        one(conn, "SELECT unstract.barrier_claim('exec-crashed', 0)")
        out["crashed"] = one(
            conn, "SELECT status FROM unstract.barrier_decrement('exec-crashed', '{\"file\": 0}')"
        )[0]

        out["callbacks"] = one(
            conn,
            """SELECT coalesce(jsonb_agg(message ORDER BY msg_id), '[]')
                 FROM unstract.pg_queue_message""",
        )[0]
    finally:
        conn.close()
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
