-- Read the state of one principal in one round trip, without changing it.
-- KEYS: 1 rpm, 2 tpm, 3 leases, 4 day tokens, 5 month tokens, 6 month cost; ARGV: 1 now_ms
-- Returns {rpm TAT or '', tpm TAT or '', live leases, earliest expiry, latest expiry,
--          day tokens, month tokens, month cost}

local now = ARGV[1]
local earliest = redis.call('ZRANGEBYSCORE', KEYS[3], '(' .. now, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
local latest = redis.call('ZREVRANGEBYSCORE', KEYS[3], '+inf', '(' .. now, 'WITHSCORES', 'LIMIT', 0, 1)
return {
  redis.call('GET', KEYS[1]) or '',
  redis.call('GET', KEYS[2]) or '',
  redis.call('ZCOUNT', KEYS[3], '(' .. now, '+inf'),
  earliest[2] or '0',
  latest[2] or '0',
  redis.call('GET', KEYS[4]) or '0',
  redis.call('GET', KEYS[5]) or '0',
  redis.call('GET', KEYS[6]) or '0',
}
