-- wrk script used for every benchmark run.
--
-- * When WRK_POST_BYTES is set (the "post" app), every request is a POST carrying a body
--   of that many bytes. The body is built once, so wrk keeps sending a static request and
--   the script costs nothing per request.
-- * done() prints wrk's summary as one machine-readable line, prefixed "BENCH_JSON ", so
--   the harness never has to scrape wrk's human-oriented text. Latencies are in
--   microseconds; requests that timed out are counted in "timeout" and, as in wrk's own
--   output, are not part of the latency percentiles.

local post_bytes = tonumber(os.getenv("WRK_POST_BYTES") or "0") or 0
if post_bytes > 0 then
  wrk.method = "POST"
  wrk.body = string.rep("x", post_bytes)
  wrk.headers["Content-Type"] = "application/octet-stream"
end

function done(summary, latency, requests)
  local e = summary.errors
  local mean = latency.mean
  if mean ~= mean then mean = 0 end -- NaN when nothing completed
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d, '
      .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, mean))
end
