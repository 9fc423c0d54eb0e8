//! Installing into the reference platform's queue database, whose own migration already created
//! pg_barrier_state and pg_batch_dedup (and whose workers keep writing them with their own SQL):
//! the tables are adopted with their rows, both dialects work on the same executions, the relay
//! recovers what the platform's workers stranded, DROP EXTENSION leaves the tables, and a table
//! that cannot be adopted fails CREATE EXTENSION without changing anything.

mod common;

use common::{Env, intent};
use pg_reaper_tests::{Cluster, Edition, PgBouncer, UNSTRACT_SCHEMA, json, wait_for};
use postgres::Client;
use serde_json::{Value, json};

// The platform's own statements (workers/queue_backend/pg_barrier.py), verbatim but for the
// parameter style.
const PLATFORM_ENQUEUE: &str = "
    INSERT INTO unstract.pg_barrier_state (execution_id, organization_id, remaining, results,
                                           created_at, expires_at, last_progress_at)
    VALUES ($1, $2, $3, '[]'::jsonb, now(), now() + make_interval(secs => $4), now())
    ON CONFLICT (execution_id) DO UPDATE SET organization_id = EXCLUDED.organization_id,
        remaining = EXCLUDED.remaining, results = '[]'::jsonb, created_at = now(),
        expires_at = EXCLUDED.expires_at, last_progress_at = now()";
const PLATFORM_CLEAR_MARKERS: &str = "DELETE FROM unstract.pg_batch_dedup WHERE execution_id = $1";
const PLATFORM_CLAIM: &str = "
    INSERT INTO unstract.pg_batch_dedup (execution_id, batch_index, created_at)
    VALUES ($1, $2, now()) ON CONFLICT (execution_id, batch_index) DO NOTHING
    RETURNING execution_id";
const PLATFORM_DECREMENT: &str = "
    UPDATE unstract.pg_barrier_state SET remaining = remaining - 1,
        results = results || jsonb_build_array($1::jsonb), last_progress_at = now()
    WHERE execution_id = $2 RETURNING remaining, results";
const PLATFORM_FINISH: &str = "DELETE FROM unstract.pg_barrier_state WHERE execution_id = $1";
const PLATFORM_ABORT: &str = "
    WITH claimed AS (DELETE FROM unstract.pg_barrier_state WHERE execution_id = $1
                     RETURNING execution_id) SELECT execution_id FROM claimed";

fn platform_enqueue(c: &mut Client, id: &str, org: &str, total: i32) {
    let mut tx = c.transaction().expect("begin");
    tx.execute(PLATFORM_ENQUEUE, &[&id, &org, &total, &3600f64])
        .expect("platform enqueue");
    tx.execute(PLATFORM_CLEAR_MARKERS, &[&id])
        .expect("platform clears markers");
    tx.commit().expect("commit");
}

fn platform_claim(c: &mut Client, id: &str, batch: i32) -> bool {
    !c.query(PLATFORM_CLAIM, &[&id, &batch])
        .expect("platform claim")
        .is_empty()
}

fn platform_decrement(c: &mut Client, id: &str, result: Value) -> (i32, Value) {
    let row = c
        .query_one(PLATFORM_DECREMENT, &[&result, &id])
        .expect("platform decrement");
    (row.get(0), row.get(1))
}

fn platform_finish(c: &mut Client, id: &str) {
    let mut tx = c.transaction().expect("begin");
    tx.execute(PLATFORM_FINISH, &[&id]).expect("finish barrier");
    tx.execute(PLATFORM_CLEAR_MARKERS, &[&id])
        .expect("finish markers");
    tx.commit().expect("commit");
}

/// A database `q` holding the platform's schema, with the extension not yet created.
fn platform_db(cluster: &Cluster) -> Client {
    cluster
        .client("postgres")
        .batch_execute("CREATE DATABASE q")
        .expect("create database");
    let mut c = cluster.client("q");
    c.batch_execute(UNSTRACT_SCHEMA)
        .expect("the platform's schema");
    c
}

/// pg_reaper installed over the platform's tables in schema `unstract` (CREATE EXTENSION, or the
/// extension-free edition's file), first on the search_path.
fn adopt(c: &mut Client) {
    pg_reaper_tests::install(c, "unstract");
    c.batch_execute(
        "ALTER DATABASE q SET search_path = unstract, public; SET search_path = unstract, public",
    )
    .expect("search_path");
}

fn rows(c: &mut Client, table: &str) -> Value {
    json(
        c,
        &format!(
            "SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY to_jsonb(t)::text), '[]') FROM unstract.{table} t"
        ),
    )
}

