//! Upgrading from the released 0.1.0, as a package upgrade does it: the library and SQL files
//! are replaced under a running database full of rows, the server restarts with the new
//! library while the SQL objects are still 0.1.0's, then `ALTER EXTENSION pg_reaper UPDATE`.
//! 0.1.0 is built from the commit that released it (`scripts/release.sh`, cached in target/).

use pg_reaper_tests::{Cluster, Installation, equal, expire, json, wait_for};
use postgres::Client;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::process::Command;

/// The install tree of a released version: `lib/pg_reaper.so` and `extension/*`.
fn release(version: &str) -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new("bash")
        .arg(root.join("scripts/release.sh"))
        .arg(version)
        .output()
        .expect("run scripts/release.sh");
    assert!(
        out.status.success(),
        "building release {version} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).expect("utf-8").trim())
}

fn files_in(dir: PathBuf) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .map(|e| e.path())
        .collect()
}

/// Every row of the three tables, in key order.
fn rows(c: &mut Client) -> Value {
    json(
        c,
        "SELECT jsonb_build_object(
             'barriers', (SELECT jsonb_agg(to_jsonb(b) ORDER BY execution_id) FROM pg_barrier_state b),
             'markers', (SELECT jsonb_agg(to_jsonb(d) ORDER BY execution_id, batch_index) FROM pg_batch_dedup d),
             'intents', (SELECT jsonb_agg(to_jsonb(o) ORDER BY id) FROM pg_reaper_outbox o))",
    )
}

