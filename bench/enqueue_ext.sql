\set id random(1, 100000)
SELECT barrier_enqueue('e' || :id, 'org', 10);
