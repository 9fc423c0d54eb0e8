//! The simulation's outbox (`sim/model.rs`) against the extension's SQL functions: one set of
//! cases, each run on both, every answer and the rows left behind compared. So the model's
//! fencing rules cannot drift from the real ones unnoticed.

mod common;
// The cases drive the model's transitions; its simulation-only parts go unused here.
#[allow(dead_code)]
#[path = "sim/model.rs"]
mod model;

use common::Env;
use model::{Db, Defects, lock};
use pg_reaper_relay::protocol::{Outcome, Verdict};
use pg_reaper_relay::recovery::Intent;
use postgres::Client;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One step; `s` is the session (0 or 1) it runs on.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// A stranded barrier for `e1` with `remaining` and a callback, then the reaper's pass.
    Strand {
        remaining: i32,
        callback: bool,
    },
    Reap,
    /// The barrier moves on (a decrement): no longer stranded.
    Rearm,
    /// The newest claim's lease runs out (time passes).
    Expire,
    Claim {
        s: usize,
    },
    /// The fenced transitions, with the attempt of claim number `claim` (1-based) of `e1`.
    Hold {
        s: usize,
        claim: usize,
    },
    Begin {
        s: usize,
    },
    Lock {
        s: usize,
        claim: usize,
    },
    Resolve {
        s: usize,
        claim: usize,
        outcome: Outcome,
    },
    Fail {
        s: usize,
        claim: usize,
        max: i32,
    },
    Defer {
        s: usize,
        claim: usize,
    },
    Commit {
        s: usize,
    },
    Rollback {
        s: usize,
    },
}

/// What a case observed: one line per step, then the intent and the barrier.
type Seen = Vec<String>;

trait Side {
    fn apply(&mut self, op: Op, claims: &[Intent]) -> (String, Option<Intent>);
    fn rows(&mut self) -> String;
}

fn intent_of(claims: &[Intent], claim: usize) -> Intent {
    claims
        .get(claim - 1)
        .cloned()
        .expect("the case claims before it uses a claim")
}

fn run(side: &mut dyn Side, case: &[Op]) -> Seen {
    let mut claims = Vec::new();
    let mut seen = Vec::new();
    for op in case {
        let (line, claimed) = side.apply(*op, &claims);
        seen.push(format!("{op:?} → {line}"));
        claims.extend(claimed);
    }
    seen.push(side.rows());
    seen
}

struct Model {
    db: Arc<Mutex<Db>>,
    sessions: [u64; 2],
}

impl Model {
    fn new() -> Model {
        let mut db = Db::new(Duration::from_secs(40), true, Defects::default());
        let sessions = [db.open_session(), db.open_session()];
        Model {
            db: Arc::new(Mutex::new(db)),
            sessions,
        }
    }
}

impl Side for Model {
    fn apply(&mut self, op: Op, claims: &[Intent]) -> (String, Option<Intent>) {
        let mut db = lock(&self.db);
        let s = |i: usize| self.sessions[i];
        let lease = Duration::from_secs(60);
        let line = match op {
            Op::Strand {
                remaining,
                callback,
            } => {
                db.arm("e1", remaining, callback, true, true);
                format!("queued {}", db.reap())
            }
            Op::Reap => format!("queued {}", db.reap()),
            Op::Rearm => {
                db.rearm("e1");
                "ok".into()
            }
            Op::Expire => {
                let past = tokio::time::Instant::now() - Duration::from_secs(1);
                for r in db.rows.values_mut() {
                    r.lease_expires_at = r.lease_expires_at.map(|_| past);
                }
                "ok".into()
            }
            Op::Claim { s: i } => {
                let got = db.claim(s(i), 1, lease).expect("claim");
                return (format!("claimed {}", got.len()), got.into_iter().next());
            }
            Op::Hold { s: i, claim } => {
                format!("{:?}", db.hold(s(i), &intent_of(claims, claim), lease).ok())
            }
            Op::Begin { s: i } => format!("{:?}", db.begin(s(i)).is_ok()),
            Op::Lock { s: i, claim } => verdict(
                db.recovery_lock(s(i), &intent_of(claims, claim), lease)
                    .ok(),
            ),
            Op::Resolve {
                s: i,
                claim,
                outcome,
            } => format!(
                "{:?}",
                db.resolve(s(i), &intent_of(claims, claim), outcome).ok()
            ),
            Op::Fail { s: i, claim, max } => format!(
                "{:?}",
                db.give_back(s(i), &intent_of(claims, claim), Duration::ZERO, true, max)
                    .ok()
            ),
            Op::Defer { s: i, claim } => format!(
                "{:?}",
                db.give_back(
                    s(i),
                    &intent_of(claims, claim),
                    Duration::ZERO,
                    false,
                    i32::MAX
                )
                .ok()
            ),
            Op::Commit { s: i } => format!("{:?}", db.commit(s(i)).is_ok()),
            Op::Rollback { s: i } => {
                db.rollback(s(i));
                "true".into()
            }
        };
        (line, None)
    }

