-- Sets the idle time of those of the given entries that are pending with the calling
-- consumer, keeping their delivery counts, and returns their ids. An entry pending with
-- another consumer is left alone: a plain `XCLAIM` would take it back from the consumer
-- that claimed it. One pending with no consumer at all (its group was lost and created
-- again) is put back under the caller. With an idle time of 0 this keeps held entries from going stale; with
-- `claim_min_idle` it hands them over to the next claim scan of any consumer.
--
-- KEYS[1]  the stream
-- ARGV[1]  the consumer group
-- ARGV[2]  the calling consumer
-- ARGV[3]  the idle time to set, in milliseconds
-- ARGV[4..] the entry ids
-- Returns the ids whose idle time was set.
--
--   redis-cli --eval touch_own.lua orders , billing consumer-1 0 1700000000000-0
local kept = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  local claim = nil
  if row[1] == nil then
    -- Pending with no one: the group was lost and created again, and the entry was in the
    -- lost pending list only. `FORCE` puts it back, under the caller, which holds it.
    claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'FORCE', 'JUSTID'}
  elseif row[1][2] == ARGV[2] then
    claim = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'JUSTID'}
  end
  if claim ~= nil then
    -- `XCLAIM` drops an entry deleted from the stream from the pending list (and `FORCE`
    -- adds none for it), returning nothing for it.
    local claimed = redis.call(unpack(claim))
    if claimed[1] ~= nil then
      kept[#kept + 1] = id
    end
  end
end
return kept
