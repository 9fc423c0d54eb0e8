\set id random(1, 10000)
\set b random(0, 2000000000)
SELECT (barrier_decrement_lease('b' || :id, :b, barrier_claim_lease('b' || :id, :b, '1 minute'), '{"files": 10}')).status;
