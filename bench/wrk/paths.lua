-- wrk script: request paths read from a file, one per line.
--
--   wrk ... -s bench/wrk/paths.lua URL -- PATHS_FILE MODE NTHREADS HEADER_NAME HEADER_VALUE
--
-- MODE "random": every request picks a line at random (repeated URLs).
-- MODE "sequential": thread k (0-based) sends lines k+1, k+1+NTHREADS, ... so no line is
-- sent twice while the file lasts; it wraps at the end, and done() reports how many
-- requests were sent after a wrap ("repeated"), so the harness knows a list ran short.
-- MODE "once": as sequential, but each line is sent once: a thread whose lines are all
-- sent holds its connections idle, and writes BENCH_WRK_DONE_DIR/<thread> once every one
-- of them is answered (the harness then stops wrk with SIGINT).
--
-- Environment (read at the top level, where wrk decides which callbacks exist):
--   BENCH_WRK_STATUSES=1  count answers by status and X-Cache (a response() callback,
--                         which costs wrk some time per answer); "once" always counts.
--   BENCH_WRK_DONE_DIR    "once" mode (required there).
--
-- done() prints one line "BENCH_JSON {...}" with the totals, errors, latency percentiles
-- (microseconds), answers by status and the repeated count, which the harness parses.

local counter = 0
local threads = {}
local done_dir = os.getenv("BENCH_WRK_DONE_DIR")
local count_statuses = os.getenv("BENCH_WRK_STATUSES") == "1" or done_dir ~= nil

function setup(thread)
   thread:set("tid", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

function init(args)
   local file, nthreads = args[1], tonumber(args[3] or "1")
   mode = args[2] or "random"
   if args[4] and args[5] then
      wrk.headers[args[4]] = args[5]
   end
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
   repeated = 0
   statuses = {}
   -- "once": lines reserved by delay() for the request() that follows it, and progress.
   reserved = {}
   mine = 0
   for i = pos, count, stride do
      mine = mine + 1
   end
   answered = 0
   wrapped = false
   if mode == "once" and mine == 0 and done_dir then
      assert(io.open(done_dir .. "/" .. tostring(tid), "w")):close()
   end
   math.randomseed(os.time() * 1000 + (tid or 0) * 7919)
end

function request()
   if mode == "random" then
      return reqs[math.random(count)]
   elseif mode == "once" then
      return reqs[table.remove(reserved) or count]
   end
   local r = reqs[pos]
   if wrapped then
      repeated = repeated + 1
   end
   pos = pos + stride
   if pos > count then
      pos = ((pos - 1) % count) + 1
      wrapped = true
   end
   return r
end

if done_dir then
   -- Called before every request: send at once while lines remain, else hold the
   -- connection (an hour; SIGINT ends wrk long before). The line is taken here, not in
   -- request(), so two connections cannot both be promised the last one.
   function delay()
      if pos <= count then
         table.insert(reserved, pos)
         pos = pos + stride
         return 0
      end
      return 3600000
   end
end

if count_statuses then
   function response(status, headers, body)
      local key = tostring(status) .. " " .. (headers["X-Cache"] or "-")
      statuses[key] = (statuses[key] or 0) + 1
      if done_dir then
         answered = answered + 1
         if answered == mine then
            local marker = assert(io.open(done_dir .. "/" .. tostring(tid), "w"))
            marker:close()
         end
      end
   end
end

function done(summary, latency, requests)
   local e = summary.errors
   local parts = {}
   local total_repeated = 0
   for _, thread in ipairs(threads) do
      total_repeated = total_repeated + (thread:get("repeated") or 0)
      for key, n in pairs(thread:get("statuses") or {}) do
         parts[key] = (parts[key] or 0) + n
      end
   end
   local by_status = {}
   for key, n in pairs(parts) do
      table.insert(by_status, string.format('"%s":%d', key, n))
   end
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"latency":{"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f},' ..
      '"statuses":{%s},"repeated":%d}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(75), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean,
      table.concat(by_status, ","), total_repeated))
end
