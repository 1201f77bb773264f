-- Claims back those of the given entries that are pending with the calling consumer, for
-- their retry, counting a delivery, and returns each one's fields. An entry pending with
-- another consumer is left alone: that consumer claimed it, and a plain `XCLAIM` would take
-- it back while it runs there. An idle time cannot tell this apart when the caller's own
-- commands may or may not have reached the server; who holds the entry can.
--
-- KEYS[1]  the stream
-- ARGV[1]  the consumer group
-- ARGV[2]  the calling consumer
-- ARGV[3..] the entry ids
-- Returns one element per id, in order: the entry (its id and fields) as `XCLAIM` returns
-- it, or false where it is not pending with the caller or was deleted from the stream.
--
--   redis-cli --eval claim_own.lua orders , billing consumer-1 1700000000000-0
local claimed = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  local entry = false
  if row[1] ~= nil and row[1][2] == ARGV[2] then
    -- `XCLAIM` drops an entry deleted from the stream from the pending list and returns
    -- nothing for it.
    local reply = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
    if reply[1] ~= nil then
      entry = reply[1]
    end
  end
  claimed[#claimed + 1] = entry
end
return claimed
