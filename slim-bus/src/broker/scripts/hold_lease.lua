-- Takes or renews a lease: sets it when it is free or already the holder's, in one step.
--
-- KEYS[1]  the lease key
-- ARGV[1]  the holder
-- ARGV[2]  the lease's time to live, in milliseconds
-- Returns {1} when the caller has it now, else {0, holder, remaining milliseconds}.
--
--   redis-cli --eval hold_lease.lua slim-bus:consumer:billing:consumer-1 , pod-a 30000
local current = redis.call('GET', KEYS[1])
if current == false or current == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1}
end
return {0, current, redis.call('PTTL', KEYS[1])}
