-- Shared by reserve.lua and usage.lua (prepended when the scripts are loaded): a subject's limits from
-- its cached overrides (KEYS hash), each falling back to the default in ARGV 7-11; nil when not cached.
local function limits(key, default_tokens)
  local v = redis.call('HMGET', key, 'loaded', 'tokens', 'period', 'rpm', 'concurrent')
  if not v[1] then return nil end
  return {tokens = tonumber(v[2] or default_tokens), period = v[3] or ARGV[9],
          rpm = tonumber(v[4] or ARGV[10]), concurrent = tonumber(v[5] or ARGV[11])}
end
