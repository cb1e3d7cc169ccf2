-- Admission of one stream, atomically: every limit is checked and, only if all pass, the stream takes a
-- concurrency slot, counts as a request and reserves its token estimate for the user and the org.
--
-- KEYS: 1 user active (zset id -> expiry ms)   2 user reserved (hash id -> tokens, 'total')
--       3 user used, day    4 user used, month   5 user limits (hash, cached overrides)
--       6 org active   7 org reserved   8 org used, day   9 org used, month   10 org limits
--       11 user requests (zset id -> time ms, the last minute)
--       12 (optional) the chat's stream lease: taken with the admission, refused while another holds it
-- ARGV: 1 now ms   2 stream id   3 token estimate   4 slot expiry ms   5 day reset ms   6 month reset ms
--       7 default user tokens   8 default org tokens   9 default period   10 default rpm
--       11 default concurrency   12 ttl s of slot and reservation keys     (-1 = unlimited)
--       13 lease value   14 lease ms (with KEYS[12])
-- Returns {code, retry_after_ms, token_limit, tokens_remaining, token_reset_ms, rpm_limit, rpm_remaining,
--          user_period, org_period, headroom, headroom_reset_ms}; code 'limits' (with the scope) asks the
--          caller to load overrides. The headroom is what the tighter of the two budgets has left (-1 when
--          neither has a limit), and when that budget resets.
local now, id, estimate = tonumber(ARGV[1]), ARGV[2], count(ARGV[3])
if not estimate then return redis.error_reply('ERR token estimate must be a whole number from 0 to 10^15') end

local user = limits(KEYS[5], ARGV[7])
if not user then return {'limits', 'user'} end
local org = limits(KEYS[10], ARGV[8])
if not org then return {'limits', 'org'} end

local user_used_key, user_reset = period_of(user, KEYS[3], KEYS[4])
local org_used_key, org_reset = period_of(org, KEYS[8], KEYS[9])
local user_spent = tonumber(redis.call('GET', user_used_key) or '0') + purge(KEYS[1], KEYS[2], now)
local org_spent = tonumber(redis.call('GET', org_used_key) or '0') + purge(KEYS[6], KEYS[7], now)
redis.call('ZREMRANGEBYSCORE', KEYS[11], '-inf', now - 60000)
local recent = redis.call('ZCARD', KEYS[11])

local function answer(code, retry_after_ms)
  local tokens_left, rpm_left = -1, -1
  if user.tokens >= 0 then tokens_left = math.max(user.tokens - user_spent, 0) end
  if user.rpm >= 0 then rpm_left = math.max(user.rpm - recent, 0) end
  local headroom, headroom_reset = tokens_left, user_reset
  if org.tokens >= 0 and (headroom < 0 or org.tokens - org_spent < headroom) then
    headroom, headroom_reset = math.max(org.tokens - org_spent, 0), org_reset
  end
  return {code, retry_after_ms, user.tokens, tokens_left, user_reset - now, user.rpm, rpm_left,
          user.period, org.period, headroom, headroom_reset - now}
end

if user.concurrent >= 0 and redis.call('ZCARD', KEYS[1]) >= user.concurrent then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return answer('too_many_streams', first[2] and math.min(tonumber(first[2]) - now, 1000) or 1000)
end
if user.rpm >= 0 and recent >= user.rpm then
  local oldest = redis.call('ZRANGE', KEYS[11], 0, 0, 'WITHSCORES')
  return answer('rate_limited', oldest[2] and tonumber(oldest[2]) + 60000 - now or 60000)
end
if user.tokens >= 0 and user_spent + estimate > user.tokens then
  return answer('quota_exceeded', user_reset - now)
end
if org.tokens >= 0 and org_spent + estimate > org.tokens then
  return answer('quota_exceeded', org_reset - now)
end

if KEYS[12] and redis.call('EXISTS', KEYS[12]) == 1 then
  return answer('stream_active', 0)
end

local expiry, ttl = tonumber(ARGV[4]), tonumber(ARGV[12])
for _, pair in ipairs({{KEYS[1], KEYS[2]}, {KEYS[6], KEYS[7]}}) do
  redis.call('ZADD', pair[1], expiry, id)
  redis.call('HSET', pair[2], id, estimate)
  redis.call('HINCRBY', pair[2], 'total', estimate)
  redis.call('EXPIRE', pair[1], ttl)
  redis.call('EXPIRE', pair[2], ttl)
end
redis.call('ZADD', KEYS[11], now, id)
redis.call('EXPIRE', KEYS[11], 61)
if KEYS[12] then
  redis.call('SET', KEYS[12], ARGV[13], 'PX', ARGV[14])
end
user_spent, org_spent, recent = user_spent + estimate, org_spent + estimate, recent + 1
return answer('ok', 0)
