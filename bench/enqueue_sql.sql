\set id random(1, 100000)
BEGIN;
INSERT INTO pg_barrier_state (execution_id, organization_id, remaining, results, created_at, expires_at, last_progress_at)
VALUES ('e' || :id, 'org', 10, '[]', now(), now() + make_interval(secs => 21600), now())
ON CONFLICT (execution_id) DO UPDATE SET
    organization_id = excluded.organization_id, remaining = excluded.remaining, results = '[]',
    created_at = now(), expires_at = excluded.expires_at, last_progress_at = now();
DELETE FROM pg_batch_dedup WHERE execution_id = 'e' || :id;
COMMIT;
