//! Fault injection: relays SIGKILLed at random points, two relays at once, Postgres restarted
//! mid-drain, the API down and back. After each, the invariants of contract §5 are checked:
//! at most one ERROR mark per execution, no terminal execution overwritten, no barrier deleted
//! before its recovery was confirmed, and every intent eventually done.

mod common;

use common::{Env, SampleApi, sleep_ms};
use pg_reaper_tests::{json, wait_for};
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
    assert_eq!(env.reap(c), n as i32);
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
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(7);
    eprintln!("kill schedule seed {seed}");
    for pause in delays(seed, 6, 100, 600) {
        let relay = env.spawn_relay(&["--concurrency", "8"]);
        sleep_ms(pause);
        drop(relay); // SIGKILL, at a random point of the drain
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
    let mut relay = env.spawn_relay(&["--concurrency", "4"]);
    wait_for(30, "the drain under way", || {
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

#[test]
fn api_down_then_failing_then_back_marks_nothing_meanwhile_and_recovers_all() {
    let mut env = Env::new("cdown", false);
    let mut c = env.db();
    let fleet = fleet(&env, &mut c, 30);
    let port = env.api.port;
    env.api.stop();
    // Refused connections: every attempt fails, nothing is marked, every barrier stays.
    for _ in 0..3 {
        env.relay_once(&[]);
        sleep_ms(250);
    }
    assert_eq!(
        json(
            &mut c,
            "SELECT jsonb_build_array(min(attempts), count(*) FILTER (WHERE state = 'pending')) FROM pg_reaper_outbox"
        ),
        json!([3, 30])
    );
    assert_eq!(
        json(&mut c, "SELECT to_jsonb(count(*)) FROM pg_barrier_state"),
        json!(30)
    );
    assert!(
        json(
            &mut c,
            "SELECT to_jsonb(min(last_error)) FROM pg_reaper_outbox"
        )
        .as_str()
        .is_some_and(|e| e.starts_with("status read: connection failed")),
    );
    // Back, but answering 503 for a while (the API's state was lost with it: recreate it).
    env.api = SampleApi::start(&env.key_file, port);
    for (id, status) in &fleet {
        if *status != "GONE" {
            env.api.execution(id, "org", status);
        }
    }
    env.api
        .faults(json!({"fail_status": 503, "fail_count": 40}));
    let mut relay = env.spawn_relay(&["--concurrency", "4"]);
    wait_for(60, "every intent done", || {
        all_done(&mut c, fleet.len()).then_some(())
    });
    relay.terminate();
    final_invariants(&env, &mut c, &fleet);
    assert!(
        json(
            &mut c,
            "SELECT to_jsonb(min(attempts)) FROM pg_reaper_outbox"
        )
        .as_i64()
        .unwrap_or(0)
            >= 4,
        "the backoff history is visible in attempts"
    );
}

#[test]
fn drop_extension_under_a_running_relay_and_worker_then_create_it_again() {
    let env = Env::new("cdrop", true);
    let mut c = env.db();
    wait_for(30, "the worker leading", || {
        let s = json(
            &mut c,
            "SELECT to_jsonb(worker_state) FROM pg_reaper_status",
        );
        (s == json!("leader")).then_some(())
    });
    let first = fleet(&env, &mut c, 5);
    let mut relay = env.spawn_relay(&["--concurrency", "2"]);
    wait_for(20, "the first fleet", || {
        all_done(&mut c, first.len()).then_some(())
    });
    c.batch_execute("DROP EXTENSION pg_reaper")
        .expect("drop while running");
    wait_for(20, "the worker waiting", || {
        env.cluster
            .log()
            .contains("waiting for CREATE EXTENSION")
            .then_some(())
    });
    sleep_ms(1500); // the relay's claims fail meanwhile and it reconnects, again and again
    c.batch_execute("CREATE EXTENSION pg_reaper")
        .expect("create again");
    let second = fleet(&env, &mut c, 5);
    wait_for(30, "the second fleet after re-creation", || {
        all_done(&mut c, second.len()).then_some(())
    });
    let (status, log) = relay.terminate();
    assert!(status.success(), "the relay survived: {status:?}");
    assert!(
        log.contains("pg_reaper extension is not created"),
        "it said why it waited: {log}"
    );
    assert!(!env.cluster.log().contains("PANIC"));
}

#[test]
fn end_to_end_in_a_schema_that_needs_quoting() {
    let env = Env::new("cquoted", true);
    let mut c = env.db();
    c.batch_execute(
        "DROP EXTENSION pg_reaper; CREATE SCHEMA \"Queue Schema\";
         CREATE EXTENSION pg_reaper SCHEMA \"Queue Schema\";",
    )
    .expect("extension in a quoted schema");
    c.batch_execute("SET search_path = \"Queue Schema\"")
        .expect("search_path");
    env.api.execution("q-1", "org", "EXECUTING");
    env.strand(&mut c, "q-1", "org", 1);
    // The worker reaps it (no reap_expired() by hand), the relay recovers it.
    wait_for(20, "the worker's intent", || {
        let n = json(&mut c, "SELECT to_jsonb(count(*)) FROM pg_reaper_outbox");
        (n == json!(1)).then_some(())
    });
    env.relay_once(&[]);
    assert_eq!(
        json(
            &mut c,
            "SELECT jsonb_build_array(state, outcome) FROM pg_reaper_outbox"
        ),
        json!(["done", "marked_error"])
    );
    assert_eq!(env.api.executions()["q-1"]["error_marks"], json!(1));
}

#[test]
fn after_failover_a_relay_pointed_at_the_new_primary_drains_what_was_queued() {
    let env = Env::new("cfailover", false);
    let mut c = env.db();
    let fleet = fleet(&env, &mut c, 20);
    let replica = env.cluster.start_replica("cfailover-replica", &[]);
    // Let the replica catch up with the intents, then fail over.
    wait_for(20, "the intents on the replica", || {
        let mut r = replica.client("q");
        let n = json(&mut r, "SELECT to_jsonb(count(*)) FROM pg_reaper_outbox");
        (n == json!(20)).then_some(())
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
