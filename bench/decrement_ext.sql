\set id random(1, 10000)
SELECT * FROM barrier_decrement('b' || :id, '{"files": 10}');
