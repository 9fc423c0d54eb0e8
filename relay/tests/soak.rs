//! Sustained load with the invariants checked (`make soak` runs it long; `make test` briefly).
//!
//! Producers fan executions out; workers claim, decrement and finish their batches, some of
//! them "crashing" (skipping the decrement, the callback or the finish) and some batches
//! delivered twice; the background worker reaps with a short naptime and stuck timeout; two
//! relays recover against the sample API. Then every execution must have ended exactly once:
//! completed by its callback, or recovered by exactly one ERROR mark or one re-fire (whose
//! callback, run here as the platform would run it, then completes the execution).

mod common;

use common::{Env, SampleApi};
use pg_reaper_tests::{equal, json, wait_for};
use serde_json::json;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What happened to an execution on the client side.
#[derive(Default)]
struct Ledger {
    callbacks: Mutex<HashSet<String>>,
    crashed_mid_batch: Mutex<HashSet<String>>,
    lost_callback: Mutex<HashSet<String>>,
    lost_finish: Mutex<HashSet<String>>,
    errors: Mutex<Vec<String>>,
    executions: AtomicU64,
    batches: AtomicU64,
    redeliveries: AtomicU64,
}

/// A deterministic coin for (execution, batch): `true` with probability `percent` / 100.
fn coin(id: &str, salt: u64, percent: u64) -> bool {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ salt;
    for b in id.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    h % 100 < percent
}

fn record<T>(ledger: &Ledger, what: &str, r: Result<T, postgres::Error>) -> Option<T> {
    r.map_err(|e| {
        ledger
            .errors
            .lock()
            .expect("ledger")
            .push(format!("{what}: {e}"))
    })
    .ok()
}

fn producer(
    env: &Env,
    api: &SampleApi,
    p: usize,
    stop: &AtomicBool,
    tasks: SyncSender<(String, i32)>,
    ledger: &Ledger,
) {
    let mut c = env.db();
    let mut n: i32 = 0;
    while !stop.load(Relaxed) {
        let id = format!("p{p}-{n:06}");
        let total: i32 = n % 4 + 2;
        n += 1;
        api.execution(&id, "org", "EXECUTING");
        let enqueue = c.execute(
            "SELECT barrier_enqueue($1, 'org', $2, '1 hour', jsonb_build_object('task_name', 'aggregate', 'id', $1::text))",
            &[&id, &total],
        );
        if record(ledger, "enqueue", enqueue).is_none() {
            continue;
        }
        ledger.executions.fetch_add(1, Relaxed);
        for b in 0..total {
            let _ = tasks.send((id.clone(), b));
            if coin(&format!("{id}/{b}"), 7, 10) {
                let _ = tasks.send((id.clone(), b)); // a redelivery
            }
        }
    }
}

fn worker(env: &Env, api: &SampleApi, tasks: Arc<Mutex<Receiver<(String, i32)>>>, ledger: &Ledger) {
    let mut c = env.db();
    loop {
        let next = tasks
            .lock()
            .expect("queue")
            .recv_timeout(Duration::from_millis(500));
        let Ok((id, b)) = next else { return };
        let claimed = record(
            ledger,
            "claim",
            c.query_one("SELECT barrier_claim($1, $2)", &[&id, &b]),
        );
        if claimed.map(|r| r.get::<_, bool>(0)) != Some(true) {
            ledger.redeliveries.fetch_add(1, Relaxed);
            continue;
        }
        ledger.batches.fetch_add(1, Relaxed);
        if coin(&format!("{id}/{b}"), 1, 3) {
            ledger.crashed_mid_batch.lock().expect("ledger").insert(id); // SIGKILLed mid-batch
            continue;
        }
        let row = record(
            ledger,
            "decrement",
            c.query_one(
                "SELECT status FROM barrier_decrement($1, to_jsonb($2::int))",
                &[&id, &b],
            ),
        );
        if row.map(|r| r.get::<_, String>(0)).as_deref() != Some("complete") {
            continue;
        }
        if coin(&id, 2, 5) {
            ledger.lost_callback.lock().expect("ledger").insert(id); // died before enqueueing it
            continue;
        }
        api.execution(&id, "org", "COMPLETED"); // the aggregating callback ran
        ledger.callbacks.lock().expect("ledger").insert(id.clone());
        if coin(&id, 3, 5) {
            ledger.lost_finish.lock().expect("ledger").insert(id); // died before barrier_finish
            continue;
        }
        record(
            ledger,
            "finish",
            c.execute("SELECT barrier_finish($1)", &[&id]),
        );
    }
}

