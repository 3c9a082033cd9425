local t = redis.call('TIME')
local now = tonumber(t[1])
local now_ms = now * 1000 + (tonumber(t[2]) - tonumber(t[2]) % 1000) / 1000
local enforced = tonumber(ARGV[1])
local n = #KEYS - 1
local limit = tonumber(ARGV[3 * n + 2])
local qwindow = tonumber(ARGV[3 * n + 3])
local function cdiv(x, y) local q = (x - x % y) / y if x % y > 0 then q = q + 1 end return q end
local b, w, c, h, d, s, st = {}, {}, {}, {}, {}, {}, {}
for i = 1, n do
b[i] = tonumber(ARGV[3 * i - 1]) w[i] = tonumber(ARGV[3 * i]) c[i] = tonumber(ARGV[3 * i + 1]) h[i] = b[i] * w[i]
d[i] = 0 s[i] = now st[i] = 0
local v = redis.call('GET', KEYS[i])
if v then
local t0, debt, stamp = string.match(v, '^(%d+):(%d+):(%d+)$')
if not t0 then t0, debt = string.match(v, '^(%d+):(%d+)$') stamp = '0' end
if not t0 then return redis.error_reply('firebreak: foreign amount-limit record') end
t0 = tonumber(t0) debt = tonumber(debt) st[i] = tonumber(stamp)
if t0 > now then s[i] = t0 end
local el = now - t0 if el < 0 then el = 0 end
if el < w[i] then d[i] = debt - el * b[i] if d[i] < 0 then d[i] = 0 end end
end
end
local refused = false
for i = 1, enforced do if d[i] + c[i] > h[i] then refused = true end end
local quota = 0
local take = {}
local held, qend, opened = nil, nil, 0
for i = 1, n do
take[i] = (not refused) and d[i] + c[i] <= h[i]
if take[i] and st[i] <= now_ms then
if not held then
local q = redis.call('GET', KEYS[n + 1])
held = 0 qend = now_ms + qwindow
if q then
local e, k = string.match(q, '^(%d+):(%d+)$')
if e then qend = tonumber(e) held = tonumber(k)
elseif string.match(q, '^%d+$') then
held = tonumber(q)
local ttl = redis.call('PTTL', KEYS[n + 1])
if ttl > 0 then qend = now_ms + ttl end
else return redis.error_reply('firebreak: foreign amount-limit quota count') end
end
end
if held + opened < limit then opened = opened + 1 st[i] = qend
elseif i <= enforced then quota = 1
else take[i] = false if quota == 0 then quota = 2 end end
end
end
if quota == 1 then for i = 1, n do take[i] = false end opened = 0 end
if opened > 0 then
redis.call('SET', KEYS[n + 1], string.format('%d:%d', qend, held + opened))
redis.call('PEXPIREAT', KEYS[n + 1], qend)
end
local out = {quota}
for i = 1, n do
local fits = 0 local taken = 0 local retry = 0
if d[i] + c[i] <= h[i] then fits = 1 else retry = cdiv(d[i] + c[i] - h[i], b[i]) end
if take[i] then
taken = 1 d[i] = d[i] + c[i]
redis.call('SET', KEYS[i], string.format('%d:%d:%d', s[i], d[i], st[i]), 'EX', cdiv(d[i], b[i]) + 1)
end
local rest = h[i] - d[i]
out[#out + 1] = fits out[#out + 1] = taken out[#out + 1] = (rest - rest % w[i]) / w[i]
out[#out + 1] = cdiv(d[i], b[i]) out[#out + 1] = retry
end
return out
