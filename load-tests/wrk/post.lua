-- wrk script: the same POST every time (headers from -H), built once, so
-- wrk spends no Lua per request: the same client cost as a plain GET.
-- Prints p50/p99/p99.9 in milliseconds at the end.
wrk.method = "POST"

function done(summary, latency, requests)
  io.write(string.format("p50_ms %.3f\np99_ms %.3f\np999_ms %.3f\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency:percentile(99.9) / 1000))
end
