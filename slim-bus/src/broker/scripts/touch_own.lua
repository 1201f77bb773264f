-- Sets the idle time of those of the given entries that are pending with the calling
-- consumer, keeping their delivery counts, and returns their ids. An entry pending with
-- another consumer is left alone: a plain `XCLAIM` would take it back from the consumer
-- that claimed it. One pending with no consumer at all (its group was lost and created
-- again, or it was acknowledged just now) is returned as the caller's, and put back under
-- it or left as ARGV[4] says. With an idle time of 0 this keeps held entries from going stale; with
-- `claim_min_idle` it hands them over to the next claim scan of any consumer.
--
-- KEYS[1]  the stream
-- ARGV[1]  the consumer group
-- ARGV[2]  the calling consumer
-- ARGV[3]  the idle time to set, in milliseconds
-- ARGV[4]  `put-back` or `leave`: what becomes of an entry pending with no one
-- ARGV[5..] the entry ids
-- Returns the ids that are still the caller's: those whose idle time was set, and those
-- pending with no one.
--
--   redis-cli --eval touch_own.lua orders , billing consumer-1 0 leave 1700000000000-0
local kept = {}
for i = 5, #ARGV do
  local id = ARGV[i]
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if row[1] == nil then
    -- Pending with no one: acknowledged a moment ago, or its group was lost and created
    -- again while the caller held it. Either way nobody else has it: it stays the caller's
    -- as long as it is in the stream. `leave` (keeping entries fresh) leaves it as it is:
    -- putting it back could resurrect an entry whose acknowledgement is on its way.
    -- `put-back` (a hand-over of what the caller gave up unfinished) puts it back.
    if redis.call('XRANGE', KEYS[1], id, id)[1] ~= nil then
      if ARGV[4] == 'put-back' then
        redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'FORCE', 'JUSTID')
      end
      kept[#kept + 1] = id
    end
  elseif row[1][2] == ARGV[2] then
    -- `XCLAIM` drops an entry deleted from the stream from the pending list and returns
    -- nothing for it.
    local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'IDLE', ARGV[3], 'JUSTID')
    if claimed[1] ~= nil then
      kept[#kept + 1] = id
    end
  end
end
return kept
