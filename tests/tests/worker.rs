//! The background worker in preloaded clusters: leadership, reaping on its timer, housekeeping,
//! and its behaviour under signals, restarts, missing objects and on a standby.

use pg_reaper_tests::{Cluster, equal, json, strand, wait_for};
use postgres::Client;
use serde_json::{Value, json};

const LOCK_KEY: i64 = 8099568234601145714;

fn preloaded(name: &str, database: &str) -> Cluster {
    Cluster::start(
        name,
        &[
            "shared_preload_libraries = 'pg_reaper'",
            &format!("pg_reaper.database = '{database}'"),
            "pg_reaper.naptime = 0.2",
        ],
    )
}

fn status(c: &mut Client) -> Value {
    json(c, "SELECT to_jsonb(s) FROM pg_reaper_status s")
}

fn worker_pid(c: &mut Client) -> Option<i32> {
    c.query_opt(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_reaper'",
        &[],
    )
    .expect("pg_stat_activity")
    .map(|r| r.get(0))
}

/// How long a test waits for the worker to (re)start: the postmaster starts a worker again 2 s
/// after it exits, but on a loaded machine that was seen to come a minute late.
const RESTART: u64 = 180;

fn wait_state(c: &mut Client, state: &str) -> Value {
    wait_for(RESTART, &format!("worker state {state}"), || {
        let s = status(c);
        (s["worker_state"] == json!(state)).then_some(s)
    })
}

/// Waits until the worker has run `n` more ticks (a standby's or a leader's).
fn wait_ticks(c: &mut Client, n: i64) {
    let start = status(c)["ticks"].as_i64().unwrap_or(0);
    wait_for(60, &format!("{n} more ticks"), || {
        (status(c)["ticks"].as_i64().unwrap_or(0) >= start + n).then_some(())
    });
}

fn intents(c: &mut Client, id: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_reaper_outbox WHERE execution_id = $1",
        &[&id],
    )
    .expect("count")
    .get(0)
}

fn reload(c: &mut Client, setting: &str) {
    c.batch_execute(&format!("ALTER SYSTEM SET {setting}"))
        .expect(setting);
    c.batch_execute("SELECT pg_reload_conf()").expect("reload");
}