/// The tables of the extension (its members) in this database.
fn member_tables(c: &mut Client) -> Vec<String> {
    c.query(
        "SELECT c.relnamespace::regnamespace::text || '.' || c.relname FROM pg_depend d
           JOIN pg_class c ON c.oid = d.objid
          WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
            AND d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_reaper')
            AND d.classid = 'pg_class'::regclass
            AND c.relkind = 'r'
          ORDER BY 1",
        &[],
    )
    .expect("members")
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[test]
fn adoption_keeps_the_platforms_rows_and_both_dialects_share_every_execution() {
    let cluster = Cluster::start("adopt", &[]);
    let mut c = platform_db(&cluster);
    // Live rows written by the platform before pg_reaper exists.
    platform_enqueue(&mut c, "p-live", "org-a", 3);
    assert!(platform_claim(&mut c, "p-live", 0));
    assert_eq!(
        platform_decrement(&mut c, "p-live", json!({"file": 0})).0,
        2
    );
    let barriers_before = rows(&mut c, "pg_barrier_state");
    let markers_before = rows(&mut c, "pg_batch_dedup");

    adopt(&mut c);

    // Rows kept (the barrier gained its NULL callback, refired_at, callback_due_at and cut_from,
    // the marker its NULL lease columns), nothing the platform owns became the extension's, and
    // the pieces the functions rely on are there.
    let with_nulls = |rows: &Value, columns: &[&str]| {
        let mut rows = rows.clone();
        for r in rows.as_array_mut().expect("rows") {
            for c in columns {
                r[*c] = Value::Null;
            }
        }
        rows
    };
    assert_eq!(
        rows(&mut c, "pg_barrier_state"),
        with_nulls(
            &barriers_before,
            &["callback", "refired_at", "callback_due_at", "cut_from"]
        )
    );
    assert_eq!(
        rows(&mut c, "pg_batch_dedup"),
        with_nulls(&markers_before, &["lease_token", "lease_expires_at"])
    );
    let members: &[&str] = match pg_reaper_tests::edition() {
        Edition::Native => &["unstract.pg_reaper_outbox", "unstract.pg_reaper_settings"],
        Edition::Portable => &[], // no extension: nothing is anyone's member
    };
    assert_eq!(member_tables(&mut c), members);
    let shape = json(
        &mut c,
        "SELECT jsonb_build_object(
             'options', (SELECT reloptions FROM pg_class WHERE oid = 'unstract.pg_barrier_state'::regclass),
             'indexes', (SELECT jsonb_agg(c.relname ORDER BY c.relname) FROM pg_index x
                           JOIN pg_class c ON c.oid = x.indexrelid WHERE x.indrelid IN ('unstract.pg_barrier_state'::regclass, 'unstract.pg_batch_dedup'::regclass)))",
    );
    assert_eq!(
        shape,
        json!({"options": ["fillfactor=70"], "indexes": [
            "pg_barrier_callback_due_idx", "pg_barrier_created_key_idx", "pg_barrier_expires_idx",
            "pg_barrier_expires_key_idx", "pg_barrier_state_execution_id_03fb89ea_like",
            "pg_barrier_state_pkey", "pg_batch_dedup_created_idx", "pg_batch_dedup_exec_batch_uniq",
            "pg_batch_dedup_lease_idx", "pg_batch_dedup_pkey"]})
    );

    // The live platform barrier finishes through the functions.
    let claim = |c: &mut Client, id: &str, b: i32| -> bool {
        c.query_one("SELECT barrier_claim($1, $2)", &[&id, &b])
            .expect("barrier_claim")
            .get(0)
    };
    let decrement = |c: &mut Client, id: &str, r: Value| -> Value {
        json(
            c,
            &format!(
                "SELECT to_jsonb(barrier_decrement('{id}', '{}'::jsonb))",
                r.to_string().replace('\'', "''")
            ),
        )
    };
    assert!(!claim(&mut c, "p-live", 0), "the platform's marker is seen");
    assert!(claim(&mut c, "p-live", 1));
    assert_eq!(
        decrement(&mut c, "p-live", json!({"file": 1})),
        json!({"status": "pending", "remaining": 1, "results": null})
    );
    assert!(platform_claim(&mut c, "p-live", 2));
    let (left, results) = platform_decrement(&mut c, "p-live", json!({"file": 2}));
    assert_eq!(
        (left, results),
        (0, json!([{"file": 0}, {"file": 1}, {"file": 2}]))
    );
    let finished: bool = c
        .query_one("SELECT barrier_finish('p-live')", &[])
        .expect("finish")
        .get(0);
    assert!(finished);
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(count(*)) FROM pg_batch_dedup WHERE execution_id = 'p-live'"
        ),
        json!(0)
    );

    // Armed by the function (with a callback), counted down by both, torn down by the platform.
    c.batch_execute(
        "SELECT barrier_enqueue('f-armed', 'org-a', 2, '1 hour', '{\"task\": \"aggregate\"}')",
    )
    .expect("barrier_enqueue");
    assert!(platform_claim(&mut c, "f-armed", 0));
    assert!(!claim(&mut c, "f-armed", 0), "the platform's claim is seen");
    assert_eq!(platform_decrement(&mut c, "f-armed", json!("a")).0, 1);
    assert_eq!(
        decrement(&mut c, "f-armed", json!("b")),
        json!({"status": "complete", "remaining": 0, "results": ["a", "b"]})
    );
    platform_finish(&mut c, "f-armed");
    let finished: bool = c
        .query_one("SELECT barrier_finish('f-armed')", &[])
        .expect("finish")
        .get(0);
    assert!(!finished, "the platform tore it down first");

    // Aborts across dialects: exactly one winner each time.
    platform_enqueue(&mut c, "p-abort", "org-a", 2);
    assert_eq!(
        json(&mut c, "SELECT to_jsonb(barrier_abort('p-abort'))"),
        json!("aborted")
    );
    assert!(
        c.query(PLATFORM_ABORT, &[&"p-abort"])
            .expect("abort")
            .is_empty()
    );
    c.batch_execute("SELECT barrier_enqueue('f-abort', 'org-a', 2)")
        .expect("enqueue");
    assert_eq!(
        c.query(PLATFORM_ABORT, &[&"f-abort"]).expect("abort").len(),
        1
    );
    assert_eq!(
        json(&mut c, "SELECT to_jsonb(barrier_abort('f-abort'))"),
        json!("already_aborted")
    );

    // A platform re-arm of a function-armed barrier resets it (its callback stays: the
    // platform's statement does not know the column).
    c.batch_execute("SELECT barrier_enqueue('rearm', 'org-a', 5, '1 hour', '{\"task\": \"t\"}')")
        .expect("enqueue");
    platform_enqueue(&mut c, "rearm", "org-b", 2);
    assert_eq!(
        json(
            &mut c,
            "SELECT jsonb_build_object('org', organization_id, 'remaining', remaining, 'callback', callback)
               FROM pg_barrier_state WHERE execution_id = 'rearm'"
        ),
        json!({"org": "org-b", "remaining": 2, "callback": {"task": "t"}})
    );

    let barriers = rows(&mut c, "pg_barrier_state");
    match pg_reaper_tests::edition() {
        // DROP EXTENSION leaves the platform's tables and rows; its SQL keeps working; a second
        // CREATE EXTENSION adopts them again.
        Edition::Native => {
            c.batch_execute("DROP EXTENSION pg_reaper").expect("drop");
            assert_eq!(rows(&mut c, "pg_barrier_state"), barriers);
            platform_enqueue(&mut c, "after-drop", "org-a", 1);
            assert!(platform_claim(&mut c, "after-drop", 0));
            assert_eq!(platform_decrement(&mut c, "after-drop", json!(1)).0, 0);
            platform_finish(&mut c, "after-drop");
            c.batch_execute("CREATE EXTENSION pg_reaper SCHEMA unstract")
                .expect("adopt again");
        }
        // The edition's file run again (a newer version's, say) adopts them again.
        Edition::Portable => pg_reaper_tests::install(&mut c, "unstract"),
    }
    assert_eq!(rows(&mut c, "pg_barrier_state"), barriers);
    let members: &[&str] = match pg_reaper_tests::edition() {
        Edition::Native => &["unstract.pg_reaper_outbox", "unstract.pg_reaper_settings"],
        Edition::Portable => &[], // no extension: nothing is anyone's member
    };
    assert_eq!(member_tables(&mut c), members);
}

