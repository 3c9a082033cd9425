-- wrk script: replays pre-signed requests (bench/tool `requests`), one record per request.
-- Records are fixed-width HTTP/1.1 header blocks; the body of the size follows each one.
-- wrk ... -s bench/replay.lua URL -- HEADERS_FILE BODY_FILE RECORD_LEN FIRST COUNT MODE
--   FIRST, COUNT: this run's slice of the file (each Envoy sees every nonce once).
--   MODE "wrap": after COUNT requests start the slice again (replays: counted as non-2xx);
--   MODE "stop": stop after COUNT requests (memory runs: exactly COUNT distinct keys).
-- Writes one JSON line with the results (done()).
local f, body, rec_len, first, count, mode
local served = 0

function init(args)
  rec_len = tonumber(args[3]); first = tonumber(args[4]); count = tonumber(args[5]); mode = args[6]
  f = assert(io.open(args[1], "rb"))
  local b = assert(io.open(args[2], "rb")); body = b:read("*a"); b:close()
  f:seek("set", first * rec_len)
end

function request()
  if served >= count then
    if mode == "stop" then
      wrk.thread:stop()
      return "GET /bench/stopped HTTP/1.1\r\nhost: bench.firebreak\r\n\r\n"
    end
    served = 0
    f:seek("set", first * rec_len)
  end
  served = served + 1
  return f:read(rec_len) .. body
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,"status_errors":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"timeouts":%d,"lat_mean_us":%.3f,"lat_p50_us":%d,' ..
    '"lat_p90_us":%d,"lat_p99_us":%d,"lat_max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write,
    e.timeout, latency.mean, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max))
end