#[test]
fn leader_reaps_both_kinds_of_strand_on_its_timer_and_never_a_live_barrier() {
    let cluster = preloaded("wreap", "q");
    let mut c = cluster.create_db("q", None);
    wait_state(&mut c, "leader");
    strand(&mut c, "expired", "org", 0);
    c.batch_execute("SELECT barrier_enqueue('live', 'org', 3)")
        .expect("live");
    wait_for(60, "intent for the expired barrier", || {
        equal(intents(&mut c, "expired"), 1)
    });

    // A stale last_progress_at past the stuck timeout, while expires_at is hours ahead. The
    // timeout (60 s) is far longer than any pause of this test between two decrements.
    reload(&mut c, "pg_reaper.stuck_timeout = 60");
    c.batch_execute(
        "SELECT barrier_enqueue('stale', 'org', 2);
         UPDATE pg_barrier_state SET created_at = now() - interval '10 minutes',
                last_progress_at = now() - interval '5 minutes' WHERE execution_id = 'stale'",
    )
    .expect("stale");
    wait_for(60, "intent for the stale barrier", || {
        equal(intents(&mut c, "stale"), 1)
    });
    // The live barrier keeps making progress: it is never reaped.
    for _ in 0..5 {
        c.batch_execute("SELECT barrier_enqueue('live', 'org', 3)")
            .expect("progress");
        wait_ticks(&mut c, 2);
    }
    assert_eq!(intents(&mut c, "live"), 0);

    // Known lost before any deadline: a batch whose lease lapsed and that nobody claimed again
    // within the reclaim timeout, and a completed barrier whose callback nobody enqueued within
    // the callback timeout (a hook is configured). The worker strands both; a lease that
    // lapsed less long ago is left alone. (Timeouts far longer than this test.)
    reload(&mut c, "pg_reaper.stuck_timeout = 3600");
    c.batch_execute(
        "INSERT INTO pg_reaper_settings VALUES ('pg_reaper.reclaim_timeout', '600'),
                                               ('pg_reaper.callback_timeout', '60'),
                                               ('pg_reaper.refire_function', 'public.some_hook');
         SELECT barrier_enqueue('crashed', 'org', 2), barrier_enqueue('slow', 'org', 2),
                barrier_enqueue('lost', 'org', 1, callback => '{}');
         SELECT barrier_claim_lease('crashed', 0), barrier_claim_lease('slow', 0);
         SELECT barrier_decrement('lost');
         UPDATE pg_barrier_state SET created_at = now() - interval '10 minutes';
         UPDATE pg_batch_dedup SET lease_expires_at = now() - interval '601 seconds'
          WHERE execution_id = 'crashed';
         UPDATE pg_batch_dedup SET lease_expires_at = now() - interval '60 seconds'
          WHERE execution_id = 'slow';
         UPDATE pg_barrier_state SET callback_due_at = now() - interval '1 second'
          WHERE execution_id = 'lost' AND callback_due_at IS NOT NULL",
    )
    .expect("a crashed batch and a lost callback");
    for id in ["crashed", "lost"] {
        wait_for(60, &format!("intent for {id}"), || {
            equal(intents(&mut c, id), 1)
        });
    }
    wait_ticks(&mut c, 2);
    assert_eq!(intents(&mut c, "slow"), 0);
    assert_eq!(
        json(
            &mut c,
            "SELECT jsonb_build_array(barrier_explain('lost')->'state', \
                                      barrier_explain('crashed')->'state')"
        ),
        json!(["callback_overdue", "stranded_expired"])
    );
    let s = status(&mut c);
    assert_eq!(s["leader_pid"], json!(worker_pid(&mut c)));
    assert_eq!(s["outbox_pending"], json!(4));
    assert!(
        cluster
            .log()
            .contains("pg_reaper: leading (advisory lock 8099568234601145714)")
    );
}

#[test]
fn a_session_holding_the_lock_keeps_the_worker_standby_until_released() {
    let cluster = preloaded("wlead", "q");
    let mut c = cluster.create_db("q", None);
    wait_state(&mut c, "leader");
    // Take the lock away: disabling releases it, then an operator session grabs it.
    reload(&mut c, "pg_reaper.enabled = off");
    wait_state(&mut c, "disabled");
    let mut holder = cluster.client("q");
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .expect("lock");
    reload(&mut c, "pg_reaper.enabled = on");
    let s = wait_state(&mut c, "standby");
    assert_eq!(s["leader_pid"], Value::Null);
    strand(&mut c, "held", "org", 0);
    wait_ticks(&mut c, 5);
    assert_eq!(intents(&mut c, "held"), 0, "a standby does not reap");

    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .expect("unlock");
    wait_state(&mut c, "leader");
    wait_for(60, "intent after takeover", || {
        equal(intents(&mut c, "held"), 1)
    });
    let s = status(&mut c);
    assert_eq!(s["leader_pid"], json!(worker_pid(&mut c)));
}

