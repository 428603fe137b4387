-- wrk script for bench/serve_load.py: closed-loop POST /v1/sample {"n": 1, "seed": k} (k differs per
-- request), and a JSON summary line on stdout at the end for the benchmark to parse.
local counter = 0

function setup(thread)
  thread:set("first_seed", math.random(1, 2^30))
end

function init(args)
  counter = first_seed or 0
end

function request()
  counter = counter + 1
  return wrk.format("POST", "/v1/sample", {["Content-Type"] = "application/json"},
                    '{"n": 1, "seed": ' .. counter .. '}')
end

function done(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"errors_connect": %d, "errors_read": %d, "errors_write": %d, "errors_status": %d, "errors_timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    errors.connect, errors.read, errors.write, errors.status, errors.timeout))
end
