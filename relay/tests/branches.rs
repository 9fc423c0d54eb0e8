//! Every recovery branch of the relay (gone, already terminal, rearmed, refired, marked ERROR,
//! failures, operator recoveries), asserting both sides: the calls the status API
//! received (method, path, headers, body, exact message) and the rows left in Postgres.

mod common;

use common::{Env, KEY, intent, wait_due};
use pg_reaper_tests::{equal, json, wait_for};
use postgres::Client;
use serde_json::{Value, json};

fn calls_for<'a>(calls: &'a [Value], id: &str) -> Vec<&'a Value> {
    calls
        .iter()
        .filter(|c| {
            c["path"]
                .as_str()
                .is_some_and(|p| p.contains(&format!("/{id}/")))
        })
        .collect()
}

#[test]
fn mark_terminal_gone_and_no_org_branches() {
    let env = Env::shared("rbranch");
    let mut c = env.db();
    env.api.execution("exec-mark", "org-a", "EXECUTING");
    env.api.execution("exec-zero", "org-a", "PENDING");
    env.api.execution("exec-neg", "org-b", "EXECUTING");
    env.api.execution("exec-done", "org-a", "COMPLETED");
    env.api.execution("exec-stopped", "org-a", "STOPPED");
    pg_reaper_tests::strand(&mut c, "exec-mark", "org-a", 1);
    pg_reaper_tests::strand(&mut c, "exec-zero", "org-a", 3);
    pg_reaper_tests::strand(&mut c, "exec-neg", "org-b", 0);
    c.batch_execute("UPDATE pg_barrier_state SET remaining = -1 WHERE execution_id = 'exec-neg'")
        .expect("neg");
    pg_reaper_tests::strand(&mut c, "exec-done", "org-a", 1);
    pg_reaper_tests::strand(&mut c, "exec-stopped", "org-a", 1);
    pg_reaper_tests::strand(&mut c, "exec-gone", "org-a", 0);
    pg_reaper_tests::strand(&mut c, "exec-noorg", "", 0);
    assert_eq!(env.reap(&mut c), 6);
    env.relay_once(&[]);

    let calls = env.api.calls();
    // Every call carries the bearer key and the row's organization.
    for call in &calls {
        assert_eq!(call["authorization"], json!(format!("Bearer {KEY}")));
    }
    let mark = calls_for(&calls, "exec-mark");
    assert_eq!(mark.len(), 2, "one read, one mark: {mark:?}");
    assert_eq!(
        (&mark[0]["method"], &mark[0]["path"]),
        (
            &json!("GET"),
            &json!("/internal/v1/workflow-execution/exec-mark/")
        )
    );
    assert_eq!(mark[0]["organization"], json!("org-a"));
    assert_eq!(
        (&mark[1]["method"], &mark[1]["path"]),
        (
            &json!("POST"),
            &json!("/internal/v1/workflow-execution/exec-mark/update_status/")
        )
    );
    assert_eq!(mark[1]["content_type"], json!("application/json"));
    assert_eq!(
        mark[1]["body"],
        json!({"status": "ERROR", "cascade_terminal_files": true, "error_message":
            "[reaper-recovery] Execution stranded: 2 file batch(es) never completed before the barrier expired (worker crash / lost task)."})
    );
    assert_eq!(
        calls_for(&calls, "exec-zero")[1]["body"]["error_message"],
        json!(
            "[reaper-recovery] Execution stranded: all file batches completed but the final aggregating callback never fired before the barrier expired."
        )
    );
    let neg = calls_for(&calls, "exec-neg");
    assert_eq!(neg[1]["organization"], json!("org-b"));
    assert_eq!(
        neg[1]["body"]["error_message"],
        json!(
            "[reaper-recovery] Execution stranded: the barrier was already torn down (remaining < 0) yet the execution was left non-terminal — inconsistent state."
        )
    );
    for id in ["exec-done", "exec-stopped", "exec-gone"] {
        let only = calls_for(&calls, id);
        assert_eq!(only.len(), 1, "{id}: a read and no mark");
        assert_eq!(only[0]["method"], json!("GET"));
    }
    assert!(
        calls_for(&calls, "exec-noorg").is_empty(),
        "an org-less strand is never sent"
    );

    let done = |o: &str| json!({"state": "done", "outcome": o, "attempts": 1, "last_error": null, "barrier": false, "markers": 0});
    assert_eq!(intent(&mut c, "exec-mark"), done("marked_error"));
    assert_eq!(intent(&mut c, "exec-zero"), done("marked_error"));
    assert_eq!(intent(&mut c, "exec-neg"), done("marked_error"));
    assert_eq!(intent(&mut c, "exec-done"), done("already_terminal"));
    assert_eq!(intent(&mut c, "exec-stopped"), done("already_terminal"));
    assert_eq!(intent(&mut c, "exec-gone"), done("gone"));
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(count(*)) FROM pg_barrier_state WHERE execution_id = 'exec-noorg'"
        ),
        json!(1)
    );

    let api = env.api.executions();
    assert_eq!(
        (
            &api["exec-mark"]["status"],
            &api["exec-mark"]["error_marks"]
        ),
        (&json!("ERROR"), &json!(1))
    );
    assert_eq!(
        (
            &api["exec-done"]["status"],
            &api["exec-done"]["error_marks"]
        ),
        (&json!("COMPLETED"), &json!(0))
    );
    assert_eq!(api["exec-stopped"]["status"], json!("STOPPED"));
}

#[test]
fn skipped_mark_means_it_turned_terminal_meanwhile() {
    let env = Env::shared("rskip");
    let mut c = env.db();
    env.stranded_executing(&mut c, "e");
    env.api.faults(json!({"post_delay_ms": 1500}));
    let mut relay = env.spawn_relay(&[]);
    // While the mark is on its way, the execution completes normally.
    wait_for(60, "the mark request", || {
        env.api
            .calls()
            .iter()
            .any(|c| c["method"] == "POST")
            .then_some(())
    });
    env.api.execution("e", "org", "COMPLETED");
    wait_for(60, "the outcome", || {
        equal(intent(&mut c, "e")["state"].clone(), json!("done"))
    });
    relay.terminate();
    assert_eq!(intent(&mut c, "e")["outcome"], json!("already_terminal"));
    assert_eq!(
        env.api.executions()["e"]["status"],
        json!("COMPLETED"),
        "never overwritten"
    );
}

