//! The extension over real, concurrent connections: what a single rolled-back pg_test cannot
//! show (races between sessions, NOTIFY at commit, privileges, another schema, dump/restore).

use pg_reaper_tests::{Cluster, json, shared, strand_many};
use postgres::Client;
use postgres::fallible_iterator::FallibleIterator;
use serde_json::json;
use std::sync::{Arc, Barrier};
use std::thread;

/// Runs `f(i, client)` on `n` threads, each with its own connection, released together.
fn race<T: Send + 'static>(
    cluster: &Cluster,
    db: &str,
    n: usize,
    f: impl Fn(usize, &mut Client) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let gate = Arc::new(Barrier::new(n));
    let f = Arc::new(f);
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (gate, f, mut client) = (gate.clone(), f.clone(), cluster.client(db));
            thread::spawn(move || {
                gate.wait();
                f(i, &mut client)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("racer panicked"))
        .collect()
}

#[test]
fn eight_concurrent_claimers_exactly_one_wins_every_time() {
    let cluster = shared();
    let q = Cluster::unique_name("claim");
    cluster.create_db(&q, None);
    for trial in 0..10 {
        let wins = race(cluster, &q, 8, move |_, c| {
            c.query_one("SELECT barrier_claim('exec', $1)", &[&trial])
                .expect("claim")
                .get::<_, bool>(0)
        });
        assert_eq!(
            wins.iter().filter(|w| **w).count(),
            1,
            "trial {trial}: {wins:?}"
        );
    }
    let mut c = cluster.client(&q);
    assert_eq!(
        json(&mut c, "SELECT to_jsonb(count(*)) FROM pg_batch_dedup"),
        json!(10)
    );
}

#[test]
fn thirty_two_concurrent_decrements_give_exactly_one_complete() {
    let cluster = shared();
    let q = Cluster::unique_name("decr");
    let mut c = cluster.create_db(&q, None);
    for round in 0..3 {
        c.execute("SELECT barrier_enqueue('exec', 'org', 32)", &[])
            .expect("enqueue");
        let statuses = race(cluster, &q, 32, |i, c| {
            c.query_one(
                "SELECT status FROM barrier_decrement('exec', to_jsonb($1::int))",
                &[&(i as i32)],
            )
            .expect("decrement")
            .get::<_, String>(0)
        });
        let complete = statuses.iter().filter(|s| *s == "complete").count();
        let pending = statuses.iter().filter(|s| *s == "pending").count();
        assert_eq!((complete, pending), (1, 31), "round {round}");
        assert_eq!(
            json(
                &mut c,
                "SELECT jsonb_build_array(remaining, jsonb_array_length(results)) FROM pg_barrier_state"
            ),
            json!([0, 32])
        );
    }
}

#[test]
fn concurrent_reapers_queue_each_strand_once() {
    let cluster = shared();
    let q = Cluster::unique_name("reap");
    let mut c = cluster.create_db(&q, None);
    for round in 0..3 {
        let prefix = format!("r{round}-");
        strand_many(&mut c, &prefix, "org", 200);
        let queued = race(cluster, &q, 2, |_, c| {
            c.query_one("SELECT queued FROM reap_expired()", &[])
                .expect("reap")
                .get::<_, i32>(0)
        });
        assert_eq!(queued.iter().sum::<i32>(), 200, "round {round}: {queued:?}");
    }
    assert_eq!(
        json(
            &mut c,
            "SELECT jsonb_build_array(count(*), count(DISTINCT execution_id)) FROM pg_reaper_outbox"
        ),
        json!([600, 600])
    );
}

#[test]
fn reap_notifies_the_relay_channel_only_when_it_queued() {
    let cluster = shared();
    let q = Cluster::unique_name("notify");
    let mut c = cluster.create_db(&q, None);
    let mut listener = cluster.client(&q);
    listener
        .batch_execute("LISTEN pg_reaper_outbox")
        .expect("listen");
    let pending = |l: &mut Client| {
        // A round trip delivers what was sent before it.
        l.batch_execute("SELECT 1").expect("ping");
        l.notifications().iter().count().expect("notifications")
    };
    c.batch_execute("SELECT * FROM reap_expired()")
        .expect("reap nothing");
    assert_eq!(pending(&mut listener), 0, "nothing queued, no wake-up");
    strand_many(&mut c, "n", "org", 3);
    c.batch_execute("SELECT * FROM reap_expired(dry_run => true)")
        .expect("dry run");
    assert_eq!(
        pending(&mut listener),
        0,
        "a dry run writes and wakes nothing"
    );
    c.batch_execute("BEGIN; SELECT * FROM reap_expired();")
        .expect("reap in tx");
    assert_eq!(pending(&mut listener), 0, "delivered at commit, not before");
    c.batch_execute("COMMIT").expect("commit");
    assert_eq!(pending(&mut listener), 1);
}