/// Any role may take an advisory lock; one with no grants at all must not be able to stop
/// reaping. The worker names the holder, stands by for pg_reaper.leader_grace, then reaps
/// without the lock (every write is a compare-and-set, so that is safe).
#[test]
fn a_role_without_grants_holding_the_lock_delays_reaping_by_the_grace_only() {
    let cluster = preloaded("wrogue", "q");
    let mut c = cluster.create_db("q", None);
    c.batch_execute("CREATE ROLE rogue LOGIN").expect("rogue");
    wait_state(&mut c, "leader");
    c.batch_execute("ALTER SYSTEM SET pg_reaper.leader_grace = 1")
        .expect("grace");
    reload(&mut c, "pg_reaper.enabled = off");
    wait_state(&mut c, "disabled");
    let mut rogue = postgres::Client::connect(
        &format!(
            "host=127.0.0.1 port={} user=rogue dbname=q application_name=squatter",
            cluster.port
        ),
        postgres::NoTls,
    )
    .expect("rogue connects");
    let rogue_pid: i32 = rogue
        .query_one(
            "SELECT pg_advisory_lock($1), pg_backend_pid()",
            &[&LOCK_KEY],
        )
        .expect("an ordinary role takes the key")
        .get(1);
    strand(&mut c, "held", "org", 0);
    reload(&mut c, "pg_reaper.enabled = on");
    let s = wait_state(&mut c, "contested");
    assert_eq!(s["lock_holder_pid"], json!(rogue_pid));
    assert_eq!(s["lock_holder_role"], json!("rogue"));
    assert_eq!(s["lock_holder_application"], json!("squatter"));
    assert_eq!(
        s["leader_pid"],
        json!(worker_pid(&mut c)),
        "the worker leads"
    );
    wait_for(60, "intent while the rogue holds the lock", || {
        equal(intents(&mut c, "held"), 1)
    });
    let log = cluster.log();
    let holder = format!("pid {rogue_pid}, role \"rogue\", application \"squatter\"");
    assert!(
        log.contains("standing by: a session that is not a pg_reaper worker holds the leader lock")
            && log.contains(&holder),
        "the holder is named in the log"
    );
    assert!(log.contains("pg_reaper: reaping without the leader lock"));
    // Once the lock is free again the worker takes it.
    drop(rogue);
    wait_state(&mut c, "leader");
    assert_eq!(status(&mut c)["lock_holder_pid"], Value::Null);
}

/// The worker's shared state belongs to the database it serves; the status view of another
/// database with the extension says so instead of showing that worker as its leader.
#[test]
fn the_status_view_of_another_database_does_not_borrow_the_worker() {
    let cluster = preloaded("wotherdb", "q");
    let mut c = cluster.create_db("q", None);
    wait_state(&mut c, "leader");
    let mut other = cluster.create_db("other", None);
    let s = status(&mut other);
    assert_eq!(s["worker_state"], json!("other_database"), "{s}");
    assert_eq!(
        (&s["leader_pid"], &s["ticks"], &s["last_tick_at"]),
        (&Value::Null, &Value::Null, &Value::Null)
    );
}

/// A relay paused inside its recovery transaction (a VM pause, a partition) holds the row
/// lock of an intent whose lease then expires. The worker skips that row instead of waiting on
/// it: its ticks keep succeeding and new strands keep being queued.
#[test]
fn a_paused_relays_locked_intent_never_stalls_the_worker() {
    let cluster = preloaded("wpaused", "q");
    let mut c = cluster.create_db("q", None);
    wait_state(&mut c, "leader");
    strand(&mut c, "paused", "org", 0);
    wait_for(60, "the first intent", || {
        equal(intents(&mut c, "paused"), 1)
    });
    // The "relay": claims with a short lease, then opens its recovery transaction and stops.
    let mut relay = cluster.client("q");
    let row = relay
        .query_one("SELECT id, attempt FROM outbox_claim(1, '1 second')", &[])
        .expect("claim");
    let (id, attempt): (i64, i32) = (row.get(0), row.get(1));
    relay.batch_execute("BEGIN").expect("begin");
    relay
        .query_one(
            "SELECT verdict FROM recovery_lock($1, $2, '1 second')",
            &[&id, &attempt],
        )
        .expect("recovery_lock");
    wait_for(60, "the paused relay's lease to expire", || {
        c.query_one(
            "SELECT lease_expires_at < now() FROM pg_reaper_outbox WHERE id = $1",
            &[&id],
        )
        .expect("lease")
        .get::<_, bool>(0)
        .then_some(())
    });
    let failed_before = status(&mut c)["failed_ticks"].clone();
    strand(&mut c, "fresh", "org", 0);
    wait_for(60, "a new strand queued while the row is locked", || {
        equal(intents(&mut c, "fresh"), 1)
    });
    wait_ticks(&mut c, 3);
    assert_eq!(
        status(&mut c)["failed_ticks"],
        failed_before,
        "no tick failed"
    );
    relay.batch_execute("ROLLBACK").expect("rollback");
    wait_for(
        60,
        "the expired lease re-offered once the row is free",
        || {
            let state: String = c
                .query_one("SELECT state FROM pg_reaper_outbox WHERE id = $1", &[&id])
                .expect("state")
                .get(0);
            equal(state, "pending".to_string())
        },
    );
}

