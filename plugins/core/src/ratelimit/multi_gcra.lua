local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local enforced = tonumber(ARGV[1]) local lease = tonumber(ARGV[2])
local n = #KEYS local tat, iv, hz = {}, {}, {}
for i = 1, n do
iv[i] = tonumber(ARGV[1 + 2 * i]) hz[i] = tonumber(ARGV[2 + 2 * i])
local v = redis.call('GET', KEYS[i])
if v then v = tonumber(v) if not v then return redis.error_reply('firebreak: foreign rate-limit record') end else v = 0 end
if v < now then v = now end tat[i] = v end
local function avail(i) return math.floor((hz[i] - (tat[i] - now)) / iv[i]) end
local refused = false
for i = 1, enforced do if avail(i) < 1 then refused = true end end
local out = {}
for i = 1, n do
local take = 0
if not refused then local a = avail(i) if a >= 1 then take = math.min(lease, a) end end
if take > 0 then tat[i] = tat[i] + take * iv[i]
redis.call('SET', KEYS[i], string.format('%d', tat[i]), 'PX', math.ceil((tat[i] - now) / 1000) + 1) end
local debt = tat[i] - now local rem = avail(i) if rem < 0 then rem = 0 end
local retry = 0 if rem < 1 then retry = math.ceil((debt + iv[i] - hz[i]) / 1000) end
out[#out + 1] = take out[#out + 1] = rem out[#out + 1] = math.ceil(debt / 1000) out[#out + 1] = retry end
return out