#[test]
fn failures_keep_the_barrier_and_retry_with_backoff_until_dead_then_replay() {
    let env = Env::shared("rfail");
    let mut c = env.db();
    env.api.execution("http", "org", "EXECUTING");
    env.api.execution("weird", "org", "ON_FIRE");
    pg_reaper_tests::strand(&mut c, "http", "org", 1);
    pg_reaper_tests::strand(&mut c, "weird", "org", 1);
    env.reap(&mut c);
    // The API answers, about this one execution, with a 500: a failure of its own, counted.
    env.api
        .faults(json!({"fail_ids": ["http"], "fail_ids_status": 500}));
    wait_for(120, "both intents dead after three failures each", || {
        env.relay_once(&["--max-attempts", "3"]);
        let dead = json(&mut c, "SELECT to_jsonb(outbox_dead) FROM pg_reaper_status");
        equal(dead, json!(2))
    });
    let http = intent(&mut c, "http");
    assert_eq!(
        (&http["state"], &http["attempts"], &http["barrier"]),
        (&json!("dead"), &json!(3), &json!(true))
    );
    assert_eq!(
        http["last_error"],
        json!("status read: HTTP 500: {\"error\":\"injected fault\"}")
    );
    assert_eq!(env.api.executions()["http"]["error_marks"], json!(0));

    // The API is healthy again: the unknown status still fails, the 500 one recovers after replay.
    env.api.faults(json!({}));
    assert_eq!(json(&mut c, "SELECT to_jsonb(outbox_replay())"), json!(2));
    env.relay_once(&["--max-attempts", "3"]);
    let http = intent(&mut c, "http");
    assert_eq!(
        (&http["state"], &http["outcome"], &http["barrier"]),
        (&json!("done"), &json!("marked_error"), &json!(false))
    );
    let weird = intent(&mut c, "weird");
    assert_eq!(
        (&weird["state"], &weird["barrier"]),
        (&json!("pending"), &json!(true))
    );
    assert_eq!(
        weird["last_error"],
        json!("status read: unknown execution status \"ON_FIRE\"")
    );
    assert_eq!(env.api.executions()["weird"]["error_marks"], json!(0));
}

#[test]
fn an_oversized_body_is_a_failure_not_read_whole() {
    let env = Env::shared("rbig");
    let mut c = env.db();
    env.stranded_executing(&mut c, "e");
    env.api.faults(json!({"pad_bytes": 2 << 20}));
    env.relay_once(&[]);
    let i = intent(&mut c, "e");
    assert_eq!(
        (&i["state"], &i["barrier"]),
        (&json!("pending"), &json!(true))
    );
    assert_eq!(
        i["last_error"],
        json!("status read: unusable response body: larger than 1048576 bytes")
    );
    // Just under the limit, the same read is fine.
    env.api.faults(json!({"pad_bytes": 1000}));
    wait_due(&mut c, "e");
    env.relay_once(&[]);
    assert_eq!(intent(&mut c, "e")["outcome"], json!("marked_error"));
}

#[test]
fn a_missing_status_is_indeterminate_and_never_marked() {
    let env = Env::shared("rindet");
    let mut c = env.db();
    env.stranded_executing(&mut c, "e");
    env.api.faults(json!({"missing_status": true}));
    env.relay_once(&[]);
    wait_due(&mut c, "e");
    env.relay_once(&[]);
    let i = intent(&mut c, "e");
    assert_eq!(
        (&i["state"], &i["attempts"], &i["barrier"]),
        (&json!("pending"), &json!(2), &json!(true))
    );
    assert_eq!(
        i["last_error"],
        json!("status read returned no status (indeterminate); not marking")
    );
    assert!(env.api.calls().iter().all(|c| c["method"] == "GET"));
}

#[test]
fn a_wrong_key_is_a_retried_failure_reported_as_configuration() {
    let env = Env::shared("rkey");
    let mut c = env.db();
    env.stranded_executing(&mut c, "e");
    let out = env
        .relay_command(&["--once"])
        .env_remove("PG_REAPER_API_KEY_FILE")
        .env("PG_REAPER_API_KEY", "not-the-key")
        .output()
        .expect("relay");
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("a configuration problem"), "{log}");
    assert!(!log.contains("not-the-key"), "the key is never logged");
    let i = intent(&mut c, "e");
    assert_eq!(
        (&i["state"], &i["barrier"]),
        (&json!("pending"), &json!(true))
    );
    assert_eq!(
        i["last_error"],
        json!(
            "status read: HTTP 401: {\"debug_info\":{},\"detail\":\"API key does not match \
             configured value\",\"error\":\"Invalid internal service API key\"}"
        )
    );
}

#[test]
fn a_rearmed_execution_is_not_marked_and_its_new_run_is_untouched() {
    let env = Env::shared("rrearm");
    let mut c = env.db();
    env.stranded_executing(&mut c, "e");
    env.api.faults(json!({"get_delay_ms": 1500}));
    let mut relay = env.spawn_relay(&[]);
    wait_for(60, "the status read", || {
        (!env.api.calls().is_empty()).then_some(())
    });
    // The execution is re-enqueued while its status read is in flight.
    c.batch_execute("SELECT barrier_enqueue('e', 'org', 5); SELECT barrier_claim('e', 0)")
        .expect("re-arm");
    wait_for(60, "the outcome", || {
        equal(intent(&mut c, "e")["state"].clone(), json!("done"))
    });
    relay.terminate();
    assert_eq!(intent(&mut c, "e")["outcome"], json!("rearmed"));
    assert!(
        env.api.calls().iter().all(|c| c["method"] == "GET"),
        "no mark"
    );
    assert_eq!(
        json(
            &mut c,
            "SELECT jsonb_build_array(remaining, results, (SELECT count(*) FROM pg_batch_dedup)) FROM pg_barrier_state"
        ),
        json!([5, [], 1])
    );
}

