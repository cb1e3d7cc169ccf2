-- A resumer of a kept turn takes a reader's place, unless the turn already has the most it may have.
-- KEYS[1] the turn's readers (a sorted set of reader ids by the time their place lapses, in ms).
-- ARGV: now (ms), when this place lapses (ms), the most readers, this reader's id, the set's own expiry (ms).
-- Returns 1 when the place is taken, 0 when the turn is full.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