#[test]
fn the_worker_and_relay_recover_what_the_platforms_workers_stranded() {
    let env = Env::adopting("adoptrelay");
    let mut c = env.db();
    // A crash mid-batch, and a crash after the last decrement (the callback never enqueued),
    // both in the platform's own SQL.
    for id in ["crashed-mid-batch", "lost-callback"] {
        env.api.execution(id, "org-a", "EXECUTING");
        platform_enqueue(&mut c, id, "org-a", 2);
    }
    assert!(platform_claim(&mut c, "crashed-mid-batch", 0));
    platform_decrement(&mut c, "crashed-mid-batch", json!(0));
    for b in 0..2 {
        assert!(platform_claim(&mut c, "lost-callback", b));
        platform_decrement(&mut c, "lost-callback", json!(b));
    }
    // And a barrier that is still making progress.
    platform_enqueue(&mut c, "healthy", "org-a", 2);
    c.batch_execute(
        "UPDATE unstract.pg_barrier_state SET created_at = now() - interval '2 hours',
                expires_at = now() - interval '1 second'
          WHERE execution_id IN ('crashed-mid-batch', 'lost-callback')",
    )
    .expect("strand them");

    let mut relay = env.spawn_relay(&[]);
    for id in ["crashed-mid-batch", "lost-callback"] {
        wait_for(90, &format!("{id} recovered"), || {
            c.query_opt(
                "SELECT 1 FROM pg_reaper_outbox WHERE execution_id = $1 AND state = 'done'",
                &[&id],
            )
            .expect("intent")
        });
        assert_eq!(intent(&mut c, id)["outcome"], json!("marked_error"));
        assert_eq!(intent(&mut c, id)["barrier"], json!(false));
        assert_eq!(intent(&mut c, id)["markers"], json!(0));
    }
    let executions = env.api.executions();
    for id in ["crashed-mid-batch", "lost-callback"] {
        assert_eq!(executions[id]["status"], json!("ERROR"), "{executions}");
    }
    let marks = env
        .api
        .calls()
        .iter()
        .filter(|c| c["method"] == json!("POST"))
        .count();
    assert_eq!(marks, 2, "one mark each");
    assert_eq!(
        json(
            &mut c,
            "SELECT jsonb_agg(execution_id) FROM unstract.pg_barrier_state"
        ),
        json!(["healthy"])
    );
    relay.terminate();
}

