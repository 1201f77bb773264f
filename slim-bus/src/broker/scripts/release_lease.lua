-- Deletes a lease if the holder has it.
--
-- KEYS[1]  the lease key
-- ARGV[1]  the holder
-- Returns 1 when it was deleted, else 0.
--
--   redis-cli --eval release_lease.lua slim-bus:consumer:billing:consumer-1 , pod-a
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
