"""The queue row the reference platform's worker writes when a barrier completes and it fires the
aggregating callback on the PostgreSQL queue, for each callback descriptor and results given:
the steps of `_fire_barrier_callback` (workers/queue_backend/pg_barrier.py), `dispatch` and
`_enqueue_pg` (dispatch.py), `to_payload` (pg_queue/task_payload.py) and
`PgQueueClient._insert_message` with `insert_message_sql()` (pg_queue/client.py), at the
platform's commit 6b916eac0, with psycopg2 as the platform runs them. The package itself cannot
be imported here (it needs the whole platform), so each step is restated next to its source.

Reads a JSON list of [descriptor, results] on standard input; inserts each row in one
transaction, reads them back as stored, rolls back, and prints them as a JSON list.
"""

import json
import os
import sys

import psycopg2

DSN = os.environ["PLATFORM_DSN"]
SCHEMA = "unstract"
DEFAULT_PRIORITY = 5  # unstract.core.data_models.FAIRNESS_DEFAULT_PRIORITY
FAIRNESS_HEADER_NAME = "x-fairness-key"  # queue_backend.fairness
PG_TRANSPORT_CALLBACK_KWARG = "_pg_transport"  # queue_backend.pg_barrier
DEFAULT_PG_QUEUE = "default"  # queue_backend.dispatch._DEFAULT_PG_QUEUE

# client.insert_message_sql(), schema-qualified as `qualified()` does.
INSERT_MESSAGE_SQL = (
    f'INSERT INTO "{SCHEMA}".pg_queue_message '
    "(queue_name, message, org_id, priority, enqueued_at, vt, read_ct, state) "
    "VALUES (%s, %s::jsonb, %s, %s, now(), now(), 0, 'ready')"
)


def fairness_from_headers(fairness_headers):
    """pg_barrier._fairness_from_headers, then FairnessKey.to_dict()."""
    payload = (fairness_headers or {}).get(FAIRNESS_HEADER_NAME)
    if not payload:
        return None
    priority = payload.get("pipeline_priority", DEFAULT_PRIORITY)
    if not 1 <= priority <= 10:  # FairnessKey.__post_init__
        raise ValueError(f"pipeline_priority out of range [1, 10]: {priority}")
    if payload["workload_type"] not in ("api", "non_api"):  # WorkloadType(...)
        raise ValueError(f"{payload['workload_type']!r} is not a valid WorkloadType")
    return {
        "org_id": payload.get("org_id"),
        "workload_type": payload["workload_type"],
        "pipeline_priority": priority,
    }


def fire(cur, descriptor, results):
    # _fire_barrier_callback, the PG branch: the kwargs copied and tagged, the results the one
    # positional argument, the fairness rebuilt from the stored headers.
    pg_kwargs = {**descriptor["kwargs"], PG_TRANSPORT_CALLBACK_KWARG: True}
    fairness = fairness_from_headers(descriptor.get("fairness_headers"))
    queue = descriptor["queue"]
    # dispatch._enqueue_pg and task_payload.to_payload.
    pg_queue = queue or DEFAULT_PG_QUEUE
    payload = {
        "task_name": descriptor["task_name"],
        "args": [results],
        "kwargs": dict(pg_kwargs),
        "queue": queue,
        "fairness": fairness,
    }
    org_id = fairness["org_id"] if fairness is not None else None
    priority = fairness["pipeline_priority"] if fairness is not None else DEFAULT_PRIORITY
    # PgQueueClient._insert_message.
    cur.execute(
        INSERT_MESSAGE_SQL + " RETURNING msg_id",
        (pg_queue, json.dumps(payload), org_id if org_id is not None else "", priority),
    )
    return cur.fetchone()[0]


def main():
    cases = json.load(sys.stdin)
    conn = psycopg2.connect(DSN)
    rows = []
    with conn.cursor() as cur:
        for descriptor, results in cases:
            msg_id = fire(cur, descriptor, results)
            cur.execute(
                f'SELECT to_jsonb(m) - \'msg_id\' - \'enqueued_at\' - \'vt\' '
                f'|| jsonb_build_object(\'enqueued_at_is_vt\', m.enqueued_at = m.vt) '
                f'FROM "{SCHEMA}".pg_queue_message m WHERE msg_id = %s',
                (msg_id,),
            )
            rows.append(cur.fetchone()[0])
    conn.rollback()
    conn.close()
    json.dump(rows, sys.stdout)


if __name__ == "__main__":
    main()
