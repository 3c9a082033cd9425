local t = redis.call('TIME')
local now = tonumber(t[1])
local enforced = tonumber(ARGV[1])
local n = #KEYS
local function cdiv(x, y) local q = (x - x % y) / y if x % y > 0 then q = q + 1 end return q end
local b, w, c, h, d, s = {}, {}, {}, {}, {}, {}
for i = 1, n do
b[i] = tonumber(ARGV[3 * i - 1]) w[i] = tonumber(ARGV[3 * i]) c[i] = tonumber(ARGV[3 * i + 1]) h[i] = b[i] * w[i]
d[i] = 0 s[i] = now
local v = redis.call('GET', KEYS[i])
if v then
local t0, debt = string.match(v, '^(%d+):(%d+)$')
if not t0 then return redis.error_reply('firebreak: foreign amount-limit record') end
t0 = tonumber(t0) debt = tonumber(debt)
if t0 > now then s[i] = t0 end
local el = now - t0 if el < 0 then el = 0 end
if el < w[i] then d[i] = debt - el * b[i] if d[i] < 0 then d[i] = 0 end end
end
end
local refused = false
for i = 1, enforced do if d[i] + c[i] > h[i] then refused = true end end
local out = {}
for i = 1, n do
local fits = 0 local taken = 0 local retry = 0
if d[i] + c[i] <= h[i] then fits = 1 else retry = cdiv(d[i] + c[i] - h[i], b[i]) end
if fits == 1 and not refused then
taken = 1 d[i] = d[i] + c[i]
redis.call('SET', KEYS[i], string.format('%d:%d', s[i], d[i]), 'EX', cdiv(d[i], b[i]) + 1)
end
local rest = h[i] - d[i]
out[#out + 1] = fits out[#out + 1] = taken out[#out + 1] = (rest - rest % w[i]) / w[i]
out[#out + 1] = cdiv(d[i], b[i]) out[#out + 1] = retry
end
return out