#[test]
fn bad_input_names_the_argument_and_changes_nothing() {
    let cluster = shared();
    let q = Cluster::unique_name("badinput");
    let mut c = cluster.create_db(&q, None);
    c.batch_execute("SELECT barrier_enqueue('e', 'org', 3); SELECT barrier_claim('e', 0)")
        .expect("arm");
    let snapshot = |c: &mut Client| {
        json(
            c,
            "SELECT jsonb_build_array((SELECT jsonb_agg(b) FROM pg_barrier_state b),
                                          (SELECT jsonb_agg(d) FROM pg_batch_dedup d),
                                          (SELECT jsonb_agg(o) FROM pg_reaper_outbox o))",
        )
    };
    let before = snapshot(&mut c);
    let cases = [
        (
            "SELECT barrier_enqueue(NULL, 'org', 1)",
            "barrier_enqueue: execution_id must not be NULL or empty",
        ),
        (
            "SELECT barrier_enqueue('e', 'org', 0)",
            "barrier_enqueue: total must be at least 1",
        ),
        (
            "SELECT barrier_enqueue('e', 'org', NULL)",
            "barrier_enqueue: total must not be NULL",
        ),
        (
            "SELECT barrier_enqueue('e', 'org', 2, '-1 hour')",
            "barrier_enqueue: ttl must be a positive interval",
        ),
        (
            "SELECT barrier_enqueue('e', 'org', 2, NULL)",
            "barrier_enqueue: ttl must not be NULL",
        ),
        (
            "SELECT barrier_claim('e', -1)",
            "barrier_claim: batch_index must not be negative",
        ),
        (
            "SELECT barrier_decrement('', '1')",
            "barrier_decrement: execution_id must not be NULL or empty",
        ),
        (
            "SELECT barrier_finish(NULL)",
            "barrier_finish: execution_id must not be NULL or empty",
        ),
        (
            "SELECT barrier_abort('e', NULL)",
            "barrier_abort: preserve_dedup must not be NULL",
        ),
        (
            "SELECT * FROM reap_expired(-5)",
            "reap_expired: max_rows must be at least 1 (NULL: no limit)",
        ),
    ];
    for (sql, message) in cases {
        let err = c.batch_execute(sql).expect_err(sql);
        let db = err.as_db_error().unwrap_or_else(|| panic!("{sql}: {err}"));
        assert_eq!(db.message(), message, "{sql}");
        assert_eq!(db.code().code(), "22023", "{sql}: invalid_parameter_value");
    }
    assert_eq!(snapshot(&mut c), before);
}

#[test]
fn native_works_in_a_schema_that_needs_quoting_whatever_the_search_path() {
    let cluster = shared();
    let q = Cluster::unique_name("schema");
    let mut c = cluster.create_db(&q, Some("Queue Schema"));
    c.batch_execute("SET search_path = public")
        .expect("search_path");
    let s = "\"Queue Schema\"";
    c.batch_execute(&format!(
        "SELECT {s}.barrier_enqueue('e', 'org', 2, '1 hour', '{{\"cb\": 1}}');
         SELECT {s}.barrier_claim('e', 0);
         SELECT {s}.barrier_decrement('e', '1');
         SELECT {s}.barrier_enqueue('x', 'org', 1);
         UPDATE {s}.pg_barrier_state SET created_at = now() - interval '2 hours',
                expires_at = now() - interval '1 second' WHERE execution_id = 'x';"
    ))
    .expect("barrier API in a quoted schema");
    assert_eq!(
        json(
            &mut c,
            &format!("SELECT to_jsonb(r) FROM {s}.reap_expired() r")
        ),
        json!({"stranded": 1, "queued": 1, "already_queued": 0, "skipped_no_org": 0})
    );
    assert_eq!(
        json(
            &mut c,
            &format!(
                "SELECT jsonb_build_array(outbox_pending, barriers_live) FROM {s}.pg_reaper_status"
            )
        ),
        json!([1, 1])
    );
    assert!(
        json(
            &mut c,
            "SELECT to_jsonb(count(*)) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
        ) == json!(0),
        "nothing was created in public"
    );
    // Dropped and created again in another schema within the same session: the prepared
    // statements must follow the extension, not the old schema.
    c.batch_execute(
        "DROP EXTENSION pg_reaper; CREATE SCHEMA other; CREATE EXTENSION pg_reaper SCHEMA other;
         SELECT other.barrier_enqueue('e', 'org', 2);",
    )
    .expect("re-created elsewhere");
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(count(*)) FROM other.pg_barrier_state"
        ),
        json!(1)
    );
}