// The platform's orphan-claim predicate (workers/queue_backend/pg_queue/reaper.py,
// `_orphan_claim_where`), verbatim but for the parameter style: its sweep marks a non-terminal
// execution ERROR when its orchestration claim is older than the stuck timeout and it has no
// barrier row.
const PLATFORM_ORPHAN_CLAIMS: &str = "
    SELECT coalesce(jsonb_agg(c.execution_id ORDER BY c.execution_id), '[]')
      FROM unstract.pg_orchestration_claim AS c
     WHERE c.claimed_at < now() - make_interval(secs => $1)
       AND NOT EXISTS (SELECT 1 FROM unstract.pg_barrier_state b
                        WHERE b.execution_id = c.execution_id)";

fn platform_orphans(c: &mut Client) -> Value {
    c.query_one(PLATFORM_ORPHAN_CLAIMS, &[&9000f64])
        .expect("the platform's orphan predicate")
        .get(0)
}

/// A re-fired execution keeps its barrier as the handle the platform's orphan-claim sweep looks
/// for, so the sweep leaves it alone while the re-fired callback runs; a status read after the
/// stuck timeout finds it terminal and removes the barrier, and nothing is ever marked.
#[test]
fn a_refired_execution_is_left_alone_by_the_platforms_orphan_claim_sweep() {
    let env = Env::adopting("adoptrefire");
    let mut c = env.db();
    c.batch_execute(
        "CREATE TABLE public.refired (execution_id text, callback jsonb, results jsonb);
         CREATE FUNCTION public.refire(e text, o text, cb jsonb, r jsonb) RETURNS void
         LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
         AS $$ INSERT INTO public.refired VALUES (e, cb, r) $$;
         INSERT INTO unstract.pg_orchestration_claim (execution_id, claimed_at, organization_id)
         VALUES ('lost-callback', now() - interval '3 hours', 'org-a'),
                ('never-armed', now() - interval '3 hours', 'org-a');",
    )
    .expect("the hook and the platform's orchestration claims");
    env.alter_database("pg_reaper.refire_function = 'public.refire'");
    let mut c = env.db();
    for id in ["lost-callback", "never-armed"] {
        env.api.execution(id, "org-a", "EXECUTING");
    }
    // Every batch done, then the worker died before enqueueing the callback.
    c.execute(
        "SELECT barrier_enqueue('lost-callback', 'org-a', 2, '1 hour',
                                '{\"task_name\": \"aggregate\", \"transport\": \"pg_queue\"}')",
        &[],
    )
    .expect("enqueue");
    for b in 0..2 {
        c.execute(
            "SELECT barrier_claim('lost-callback', $1), barrier_decrement('lost-callback', to_jsonb($1))",
            &[&b],
        )
        .expect("a batch");
    }
    pg_reaper_tests::expire(&mut c, "lost-callback");
    // The control: a claim whose barrier was never armed is the sweep's to mark.
    assert_eq!(platform_orphans(&mut c), json!(["never-armed"]));

    env.reap(&mut c);
    env.relay_once(&[]);
    assert_eq!(
        (
            &intent(&mut c, "lost-callback")["outcome"],
            &intent(&mut c, "lost-callback")["barrier"]
        ),
        (&json!("refired"), &json!(true))
    );
    assert_eq!(
        json(
            &mut c,
            "SELECT jsonb_agg(to_jsonb(r)) FROM public.refired r"
        ),
        json!([{"execution_id": "lost-callback", "results": [0, 1],
                "callback": {"task_name": "aggregate", "transport": "pg_queue"}}])
    );
    assert_eq!(
        platform_orphans(&mut c),
        json!(["never-armed"]),
        "the platform's sweep does not see the re-fired execution as an orphan"
    );
    // Ticks in between queue nothing: the re-fired barrier is not stranded.
    assert_eq!(env.reap(&mut c), 0);

    // The re-fired callback completes the execution; after the stuck timeout a status read
    // finds it terminal and the barrier goes. Only then is the claim the sweep's, to GC.
    env.api.execution("lost-callback", "org-a", "COMPLETED");
    c.batch_execute(
        "UPDATE unstract.pg_barrier_state SET expires_at = now() - interval '1 second'
          WHERE execution_id = 'lost-callback'",
    )
    .expect("the stuck timeout passed since the re-fire");
    env.reap(&mut c);
    env.relay_once(&[]);
    let done = intent(&mut c, "lost-callback");
    assert_eq!(
        (&done["outcome"], &done["barrier"], &done["markers"]),
        (&json!("already_terminal"), &json!(false), &json!(0))
    );
    assert_eq!(
        platform_orphans(&mut c),
        json!(["lost-callback", "never-armed"])
    );
    let executions = env.api.executions();
    assert_eq!(
        (
            &executions["lost-callback"]["status"],
            &executions["lost-callback"]["error_marks"]
        ),
        (&json!("COMPLETED"), &json!(0))
    );
    assert_eq!(
        json(&mut c, "SELECT to_jsonb(count(*)) FROM public.refired"),
        json!(1),
        "re-fired once"
    );
}

