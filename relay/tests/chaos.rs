//! Fault injection: relays SIGKILLed at random points, two relays at once, Postgres restarted
//! mid-drain, the API down and back. After each, the recovery invariants are checked:
//! at most one ERROR mark per execution, no terminal execution overwritten, no barrier deleted
//! before its recovery was confirmed, and every intent eventually done.

mod common;

use common::{Env, SampleApi, sleep_ms};
use pg_reaper_tests::{equal, json, wait_for};
use postgres::Client;
use serde_json::{Value, json};

/// `n` stranded executions: every 5th already COMPLETED, every 7th unknown to the API (gone),
/// the rest EXECUTING. Returns (id, what the API said at the start).
fn fleet(env: &Env, c: &mut Client, n: usize) -> Vec<(String, &'static str)> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("x{i:04}");
        let status = if i % 5 == 0 {
            "COMPLETED"
        } else if i % 7 == 0 {
            "GONE"
        } else {
            "EXECUTING"
        };
        if status != "GONE" {
            env.api.execution(&id, "org", status);
        }
        ids.push((id, status));
    }
    c.execute(
        "SELECT barrier_enqueue('x' || lpad(i::text, 4, '0'), 'org', 3, '1 hour', '{\"task_name\": \"agg\"}')
           FROM generate_series(0, $1 - 1) i",
        &[&(n as i32)],
    )
    .expect("enqueue");
    c.batch_execute(
        "UPDATE pg_barrier_state SET created_at = now() - interval '2 hours', expires_at = now() - interval '1 second';
         SELECT barrier_claim(execution_id, 0) FROM pg_barrier_state;",
    )
    .expect("strand");
    // Reaped by hand, or already by a preloaded worker's tick: either way one intent each.
    env.reap(c);
    let queued: i64 = c
        .query_one(
            "SELECT count(DISTINCT execution_id) FROM pg_reaper_outbox
              WHERE execution_id LIKE 'x____'",
            &[],
        )
        .expect("intents")
        .get(0);
    assert_eq!(queued, n as i64, "every strand of the fleet queued");
    ids
}

/// Holds at every instant, whatever was killed: an intent that is not done still has its
/// barrier, and a confirmed recovery left no barrier behind.
fn no_handle_lost(c: &mut Client) {
    assert_eq!(
        json(
            c,
            "SELECT jsonb_build_array(
                 (SELECT count(*) FROM pg_reaper_outbox o WHERE o.state <> 'done'
                     AND NOT EXISTS (SELECT 1 FROM pg_barrier_state b WHERE b.execution_id = o.execution_id)),
                 (SELECT count(*) FROM pg_reaper_outbox o WHERE o.outcome IN ('marked_error', 'already_terminal', 'gone')
                     AND EXISTS (SELECT 1 FROM pg_barrier_state b WHERE b.execution_id = o.execution_id)))"
        ),
        json!([0, 0]),
        "[pending intents without a barrier, confirmed recoveries with a barrier]"
    );
}

fn all_done(c: &mut Client, n: usize) -> bool {
    json(
        c,
        "SELECT to_jsonb(count(*)) FROM pg_reaper_outbox WHERE state = 'done'",
    ) == json!(n)
}

fn final_invariants(env: &Env, c: &mut Client, fleet: &[(String, &str)]) {
    no_handle_lost(c);
    let api = env.api.executions();
    let outcomes: Value = json(
        c,
        "SELECT jsonb_object_agg(execution_id, outcome) FROM pg_reaper_outbox",
    );
    for (id, start) in fleet {
        let outcome = outcomes[id].as_str().unwrap_or("none");
        match *start {
            "COMPLETED" => {
                assert_eq!(
                    api[id]["status"],
                    json!("COMPLETED"),
                    "{id}: never overwritten"
                );
                assert_eq!(api[id]["error_marks"], json!(0), "{id}");
                assert_eq!(outcome, "already_terminal", "{id}");
            }
            "GONE" => assert_eq!(outcome, "gone", "{id}"),
            _ => {
                assert_eq!(
                    api[id]["error_marks"],
                    json!(1),
                    "{id}: exactly one ERROR mark"
                );
                assert_eq!(api[id]["status"], json!("ERROR"), "{id}");
                // A relay killed between its mark and its commit: the next one finds it terminal.
                assert!(
                    ["marked_error", "already_terminal"].contains(&outcome),
                    "{id}: {outcome}"
                );
            }
        }
    }
    assert_eq!(
        json(c, "SELECT to_jsonb(count(*)) FROM pg_barrier_state"),
        json!(0),
        "every handle went, after recovery"
    );
    assert_eq!(
        json(c, "SELECT to_jsonb(count(*)) FROM pg_batch_dedup"),
        json!(0)
    );
}