#[test]
fn refire_hook_instead_of_a_mark_and_a_raising_hook_is_a_failure() {
    let env = Env::shared("rrefire");
    let mut c = env.db();
    c.batch_execute(
        "CREATE TABLE refired (execution_id text, organization_id text, callback jsonb, results jsonb);
         CREATE FUNCTION public.refire(e text, o text, c jsonb, r jsonb) RETURNS void LANGUAGE plpgsql
         SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
         BEGIN
             IF e = 'bad' THEN RAISE EXCEPTION 'queue unavailable'; END IF;
             INSERT INTO public.refired VALUES (e, o, c, r);
         END $$;",
    )
    .expect("hook");
    env.alter_database("pg_reaper.refire_function = 'public.refire'");
    for id in ["good", "bad", "partial"] {
        env.api.execution(id, "org", "EXECUTING");
    }
    pg_reaper_tests::strand(&mut c, "good", "org", 3);
    pg_reaper_tests::strand(&mut c, "bad", "org", 3);
    pg_reaper_tests::strand(&mut c, "partial", "org", 2);
    env.reap(&mut c);
    env.relay_once(&[]);
    assert_eq!(
        json(&mut c, "SELECT to_jsonb(r) FROM refired r"),
        json!({"execution_id": "good", "organization_id": "org", "callback": {"task_name": "aggregate"}, "results": [0, 1, 2]})
    );
    let good = intent(&mut c, "good");
    assert_eq!(
        (&good["outcome"], &good["barrier"]),
        (&json!("refired"), &json!(true)),
        "the barrier stays as the execution's handle while the callback runs"
    );
    let bad = intent(&mut c, "bad");
    assert_eq!(
        (&bad["state"], &bad["barrier"]),
        (&json!("pending"), &json!(true))
    );
    assert_eq!(
        bad["last_error"],
        json!("re-fire hook public.refire: queue unavailable (SQLSTATE P0001)")
    );
    assert_eq!(
        intent(&mut c, "partial")["outcome"],
        json!("marked_error"),
        "remaining > 0: marked"
    );
    let calls = env.api.calls();
    assert!(
        calls_for(&calls, "good")
            .iter()
            .chain(calls_for(&calls, "bad").iter())
            .all(|c| c["method"] == "GET")
    );

    // The re-fired callback completes the execution; once the stuck timeout has passed since
    // the re-fire, a status read finds it terminal and removes the barrier, unmarked.
    env.api.execution("good", "org", "COMPLETED");
    c.batch_execute(
        "UPDATE pg_barrier_state SET last_progress_at = now() - interval '1 hour',
                expires_at = now() - interval '1 second'
          WHERE execution_id = 'good' AND refired_at IS NOT NULL",
    )
    .expect("the stuck timeout passed since the re-fire");
    env.reap(&mut c);
    env.relay_once(&[]);
    let good = intent(&mut c, "good");
    assert_eq!(
        (&good["outcome"], &good["barrier"], &good["markers"]),
        (&json!("already_terminal"), &json!(false), &json!(0))
    );
    assert_eq!(
        json(&mut c, "SELECT to_jsonb(count(*)) FROM refired"),
        json!(1),
        "re-fired once"
    );
    assert_eq!(env.api.executions()["good"]["error_marks"], json!(0));
}

/// The hook runs as its owner, never as the superuser who owns the extension's SECURITY
/// DEFINER functions: an application schema owner who writes a hook cannot use it to become
/// superuser.
#[test]
fn native_refire_hook_runs_as_its_owner_and_cannot_escalate() {
    let env = Env::shared("rhookowner");
    let mut c = env.db();
    c.batch_execute(
        "CREATE ROLE app_owner LOGIN;
         CREATE SCHEMA app AUTHORIZATION app_owner;",
    )
    .expect("roles");
    env.alter_database("pg_reaper.refire_function = 'app.refire'");
    let mut owner = env.cluster.client_as(&env.db, "app_owner");
    owner
        .batch_execute(
            "CREATE TABLE app.jobs (execution_id text, ran_as text);
             CREATE FUNCTION app.refire(e text, o text, c jsonb, r jsonb) RETURNS void
             LANGUAGE plpgsql AS $$
             BEGIN
                 IF e = 'escalate' THEN EXECUTE 'ALTER ROLE app_owner SUPERUSER'; END IF;
                 INSERT INTO app.jobs VALUES (e, current_user);
             END $$;",
        )
        .expect("the application's hook, owned by its schema owner");
    for id in ["job", "escalate"] {
        env.api.execution(id, "org", "EXECUTING");
        pg_reaper_tests::strand(&mut c, id, "org", 3);
    }
    env.reap(&mut c);
    env.relay_once(&[]);
    assert_eq!(
        json(&mut c, "SELECT jsonb_agg(to_jsonb(j)) FROM app.jobs j"),
        json!([{"execution_id": "job", "ran_as": "app_owner"}]),
        "the hook ran, as its owner"
    );
    assert_eq!(intent(&mut c, "job")["outcome"], json!("refired"));
    let escalate = intent(&mut c, "escalate");
    assert_eq!(
        (&escalate["state"], &escalate["barrier"]),
        (&json!("pending"), &json!(true)),
        "a failing hook is a retried failure: {escalate}"
    );
    let error = escalate["last_error"].as_str().unwrap_or_default();
    // The words differ between majors ("must be superuser to alter superuser roles…" up to
    // 15, "permission denied to alter role" from 16); the SQLSTATE does not.
    assert!(
        error.starts_with("re-fire hook app.refire: ") && error.ends_with("(SQLSTATE 42501)"),
        "{error}"
    );
    let superuser: bool = c
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = 'app_owner'",
            &[],
        )
        .expect("role")
        .get(0);
    assert!(!superuser, "the hook's owner stayed an ordinary role");
}