    fn rows(&mut self) -> String {
        let db = lock(&self.db);
        let rows: Vec<String> = db
            .rows
            .values()
            .map(|r| {
                row_line(
                    r.state.as_str(),
                    r.attempts,
                    r.failures,
                    r.outcome.map(|o| o.as_str()),
                )
            })
            .collect();
        format!("{rows:?} barrier {}", db.barriers.contains_key("e1"))
    }
}

fn verdict(v: Option<Verdict>) -> String {
    // The remaining count is the barrier's, shown by the rows; the verdict's word is compared.
    match v {
        Some(Verdict::Mark { .. }) => "Some(Mark)".into(),
        v => format!("{v:?}"),
    }
}

fn row_line(state: &str, attempts: i32, failures: i32, outcome: Option<&str>) -> String {
    format!("{state} attempts {attempts} failures {failures} outcome {outcome:?}")
}

struct Sql {
    clients: [Client; 2],
}

impl Sql {
    /// A boolean or word answer of one statement; None when it raised.
    fn one<T: for<'a> postgres::types::FromSql<'a>>(
        &mut self,
        s: usize,
        sql: &str,
        args: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Option<T> {
        self.clients[s].query_one(sql, args).ok().map(|r| r.get(0))
    }
}

impl Side for Sql {
    fn apply(&mut self, op: Op, claims: &[Intent]) -> (String, Option<Intent>) {
        let c = |claims: &[Intent], n| intent_of(claims, n);
        let line = match op {
            Op::Strand {
                remaining,
                callback,
            } => {
                let cb = if callback {
                    Some(serde_json::json!({"task": "agg"}))
                } else {
                    None
                };
                self.clients[0]
                    .execute(
                        "SELECT barrier_enqueue('e1', 'org', 3, '1 hour', $1)",
                        &[&cb],
                    )
                    .expect("enqueue");
                self.clients[0]
                    .execute(
                        "UPDATE pg_barrier_state SET remaining = $1, created_at = now() - interval '2 hours',
                                expires_at = now() - interval '1 second'",
                        &[&remaining],
                    )
                    .expect("strand");
                format!(
                    "queued {}",
                    self.one::<i32>(0, "SELECT queued FROM reap_expired()", &[])
                        .unwrap_or(-1)
                )
            }
            Op::Reap => format!(
                "queued {}",
                self.one::<i32>(0, "SELECT queued FROM reap_expired()", &[])
                    .unwrap_or(-1)
            ),
            Op::Rearm => {
                self.clients[0]
                    .execute("UPDATE pg_barrier_state SET expires_at = now() + interval '1 hour', last_progress_at = now()", &[])
                    .expect("rearm");
                "ok".into()
            }
            Op::Expire => {
                self.clients[0]
                    .execute("UPDATE pg_reaper_outbox SET lease_expires_at = now() - interval '1 second' WHERE lease_expires_at IS NOT NULL", &[])
                    .expect("expire");
                "ok".into()
            }
            Op::Claim { s } => {
                let rows = self.clients[s]
                    .query("SELECT id, execution_id, organization_id, remaining, attempt FROM outbox_claim(1, '60 seconds')", &[])
                    .expect("claim");
                let got = rows.first().map(|r| Intent {
                    id: r.get(0),
                    execution_id: r.get(1),
                    organization_id: r.get(2),
                    remaining: r.get(3),
                    attempt: r.get(4),
                });
                return (format!("claimed {}", rows.len()), got);
            }
            Op::Hold { s, claim } => {
                let i = c(claims, claim);
                format!(
                    "{:?}",
                    self.one::<bool>(
                        s,
                        "SELECT outbox_mark_sending($1, $2, '60 seconds')",
                        &[&i.id, &i.attempt]
                    )
                )
            }
            Op::Begin { s } => format!("{:?}", self.clients[s].batch_execute("BEGIN").is_ok()),
            Op::Lock { s, claim } => {
                let i = c(claims, claim);
                let row = self.clients[s]
                    .query_one(
                        "SELECT verdict, remaining FROM recovery_lock($1, $2, '60 seconds')",
                        &[&i.id, &i.attempt],
                    )
                    .ok();
                verdict(row.and_then(|r| Verdict::parse(r.get(0), r.get(1)).ok()))
            }
            Op::Resolve { s, claim, outcome } => {
                let i = c(claims, claim);
                format!(
                    "{:?}",
                    self.one::<bool>(
                        s,
                        "SELECT outbox_resolve($1, $2, $3)",
                        &[&i.id, &i.attempt, &outcome.as_str()]
                    )
                )
            }
            Op::Fail { s, claim, max } => {
                let i = c(claims, claim);
                let word = self.one::<String>(
                    s,
                    "SELECT outbox_fail($1, $2, 'e', '0 seconds', $3)",
                    &[&i.id, &i.attempt, &max],
                );
                format!(
                    "{:?}",
                    word.and_then(|w| pg_reaper_relay::protocol::HandedBack::parse(&w).ok())
                )
            }
            Op::Defer { s, claim } => {
                let i = c(claims, claim);
                let word = self.one::<String>(
                    s,
                    "SELECT outbox_defer($1, $2, 'e', '0 seconds')",
                    &[&i.id, &i.attempt],
                );
                format!(
                    "{:?}",
                    word.and_then(|w| pg_reaper_relay::protocol::HandedBack::parse(&w).ok())
                )
            }
            Op::Commit { s } => format!("{:?}", self.clients[s].batch_execute("COMMIT").is_ok()),
            Op::Rollback { s } => {
                format!("{:?}", self.clients[s].batch_execute("ROLLBACK").is_ok())
            }
        };
        (line, None)
    }

