-- Deletes the entries of a stream that every consumer group of it is done with: those
-- before the oldest entry some group still needs, which is its oldest pending entry, else
-- the last entry delivered to it (kept itself: `XTRIM MINID` deletes only older ids). On
-- Redis 8.2 and newer the trim also passes `ACKED`, so the server itself keeps whatever
-- some group has not acknowledged; older servers and Valkey refuse the option, and the
-- trim goes without it.
--
-- At most ARGV[1] entries go per call, so that the first trim of a long stream does not
-- hold the server for one huge XTRIM: the bound moves to the id of the entry after the
-- first ARGV[1] entries when that is older than what is needed, and the caller calls again.
--
-- KEYS[1]  the stream
-- ARGV[1]  the most entries to delete
-- Returns how many entries were deleted.
--
--   redis-cli --eval trim_acked.lua orders , 10000
if redis.call('TYPE', KEYS[1]).ok == 'none' then
  return 0
end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
-- Ids compared as numbers would lose precision past 2^53: compare their digits.
local function digits_less(a, b)
  if #a ~= #b then
    return #a < #b
  end
  return a < b
end
local function id_less(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  if a_ms ~= b_ms then
    return digits_less(a_ms, b_ms)
  end
  return digits_less(a_seq, b_seq)
end
local needed = nil
for _, group in ipairs(groups) do
  local name, last_delivered, pending
  for i = 1, #group, 2 do
    if group[i] == 'name' then
      name = group[i + 1]
    elseif group[i] == 'last-delivered-id' then
      last_delivered = group[i + 1]
    elseif group[i] == 'pending' then
      pending = group[i + 1]
    end
  end
  local oldest = last_delivered
  if pending > 0 then
    oldest = redis.call('XPENDING', KEYS[1], name)[2]
  end
  if needed == nil or id_less(oldest, needed) then
    needed = oldest
  end
end
if needed == nil then
  return 0
end
local limit = tonumber(ARGV[1])
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', limit + 1)
if #first > limit and id_less(first[limit + 1][1], needed) then
  needed = first[limit + 1][1]
end
local trimmed = redis.pcall('XTRIM', KEYS[1], 'MINID', needed, 'ACKED')
if type(trimmed) == 'table' and trimmed.err then
  trimmed = redis.call('XTRIM', KEYS[1], 'MINID', needed)
end
return trimmed
