\set id random(1, 10000)
SELECT barrier_renew_lease('r' || :id, 0, :id, '1 minute');
