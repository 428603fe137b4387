-- wrk script for bench/serve_load.py. Without arguments: closed-loop POST /v1/sample {"n": 1, "seed": k}
-- (k differs per request). With `-- PATH BODY_FILE`: POST the file's JSON body to PATH every time.
-- Either way, a JSON summary line on stdout at the end for the benchmark to parse.
local counter = 0
local fixed_request = nil

function setup(thread)
  thread:set("first_seed", math.random(1, 2^30))
end

function init(args)
  counter = first_seed or 0
  if args[2] then
    local file = assert(io.open(args[2], "rb"))
    fixed_request = wrk.format("POST", args[1], {["Content-Type"] = "application/json"}, file:read("*a"))
    file:close()
  end
end

function request()
  if fixed_request then
    return fixed_request
  end
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
