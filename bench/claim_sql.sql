\set id random(1, 100000000)
\set b random(0, 1000)
INSERT INTO pg_batch_dedup (execution_id, batch_index, created_at) VALUES ('c' || :id, :b, now())
ON CONFLICT (execution_id, batch_index) DO NOTHING RETURNING execution_id;
