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
                   "results": [], "callback": {"task": "cb"}})
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
             last_progress_at = last_progress_at - interval '1 day' WHERE execution_id = 'e1'",
        );
        run("SELECT barrier_enqueue('e1', 'new-org', 2, '2 hours', '{\"v\": 2}')");
        let row = json(
            "SELECT to_jsonb(b) - 'created_at' - 'expires_at' - 'last_progress_at' \
                        FROM pg_barrier_state b WHERE execution_id = 'e1'",
        );
        assert_eq!(
            row,
            json!({"execution_id": "e1", "organization_id": "new-org", "remaining": 2,
                   "results": [], "callback": {"v": 2}})
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

    #[pg_test]
    fn abort_loser_never_clears_markers_of_a_new_claim() {
        assert_eq!(one::<bool>("SELECT barrier_claim('e1', 0)"), Some(true));
        assert_eq!(
            one::<String>("SELECT barrier_abort('e1')").as_deref(),
            Some("already_aborted")
        );
        assert_eq!(count("SELECT count(*) FROM pg_batch_dedup"), 1);
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
}
