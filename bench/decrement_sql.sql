\set id random(1, 10000)
UPDATE pg_barrier_state
   SET remaining = remaining - 1, results = results || jsonb_build_array('{"files": 10}'::jsonb),
       last_progress_at = now()
 WHERE execution_id = 'b' || :id
RETURNING remaining, results;