/// SIGHUP reaches the worker: it re-reads its settings and says what it now runs with.
#[test]
fn sighup_changes_the_naptime() {
    let cluster = preloaded("wsighup", "q");
    let mut c = cluster.create_db("q", None);
    wait_state(&mut c, "leader");
    for naptime in ["1.5", "0.1"] {
        reload(&mut c, &format!("pg_reaper.naptime = {naptime}"));
        wait_for(60, &format!("the worker on naptime {naptime}"), || {
            cluster
                .log()
                .contains(&format!(
                    "pg_reaper: configuration reloaded: naptime {naptime} s,"
                ))
                .then_some(())
        });
    }
    // And it keeps ticking at the new rate.
    wait_ticks(&mut c, 5);
}

#[test]
fn terminated_worker_comes_back_and_immediate_restart_resumes_leading() {
    let cluster = preloaded("wsig", "q");
    let mut c = cluster.create_db("q", None);
    wait_state(&mut c, "leader");
    let pid = worker_pid(&mut c).expect("worker running");
    c.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .expect("terminate");
    let new_pid = wait_for(RESTART, "a new worker", || {
        worker_pid(&mut c).filter(|p| *p != pid)
    });
    wait_state(&mut c, "leader");
    assert!(
        cluster
            .log()
            .contains("terminating background worker \"pg_reaper\" due to administrator command")
    );
    assert_ne!(new_pid, pid);

    strand(&mut c, "before-crash", "org", 0);
    drop(c);
    cluster.pg_ctl_stop("immediate");
    cluster.pg_ctl_start();
    let mut c = cluster.client("q");
    wait_state(&mut c, "leader");
    // A server start connects at once: no exit and restart on the way.
    let log = cluster.log();
    let since_start = &log[log
        .rfind("database system is ready to accept connections")
        .expect("started")..];
    assert!(
        !since_start.contains("background worker \"pg_reaper\""),
        "the worker started without exiting first:\n{since_start}"
    );
    wait_for(60, "intent after the restart", || {
        equal(intents(&mut c, "before-crash"), 1)
    });
    cluster.pg_ctl_stop("fast");
    assert!(!cluster.log().contains("PANIC"), "no crash");
}