/// A small deterministic sequence of "random" delays, different per test.
fn delays(seed: u64, n: usize, min_ms: u64, span_ms: u64) -> Vec<u64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            min_ms + x % span_ms
        })
        .collect()
}

#[test]
fn relays_sigkilled_at_random_points_lose_nothing_and_mark_once() {
    let env = Env::new("ckill", true);
    let mut c = env.db();
    let fleet = fleet(&env, &mut c, 300);
    env.api.faults(json!({"delay_ms": 15}));
    // PG_REAPER_CHAOS_SEED replays a schedule; otherwise a new one, printed for that purpose.
    let seed = std::env::var("PG_REAPER_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(7)
        });
    eprintln!("kill schedule seed {seed} (PG_REAPER_CHAOS_SEED={seed} to replay it)");
    for pause in delays(seed, 6, 0, 300) {
        let relay = env.spawn_relay(&["--concurrency", "8", "--lease", "3s"]);
        // Once it works (or there is nothing left to work on), a random moment later: SIGKILL.
        wait_for(60, "the relay at work", || {
            let working: bool = c
                .query_one(
                    "SELECT count(*) FILTER (WHERE state = 'in_flight') > 0
                         OR count(*) FILTER (WHERE state <> 'done') = 0
                       FROM pg_reaper_outbox",
                    &[],
                )
                .expect("outbox")
                .get(0);
            working.then_some(())
        });
        sleep_ms(pause);
        drop(relay);
        no_handle_lost(&mut c);
    }
    let mut relay = env.spawn_relay(&["--concurrency", "8"]);
    wait_for(90, "every intent done", || {
        all_done(&mut c, fleet.len()).then_some(())
    });
    relay.terminate();
    final_invariants(&env, &mut c, &fleet);
    // The kills really cut work short: intents a killed relay held came back to another.
    let reclaimed = json(
        &mut c,
        "SELECT to_jsonb(count(*)) FROM pg_reaper_outbox WHERE attempts > 1",
    );
    eprintln!("intents re-claimed after a kill: {reclaimed}");
    assert!(
        reclaimed.as_i64().unwrap_or(0) > 0,
        "no kill hit an intent in flight"
    );
}

#[test]
fn two_relays_on_one_outbox_mark_once() {
    let env = Env::new("ctwo", true);
    let mut c = env.db();
    let fleet = fleet(&env, &mut c, 300);
    env.api.faults(json!({"delay_ms": 5}));
    let mut a = env.spawn_relay(&["--concurrency", "8"]);
    let mut b = env.spawn_relay(&["--concurrency", "8"]);
    wait_for(60, "every intent done", || {
        all_done(&mut c, fleet.len()).then_some(())
    });
    a.terminate();
    b.terminate();
    final_invariants(&env, &mut c, &fleet);
    assert_eq!(
        json(
            &mut c,
            "SELECT to_jsonb(max(attempts)) FROM pg_reaper_outbox"
        ),
        json!(1),
        "no intent was worked twice"
    );
}

#[test]
fn postgres_immediate_restart_mid_drain() {
    let env = Env::new("crestart", true);
    let mut c = env.db();
    let fleet = fleet(&env, &mut c, 200);
    env.api.faults(json!({"delay_ms": 20}));
    let mut relay = env.spawn_relay(&["--concurrency", "4", "--lease", "3s"]);
    wait_for(60, "the drain under way", || {
        (json(
            &mut c,
            "SELECT to_jsonb(count(*) > 20) FROM pg_reaper_outbox WHERE state = 'done'",
        ) == json!(true))
        .then_some(())
    });
    drop(c);
    env.cluster.pg_ctl_stop("immediate");
    env.cluster.pg_ctl_start();
    let mut c = env.db();
    no_handle_lost(&mut c);
    wait_for(90, "every intent done after the restart", || {
        all_done(&mut c, fleet.len()).then_some(())
    });
    relay.terminate();
    final_invariants(&env, &mut c, &fleet);
}

