//! Failover under Patroni: one etcd member and two Patroni-managed nodes with pg_reaper
//! preloaded on both, a relay whose database URL names both nodes (`target_session_attrs =
//! read-write`), stranded executions before and after a planned switchover, after a SIGKILL of
//! the primary's postmaster (Patroni starts it again in place), and after the loss of the
//! primary's machine (its Patroni and postmaster SIGKILLed: the other node takes over). After
//! each: the worker leads on the primary only, the relay found the primary by itself, and every
//! execution was marked ERROR exactly once, with no intent lost.

mod common;

use common::{KEY, SampleApi};
use pg_reaper_tests::patroni::Patroni;
use pg_reaper_tests::{equal, strand, wait_for};
use serde_json::json;

/// Strands `ids` on the primary, each an execution the API has as EXECUTING, and waits until
/// the relay marked every one of them.
fn strand_and_recover(ha: &Patroni, api: &SampleApi, primary: usize, ids: &[String]) {
    let mut c = ha.client(primary, "q").expect("the primary");
    for id in ids {
        api.execution(id, "org", "EXECUTING");
        strand(&mut c, id, "org", 1);
    }
    // The API records a mark before the relay commits its outcome: wait for both.
    let done = json!([1, ["done", "marked_error", false]]);
    wait_for(180, "this round marked ERROR and its intents done", || {
        let executions = api.executions();
        let seen: Vec<serde_json::Value> = ids
            .iter()
            .map(|id| json!([executions[id]["error_marks"], recovery(&mut c, id)]))
            .collect();
        equal(seen, vec![done.clone(); ids.len()])
    });
}

/// The state and outcome of the execution's latest intent and whether its barrier is still
/// there; null before the worker queued one.
fn recovery(c: &mut postgres::Client, id: &str) -> serde_json::Value {
    c.query_one(
        "SELECT (SELECT jsonb_build_array(o.state, o.outcome,
                        EXISTS (SELECT 1 FROM pg_barrier_state b WHERE b.execution_id = o.execution_id))
                   FROM pg_reaper_outbox o WHERE o.execution_id = $1 ORDER BY o.id DESC LIMIT 1)",
        &[&id],
    )
    .expect("the intent")
    .get::<_, Option<serde_json::Value>>(0)
    .unwrap_or(serde_json::Value::Null)
}

/// Waits until the worker leads on `primary` and on no other node.
fn worker_leads_on(ha: &Patroni, primary: usize) {
    wait_for(180, "the worker to lead on the primary only", || {
        let states: Vec<String> = (0..ha.nodes.len())
            .map(|i| {
                ha.client(i, "q")
                    .and_then(|mut c| {
                        c.query_one(
                            "SELECT coalesce(worker_state, 'none') || '/' || (leader_pid IS NOT NULL)
                               FROM pg_reaper_status",
                            &[],
                        )
                        .ok()
                    })
                    .map(|r| r.get(0))
                    .unwrap_or_else(|| "down".to_string())
            })
            .collect();
        let leading = |i: usize| states[i] == "leader/true";
        if leading(primary) && (0..states.len()).all(|i| i == primary || !leading(i)) {
            Ok(states)
        } else {
            Err(states)
        }
    });
}

fn round(name: &str) -> Vec<String> {
    (0..5).map(|i| format!("{name}-{i}")).collect()
}

#[test]
fn the_worker_and_the_relay_follow_a_switchover_and_a_failover() {
    let mut ha = Patroni::start(
        "ha",
        &[
            ("shared_preload_libraries", "pg_reaper"),
            ("pg_reaper.database", "q"),
            ("pg_reaper.naptime", "0.2"),
        ],
    );
    let first = ha.primary().expect("a primary");
    let mut c = ha.client(first, "postgres").expect("the primary");
    c.batch_execute("CREATE DATABASE q").expect("create q");
    ha.client(first, "q")
        .expect("q")
        .batch_execute("CREATE EXTENSION pg_reaper")
        .expect("create the extension");
    worker_leads_on(&ha, first);

    let key_file = ha.dir.join("api.key");
    std::fs::write(&key_file, format!("{KEY}\n")).expect("key file");
    let api = SampleApi::start(&key_file, common::free_port());
    let command = common::relay_command(&ha.url("q"), &api, &key_file);
    let mut relay = common::Relay::spawn(command, ha.dir.join("relay.log"));

    let before = round("before");
    strand_and_recover(&ha, &api, first, &before);

    // A planned switchover: the other node becomes the primary.
    let second = 1 - first;
    ha.wait_caught_up(first);
    ha.switchover(first, second);
    wait_for(180, "the switchover", || {
        (ha.primary() == Some(second))
            .then_some(())
            .ok_or_else(|| ha.roles())
    });
    worker_leads_on(&ha, second);
    let switched = round("switched");
    strand_and_recover(&ha, &api, second, &switched);

    // The primary's postmaster is SIGKILLed: Patroni starts it again in place, still primary.
    ha.wait_caught_up(second);
    let killed = ha.kill_postmaster(second);
    wait_for(180, "the primary started again by Patroni", || {
        let restarted = ha.postmaster(second).is_some_and(|pid| pid != killed);
        (restarted && ha.primary() == Some(second))
            .then_some(())
            .ok_or_else(|| ha.roles())
    });
    worker_leads_on(&ha, second);
    let restarted = round("restarted");
    strand_and_recover(&ha, &api, second, &restarted);

    // The primary's machine is lost: the first node takes over when the leader key expires.
    ha.wait_caught_up(second);
    ha.kill(second);
    wait_for(180, "the failover", || {
        (ha.primary() == Some(first))
            .then_some(())
            .ok_or_else(|| ha.roles())
    });
    worker_leads_on(&ha, first);
    let failed_over = round("failed-over");
    strand_and_recover(&ha, &api, first, &failed_over);

    // Exactly once over the whole run, and nothing left behind.
    let executions = api.executions();
    for id in before
        .iter()
        .chain(&switched)
        .chain(&restarted)
        .chain(&failed_over)
    {
        assert_eq!(executions[id]["error_marks"], json!(1), "{id}");
        assert_eq!(executions[id]["status"], json!("ERROR"), "{id}");
    }
    let mut c = ha.client(first, "q").expect("the primary");
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_reaper_outbox WHERE state <> 'done'",
            &[],
        )
        .expect("count")
        .get(0);
    let (status, log) = relay.terminate();
    assert_eq!(left, 0, "intents left behind; relay log:\n{log}");
    assert!(status.success(), "relay exit: {status}\n{log}");
}