#[test]
fn waits_for_the_database_then_the_extension_and_survives_drop_extension() {
    let cluster = preloaded("wlife", "later");
    let mut admin = cluster.client("postgres");
    wait_for(RESTART, "the wait-for-database line", || {
        cluster
            .log()
            .contains("database \"later\" (pg_reaper.database) does not exist")
            .then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        cluster
            .log()
            .matches("does not exist; waiting for it")
            .count(),
        1,
        "said once, not every retry"
    );
    admin
        .batch_execute("CREATE DATABASE later")
        .expect("create db");
    wait_for(60, "waiting for the extension", || {
        cluster
            .log()
            .contains("waiting for CREATE EXTENSION")
            .then_some(())
    });
    let pid = worker_pid(&mut admin).expect("worker connected");
    let mut c = cluster.client("later");
    c.batch_execute("CREATE EXTENSION pg_reaper")
        .expect("create extension");
    wait_state(&mut c, "leader");
    strand(&mut c, "x", "org", 0);
    wait_for(60, "intent", || equal(intents(&mut c, "x"), 1));

    c.batch_execute("DROP EXTENSION pg_reaper")
        .expect("drop while running");
    wait_for(60, "waiting again", || {
        (cluster
            .log()
            .matches("waiting for CREATE EXTENSION")
            .count()
            == 2)
            .then_some(())
    });
    c.batch_execute("CREATE EXTENSION pg_reaper")
        .expect("create again");
    wait_state(&mut c, "leader");
    assert_eq!(
        worker_pid(&mut c),
        Some(pid),
        "the same worker process throughout"
    );
    assert!(!cluster.log().contains("tick failed"));

    // DROP EXTENSION committed while a chore waits on its tables: the chore then fails ("does
    // not exist"), which is the extension going away, not a failed tick. Every table is locked
    // first, so the waiting chore holds none that the DROP needs (else one of the two would be
    // cancelled as a deadlock); a lock that met a chore's deadlock is taken again. (Under load
    // the chore's lock timeout may fail a tick first; that failure is a real one.)
    let mut holder = cluster.client("later");
    let tables: String = holder
        .query_one(
            "SELECT string_agg(d.objid::regclass::text, ', ') FROM pg_depend d
              WHERE d.refobjid = (SELECT oid FROM pg_extension WHERE extname = 'pg_reaper')
                AND d.classid = 'pg_class'::regclass
                AND (SELECT relkind FROM pg_class WHERE oid = d.objid) = 'r'",
            &[],
        )
        .expect("the extension's tables")
        .get(0);
    wait_for(60, "the extension's tables locked", || {
        let locked = holder.batch_execute(&format!(
            "BEGIN; LOCK TABLE {tables} IN ACCESS EXCLUSIVE MODE"
        ));
        if locked.is_err() {
            holder.batch_execute("ROLLBACK").expect("rollback");
        }
        locked.ok()
    });
    wait_for(60, "a chore waiting on the lock", || {
        c.query_opt(
            "SELECT 1 FROM pg_stat_activity WHERE backend_type = 'pg_reaper' AND wait_event_type = 'Lock'",
            &[],
        )
        .expect("pg_stat_activity")
        .map(|_| ())
    });
    holder
        .batch_execute("DROP EXTENSION pg_reaper; COMMIT")
        .expect("drop");
    wait_for(60, "waiting for the extension again", || {
        (cluster
            .log()
            .matches("waiting for CREATE EXTENSION")
            .count()
            == 3)
            .then_some(())
    });
    let log = cluster.log();
    let dropped: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("tick failed") && l.contains("does not exist"))
        .collect();
    assert!(dropped.is_empty(), "{dropped:?}");
}

#[test]
fn dedup_retention_deletes_only_orphaned_markers() {
    let cluster = preloaded("wdedup", "q");
    let mut c = cluster.create_db("q", None);
    wait_state(&mut c, "leader");
    reload(&mut c, "pg_reaper.dedup_retention = 60");
    c.batch_execute(
        "SELECT barrier_enqueue('live', 'org', 3);
         SELECT barrier_claim('live', 0), barrier_claim('orphan', 0), barrier_claim('young', 0);
         UPDATE pg_batch_dedup SET created_at = now() - interval '1 hour'
          WHERE execution_id IN ('live', 'orphan');",
    )
    .expect("markers");
    wait_for(60, "the sweep", || {
        let left = json(
            &mut c,
            "SELECT jsonb_agg(execution_id ORDER BY execution_id) FROM pg_batch_dedup",
        );
        equal(left, json!(["live", "young"]))
    });
    // The worker flushes its table statistics after its commits: autovacuum (and this view)
    // sees its deletes while it runs, not only when it exits.
    wait_for(60, "the sweep's delete in pg_stat_user_tables", || {
        let deleted: i64 = c
            .query_one(
                "SELECT n_tup_del FROM pg_stat_user_tables WHERE relname = 'pg_batch_dedup'",
                &[],
            )
            .expect("stats")
            .get(0);
        (deleted >= 1).then_some(())
    });
}