    fn rows(&mut self) -> String {
        let rows: Vec<String> = self.clients[0]
            .query(
                "SELECT state, attempts, failures, outcome FROM pg_reaper_outbox ORDER BY id",
                &[],
            )
            .expect("rows")
            .iter()
            .map(|r| row_line(r.get(0), r.get(1), r.get(2), r.get::<_, Option<&str>>(3)))
            .collect();
        let barrier: bool = self.clients[0]
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_barrier_state WHERE execution_id = 'e1')",
                &[],
            )
            .expect("barrier")
            .get(0);
        format!("{rows:?} barrier {barrier}")
    }
}

fn cases() -> Vec<(&'static str, Vec<Op>)> {
    use Op::*;
    let strand = Strand {
        remaining: 1,
        callback: false,
    };
    vec![
        (
            "a claim resolves",
            vec![
                strand,
                Claim { s: 0 },
                Resolve {
                    s: 0,
                    claim: 1,
                    outcome: Outcome::Gone,
                },
                Reap,
            ],
        ),
        (
            "one live intent per strand",
            vec![strand, Reap, Claim { s: 0 }, Reap, Claim { s: 1 }],
        ),
        (
            "a stale claim changes nothing",
            vec![
                strand,
                Claim { s: 0 },
                Expire,
                Claim { s: 1 },
                Resolve {
                    s: 0,
                    claim: 1,
                    outcome: Outcome::Gone,
                },
                Fail {
                    s: 0,
                    claim: 1,
                    max: 5,
                },
                Defer { s: 0, claim: 1 },
                Hold { s: 0, claim: 1 },
                Begin { s: 0 },
                Lock { s: 0, claim: 1 },
                Rollback { s: 0 },
                Resolve {
                    s: 1,
                    claim: 2,
                    outcome: Outcome::AlreadyTerminal,
                },
            ],
        ),
        (
            "failures count to dead, deferrals never",
            vec![
                strand,
                Claim { s: 0 },
                Defer { s: 0, claim: 1 },
                Claim { s: 0 },
                Defer { s: 0, claim: 2 },
                Claim { s: 0 },
                Fail {
                    s: 0,
                    claim: 3,
                    max: 2,
                },
                Claim { s: 0 },
                Fail {
                    s: 0,
                    claim: 4,
                    max: 2,
                },
                Claim { s: 0 },
            ],
        ),
        (
            "a mark commits the clean-up, a rollback keeps the handle",
            vec![
                strand,
                Claim { s: 0 },
                Hold { s: 0, claim: 1 },
                Begin { s: 0 },
                Lock { s: 0, claim: 1 },
                Rollback { s: 0 },
                Begin { s: 0 },
                Lock { s: 0, claim: 1 },
                Resolve {
                    s: 0,
                    claim: 1,
                    outcome: Outcome::MarkedError,
                },
                Commit { s: 0 },
            ],
        ),
        (
            "a locked intent is skipped by other claims",
            vec![
                strand,
                Claim { s: 0 },
                Begin { s: 0 },
                Lock { s: 0, claim: 1 },
                Expire,
                Claim { s: 1 },
                Commit { s: 0 },
                Claim { s: 1 },
            ],
        ),
        (
            "rearmed keeps the barrier",
            vec![
                strand,
                Claim { s: 0 },
                Rearm,
                Begin { s: 0 },
                Lock { s: 0, claim: 1 },
                Resolve {
                    s: 0,
                    claim: 1,
                    outcome: Outcome::Rearmed,
                },
                Commit { s: 0 },
                Reap,
            ],
        ),
        (
            "a finished callback is re-fired",
            vec![
                Strand {
                    remaining: 0,
                    callback: true,
                },
                Claim { s: 0 },
                Begin { s: 0 },
                Lock { s: 0, claim: 1 },
                Resolve {
                    s: 0,
                    claim: 1,
                    outcome: Outcome::Refired,
                },
                Commit { s: 0 },
                // The barrier stays, no longer stranded: nothing to queue or claim.
                Reap,
                Claim { s: 1 },
            ],
        ),
        (
            "without a callback it is marked",
            vec![
                Strand {
                    remaining: 0,
                    callback: false,
                },
                Claim { s: 0 },
                Begin { s: 0 },
                Lock { s: 0, claim: 1 },
                Rollback { s: 0 },
            ],
        ),
    ]
}

#[test]
fn the_simulations_outbox_answers_as_the_extensions_does() {
    let env = Env::shared("rcases");
    let mut admin = env.db();
    admin
        .batch_execute(
            "CREATE FUNCTION public.hook(text, text, jsonb, jsonb) RETURNS void LANGUAGE sql
             SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS 'SELECT'",
        )
        .expect("hook");
    let session = || {
        let mut c = env.db();
        c.batch_execute("SET pg_reaper.refire_function = 'public.hook'")
            .expect("hook setting");
        c
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    for (name, case) in cases() {
        admin
            .batch_execute("TRUNCATE pg_reaper_outbox, pg_barrier_state, pg_batch_dedup")
            .expect("clean");
        let model = runtime.block_on(async { run(&mut Model::new(), &case) });
        let mut sql = Sql {
            clients: [session(), session()],
        };
        let real = run(&mut sql, &case);
        assert_eq!(
            model, real,
            "{name}: the model (left) and the extension (right) differ"
        );
    }
}