#[test]
fn native_nothing_is_granted_to_public_and_documented_grants_suffice() {
    let cluster = shared();
    let q = Cluster::unique_name("privs");
    let mut admin = cluster.create_db(&q, None);
    admin
        .batch_execute(
            "CREATE ROLE nobody LOGIN;
             CREATE ROLE app LOGIN;
             GRANT EXECUTE ON FUNCTION barrier_enqueue(text, text, int, interval, jsonb),
                 barrier_claim(text, int), barrier_decrement(text, jsonb),
                 barrier_finish(text), barrier_abort(text, boolean) TO app;
             CREATE ROLE ops LOGIN;
             GRANT EXECUTE ON FUNCTION reap_expired(int, boolean), reaper_status(),
                 barrier_explain(text), barrier_recover(text, text) TO ops;
             GRANT SELECT ON pg_reaper_status TO ops;",
        )
        .expect("roles");
    let mut nobody = cluster.client_as(&q, "nobody");
    for sql in [
        "SELECT barrier_enqueue('e', 'org', 1)",
        "SELECT barrier_claim('e', 0)",
        "SELECT barrier_decrement('e')",
        "SELECT barrier_finish('e')",
        "SELECT barrier_abort('e')",
        "SELECT * FROM reap_expired()",
        "SELECT * FROM pg_reaper_status",
        "SELECT * FROM reaper_status()",
        "SELECT * FROM pg_barrier_state",
        "SELECT * FROM pg_batch_dedup",
        "SELECT * FROM pg_reaper_outbox",
        "SELECT barrier_is_stranded(now(), now(), now(), '1 hour')",
        "SELECT barrier_explain('e')",
        "SELECT barrier_recover('e')",
    ] {
        let err = nobody.batch_execute(sql).expect_err(sql);
        assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{sql}: {err}");
    }
    let mut app = cluster.client_as(&q, "app");
    app.batch_execute(
        "SELECT barrier_enqueue('e', 'org', 1); SELECT barrier_claim('e', 0);
         SELECT barrier_decrement('e'); SELECT barrier_finish('e'); SELECT barrier_abort('e');",
    )
    .expect("the application role drives the barrier API");
    for sql in [
        "SELECT * FROM pg_barrier_state",
        "DELETE FROM pg_batch_dedup",
        "SELECT * FROM reap_expired()",
    ] {
        let err = app.batch_execute(sql).expect_err(sql);
        assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{sql}: {err}");
    }
    admin
        .batch_execute(
            "CREATE ROLE relay LOGIN;
             GRANT EXECUTE ON FUNCTION outbox_claim(int, interval, timestamptz), recovery_lock(bigint, int, interval),
                 outbox_resolve(bigint, int, text), outbox_fail(bigint, int, text, interval, int),
                 outbox_defer(bigint, int, text, interval), outbox_mark_sending(bigint, int, interval),
                 outbox_release(bigint, int) TO relay;",
        )
        .expect("relay role");
    for sql in [
        "SELECT * FROM outbox_claim()",
        "SELECT * FROM recovery_lock(1, 1)",
        "SELECT outbox_resolve(1, 1, 'gone')",
        "SELECT outbox_fail(1, 1, 'x', '1 second', 3)",
        "SELECT outbox_defer(1, 1, 'x', '1 second')",
        "SELECT outbox_mark_sending(1, 1, '1 second')",
        "SELECT outbox_release(1, 1)",
        "SELECT outbox_replay()",
    ] {
        let err = nobody.batch_execute(sql).expect_err(sql);
        assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{sql}: {err}");
    }
    let mut relay = cluster.client_as(&q, "relay");
    relay
        .batch_execute(
            "SELECT * FROM outbox_claim(); SELECT * FROM recovery_lock(1, 1);
             SELECT outbox_fail(1, 1, 'x', '1 second', 3); SELECT outbox_release(1, 1);
             SELECT outbox_defer(1, 1, 'x', '1 second'); SELECT outbox_mark_sending(1, 1, '1 second');
             SELECT outbox_resolve(1, 1, 'gone');",
        )
        .expect("the relay role drives the outbox");
    // The relay role cannot clean up an intent it never claimed: resolve is fenced by the
    // claim's attempt token, so the barrier (the recovery handle) and its markers stay.
    admin
        .batch_execute(
            "SELECT barrier_enqueue('unclaimed', 'org', 2); SELECT barrier_claim('unclaimed', 0);
             UPDATE pg_barrier_state SET created_at = now() - interval '2 hours',
                    expires_at = now() - interval '1 second';
             SELECT * FROM reap_expired();",
        )
        .expect("a queued strand");
    let intent: i64 = admin
        .query_one(
            "SELECT id FROM pg_reaper_outbox WHERE execution_id = 'unclaimed'",
            &[],
        )
        .expect("intent")
        .get(0);
    for attempt in [0, 1, 2] {
        let resolved: bool = relay
            .query_one(
                "SELECT outbox_resolve($1, $2, 'gone')",
                &[&intent, &attempt],
            )
            .expect("resolve")
            .get(0);
        assert!(
            !resolved,
            "resolved an unclaimed intent with attempt {attempt}"
        );
    }
    let left: i64 = admin
        .query_one(
            "SELECT (SELECT count(*) FROM pg_barrier_state WHERE execution_id = 'unclaimed')
                  + (SELECT count(*) FROM pg_batch_dedup WHERE execution_id = 'unclaimed')
                  + (SELECT count(*) FROM pg_reaper_outbox WHERE state = 'pending')",
            &[],
        )
        .expect("left")
        .get(0);
    assert_eq!(left, 3, "barrier, marker and pending intent all kept");
    for sql in [
        "SELECT barrier_enqueue('e', 'org', 1)",
        "SELECT barrier_abort('e')",
        "UPDATE pg_barrier_state SET remaining = 0",
        "DELETE FROM pg_reaper_outbox",
        "SELECT outbox_replay()",
        "SELECT * FROM reap_expired()",
    ] {
        let err = relay.batch_execute(sql).expect_err(sql);
        assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{sql}: {err}");
    }
    // Only a superuser may point the relay at a function. Before the library is loaded in a
    // session, Postgres accepts a SET of the name as a placeholder, and discards it (WARNING)
    // the moment the library loads, which every reader of the settings does first; after
    // that, and for ALTER ROLE, it refuses.
    admin
        .batch_execute(
            "GRANT SELECT ON pg_reaper_status TO relay; GRANT EXECUTE ON FUNCTION reaper_status() TO relay",
        )
        .expect("the relay's monitoring grants");
    let mut app = cluster.client_as(&q, "relay"); // a session where the library is not loaded yet
    app.batch_execute("SET pg_reaper.refire_function = 'public.evil'")
        .expect("placeholder");
    app.batch_execute("SELECT * FROM pg_reaper_status")
        .expect("reads the settings, which loads pg_reaper");
    let shown: String = app
        .query_one("SHOW pg_reaper.refire_function", &[])
        .expect("show")
        .get(0);
    assert_eq!(shown, "", "the placeholder was discarded");
    for sql in [
        "SET pg_reaper.refire_function = 'public.evil'",
        "ALTER ROLE relay SET pg_reaper.refire_function = 'public.evil'",
    ] {
        let err = app.batch_execute(sql).expect_err(sql);
        assert_eq!(err.code().map(|c| c.code()), Some("42501"), "{sql}: {err}");
    }
    let mut ops = cluster.client_as(&q, "ops");
    ops.batch_execute(
        "SELECT * FROM reap_expired(); SELECT * FROM pg_reaper_status;
         SELECT barrier_explain('e');",
    )
    .expect("the operator role reaps, reads the status and explains an execution");
}

