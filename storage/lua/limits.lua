-- Shared by reserve.lua, extend.lua and usage.lua (prepended when the scripts are loaded).

-- A subject's limits from its cached overrides (KEYS hash), each falling back to its default: the tokens
-- and requests per minute given (a user's ARGV 7 and 10, an org's ARGV 8 and 12; a rate with no default
-- given is unlimited: extend.lua checks none), the period and concurrency in ARGV 9 and 11. Nil when not
-- cached.
local function limits(key, default_tokens, default_rpm)
  local v = redis.call('HMGET', key, 'loaded', 'tokens', 'period', 'rpm', 'concurrent')
  if not v[1] then return nil end
  return {tokens = tonumber(v[2] or default_tokens), period = v[3] or ARGV[9],
          rpm = tonumber(v[4] or default_rpm or -1), concurrent = tonumber(v[5] or ARGV[11])}
end

-- A token count from the caller: a whole number from 0 to 10^15, else nil (the script then refuses
-- before it writes anything, so a bad argument never leaves a float or a half-made reservation behind).
local function count(value)
  local n = tonumber(value)
  if n == nil or n < 0 or n > 1e15 or n ~= math.floor(n) then return nil end
  return n
end

-- Drop slots and reservations whose stream died without settling; return the live reserved total.
local function purge(active, reserved, now)
  local expired = redis.call('ZRANGEBYSCORE', active, '-inf', now)
  if #expired > 0 then
    local amounts = redis.call('HMGET', reserved, unpack(expired))
    local sum = 0
    for i = 1, #amounts do sum = sum + (tonumber(amounts[i]) or 0) end
    redis.call('ZREMRANGEBYSCORE', active, '-inf', now)
    redis.call('HDEL', reserved, unpack(expired))
    if sum > 0 then redis.call('HINCRBY', reserved, 'total', -sum) end
  end
  return tonumber(redis.call('HGET', reserved, 'total') or '0')
end

-- The used-counter key of a subject's period, and when that period resets (ARGV 5 and 6).
local function period_of(l, day_key, month_key)
  if l.period == 'month' then return month_key, tonumber(ARGV[6]) end
  return day_key, tonumber(ARGV[5])
end
