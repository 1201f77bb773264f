-- Moves a dead letter back to its origin stream: its original fields only (metadata
-- dropped, escaped `@@` names restored), then deletes the dead letter. A dead letter whose
-- fields were packed into `@fields` is answered with {'@fields', packed} instead: a
-- script cannot pass that many values to one command, so the caller adds them.
--
-- KEYS[1]  the dead-letter stream
-- KEYS[2]  the origin stream (in the same hash slot)
-- ARGV[1]  the dead letter's id
-- Returns the new entry's id, or nil when there is no such dead letter.
--
--   redis-cli --eval replay.lua {orders}:dlq orders , 1700000000000-0
local entry = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #entry == 0 then
  return false
end
local fields = entry[1][2]
for i = 1, #fields, 2 do
  if fields[i] == '@fields' then
  -- Too many fields for one command from a script: the caller adds them.
  return {'@fields', fields[i + 1]}
  end
end
local args = {'XADD', KEYS[2], '*'}
for i = 1, #fields, 2 do
  local name = fields[i]
  if string.sub(name, 1, 2) == '@@' then
  args[#args + 1] = string.sub(name, 2)
  args[#args + 1] = fields[i + 1]
  elseif string.sub(name, 1, 1) ~= '@' then
  args[#args + 1] = name
  args[#args + 1] = fields[i + 1]
  end
end
if #args == 3 then
  return redis.error_reply('dead letter ' .. ARGV[1] .. ' has no original fields')
end
local id = redis.call(unpack(args))
redis.call('XDEL', KEYS[1], ARGV[1])
return id
