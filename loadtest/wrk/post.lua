-- One POST repeated by every wrk connection (closed loop), built once per thread, then a JSON summary.
--
--   wrk -t1 -c32 -d20s --latency -s post.lua URL -- multipart digit.png [name=value ...]
--   wrk -t1 -c32 -d20s --latency -s post.lua URL -- body request.json application/json
--   wrk -t1 -c32 -d20s --latency -s post.lua URL -- body request.bin application/octet-stream Name=value ...
--
-- multipart: the PNG goes in file field "image" (what /classify and /features take), each name=value
-- as a form field after it. body: the file's bytes as they are, with the given Content-Type and each
-- Name=value as a request header (Triton's binary extension: Inference-Header-Content-Length=N).
-- status_errors: responses with a status >= 400 (what wrk counts). No response() callback: defining one
-- makes wrk parse every response's headers in Lua, and the load generator shares the CPU with the server it measures.

local function read_file(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

function init(args)
  wrk.method = "POST"
  if args[1] == "multipart" then
    local boundary = "----nnservebench0b8e1f"
    local parts = {}
    for i = 3, #args do
      local name, value = args[i]:match("^([^=]+)=(.*)$")
      parts[#parts + 1] = "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"" .. name ..
        "\"\r\n\r\n" .. value .. "\r\n"
    end
    table.insert(parts, 1, "--" .. boundary ..
      "\r\nContent-Disposition: form-data; name=\"image\"; filename=\"digit.png\"\r\n" ..
      "Content-Type: image/png\r\n\r\n" .. read_file(args[2]) .. "\r\n")
    parts[#parts + 1] = "--" .. boundary .. "--\r\n"
    wrk.body = table.concat(parts)
    wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
  elseif args[1] == "body" then
    wrk.body = read_file(args[2])
    wrk.headers["Content-Type"] = args[3]
    for i = 4, #args do
      local name, value = args[i]:match("^([^=]+)=(.*)$")
      wrk.headers[name] = value
    end
  else
    error("post.lua: first argument must be 'multipart' or 'body', got " .. tostring(args[1]))
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  local seconds = summary.duration / 1e6
  -- Latencies are in microseconds; wrk records them for every completed response, whatever its status.
  io.write(string.format(
    "WRK_JSON {\"requests\": %d, \"seconds\": %.3f, \"rps\": %.2f, \"p50_ms\": %.3f, \"p95_ms\": %.3f, " ..
    "\"p99_ms\": %.3f, \"max_ms\": %.3f, \"status_errors\": %d, \"socket_errors\": %d, \"connect_errors\": %d, " ..
    "\"read_errors\": %d, \"write_errors\": %d, \"timeouts\": %d}\n",
    summary.requests, seconds, summary.requests / seconds,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, e.status, e.connect + e.read + e.write + e.timeout,
    e.connect, e.read, e.write, e.timeout))
end
