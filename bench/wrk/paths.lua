-- wrk script: request paths read from a file, one per line.
--
--   wrk ... -s bench/wrk/paths.lua URL -- PATHS_FILE MODE NTHREADS HEADER_NAME HEADER_VALUE
--
-- MODE "random": every request picks a line at random (the hit-path mix).
-- MODE "sequential": thread k (0-based) sends lines k+1, k+1+NTHREADS, ... so no line is
-- sent twice while the file lasts (cold users for the miss path); it wraps at the end,
-- which the harness detects by counting upstream calls.
--
-- done() prints one line "BENCH_JSON {...}" with the totals, errors and latency
-- percentiles (microseconds) that the harness parses.

local counter = 0

function setup(thread)
   thread:set("tid", counter)
   counter = counter + 1
end

function init(args)
   local file, mode, nthreads = args[1], args[2] or "random", tonumber(args[3] or "1")
   if args[4] and args[5] then
      wrk.headers[args[4]] = args[5]
   end
   sequential = (mode == "sequential")
   reqs = {}
   local f = assert(io.open(file, "r"))
   local n = 0
   for line in f:lines() do
      if line ~= "" then
         n = n + 1
         -- Pre-formatted requests: the per-request work in wrk stays a table lookup.
         reqs[n] = wrk.format("GET", line)
      end
   end
   f:close()
   count = n
   stride = nthreads
   pos = (tid or 0) + 1
   math.randomseed(os.time() * 1000 + (tid or 0) * 7919)
end

function request()
   if sequential then
      local r = reqs[pos]
      pos = pos + stride
      if pos > count then
         pos = ((pos - 1) % count) + 1
      end
      return r
   end
   return reqs[math.random(count)]
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency":{"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(75), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
