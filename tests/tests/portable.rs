//! The extension-free edition (`make portable`): the one SQL file installed by a role that is
//! not a superuser into a schema it owns, on a cluster that preloads nothing, used by an
//! application role with the documented grants, and ticked by `pg_reaper_tick()`.

use pg_reaper_tests::{Cluster, json, portable_sql, shared, strand_many};
use postgres::Client;
use serde_json::json;

/// A database whose schema `queue` belongs to `owner`, an ordinary role; its client as that
/// role, with `queue` first on its search_path.
fn owned_schema(cluster: &Cluster, db: &str, owner: &str) -> Client {
    cluster
        .client("postgres")
        .batch_execute(&format!(
            "CREATE ROLE {owner} LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB"
        ))
        .expect("role");
    cluster
        .client("postgres")
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .expect("database");
    cluster
        .client(db)
        .batch_execute(&format!("CREATE SCHEMA queue AUTHORIZATION {owner}"))
        .expect("schema");
    let mut c = cluster.client_as(db, owner);
    c.batch_execute("SET search_path = queue")
        .expect("search_path");
    c
}

/// Every pg_reaper object in schema `queue`, with its definition.
fn definitions(c: &mut Client) -> serde_json::Value {
    json(
        c,
        "SELECT jsonb_build_object(
             'functions', (SELECT jsonb_agg(pg_get_functiondef(p.oid) ORDER BY p.oid::regprocedure::text)
                             FROM pg_proc p WHERE p.pronamespace = 'queue'::regnamespace),
             'relations', (SELECT jsonb_agg(c.relname ORDER BY c.relname)
                             FROM pg_class c WHERE c.relnamespace = 'queue'::regnamespace))",
    )
}

#[test]
fn installs_without_a_superuser_runs_twice_unchanged_and_ticks() {
    let cluster = shared();
    let db = Cluster::unique_name("portable");
    let owner = format!("{db}_owner");
    let mut c = owned_schema(cluster, &db, &owner);
    let sql = portable_sql();
    assert!(
        sql.lines().all(|l| !l.trim_start().starts_with('\\')),
        "no psql meta-commands: a migration's RunSQL runs the file's text"
    );
    c.batch_execute(&sql)
        .expect("the edition installs as the schema's owner");
    let installed = definitions(&mut c);

    // The barrier API and reaping, as in the native edition.
    c.batch_execute(
        "SELECT barrier_enqueue('live', 'org', 2, '1 hour', '{\"task\": \"t\"}');
         SELECT barrier_claim('live', 0);",
    )
    .expect("barrier API");
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(d) FROM barrier_decrement('live', '1') d"
        ),
        json!({"status": "pending", "remaining": 1, "results": null})
    );
    strand_many(&mut c, "s", "org", 3);

    // A second run changes no definition and no row.
    let rows = "SELECT jsonb_build_array(
                    (SELECT jsonb_agg(b ORDER BY execution_id) FROM pg_barrier_state b),
                    (SELECT jsonb_agg(d ORDER BY execution_id) FROM pg_batch_dedup d))";
    let before = json(&mut c, rows);
    c.batch_execute(&sql).expect("the same file again");
    assert_eq!(
        definitions(&mut c),
        installed,
        "a second run changes no definition"
    );
    assert_eq!(json(&mut c, rows), before, "a second run keeps every row");

    // The worker's job: one tick queues the strands and is recorded for the status view.
    assert_eq!(json(&mut c, "SELECT to_jsonb(pg_reaper_tick())"), json!(3));
    let status = json(&mut c, "SELECT to_jsonb(s) FROM pg_reaper_status s");
    assert_eq!(status["ticks"], json!(1), "{status}");
    assert_eq!(status["worker_state"], json!("ticking"), "{status}");
    assert_eq!(status["outbox_pending"], json!(3), "{status}");
    assert_eq!(json(&mut c, "SELECT to_jsonb(pg_reaper_tick())"), json!(0));

    // The relay's protocol: claim, lock, resolve.
    let claimed = json(
        &mut c,
        "SELECT jsonb_agg(jsonb_build_array(id, attempt)) FROM outbox_claim(1, '1 minute')",
    );
    mark_and_resolve(&mut c, &claimed[0]);
}

/// The relay's steps for claim `[id, attempt]` of a stranded execution: the re-check under the
/// row lock says `mark`, and the mark's outcome resolves the claim.
fn mark_and_resolve(c: &mut Client, claim: &serde_json::Value) {
    let (id, attempt) = (claim[0].as_i64().unwrap(), claim[1].as_i64().unwrap());
    assert_eq!(
        json(
            c,
            &format!("SELECT to_jsonb(l.verdict) FROM recovery_lock({id}, {attempt}) l")
        ),
        json!("mark")
    );
    assert_eq!(
        json(
            c,
            &format!("SELECT to_jsonb(outbox_resolve({id}, {attempt}, 'marked_error'))")
        ),
        json!(true)
    );
}

