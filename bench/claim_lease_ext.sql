\set id random(1, 100000000)
\set b random(0, 1000)
SELECT barrier_claim_lease('c' || :id, :b, '1 minute');
