-- wrk script: POST pre-signed webhook requests read from $BENCH_POOL (one "path<TAB>body" per line),
-- optionally paced with $BENCH_DELAY_MS per connection, and print a JSON summary on stdout.
local pool = {}
local idx = 0
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "0")

function init(args)
  local f = assert(io.open(os.getenv("BENCH_POOL"), "r"))
  local headers = { ["Content-Type"] = "application/json" }
  for line in f:lines() do
    local tab = line:find("\t", 1, true)
    pool[#pool + 1] = wrk.format("POST", line:sub(1, tab - 1), headers, line:sub(tab + 1))
  end
  f:close()
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 100000)
  idx = math.random(#pool)
end

function request()
  idx = idx % #pool + 1
  return pool[idx]
end

if delay_ms > 0 then
  function delay()
    return delay_ms
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
