-- The caller's usage, read in one step (dead slots and reservations are dropped first).
-- KEYS 1-12 and ARGV 1, 5-12 as reserve.lua. Returns {code, user tokens limit, user used, user reserved,
-- user reset ms, org tokens limit, org used, org reserved, org reset ms, user rpm limit, user requests in
-- the last minute, concurrency limit, active streams, user period, org period, org rpm limit, org requests
-- in the last minute}.
local now = tonumber(ARGV[1])

local function reserved(active, hash)
  local expired = redis.call('ZRANGEBYSCORE', active, '-inf', now)
  local amounts = #expired > 0 and redis.call('HMGET', hash, unpack(expired)) or {}
  local dead = 0
  for i = 1, #amounts do dead = dead + (tonumber(amounts[i]) or 0) end
  return tonumber(redis.call('HGET', hash, 'total') or '0') - dead
end

local user = limits(KEYS[5], ARGV[7], ARGV[10])
if not user then return {'limits', 'user'} end
local org = limits(KEYS[10], ARGV[8], ARGV[12])
if not org then return {'limits', 'org'} end

local function used(l, day_key, month_key)
  if l.period == 'month' then return tonumber(redis.call('GET', month_key) or '0'), tonumber(ARGV[6]) - now end
  return tonumber(redis.call('GET', day_key) or '0'), tonumber(ARGV[5]) - now
end

local user_used, user_reset = used(user, KEYS[3], KEYS[4])
local org_used, org_reset = used(org, KEYS[8], KEYS[9])
local recent = redis.call('ZCOUNT', KEYS[11], now - 60000, '+inf')
local org_recent = redis.call('ZCOUNT', KEYS[12], now - 60000, '+inf')
local active = redis.call('ZCOUNT', KEYS[1], now, '+inf')
return {'ok', user.tokens, user_used, reserved(KEYS[1], KEYS[2]), user_reset, org.tokens, org_used,
        reserved(KEYS[6], KEYS[7]), org_reset, user.rpm, recent, user.concurrent, active, user.period, org.period,
        org.rpm, org_recent}