#[test]
fn pg_dump_and_restore_keep_barriers_markers_and_intents() {
    let cluster = shared();
    let q = Cluster::unique_name("dump");
    let (src, dst) = (format!("{q}_src"), format!("{q}_dst"));
    let mut c = cluster.create_db(&src, None);
    strand_many(&mut c, "s", "org", 3);
    c.batch_execute(
        "SELECT barrier_enqueue('live', 'org', 5, '1 hour', '{\"cb\": true}');
         SELECT barrier_claim('live', 0); SELECT barrier_decrement('live', '{\"r\": 1}');
         SELECT * FROM reap_expired();",
    )
    .expect("data");
    let all = "SELECT jsonb_build_array(
                   (SELECT jsonb_agg(b ORDER BY execution_id) FROM pg_barrier_state b),
                   (SELECT jsonb_agg(d ORDER BY execution_id, batch_index) FROM pg_batch_dedup d),
                   (SELECT jsonb_agg(o ORDER BY id) FROM pg_reaper_outbox o))";
    let before = json(&mut c, all);
    let file = cluster.dir.join(format!("{q}.custom"));
    let file = file.to_str().expect("utf-8");
    let port = cluster.port.to_string();
    let conn = ["-h", "127.0.0.1", "-p", &port, "-U", "postgres"];
    cluster.tool("pg_dump", &[&conn[..], &["-Fc", "-f", file, &src]].concat());
    cluster
        .client("postgres")
        .batch_execute(&format!("CREATE DATABASE {dst}"))
        .expect("create dst");
    cluster.tool(
        "pg_restore",
        &[&conn[..], &["-d", &dst, "--exit-on-error", file]].concat(),
    );
    let mut d = cluster.client(&dst);
    assert_eq!(json(&mut d, all), before);
    // The identity sequence came along: a new intent does not collide with restored ids.
    strand_many(&mut d, "after", "org", 1);
    assert_eq!(
        json(&mut d, "SELECT to_jsonb(queued) FROM reap_expired()"),
        json!(1)
    );
}

