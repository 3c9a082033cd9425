if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local n = tonumber(redis.call('GET', KEYS[2]) or '0')
if n >= tonumber(ARGV[2]) then return 2 end
if n == 0 then redis.call('SET', KEYS[2], '1', 'PX', ARGV[3]) else redis.call('INCR', KEYS[2]) end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
return 1
