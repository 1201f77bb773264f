//! The connection for every command but reads of new entries and publishes: a redis-rs
//! connection manager, each request bounded by the command timeout, and replaced by a new
//! one (the address resolved again) once the server it reaches stops being a writable
//! primary.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::{Client, Value};

use super::is_failover_code;
use super::redis::manager;
use crate::error::{Result, server_code};

/// The connection manager of a broker, and what replacing it takes.
pub(crate) struct CommandConnection {
    client: Client,
    timeout: Duration,
    manager: std::sync::Mutex<ConnectionManager>,
    /// A reply said the server is a replica, loading, or without its primary: the next
    /// request opens a new connection first.
    stale: AtomicBool,
    /// Held while a new manager connects, so that concurrent requests open one, not many.
    replacing: tokio::sync::Mutex<()>,
}

impl CommandConnection {
    pub(crate) async fn connect(client: Client, timeout: Duration) -> Result<Self> {
        let manager = manager(&client, timeout).await?;
        Ok(CommandConnection {
            client,
            timeout,
            manager: std::sync::Mutex::new(manager),
            stale: AtomicBool::new(false),
            replacing: tokio::sync::Mutex::new(()),
        })
    }

    /// A handle to send requests on.
    pub(crate) fn handle(self: &Arc<Self>) -> TimedConnection {
        TimedConnection {
            connection: self.clone(),
        }
    }

    fn current(&self) -> ConnectionManager {
        self.manager
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The manager to send on: a new one when the current one reached a server that can
    /// no longer take writes. A manager reconnects by itself after I/O errors only; these
    /// replies come on a healthy socket, from a primary that was demoted or from a replica
    /// behind a DNS name that moved, and only a new connection can reach the new primary.
    async fn usable(&self) -> redis::RedisResult<ConnectionManager> {
        if !self.stale.load(Ordering::Acquire) {
            return Ok(self.current());
        }
        let _replacing = self.replacing.lock().await;
        if self.stale.load(Ordering::Acquire) {
            let addr = self.client.get_connection_info().addr().to_string();
            let fresh = manager(&self.client, self.timeout)
                .await
                .map_err(|error| std::io::Error::other(crate::error::report(&error)))?;
            *self
                .manager
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
            self.stale.store(false, Ordering::Release);
            tracing::info!(%addr, "opened a new command connection after the server stopped taking writes");
        }
        Ok(self.current())
    }

    fn timed_out(&self) -> redis::RedisError {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("redis did not answer within {:?}", self.timeout),
        )
        .into()
    }

    /// Marks the connection for replacement when `error` or one of `replies` says so.
    fn check(&self, error: Option<&redis::RedisError>, replies: &[Value]) {
        let failover = error.is_some_and(|error| {
            server_code(error).is_some_and(|code| is_failover_code(code.as_bytes()))
        }) || replies.iter().any(|reply| {
            matches!(reply, Value::ServerError(error) if is_failover_code(error.code().as_bytes()))
        });
        if failover && !self.stale.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                addr = %self.client.get_connection_info().addr(),
                "the server answered as a replica, loading, or without its primary; replacing the command connection"
            );
        }
    }
}

/// The command connection with every request bounded by the command timeout, including
/// the time it waits for the connection manager to reconnect: against a server that
/// accepts connections but does not answer, that wait alone took 20 s.
pub(crate) struct TimedConnection {
    connection: Arc<CommandConnection>,
}

impl redis::aio::ConnectionLike for TimedConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, Value> {
        Box::pin(async move {
            let connection = &self.connection;
            let reply = match tokio::time::timeout(connection.timeout, async {
                connection.usable().await?.req_packed_command(cmd).await
            })
            .await
            {
                Ok(reply) => reply,
                Err(_) => Err(connection.timed_out()),
            };
            match &reply {
                Ok(value) => connection.check(None, std::slice::from_ref(value)),
                Err(error) => connection.check(Some(error), &[]),
            }
            reply
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let connection = &self.connection;
            let replies = match tokio::time::timeout(connection.timeout, async {
                connection
                    .usable()
                    .await?
                    .req_packed_commands(pipeline, offset, count)
                    .await
            })
            .await
            {
                Ok(replies) => replies,
                Err(_) => Err(connection.timed_out()),
            };
            match &replies {
                Ok(values) => connection.check(None, values),
                Err(error) => connection.check(Some(error), &[]),
            }
            replies
        })
    }

    fn get_db(&self) -> i64 {
        self.connection.current().get_db()
    }
}
