//! In-database tests: each runs inside one transaction that the harness rolls back. Behaviour
//! that needs several sessions (concurrency, NOTIFY, privileges, dump) lives in the integration
//! tests of the `tests/` workspace member.

#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;
    use serde_json::json;

    fn run(sql: &str) {
        Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    fn one<T: IntoDatum + FromDatum>(sql: &str) -> Option<T> {
        Spi::get_one::<T>(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    fn json(sql: &str) -> serde_json::Value {
        one::<pgrx::JsonB>(sql)
            .map(|j| j.0)
            .unwrap_or(serde_json::Value::Null)
    }

    /// `pg_reaper_try(sql)`: runs a statement in a subtransaction; its SQLSTATE and message,
    /// or 'ok'.
    fn create_try() {
        run(
            "CREATE FUNCTION pg_reaper_try(sql text) RETURNS text LANGUAGE plpgsql AS $$
             BEGIN EXECUTE sql; RETURN 'ok';
             EXCEPTION WHEN others THEN RETURN SQLSTATE || ' ' || SQLERRM; END $$",
        );
    }

    fn count(sql: &str) -> i64 {
        one::<i64>(sql).expect("count is never NULL")
    }

    /// (status, remaining, results) of one decrement.
    fn decrement(id: &str, result: &str) -> (String, Option<i32>, serde_json::Value) {
        let row = json(&format!(
            "SELECT to_jsonb(d) FROM barrier_decrement('{id}', {result}) d"
        ));
        (
            row["status"].as_str().expect("status").to_string(),
            row["remaining"].as_i64().map(|n| n as i32),
            row["results"].clone(),
        )
    }

    fn reap(args: &str) -> (i32, i32, i32, i32) {
        let row = json(&format!("SELECT to_jsonb(r) FROM reap_expired({args}) r"));
        let n = |k: &str| row[k].as_i64().expect(k) as i32;
        (
            n("stranded"),
            n("queued"),
            n("already_queued"),
            n("skipped_no_org"),
        )
    }

    // ---- the protocol's words --------------------------------------------------------

    /// The quoted words of one of the outbox's CHECK constraints.
    fn checked_words(constraint: &str) -> std::collections::BTreeSet<String> {
        let def = one::<String>(&format!(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = '{constraint}'"
        ))
        .expect("the constraint exists");
        def.split('\'')
            .skip(1)
            .step_by(2)
            .map(str::to_string)
            .collect()
    }

    #[pg_test]
    fn the_schema_checks_the_same_words_as_the_code() {
        use pg_reaper_protocol::{Action, Outcome, State};
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect();
        assert_eq!(
            checked_words("pg_reaper_outbox_state_valid"),
            words(&State::ALL.map(State::as_str))
        );
        assert_eq!(
            checked_words("pg_reaper_outbox_outcome_valid"),
            words(&Outcome::ALL.map(Outcome::as_str))
        );
        assert_eq!(
            checked_words("pg_reaper_outbox_action_valid"),
            words(&[Action::Error.as_str(), Action::Refire.as_str()])
        );
    }

    // ---- barrier_enqueue ---------------------------------------------------------------

    #[pg_test]
    fn enqueue_creates_row_with_cap_and_fresh_progress() {
        let expires = one::<TimestampWithTimeZone>(
            "SELECT barrier_enqueue('e1', 'org-1', 3, '10 minutes', '{\"task\": \"cb\"}')",
        );
        let row = json(
            "SELECT to_jsonb(b) - 'created_at' - 'expires_at' - 'last_progress_at' \
                        FROM pg_barrier_state b",
        );
        assert_eq!(
            row,
            json!({"execution_id": "e1", "organization_id": "org-1", "remaining": 3,
                   "results": [], "callback": {"task": "cb"}, "refired_at": null,
                   "callback_due_at": null, "cut_from": null})
        );
        assert_eq!(expires, one("SELECT expires_at FROM pg_barrier_state"));
        assert_eq!(
            one::<bool>(
                "SELECT expires_at = now() + interval '10 minutes' \
                         AND created_at = now() AND last_progress_at = now() FROM pg_barrier_state"
            ),
            Some(true)
        );
    }

    #[pg_test]
    fn enqueue_default_ttl_is_six_hours_and_callback_null() {
        run("SELECT barrier_enqueue('e1', 'org-1', 2)");
        assert_eq!(
            one::<bool>(
                "SELECT expires_at - created_at = interval '6 hours' AND callback IS NULL \
                         FROM pg_barrier_state"
            ),
            Some(true)
        );
    }

    #[pg_test]
    fn reenqueue_resets_every_column_and_only_this_executions_markers() {
        run("SELECT barrier_enqueue('e1', 'old-org', 5, '1 hour', '{\"v\": 1}')");
        run("SELECT barrier_enqueue('e2', 'org', 5)");
        run("SELECT barrier_claim('e1', 0), barrier_claim('e1', 1), barrier_claim('e2', 0)");
        run("SELECT barrier_decrement('e1', '{\"f\": 1}')");
        run(
            "UPDATE pg_barrier_state SET created_at = created_at - interval '1 day', \
             last_progress_at = last_progress_at - interval '1 day', refired_at = now() \
             WHERE execution_id = 'e1'",
        );
        run("SELECT barrier_enqueue('e1', 'new-org', 2, '2 hours', '{\"v\": 2}')");
        let row = json(
            "SELECT to_jsonb(b) - 'created_at' - 'expires_at' - 'last_progress_at' \
                        FROM pg_barrier_state b WHERE execution_id = 'e1'",
        );
        assert_eq!(
            row,
            json!({"execution_id": "e1", "organization_id": "new-org", "remaining": 2,
                   "results": [], "callback": {"v": 2}, "refired_at": null,
                   "callback_due_at": null, "cut_from": null})
        );
        assert_eq!(
            one::<bool>(
                "SELECT created_at = now() AND last_progress_at = now() \
                         AND expires_at = now() + interval '2 hours' \
                         FROM pg_barrier_state WHERE execution_id = 'e1'"
            ),
            Some(true)
        );
        assert_eq!(
            count("SELECT count(*) FROM pg_batch_dedup WHERE execution_id = 'e1'"),
            0
        );
        assert_eq!(
            count("SELECT count(*) FROM pg_batch_dedup WHERE execution_id = 'e2'"),
            1
        );
        assert_eq!(one::<bool>("SELECT barrier_claim('e1', 0)"), Some(true));
    }

    #[pg_test]
    fn enqueue_stores_missing_organization_as_empty() {
        run("SELECT barrier_enqueue('e1', '', 1), barrier_enqueue('e2', NULL, 1)");
        assert_eq!(
            count("SELECT count(*) FROM pg_barrier_state WHERE organization_id = ''"),
            2
        );
    }

    #[pg_test(error = "barrier_enqueue: execution_id must not be NULL or empty")]
    fn enqueue_rejects_null_execution_id() {
        run("SELECT barrier_enqueue(NULL, 'org', 1)");
    }

    #[pg_test(error = "barrier_enqueue: execution_id must not be NULL or empty")]
    fn enqueue_rejects_empty_execution_id() {
        run("SELECT barrier_enqueue('', 'org', 1)");
    }

    /// A tab, newline or carriage return vanishes from a URL path: the relay would read and
    /// mark another execution. Every control character is refused, and nothing is written.
    #[pg_test]
    fn enqueue_rejects_control_characters_and_changes_nothing() {
        create_try();
        for (id, code) in [
            ("a' || chr(9) || 'b", 9),
            ("ctl' || chr(1) || chr(10) || '", 1),
            ("x' || chr(13) || '", 13),
            ("d' || chr(127) || '", 127),
        ] {
            let seen = Spi::get_one::<String>(&format!(
                "SELECT pg_reaper_try($q$SELECT barrier_enqueue('{id}', 'org', 1)$q$)"
            ))
            .unwrap()
            .unwrap();
            assert!(
                seen.starts_with(
                    "22023 barrier_enqueue: execution_id must not contain control characters"
                ) && seen.contains(&format!("U+{code:04X}")),
                "{id}: {seen}"
            );
            let seen = Spi::get_one::<String>(&format!(
                "SELECT pg_reaper_try($q$SELECT barrier_recover('{id}')$q$)"
            ))
            .unwrap()
            .unwrap();
            assert!(
                seen.starts_with("22023 barrier_recover: execution_id must not contain control"),
                "{seen}"
            );
        }
        assert_eq!(count("SELECT count(*) FROM pg_barrier_state"), 0);
        assert_eq!(count("SELECT count(*) FROM pg_reaper_outbox"), 0);
        // Other characters a URL must encode are fine: the relay sends them percent-encoded.
        run("SELECT barrier_enqueue('a/b?c#d %é', 'org', 1)");
        assert_eq!(count("SELECT count(*) FROM pg_barrier_state"), 1);
    }

    #[pg_test(error = "barrier_enqueue: total must be at least 1")]
    fn enqueue_rejects_zero_total() {
        run("SELECT barrier_enqueue('e1', 'org', 0)");
    }

    #[pg_test(error = "barrier_enqueue: total must be at least 1")]
    fn enqueue_rejects_negative_total() {
        run("SELECT barrier_enqueue('e1', 'org', -3)");
    }

    #[pg_test(error = "barrier_enqueue: total must not be NULL")]
    fn enqueue_rejects_null_total() {
        run("SELECT barrier_enqueue('e1', 'org', NULL)");
    }

    #[pg_test(error = "barrier_enqueue: ttl must be a positive interval")]
    fn enqueue_rejects_zero_ttl() {
        run("SELECT barrier_enqueue('e1', 'org', 1, '0 seconds')");
    }

    #[pg_test(error = "barrier_enqueue: ttl must be a positive interval")]
    fn enqueue_rejects_negative_ttl() {
        run("SELECT barrier_enqueue('e1', 'org', 1, '1 day -25 hours')");
    }

    #[pg_test(error = "barrier_enqueue: ttl must not be NULL")]
    fn enqueue_rejects_null_ttl() {
        run("SELECT barrier_enqueue('e1', 'org', 1, NULL)");
    }

    #[pg_test(
        error = "new row for relation \"pg_barrier_state\" violates check constraint \"pg_barrier_expires_after_created\""
    )]
    fn table_requires_expiry_after_creation() {
        run(
            "INSERT INTO pg_barrier_state (execution_id, remaining, created_at, expires_at) \
             VALUES ('e1', 1, now(), now())",
        );
    }

    // ---- barrier_decrement -------------------------------------------------------------

    #[pg_test]
    fn decrement_pending_counts_down_and_appends() {
        run("SELECT barrier_enqueue('e1', 'org', 3)");
        assert_eq!(
            decrement("e1", "'{\"f\": 1}'"),
            ("pending".into(), Some(2), serde_json::Value::Null)
        );
        assert_eq!(
            json("SELECT results FROM pg_barrier_state"),
            json!([{"f": 1}])
        );
    }

    #[pg_test]
    fn decrement_refreshes_progress_but_never_moves_expiry() {
        run("SELECT barrier_enqueue('e1', 'org', 3)");
        run(
            "UPDATE pg_barrier_state SET last_progress_at = now() - interval '1 hour', \
             created_at = now() - interval '2 hours', expires_at = now() + interval '7 minutes'",
        );
        run("SELECT barrier_decrement('e1')");
        assert_eq!(
            one::<bool>(
                "SELECT last_progress_at = now() \
                         AND expires_at = now() + interval '7 minutes' FROM pg_barrier_state"
            ),
            Some(true)
        );
    }

    #[pg_test]
    fn decrement_appends_a_list_as_one_element_and_null_as_json_null() {
        run("SELECT barrier_enqueue('e1', 'org', 3)");
        decrement("e1", "'[1, 2]'");
        decrement("e1", "NULL");
        assert_eq!(
            json("SELECT results FROM pg_barrier_state"),
            json!([[1, 2], null])
        );
    }

    #[pg_test]
    fn decrement_to_zero_is_complete_with_all_results_and_keeps_row() {
        run("SELECT barrier_enqueue('e1', 'org', 2)");
        decrement("e1", "'{\"f\": \"a\"}'");
        assert_eq!(
            decrement("e1", "'{\"f\": \"b\"}'"),
            ("complete".into(), Some(0), json!([{"f": "a"}, {"f": "b"}]))
        );
        assert_eq!(
            count("SELECT count(*) FROM pg_barrier_state WHERE remaining = 0"),
            1
        );
    }

    #[pg_test]
    fn decrement_below_zero_is_abandoned_and_tears_row_down() {
        run("SELECT barrier_enqueue('e1', 'org', 1)");
        run("SELECT barrier_claim('e1', 0)");
        decrement("e1", "NULL");
        assert_eq!(
            decrement("e1", "NULL"),
            ("abandoned".into(), Some(-1), serde_json::Value::Null)
        );
        assert_eq!(count("SELECT count(*) FROM pg_barrier_state"), 0);
        // Like the reference, the teardown leaves dedup markers to the orphan sweep.
        assert_eq!(count("SELECT count(*) FROM pg_batch_dedup"), 1);
    }

    #[pg_test]
    fn decrement_without_row_is_abandoned() {
        assert_eq!(
            decrement("nope", "'1'"),
            ("abandoned".into(), None, serde_json::Value::Null)
        );
    }

    #[pg_test]
    fn decrement_after_abort_is_abandoned() {
        run("SELECT barrier_enqueue('e1', 'org', 2)");
        run("SELECT barrier_abort('e1')");
        assert_eq!(decrement("e1", "'1'").0, "abandoned");
    }

    #[pg_test(error = "barrier_decrement: execution_id must not be NULL or empty")]
    fn decrement_rejects_null_execution_id() {
        run("SELECT barrier_decrement(NULL, '1')");
    }

    // ---- barrier_claim -----------------------------------------------------------------

    #[pg_test]
    fn claim_first_delivery_wins_redelivery_loses() {
        assert_eq!(one::<bool>("SELECT barrier_claim('e1', 0)"), Some(true));
        assert_eq!(one::<bool>("SELECT barrier_claim('e1', 0)"), Some(false));
        assert_eq!(count("SELECT count(*) FROM pg_batch_dedup"), 1);
    }

    #[pg_test]
    fn claim_key_is_execution_and_batch() {
        assert_eq!(one::<bool>("SELECT barrier_claim('e1', 0)"), Some(true));
        assert_eq!(one::<bool>("SELECT barrier_claim('e1', 1)"), Some(true));
        assert_eq!(one::<bool>("SELECT barrier_claim('e2', 0)"), Some(true));
        assert_eq!(count("SELECT count(*) FROM pg_batch_dedup"), 3);
    }

    #[pg_test(error = "barrier_claim: batch_index must not be negative")]
    fn claim_rejects_negative_index() {
        run("SELECT barrier_claim('e1', -1)");
    }

    #[pg_test(error = "barrier_claim: batch_index must not be NULL")]
    fn claim_rejects_null_index() {
        run("SELECT barrier_claim('e1', NULL)");
    }

    #[pg_test(error = "barrier_claim: execution_id must not be NULL or empty")]
    fn claim_rejects_empty_execution_id() {
        run("SELECT barrier_claim('', 0)");
    }

    // ---- barrier_finish / barrier_abort ------------------------------------------------

    #[pg_test]
    fn finish_deletes_barrier_and_markers_once() {
        run("SELECT barrier_enqueue('e1', 'org', 1), barrier_enqueue('e2', 'org', 1)");
        run("SELECT barrier_claim('e1', 0), barrier_claim('e2', 0)");
        decrement("e1", "'1'");
        assert_eq!(one::<bool>("SELECT barrier_finish('e1')"), Some(true));
        assert_eq!(one::<bool>("SELECT barrier_finish('e1')"), Some(false));
        assert_eq!(
            count("SELECT count(*) FROM pg_barrier_state WHERE execution_id = 'e1'"),
            0
        );
        assert_eq!(
            count("SELECT count(*) FROM pg_batch_dedup WHERE execution_id = 'e1'"),
            0
        );
        assert_eq!(
            count("SELECT count(*) FROM pg_batch_dedup WHERE execution_id = 'e2'"),
            1
        );
    }

    #[pg_test]
    fn abort_winner_then_already_aborted_and_markers_cleared() {
        run("SELECT barrier_enqueue('e1', 'org', 2)");
        run("SELECT barrier_claim('e1', 0)");
        assert_eq!(
            one::<String>("SELECT barrier_abort('e1')").as_deref(),
            Some("aborted")
        );
        assert_eq!(
            one::<String>("SELECT barrier_abort('e1')").as_deref(),
            Some("already_aborted")
        );
        assert_eq!(count("SELECT count(*) FROM pg_barrier_state"), 0);
        assert_eq!(count("SELECT count(*) FROM pg_batch_dedup"), 0);
    }

    #[pg_test]
    fn abort_preserving_markers_makes_redelivery_skip() {
        run("SELECT barrier_enqueue('e1', 'org', 2)");
        run("SELECT barrier_claim('e1', 0)");
        assert_eq!(
            one::<String>("SELECT barrier_abort('e1', true)").as_deref(),
            Some("aborted")
        );
        assert_eq!(count("SELECT count(*) FROM pg_batch_dedup"), 1);
        assert_eq!(one::<bool>("SELECT barrier_claim('e1', 0)"), Some(false));
    }

    /// Markers go with the barrier, by whichever call deletes it: a finish that finds no
    /// barrier (after an abort that kept them, say) leaves them alone.
    #[pg_test]
    fn finish_without_a_barrier_keeps_preserved_markers() {
        run("SELECT barrier_enqueue('e1', 'org', 2)");
        run("SELECT barrier_claim('e1', 0)");
        run("SELECT barrier_abort('e1', true)");
        assert_eq!(one::<bool>("SELECT barrier_finish('e1')"), Some(false));
        assert_eq!(count("SELECT count(*) FROM pg_batch_dedup"), 1);
        assert_eq!(one::<bool>("SELECT barrier_claim('e1', 0)"), Some(false));
    }

    #[pg_test]
    fn abort_loser_never_clears_markers_of_a_new_claim() {
        assert_eq!(one::<bool>("SELECT barrier_claim('e1', 0)"), Some(true));
        assert_eq!(
            one::<String>("SELECT barrier_abort('e1')").as_deref(),
            Some("already_aborted")
        );
        assert_eq!(count("SELECT count(*) FROM pg_batch_dedup"), 1);
    }

    // ---- settings ------------------------------------------------------------------------

    /// A setting is its GUC where that is set to something other than its default, else the
    /// pg_reaper_settings row, else the default (read from the library's variables, not from
    /// the pg_settings view).
    #[pg_test]
    fn a_setting_is_its_guc_else_the_table_else_the_default() {
        let setting = |name: &str| one::<String>(&format!("SELECT pg_reaper_setting('{name}')"));
        assert_eq!(setting("pg_reaper.stuck_timeout").as_deref(), Some("9000"));
        assert_eq!(setting("pg_reaper.refire_function").as_deref(), Some(""));
        run("INSERT INTO pg_reaper_settings VALUES ('pg_reaper.stuck_timeout', '600'),
                                                   ('pg_reaper.refire_function', 'public.from_table')");
        assert_eq!(setting("pg_reaper.stuck_timeout").as_deref(), Some("600"));
        assert_eq!(
            one::<pgrx::datum::Interval>("SELECT pg_reaper_stuck_timeout()").map(|i| i.micros()),
            Some(600_000_000)
        );
        assert_eq!(
            setting("pg_reaper.refire_function").as_deref(),
            Some("public.from_table")
        );
        run("SET LOCAL pg_reaper.refire_function = 'public.from_guc'");
        assert_eq!(
            setting("pg_reaper.refire_function").as_deref(),
            Some("public.from_guc")
        );
        assert_eq!(
            one::<String>("SELECT pg_reaper_guc('pg_reaper.batch_size')"),
            None,
            "at its default"
        );
    }

    // ---- stranded predicate and reap_expired -------------------------------------------

    /// A barrier whose deadline passed (`expired`), or whose progress is older than the default
    /// stuck timeout of 9000 s while its deadline is still ahead (`stale`).
    fn strand(id: &str, org: &str, how: &str) {
        run(&format!("SELECT barrier_enqueue('{id}', '{org}', 4)"));
        let set = match how {
            "expired" => {
                "created_at = now() - interval '2 hours', expires_at = now() - interval '1 second'"
            }
            "stale" => {
                "created_at = now() - interval '3 hours', last_progress_at = now() - interval '9001 seconds'"
            }
            other => panic!("unknown strand {other}"),
        };
        run(&format!(
            "UPDATE pg_barrier_state SET {set} WHERE execution_id = '{id}'"
        ));
    }

    #[pg_test]
    fn stranded_predicate_covers_both_kinds_and_nothing_else() {
        let p = |e: &str, l: &str, c: &str| {
            one::<bool>(&format!(
                "SELECT barrier_is_stranded(now() + interval '{e}', now() + interval '{l}', \
                 now() + interval '{c}', interval '100 seconds')"
            ))
        };
        assert_eq!(p("-1 second", "0", "-1 hour"), Some(true));
        assert_eq!(p("1 hour", "-101 seconds", "-1 hour"), Some(true));
        assert_eq!(p("1 hour", "-99 seconds", "-1 hour"), Some(false));
        assert_eq!(p("1 hour", "0", "-1 hour"), Some(false));
    }

    #[pg_test]
    fn reap_queues_expired_and_stale_once_and_leaves_live_and_rows() {
        strand("exp", "org-1", "expired");
        strand("stale", "org-2", "stale");
        run("SELECT barrier_enqueue('live', 'org-3', 2)");
        assert_eq!(reap(""), (2, 2, 0, 0));
        assert_eq!(
            json(
                "SELECT jsonb_agg(jsonb_build_array(execution_id, organization_id, remaining, \
                  state, outcome, attempts) ORDER BY execution_id) FROM pg_reaper_outbox"
            ),
            json!([
                ["exp", "org-1", 4, "pending", null, 0],
                ["stale", "org-2", 4, "pending", null, 0]
            ])
        );
        assert_eq!(reap(""), (2, 0, 2, 0));
        assert_eq!(count("SELECT count(*) FROM pg_reaper_outbox"), 2);
        assert_eq!(
            count("SELECT count(*) FROM pg_barrier_state"),
            3,
            "reaping deletes nothing"
        );
    }

    #[pg_test]
    fn reap_skips_and_counts_barriers_without_organization() {
        strand("no-org", "", "expired");
        strand("with-org", "org", "expired");
        assert_eq!(reap(""), (2, 1, 0, 1));
        assert_eq!(
            count("SELECT count(*) FROM pg_reaper_outbox WHERE execution_id = 'no-org'"),
            0
        );
        assert_eq!(
            count("SELECT count(*) FROM pg_barrier_state WHERE execution_id = 'no-org'"),
            1
        );
    }

    #[pg_test]
    fn reap_max_rows_bounds_new_intents_and_later_calls_reach_the_rest() {
        for i in 0..5 {
            strand(&format!("e{i}"), "org", "expired");
        }
        assert_eq!(reap("max_rows => 2"), (5, 2, 0, 0));
        assert_eq!(reap("max_rows => 2"), (5, 2, 2, 0));
        assert_eq!(reap("max_rows => 2"), (5, 1, 4, 0));
        assert_eq!(
            count("SELECT count(DISTINCT execution_id) FROM pg_reaper_outbox"),
            5
        );
    }

    #[pg_test]
    fn reap_dry_run_reports_and_writes_nothing() {
        strand("a", "org", "expired");
        strand("b", "org", "stale");
        assert_eq!(reap("dry_run => true"), (2, 2, 0, 0));
        assert_eq!(count("SELECT count(*) FROM pg_reaper_outbox"), 0);
        assert_eq!(reap("1, true"), (2, 1, 0, 0));
    }

    #[pg_test]
    fn reap_requeues_after_done_but_not_while_dead() {
        strand("done", "org", "expired");
        strand("dead", "org", "expired");
        assert_eq!(reap("").1, 2);
        run(
            "UPDATE pg_reaper_outbox SET state = 'done', outcome = 'rearmed' WHERE execution_id = 'done'",
        );
        run("UPDATE pg_reaper_outbox SET state = 'dead' WHERE execution_id = 'dead'");
        assert_eq!(reap(""), (2, 1, 1, 0));
    }

    #[pg_test(error = "reap_expired: max_rows must be at least 1 (NULL: no limit)")]
    fn reap_rejects_non_positive_max_rows() {
        reap("max_rows => 0");
    }

    #[pg_test(error = "reap_expired: dry_run must not be NULL")]
    fn reap_rejects_null_dry_run() {
        reap("NULL, NULL");
    }

    // ---- the worker's walk over the strands --------------------------------------------

    /// One step of the walk with `budget` (pg_reaper.batch_size from the settings table):
    /// (queued, caught up), the walk moved on.
    fn walk_step(walk: &mut crate::reap::Walk, budget: i64) -> (i32, bool) {
        let schema =
            one::<pg_sys::Oid>("SELECT extnamespace FROM pg_extension WHERE extname = 'pg_reaper'")
                .expect("the extension's schema");
        run(&format!(
            "INSERT INTO pg_reaper_settings VALUES ('pg_reaper.batch_size', '{budget}')
             ON CONFLICT (name) DO UPDATE SET value = excluded.value"
        ));
        let (step, next) = crate::reap::walk_step(schema, walk);
        *walk = next;
        (step.queued, step.caught_up)
    }

    #[pg_test]
    fn the_walk_queues_a_mass_strand_batch_by_batch_then_catches_up() {
        // 25 barriers stranded at one and the same moment (one statement, one now()), the
        // first three without an organization; x10 already queued; two stale ones; one live.
        run("INSERT INTO pg_barrier_state
                 (execution_id, organization_id, remaining, created_at, expires_at, last_progress_at)
             SELECT 'x' || lpad(i::text, 2, '0'), CASE WHEN i <= 3 THEN '' ELSE 'org' END, 2,
                    now() - interval '7 hours', now() - interval '1 hour', now() - interval '1 hour'
               FROM generate_series(1, 25) i");
        run("INSERT INTO pg_barrier_state
                 (execution_id, organization_id, remaining, created_at, expires_at, last_progress_at)
             SELECT 'stale' || i, 'org', 2, now() - interval '5 hours', now() + interval '1 hour',
                    now() - interval '3 hours'
               FROM generate_series(1, 2) i");
        run("SELECT barrier_enqueue('live', 'org', 2)");
        run(
            "INSERT INTO pg_reaper_outbox (execution_id, organization_id, remaining) VALUES ('x10', 'org', 2)",
        );
        let mut walk = crate::reap::Walk::default();
        assert_eq!(walk_step(&mut walk, 10), (10, false));
        assert_eq!(
            count(
                "SELECT count(*) FROM pg_reaper_outbox WHERE execution_id BETWEEN 'x04' AND 'x14'"
            ),
            11,
            "the first ten in (deadline, id) order, x10 skipped"
        );
        assert_eq!(walk_step(&mut walk, 10), (10, false));
        // x25, then both stale ones: fewer than asked, both kinds walked to their end.
        assert_eq!(walk_step(&mut walk, 10), (3, true));
        // Starting over finds nothing new.
        assert_eq!(walk_step(&mut walk, 10), (0, true));
        assert_eq!(
            json("SELECT jsonb_agg(execution_id ORDER BY execution_id) FROM pg_barrier_state b
                   WHERE NOT EXISTS (SELECT 1 FROM pg_reaper_outbox o WHERE o.execution_id = b.execution_id)"),
            json!(["live", "x01", "x02", "x03"])
        );
        assert_eq!(
            json("SELECT to_jsonb(o) FROM pg_reaper_orgless() o"),
            json!({"n": 3, "sample": ["x01", "x02", "x03"]})
        );
    }

    #[pg_test]
    fn the_walk_finds_a_strand_behind_its_position_on_the_next_pass() {
        run("INSERT INTO pg_barrier_state
                 (execution_id, organization_id, remaining, created_at, expires_at, last_progress_at)
             SELECT 'y' || i, 'org', 2, now() - interval '7 hours', now() - interval '1 hour' + i * interval '1 second',
                    now() - interval '1 hour'
               FROM generate_series(1, 4) i");
        let mut walk = crate::reap::Walk::default();
        assert_eq!(walk_step(&mut walk, 2), (2, false));
        // A strand with an earlier deadline than the walk's position, and one queued intent
        // done (its barrier stranded again): neither is lost.
        run("INSERT INTO pg_barrier_state
                 (execution_id, organization_id, remaining, created_at, expires_at, last_progress_at)
             VALUES ('early', 'org', 2, now() - interval '7 hours', now() - interval '2 hours', now() - interval '2 hours')");
        run(
            "UPDATE pg_reaper_outbox SET state = 'done', outcome = 'rearmed' WHERE execution_id = 'y1'",
        );
        assert_eq!(walk_step(&mut walk, 2), (2, false));
        assert_eq!(walk_step(&mut walk, 2), (0, true));
        assert_eq!(
            walk_step(&mut walk, 10),
            (2, true),
            "the next pass: early and y1 again"
        );
        assert_eq!(
            count("SELECT count(*) FROM pg_reaper_outbox WHERE state <> 'done'"),
            5
        );
    }

    // ---- status view -------------------------------------------------------------------

    #[pg_test]
    fn status_view_counts_barriers_and_outbox_states() {
        strand("a", "org", "expired");
        strand("b", "org", "stale");
        strand("c", "org", "expired");
        run("SELECT barrier_enqueue('live', 'org', 1)");
        reap("");
        run("UPDATE pg_reaper_outbox SET state = 'dead' WHERE execution_id = 'b'");
        run(
            "UPDATE pg_reaper_outbox SET state = 'in_flight', lease_expires_at = now() WHERE execution_id = 'c'",
        );
        run("UPDATE pg_reaper_outbox SET created_at = now() - interval '1 minute'");
        let s = json("SELECT to_jsonb(s) FROM pg_reaper_status s");
        assert_eq!(
            (
                &s["outbox_pending"],
                &s["outbox_in_flight"],
                &s["outbox_dead"],
                &s["outbox_done"]
            ),
            (&json!(1), &json!(1), &json!(1), &json!(0))
        );
        assert_eq!(
            (&s["barriers_live"], &s["barriers_stranded"]),
            (&json!(1), &json!(3))
        );
        assert_eq!(s["oldest_pending_age"], json!("00:01:00"));
        assert_eq!(count("SELECT count(*) FROM pg_reaper_status"), 1);
    }

    #[pg_test]
    fn status_oldest_pending_age_is_null_when_nothing_pending() {
        assert_eq!(
            one::<bool>("SELECT oldest_pending_age IS NULL FROM pg_reaper_status"),
            Some(true)
        );
    }

    // ---- outbox transitions (the relay's side) -----------------------------------------

    /// Strands and reaps `id`; returns the intent's id.
    fn intent(id: &str, how: &str) -> i64 {
        strand(id, "org", how);
        reap("");
        one::<i64>(&format!(
            "SELECT id FROM pg_reaper_outbox WHERE execution_id = '{id}'"
        ))
        .expect("intent")
    }

    fn claim_one() -> (i64, i32) {
        let row = json("SELECT to_jsonb(c) FROM outbox_claim(1, '1 minute') c");
        (
            row["id"].as_i64().expect("id"),
            row["attempt"].as_i64().expect("attempt") as i32,
        )
    }

    fn verdict(id: i64, attempt: i32) -> (String, Option<i32>) {
        let row = json(&format!(
            "SELECT to_jsonb(v) FROM recovery_lock({id}, {attempt}) v"
        ));
        (
            row["verdict"].as_str().expect("verdict").to_string(),
            row["remaining"].as_i64().map(|n| n as i32),
        )
    }

    #[pg_test]
    fn claim_takes_due_intents_once_with_a_lease_and_counts_attempts() {
        let id = intent("e1", "expired");
        intent("later", "expired");
        run(
            "UPDATE pg_reaper_outbox SET next_attempt_at = now() + interval '1 hour' WHERE execution_id = 'later'",
        );
        assert_eq!(
            json("SELECT jsonb_agg(to_jsonb(c)) FROM outbox_claim(10, '30 seconds') c"),
            json!([{"id": id, "execution_id": "e1", "organization_id": "org", "remaining": 4, "attempt": 1}])
        );
        assert_eq!(
            one::<bool>(
                "SELECT state = 'in_flight' AND lease_expires_at = now() + interval '30 seconds' \
                         FROM pg_reaper_outbox WHERE execution_id = 'e1'"
            ),
            Some(true)
        );
        assert_eq!(
            count("SELECT count(*) FROM outbox_claim(10)"),
            0,
            "nothing else is due"
        );
    }

    #[pg_test]
    fn fail_backs_off_then_goes_dead_and_a_stale_claim_is_lost() {
        let id = intent("e1", "expired");
        let (_, attempt) = claim_one();
        let state = |sql: &str| one::<String>(sql).expect("state");
        assert_eq!(
            state(&format!(
                "SELECT outbox_fail({id}, {attempt}, 'HTTP 503', '10 seconds', 2)"
            )),
            "pending"
        );
        assert_eq!(
            one::<bool>(
                "SELECT next_attempt_at = now() + interval '10 seconds' AND last_error = 'HTTP 503' \
                         AND lease_expires_at IS NULL FROM pg_reaper_outbox"
            ),
            Some(true)
        );
        assert_eq!(
            state(&format!(
                "SELECT outbox_fail({id}, {attempt}, 'again', '0', 2)"
            )),
            "lost"
        );
        run("UPDATE pg_reaper_outbox SET next_attempt_at = now()");
        let (_, attempt) = claim_one();
        assert_eq!(attempt, 2);
        assert_eq!(
            state(&format!(
                "SELECT outbox_fail({id}, {attempt}, 'HTTP 500', '1 second', 2)"
            )),
            "dead"
        );
        assert_eq!(
            count("SELECT count(*) FROM outbox_claim(10)"),
            0,
            "dead intents are not claimed"
        );
        assert_eq!(reap("").2, 1, "a dead intent blocks a new one");
        assert_eq!(one::<i64>("SELECT outbox_replay()"), Some(1));
        assert_eq!(
            json("SELECT jsonb_build_array(state, failures, attempts) FROM pg_reaper_outbox"),
            json!(["pending", 0, 2]),
            "the failure budget is back; the fencing token is kept"
        );
    }

    /// A failure that says nothing about the execution (the API unreachable) is deferred:
    /// pending again, never counted, never dead, however often; fenced like the others.
    #[pg_test]
    fn defer_never_counts_and_never_kills() {
        let id = intent("e1", "expired");
        for _ in 0..5 {
            run("UPDATE pg_reaper_outbox SET next_attempt_at = now()");
            let (_, attempt) = claim_one();
            assert_eq!(
                one::<String>(&format!(
                    "SELECT outbox_defer({id}, {attempt}, 'status read: HTTP 503', '0')"
                )),
                Some("pending".to_string())
            );
            assert_eq!(
                one::<String>(&format!(
                    "SELECT outbox_defer({id}, {attempt}, 'again', '0')"
                )),
                Some("lost".to_string())
            );
        }
        assert_eq!(
            json(
                "SELECT jsonb_build_array(state, failures, attempts, last_error) FROM pg_reaper_outbox"
            ),
            json!(["pending", 0, 5, "status read: HTTP 503"])
        );
        // One failure about the execution, with a budget of one: dead.
        let (_, attempt) = claim_one();
        assert_eq!(
            one::<String>(&format!(
                "SELECT outbox_fail({id}, {attempt}, 'HTTP 500', '0', 1)"
            )),
            Some("dead".to_string())
        );
    }

    /// Before an ERROR mark leaves, the claim is held for the settle delay (committed), so a
    /// relay that dies with its request in flight is not taken over before the API had that
    /// long to apply it; a later renewal never shortens the hold.
    #[pg_test]
    fn mark_sending_holds_the_claim_for_the_settle_delay() {
        let id = intent("e1", "expired");
        let (_, attempt) = claim_one();
        assert_eq!(
            one::<bool>(&format!(
                "SELECT outbox_mark_sending({id}, {attempt}, '10 minutes')"
            )),
            Some(true)
        );
        assert_eq!(verdict(id, attempt).0, "mark");
        assert_eq!(
            one::<bool>(
                "SELECT mark_sent_at = now() AND lease_expires_at = now() + interval '10 minutes' \
                 FROM pg_reaper_outbox"
            ),
            Some(true)
        );
        assert_eq!(
            one::<bool>(&format!(
                "SELECT outbox_mark_sending({id}, {}, '10 minutes')",
                attempt + 1
            )),
            Some(false),
            "not the caller's claim"
        );
    }

    /// A single pass (the relay's `--once`) claims what was due when it started: an intent that
    /// became due later, such as one that failed during the pass, waits for the next pass.
    #[pg_test]
    fn claim_due_by_leaves_what_became_due_later() {
        let early = intent("early", "expired");
        intent("late", "expired");
        run(&format!(
            "UPDATE pg_reaper_outbox SET next_attempt_at = now() - interval '1 minute' \
             WHERE id = {early}"
        ));
        assert_eq!(
            json(
                "SELECT jsonb_agg(id) FROM outbox_claim(10, '1 minute', now() - interval '30 seconds')"
            ),
            json!([early])
        );
        assert_eq!(
            count("SELECT count(*) FROM outbox_claim(10, '1 minute', NULL)"),
            1
        );
    }

    /// A relay that died holding a claim never comes back for it: once its lease expired, any
    /// relay's claim takes it over (no background worker needed), and the dead relay's token
    /// is lost.
    #[pg_test]
    fn claim_takes_over_an_expired_lease_and_fences_the_old_claim() {
        let id = intent("e1", "expired");
        let (_, first) = claim_one();
        assert_eq!(count("SELECT count(*) FROM outbox_claim(10)"), 0, "leased");
        run("UPDATE pg_reaper_outbox SET lease_expires_at = now() - interval '1 second'");
        let (cid, second) = claim_one();
        assert_eq!((cid, second), (id, first + 1));
        assert_eq!(
            one::<String>(&format!(
                "SELECT outbox_fail({id}, {first}, 'late', '1 second', 5)"
            )),
            Some("lost".to_string())
        );
        assert_eq!(verdict(id, first).0, "lost");
        assert_eq!(
            one::<bool>(&format!("SELECT outbox_resolve({id}, {first}, 'gone')")),
            Some(false)
        );
        assert_eq!(verdict(id, second).0, "mark");
    }

    /// One intent whose counter is at the integer maximum would make every claim overflow: it is
    /// set aside as dead (with a WARNING), and the healthy ones are claimed as usual.
    #[pg_test]
    fn an_intent_at_the_attempts_maximum_is_set_aside_and_never_blocks_claims() {
        let extreme = intent("extreme", "expired");
        let healthy = intent("healthy", "expired");
        run(&format!(
            "UPDATE pg_reaper_outbox SET attempts = 2147483647, \
             next_attempt_at = now() - interval '1 hour' WHERE id = {extreme}"
        ));
        assert_eq!(
            json("SELECT jsonb_agg(id) FROM outbox_claim(10)"),
            json!([healthy])
        );
        assert_eq!(
            json(&format!(
                "SELECT jsonb_build_array(state, attempts, last_error LIKE 'set aside:%') \
                 FROM pg_reaper_outbox WHERE id = {extreme}"
            )),
            json!(["dead", 2147483647, true])
        );
        assert_eq!(
            one::<i64>(&format!("SELECT outbox_replay({extreme})")),
            Some(1)
        );
        assert_eq!(
            json("SELECT jsonb_agg(id) FROM outbox_claim(10)"),
            json!([extreme])
        );
    }

    #[pg_test]
    fn release_returns_a_held_claim_only() {
        let id = intent("e1", "expired");
        let (_, attempt) = claim_one();
        assert_eq!(
            one::<bool>(&format!("SELECT outbox_release({id}, {})", attempt + 1)),
            Some(false)
        );
        assert_eq!(
            one::<bool>(&format!("SELECT outbox_release({id}, {attempt})")),
            Some(true)
        );
        assert_eq!(
            json(
                "SELECT jsonb_build_array(state, attempts, lease_expires_at) FROM pg_reaper_outbox"
            ),
            json!(["pending", 1, null])
        );
    }

    #[pg_test]
    fn recovery_lock_verdicts() {
        let id = intent("mark", "expired");
        let (cid, attempt) = claim_one();
        assert_eq!(cid, id);
        assert_eq!(verdict(id, attempt + 1).0, "lost");
        assert_eq!(verdict(id, attempt), ("mark".into(), Some(4)));
        // Re-armed: the execution was enqueued again since it was reaped.
        run("SELECT barrier_enqueue('mark', 'org', 2)");
        assert_eq!(verdict(id, attempt), ("rearmed".into(), Some(2)));
        // Gone: finished by its own worker.
        run("SELECT barrier_finish('mark')");
        assert_eq!(verdict(id, attempt), ("rearmed".into(), None));
    }

    /// Execution `zero`: its one batch done (with `result`), the callback never fired, and the
    /// deadline passed; reaped and claimed. Returns the claim (id, attempt).
    fn callback_lost(callback: &str, result: &str) -> (i64, i32) {
        run(&format!(
            "SELECT barrier_enqueue('zero', 'org', 1, '1 hour', '{callback}')"
        ));
        run(&format!("SELECT barrier_decrement('zero', '{result}')"));
        run(
            "UPDATE pg_barrier_state SET created_at = now() - interval '2 hours', \
             expires_at = now() - interval '1 second'",
        );
        reap("");
        claim_one()
    }

    #[pg_test]
    fn recovery_lock_chooses_refire_only_with_callback_zero_and_hook() {
        run("CREATE TABLE refired (args jsonb)");
        run(
            "CREATE FUNCTION record_refire(e text, o text, c jsonb, r jsonb) RETURNS void \
             LANGUAGE sql AS $$ INSERT INTO public.refired VALUES (jsonb_build_array(e, o, c, r)) $$",
        );
        let (id, attempt) = callback_lost(r#"{"task": "agg"}"#, r#"{"r": 1}"#);
        assert_eq!(
            verdict(id, attempt),
            ("mark".into(), Some(0)),
            "no hook configured"
        );
        run("SET pg_reaper.refire_function = 'public.record_refire'");
        assert_eq!(verdict(id, attempt), ("refire".into(), Some(0)));
        assert_eq!(
            one::<bool>(&format!(
                "SELECT outbox_resolve({id}, {attempt}, 'refired')"
            )),
            Some(true)
        );
        assert_eq!(
            json("SELECT args FROM refired"),
            json!(["zero", "org", {"task": "agg"}, [{"r": 1}]])
        );
        assert_eq!(
            json("SELECT jsonb_build_array(state, outcome) FROM pg_reaper_outbox"),
            json!(["done", "refired"])
        );
        // The barrier stays as the execution's handle, stamped and not stranded until the
        // stuck timeout has passed again.
        assert_eq!(
            json(
                "SELECT jsonb_build_array(refired_at = now(), last_progress_at = now(),                  expires_at >= now() + pg_reaper_stuck_timeout(),                  barrier_explain('zero')->>'state') FROM pg_barrier_state"
            ),
            json!([true, true, true, "refired"])
        );
        assert_eq!(
            reap(""),
            (0, 0, 0, 0),
            "nothing to reap while the callback runs"
        );
        // Stranded again (the re-fired callback never finished): marked, never re-fired twice.
        run(
            "UPDATE pg_barrier_state SET last_progress_at = now() - interval '1 day',              expires_at = now() - interval '1 second'",
        );
        reap("");
        let (id, attempt) = claim_one();
        assert_eq!(verdict(id, attempt), ("mark".into(), Some(0)));
        assert_eq!(count("SELECT count(*) FROM refired"), 1);
        // A re-arm of the same execution starts afresh.
        run("SELECT barrier_enqueue('zero', 'org', 1, '1 hour', '{}')");
        assert_eq!(
            count("SELECT count(*) FROM pg_barrier_state WHERE refired_at IS NULL"),
            1
        );
    }

    #[pg_test]
    fn the_tables_are_checked_again_at_run_time() {
        assert_eq!(one::<String>("SELECT pg_reaper_drift()"), None);
        run("ALTER TABLE pg_barrier_state ALTER COLUMN remaining TYPE bigint");
        run("ALTER TABLE pg_batch_dedup DROP CONSTRAINT pg_batch_dedup_pkey");
        let drift = "public.pg_barrier_state: column \"remaining\" is bigint, expected integer; \
                     public.pg_batch_dedup: it has no unique index or constraint on exactly \
                     (execution_id,batch_index)";
        assert_eq!(
            one::<String>("SELECT pg_reaper_drift()").as_deref(),
            Some(drift)
        );
        assert_eq!(
            one::<String>("SELECT tables_drift FROM pg_reaper_status").as_deref(),
            Some(drift)
        );
        assert_eq!(
            json("SELECT barrier_explain('e')->'tables_drift'"),
            json!(drift)
        );
        // The columns pg_reaper adds are needed too, once adopted.
        run("ALTER TABLE pg_barrier_state ALTER COLUMN remaining TYPE integer");
        run("ALTER TABLE pg_batch_dedup ADD PRIMARY KEY (execution_id, batch_index)");
        run("ALTER TABLE pg_barrier_state DROP COLUMN refired_at");
        assert_eq!(
            one::<String>("SELECT pg_reaper_drift()").as_deref(),
            Some(
                "public.pg_barrier_state: it has no column \"refired_at\" (timestamp with time zone)"
            )
        );
    }

    #[pg_test]
    fn a_hook_that_declines_leaves_nothing_and_the_verdict_is_mark() {
        run("CREATE TABLE refired (e text)");
        run(
            "CREATE FUNCTION picky(e text, o text, c jsonb, r jsonb) RETURNS void LANGUAGE plpgsql AS $$ \
             BEGIN INSERT INTO public.refired VALUES (e); \
             RAISE EXCEPTION 'not mine' USING ERRCODE = 'feature_not_supported'; END $$",
        );
        run("SET pg_reaper.refire_function = 'public.picky'");
        let (id, attempt) = callback_lost(r#"{"transport": "celery"}"#, "1");
        assert_eq!(verdict(id, attempt), ("mark".into(), Some(0)));
        assert_eq!(
            count("SELECT count(*) FROM refired"),
            0,
            "its writes undone"
        );
        assert_eq!(
            count("SELECT count(*) FROM pg_barrier_state WHERE refired_at IS NULL"),
            1,
            "not stamped"
        );
    }

    /// (cut, lapsed) of one pg_reaper_cut_deadlines.
    fn cut() -> (i32, i32) {
        let row = json("SELECT to_jsonb(c) FROM pg_reaper_cut_deadlines(1000) c");
        (
            row["cut"].as_i64().expect("cut") as i32,
            row["lapsed"].as_i64().expect("lapsed") as i32,
        )
    }

    #[pg_test]
    fn an_overdue_callback_is_stranded_for_a_refire_and_a_decline_gives_its_deadline_back() {
        run("CREATE TABLE refired (e text)");
        run(
            "CREATE FUNCTION picky(e text, o text, c jsonb, r jsonb) RETURNS void LANGUAGE plpgsql AS $$ \
             BEGIN IF c ? 'celery' THEN RAISE EXCEPTION 'not mine' USING ERRCODE = 'feature_not_supported'; END IF; \
             INSERT INTO public.refired VALUES (e); END $$",
        );
        // Without a hook, the final decrement sets no callback deadline: as before.
        run("SELECT barrier_enqueue('nohook', 'org', 1, '1 hour', '{}')");
        run("SELECT barrier_decrement('nohook')");
        run("SET pg_reaper.refire_function = 'public.picky'");
        run(
            "INSERT INTO pg_reaper_settings VALUES ('pg_reaper.callback_timeout', '120') ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        );
        // Nor without a callback; nor before the last batch.
        run("SELECT barrier_enqueue('nocallback', 'org', 1, '1 hour')");
        run("SELECT barrier_decrement('nocallback')");
        for id in ["lost", "celery"] {
            let callback = if id == "celery" {
                r#"{"celery": 1}"#
            } else {
                "{}"
            };
            run(&format!(
                "SELECT barrier_enqueue('{id}', 'org', 2, '1 hour', '{callback}')"
            ));
            run(&format!("SELECT barrier_decrement('{id}')"));
        }
        assert_eq!(
            count("SELECT count(*) FROM pg_barrier_state WHERE callback_due_at IS NOT NULL"),
            0
        );
        run("SELECT barrier_decrement('lost'), barrier_decrement('celery')");
        assert_eq!(
            json(
                "SELECT jsonb_agg(execution_id ORDER BY execution_id) FROM pg_barrier_state \
                 WHERE callback_due_at = now() + interval '120 seconds'"
            ),
            json!(["celery", "lost"])
        );
        assert_eq!(cut(), (0, 0), "nothing is due yet");
        assert_eq!(
            json("SELECT barrier_explain('lost')->'state'"),
            json!("complete_awaiting_finish")
        );
        // The callback was lost: past its due time the tick strands the barrier.
        // (Created in this test's transaction: a cut deadline must still follow creation.)
        run("UPDATE pg_barrier_state SET created_at = now() - interval '1 minute'");
        run(
            "UPDATE pg_barrier_state SET callback_due_at = now() - interval '1 second' WHERE callback_due_at IS NOT NULL",
        );
        assert_eq!(cut(), (2, 0));
        assert_eq!(
            json(
                "SELECT jsonb_agg(jsonb_build_array(execution_id, callback_due_at IS NULL, \
                 cut_from = now() + interval '1 hour', \
                 barrier_is_stranded(expires_at, last_progress_at, created_at, interval '1 day')) \
                 ORDER BY execution_id) FROM pg_barrier_state WHERE cut_from IS NOT NULL"
            ),
            json!([["celery", true, true, true], ["lost", true, true, true]])
        );
        assert_eq!(
            json("SELECT barrier_explain('lost')->'state'"),
            json!("callback_overdue")
        );
        assert_eq!(reap("").1, 2, "the walk queues both");
        let mut verdicts = std::collections::BTreeMap::new();
        for _ in 0..2 {
            let (id, attempt) = claim_one();
            let e = one::<String>(&format!(
                "SELECT execution_id FROM pg_reaper_outbox WHERE id = {id}"
            ))
            .expect("execution id");
            verdicts.insert(e, verdict(id, attempt).0);
        }
        assert_eq!(
            verdicts,
            [
                ("celery".into(), "rearmed".into()),
                ("lost".into(), "refire".into())
            ]
            .into(),
            "re-fired; the declined one is not marked early"
        );
        assert_eq!(
            json(
                "SELECT jsonb_agg(jsonb_build_array(execution_id, cut_from, \
                 expires_at = now() + interval '1 hour', refired_at IS NOT NULL) \
                 ORDER BY execution_id) FROM pg_barrier_state WHERE execution_id IN ('celery', 'lost')"
            ),
            json!([["celery", null, true, false], ["lost", null, false, true]]),
            "the declined one has its deadline back; the re-fired one is stamped"
        );
        assert_eq!(json("SELECT jsonb_agg(e) FROM refired"), json!(["lost"]));
        assert_eq!(cut(), (0, 0), "neither is due again");
    }

    #[pg_test]
    fn a_callback_deadline_without_a_hook_any_more_is_only_cleared() {
        run("SET pg_reaper.refire_function = 'public.gone'");
        run("SELECT barrier_enqueue('e', 'org', 1, '1 hour', '{}')");
        run("SELECT barrier_decrement('e')");
        run("SET pg_reaper.refire_function = ''");
        run("UPDATE pg_barrier_state SET callback_due_at = now() - interval '1 second'");
        run("UPDATE pg_barrier_state SET created_at = now() - interval '1 minute'");
        assert_eq!(cut(), (1, 0));
        assert_eq!(
            json(
                "SELECT to_jsonb(array[callback_due_at IS NULL, cut_from IS NULL, \
                 expires_at = now() + interval '1 hour']) FROM pg_barrier_state"
            ),
            json!([true, true, true])
        );
        // callback_timeout = 0 turns it off.
        run("SET pg_reaper.refire_function = 'public.gone'");
        run(
            "INSERT INTO pg_reaper_settings VALUES ('pg_reaper.callback_timeout', '0') ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        );
        run("SELECT barrier_enqueue('e', 'org', 1, '1 hour', '{}')");
        run("SELECT barrier_decrement('e')");
        assert_eq!(
            count("SELECT count(*) FROM pg_barrier_state WHERE callback_due_at IS NOT NULL"),
            0
        );
    }

    #[pg_test]
    fn a_lease_fences_every_claim_but_the_last() {
        run("SELECT barrier_enqueue('e', 'org', 2)");
        let first = one::<i64>("SELECT barrier_claim_lease('e', 0, '30 seconds')").expect("token");
        assert_eq!(
            one::<i64>("SELECT barrier_claim_lease('e', 0, '30 seconds')"),
            None,
            "a redelivery is skipped while the lease lives"
        );
        assert!(
            one::<bool>(&format!(
                "SELECT barrier_renew_lease('e', 0, {first}, '1 minute') = now() + interval '1 minute'"
            ))
            .unwrap_or(false)
        );
        // The worker stalls: its lease lapses and a redelivery takes the batch over.
        run("UPDATE pg_batch_dedup SET lease_expires_at = now() - interval '1 second'");
        let second = one::<i64>("SELECT barrier_claim_lease('e', 0)").expect("token");
        assert!(second > first, "{second} > {first}");
        // The first worker comes back: refused, and nothing changes.
        assert_eq!(
            one::<pgrx::datum::TimestampWithTimeZone>(&format!(
                "SELECT barrier_renew_lease('e', 0, {first})"
            )),
            None
        );
        assert_eq!(
            json(&format!(
                "SELECT to_jsonb(d) FROM barrier_decrement_lease('e', 0, {first}, '1') d"
            )),
            json!({"status": "fenced", "remaining": null, "results": null})
        );
        assert_eq!(count("SELECT remaining FROM pg_barrier_state"), 2);
        // The second counts it down once; the batch is done for good.
        assert_eq!(
            json(&format!(
                "SELECT to_jsonb(d) FROM barrier_decrement_lease('e', 0, {second}, '2') d"
            )),
            json!({"status": "pending", "remaining": 1, "results": null})
        );
        assert_eq!(
            json(&format!(
                "SELECT to_jsonb(d)->'status' FROM barrier_decrement_lease('e', 0, {second}, '2') d"
            )),
            json!("fenced"),
            "a decrement repeated is refused"
        );
        run("UPDATE pg_batch_dedup SET created_at = created_at - interval '1 day'");
        assert_eq!(one::<i64>("SELECT barrier_claim_lease('e', 0)"), None);
        // A batch claimed without a lease is never claimed again, with or without one.
        assert_eq!(one::<bool>("SELECT barrier_claim('e', 1)"), Some(true));
        assert_eq!(one::<i64>("SELECT barrier_claim_lease('e', 1)"), None);
        assert_eq!(count("SELECT remaining FROM pg_barrier_state"), 1);
    }

    #[pg_test]
    fn lease_arguments_are_checked_before_anything_changes() {
        create_try();
        for (sql, error) in [
            (
                "SELECT barrier_claim_lease('e', 0, '0 seconds')",
                "22023 barrier_claim_lease: lease must be a positive interval",
            ),
            (
                "SELECT barrier_claim_lease('e', -1)",
                "22023 barrier_claim_lease: batch_index must not be negative",
            ),
            (
                "SELECT barrier_claim_lease('', 0)",
                "22023 barrier_claim_lease: execution_id must not be NULL or empty",
            ),
            (
                "SELECT barrier_renew_lease('e', 0, NULL)",
                "22023 barrier_renew_lease: token must not be NULL (it is what barrier_claim_lease returned)",
            ),
            (
                "SELECT barrier_renew_lease('e', 0, 1, NULL)",
                "22023 barrier_renew_lease: lease must not be NULL",
            ),
            (
                "SELECT barrier_decrement_lease('e', NULL, 1)",
                "22023 barrier_decrement_lease: batch_index must not be NULL",
            ),
        ] {
            assert_eq!(
                one::<String>(&format!("SELECT pg_reaper_try($q${sql}$q$)")).as_deref(),
                Some(error),
                "{sql}"
            );
        }
        assert_eq!(count("SELECT count(*) FROM pg_batch_dedup"), 0);
    }

    #[pg_test]
    fn a_lease_nobody_claims_again_strands_its_execution() {
        run(
            "INSERT INTO pg_reaper_settings VALUES ('pg_reaper.reclaim_timeout', '60') ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        );
        run("SELECT barrier_enqueue('dead', 'org', 2), barrier_enqueue('slow', 'org', 2)");
        let dead = one::<i64>("SELECT barrier_claim_lease('dead', 0)").expect("token");
        run("SELECT barrier_claim_lease('slow', 0)");
        run("UPDATE pg_barrier_state SET created_at = now() - interval '1 hour'");
        run(
            "UPDATE pg_batch_dedup SET lease_expires_at = now() - interval '61 seconds' WHERE execution_id = 'dead'",
        );
        run(
            "UPDATE pg_batch_dedup SET lease_expires_at = now() - interval '59 seconds' WHERE execution_id = 'slow'",
        );
        assert_eq!(
            cut(),
            (0, 1),
            "only the lease lapsed beyond the reclaim timeout"
        );
        assert_eq!(
            json(
                "SELECT jsonb_agg(jsonb_build_array(execution_id, \
                 barrier_is_stranded(expires_at, last_progress_at, created_at, interval '1 day')) \
                 ORDER BY execution_id) FROM pg_barrier_state"
            ),
            json!([["dead", true], ["slow", false]])
        );
        assert_eq!(
            one::<i64>("SELECT barrier_claim_lease('dead', 0)"),
            None,
            "the batch was given up"
        );
        assert_eq!(
            json(&format!(
                "SELECT to_jsonb(d)->'status' FROM barrier_decrement_lease('dead', 0, {dead}) d"
            )),
            json!("fenced")
        );
        assert_eq!(
            json("SELECT barrier_explain('dead')->'advice'"),
            json!(
                "Stranded and not queued yet: the next tick queues it (the worker's, within a naptime; in the extension-free edition, its driver's), or run SELECT * FROM reap_expired()."
            )
        );
        assert_eq!(reap("").1, 1);
        assert_eq!(cut(), (0, 0), "given up once");
    }

    #[pg_test(
        error = "outbox_resolve: execution zero was not re-fired in this transaction: 'refired' follows recovery_lock's 'refire' verdict, in its transaction"
    )]
    fn refired_needs_the_refire_verdict() {
        let (id, attempt) = callback_lost("{}", "null");
        run(&format!(
            "SELECT outbox_resolve({id}, {attempt}, 'refired')"
        ));
    }

    #[pg_test(
        error = "pg_reaper.refire_function = 'x(text); DROP TABLE pg_barrier_state; --' does not name a function f(text, text, jsonb, jsonb); fix the setting (or set it to '' to mark ERROR instead)"
    )]
    fn refire_hook_name_is_parsed_never_executed() {
        let (id, attempt) = callback_lost("{}", "null");
        run("SET pg_reaper.refire_function = 'x(text); DROP TABLE pg_barrier_state; --'");
        verdict(id, attempt);
    }

    #[pg_test]
    fn refire_hook_names_are_identifiers_only() {
        // Only (qualified, quoted) identifiers reach to_regprocedure, which raises a syntax
        // error for anything else: every other setting is "does not name a function" (42883),
        // and a name that exists resolves.
        create_try();
        run(
            "CREATE FUNCTION public.\"Re \"\"fire\"\"\"(text, text, jsonb, jsonb) RETURNS void
             LANGUAGE sql AS ''",
        );
        for (name, resolves) in [
            ("f", false),
            ("public.\"Re \"\"fire\"\"\"", true),
            ("_x$1", false),
            ("a.b.c", false),
            ("1f", false),
            ("f()", false),
            ("f(text)", false),
            ("\"unterminated", false),
            ("\"\"", false),
            ("f; DROP TABLE x", false),
            ("a.", false),
        ] {
            run(&format!(
                "SET LOCAL pg_reaper.refire_function = '{}'",
                name.replace('\'', "''")
            ));
            let got = one::<String>("SELECT pg_reaper_try('SELECT pg_reaper_hook()')")
                .unwrap_or_default();
            if resolves {
                assert_eq!(got, "ok", "{name}");
            } else {
                assert!(
                    got.starts_with("42883 pg_reaper.refire_function = "),
                    "{name}: {got}"
                );
            }
        }
    }

    #[pg_test]
    fn resolve_cleans_up_confirmed_outcomes_but_never_a_rearmed_barrier() {
        for id in ["m", "t", "g", "r"] {
            strand(id, "org", "expired");
            run(&format!("SELECT barrier_claim('{id}', 0)"));
        }
        reap("");
        run("SELECT barrier_enqueue('t', 'org', 3)"); // re-armed before its terminal cleanup
        run("SELECT count(*) FROM outbox_claim(10)");
        for (id, outcome) in [
            ("m", "marked_error"),
            ("t", "already_terminal"),
            ("g", "gone"),
            ("r", "rearmed"),
        ] {
            let (intent, attempt) = (
                one::<i64>(&format!(
                    "SELECT id FROM pg_reaper_outbox WHERE execution_id = '{id}'"
                ))
                .expect("id"),
                1,
            );
            assert_eq!(
                one::<bool>(&format!(
                    "SELECT outbox_resolve({intent}, {attempt}, '{outcome}')"
                )),
                Some(true)
            );
            assert_eq!(
                one::<bool>(&format!(
                    "SELECT outbox_resolve({intent}, {attempt}, '{outcome}')"
                )),
                Some(false)
            );
        }
        assert_eq!(
            json("SELECT jsonb_agg(execution_id ORDER BY execution_id) FROM pg_barrier_state"),
            json!(["r", "t"]),
            "the re-armed barrier of t and the rearmed outcome of r are kept"
        );
        assert_eq!(
            json("SELECT jsonb_agg(execution_id ORDER BY execution_id) FROM pg_batch_dedup"),
            json!(["r"]),
            "markers go with their barrier only (t's were reset by its re-enqueue)"
        );
        assert_eq!(
            count("SELECT count(*) FROM pg_reaper_outbox WHERE state = 'done'"),
            4
        );
    }

    // ---- operator functions ----------------------------------------------------------------

    fn explain(id: &str) -> serde_json::Value {
        json(&format!("SELECT barrier_explain('{id}')"))
    }

    #[pg_test]
    fn explain_tells_every_state_in_order() {
        assert_eq!(explain("nothing")["state"], json!("absent"));
        assert_eq!(explain("nothing")["intents"], json!([]));
        strand("exp", "org", "expired");
        strand("stale", "org", "stale");
        run("SELECT barrier_enqueue('live', 'org', 2, '1 hour', '{\"task\": \"agg\"}')");
        run("SELECT barrier_claim('live', 0), barrier_claim('live', 1)");
        run("SELECT barrier_enqueue('zero', 'org', 1)");
        run("SELECT barrier_decrement('zero')");
        run("SELECT barrier_enqueue('torn', 'org', 1)");
        run(
            "UPDATE pg_barrier_state SET remaining = -1, expires_at = now() - interval '1 second', \
             created_at = now() - interval '2 hours' WHERE execution_id = 'torn'",
        );
        for (id, state) in [
            ("torn", "torn_down"),
            ("exp", "stranded_expired"),
            ("stale", "stranded_no_progress"),
            ("zero", "complete_awaiting_finish"),
            ("live", "live"),
        ] {
            assert_eq!(explain(id)["state"], json!(state), "{id}: {}", explain(id));
        }
        let live = explain("live");
        assert_eq!(
            (
                &live["markers"],
                &live["has_callback"],
                &live["remaining"],
                &live["organization_id"]
            ),
            (&json!(2), &json!(true), &json!(2), &json!("org"))
        );
        // Not stranded yet: it will be at the deadline or after the stuck timeout, the earlier.
        assert_eq!(
            one::<bool>(
                "SELECT (barrier_explain('live')->>'stranded_at')::timestamptz = \
                 least(expires_at, last_progress_at + interval '9000 seconds') \
                 FROM pg_barrier_state WHERE execution_id = 'live'"
            ),
            Some(true)
        );
        assert!(
            live["advice"].as_str().unwrap_or("").starts_with("Live"),
            "{live}"
        );
        let keys: Vec<String> = live
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        for key in [
            "execution_id",
            "state",
            "organization_id",
            "remaining",
            "created_at",
            "expires_at",
            "last_progress_at",
            "stranded_at",
            "markers",
            "has_callback",
            "intents",
            "advice",
        ] {
            assert!(keys.contains(&key.to_string()), "{key} in {keys:?}");
        }
    }

    #[pg_test]
    fn explain_lists_intents_oldest_first_and_advises_on_them() {
        let id = intent("e", "expired");
        let e = explain("e");
        assert_eq!(e["intents"].as_array().map(Vec::len), Some(1));
        assert_eq!(e["intents"][0]["id"], json!(id));
        assert!(
            e["advice"].as_str().unwrap_or("").contains("is pending"),
            "{e}"
        );
        let (_, attempt) = claim_one();
        run(&format!(
            "SELECT outbox_fail({id}, {attempt}, 'HTTP 500', '0', 1)"
        ));
        let e = explain("e");
        assert_eq!(
            (&e["intents"][0]["state"], &e["intents"][0]["last_error"]),
            (&json!("dead"), &json!("HTTP 500"))
        );
        assert!(
            e["advice"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("outbox_replay({id})")),
            "{e}"
        );
        strand("noorg", "", "expired");
        assert!(
            explain("noorg")["advice"]
                .as_str()
                .unwrap_or("")
                .contains("no organization_id"),
            "{}",
            explain("noorg")
        );
    }

    #[pg_test(error = "barrier_explain: execution_id must not be NULL or empty")]
    fn explain_rejects_an_empty_id() {
        run("SELECT barrier_explain('')");
    }

    /// An operator's recovery of a live (not stranded) barrier: queued with its action, the
    /// re-check does not ask for the predicate, and the cleanup removes the barrier anyway.
    #[pg_test]
    fn recover_queues_a_forced_intent_that_skips_the_stranded_check() {
        run("SELECT barrier_enqueue('live', 'org', 3)");
        run("SELECT barrier_claim('live', 0)");
        let id = one::<i64>("SELECT barrier_recover('live')").expect("id");
        assert_eq!(
            json(&format!(
                "SELECT jsonb_build_array(state, action, remaining) FROM pg_reaper_outbox WHERE id = {id}"
            )),
            json!(["pending", "error", 3])
        );
        assert_eq!(
            one::<i64>("SELECT barrier_recover('live', 'error')"),
            Some(id),
            "the live intent is returned again"
        );
        let (cid, attempt) = claim_one();
        assert_eq!(cid, id);
        assert_eq!(verdict(id, attempt), ("mark".into(), Some(3)));
        assert_eq!(
            one::<bool>(&format!(
                "SELECT outbox_resolve({id}, {attempt}, 'marked_error')"
            )),
            Some(true)
        );
        assert_eq!(count("SELECT count(*) FROM pg_barrier_state"), 0);
        assert_eq!(count("SELECT count(*) FROM pg_batch_dedup"), 0);
    }

    #[pg_test]
    fn recover_refuses_what_it_cannot_do_and_changes_nothing() {
        create_try();
        run("SELECT barrier_enqueue('plain', 'org', 2)");
        run("SELECT barrier_enqueue('noorg', '', 2)");
        for (sql, message) in [
            (
                "SELECT barrier_recover('')",
                "execution_id must not be NULL or empty",
            ),
            (
                "SELECT barrier_recover(NULL)",
                "execution_id must not be NULL or empty",
            ),
            (
                "SELECT barrier_recover('plain', 'delete')",
                "action must be 'error' or 'refire'",
            ),
            (
                "SELECT barrier_recover('plain', NULL)",
                "action must be 'error' or 'refire'",
            ),
            ("SELECT barrier_recover('missing')", "has no barrier"),
            ("SELECT barrier_recover('noorg')", "without organization_id"),
            (
                "SELECT barrier_recover('plain', 'refire')",
                "needs a barrier with a callback",
            ),
        ] {
            let got =
                one::<String>(&format!("SELECT pg_reaper_try($${sql}$$)")).unwrap_or_default();
            assert!(
                got.starts_with("22023") && got.contains(message),
                "{sql}: {got}"
            );
        }
        assert_eq!(count("SELECT count(*) FROM pg_reaper_outbox"), 0);
    }

    #[pg_test(
        error = "outbox_resolve: outcome must be one of marked_error, already_terminal, gone, rearmed, refired"
    )]
    fn resolve_rejects_unknown_outcomes() {
        run("SELECT outbox_resolve(1, 1, 'fixed')");
    }

    /// Resolve is fenced like every other transition: without the current claim (a pending
    /// intent, a stale attempt) nothing is recorded and the barrier and markers stay.
    #[pg_test]
    fn resolve_without_the_current_claim_changes_nothing() {
        strand("u", "org", "expired");
        run("SELECT barrier_claim('u', 0)");
        reap("");
        let id = one::<i64>("SELECT id FROM pg_reaper_outbox").expect("id");
        for attempt in [0, 1] {
            assert_eq!(
                one::<bool>(&format!("SELECT outbox_resolve({id}, {attempt}, 'gone')")),
                Some(false),
                "pending, never claimed: attempt {attempt}"
            );
        }
        let (cid, attempt) = claim_one();
        assert_eq!(cid, id);
        assert_eq!(
            one::<bool>(&format!(
                "SELECT outbox_resolve({id}, {}, 'marked_error')",
                attempt - 1
            )),
            Some(false),
            "an earlier claim's token"
        );
        assert_eq!(
            json("SELECT jsonb_build_array(state, outcome) FROM pg_reaper_outbox"),
            json!(["in_flight", null])
        );
        assert_eq!(count("SELECT count(*) FROM pg_barrier_state"), 1);
        assert_eq!(count("SELECT count(*) FROM pg_batch_dedup"), 1);
    }

    #[pg_test(
        error = "barrier_enqueue: execution_id must be at most 1024 bytes long (got 3000 bytes)"
    )]
    fn enqueue_rejects_an_execution_id_longer_than_the_limit() {
        run("SELECT barrier_enqueue(repeat('x', 3000), 'org', 1)");
    }

    #[pg_test(
        error = "barrier_decrement: execution_id must be at most 1024 bytes long (got 1025 bytes)"
    )]
    fn every_function_applies_the_execution_id_limit() {
        // 1024 bytes is allowed everywhere (multi-byte characters count in bytes).
        let id = "é".repeat(512);
        run(&format!("SELECT barrier_enqueue('{id}', 'org', 1)"));
        run(&format!("SELECT barrier_claim('{id}', 0)"));
        run(&format!("SELECT barrier_decrement('{id}')"));
        run(&format!("SELECT barrier_finish('{id}')"));
        run("SELECT barrier_decrement(repeat('x', 1025))");
    }

    /// Months count by the calendar: a year is 365 or 366 days, so this ttl is negative on
    /// every date, though as 12 months of 30 days it would be 4 days long. The check runs on the
    /// transaction's clock, as the table's expires_at > created_at constraint does, so the
    /// caller gets the argument's name instead of a constraint violation.
    #[pg_test(error = "barrier_enqueue: ttl must be a positive interval")]
    fn enqueue_rejects_a_ttl_that_is_negative_on_the_calendar() {
        assert_eq!(
            one::<bool>("SELECT now() + interval '-1 year 364 days' < now()"),
            Some(true)
        );
        run("SELECT barrier_enqueue('cal', 'org', 1, '-1 year 364 days')");
    }

    #[pg_test(
        error = "barrier_enqueue: callback must be a JSON object or SQL NULL (got a JSON null)"
    )]
    fn enqueue_rejects_a_json_null_callback() {
        run("SELECT barrier_enqueue('cb', 'org', 1, '1 hour', 'null')");
    }

    #[pg_test(
        error = "barrier_enqueue: callback must be a JSON object or SQL NULL (got a JSON array)"
    )]
    fn enqueue_rejects_a_non_object_callback() {
        run("SELECT barrier_enqueue('cb', 'org', 1, '1 hour', '[1]')");
    }
}
