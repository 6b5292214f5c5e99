-- Round-robin over the bearer tokens in $TOKENS (one per line); prints a JSON summary line.
local tokens = {}
local file = os.getenv("TOKENS")
if file then
  for line in io.lines(file) do tokens[#tokens + 1] = line end
end
local counter = 0
local method = os.getenv("METHOD") or "GET"
local body = os.getenv("BODY")
local ctype = os.getenv("CONTENT_TYPE")
local basic = os.getenv("BASIC")
-- DELAY_MS: pause between a connection's requests (moderate, fixed-ish load instead of flat out).
local delay_ms = tonumber(os.getenv("DELAY_MS") or "")
if delay_ms then
  function delay() return delay_ms end
end

function setup(thread)
  counter = counter + 1
  thread:set("offset", counter * 7919)
end

function request()
  offset = (offset or 0) + 1
  local headers = {}
  if #tokens > 0 then
    headers["Authorization"] = "Bearer " .. tokens[(offset % #tokens) + 1]
  end
  if basic then headers["Authorization"] = "Basic " .. basic end
  if ctype then headers["Content-Type"] = ctype end
  return wrk.format(method, wrk.path, headers, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'JSON {"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
