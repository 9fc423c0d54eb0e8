\set id random(1, 10000)
\set b random(0, 2000000000)
SELECT CASE WHEN barrier_claim('b' || :id, :b) THEN (barrier_decrement('b' || :id, '{"files": 10}')).status END;