#[test]
fn done_intents_are_pruned_after_their_retention_and_live_ones_never() {
    let cluster = preloaded("wprune", "q");
    let mut c = cluster.create_db("q", None);
    wait_state(&mut c, "leader");
    reload(&mut c, "pg_reaper.outbox_retention = 60");
    c.batch_execute(
        "INSERT INTO pg_reaper_outbox (execution_id, organization_id, remaining, state, outcome, attempts, updated_at)
         VALUES ('old-done', 'org', 1, 'done', 'gone', 1, now() - interval '1 hour'),
                ('new-done', 'org', 1, 'done', 'gone', 1, now());
         INSERT INTO pg_reaper_outbox (execution_id, organization_id, remaining, state, attempts, updated_at, next_attempt_at)
         VALUES ('old-dead', 'org', 1, 'dead', 20, now() - interval '1 hour', now()),
                ('old-pending', 'org', 1, 'pending', 3, now() - interval '1 hour', now() + interval '1 day');",
    )
    .expect("intents");
    wait_for(60, "the prune", || {
        let left = json(
            &mut c,
            "SELECT jsonb_agg(execution_id ORDER BY execution_id) FROM pg_reaper_outbox",
        );
        equal(left, json!(["new-done", "old-dead", "old-pending"]))
    });
}

#[test]
fn expired_relay_leases_are_offered_again() {
    let cluster = preloaded("wlease", "q");
    let mut c = cluster.create_db("q", None);
    wait_state(&mut c, "leader");
    c.batch_execute(
        "INSERT INTO pg_reaper_outbox (execution_id, organization_id, remaining, state, attempts, lease_expires_at)
         VALUES ('dead-relay', 'org', 1, 'in_flight', 1, now() - interval '1 second'),
                ('live-relay', 'org', 1, 'in_flight', 1, now() + interval '1 hour')",
    )
    .expect("intents");
    wait_for(60, "re-offer", || {
        let states = json(
            &mut c,
            "SELECT jsonb_object_agg(execution_id, state) FROM pg_reaper_outbox",
        );
        equal(
            states,
            json!({"dead-relay": "pending", "live-relay": "in_flight"}),
        )
    });
}

/// SIGTERM interrupts a chore blocked inside a statement (Postgres's `die` handler): the worker
/// exits at once with the usual FATAL, without waiting for its lock timeout, and comes back.
#[test]
fn sigterm_interrupts_a_blocked_chore() {
    let cluster = preloaded("wsigblock", "q");
    let mut c = cluster.create_db("q", None);
    wait_state(&mut c, "leader");
    let pid = worker_pid(&mut c).expect("worker");
    let mut blocker = cluster.client("q");
    blocker
        .batch_execute("BEGIN; LOCK pg_barrier_state IN ACCESS EXCLUSIVE MODE")
        .expect("lock");
    wait_for(60, "the worker blocked on the lock", || {
        c.query_opt(
            "SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
            &[&pid],
        )
        .expect("activity")
    });
    c.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .expect("terminate");
    wait_for(60, "the blocked worker gone", || {
        cluster
            .log()
            .contains("terminating background worker \"pg_reaper\" due to administrator command")
            .then_some(())
    });
    blocker.batch_execute("COMMIT").expect("release");
    wait_for(60, "a new worker leading", || {
        worker_pid(&mut c).filter(|p| *p != pid)
    });
    wait_state(&mut c, "leader");
}

