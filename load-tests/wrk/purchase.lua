-- wrk script: POST purchases to one sale, each request with the next token
-- from a file (one token per line; each wrk thread takes its own share, so
-- no two requests of a run share a buyer when the file has enough tokens).
-- Usage: wrk ... -s purchase.lua URL -- /api/v1/sales/<id>/purchases tokens.txt
-- At the end it prints the answers by status, summed over the threads.

local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_index", thread_count)
  table.insert(threads, thread)
end

function init(args)
  path = args[1]
  tokens = {}
  local n, line_no = 0, 0
  local total = tonumber(os.getenv("WRK_THREADS") or "1")
  for line in io.lines(args[2]) do
    line_no = line_no + 1
    if (line_no % total) == (thread_index - 1) then
      n = n + 1
      tokens[n] = "Bearer " .. line
    end
  end
  token_count = n
  next_token = 0
  statuses = {}
end

function request()
  next_token = next_token + 1
  if next_token > token_count then next_token = 1 end
  return wrk.format("POST", path, { ["Authorization"] = tokens[next_token] }, nil)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end

function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses")
    for code, count in pairs(s) do
      total[code] = (total[code] or 0) + count
    end
  end
  for code, count in pairs(total) do
    io.write(string.format("status %d: %d\n", code, count))
  end
  io.write(string.format("p50_ms %.3f\np99_ms %.3f\np999_ms %.3f\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000))
end