/// A Postgres error reaches `last_error` and the log with its own message and SQLSTATE, not
/// as a bare "db error".
#[test]
fn database_errors_are_reported_with_their_message_and_sqlstate() {
    let env = Env::shared("rsqlstate");
    let mut c = env.db();
    env.alter_database("pg_reaper.refire_function = 'public.missing'");
    env.api.execution("lost-callback", "org", "EXECUTING");
    pg_reaper_tests::strand(&mut c, "lost-callback", "org", 3);
    env.reap(&mut c);
    let out = env.relay_once(&["--max-attempts", "1"]);
    let state = intent(&mut c, "lost-callback");
    assert_eq!(state["state"], json!("dead"), "{state}");
    let expected = "re-check: pg_reaper.refire_function = 'public.missing' does not name a \
                    function f(text, text, jsonb, jsonb); fix the setting (or set it to '' to \
                    mark ERROR instead) (SQLSTATE 42883)";
    assert_eq!(state["last_error"], json!(expected));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("SQLSTATE 42883"), "{log}");
}

/// An execution id from the platform's own rows may be huge; log lines carry its start and its
/// length only.
#[test]
fn huge_execution_ids_are_bounded_in_the_log() {
    let env = Env::shared("rhugeid");
    let mut c = env.db();
    // Written as the platform's own SQL would (pg_reaper's functions refuse ids over 1 kB).
    c.batch_execute(
        "INSERT INTO pg_barrier_state (execution_id, organization_id, remaining, created_at, expires_at)
         VALUES (repeat('x', 150000), 'org', 1, now() - interval '2 hours', now() - interval '1 second')",
    )
    .expect("a 150 kB id");
    assert_eq!(env.reap(&mut c), 1);
    let out = env.relay_once(&["--max-attempts", "1"]);
    let log = String::from_utf8_lossy(&out.stderr);
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2000, "a log line of {longest} bytes");
    assert!(log.contains("… (150000 bytes)"), "{log}");
    let error: Option<String> = c
        .query_one("SELECT last_error FROM pg_reaper_outbox", &[])
        .expect("intent")
        .get(0);
    assert!(error.as_deref().map_or(0, str::len) < 2000, "{error:?}");
}

/// Without the preloaded worker, nothing re-offers the claims of a relay that was killed:
/// another relay's claim takes them over once their lease has expired.
#[test]
fn without_the_worker_a_killed_relays_claims_are_taken_over_after_the_lease() {
    let env = Env::shared("rtakeover");
    let mut c = env.db();
    let ids = ["k0", "k1", "k2", "k3"];
    for id in ids {
        env.stranded_executing(&mut c, id);
    }
    // Status reads hang, so the first relay holds all four claims when it is killed.
    env.api.faults(json!({"get_delay_ms": 600_000}));
    let mut first = env.spawn_relay(&[
        "--http-timeout",
        "600s",
        "--settle-delay",
        "600s",
        "--lease",
        "3s",
    ]);
    let in_flight = |c: &mut Client| -> i64 {
        c.query_one(
            "SELECT count(*) FROM pg_reaper_outbox WHERE state = 'in_flight'",
            &[],
        )
        .expect("count")
        .get(0)
    };
    wait_for(60, "the first relay to claim all four", || {
        equal(in_flight(&mut c), 4)
    });
    first.child.kill().expect("SIGKILL");
    first.child.wait().expect("reaped");
    env.api.faults(json!({}));
    wait_for(60, "the dead relay's leases to expire", || {
        let expired: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_reaper_outbox
                  WHERE state = 'in_flight' AND lease_expires_at < now()",
                &[],
            )
            .expect("count")
            .get(0);
        equal(expired, 4)
    });
    env.relay_once(&[]);
    let calls = env.api.calls();
    for id in ids {
        let state = intent(&mut c, id);
        assert_eq!(
            (&state["outcome"], &state["attempts"], &state["barrier"]),
            (&json!("marked_error"), &json!(2), &json!(false)),
            "{id}: {state}"
        );
        let posts = calls_for(&calls, id)
            .iter()
            .filter(|c| c["method"] == "POST")
            .count();
        assert_eq!(posts, 1, "{id} marked once");
    }
}

/// A run of 10,000 files: read with `?file_execution=false`, the status fits in a small body
/// (asked without it, the API would send every file execution: megabytes, over the limit).
#[test]
fn a_large_run_is_read_without_its_file_executions() {
    let env = Env::shared("rbigrun");
    let mut c = env.db();
    env.api.admin(
        "PUT",
        "executions/big",
        Some(&json!({"organization_id": "org", "status": "EXECUTING", "file_executions": 10000})),
    );
    pg_reaper_tests::strand(&mut c, "big", "org", 1);
    env.reap(&mut c);
    env.relay_once(&[]);
    assert_eq!(intent(&mut c, "big")["outcome"], json!("marked_error"));
    let gets: Vec<Value> = env
        .api
        .calls()
        .into_iter()
        .filter(|c| c["method"] == "GET")
        .collect();
    assert!(!gets.is_empty());
    for get in gets {
        assert_eq!(get["query"], json!("file_execution=false"), "{get}");
    }
    // What the parameter saves: the same read without it is over the relay's 1 MiB limit.
    let (code, body) = env.api.request(
        "GET",
        "/internal/v1/workflow-execution/big/",
        None,
        common::KEY,
    );
    assert_eq!(code, 200);
    assert!(body.to_string().len() > 1 << 20);
}

