-- Settle one reservation to the actual usage and release its lease
-- (citadel.limits.maths: gcra_settle, quota_settle). Integers only, as in admit.lua.
--
-- KEYS: 1 tpm (TAT "ms:frac"), 2 leases, 3 day tokens, 4 month tokens, 5 month cost
--       (the counters of the day and month the reservation was charged to)
-- ARGV: 1 now_ms, 2 tpm (-1 when unset), 3 period ms, 4 reserved tokens, 5 actual tokens,
--       6 reserved cost, 7 actual cost, 8 lease id, 9 day set, 10 month set, 11 cost set (0/1)

local now = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local period = tonumber(ARGV[3])
local token_delta = tonumber(ARGV[5]) - tonumber(ARGV[4])
local cost_delta = tonumber(ARGV[7]) - tonumber(ARGV[6])

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

if tpm >= 0 and token_delta ~= 0 then
  local lvl = 0
  local raw = redis.call('GET', KEYS[1])
  if raw and tpm > 0 then
    local sep = string.find(raw, ':', 1, true)
    local ms = tonumber(string.sub(raw, 1, sep - 1))
    if ms >= now then lvl = (ms - now) * tpm + tonumber(string.sub(raw, sep + 1)) end
  end
  -- a refund never lowers TAT below now; an over-run is charged, up to one period of debt
  local after = math.min(lvl + token_delta * period, 2 * tpm * period)
  if after <= 0 then
    redis.call('DEL', KEYS[1])
  else
    local ms, frac = divmod(after, tpm)
    redis.call('SET', KEYS[1], string.format('%.0f:%.0f', now + ms, frac), 'PX', ms + 1000)
  end
end

redis.call('ZREM', KEYS[2], ARGV[8])

-- only counters that still exist: an expired one belongs to a period long over
local function settle(flag, key, delta)
  if flag ~= '1' or delta == 0 or redis.call('EXISTS', key) == 0 then return end
  if redis.call('INCRBY', key, delta) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
end
settle(ARGV[9], KEYS[3], token_delta)
settle(ARGV[10], KEYS[4], token_delta)
settle(ARGV[11], KEYS[5], cost_delta)

return 0
