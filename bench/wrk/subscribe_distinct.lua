-- SUBSCRIBE a new random device token to a new random key on every request.
local headers = { ["Content-Type"] = "application/json" }

init = function(args)
   math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1e6))
end

local function hex(words)
   local parts = {}
   for i = 1, words do
      parts[i] = string.format("%04x", math.random(0, 0xffff))
   end
   return table.concat(parts)
end

request = function()
   local body = '{"key":"tok-' .. hex(8) .. '","platform":"android","client_id":"bench","session_id":"s"}'
   return wrk.format("SUBSCRIBE", "/key/" .. hex(10), headers, body)
end

done = function(summary, latency, requests)
   io.write(string.format("non2xx=%d\n", summary.errors.status))
end