/// The Python interpreter with psycopg2 that scripts/setup.sh prepares.
fn python() -> std::path::PathBuf {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var("PG_REAPER_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join("target/python/bin/python"));
    assert!(
        python.exists(),
        "{} is missing: scripts/setup.sh installs psycopg2 there",
        python.display()
    );
    python
}

/// The hook shipped for the platform's queue re-fires a lost PG-transport callback by writing
/// the queue row the platform's worker writes for it (compared field by field with the row its
/// client code writes through psycopg2), and declines what the platform could not fire, which
/// is then marked ERROR.
#[test]
fn the_platforms_queue_hook_enqueues_the_row_its_worker_would_and_declines_the_rest() {
    let env = Env::adopting("adopthook");
    let mut c = env.db();
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let hook = std::fs::read_to_string(root.join("integrations/unstract/refire.sql"))
        .expect("integrations/unstract/refire.sql");
    c.batch_execute(&format!("SET search_path = unstract; {hook}"))
        .expect("install the hook");
    env.alter_database("pg_reaper.refire_function = 'unstract.pg_reaper_unstract_refire'");
    let mut c = env.db();
    let descriptor = |id: &str, queue: &str, fairness: Value, transport: Option<&str>| {
        let mut d = json!({
            "task_name": "process_batch_callback",
            "kwargs": {"execution_id": id, "organization_id": "org-a", "pipeline_id": "p-1"},
            "queue": queue,
            "fairness_headers": fairness,
        });
        if let Some(t) = transport {
            d["transport"] = json!(t);
        }
        d
    };
    let key = |org: Value, workload: &str, priority: Option<i32>| {
        let mut k = json!({"org_id": org, "workload_type": workload});
        if let Some(p) = priority {
            k["pipeline_priority"] = json!(p);
        }
        json!({"x-fairness-key": k})
    };
    let mut stale_tag = descriptor("stale-tag", "", Value::Null, Some("pg_queue"));
    stale_tag["kwargs"]["_pg_transport"] = json!(false);
    let refired = [
        (
            "fair",
            descriptor(
                "fair",
                "file_processing_callback",
                key(json!("org-a"), "api", Some(9)),
                Some("pg_queue"),
            ),
        ),
        (
            "plain",
            descriptor("plain", "callback", Value::Null, Some("pg_queue")),
        ),
        (
            "no-org",
            descriptor(
                "no-org",
                "callback",
                key(Value::Null, "non_api", None),
                Some("pg_queue"),
            ),
        ),
        ("stale-tag", stale_tag),
    ];
    let declined = [
        (
            "celery",
            descriptor("celery", "callback", Value::Null, None),
        ),
        (
            "bad-priority",
            descriptor(
                "bad-priority",
                "callback",
                key(json!("org-a"), "api", Some(11)),
                Some("pg_queue"),
            ),
        ),
    ];
    for (id, d) in refired.iter().chain(declined.iter()) {
        env.api.execution(id, "org-a", "EXECUTING");
        c.execute(
            "SELECT barrier_enqueue($1, 'org-a', 2, '1 hour', $2)",
            &[id, d],
        )
        .expect("enqueue with the platform's descriptor");
        for b in 0..2 {
            c.execute(
                "SELECT barrier_claim($1, $2), barrier_decrement($1, jsonb_build_object('file', $2))",
                &[id, &b],
            )
            .expect("a batch");
        }
        pg_reaper_tests::expire(&mut c, id);
    }
    env.reap(&mut c);
    env.relay_once(&[]);

    for (id, _) in &refired {
        assert_eq!(intent(&mut c, id)["outcome"], json!("refired"), "{id}");
    }
    let executions = env.api.executions();
    for (id, _) in &declined {
        assert_eq!(intent(&mut c, id)["outcome"], json!("marked_error"), "{id}");
        assert_eq!(executions[*id]["error_marks"], json!(1), "{id}");
    }

    // What the hook wrote, against what the platform's client writes for the same callbacks.
    let written = json(
        &mut c,
        "SELECT jsonb_agg(to_jsonb(m) - 'msg_id' - 'enqueued_at' - 'vt'
                          || jsonb_build_object('enqueued_at_is_vt', m.enqueued_at = m.vt)
                          ORDER BY m.message #>> '{kwargs,execution_id}')
           FROM unstract.pg_queue_message m",
    );
    let mut sorted = refired.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let input: Vec<Value> = sorted
        .iter()
        .map(|(_, d)| json!([d, [{"file": 0}, {"file": 1}]]))
        .collect();
    let mut child = std::process::Command::new(python())
        .arg(root.join("tests/python/platform_callback_row.py"))
        .env("PLATFORM_DSN", env.cluster.url(&env.db))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the platform's client steps");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin
            .write_all(Value::Array(input).to_string().as_bytes())
            .expect("write the cases");
    }
    let out = child.wait_with_output().expect("the client's rows");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let client: Value = serde_json::from_slice(&out.stdout).expect("JSON rows");
    assert_eq!(
        written, client,
        "the hook's rows (left), the client's (right)"
    );
    assert_eq!(
        written[0]["priority"],
        json!(9),
        "the producer's priority: {written}"
    );
}

