-- Settle a stream: drop its reservation and slot, and count what it really used; a withdrawn stream (one
-- refused after its admission, before it started) also leaves the last minute's request counts.
-- KEYS: 1 user active  2 user reserved  3 user used (its period)  4 org active  5 org reserved  6 org used
--       7 user requests  8 org requests  9 (optional) the chat's stream lease, deleted if it still holds ARGV[6]
-- ARGV: 1 stream id  2 tokens charged  3 user used ttl s  4 org used ttl s  5 withdrawn ('1' or '0')
--       6 lease value
local charge = count(ARGV[2])
if not charge then return redis.error_reply('ERR the charge must be a whole number from 0 to 10^15') end
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
if ARGV[5] == '1' then
  redis.call('ZREM', KEYS[7], ARGV[1])
  redis.call('ZREM', KEYS[8], ARGV[1])
end
if KEYS[9] and redis.call('GET', KEYS[9]) == ARGV[6] then
  redis.call('DEL', KEYS[9])
end
return charge