/// An operator recovers executions that are not stranded (barrier_recover): the relay reads
/// the status first (terminal and gone ones are only cleaned up), marks ERROR or re-fires the
/// callback as asked, and removes the barrier; a second request returns the live intent.
#[test]
fn barrier_recover_is_carried_out_by_the_relay_with_every_rule_but_the_stranded_check() {
    let env = Env::shared("rrecover");
    let mut c = env.db();
    c.batch_execute(
        "CREATE TABLE refired (execution_id text, results jsonb);
         CREATE FUNCTION public.refire(e text, o text, c jsonb, r jsonb) RETURNS void
         LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
         AS $$ INSERT INTO public.refired VALUES (e, r) $$;",
    )
    .expect("hook");
    env.alter_database("pg_reaper.refire_function = 'public.refire'");
    let mut c = env.db(); // a session that has the database's setting
    for (id, status) in [
        ("err", Some("EXECUTING")),
        ("fire", Some("EXECUTING")),
        ("term", Some("COMPLETED")),
        ("gone", None),
        ("twice", Some("EXECUTING")),
    ] {
        if let Some(status) = status {
            env.api.execution(id, "org", status);
        }
        c.execute(
            "SELECT barrier_enqueue($1, 'org', 3, '1 hour', '{\"task\": \"agg\"}')",
            &[&id],
        )
        .expect("enqueue");
        c.execute(
            "SELECT barrier_claim($1, 0), barrier_decrement($1, '7')",
            &[&id],
        )
        .expect("one batch done");
    }
    let recover = |c: &mut Client, id: &str, action: &str| -> i64 {
        c.query_one("SELECT barrier_recover($1, $2)", &[&id, &action])
            .expect("recover")
            .get(0)
    };
    for id in ["err", "term", "gone", "twice"] {
        recover(&mut c, id, "error");
    }
    recover(&mut c, "fire", "refire");
    let first = recover(&mut c, "twice", "error");
    assert_eq!(
        recover(&mut c, "twice", "error"),
        first,
        "the live intent, again"
    );
    env.relay_once(&[]);

    let api = env.api.executions();
    for (id, outcome, kept) in [
        ("err", "marked_error", false),
        ("fire", "refired", true),
        ("term", "already_terminal", false),
        ("gone", "gone", false),
        ("twice", "marked_error", false),
    ] {
        let i = intent(&mut c, id);
        assert_eq!(
            (&i["outcome"], &i["barrier"], &i["markers"]),
            (&json!(outcome), &json!(kept), &json!(i32::from(kept))),
            "{id}: {i}"
        );
    }
    assert_eq!(api["err"]["error_marks"], json!(1));
    assert_eq!(api["twice"]["error_marks"], json!(1));
    assert_eq!(
        (&api["term"]["status"], &api["term"]["error_marks"]),
        (&json!("COMPLETED"), &json!(0))
    );
    assert_eq!(api["fire"]["error_marks"], json!(0), "re-fired, not marked");
    assert_eq!(
        json(&mut c, "SELECT jsonb_agg(to_jsonb(r)) FROM refired r"),
        json!([{"execution_id": "fire", "results": [7]}])
    );
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(count(*)) FROM pg_reaper_outbox WHERE execution_id = 'twice'"
        ),
        json!(1)
    );
}

#[test]
fn metrics_healthz_and_sigterm_leave_nothing_in_flight() {
    let env = Env::shared("rmetrics");
    let mut c = env.db();
    for i in 0..6 {
        let id = format!("e{i}");
        env.api.execution(&id, "org", "EXECUTING");
        pg_reaper_tests::strand(&mut c, &id, "org", 1);
    }
    env.reap(&mut c);
    let port = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut relay = env.spawn_relay(&["--listen", &listen, "--concurrency", "2"]);
    wait_for(60, "all recovered", || {
        (json(
            &mut c,
            "SELECT to_jsonb(count(*)) FROM pg_reaper_outbox WHERE state = 'done'",
        ) == json!(6))
        .then_some(())
    });
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", relay.child.id())).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&cmdline).contains(KEY),
        "the key is not in the process list"
    );
    let environ = std::fs::read(format!("/proc/{}/environ", relay.child.id())).unwrap_or_default();
    assert!(
        !String::from_utf8_lossy(&environ).contains(KEY),
        "only the key file's path is"
    );
    // A task counts its outcome and leaves in_flight after its transaction committed: the rows
    // can be seen done before the counters move.
    let counted = [
        "pg_reaper_relay_outcomes_total{outcome=\"marked_error\"} 6",
        "pg_reaper_relay_intents_claimed_total 6",
        "pg_reaper_relay_http_request_duration_seconds_count{result=\"answered\"} 12",
        "pg_reaper_relay_in_flight 0",
    ];
    let metrics = wait_for(60, "the six recoveries counted in /metrics", || {
        let (code, metrics) = common::http_get(&listen, "/metrics");
        if code == 200 && counted.iter().all(|line| metrics.contains(line)) {
            Ok(metrics)
        } else {
            Err(format!("{code}: {metrics}"))
        }
    });
    assert!(!metrics.contains(KEY));
    assert_eq!(common::http_get(&listen, "/healthz").0, 200);

    // SIGTERM while intents are in flight: they finish, nothing stays in_flight, exit 0.
    for i in 6..10 {
        let id = format!("e{i}");
        env.api.execution(&id, "org", "EXECUTING");
        pg_reaper_tests::strand(&mut c, &id, "org", 1);
    }
    env.api.faults(json!({"get_delay_ms": 800}));
    env.reap(&mut c);
    wait_for(60, "work in flight", || {
        (json(
            &mut c,
            "SELECT to_jsonb(count(*)) FROM pg_reaper_outbox WHERE state = 'in_flight'",
        ) != json!(0))
        .then_some(())
    });
    let (status, log) = relay.terminate();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(count(*)) FROM pg_reaper_outbox WHERE state = 'in_flight'"
        ),
        json!(0)
    );
    assert!(log.contains("relay stopped"), "{log}");
    assert!(!log.contains(KEY), "the key is never logged");
}