/// The state and outcome of the newest intent of `id`, if it has one yet.
fn intent_state(c: &mut Client, id: &str) -> Option<(String, Option<String>)> {
    c.query_opt(
        "SELECT state, outcome FROM pg_reaper_outbox WHERE execution_id = $1 ORDER BY id DESC LIMIT 1",
        &[&id],
    )
    .expect("intent")
    .map(|r| (r.get(0), r.get(1)))
}

fn outbox(c: &mut Client) -> Value {
    json(
        c,
        "SELECT jsonb_build_object(
             'dead', count(*) FILTER (WHERE state = 'dead'),
             'done', count(*) FILTER (WHERE state = 'done'),
             'over_budget', count(*) FILTER (WHERE attempts > 2),
             'failures', coalesce(sum(failures), 0))
           FROM pg_reaper_outbox",
    )
}

/// An outage far longer than the failure budget (`--max-attempts 2`): refused connections,
/// then 503 everywhere, then healthy. Nothing goes dead, nothing is marked meanwhile, the
/// relay sends one probe per backoff step (not one request per intent), logs the episode
/// once, and every execution is recovered by itself, with exactly one mark, no replay.
#[test]
fn an_outage_longer_than_the_failure_budget_kills_nothing_and_needs_no_replay() {
    let mut env = Env::shared("coutage");
    let mut c = env.db();
    let fleet = fleet(&env, &mut c, 12);
    let port = env.api.port;
    env.api.stop();
    let metrics_port = common::free_port();
    let listen = format!("127.0.0.1:{metrics_port}");
    let mut relay = env.spawn_relay(&[
        "--concurrency",
        "4",
        "--max-attempts",
        "2",
        "--listen",
        &listen,
    ]);
    // Refused connections: intents are claimed again and again, far past their budget.
    wait_for(120, "intents claimed past their failure budget", || {
        (outbox(&mut c)["over_budget"].as_i64().unwrap_or(0) >= 3).then_some(())
    });
    let (_, metrics) = common::http_get(&listen, "/metrics");
    assert!(
        metrics.contains("pg_reaper_relay_api_reachable 0"),
        "{metrics}"
    );
    // Back, but answering 503 for everything from its first request (its state was lost with
    // it: recreate it; the admin calls are not subject to faults).
    env.api = SampleApi::start_with(
        &env.key_file,
        port,
        &["--faults", r#"{"fail_status": 503, "fail_count": 1000000}"#],
    );
    for (id, status) in &fleet {
        if *status != "GONE" {
            env.api.execution(id, "org", status);
        }
    }
    wait_for(120, "probes answered 503", || {
        (env.api.calls().len() >= 6).then_some(())
    });
    let during = outbox(&mut c);
    assert_eq!(
        (&during["dead"], &during["done"], &during["failures"]),
        (&json!(0), &json!(0), &json!(0)),
        "nothing dead, nothing counted, nothing done: {during}"
    );
    // One probe at a time: a step (at least half of --backoff-base, 50 ms) between requests.
    let calls = env.api.calls();
    let at: Vec<u64> = calls.iter().filter_map(|c| c["at_ms"].as_u64()).collect();
    for pair in at.windows(2) {
        assert!(
            pair[1] >= pair[0] + 25,
            "two requests {} ms apart during the outage: {at:?}",
            pair[1] - pair[0]
        );
    }
    env.api.faults(json!({}));
    wait_for(120, "every intent done", || {
        all_done(&mut c, fleet.len()).then_some(())
    });
    let (_, metrics) = common::http_get(&listen, "/metrics");
    assert!(
        metrics.contains("pg_reaper_relay_api_reachable 1"),
        "{metrics}"
    );
    let (_, log) = relay.terminate();
    final_invariants(&env, &mut c, &fleet);
    assert_eq!(outbox(&mut c)["dead"], json!(0));
    assert_eq!(
        log.matches("status API unreachable").count(),
        1,
        "the episode's start is logged once: {log}"
    );
    assert_eq!(
        log.matches("status API reachable again").count(),
        1,
        "{log}"
    );
}

/// The platform's backend answers 500 for its own trouble (its database down) about every
/// execution. For longer than the whole failure budget, with a single execution waiting (the
/// case no count of executions can tell from that execution's own 500: the canary request
/// does) and then with several: nothing dead, nothing counted, and once the backend is well
/// every execution is marked once, no replay.
#[test]
fn a_500_for_everything_longer_than_the_failure_budget_kills_nothing() {
    let env = Env::shared("c500");
    let mut c = env.db();
    env.api
        .faults(json!({"fail_status": 500, "fail_count": 1000000}));
    // The tests' backoff is 50 ms to 200 ms: a budget of 2 is gone within a second.
    let mut relay = env.spawn_relay(&["--max-attempts", "2"]);
    let lone = fleet(&env, &mut c, 2); // x0000 COMPLETED, x0001 EXECUTING
    wait_for(120, "the API asked far past the budget", || {
        (env.api.calls().len() >= 12).then_some(())
    });
    let calls = env.api.calls();
    assert!(
        calls.iter().any(|c| c["path"]
            .as_str()
            .is_some_and(|p| p.contains(pg_reaper_relay::circuit::CANARY))),
        "the canary was asked: {calls:?}"
    );
    let during = outbox(&mut c);
    assert_eq!(
        (&during["dead"], &during["done"], &during["failures"]),
        (&json!(0), &json!(0), &json!(0)),
        "nothing dead, nothing counted, nothing done: {during}"
    );
    env.api.faults(json!({}));
    wait_for(120, "both done", || all_done(&mut c, 2).then_some(()));
    final_invariants(&env, &mut c, &lone);
    relay.terminate();
}

/// A 429 is the API shedding load: systemic, and its Retry-After holds every request back.
#[test]
fn a_429_holds_the_relay_back_for_its_retry_after() {
    let env = Env::shared("c429");
    let mut c = env.db();
    let fleet = fleet(&env, &mut c, 4);
    env.api
        .faults(json!({"fail_status": 429, "fail_count": 1, "retry_after": 3}));
    let mut relay = env.spawn_relay(&["--concurrency", "1", "--max-attempts", "1"]);
    wait_for(120, "every intent done", || {
        all_done(&mut c, fleet.len()).then_some(())
    });
    relay.terminate();
    final_invariants(&env, &mut c, &fleet);
    let at: Vec<u64> = env
        .api
        .calls()
        .iter()
        .filter_map(|c| c["at_ms"].as_u64())
        .collect();
    assert!(
        at.len() >= 2 && at[1] >= at[0] + 3000,
        "the next request waited out Retry-After (3 s): {at:?}"
    );
    assert_eq!(
        outbox(&mut c)["failures"],
        json!(0),
        "a 429 is never counted"
    );
}

/// A failure about one execution (a 500 for it alone) still uses up its budget and goes dead,
/// while the others are recovered.
#[test]
fn a_per_execution_failure_still_goes_dead_while_the_others_recover() {
    let env = Env::shared("cperexec");
    let mut c = env.db();
    let fleet = fleet(&env, &mut c, 6);
    env.api
        .faults(json!({"fail_ids": ["x0001"], "fail_ids_status": 500}));
    let mut relay = env.spawn_relay(&["--max-attempts", "3"]);
    wait_for(120, "x0001 dead and the others done", || {
        let o = outbox(&mut c);
        (o["dead"] == json!(1) && o["done"] == json!(5)).then_some(())
    });
    relay.terminate();
    let failed = common::intent(&mut c, "x0001");
    assert_eq!(
        (&failed["state"], &failed["barrier"]),
        (&json!("dead"), &json!(true))
    );
    let api = env.api.executions();
    for (id, start) in &fleet {
        if id != "x0001" && *start == "EXECUTING" {
            assert_eq!(api[id]["error_marks"], json!(1), "{id}");
        }
    }
    assert_eq!(api["x0001"]["error_marks"], json!(0));
}

/// POSTs for which the relay gets no answer (its HTTP timeout) are applied by the API later.
/// The relay reads the status again only after its settle delay and finds them terminal: one
/// applied mark per execution, never a second, and every mark carried an Idempotency-Key.
#[test]
fn marks_applied_after_the_http_timeout_are_never_sent_twice() {
    let env = Env::shared("clate");
    let mut c = env.db();
    let ids: Vec<String> = (0..5).map(|i| format!("late{i}")).collect();
    for id in &ids {
        env.stranded_executing(&mut c, id);
    }
    env.api
        .faults(json!({"apply_delay_ms": 2000, "post_delay_ms": 60_000}));
    let mut relay = env.spawn_relay(&["--http-timeout", "1s", "--settle-delay", "10s"]);
    wait_for(120, "every intent done", || {
        all_done(&mut c, ids.len()).then_some(())
    });
    relay.terminate();
    let api = env.api.executions();
    let calls = env.api.calls();
    for id in &ids {
        assert_eq!(api[id]["error_marks"], json!(1), "{id}: one applied mark");
        assert_eq!(
            common::intent(&mut c, id)["outcome"],
            json!("already_terminal")
        );
        let posts: Vec<&Value> = calls
            .iter()
            .filter(|c| {
                c["method"] == "POST" && c["path"].as_str().is_some_and(|p| p.contains(id.as_str()))
            })
            .collect();
        assert_eq!(posts.len(), 1, "{id}: one POST");
        let key = posts[0]["idempotency_key"].as_str().unwrap_or_default();
        assert!(
            key.starts_with("pg-reaper-") && key.ends_with(&format!("-{id}")),
            "{key}"
        );
    }
}

/// A relay killed the moment its POST reached the API, which applies it seconds later (longer
/// than the lease): the claim is held for the settle delay, so the relay that takes over reads
/// the status after the mark landed and does not mark again.
#[test]
fn a_relay_killed_with_its_mark_in_flight_is_not_followed_by_a_second_mark() {
    let env = Env::shared("ckillpost");
    let mut c = env.db();
    env.stranded_executing(&mut c, "inflight");
    env.api
        .faults(json!({"apply_delay_ms": 5000, "post_delay_ms": 60_000}));
    let settle = ["--http-timeout", "2s", "--settle-delay", "10s"];
    let mut first = env.spawn_relay(&settle);
    wait_for(60, "the mark reaching the API", || {
        env.api
            .calls()
            .iter()
            .any(|c| c["method"] == "POST")
            .then_some(())
    });
    first.signal("KILL");
    let _ = first.child.wait();
    env.api.faults(json!({}));
    let mut second = env.spawn_relay(&settle);
    wait_for(120, "the intent done", || {
        equal(
            common::intent(&mut c, "inflight")["state"].clone(),
            json!("done"),
        )
    });
    second.terminate();
    assert_eq!(env.api.executions()["inflight"]["error_marks"], json!(1));
    assert_eq!(
        common::intent(&mut c, "inflight")["outcome"],
        json!("already_terminal")
    );
    let posts = env
        .api
        .calls()
        .iter()
        .filter(|c| c["method"] == "POST")
        .count();
    assert_eq!(posts, 1);
}

/// A relay stopped (SIGSTOP: a VM pause, a partition) with its POST in flight and its recovery
/// transaction open. Meanwhile the worker keeps queueing new strands and a second relay marks
/// them; the server ends the stopped relay's transaction; after SIGCONT nothing is marked twice.
#[test]
fn a_paused_relay_stops_nothing_and_marks_nothing_twice() {
    let env = Env::new("cpause", true);
    let mut c = env.db();
    env.api.execution("paused", "org", "EXECUTING");
    pg_reaper_tests::strand(&mut c, "paused", "org", 1);
    env.reap(&mut c);
    wait_for(60, "its intent", || intent_state(&mut c, "paused"));
    env.api
        .faults(json!({"apply_delay_ms": 1000, "post_delay_ms": 60_000}));
    let timing = [
        "--http-timeout",
        "3s",
        "--settle-delay",
        "6s",
        "--lease",
        "3s",
    ];
    let mut stopped = env.spawn_relay(&timing);
    wait_for(60, "its mark reaching the API", || {
        env.api
            .calls()
            .iter()
            .any(|c| c["method"] == "POST")
            .then_some(())
    });
    stopped.signal("STOP");
    env.api.faults(json!({}));
    let mut other = env.spawn_relay(&timing);
    for id in ["fresh1", "fresh2"] {
        env.api.execution(id, "org", "EXECUTING");
        pg_reaper_tests::strand(&mut c, id, "org", 1);
    }
    wait_for(
        120,
        "new strands queued and marked while the relay is stopped",
        || {
            let done = ["fresh1", "fresh2"].iter().all(|id| {
                intent_state(&mut c, id).and_then(|(_, o)| o) == Some("marked_error".to_string())
            });
            done.then_some(())
        },
    );
    // The server ends the stopped relay's idle transaction; the intent is then taken over.
    wait_for(
        120,
        "the stopped relay's intent done by the other relay",
        || {
            intent_state(&mut c, "paused")
                .filter(|(state, _)| state == "done")
                .map(|_| ())
        },
    );
    stopped.signal("CONT");
    let (status, _) = stopped.terminate();
    assert!(status.success());
    other.terminate();
    let api = env.api.executions();
    for id in ["paused", "fresh1", "fresh2"] {
        assert_eq!(api[id]["error_marks"], json!(1), "{id}: exactly one mark");
    }
    assert_eq!(
        common::intent(&mut c, "paused")["outcome"],
        json!("already_terminal")
    );
    assert!(
        env.cluster
            .log()
            .contains("terminating connection due to idle-in-transaction timeout")
    );
}

#[test]
fn native_drop_extension_under_a_running_relay_and_worker_then_create_it_again() {
    let env = Env::new("cdrop", true);
    let mut c = env.db();
    wait_for(60, "the worker leading", || {
        let s = json(
            &mut c,
            "SELECT to_jsonb(worker_state) FROM pg_reaper_status",
        );
        equal(s, json!("leader"))
    });
    let first = fleet(&env, &mut c, 5);
    let mut relay = env.spawn_relay(&["--concurrency", "2"]);
    wait_for(60, "the first fleet", || {
        all_done(&mut c, first.len()).then_some(())
    });
    c.batch_execute("DROP EXTENSION pg_reaper")
        .expect("drop while running");
    wait_for(60, "the worker waiting", || {
        env.cluster
            .log()
            .contains("waiting for CREATE EXTENSION")
            .then_some(())
    });
    wait_for(60, "the relay finding the extension gone", || {
        relay
            .log()
            .contains("pg_reaper is not installed in this database")
            .then_some(())
    });
    c.batch_execute("CREATE EXTENSION pg_reaper")
        .expect("create again");
    let second = fleet(&env, &mut c, 5);
    wait_for(60, "the second fleet after re-creation", || {
        all_done(&mut c, second.len()).then_some(())
    });
    let (status, log) = relay.terminate();
    assert!(status.success(), "the relay survived: {status:?}");
    assert!(
        log.contains("pg_reaper is not installed in this database"),
        "it said why it waited: {log}"
    );
    assert!(!env.cluster.log().contains("PANIC"));
}

#[test]
fn end_to_end_in_a_schema_that_needs_quoting() {
    let env = Env::in_schema("cquoted", "Queue Schema");
    let mut c = env.db();
    c.batch_execute("SET search_path = \"Queue Schema\"")
        .expect("search_path");
    env.api.execution("q-1", "org", "EXECUTING");
    pg_reaper_tests::strand(&mut c, "q-1", "org", 1);
    // The worker (or, in the extension-free edition, the relay's tick) reaps it, no
    // reap_expired() by hand; the relay recovers it.
    let mut relay = env.spawn_relay(&[]);
    wait_for(60, "the recovery", || {
        equal(
            json(
                &mut c,
                "SELECT jsonb_agg(jsonb_build_array(state, outcome)) FROM pg_reaper_outbox",
            ),
            json!([["done", "marked_error"]]),
        )
    });
    relay.terminate();
    assert_eq!(env.api.executions()["q-1"]["error_marks"], json!(1));
}

#[test]
fn after_failover_a_relay_pointed_at_the_new_primary_drains_what_was_queued() {
    let env = Env::new("cfailover", false);
    let mut c = env.db();
    let fleet = fleet(&env, &mut c, 20);
    let replica = env.cluster.start_replica("cfailover-replica", &[]);
    // Let the replica catch up with the intents, then fail over.
    wait_for(60, "the intents on the replica", || {
        let mut r = replica.client("q");
        let n = json(&mut r, "SELECT to_jsonb(count(*)) FROM pg_reaper_outbox");
        equal(n, json!(20))
    });
    drop(c);
    env.cluster.pg_ctl_stop("immediate");
    replica.promote();
    common::run_ok(
        env.relay_command(&["--once"])
            .env("PG_REAPER_DATABASE_URL", replica.url("q")),
    );
    let mut r = replica.client("q");
    assert!(
        all_done(&mut r, fleet.len()),
        "every intent queued before the failover was recovered"
    );
    final_invariants(&env, &mut r, &fleet);
}
