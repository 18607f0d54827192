-- Check every limit of one principal and, only if all of them pass, reserve them all.
-- The same steps as citadel.limits.maths.judge; the theory is in that module's docstring.
-- Every number is an integer below 2^53, so Lua's doubles are exact. Unset limits are -1.
--
-- KEYS: 1 rpm (TAT "ms:frac"), 2 tpm (TAT), 3 leases (zset lease id -> expiry ms),
--       4 day tokens, 5 month tokens, 6 month cost (counters), 7 index of the dated keys (set)
-- ARGV: 1 now_ms, 2 rpm, 3 tpm, 4 concurrency, 5 day tokens, 6 month tokens, 7 month cost,
--       8 tokens, 9 cost, 10 lease id, 11 lease ttl ms, 12 day ends ms, 13 month ends ms,
--       14 period ms, 15 how long the dated keys outlive their period (ms)
-- Returns {refused (0, or 1 + index of the limit in maths.LIMIT_NAMES), retry_after_ms,
--          requests level, tokens level}; the levels are after admission when it is allowed.

local now = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local conc = tonumber(ARGV[4])
local day_limit = tonumber(ARGV[5])
local month_limit = tonumber(ARGV[6])
local cost_limit = tonumber(ARGV[7])
local tokens = tonumber(ARGV[8])
local cost = tonumber(ARGV[9])
local lease_ttl = tonumber(ARGV[11])
local day_ends = tonumber(ARGV[12])
local month_ends = tonumber(ARGV[13])
local period = tonumber(ARGV[14])
local keep = tonumber(ARGV[15])

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

local refused, wait = 0, -1
local function refuse(code, after_ms)
  if after_ms > wait then refused, wait = code, after_ms end
end

-- one read for every stored value (each redis.call costs about a microsecond)
local stored = redis.call('MGET', KEYS[1], KEYS[2], KEYS[4], KEYS[5], KEYS[6])
local day_used, month_used, cost_used = stored[3], stored[4], stored[5]

local rpm_level, tpm_level = 0, 0
local rpm_after, tpm_after = 0, 0
if rpm >= 0 then
  rpm_level = level(stored[1], rpm)
  local ok, after, retry = rate(rpm_level, rpm, 1)
  if ok then rpm_after = after else refuse(1, retry) end
end
if tpm >= 0 then
  tpm_level = level(stored[2], tpm)
  local ok, after, retry = rate(tpm_level, tpm, tokens)
  if ok then tpm_after = after else refuse(2, retry) end
end
if conc >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  local held = redis.call('ZCARD', KEYS[3])
  if held >= conc then
    local retry = period
    if held > 0 then
      local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
      retry = math.min(1000, math.max(tonumber(first[2]) - now, 1))
    end
    refuse(3, retry)
  end
end
if day_limit >= 0 then
  if tonumber(day_used or '0') + tokens > day_limit then refuse(4, day_ends - now) end
end
if month_limit >= 0 then
  if tonumber(month_used or '0') + tokens > month_limit then refuse(5, month_ends - now) end
end
if cost_limit >= 0 then
  if tonumber(cost_used or '0') + cost > cost_limit then refuse(6, month_ends - now) end
end

if refused > 0 then
  return {refused, wait, rpm_level, tpm_level}
end

if rpm >= 0 then store_tat(KEYS[1], rpm_after, rpm) end
if tpm >= 0 then store_tat(KEYS[2], tpm_after, tpm) end
if conc >= 0 then
  redis.call('ZADD', KEYS[3], now + lease_ttl, ARGV[10])
  redis.call('PEXPIRE', KEYS[3], lease_ttl + 1000)
end

-- A counter is created even for zero, so that an over-run can be settled to it; a new one
-- expires once no reservation charged to it can still be reconciled.
local function charge(limit, key, existing, amount, ends)
  if limit < 0 or (existing and amount == 0) then return end
  redis.call('INCRBY', key, amount)
  if not existing then
    redis.call('PEXPIRE', key, ends - now + keep)
    redis.call('SADD', KEYS[7], key)
    redis.call('PEXPIRE', KEYS[7], month_ends - now + keep)
  end
end
charge(day_limit, KEYS[4], day_used, tokens, day_ends)
charge(month_limit, KEYS[5], month_used, tokens, month_ends)
charge(cost_limit, KEYS[6], cost_used, cost, month_ends)

return {0, 0, rpm_after, tpm_after}
