//! Leases (the consumer-name lease), taken and released by scripts.

use std::time::Duration;

use async_trait::async_trait;
use redis::Value;

use super::{RedisBroker, millis, unexpected};
use crate::broker::{LeaseState, Leases};
use crate::error::{Error, Result};

#[async_trait]
impl Leases for RedisBroker {
    async fn hold_lease(&self, key: &str, holder: &str, ttl: Duration) -> Result<LeaseState> {
        let mut invocation = self.scripts.hold_lease.key(key);
        invocation.arg(holder).arg(millis(ttl).max(1));
        let action = || format!("taking the lease `{key}`");
        let reply: Value = invocation
            .invoke_async(&mut self.commands())
            .await
            .map_err(|e| Error::redis(action(), e))?;
        match reply {
            Value::Array(items) => match items.as_slice() {
                [Value::Int(1)] => Ok(LeaseState::Held),
                [Value::Int(0), holder, Value::Int(remaining)] => {
                    let holder = match holder {
                        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
                        other => format!("{other:?}"),
                    };
                    Ok(LeaseState::Taken {
                        holder,
                        remaining: Duration::from_millis(u64::try_from(*remaining).unwrap_or(0)),
                    })
                }
                _ => Err(unexpected(action(), "a lease state", &Value::Array(items))),
            },
            other => Err(unexpected(action(), "a lease state", &other)),
        }
    }

    async fn release_lease(&self, key: &str, holder: &str) -> Result<()> {
        let mut invocation = self.scripts.release_lease.key(key);
        invocation.arg(holder);
        invocation
            .invoke_async::<i64>(&mut self.commands())
            .await
            .map(drop)
            .map_err(|e| Error::redis(format!("releasing the lease `{key}`"), e))
    }
}
