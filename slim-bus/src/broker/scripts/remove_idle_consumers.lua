-- Removes the consumers of a group that have been idle long enough and hold no pending
-- entries, in one step so that none gets an entry between the check and the removal
-- (`XGROUP DELCONSUMER` drops a consumer's pending entries with it).
--
-- KEYS[1]  the stream
-- ARGV[1]  the consumer group
-- ARGV[2]  the least idle time, in milliseconds
-- ARGV[3]  the calling consumer, which is kept
-- Returns the names removed.
--
--   redis-cli --eval remove_idle_consumers.lua orders , billing 3600000 consumer-1
local removed = {}
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then
  -- No such stream or group: nothing to remove.
  return removed
end
for _, consumer in ipairs(consumers) do
  local info = {}
  for i = 1, #consumer, 2 do
  info[consumer[i]] = consumer[i + 1]
  end
  local name = info['name']
  if name ~= ARGV[3] and info['idle'] >= tonumber(ARGV[2])
  and #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, name) == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], name)
  removed[#removed + 1] = name
  end
end
return removed
