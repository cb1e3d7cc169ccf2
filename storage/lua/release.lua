-- A chat's lease, deleted only if it still names this stream: a lease that expired and was taken by
-- another stream stays.
-- KEYS[1] the lease; ARGV[1] the value naming the stream that held it.
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