/// A later migration of the platform's (Django adds a NOT NULL column with a default, then drops
/// the default) breaks the functions' INSERTs: the worker (or the tick) names the change in a
/// WARNING, the status view and barrier_explain show it, the relay logs it and exports it, and
/// the failing call names the column; once fixed, all of them clear.
#[test]
fn a_platform_migration_that_breaks_the_tables_is_reported_at_run_time() {
    let env = Env::adopting("adoptdrift");
    let mut c = env.db();
    let mut relay = env.spawn_relay(&[]);
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(tables_drift) FROM pg_reaper_status"
        ),
        Value::Null
    );
    // Django's AddField(models.CharField(default="eu")) on PostgreSQL.
    c.batch_execute(
        "BEGIN;
         ALTER TABLE unstract.pg_barrier_state ADD COLUMN region varchar(16) DEFAULT 'eu' NOT NULL;
         ALTER TABLE unstract.pg_barrier_state ALTER COLUMN region DROP DEFAULT;
         COMMIT;",
    )
    .expect("the platform's migration");
    let drift = "unstract.pg_barrier_state: column \"region\" is NOT NULL without a default, and pg_reaper's functions do not fill it";
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(tables_drift) FROM pg_reaper_status"
        ),
        json!(drift)
    );
    assert_eq!(
        json(&mut c, "SELECT barrier_explain('any')->'tables_drift'"),
        json!(drift)
    );
    // On a timeout, the lines last seen say what happened instead.
    let seen = |log: String, word: &str, line: &str| {
        if log.contains(line) {
            Ok(())
        } else {
            Err(log
                .lines()
                .filter(|l| l.contains(word))
                .collect::<Vec<_>>()
                .join("\n"))
        }
    };
    wait_for(60, "the WARNING naming the change", || {
        seen(
            env.cluster.log(),
            "pg_reaper",
            &format!("WARNING:  pg_reaper: the barrier tables changed under pg_reaper: {drift}"),
        )
    });
    // The relay's own line, from its status poll: over the extension-free edition its log also
    // carries the WARNING of the tick it ran, which says the same in other words.
    wait_for(60, "the relay's ERROR naming it", || {
        seen(
            relay.log(),
            "",
            "ERROR pg_reaper_relay::drain: the barrier tables changed under pg_reaper: barrier_enqueue",
        )
    });
    let err = c
        .execute("SELECT barrier_enqueue('after-migration', 'org-a', 2)", &[])
        .expect_err("the INSERT cannot fill the new column");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(
        (db.code().code(), db.column()),
        ("23502", Some("region")),
        "{db:?}"
    );

    // Fixed with a default: usable again, and said so.
    c.batch_execute("ALTER TABLE unstract.pg_barrier_state ALTER COLUMN region SET DEFAULT 'eu'")
        .expect("fix");
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(tables_drift) FROM pg_reaper_status"
        ),
        Value::Null
    );
    c.execute("SELECT barrier_enqueue('after-fix', 'org-a', 2)", &[])
        .expect("enqueue again");
    wait_for(60, "the relay's line that it is fixed", || {
        seen(relay.log(), "", "the barrier tables are usable again")
    });
    // Written to a file, not a terminal: plain lines, no colour codes for a log reader to strip.
    assert!(!relay.log().contains('\x1b'), "{}", relay.log());
    relay.terminate();
}

