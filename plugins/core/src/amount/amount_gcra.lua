local t = redis.call('TIME')
local now = tonumber(t[1])
local enforced = tonumber(ARGV[1])
local n = #KEYS - 1
local limit = tonumber(ARGV[3 * n + 2])
local qwindow = tonumber(ARGV[3 * n + 3])
local function cdiv(x, y) local q = (x - x % y) / y if x % y > 0 then q = q + 1 end return q end
local b, w, c, h, d, s, new = {}, {}, {}, {}, {}, {}, {}
for i = 1, n do
b[i] = tonumber(ARGV[3 * i - 1]) w[i] = tonumber(ARGV[3 * i]) c[i] = tonumber(ARGV[3 * i + 1]) h[i] = b[i] * w[i]
d[i] = 0 s[i] = now new[i] = true
local v = redis.call('GET', KEYS[i])
if v then
new[i] = false
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
local quota = 0
local take = {}
local held, opened = nil, 0
for i = 1, n do
take[i] = (not refused) and d[i] + c[i] <= h[i]
if take[i] and new[i] then
if not held then
local q = redis.call('GET', KEYS[n + 1])
held = 0
if q then
if not string.match(q, '^%d+$') then return redis.error_reply('firebreak: foreign amount-limit quota count') end
held = tonumber(q)
end
end
if held + opened < limit then opened = opened + 1
elseif i <= enforced then quota = 1
else take[i] = false if quota == 0 then quota = 2 end end
end
end
if quota == 1 then for i = 1, n do take[i] = false end opened = 0 end
if opened > 0 then
if redis.call('INCRBY', KEYS[n + 1], opened) == opened then redis.call('PEXPIRE', KEYS[n + 1], qwindow) end
end
local out = {quota}
for i = 1, n do
local fits = 0 local taken = 0 local retry = 0
if d[i] + c[i] <= h[i] then fits = 1 else retry = cdiv(d[i] + c[i] - h[i], b[i]) end
if take[i] then
taken = 1 d[i] = d[i] + c[i]
redis.call('SET', KEYS[i], string.format('%d:%d', s[i], d[i]), 'EX', cdiv(d[i], b[i]) + 1)
end
local rest = h[i] - d[i]
out[#out + 1] = fits out[#out + 1] = taken out[#out + 1] = (rest - rest % w[i]) / w[i]
out[#out + 1] = cdiv(d[i], b[i]) out[#out + 1] = retry
end
return out
