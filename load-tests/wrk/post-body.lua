-- wrk script: the same POST with a small JSON body every time (headers from
-- -H), built once: a purchase as a browser sends it. A refusal that left the
-- body unread would close the connection, and every request would then pay
-- for a new one. No per-request Lua (wrk's Non-2xx line counts the
-- refusals). Prints p50/p99/p99.9 in milliseconds and the connect errors
-- (new connections wrk could not open) at the end.
wrk.method = "POST"
wrk.body = '{"quantity":1}'
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  io.write(string.format("p50_ms %.3f\np99_ms %.3f\np999_ms %.3f\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000))
  io.write(string.format("connect_errors %d\nrequests %d\n", summary.errors.connect, summary.requests))
end