/// Tables the platform could have but pg_reaper cannot work with, and the error each gets.
#[test]
fn a_table_that_cannot_be_adopted_fails_create_extension_and_changes_nothing() {
    let cluster = Cluster::start("adoptbad", &[]);
    let cases: &[(&str, &str, &str)] = &[
        (
            "ALTER TABLE unstract.pg_barrier_state ALTER COLUMN remaining TYPE bigint",
            "pg_reaper cannot adopt unstract.pg_barrier_state: column \"remaining\" is bigint, expected integer",
            "42804",
        ),
        (
            "ALTER TABLE unstract.pg_barrier_state DROP COLUMN last_progress_at",
            "pg_reaper cannot adopt unstract.pg_barrier_state: it has no column \"last_progress_at\" (timestamp with time zone)",
            "42703",
        ),
        (
            "ALTER TABLE unstract.pg_barrier_state ADD COLUMN callback text",
            "pg_reaper cannot adopt unstract.pg_barrier_state: column \"callback\" is text, expected jsonb",
            "42804",
        ),
        (
            "ALTER TABLE unstract.pg_barrier_state ADD COLUMN tenant text NOT NULL",
            "pg_reaper cannot adopt unstract.pg_barrier_state: column \"tenant\" is NOT NULL without a default, and pg_reaper's functions do not fill it",
            "23502",
        ),
        (
            "ALTER TABLE unstract.pg_batch_dedup DROP CONSTRAINT pg_batch_dedup_exec_batch_uniq",
            "pg_reaper cannot adopt unstract.pg_batch_dedup: it has no unique index or constraint on exactly (execution_id,batch_index)",
            "42P16",
        ),
        (
            "ALTER TABLE unstract.pg_barrier_state DROP CONSTRAINT pg_barrier_state_pkey",
            "pg_reaper cannot adopt unstract.pg_barrier_state: it has no unique index or constraint on exactly (execution_id)",
            "42P16",
        ),
        (
            "DROP TABLE unstract.pg_barrier_state;
             CREATE VIEW unstract.pg_barrier_state AS SELECT 'x'::text AS execution_id",
            "pg_reaper cannot adopt unstract.pg_barrier_state: it is not an ordinary table (relkind v)",
            "42809",
        ),
    ];
    // Everything a failed CREATE EXTENSION could have changed.
    const FOOTPRINT: &str = "
        SELECT jsonb_build_object(
            'extension', (SELECT count(*) FROM pg_extension WHERE extname = 'pg_reaper'),
            'relations', (SELECT jsonb_agg(c.relname || ':' || coalesce(c.reloptions::text, '') ORDER BY c.relname)
                            FROM pg_class c WHERE c.relnamespace = 'unstract'::regnamespace),
            'columns', (SELECT jsonb_agg(a.attrelid::regclass::text || '.' || a.attname ORDER BY a.attrelid, a.attnum)
                          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
                         WHERE c.relnamespace = 'unstract'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped),
            'rows', (SELECT count(*) FROM unstract.pg_batch_dedup))";
    for (n, (change, message, code)) in cases.iter().enumerate() {
        let db = format!("bad{n}");
        cluster
            .client("postgres")
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .expect("create database");
        let mut c = cluster.client(&db);
        c.batch_execute(UNSTRACT_SCHEMA).expect("schema");
        c.batch_execute(
            "INSERT INTO unstract.pg_batch_dedup (execution_id, batch_index, created_at)
             VALUES ('e', 0, now())",
        )
        .expect("a row");
        c.batch_execute(change).expect(change);
        let before = json(&mut c, FOOTPRINT);
        let err = pg_reaper_tests::try_install(&mut c, "unstract").expect_err(change);
        let db_err = err.as_db_error().expect("a database error");
        assert_eq!(
            (db_err.message(), db_err.code().code()),
            (*message, *code),
            "{change}"
        );
        assert_eq!(json(&mut c, FOOTPRINT), before, "{change}: nothing changed");
    }
}

/// The platform's worker flow of docs/unstract.md, run by a real Python client (psycopg2 2.9.9,
/// the driver and version the platform's workers pin) through PgBouncer in transaction pooling mode, which is how
/// those workers connect, against the adopted tables.
#[test]
fn the_platforms_worker_flow_runs_through_pgbouncer_with_psycopg2() {
    let cluster = Cluster::start("adoptpy", &[]);
    let mut c = platform_db(&cluster);
    adopt(&mut c);
    let bouncer = PgBouncer::start(&cluster, "q", "transaction", 4);
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(python())
        .arg(root.join("tests/python/platform_worker.py"))
        .env("PLATFORM_DSN", bouncer.url("q"))
        .output()
        .expect("run the Python platform worker");
    assert!(
        out.status.success(),
        "platform_worker.py failed:\n{}\nPgBouncer log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        bouncer.log()
    );
    let seen: Value = serde_json::from_slice(&out.stdout).expect("its JSON report");

    assert_eq!(
        seen["fanout"],
        json!([
            "pending",
            "pending",
            "pending",
            "skipped_redelivery",
            "complete"
        ])
    );
    assert_eq!(seen["failing"], json!(["aborted", "skipped_redelivery"]));
    let mut parallel = vec!["pending"; 7];
    parallel.insert(0, "complete");
    assert_eq!(seen["parallel"], json!(parallel));
    assert_eq!(seen["crashed"], json!("complete"));
    let callbacks = seen["callbacks"].as_array().expect("callbacks");
    assert_eq!(
        callbacks.len(),
        2,
        "one callback per completed execution: {callbacks:?}"
    );
    assert_eq!(
        callbacks[0]["args"],
        json!([[{"file": 0}, {"file": 1}, {"file": 2}, {"file": 3}]])
    );
    assert_eq!(callbacks[0]["kwargs"]["_pg_transport"], json!(true));
    assert_eq!(
        callbacks[1]["kwargs"]["execution_id"],
        json!("exec-parallel")
    );
    assert_eq!(callbacks[1]["args"][0].as_array().map(Vec::len), Some(8));

    // What is left is what the platform leaves: the failed batch's marker (so that its
    // redelivery stays skipped) and the crashed worker's barrier with its callback, which
    // pg_reaper queues once it is stranded.
    assert_eq!(
        rows(&mut c, "pg_barrier_state").as_array().map(|r| r
            .iter()
            .map(|b| (
                b["execution_id"].clone(),
                b["remaining"].clone(),
                b["callback"]["task_name"].clone()
            ))
            .collect::<Vec<_>>()),
        Some(vec![(
            json!("exec-crashed"),
            json!(0),
            json!("process_batch_callback")
        )])
    );
    assert_eq!(
        json(
            &mut c,
            "SELECT jsonb_agg(execution_id || '/' || batch_index ORDER BY execution_id, batch_index) FROM unstract.pg_batch_dedup"
        ),
        json!(["exec-crashed/0", "exec-failing/0"])
    );
    c.batch_execute(
        "UPDATE unstract.pg_barrier_state SET created_at = now() - interval '7 hours',
                expires_at = now() - interval '1 hour'",
    )
    .expect("let it strand");
    assert_eq!(
        json(&mut c, "SELECT to_jsonb(queued) FROM reap_expired()"),
        json!(1)
    );
}