#[test]
fn sustained_load_ends_every_execution_exactly_once() {
    let seconds: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let env = Arc::new(Env::new("soak", true));
    let mut c = env.db();
    c.batch_execute(
        "CREATE TABLE refired (execution_id text, callback jsonb, results jsonb, ran boolean NOT NULL DEFAULT false);
         -- The re-fire queues the callback for the runner below, and gives it an hour (the
         -- barrier stays as the execution's handle until then; the stuck timeout here is 3 s).
         CREATE FUNCTION public.refire(e text, o text, cb jsonb, r jsonb) RETURNS void
         LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
             INSERT INTO public.refired VALUES (e, cb, r);
             SELECT pg_notify('refired', e);
             UPDATE public.pg_barrier_state
                SET expires_at = now() + interval '1 hour', last_progress_at = now() + interval '1 hour'
              WHERE execution_id = e $$;
         ALTER DATABASE q SET pg_reaper.refire_function = 'public.refire';",
    )
    .expect("hook");
    for s in [
        "pg_reaper.stuck_timeout = 3",
        "pg_reaper.outbox_retention = 1",
        "pg_reaper.dedup_retention = 1",
    ] {
        c.batch_execute(&format!("ALTER SYSTEM SET {s}")).expect(s);
    }
    c.batch_execute("SELECT pg_reload_conf()").expect("reload");
    let mut relays = [
        env.spawn_relay(&["--concurrency", "8"]),
        env.spawn_relay(&["--concurrency", "8"]),
    ];

    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    // A short queue: a batch waits milliseconds, far below the stuck timeout, as in a healthy
    // fleet (a backlog older than the stuck timeout would rightly be reaped).
    let (tx, rx) = sync_channel(32);
    let rx = Arc::new(Mutex::new(rx));
    let started = Instant::now();
    let mut threads = Vec::new();
    for p in 0..2 {
        let (env, stop, tx, ledger) = (env.clone(), stop.clone(), tx.clone(), ledger.clone());
        threads.push(std::thread::spawn(move || {
            producer(&env, &env.api, p, &stop, tx, &ledger)
        }));
    }
    drop(tx);
    for _ in 0..4 {
        let (env, rx, ledger) = (env.clone(), rx.clone(), ledger.clone());
        threads.push(std::thread::spawn(move || {
            worker(&env, &env.api, rx, &ledger)
        }));
    }
    // The re-fired callbacks run: each completes its execution and finishes its barrier.
    let runner = {
        let (env, ledger, done) = (
            env.clone(),
            ledger.clone(),
            Arc::new(AtomicBool::new(false)),
        );
        let finished = done.clone();
        let handle = std::thread::spawn(move || {
            let mut c = env.db();
            c.batch_execute("LISTEN refired").expect("listen");
            while !finished.load(Relaxed) {
                let ids: Vec<String> = c
                    .query(
                        "UPDATE refired SET ran = true WHERE NOT ran RETURNING execution_id",
                        &[],
                    )
                    .expect("re-fired callbacks")
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                for id in &ids {
                    env.api.execution(id, "org", "COMPLETED");
                    ledger.callbacks.lock().expect("ledger").insert(id.clone());
                    record(
                        &ledger,
                        "finish",
                        c.execute("SELECT barrier_finish($1)", &[id]),
                    );
                }
                // Until the next re-fire commits (its NOTIFY), or a moment to look at the flag.
                use postgres::fallible_iterator::FallibleIterator;
                let _ = c
                    .notifications()
                    .timeout_iter(Duration::from_millis(500))
                    .next();
            }
        });
        (handle, done)
    };
    std::thread::sleep(Duration::from_secs(seconds));
    stop.store(true, Relaxed);
    for t in threads {
        t.join().expect("load thread");
    }
    let load_secs = started.elapsed().as_secs_f64();

    // Everything stranded is reaped (stuck timeout 3 s) and recovered, and the tables empty.
    wait_for(120, "barriers, intents and markers all gone", || {
        let left = json(
            &mut c,
            "SELECT jsonb_build_array((SELECT count(*) FROM pg_barrier_state), (SELECT count(*) FROM pg_reaper_outbox),
                                      (SELECT count(*) FROM pg_batch_dedup))",
        );
        equal(left, json!([0, 0, 0]))
    });
    let recovered_secs = started.elapsed().as_secs_f64();
    runner.1.store(true, Relaxed);
    runner.0.join().expect("the callback runner");
    for r in &mut relays {
        r.terminate();
    }

    let errors = ledger.errors.lock().expect("ledger").clone();
    assert!(
        errors.is_empty(),
        "no error surfaced to a caller (deadlock, serialization, …): {errors:?}"
    );
    let api = env.api.executions();
    let api = api.as_object().expect("executions");
    let refired: Vec<String> = c
        .query("SELECT execution_id FROM refired", &[])
        .expect("refired")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let refired_set: HashSet<&String> = refired.iter().collect();
    assert_eq!(
        refired.len(),
        refired_set.len(),
        "each callback re-fired at most once"
    );
    let callbacks = ledger.callbacks.lock().expect("ledger").clone();
    let crashed = ledger.crashed_mid_batch.lock().expect("ledger").clone();
    let lost_callback = ledger.lost_callback.lock().expect("ledger").clone();
    let (mut completed, mut marked, mut refires) = (0, 0, 0);
    for (id, e) in api {
        let marks = e["error_marks"].as_u64().unwrap_or(0);
        match e["status"].as_str().unwrap_or("") {
            "COMPLETED" => {
                assert!(
                    callbacks.contains(id),
                    "{id}: COMPLETED only by its callback"
                );
                assert_eq!(marks, 0, "{id}: a completed execution is never overwritten");
                if refired_set.contains(id) {
                    assert!(
                        lost_callback.contains(id),
                        "{id}: re-fired only if its callback was really lost"
                    );
                    refires += 1;
                } else {
                    completed += 1;
                }
            }
            "ERROR" => {
                assert_eq!(marks, 1, "{id}: exactly one ERROR mark");
                assert!(
                    crashed.contains(id),
                    "{id}: marked ERROR only if a batch really crashed"
                );
                marked += 1;
            }
            other => panic!("{id}: unexpected status {other}"),
        }
    }
    assert_eq!(
        refires,
        refired.len(),
        "every re-fire belongs to an execution whose callback was lost"
    );
    let n = ledger.executions.load(Relaxed);
    assert_eq!(api.len() as u64, n, "every execution is accounted for");
    assert!(
        marked > 0 && refires > 0 && completed > 0,
        "the load exercised every ending"
    );
    let lost_finish = ledger.lost_finish.lock().expect("ledger").len();
    let summary = format!(
        "| {seconds} s | {n} | {:.0}/s | {:.0}/s | {completed} | {marked} | {refires} | {lost_finish} | {} | {:.0} s | 0 |",
        n as f64 / load_secs,
        ledger.batches.load(Relaxed) as f64 / load_secs,
        ledger.redeliveries.load(Relaxed),
        recovered_secs - load_secs,
    );
    eprintln!("soak: {summary}");
    if let Ok(path) = std::env::var("SOAK_REPORT") {
        let _ = std::fs::write(path, summary);
    }
}
