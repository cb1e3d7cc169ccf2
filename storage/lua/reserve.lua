-- Admission of one stream, atomically: every limit is checked and, only if all pass, the stream takes a
-- concurrency slot, counts as a request of the user and of the org, and reserves its token estimate for both.
--
-- KEYS: 1 user active (zset id -> expiry ms)   2 user reserved (hash id -> tokens, 'total')
--       3 user used, day    4 user used, month   5 user limits (hash, cached overrides)
--       6 org active   7 org reserved   8 org used, day   9 org used, month   10 org limits
--       11 user requests   12 org requests (zsets id -> time ms, the last minute)
--       13 (optional) the chat's stream lease: taken with the admission, refused while another holds it
-- ARGV: 1 now ms   2 stream id   3 token estimate   4 slot expiry ms   5 day reset ms   6 month reset ms
--       7 default user tokens   8 default org tokens   9 default period   10 default user rpm
--       11 default concurrency   12 default org rpm   (-1 = unlimited)   13 ttl s of slot and reservation keys
--       14 lease value   15 lease ms (with KEYS[13])
-- Returns {code, retry_after_ms, token_limit, tokens_remaining, token_reset_ms, rpm_limit, rpm_remaining,
--          user_period, org_period, headroom, headroom_reset_ms}; code 'limits' (with the scope) asks the
--          caller to load overrides. The rpm pair is the tighter of the user's and the org's rates (the one
--          with fewer requests left; -1 when neither has a limit). The headroom is what the tighter of the
--          two budgets has left (-1 when neither has a limit), and when that budget resets.
local now, id, estimate = tonumber(ARGV[1]), ARGV[2], count(ARGV[3])
if not estimate then return redis.error_reply('ERR token estimate must be a whole number from 0 to 10^15') end

local user = limits(KEYS[5], ARGV[7], ARGV[10])
if not user then return {'limits', 'user'} end
local org = limits(KEYS[10], ARGV[8], ARGV[12])
if not org then return {'limits', 'org'} end

-- A rate's window (zset id -> time ms) holds the requests of the last 60 s: the older ones are dropped.
local function window(key)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - 60000)
  return redis.call('ZCARD', key)
end

-- How long until a window of `recent` requests holds fewer than `limit` (one lowered below what it holds
-- waits for several to leave): until its (recent - limit + 1)th oldest is 60 s old.
local function window_wait(key, recent, limit)
  local entry = redis.call('ZRANGE', key, recent - limit, recent - limit, 'WITHSCORES')
  return entry[2] and tonumber(entry[2]) + 60000 - now or 60000
end

local function left(limit, used)
  if limit < 0 then return -1 end
  return math.max(limit - used, 0)
end

local user_used_key, user_reset = period_of(user, KEYS[3], KEYS[4])
local org_used_key, org_reset = period_of(org, KEYS[8], KEYS[9])
local user_spent = tonumber(redis.call('GET', user_used_key) or '0') + purge(KEYS[1], KEYS[2], now)
local org_spent = tonumber(redis.call('GET', org_used_key) or '0') + purge(KEYS[6], KEYS[7], now)
local recent, org_recent = window(KEYS[11]), window(KEYS[12])

local function answer(code, retry_after_ms)
  local tokens_left = left(user.tokens, user_spent)
  local rpm_limit, rpm_left = user.rpm, left(user.rpm, recent)
  local org_rpm_left = left(org.rpm, org_recent)
  if org_rpm_left >= 0 and (rpm_left < 0 or org_rpm_left < rpm_left) then
    rpm_limit, rpm_left = org.rpm, org_rpm_left
  end
  local headroom, headroom_reset = tokens_left, user_reset
  if org.tokens >= 0 and (headroom < 0 or org.tokens - org_spent < headroom) then
    headroom, headroom_reset = math.max(org.tokens - org_spent, 0), org_reset
  end
  return {code, retry_after_ms, user.tokens, tokens_left, user_reset - now, rpm_limit, rpm_left,
          user.period, org.period, headroom, headroom_reset - now}
end

if user.concurrent >= 0 and redis.call('ZCARD', KEYS[1]) >= user.concurrent then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return answer('too_many_streams', first[2] and math.min(tonumber(first[2]) - now, 1000) or 1000)
end
-- Over either rate, the wait is until both allow one more request.
local user_over, org_over = user.rpm >= 0 and recent >= user.rpm, org.rpm >= 0 and org_recent >= org.rpm
if user_over or org_over then
  return answer('rate_limited', math.max(user_over and window_wait(KEYS[11], recent, user.rpm) or 0,
                                         org_over and window_wait(KEYS[12], org_recent, org.rpm) or 0))
end
if user.tokens >= 0 and user_spent + estimate > user.tokens then
  return answer('quota_exceeded', user_reset - now)
end
if org.tokens >= 0 and org_spent + estimate > org.tokens then
  return answer('quota_exceeded', org_reset - now)
end

if KEYS[13] and redis.call('EXISTS', KEYS[13]) == 1 then
  return answer('stream_active', 0)
end

local expiry, ttl = tonumber(ARGV[4]), tonumber(ARGV[13])
for _, pair in ipairs({{KEYS[1], KEYS[2]}, {KEYS[6], KEYS[7]}}) do
  redis.call('ZADD', pair[1], expiry, id)
  redis.call('HSET', pair[2], id, estimate)
  redis.call('HINCRBY', pair[2], 'total', estimate)
  redis.call('EXPIRE', pair[1], ttl)
  redis.call('EXPIRE', pair[2], ttl)
end
for _, requests in ipairs({KEYS[11], KEYS[12]}) do
  redis.call('ZADD', requests, now, id)
  redis.call('EXPIRE', requests, 61)
end
if KEYS[13] then
  redis.call('SET', KEYS[13], ARGV[14], 'PX', ARGV[15])
end
user_spent, org_spent, recent, org_recent = user_spent + estimate, org_spent + estimate, recent + 1, org_recent + 1
return answer('ok', 0)