#[test]
fn a_failing_tick_is_logged_and_the_next_one_runs() {
    let cluster = preloaded("wfail", "q");
    let mut c = cluster.create_db("q", None);
    wait_state(&mut c, "leader");
    let pid = worker_pid(&mut c);
    strand(&mut c, "blocked", "org", 0);
    let mut blocker = cluster.client("q");
    blocker
        .batch_execute("BEGIN; LOCK pg_reaper_outbox IN ACCESS EXCLUSIVE MODE")
        .expect("lock");
    // While it waits, pg_stat_activity shows which chore, like any backend's query.
    wait_for(
        60,
        "the worker waiting on the lock in its reap chore",
        || {
            c.query_opt(
                "SELECT 1 FROM pg_stat_activity WHERE backend_type = 'pg_reaper'
                AND state = 'active' AND query = 'pg_reaper: reap' AND wait_event_type = 'Lock'",
                &[],
            )
            .expect("activity")
        },
    );
    wait_for(60, "a failed tick, with the chore and the SQLSTATE", || {
        cluster
            .log()
            .contains(
                "pg_reaper: tick failed (1 consecutive, rolled back; retrying every naptime): \
                 reap: canceling statement due to lock timeout (SQLSTATE 55P03)",
            )
            .then_some(())
    });
    blocker.batch_execute("COMMIT").expect("release");
    wait_for(60, "intent after the lock went", || {
        equal(intents(&mut c, "blocked"), 1)
    });
    assert!(
        cluster
            .log()
            .contains("canceling statement due to lock timeout")
    );
    wait_for(60, "the recovery logged", || {
        cluster.log().contains("ticks succeed again").then_some(())
    });
    assert_eq!(worker_pid(&mut c), pid, "no restart");
    assert!(status(&mut c)["failed_ticks"].as_i64().unwrap_or(0) >= 1);
}

#[test]
fn a_standby_stays_idle_refuses_reaping_and_leads_once_promoted() {
    let primary = preloaded("wprimary", "q");
    let mut p = primary.create_db("q", None);
    wait_state(&mut p, "leader");
    strand(&mut p, "queued-on-primary", "org", 0);
    wait_for(60, "intent on the primary", || {
        equal(intents(&mut p, "queued-on-primary"), 1)
    });
    // Keep the primary's worker from queueing this one: disable it before the replica copies.
    reload(&mut p, "pg_reaper.enabled = off");
    wait_state(&mut p, "disabled");
    strand(&mut p, "after-failover", "org", 0);

    let replica = primary.start_replica("wreplica", &[]);
    let mut r = replica.client("q");
    let s = wait_state(&mut r, "recovery");
    assert_eq!(s["leader_pid"], Value::Null);
    let err = r
        .batch_execute("SELECT * FROM reap_expired()")
        .expect_err("standby");
    assert_eq!(
        err.as_db_error().map(|e| e.message()),
        Some("reap_expired: the server is a standby (in recovery); reap on the primary")
    );
    assert_eq!(
        replica
            .log()
            .matches("server is a standby; idle until promoted")
            .count(),
        1
    );

    // Failover: the promoted replica's worker leads (enabled = off was copied: turn it on).
    drop(p);
    primary.pg_ctl_stop("fast");
    replica.promote();
    let mut r = replica.client("q");
    reload(&mut r, "pg_reaper.enabled = on");
    wait_state(&mut r, "leader");
    wait_for(60, "intent on the new primary", || {
        equal(intents(&mut r, "after-failover"), 1)
    });
    assert_eq!(
        intents(&mut r, "queued-on-primary"),
        1,
        "nothing queued before the failover is lost"
    );
}

#[test]
fn without_preload_the_sql_api_works_and_no_worker_runs() {
    let cluster = Cluster::start("nopreload", &[]);
    let mut c = cluster.create_db("q", None);
    strand(&mut c, "x", "org", 0);
    assert_eq!(
        json(&mut c, "SELECT to_jsonb(queued) FROM reap_expired()"),
        json!(1)
    );
    let s = status(&mut c);
    assert_eq!(
        (&s["worker_state"], &s["ticks"], &s["leader_pid"]),
        (&Value::Null, &Value::Null, &Value::Null)
    );
    assert_eq!(worker_pid(&mut c), None);
}

