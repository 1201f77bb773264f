-- Claims back those of the given entries that are pending with the calling consumer, for
-- their retry, counting a delivery, and returns each one's fields. An entry pending with
-- another consumer is left alone: that consumer claimed it, and a plain `XCLAIM` would take
-- it back while it runs there. One pending with no consumer at all is put back under the
-- caller when ARGV[3] is `put-back` (its group was lost and created again, and the entry
-- was in the lost pending list only), and left when it is `leave` (it was acknowledged). An idle time cannot tell this apart when the caller's own
-- commands may or may not have reached the server; who holds the entry can.
--
-- KEYS[1]  the stream
-- ARGV[1]  the consumer group
-- ARGV[2]  the calling consumer
-- ARGV[3]  `put-back` or `leave`: what becomes of an entry pending with no one
-- ARGV[4..] the entry ids
-- Returns one element per id, in order: the entry (its id and fields) as `XCLAIM` returns
-- it, or false where it is pending with another consumer or was deleted from the stream.
--
--   redis-cli --eval claim_own.lua orders , billing consumer-1 put-back 1700000000000-0
local claimed = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local row = redis.call('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  local entry = false
  local reply = nil
  if row[1] == nil then
    -- Pending with no one: the group was lost and created again, and the entry was in the
    -- lost pending list only (`put-back`: `FORCE` puts it back, under the caller, which
    -- holds it), or it was acknowledged (`leave`).
    if ARGV[3] == 'put-back' then
      reply = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id, 'FORCE')
    end
  elseif row[1][2] == ARGV[2] then
    reply = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, id)
  end
  -- `XCLAIM` drops an entry deleted from the stream from the pending list (and `FORCE`
  -- adds none for it), returning nothing for it.
  if reply ~= nil and reply[1] ~= nil then
    entry = reply[1]
  end
  claimed[#claimed + 1] = entry
end
return claimed