#[test]
fn a_hostile_search_path_cannot_redirect_the_hot_path() {
    let cluster = shared();
    let q = Cluster::unique_name("hostile");
    let mut c = cluster.create_db(&q, None);
    // Operators that would hijack `remaining - 1`, `execution_id = $1`, `results || …` and the
    // claim if the hot path resolved names through the caller's search_path.
    c.batch_execute(
        "CREATE SCHEMA evil;
         CREATE FUNCTION evil.minus(int, int) RETURNS int LANGUAGE sql AS 'SELECT 1000';
         CREATE OPERATOR evil.- (LEFTARG = int, RIGHTARG = int, FUNCTION = evil.minus);
         CREATE FUNCTION evil.eq(text, text) RETURNS boolean LANGUAGE sql AS 'SELECT true';
         CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.eq);
         CREATE FUNCTION evil.cat(jsonb, jsonb) RETURNS jsonb LANGUAGE sql AS 'SELECT ''\"pwned\"''::jsonb';
         CREATE OPERATOR evil.|| (LEFTARG = jsonb, RIGHTARG = jsonb, FUNCTION = evil.cat);
         CREATE FUNCTION evil.now() RETURNS timestamptz LANGUAGE sql AS 'SELECT ''2000-01-01''::timestamptz';
         SELECT barrier_enqueue('a', 'org', 3), barrier_enqueue('b', 'org', 3);
         SET search_path = evil, pg_catalog, public;",
    )
    .expect("hostile setup");
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(d) FROM public.barrier_decrement('a', '{\"r\": 1}') d"
        ),
        json!({"status": "pending", "remaining": 2, "results": null})
    );
    assert_eq!(
        json(&mut c, "SELECT to_jsonb(public.barrier_claim('a', 0))"),
        json!(true)
    );
    c.batch_execute("SET search_path = public").expect("reset");
    assert_eq!(
        json(
            &mut c,
            "SELECT jsonb_object_agg(execution_id, jsonb_build_array(remaining, results, last_progress_at > now() - interval '1 minute'))
               FROM pg_barrier_state"
        ),
        json!({"a": [2, [{"r": 1}], true], "b": [3, [], true]}),
        "only 'a' changed, by exactly one, with the real ||, = and now()"
    );
}
