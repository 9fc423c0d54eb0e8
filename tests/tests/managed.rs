//! A managed-service stand-in: stock PostgreSQL 15 that preloads only pg_cron (Debian's
//! postgresql-15-cron, 1.4.2), the provider's superuser creating pg_cron and nothing else, and
//! the extension-free edition installed, scheduled and used by roles that are not superusers.
//! pg_cron 1.4 schedules by the minute: the test waits for the next minute's run.

use pg_reaper_tests::{Cluster, equal, json, portable_sql, strand, wait_for};
use serde_json::json;

#[test]
fn pg_cron_ticks_the_extension_free_edition_for_a_role_without_superuser() {
    let cluster = Cluster::start(
        "managed",
        &[
            "shared_preload_libraries = 'pg_cron'",
            "cron.database_name = 'app'",
            // Jobs as background workers: no connection back through pg_hba.conf.
            "cron.use_background_workers = on",
        ],
    );
    // What the provider does: the database, pg_cron, and ordinary roles.
    let mut admin = cluster.client("postgres");
    admin
        .batch_execute("CREATE DATABASE app")
        .expect("the database");
    admin
        .batch_execute(
            "CREATE ROLE queue_owner LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB;
             CREATE ROLE worker LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB;",
        )
        .expect("the roles");
    drop(admin);
    // pg_cron's launcher reads cron.database_name once it is started with the database there.
    cluster.pg_ctl_stop("fast");
    cluster.pg_ctl_start();
    cluster
        .client("app")
        .batch_execute(
            "CREATE EXTENSION pg_cron;
             GRANT USAGE ON SCHEMA cron TO queue_owner;
             CREATE SCHEMA queue AUTHORIZATION queue_owner;",
        )
        .expect("pg_cron, as the provider's administrator");

    // The queue's owner installs the edition and schedules its tick: the README's statement.
    let mut owner = cluster.client_as("app", "queue_owner");
    owner
        .batch_execute("SET search_path = queue")
        .expect("search_path");
    owner.batch_execute(&portable_sql()).expect("the edition");
    owner
        .batch_execute(
            "GRANT USAGE ON SCHEMA queue TO worker;
             GRANT EXECUTE ON FUNCTION barrier_enqueue(text, text, integer, interval, jsonb),
                   barrier_claim(text, integer), barrier_decrement(text, jsonb) TO worker;
             SELECT cron.schedule('pg_reaper', '* * * * *', 'SELECT queue.pg_reaper_tick()');",
        )
        .expect("grants and the schedule");

    // The application strands an execution (its worker died after one batch of three).
    let mut app = cluster.client_as("app", "worker");
    app.batch_execute("SET search_path = queue")
        .expect("search_path");
    app.execute(
        "SELECT barrier_enqueue('m1', 'org', 3, '1 hour', '{\"task\": \"agg\"}')",
        &[],
    )
    .expect("enqueue as the application role");
    strand(&mut owner, "m2", "org", 1);
    owner
        .batch_execute(
            "UPDATE pg_barrier_state SET created_at = now() - interval '2 hours',
                    expires_at = now() - interval '1 second' WHERE execution_id = 'm1'",
        )
        .expect("m1's deadline passes");

    // pg_cron's next run queues both, as the queue's owner, and records the tick.
    wait_for(150, "both strands queued by a tick pg_cron ran", || {
        equal(
            json(
                &mut owner,
                "SELECT jsonb_agg(execution_id ORDER BY execution_id) FROM pg_reaper_outbox",
            ),
            json!(["m1", "m2"]),
        )
    });
    let ticks = json(
        &mut owner,
        "SELECT jsonb_build_object('ticks', ticks >= 1, 'failed', failed_ticks) FROM pg_reaper_ticks",
    );
    assert_eq!(ticks, json!({"ticks": true, "failed": 0}));
    // pg_cron's launcher records a run as succeeded after the job's transaction has committed:
    // the outbox rows can be seen before the run's status is.
    wait_for(60, "pg_cron's record of the first run, succeeded", || {
        equal(
            json(
                &mut owner,
                "SELECT coalesce((SELECT jsonb_build_object('user', d.username, 'status', d.status)
                                    FROM cron.job_run_details d JOIN cron.job j USING (jobid)
                                   WHERE d.status IN ('succeeded', 'failed')
                                   ORDER BY d.runid LIMIT 1),
                                 'null')",
            ),
            json!({"user": "queue_owner", "status": "succeeded"}),
        )
    });
    let status = json(&mut owner, "SELECT to_jsonb(s) FROM pg_reaper_status s");
    assert_eq!(status["worker_state"], json!("ticking"), "{status}");
}