#[test]
fn bad_configuration_is_one_clear_line_and_a_failure() {
    let env = Env::shared("rconfig");
    let run = |args: &[&str], env_changes: &dyn Fn(&mut std::process::Command)| {
        let mut cmd = env.relay_command(args);
        env_changes(&mut cmd);
        let out = cmd.output().expect("relay");
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        (
            out.status.code(),
            stderr.lines().next().unwrap_or("").to_string(),
        )
    };
    type EnvChange = fn(&mut std::process::Command);
    let cases: [(&[&str], EnvChange, &str); 7] = [
        (
            &["--once"],
            |c| {
                c.env_remove("PG_REAPER_API_BASE_URL");
            },
            "--api-base-url",
        ),
        (&["--once", "--lease", "soon"], |_| {}, "--lease"),
        (
            &["--once", "--backoff-base", "-1"],
            |_| {},
            "--backoff-base",
        ),
        (&["--once", "--backoff-max", "-5s"], |_| {}, "--backoff-max"),
        (
            &["--once"],
            |c| {
                c.env("PG_REAPER_API_KEY_FILE", "/nonexistent/key");
            },
            "--api-key-file",
        ),
        (&["--once", "--concurrency", "0"], |_| {}, "--concurrency"),
        (
            &["--once"],
            |c| {
                c.env("PG_REAPER_HTTP_TIMEOUT", "0");
            },
            "--http-timeout",
        ),
    ];
    for (args, change, flag) in cases {
        let (code, line) = run(args, &change);
        assert_ne!(code, Some(0), "{flag}");
        assert!(line.contains(flag), "{flag}: {line}");
    }
}

/// The relay shares the platform's env file: its INTERNAL_API_BASE_URL and
/// INTERNAL_SERVICE_API_KEY when pg_reaper's own are unset (pg_reaper's win when set), and its
/// durations in bare seconds (INTERNAL_API_TIMEOUT=120 style).
#[test]
fn the_platforms_own_variables_and_bare_seconds() {
    let env = Env::shared("rplatform");
    let mut c = env.db();
    env.api.execution("plat-1", "org", "EXECUTING");
    pg_reaper_tests::strand(&mut c, "plat-1", "org", 1);
    env.reap(&mut c);
    let key = std::fs::read_to_string(&env.key_file).expect("key");
    let mut cmd = env.relay_command(&["--once"]);
    cmd.env_remove("PG_REAPER_API_BASE_URL")
        .env_remove("PG_REAPER_API_KEY_FILE")
        .env_remove("PG_REAPER_DATABASE_URL")
        .env("INTERNAL_API_BASE_URL", env.api.base_url())
        .env("INTERNAL_SERVICE_API_KEY", key.trim())
        .env("DB_HOST", "127.0.0.1")
        .env("DB_PORT", env.cluster.port.to_string())
        .env("DB_USER", "postgres")
        // Unused (trust), but it must survive the connection string's quoting.
        .env("DB_PASSWORD", r"it's a \ secret")
        .env("DB_NAME", &env.db)
        .env("PG_REAPER_HTTP_TIMEOUT", "120")
        .env("PG_REAPER_SETTLE_DELAY", "240");
    let out = common::run_ok(&mut cmd);
    assert!(out.status.success());
    assert_eq!(
        common::intent(&mut c, "plat-1")["outcome"],
        json!("marked_error")
    );
    // pg_reaper's own variable wins over the platform's.
    env.api.execution("plat-2", "org", "EXECUTING");
    pg_reaper_tests::strand(&mut c, "plat-2", "org", 1);
    env.reap(&mut c);
    let mut cmd = env.relay_command(&["--once"]);
    cmd.env("INTERNAL_API_BASE_URL", "http://127.0.0.1:9/nowhere")
        .env("INTERNAL_SERVICE_API_KEY", "wrong");
    common::run_ok(&mut cmd);
    assert_eq!(
        common::intent(&mut c, "plat-2")["outcome"],
        json!("marked_error")
    );
}

#[test]
fn https_to_the_api_with_a_custom_ca() {
    let env = Env::shared("rtls");
    let mut c = env.db();
    // An execution the API does not know: its recovery is one GET (404 → gone), over TLS.
    pg_reaper_tests::strand(&mut c, "over-tls", "org", 1);
    env.reap(&mut c);
    let tls_api = common::SampleApi::start_tls(&env.key_file, common::free_port());
    let tls = common::TLS_DIR;
    let base = tls_api.base_url();

    // Without the CA the server's certificate is not trusted: a failure, nothing changes.
    let out = env
        .relay_command(&["--once"])
        .env("PG_REAPER_API_BASE_URL", &base)
        .output()
        .expect("relay");
    assert!(out.status.success());
    let i = intent(&mut c, "over-tls");
    assert_eq!(
        (&i["state"], &i["barrier"]),
        (&json!("pending"), &json!(true))
    );
    let error = i["last_error"].as_str().unwrap_or("");
    assert!(error.contains("UnknownIssuer"), "{error}");

    wait_due(&mut c, "over-tls");
    common::run_ok(
        env.relay_command(&["--once", "--api-ca-file", &format!("{tls}/ca.pem")])
            .env("PG_REAPER_API_BASE_URL", &base),
    );
    let i = intent(&mut c, "over-tls");
    assert_eq!(
        (&i["state"], &i["outcome"], &i["barrier"]),
        (&json!("done"), &json!("gone"), &json!(false))
    );

    // A CA file that is not a certificate is a configuration error naming the flag.
    let out = env
        .relay_command(&["--once", "--api-ca-file", &format!("{tls}/README.md")])
        .output()
        .expect("relay");
    assert_eq!(out.status.code(), Some(2));
    let first = String::from_utf8_lossy(&out.stderr)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    assert!(first.contains("--api-ca-file"), "{first}");
}

