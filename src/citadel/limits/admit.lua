-- Check every limit of one or more scopes (a user; its API key; its team) and, only if all of
-- them pass, reserve them all. The same steps as citadel.limits.maths.judge_scopes; the theory is
-- in that module's docstring. Every number is an integer below 2^53, so Lua's doubles are exact.
-- Unset limits are -1.
--
-- KEYS: 7 per scope, in order: 1 rpm (TAT "ms:frac"), 2 tpm (TAT), 3 leases (zset lease id ->
--       expiry ms), 4 day tokens, 5 month tokens, 6 month cost (counters), 7 index of the
--       scope's dated keys (set)
-- ARGV: 1 now_ms, 2 tokens, 3 cost, 4 lease id, 5 lease ttl ms, 6 day ends ms, 7 month ends ms,
--       8 period ms, 9 how long the dated keys outlive their period (ms); then 6 per scope:
--       rpm, tpm, concurrency, day tokens, month tokens, month cost
-- Returns {refused (0, or 1 + index of the limit in maths.LIMIT_NAMES), retry_after_ms,
--          refusing scope (1-based; 0 when admitted), then per scope: requests level, tokens
--          level}; the levels are after admission when it is allowed, else as observed.

local now = tonumber(ARGV[1])
local tokens = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local lease_ttl = tonumber(ARGV[5])
local day_ends = tonumber(ARGV[6])
local month_ends = tonumber(ARGV[7])
local period = tonumber(ARGV[8])
local keep = tonumber(ARGV[9])
local scopes = #KEYS / 7

-- exact integer division: the quotient of two doubles can round across an integer
local function divmod(a, b)
  local q = math.floor(a / b)
  local r = a - q * b
  if r < 0 then
    q, r = q - 1, r + b
  elseif r >= b then
    q, r = q + 1, r - b
  end
  return q, r
end

local function ceil_div(a, b)
  local q, r = divmod(a, b)
  if r > 0 then q = q + 1 end
  return q
end

-- the backlog (TAT - now) * limit, zero when TAT is not ahead of now
local function level(raw, limit)
  if limit <= 0 or not raw then return 0 end
  local sep = string.find(raw, ':', 1, true)
  local ms = tonumber(string.sub(raw, 1, sep - 1))
  if ms < now then return 0 end
  return (ms - now) * limit + tonumber(string.sub(raw, sep + 1))
end

local function rate(lvl, limit, units)
  if units > limit then return false, lvl, period end
  local after = lvl + units * period
  local capacity = limit * period
  if after <= capacity then return true, after, 0 end
  return false, lvl, ceil_div(after - capacity, limit)
end

local function store_tat(key, lvl, limit)
  if lvl <= 0 or limit <= 0 then return end
  local ms, frac = divmod(lvl, limit)
  redis.call('SET', key, string.format('%.0f:%.0f', now + ms, frac), 'PX', ms + 1000)
end

local refused, wait, refused_scope = 0, -1, 0
local function refuse(code, after_ms, scope)
  if after_ms > wait then refused, wait, refused_scope = code, after_ms, scope end
end

local state = {}
local reply = {0, 0, 0}
for s = 1, scopes do
  local k = (s - 1) * 7
  local a = 9 + (s - 1) * 6
  local st = {
    rpm = tonumber(ARGV[a + 1]), tpm = tonumber(ARGV[a + 2]), conc = tonumber(ARGV[a + 3]),
    day = tonumber(ARGV[a + 4]), month = tonumber(ARGV[a + 5]), cost = tonumber(ARGV[a + 6]),
    rpm_after = 0, tpm_after = 0,
  }
  state[s] = st
  -- one read for every stored value (each redis.call costs about a microsecond)
  local stored = redis.call('MGET', KEYS[k + 1], KEYS[k + 2], KEYS[k + 4], KEYS[k + 5], KEYS[k + 6])
  st.day_used, st.month_used, st.cost_used = stored[3], stored[4], stored[5]
  local rpm_level, tpm_level = 0, 0
  if st.rpm >= 0 then
    rpm_level = level(stored[1], st.rpm)
    local ok, after, retry = rate(rpm_level, st.rpm, 1)
    if ok then st.rpm_after = after else refuse(1, retry, s) end
  end
  if st.tpm >= 0 then
    tpm_level = level(stored[2], st.tpm)
    local ok, after, retry = rate(tpm_level, st.tpm, tokens)
    if ok then st.tpm_after = after else refuse(2, retry, s) end
  end
  if st.conc >= 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', now)
    local held = redis.call('ZCARD', KEYS[k + 3])
    if held >= st.conc then
      local retry = period
      if held > 0 then
        local first = redis.call('ZRANGE', KEYS[k + 3], 0, 0, 'WITHSCORES')
        retry = math.min(1000, math.max(tonumber(first[2]) - now, 1))
      end
      refuse(3, retry, s)
    end
  end
  if st.day >= 0 and tonumber(st.day_used or '0') + tokens > st.day then
    refuse(4, day_ends - now, s)
  end
  if st.month >= 0 and tonumber(st.month_used or '0') + tokens > st.month then
    refuse(5, month_ends - now, s)
  end
  if st.cost >= 0 and tonumber(st.cost_used or '0') + cost > st.cost then
    refuse(6, month_ends - now, s)
  end
  reply[#reply + 1] = rpm_level
  reply[#reply + 1] = tpm_level
  st.rpm_level, st.tpm_level = rpm_level, tpm_level
end

if refused > 0 then
  reply[1], reply[2], reply[3] = refused, wait, refused_scope
  return reply
end

for s = 1, scopes do
  local k = (s - 1) * 7
  local st = state[s]
  if st.rpm >= 0 then store_tat(KEYS[k + 1], st.rpm_after, st.rpm) end
  if st.tpm >= 0 then store_tat(KEYS[k + 2], st.tpm_after, st.tpm) end
  if st.conc >= 0 then
    redis.call('ZADD', KEYS[k + 3], now + lease_ttl, ARGV[4])
    redis.call('PEXPIRE', KEYS[k + 3], lease_ttl + 1000)
  end
  -- A counter is created even for zero, so that an over-run can be settled to it; a new one
  -- expires once no reservation charged to it can still be reconciled.
  local function charge(limit, key, existing, amount, ends)
    if limit < 0 or (existing and amount == 0) then return end
    redis.call('INCRBY', key, amount)
    if not existing then
      redis.call('PEXPIRE', key, ends - now + keep)
      redis.call('SADD', KEYS[k + 7], key)
      redis.call('PEXPIRE', KEYS[k + 7], month_ends - now + keep)
    end
  end
  charge(st.day, KEYS[k + 4], st.day_used, tokens, day_ends)
  charge(st.month, KEYS[k + 5], st.month_used, tokens, month_ends)
  charge(st.cost, KEYS[k + 6], st.cost_used, cost, month_ends)
  reply[2 + 2 * s] = st.rpm_after
  reply[3 + 2 * s] = st.tpm_after
end
return reply
