-- Settle one reservation to the actual usage and release its lease, in every scope it charged
-- (citadel.limits.maths: gcra_settle, quota_settle). Integers only, as in admit.lua.
--
-- KEYS: 5 per scope: 1 tpm (TAT "ms:frac"), 2 leases, 3 day tokens, 4 month tokens,
--       5 month cost (the counters of the day and month the reservation was charged to)
-- ARGV: 1 now_ms, 2 period ms, 3 reserved tokens, 4 actual tokens, 5 reserved cost,
--       6 actual cost, 7 lease id; then 4 per scope: tpm (-1 when unset), day set, month set,
--       cost set (0/1)

local now = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local token_delta = tonumber(ARGV[4]) - tonumber(ARGV[3])
local cost_delta = tonumber(ARGV[6]) - tonumber(ARGV[5])

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

-- only counters that still exist: an expired one belongs to a period long over
local function settle(flag, key, delta)
  if flag ~= '1' or delta == 0 or redis.call('EXISTS', key) == 0 then return end
  if redis.call('INCRBY', key, delta) < 0 then redis.call('SET', key, 0, 'KEEPTTL') end
end

for s = 1, #KEYS / 5 do
  local k = (s - 1) * 5
  local a = 7 + (s - 1) * 4
  local tpm = tonumber(ARGV[a + 1])
  if tpm >= 0 and token_delta ~= 0 then
    local lvl = 0
    local raw = redis.call('GET', KEYS[k + 1])
    if raw and tpm > 0 then
      local sep = string.find(raw, ':', 1, true)
      local ms = tonumber(string.sub(raw, 1, sep - 1))
      if ms >= now then lvl = (ms - now) * tpm + tonumber(string.sub(raw, sep + 1)) end
    end
    -- a refund never lowers TAT below now; an over-run is charged, up to one period of debt
    local after = math.min(lvl + token_delta * period, 2 * tpm * period)
    if after <= 0 then
      redis.call('DEL', KEYS[k + 1])
    else
      local ms, frac = divmod(after, tpm)
      redis.call('SET', KEYS[k + 1], string.format('%.0f:%.0f', now + ms, frac), 'PX', ms + 1000)
    end
  end
  redis.call('ZREM', KEYS[k + 2], ARGV[7])
  settle(ARGV[a + 2], KEYS[k + 3], token_delta)
  settle(ARGV[a + 3], KEYS[k + 4], token_delta)
  settle(ARGV[a + 4], KEYS[k + 5], cost_delta)
end

return 0