/// An id the URL would change (a tab, a newline: the URL standard drops them) never reaches the
/// API as another execution. The platform's own SQL can write such a row (barrier_enqueue
/// refuses it); the relay fails the intent as a bad request, marks nothing, keeps the barrier.
#[test]
fn ids_a_url_would_change_are_never_sent() {
    let env = Env::shared("rctlid");
    let mut c = env.db();
    env.api.execution("ab", "org-a", "EXECUTING");
    for id in ["a\tb", "ctl\u{1}\n"] {
        c.execute(
            "INSERT INTO pg_barrier_state (execution_id, organization_id, remaining, results,
                                           created_at, expires_at, last_progress_at)
             VALUES ($1, 'org-a', 1, '[]', now() - interval '2 hours', now() - interval '1 hour',
                     now() - interval '2 hours')",
            &[&id],
        )
        .expect("platform-written barrier");
    }
    assert_eq!(env.reap(&mut c), 2);
    env.relay_once(&[]);
    let calls = env.api.calls();
    assert!(calls.is_empty(), "no request for either id: {calls:?}");
    let api = env.api.executions();
    assert_eq!(api["ab"]["status"], json!("EXECUTING"));
    for id in ["a\tb", "ctl\u{1}\n"] {
        let row: Value = c
            .query_one(
                "SELECT jsonb_build_object('state', o.state, 'failures', o.failures,
                        'error', o.last_error, 'barrier', EXISTS (SELECT 1 FROM pg_barrier_state b
                                                             WHERE b.execution_id = o.execution_id))
                   FROM pg_reaper_outbox o WHERE o.execution_id = $1",
                &[&id],
            )
            .expect("intent")
            .get(0);
        assert_eq!(
            (&row["state"], &row["failures"], &row["barrier"]),
            (&json!("pending"), &json!(1), &json!(true)),
            "{id:?}: {row}"
        );
        assert!(
            row["error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot be a URL path segment")),
            "{row}"
        );
    }
}

/// The relay cannot tell the editions apart: over the extension-free edition (installed by an
/// ordinary role, ticked by `pg_reaper_tick()`), the same recoveries, the same calls.
#[test]
fn the_extension_free_edition_is_recovered_the_same_way() {
    let env = Env::portable("rportable");
    let mut c = env.db();
    env.api.execution("p-mark", "org", "EXECUTING");
    env.api.execution("p-done", "org", "COMPLETED");
    pg_reaper_tests::strand(&mut c, "p-mark", "org", 1);
    pg_reaper_tests::strand(&mut c, "p-done", "org", 1);
    assert_eq!(
        json(&mut c, "SELECT to_jsonb(pg_reaper_tick())"),
        json!(2),
        "one tick queues both strands"
    );
    env.relay_once(&[]);
    let calls = env.api.calls();
    let marks: Vec<&Value> = calls.iter().filter(|c| c["method"] == "POST").collect();
    assert_eq!(marks.len(), 1, "one ERROR mark: {calls:?}");
    assert_eq!(
        marks[0]["path"],
        json!("/internal/v1/workflow-execution/p-mark/update_status/")
    );
    assert_eq!(
        json(
            &mut c,
            "SELECT jsonb_object_agg(execution_id, outcome) FROM pg_reaper_outbox"
        ),
        json!({"p-mark": "marked_error", "p-done": "already_terminal"})
    );
    assert_eq!(
        json(&mut c, "SELECT to_jsonb(count(*)) FROM pg_barrier_state"),
        json!(0),
        "both recovery handles went once recovery was confirmed"
    );
    // --once with --reap-interval ticks first, then drains what the tick queued.
    env.api.execution("p-once", "org", "EXECUTING");
    pg_reaper_tests::strand(&mut c, "p-once", "org", 1);
    env.relay_once(&["--reap-interval", "1s"]);
    assert_eq!(
        intent(&mut c, "p-once")["outcome"],
        json!("marked_error"),
        "a one-shot relay ticks before its pass"
    );
}

/// Relays drive the extension-free edition's ticks: several may, one ticks at a time and the
/// others skip without waiting, and every strand is queued and marked once.
#[test]
fn relays_tick_the_extension_free_edition_one_at_a_time() {
    let env = Env::portable("rticks");
    let mut c = env.db();
    for id in ["t1", "t2", "t3"] {
        env.api.execution(id, "org", "EXECUTING");
        pg_reaper_tests::strand(&mut c, id, "org", 1);
    }
    // Another driver is ticking: it holds the tick's record.
    let mut other = env.db();
    let mut ticking = other.transaction().expect("begin");
    ticking
        .batch_execute("SELECT FROM pg_reaper_ticks FOR UPDATE")
        .expect("hold the tick");
    let relays: Vec<_> = (0..2)
        .map(|_| {
            let mut cmd = env.relay_command(&["--reap-interval", "200ms"]);
            cmd.env("RUST_LOG", "info,pg_reaper_relay::ticker=debug");
            env.spawn_command(cmd)
        })
        .collect();
    for (n, relay) in relays.iter().enumerate() {
        wait_for(
            60,
            &format!("relay {n} skipping twice, not waiting"),
            || (relay.log().matches("another driver is ticking").count() >= 2).then_some(()),
        );
    }
    assert_eq!(
        json(&mut c, "SELECT to_jsonb(count(*)) FROM pg_reaper_outbox"),
        json!(0),
        "nothing is queued while another driver ticks"
    );
    ticking.commit().expect("release the tick");
    wait_for(60, "every strand recovered", || {
        equal(
            json(
                &mut c,
                "SELECT to_jsonb(count(*)) FROM pg_reaper_outbox WHERE outcome = 'marked_error'",
            ),
            json!(3),
        )
    });
    let calls = env.api.calls();
    for id in ["t1", "t2", "t3"] {
        let marks = calls_for(&calls, id)
            .into_iter()
            .filter(|c| c["method"] == "POST")
            .count();
        assert_eq!(marks, 1, "{id} marked once: {calls:?}");
    }
    assert_eq!(
        json(
            &mut c,
            "SELECT jsonb_build_array(ticks > 0, failed_ticks) FROM pg_reaper_ticks"
        ),
        json!([true, 0])
    );
}

