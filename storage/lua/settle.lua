-- Settle a stream: drop its reservation and slot, and count what it really used.
-- KEYS: 1 user active  2 user reserved  3 user used (its period)  4 org active  5 org reserved  6 org used
--       7 (optional) the chat's stream lease, deleted if it still holds ARGV[5]
-- ARGV: 1 stream id  2 tokens charged  3 user used ttl s  4 org used ttl s  5 lease value
local charge = tonumber(ARGV[2])
for i, set in ipairs({{KEYS[1], KEYS[2], KEYS[3], ARGV[3]}, {KEYS[4], KEYS[5], KEYS[6], ARGV[4]}}) do
  local amount = redis.call('HGET', set[2], ARGV[1])
  if amount then
    redis.call('HDEL', set[2], ARGV[1])
    redis.call('HINCRBY', set[2], 'total', -tonumber(amount))
  end
  redis.call('ZREM', set[1], ARGV[1])
  if charge > 0 then
    redis.call('INCRBY', set[3], charge)
    redis.call('EXPIRE', set[3], set[4])
  end
end
if KEYS[7] and redis.call('GET', KEYS[7]) == ARGV[5] then
  redis.call('DEL', KEYS[7])
end
return charge