/// The two-step restore of docs/unstract.md (*Backups*), run as written there: a dump of a
/// database with adopted tables comes back with every row, adopted again.
#[test]
fn native_a_dump_of_an_adopted_database_restores_with_the_documented_steps() {
    let cluster = Cluster::start("adoptdump", &[]);
    let mut c = cluster.client("postgres");
    c.batch_execute("CREATE DATABASE queue")
        .expect("create database");
    let mut c = cluster.client("queue");
    c.batch_execute(UNSTRACT_SCHEMA).expect("schema");
    c.batch_execute(
        "CREATE EXTENSION pg_reaper SCHEMA unstract; SET search_path = unstract;
         CREATE ROLE unstract_worker;
         GRANT EXECUTE ON FUNCTION barrier_claim(text, int) TO unstract_worker;
         SELECT barrier_enqueue('live', 'org', 2, '1 hour', '{\"task_name\": \"cb\"}');
         SELECT barrier_claim('live', 0);
         SELECT barrier_enqueue('strand', 'org', 2);
         UPDATE pg_barrier_state SET created_at = now() - interval '7 hours',
                expires_at = now() - interval '1 hour' WHERE execution_id = 'strand';
         SELECT * FROM reap_expired();",
    )
    .expect("rows of every kind");
    let snapshot = |c: &mut Client| {
        json(
            c,
            "SELECT jsonb_build_object(
                 'barriers', (SELECT jsonb_agg(to_jsonb(b) ORDER BY execution_id) FROM unstract.pg_barrier_state b),
                 'markers', (SELECT jsonb_agg(to_jsonb(d) ORDER BY id) FROM unstract.pg_batch_dedup d),
                 'intents', (SELECT jsonb_agg(to_jsonb(o) - 'updated_at' ORDER BY id) FROM unstract.pg_reaper_outbox o),
                 'grant', has_function_privilege('unstract_worker', 'unstract.barrier_claim(text, int)', 'EXECUTE'))",
        )
    };
    let before = snapshot(&mut c);
    drop(c);
    let work = cluster.dir.join("restore");
    std::fs::create_dir_all(&work).expect("mkdir");
    let bindir = std::process::Command::new(
        std::env::var("PG_CONFIG")
            .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into()),
    )
    .arg("--bindir")
    .output()
    .expect("pg_config");
    let bindir = String::from_utf8(bindir.stdout)
        .expect("utf-8")
        .trim()
        .to_string();
    let shell = |script: &str| {
        let out = std::process::Command::new("bash")
            .args(["-euo", "pipefail", "-c", script])
            .current_dir(&work)
            .env(
                "PATH",
                format!("{bindir}:{}", std::env::var("PATH").unwrap_or_default()),
            )
            .env("PGHOST", "127.0.0.1")
            .env("PGPORT", cluster.port.to_string())
            .env("PGUSER", "postgres")
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "{script}\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    shell("pg_dump -Fc -d queue -f queue.dump && dropdb queue && createdb queue");

    let guide = std::fs::read_to_string(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/unstract.md"),
    )
    .expect("docs/unstract.md");
    let steps = guide
        .split("**Backups**")
        .nth(1)
        .and_then(|rest| rest.split("```sh").nth(1))
        .and_then(|block| block.split("```").next())
        .expect("the restore steps in docs/unstract.md");
    shell(steps);

    let mut c = cluster.client("queue");
    assert_eq!(snapshot(&mut c), before);
    let members: &[&str] = match pg_reaper_tests::edition() {
        Edition::Native => &["unstract.pg_reaper_outbox", "unstract.pg_reaper_settings"],
        Edition::Portable => &[], // no extension: nothing is anyone's member
    };
    assert_eq!(member_tables(&mut c), members);
}