/// The native extension's worker reaps: --reap-interval says so once and the relay drains on.
#[test]
fn native_reap_interval_is_refused_by_the_extension_and_the_relay_drains_on() {
    let env = Env::shared("rnotick");
    let mut c = env.db();
    env.stranded_executing(&mut c, "n1");
    let relay = env.spawn_relay(&["--reap-interval", "200ms"]);
    wait_for(60, "the error naming the native worker", || {
        relay
            .log()
            .contains("there is no pg_reaper_tick(): the pg_reaper extension is installed")
            .then_some(())
    });
    wait_for(60, "the strand recovered", || {
        equal(
            intent(&mut c, "n1")["outcome"].clone(),
            json!("marked_error"),
        )
    });
}

/// Heal before the stuck timeout: a completed barrier whose callback was lost is re-fired once
/// the callback timeout passed (one whose descriptor the hook declines keeps its deadline and is
/// never marked early), a batch whose worker died is claimed again by its redelivery under a new
/// lease, the stale worker's late decrement is fenced, and a batch nobody claimed again within
/// the reclaim timeout gets its execution marked ERROR, once. The stuck timeout (2.5 hours) is
/// never reached.
#[test]
fn lost_callbacks_are_refired_and_dead_batches_reclaimed_or_marked_before_the_stuck_timeout() {
    let env = Env::shared("rheal");
    let mut c = env.db();
    c.batch_execute(
        "CREATE TABLE public.refired (e text);
         CREATE FUNCTION public.refire(e text, o text, c jsonb, r jsonb) RETURNS void LANGUAGE plpgsql
         SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
         BEGIN
             IF c ? 'celery' THEN RAISE EXCEPTION 'not on this queue' USING ERRCODE = 'feature_not_supported'; END IF;
             INSERT INTO public.refired VALUES (e);
         END $$;
         INSERT INTO pg_reaper_settings VALUES ('pg_reaper.refire_function', 'public.refire'),
             ('pg_reaper.callback_timeout', '1'), ('pg_reaper.reclaim_timeout', '1');",
    )
    .expect("hook and settings");
    for id in ["lost", "celery", "healed", "dead"] {
        env.api.execution(id, "org", "EXECUTING");
    }
    // Both callbacks lost: every batch counted down, nobody finished the barrier.
    c.batch_execute(
        "SELECT barrier_enqueue('lost', 'org', 1, '1 hour', '{\"task\": \"aggregate\"}'),
                barrier_enqueue('celery', 'org', 1, '1 hour', '{\"celery\": true}');
         SELECT barrier_decrement('lost', '1'), barrier_decrement('celery', '1');",
    )
    .expect("callbacks lost");
    // Two batches under leases of a second whose workers die.
    let token = |c: &mut Client, id: &str| -> Option<i64> {
        c.query_one("SELECT barrier_claim_lease($1, 0, '1 second')", &[&id])
            .expect("claim")
            .get(0)
    };
    c.batch_execute(
        "SELECT barrier_enqueue('healed', 'org', 1), barrier_enqueue('dead', 'org', 1)",
    )
    .expect("enqueue");
    let stale = token(&mut c, "healed").expect("first claim");
    token(&mut c, "dead").expect("first claim");
    assert_eq!(token(&mut c, "healed"), None, "the lease lives");
    wait_for(60, "the leases to lapse", || {
        equal(
            json(
                &mut c,
                "SELECT to_jsonb(count(*)) FROM pg_batch_dedup WHERE lease_expires_at < now()",
            ),
            json!(2),
        )
    });
    // The queue redelivers 'healed': claimed again with a new token, and counted once.
    let fresh = token(&mut c, "healed").expect("a lapsed lease is claimed again");
    assert!(fresh > stale);
    let decrement = |c: &mut Client, token: i64| -> Value {
        json(
            c,
            &format!(
                "SELECT to_jsonb(d.status) FROM barrier_decrement_lease('healed', 0, {token}, '1') d"
            ),
        )
    };
    assert_eq!(decrement(&mut c, stale), json!("fenced"));
    assert_eq!(decrement(&mut c, fresh), json!("complete"));
    c.batch_execute("SELECT barrier_finish('healed')")
        .expect("finish");
    assert_eq!(decrement(&mut c, stale), json!("fenced"));

    wait_for(60, "the callback and reclaim timeouts to pass", || {
        equal(
            json(
                &mut c,
                "SELECT jsonb_build_array(
                     (SELECT count(*) FROM pg_barrier_state WHERE callback_due_at < now()),
                     (SELECT count(*) FROM pg_batch_dedup
                       WHERE lease_expires_at < now() - interval '1 second'))",
            ),
            json!([2, 1]),
        )
    });
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(c) FROM pg_reaper_cut_deadlines(100) c"
        ),
        json!({"cut": 2, "lapsed": 1, "full_": false})
    );
    assert_eq!(env.reap(&mut c), 3);
    env.relay_once(&[]);
    assert_eq!(
        json(&mut c, "SELECT jsonb_agg(e) FROM public.refired"),
        json!(["lost"])
    );
    let outcomes =
        |c: &mut Client| ["lost", "celery", "dead"].map(|id| intent(c, id)["outcome"].clone());
    assert_eq!(
        outcomes(&mut c),
        [json!("refired"), json!("rearmed"), json!("marked_error")]
    );
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(array[barrier_explain('celery')->>'state',
                                   (expires_at > now() + interval '50 minutes')::text])
               FROM pg_barrier_state WHERE execution_id = 'celery'"
        ),
        json!(["complete_awaiting_finish", "true"]),
        "the declined one waits for its own deadline again"
    );
    let executions = env.api.executions();
    for (id, marks) in [("lost", 0), ("celery", 0), ("healed", 0), ("dead", 1)] {
        assert_eq!(executions[id]["error_marks"], json!(marks), "{id}");
    }
    // Nothing more to cut or queue.
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(c) FROM pg_reaper_cut_deadlines(100) c"
        ),
        json!({"cut": 0, "lapsed": 0, "full_": false})
    );
    assert_eq!(env.reap(&mut c), 0);
}
