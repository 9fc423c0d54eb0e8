\set id random(1, 100000000)
\set b random(0, 1000)
SELECT barrier_claim('c' || :id, :b);
