-- Extend a running stream's reservation by ARGV[3] tokens as its answer outgrows what it reserved, only if
-- both budgets still cover them (all or nothing): the stream ends when they do not.
-- KEYS 1-10 and ARGV 1-3, 5-12 as reserve.lua (ARGV 12, the org's request rate, unused here).
-- Returns {'ok'}, {'quota_exceeded'}, {'gone'} (the reservation was settled or has expired) or
-- {'limits', scope} (the caller loads the overrides and calls again).
local now, id, extra = tonumber(ARGV[1]), ARGV[2], count(ARGV[3])
if not extra then return redis.error_reply('ERR tokens must be a whole number from 0 to 10^15') end

local user = limits(KEYS[5], ARGV[7])
if not user then return {'limits', 'user'} end
local org = limits(KEYS[10], ARGV[8])
if not org then return {'limits', 'org'} end
if redis.call('HEXISTS', KEYS[2], id) == 0 then return {'gone'} end

local user_used_key = period_of(user, KEYS[3], KEYS[4])
local org_used_key = period_of(org, KEYS[8], KEYS[9])
local user_spent = tonumber(redis.call('GET', user_used_key) or '0') + purge(KEYS[1], KEYS[2], now)
local org_spent = tonumber(redis.call('GET', org_used_key) or '0') + purge(KEYS[6], KEYS[7], now)
if (user.tokens >= 0 and user_spent + extra > user.tokens) or (org.tokens >= 0 and org_spent + extra > org.tokens) then
  return {'quota_exceeded'}
end
for _, key in ipairs({KEYS[2], KEYS[7]}) do
  redis.call('HINCRBY', key, id, extra)
  redis.call('HINCRBY', key, 'total', extra)
end
return {'ok'}
