-- Moves a pending entry to its dead-letter stream, in one step so that it is never both
-- pending and dead-lettered, nor dead-lettered twice. Field names starting with `@` are
-- escaped as `@@...`; an entry with more values than `unpack` takes has its fields packed
-- into one `@fields` value (each name and value as its length, `:` and its bytes).
--
-- KEYS[1]  the origin stream
-- KEYS[2]  the dead-letter stream (`{stream}:dlq`: the origin's hash slot)
-- KEYS[3]  the count of dead letters the cap trimmed (`{stream}:dlq:trimmed`)
-- ARGV[1]  the consumer group
-- ARGV[2]  the consumer the entry must be pending with
-- ARGV[3]  the entry id
-- ARGV[4]  the dead-letter stream's cap (`MAXLEN ~`), empty for none
-- ARGV[5..]  metadata names and values, in pairs
-- Returns {1, trimmed} moved, {0, 0} not pending with this consumer, {-1, 0} deleted from
-- the stream (acknowledged, nothing written).
--
--   redis-cli --eval dead_letter.lua orders {orders}:dlq {orders}:dlq:trimmed , \
--     billing consumer-1 1700000000000-0 1000 @reason permanent @error "card declined"
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1)
if #pending == 0 or pending[1][2] ~= ARGV[2] then
  return {0, 0}
end
local entry = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
if #entry == 0 then
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
  return {-1, 0}
end
local fields = entry[1][2]
local args = {'XADD', KEYS[2]}
local before = 0
if ARGV[4] ~= '' then
  before = redis.call('XLEN', KEYS[2])
  args[#args + 1] = 'MAXLEN'
  args[#args + 1] = '~'
  args[#args + 1] = ARGV[4]
end
args[#args + 1] = '*'
-- unpack() takes about 8000 values at most: a larger entry's fields are packed into one
-- value, each name and value as its length, ':' and its bytes.
if #fields + #ARGV > 7900 then
  local packed = {}
  for i = 1, #fields do
  packed[i] = #fields[i] .. ':' .. fields[i]
  end
  args[#args + 1] = '@fields'
  args[#args + 1] = table.concat(packed)
else
  for i = 1, #fields, 2 do
  local name = fields[i]
  if string.sub(name, 1, 1) == '@' then
    name = '@' .. name
  end
  args[#args + 1] = name
  args[#args + 1] = fields[i + 1]
  end
end
for i = 5, #ARGV do
  args[#args + 1] = ARGV[i]
end
-- XADD before XACK: a script that fails half way is not rolled back, and an entry must
-- never be acknowledged without having been dead-lettered.
redis.call(unpack(args))
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
local trimmed = 0
if ARGV[4] ~= '' then
  trimmed = before + 1 - redis.call('XLEN', KEYS[2])
  if trimmed > 0 then
  redis.call('INCRBY', KEYS[3], trimmed)
  end
end
return {1, trimmed}
