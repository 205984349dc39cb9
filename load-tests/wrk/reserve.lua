-- wrk script for the reservation run: one POST per buyer token, each request
-- formatted once at start so wrk spends no Lua per request beyond picking
-- the next one, and no response callback (answers are counted from wrk's
-- non-2xx total and checked against PostgreSQL afterwards).
-- Usage: wrk ... -s reserve.lua URL -- /api/v1/sales/<id>/purchases tokens.txt
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_index", thread_count)
end

function init(args)
  local path = args[1]
  local total = tonumber(os.getenv("WRK_THREADS") or "1")
  requests = {}
  local n, line_no = 0, 0
  for line in io.lines(args[2]) do
    line_no = line_no + 1
    if (line_no % total) == (thread_index - 1) then
      n = n + 1
      requests[n] = wrk.format("POST", path, { ["Authorization"] = "Bearer " .. line }, nil)
    end
  end
  count = n
  nxt = 0
end

function request()
  nxt = nxt + 1
  if nxt > count then nxt = 1 end
  return requests[nxt]
end

function done(summary, latency, requests)
  io.write(string.format("requests %d\np50_ms %.3f\np99_ms %.3f\np999_ms %.3f\n",
    summary.requests, latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000))
end
