-- wrk script: logins of a user that does not exist (each costs the server a
-- decoy password hash). Prints p50/p99 in milliseconds at the end; wrk's
-- Non-2xx line counts every answer, 401 (hashed) and 503 (shed) alike.
wrk.method = "POST"
wrk.body = '{"username":"nobody-at-all","password":"password123"}'
wrk.headers["Content-Type"] = "application/json"

function done(summary, latency, requests)
  io.write(string.format("p50_ms %.3f\np99_ms %.3f\np999_ms %.3f\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000))
end