#[test]
fn settings_come_from_the_guc_then_the_table_then_the_default() {
    let cluster = shared();
    let db = Cluster::unique_name("psettings");
    let mut c = owned_schema(cluster, &db, &format!("{db}_owner"));
    c.batch_execute(&portable_sql()).expect("install");
    let timeout = |c: &mut Client| json(c, "SELECT to_jsonb(pg_reaper_stuck_timeout()::text)");
    assert_eq!(timeout(&mut c), json!("02:30:00"), "the default");
    c.batch_execute("INSERT INTO pg_reaper_settings VALUES ('pg_reaper.stuck_timeout', '600')")
        .expect("the owner sets a value in the table");
    assert_eq!(timeout(&mut c), json!("00:10:00"), "the table");
    c.batch_execute("SET pg_reaper.stuck_timeout = '2 min'")
        .expect("anyone may SET a placeholder in a session");
    assert_eq!(timeout(&mut c), json!("00:02:00"), "the GUC wins");
    let err = c
        .batch_execute("INSERT INTO pg_reaper_settings VALUES ('pg_reaper.naptme', '1')")
        .expect_err("an unknown name");
    assert_eq!(
        err.as_db_error().and_then(|e| e.constraint()),
        Some("pg_reaper_settings_name_valid"),
        "{err:?}"
    );
}

/// Every row pg_reaper keeps in schema `queue`: barriers, markers, intents, settings.
fn state(c: &mut Client) -> serde_json::Value {
    json(
        c,
        "SELECT jsonb_build_object(
             'barriers', (SELECT jsonb_agg(b ORDER BY execution_id) FROM pg_barrier_state b),
             'markers', (SELECT jsonb_agg(d ORDER BY execution_id, batch_index) FROM pg_batch_dedup d),
             'intents', (SELECT jsonb_agg(o ORDER BY id) FROM pg_reaper_outbox o),
             'settings', (SELECT jsonb_agg(s ORDER BY name) FROM pg_reaper_settings s))",
    )
}

/// A platform that starts on a managed service and moves, or the reverse: `CREATE EXTENSION`
/// over the edition, then the edition's file over the extension, on the same database. Rows,
/// markers, settings and intents (an in-flight claim with its fencing token) stay.
#[test]
fn switching_editions_both_ways_keeps_rows_and_intents() {
    let cluster = shared();
    let db = Cluster::unique_name("pswitch");
    let owner = format!("{db}_owner");
    let mut c = owned_schema(cluster, &db, &owner);
    c.batch_execute(&portable_sql()).expect("the edition");
    c.batch_execute(
        "SELECT barrier_enqueue('live', 'org', 3);
         SELECT barrier_claim('live', 0);
         INSERT INTO pg_reaper_settings VALUES ('pg_reaper.batch_size', '500');",
    )
    .expect("a live barrier with a marker, a setting");
    strand_many(&mut c, "s", "org", 2);
    assert_eq!(json(&mut c, "SELECT to_jsonb(pg_reaper_tick())"), json!(2));
    let claim = json(
        &mut c,
        "SELECT jsonb_build_array(id, attempt) FROM outbox_claim(1, '10 minutes')",
    );
    // An application role with the grant its workers need.
    let app = format!("{db}_app");
    cluster
        .client("postgres")
        .batch_execute(&format!("CREATE ROLE {app} LOGIN"))
        .expect("the application role");
    c.batch_execute(&format!(
        "GRANT USAGE ON SCHEMA queue TO {app};
         GRANT EXECUTE ON FUNCTION barrier_claim(text, integer) TO {app};"
    ))
    .expect("the application's grant");
    let app_claims = |batch: i32| {
        let mut a = cluster.client_as(&db, &app);
        json(
            &mut a,
            &format!("SELECT to_jsonb(queue.barrier_claim('live', {batch}))"),
        )
    };
    let before = state(&mut c);
    let edition = |c: &mut Client| json(c, "SELECT to_jsonb(pg_reaper_edition())");

    let mut admin = cluster.client(&db);
    admin
        .batch_execute("CREATE EXTENSION pg_reaper SCHEMA queue")
        .expect("the extension over the edition");
    assert_eq!(edition(&mut c), json!("native"));
    assert_eq!(state(&mut c), before, "every row kept, to the extension");
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(count(*)) FROM pg_proc p WHERE p.pronamespace = 'queue'::regnamespace
                AND NOT EXISTS (SELECT FROM pg_depend d WHERE d.objid = p.oid AND d.deptype = 'e')"
        ),
        json!(0),
        "no function of the edition is left beside the extension's"
    );
    assert_eq!(app_claims(1), json!(true), "the grant carried over");
    let before = state(&mut c);

    let err = c
        .batch_execute(&portable_sql())
        .expect_err("the schema's owner cannot drop the extension");
    let db_err = err.as_db_error().expect("a server error");
    assert_eq!(db_err.code().code(), "42501", "{db_err:?}");
    assert!(db_err.message().contains("only its owner"), "{db_err:?}");
    assert_eq!(edition(&mut c), json!("native"), "nothing was changed");

    admin
        .batch_execute(&format!("SET search_path = queue; {}", portable_sql()))
        .expect("the edition over the extension, by its owner");
    assert_eq!(edition(&mut c), json!("extension-free"));
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(count(*)) FROM pg_extension WHERE extname = 'pg_reaper'"
        ),
        json!(0)
    );
    assert_eq!(state(&mut c), before, "every row kept, back to the edition");
    assert_eq!(app_claims(2), json!(true), "the grant carried back");

    // The claim made before both switches still holds: its token fences as before.
    mark_and_resolve(&mut c, &claim);
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(d) FROM barrier_decrement('live', '1') d"
        ),
        json!({"status": "pending", "remaining": 2, "results": null})
    );
}
