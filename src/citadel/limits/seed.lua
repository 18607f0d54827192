-- Raise a month's cost counter to at least ARGV[1] micro-USD (never lower it): a team's
-- budget counting the month's spend the ledger recorded before the budget was set.
-- KEYS[1] the cost counter, KEYS[2] the scope's index of dated keys.
-- ARGV: floor (micro-USD), time to live (ms). Returns the counter after.
local floor = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < floor then
  redis.call('SET', KEYS[1], floor, 'PX', ARGV[2])
  redis.call('SADD', KEYS[2], KEYS[1])
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return floor
end
return current
