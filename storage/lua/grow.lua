-- Grow a running stream's reservation, for the user and the org, by tokens learnt after its admission
-- (its chat's history). A reservation already settled or expired is left alone.
-- KEYS: 1 user reserved  2 org reserved   ARGV: 1 stream id  2 tokens
if not count(ARGV[2]) then return redis.error_reply('ERR tokens must be a whole number from 0 to 10^15') end
for _, key in ipairs(KEYS) do
  if redis.call('HEXISTS', key, ARGV[1]) == 1 then
    redis.call('HINCRBY', key, ARGV[1], ARGV[2])
    redis.call('HINCRBY', key, 'total', ARGV[2])
  end
end
return 1