#[test]
fn out_of_range_settings_are_refused_with_their_name() {
    let cluster = preloaded("wguc", "q");
    let mut c = cluster.create_db("q", None);
    for (setting, value) in [
        ("pg_reaper.naptime", "0.01"),
        ("pg_reaper.stuck_timeout", "0"),
        ("pg_reaper.dedup_retention", "-5"),
        ("pg_reaper.outbox_retention", "0"),
        ("pg_reaper.batch_size", "0"),
        ("pg_reaper.enabled", "maybe"),
    ] {
        let err = c
            .batch_execute(&format!("ALTER SYSTEM SET {setting} = '{value}'"))
            .expect_err(setting);
        let db = err.as_db_error().expect("a database error");
        assert_eq!(db.code().code(), "22023", "{setting}: {}", db.message());
        assert!(
            db.message().contains(setting),
            "{setting}: {}",
            db.message()
        );
    }
    let err = c
        .batch_execute("SET pg_reaper.database = 'other'")
        .expect_err("postmaster setting");
    assert_eq!(err.code().map(|c| c.code()), Some("55P02"), "{err}");
    let err = c
        .batch_execute("SET pg_reaper.naptime = 1")
        .expect_err("sighup setting");
    assert_eq!(err.code().map(|c| c.code()), Some("55P02"), "{err}");
    // From 15 on the prefix is reserved; 14 has no way to reserve it and accepts the name.
    let reserved = c.batch_execute("SET pg_reaper.nonexistent = 1");
    if server_version_num(&mut c) >= 150000 {
        let err = reserved.expect_err("reserved prefix");
        assert_eq!(err.code().map(|c| c.code()), Some("42602"), "{err}");
    } else {
        reserved.expect("PostgreSQL 14 accepts a placeholder");
    }
}

fn server_version_num(c: &mut Client) -> i32 {
    c.query_one("SELECT current_setting('server_version_num')::int", &[])
        .expect("server_version_num")
        .get(0)
}

#[test]
fn a_database_search_path_cannot_redirect_the_worker() {
    let cluster = preloaded("wpath", "q");
    let mut c = cluster.create_db("q", None);
    wait_state(&mut c, "leader");
    // A database owner makes every timestamp comparison true for sessions of this database.
    c.batch_execute(
        "CREATE SCHEMA evil;
         CREATE FUNCTION evil.lt(timestamptz, timestamptz) RETURNS boolean LANGUAGE sql AS 'SELECT true';
         CREATE OPERATOR evil.< (LEFTARG = timestamptz, RIGHTARG = timestamptz, FUNCTION = evil.lt);
         ALTER DATABASE q SET search_path = evil, pg_catalog, public;
         SELECT barrier_enqueue('live', 'org', 3);",
    )
    .expect("hostile database setting");
    // A new worker session picks the database's settings up.
    let pid = worker_pid(&mut c).expect("worker");
    c.execute("SELECT pg_terminate_backend($1)", &[&pid])
        .expect("terminate");
    wait_for(RESTART, "a new worker", || {
        worker_pid(&mut c).filter(|p| *p != pid)
    });
    wait_state(&mut c, "leader");
    wait_ticks(&mut c, 5);
    assert_eq!(intents(&mut c, "live"), 0, "a live barrier is never reaped");
    let mut fresh = cluster.client("q"); // has the hostile search_path too
    assert_eq!(
        json(&mut fresh, "SELECT to_jsonb(count(*)) FROM pg_barrier_state b
                          WHERE barrier_is_stranded(b.expires_at, b.last_progress_at, b.created_at, '1 hour')"),
        json!(0),
        "the predicate means the same under any search_path"
    );
}