/// The definition of every object of the extension: functions, tables (columns, defaults,
/// constraints, indexes, options), views and types; grants are compared separately.
const DEFINITIONS: &str = "
    WITH members AS (
        SELECT classid, objid FROM pg_depend
         WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
           AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_reaper'))
    SELECT array_agg(d ORDER BY d) FROM (
        SELECT pg_get_functiondef(objid) AS d FROM members WHERE classid = 'pg_proc'::regclass
        UNION ALL
        SELECT c.relname || ' ' || c.relkind::text || ' ' || coalesce(c.reloptions::text, '')
          FROM members m JOIN pg_class c ON c.oid = m.objid WHERE m.classid = 'pg_class'::regclass
        UNION ALL
        SELECT c.relname || '.' || a.attnum || ' ' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
               || ' ' || a.attnotnull || ' ' || a.attidentity::text || ' ' || coalesce(pg_get_expr(ad.adbin, ad.adrelid), '')
          FROM members m JOIN pg_class c ON c.oid = m.objid
          JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
          LEFT JOIN pg_attrdef ad ON ad.adrelid = c.oid AND ad.adnum = a.attnum
         WHERE m.classid = 'pg_class'::regclass
        UNION ALL
        SELECT conname || ' ' || pg_get_constraintdef(x.oid)
          FROM members m JOIN pg_constraint x ON x.conrelid = m.objid WHERE m.classid = 'pg_class'::regclass
        UNION ALL
        SELECT pg_get_indexdef(i.indexrelid)
          FROM members m JOIN pg_index i ON i.indrelid = m.objid WHERE m.classid = 'pg_class'::regclass
        UNION ALL
        SELECT c.relname || ' ' || pg_get_viewdef(c.oid)
          FROM members m JOIN pg_class c ON c.oid = m.objid
         WHERE m.classid = 'pg_class'::regclass AND c.relkind = 'v'
        UNION ALL
        SELECT format_type(objid, NULL) FROM members WHERE classid = 'pg_type'::regclass
    ) defs(d)";

fn definitions(c: &mut Client) -> Vec<String> {
    c.query_one(DEFINITIONS, &[])
        .expect("definitions")
        .get::<_, Vec<String>>(0)
}

fn intent_id(c: &mut Client, execution: &str) -> i64 {
    c.query_one(
        "SELECT id FROM pg_reaper_outbox WHERE execution_id = $1",
        &[&execution],
    )
    .expect("the intent")
    .get(0)
}

fn worker_state(c: &mut Client) -> Value {
    json(c, "SELECT to_jsonb(worker_state) FROM pg_reaper_status")
}

#[test]
fn upgrade_from_0_1_0_keeps_every_row_grant_and_call() {
    let old = release("0.1.0");
    let install = Installation::copy("upgrade");
    install.put(
        &old.join("lib/pg_reaper.so"),
        &files_in(old.join("extension")),
    );
    let cluster = Cluster::start_in(
        &install,
        "upgrade",
        &[
            "shared_preload_libraries = 'pg_reaper'",
            "pg_reaper.database = 'q'",
            "pg_reaper.naptime = 0.2",
            // Off until the end, so that nothing but this test writes rows.
            "pg_reaper.enabled = off",
        ],
    );
    let mut c = cluster.create_db("q", None);
    let version = |c: &mut Client| -> String {
        c.query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_reaper'",
            &[],
        )
        .expect("extversion")
        .get(0)
    };
    assert_eq!(version(&mut c), "0.1.0");

    // Rows of every kind, written by 0.1.0's own functions; roles with 0.1.0's grants.
    c.batch_execute(
        "SELECT barrier_enqueue('live', 'org', 3, '1 hour', '{\"task\": \"aggregate\"}');
         SELECT barrier_claim('live', 0); SELECT barrier_claim('live', 1);
         SELECT barrier_decrement('live', '{\"n\": 0}');
         SELECT barrier_enqueue('orphan', 'org', 1); SELECT barrier_claim('orphan', 0);
         SELECT barrier_abort('orphan', true);
         SELECT barrier_enqueue(id, 'org', 2) FROM unnest(ARRAY['s-pending', 's-in-flight', 's-dead', 's-done']) id;
         CREATE ROLE relay LOGIN; CREATE ROLE monitor LOGIN; CREATE ROLE nobody LOGIN;
         GRANT EXECUTE ON FUNCTION outbox_claim(integer, interval), recovery_lock(bigint, integer, interval),
             outbox_resolve(bigint, text), outbox_fail(bigint, integer, text, interval, integer),
             outbox_release(bigint, integer) TO relay;
         GRANT SELECT ON pg_reaper_status TO relay, monitor;
         GRANT EXECUTE ON FUNCTION reaper_status() TO relay, monitor;",
    )
    .expect("rows under 0.1.0");
    expire(&mut c, "s-%");
    c.batch_execute("SELECT * FROM reap_expired(); SELECT * FROM outbox_claim(16, '1 hour')")
        .expect("reap and claim under 0.1.0");
    let done = intent_id(&mut c, "s-done");
    let dead = intent_id(&mut c, "s-dead");
    let pending = intent_id(&mut c, "s-pending");
    c.batch_execute(&format!(
        "BEGIN; SELECT * FROM recovery_lock({done}, 1); SELECT outbox_resolve({done}, 'marked_error'); COMMIT;
         SELECT outbox_fail({dead}, 1, 'the API said no', '0 s', 1);
         SELECT outbox_release({pending}, 1);"
    ))
    .expect("resolve, fail and release under 0.1.0");
    let states = json(
        &mut c,
        "SELECT jsonb_object_agg(execution_id, state) FROM pg_reaper_outbox",
    );
    assert_eq!(
        states,
        json!({"s-pending": "pending", "s-in-flight": "in_flight", "s-dead": "dead", "s-done": "done"})
    );
    let before = rows(&mut c);
    drop(c);

    // The package upgrade: new library and SQL files, then a restart loads the new library.
    let (library, files) = Installation::current_files();
    install.put(&library, &files);
    cluster.pg_ctl_stop("fast");
    cluster.pg_ctl_start();
    let mut c = cluster.client("q");
    assert_eq!(version(&mut c), "0.1.0");
    wait_for(60, "the worker to see the outdated SQL objects", || {
        equal(worker_state(&mut c), json!("outdated"))
    });
    // The state is shared before the line is written: wait for the line too.
    wait_for(60, "the worker to name the fix in the log", || {
        cluster
            .log()
            .contains("version 0.1.0, the library is version 0.2.0; reaping waits for ALTER EXTENSION pg_reaper UPDATE")
            .then_some(())
    });
    assert_eq!(
        rows(&mut c),
        before,
        "nothing touched a row before the update"
    );

    // 0.1.0's objects with the 0.2.0 library: the barrier API, reap_expired and the status view
    // work; the recovery protocol is refused with the fix in the hint.
    c.batch_execute(
        "SELECT barrier_enqueue('window', 'org', 2, '1 hour', '{\"task\": \"t\"}');
         SELECT barrier_claim('window', 0); SELECT barrier_decrement('window', '1');
         SELECT barrier_claim('window', 1); SELECT barrier_decrement('window', '2');
         SELECT barrier_finish('window');
         SELECT barrier_enqueue('window-abort', 'org', 1); SELECT barrier_abort('window-abort');
         SELECT barrier_enqueue('window-strand', 'org', 2);",
    )
    .expect("the 0.1.0 barrier API with the 0.2.0 library");
    // The decrement in every form the docs show, from a session of its own (its first call
    // into the library), over a barrier the 0.1.0 function armed.
    let mut other = cluster.client("q");
    other
        .batch_execute("SELECT barrier_enqueue('window-forms', 'org', 3)")
        .expect("enqueue");
    assert_eq!(
        json(
            &mut other,
            "SELECT to_jsonb(d) FROM (SELECT status, remaining, results
                                        FROM barrier_decrement('window-forms', '1')) d"
        ),
        json!({"status": "pending", "remaining": 2, "results": null}),
        "the guide's form"
    );
    assert_eq!(
        json(
            &mut other,
            "SELECT to_jsonb(barrier_decrement('window-forms', '2'))"
        ),
        json!({"status": "pending", "remaining": 1, "results": null}),
        "the scalar form"
    );
    assert_eq!(
        json(
            &mut other,
            "SELECT to_jsonb(d) FROM barrier_decrement('window-forms', '3') d"
        ),
        json!({"status": "complete", "remaining": 0, "results": [1, 2, 3]}),
        "the FROM form"
    );
    other
        .batch_execute("SELECT barrier_finish('window-forms')")
        .expect("finish");
    expire(&mut c, "window-strand");
    let reaped = json(&mut c, "SELECT to_jsonb(r) FROM reap_expired() r");
    assert_eq!(reaped["queued"], json!(1), "{reaped}");
    let status = json(&mut c, "SELECT to_jsonb(s) FROM pg_reaper_status s");
    assert_eq!(status["outbox_pending"], json!(2), "{status}");
    for sql in [
        "SELECT * FROM outbox_claim(16, '1 minute')".to_string(),
        format!("SELECT * FROM recovery_lock({pending}, 1)"),
        format!("SELECT outbox_resolve({pending}, 'gone')"),
        format!("SELECT outbox_release({pending}, 1)"),
        format!("SELECT outbox_fail({pending}, 1, 'x', '0 s', 3)"),
        "SELECT outbox_replay()".to_string(),
    ] {
        let err = c.batch_execute(&sql).expect_err(&sql);
        let db = err.as_db_error().expect("a database error");
        assert_eq!(db.code().code(), "55000", "{sql}: {err}");
        assert!(
            db.message()
                .contains("version 0.1.0, its library is version 0.2.0")
                && db.hint()
                    == Some(
                        "Run ALTER EXTENSION pg_reaper UPDATE in this database; recovery resumes after it."
                    ),
            "{sql}: {db:?}"
        );
    }
    let before = rows(&mut c);

    c.batch_execute("ALTER EXTENSION pg_reaper UPDATE")
        .expect("ALTER EXTENSION pg_reaper UPDATE");
    assert_eq!(version(&mut c), "0.2.0");

    // Every row kept; the new columns filled as 0.2.0 reads them.
    let after = rows(&mut c);
    // The barriers gain refired_at, callback_due_at and cut_from, the markers their lease
    // columns, all unset (0.1.0 had no re-fire by this rule, no callback timeout, no leases).
    let without = |rows: &serde_json::Value, columns: &[&str]| {
        let mut rows = rows.clone();
        for row in rows.as_array_mut().expect("rows") {
            let row = row.as_object_mut().expect("a row");
            for c in columns {
                assert_eq!(row.remove(*c), Some(serde_json::Value::Null), "{c}");
            }
        }
        rows
    };
    assert_eq!(
        without(
            &after["barriers"],
            &["refired_at", "callback_due_at", "cut_from"]
        ),
        before["barriers"]
    );
    assert_eq!(
        without(&after["markers"], &["lease_token", "lease_expires_at"]),
        before["markers"]
    );
    let old_intents = before["intents"].as_array().expect("intents");
    let new_intents = after["intents"].as_array().expect("intents");
    assert_eq!(old_intents.len(), new_intents.len());
    for (o, n) in old_intents.iter().zip(new_intents) {
        let mut kept = n.clone();
        let kept_map = kept.as_object_mut().expect("object");
        let failures = kept_map.remove("failures");
        assert_eq!(kept_map.remove("mark_sent_at"), Some(Value::Null));
        assert_eq!(kept_map.remove("action"), Some(Value::Null));
        assert_eq!(&kept, o, "every 0.1.0 column of the intent is kept");
        let expected = match o["state"].as_str() {
            Some("done") => 0,
            Some("in_flight") => o["attempts"].as_i64().unwrap_or(0) - 1,
            _ => o["attempts"].as_i64().unwrap_or(0),
        };
        assert_eq!(failures, Some(json!(expected)), "failures of {o}");
    }

    // The upgraded objects are those of a fresh 0.2.0 install.
    let mut fresh = cluster.create_db("fresh", None);
    assert_eq!(definitions(&mut c), definitions(&mut fresh));

    // Grants carried over; nothing new for PUBLIC.
    for (role, object, privilege) in [
        (
            "relay",
            "outbox_claim(integer, interval, timestamptz)",
            "EXECUTE",
        ),
        ("relay", "outbox_resolve(bigint, integer, text)", "EXECUTE"),
        (
            "relay",
            "outbox_defer(bigint, integer, text, interval)",
            "EXECUTE",
        ),
        (
            "relay",
            "outbox_mark_sending(bigint, integer, interval)",
            "EXECUTE",
        ),
        ("monitor", "reaper_status()", "EXECUTE"),
    ] {
        let granted: bool = c
            .query_one(
                "SELECT has_function_privilege($1, $2, $3)",
                &[&role, &object, &privilege],
            )
            .expect("privilege")
            .get(0);
        assert!(granted, "{role} keeps {privilege} on {object}");
        let public: bool = c
            .query_one(
                "SELECT has_function_privilege('nobody', $1, $2)",
                &[&object, &privilege],
            )
            .expect("privilege")
            .get(0);
        assert!(
            !public,
            "a role without grants has no {privilege} on {object}"
        );
    }
    let mut monitor = cluster.client_as("q", "monitor");
    monitor
        .batch_execute("SELECT worker_state, lock_holder_pid FROM pg_reaper_status")
        .expect("the monitoring role reads the new status view");

    // The relay role drives 0.2.0's protocol over the upgraded rows.
    let mut relay = cluster.client_as("q", "relay");
    let claimed = relay
        .query(
            "SELECT id, execution_id, attempt FROM outbox_claim(16, '1 minute')",
            &[],
        )
        .expect("claim as the relay");
    let claimed: Vec<(i64, String, i32)> = claimed
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut ids: Vec<&str> = claimed.iter().map(|(_, e, _)| e.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["s-pending", "window-strand"]);
    for (id, _, attempt) in &claimed {
        relay
            .batch_execute(&format!(
                "BEGIN; SELECT * FROM recovery_lock({id}, {attempt});
                 SELECT outbox_mark_sending({id}, {attempt}, '10 s');
                 SELECT outbox_resolve({id}, {attempt}, 'marked_error'); COMMIT;"
            ))
            .expect("recover as the relay");
    }
    let left = json(
        &mut c,
        "SELECT jsonb_agg(execution_id ORDER BY execution_id) FROM pg_barrier_state",
    );
    assert_eq!(left, json!(["live", "s-dead", "s-in-flight"]));
    c.batch_execute(&format!("SELECT outbox_replay({dead})"))
        .expect("replay the dead intent");

    // And the worker leads again once enabled.
    c.execute("ALTER SYSTEM SET pg_reaper.enabled = on", &[])
        .expect("enable");
    c.execute("SELECT pg_reload_conf()", &[]).expect("reload");
    wait_for(60, "the worker to lead after the update", || {
        equal(worker_state(&mut c), json!("leader"))
    });
}
