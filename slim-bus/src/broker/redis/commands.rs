//! The connection for every command but reads of new entries and publishes: a redis-rs
//! connection manager, opened in the background with backoff (so a bus is built while
//! Redis is down), each request bounded by the command timeout, and replaced by a new one
//! (the address resolved again) once the server it reaches stops being a writable primary.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::{Client, Value};

use redis::aio::ConnectionManagerConfig;

use super::CONNECT_TIMEOUT;
use crate::broker::is_failover_code;
use crate::consumer::Backoff;
use crate::error::{Error, server_code};

/// The connection manager of a broker, and what replacing it takes.
pub(crate) struct CommandConnection {
    client: Client,
    timeout: Duration,
    /// `None` until the first connection succeeds.
    manager: std::sync::Mutex<Option<ConnectionManager>>,
    /// A reply said the server is a replica, loading, or without its primary: the next
    /// request opens a new connection first.
    stale: AtomicBool,
    /// Held while a new manager connects, so that concurrent requests open one, not many.
    replacing: tokio::sync::Mutex<()>,
    /// When the last background attempt to open the first connection failed, and why: a
    /// request that waited for that attempt fails with it rather than spend the command
    /// timeout once more on an attempt of its own.
    last_failure: std::sync::Mutex<Option<Failure>>,
}

/// A failed attempt to open the first connection.
struct Failure {
    at: Instant,
    /// The error with its causes.
    report: String,
    /// Whether the server refused the credentials, which no retry fixes.
    refused: bool,
}

impl CommandConnection {
    /// A connection not opened yet: a background task opens it, retrying with backoff
    /// until it succeeds or the connection is dropped, and a request sent before opens it
    /// itself (or waits for the attempt in progress), within its timeout.
    pub(crate) fn open_in_background(client: Client, timeout: Duration) -> Arc<Self> {
        let connection = Arc::new(CommandConnection {
            client,
            timeout,
            manager: std::sync::Mutex::new(None),
            stale: AtomicBool::new(false),
            replacing: tokio::sync::Mutex::new(()),
            last_failure: std::sync::Mutex::new(None),
        });
        tokio::spawn(keep_connecting(Arc::downgrade(&connection)));
        connection
    }

    /// Opens the first connection unless one is open.
    async fn connect_first(&self) -> std::result::Result<(), Error> {
        let _replacing = self.replacing.lock().await;
        if self.is_open() {
            return Ok(());
        }
        let fresh = match manager(&self.client, self.timeout).await {
            Ok(fresh) => fresh,
            Err(error) => {
                *self
                    .last_failure
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Failure {
                    at: Instant::now(),
                    report: crate::error::report(&error),
                    refused: refuses_credentials(&error),
                });
                return Err(error);
            }
        };
        *self.slot() = Some(fresh);
        tracing::info!(addr = %self.client.get_connection_info().addr(), "connected to redis");
        Ok(())
    }

    fn is_open(&self) -> bool {
        self.slot().is_some()
    }

    /// A handle to send requests on.
    pub(crate) fn handle(self: &Arc<Self>) -> TimedConnection {
        TimedConnection {
            connection: self.clone(),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Option<ConnectionManager>> {
        self.manager
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn current(&self) -> Option<ConnectionManager> {
        self.slot().clone()
    }

    /// The manager to send on: a new one when the current one reached a server that can
    /// no longer take writes. A manager reconnects by itself after I/O errors only; these
    /// replies come on a healthy socket, from a primary that was demoted or from a replica
    /// behind a DNS name that moved, and only a new connection can reach the new primary.
    ///
    /// Before the first connection is open, a request opens it, or waits for the attempt
    /// in progress and makes one of its own if that failed.
    async fn usable(&self) -> redis::RedisResult<ConnectionManager> {
        if !self.stale.load(Ordering::Acquire)
            && let Some(current) = self.current()
        {
            return Ok(current);
        }
        let waiting_since = Instant::now();
        let _replacing = self.replacing.lock().await;
        let addr = self.client.get_connection_info().addr().to_string();
        let not_connected_because = |cause: &str, refused: bool| {
            if refused {
                // Kept an authentication failure, so that listen() and publishes fail
                // at once rather than wait for a server that answers already.
                return redis::RedisError::from((
                    redis::ErrorKind::AuthenticationFailed,
                    "refused credentials",
                    cause.to_owned(),
                ));
            }
            redis::RedisError::from(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                format!("not connected to {addr}: {cause}"),
            ))
        };
        let not_connected = |error: Error| {
            not_connected_because(&crate::error::report(&error), refuses_credentials(&error))
        };
        if !self.stale.load(Ordering::Acquire) && !self.is_open() {
            let failed_meanwhile = self
                .last_failure
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .as_ref()
                .filter(|failure| failure.at >= waiting_since || failure.refused)
                .map(|failure| (failure.report.clone(), failure.refused));
            if let Some((cause, refused)) = failed_meanwhile {
                return Err(not_connected_because(&cause, refused));
            }
        }
        if self.stale.load(Ordering::Acquire) || !self.is_open() {
            let fresh = manager(&self.client, self.timeout)
                .await
                .map_err(not_connected)?;
            let first = self.slot().replace(fresh).is_none();
            if self.stale.swap(false, Ordering::AcqRel) {
                tracing::info!(%addr, "opened a new command connection after the server stopped taking writes");
            } else if first {
                tracing::info!(%addr, "connected to redis");
            }
        }
        self.current().ok_or_else(|| {
            not_connected(Error::Internal {
                detail: "the command connection was not kept".to_owned(),
            })
        })
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
#[derive(Clone)]
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
        self.connection
            .client
            .get_connection_info()
            .redis_settings()
            .db()
    }
}

/// Opens the first command connection, retrying with backoff (one log line per step),
/// until it is open or the broker is gone.
async fn keep_connecting(connection: Weak<CommandConnection>) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let Some(strong) = connection.upgrade() else {
            return;
        };
        let error = match strong.connect_first().await {
            Ok(()) => return,
            Err(error) => error,
        };
        drop(strong);
        wait_to_connect_again(&mut backoff, &error, "redis").await;
    }
}

/// After a failed attempt to open a command connection to `what` ("redis", "the redis
/// cluster"): logs it, and sleeps the backoff's next delay.
pub(crate) async fn wait_to_connect_again(
    backoff: &mut Backoff,
    error: &(dyn std::error::Error + Send + Sync + 'static),
    what: &str,
) {
    let delay = backoff.next_delay();
    tracing::warn!(
        error = error as &dyn std::error::Error,
        attempt = backoff.attempts(),
        retry_in = ?delay,
        "cannot connect to {what} yet; publishes and listening wait or fail until it answers"
    );
    tokio::time::sleep(delay).await;
}

/// Whether `error` says the server refused the credentials (`WRONGPASS`, `NOAUTH`).
fn refuses_credentials(error: &Error) -> bool {
    match error {
        Error::Redis { source, .. } => crate::consumer::is_refused_access(source),
        _ => false,
    }
}

/// The URL of `info` with its password hidden: `redis://user:***@127.0.0.1:6379/2`.
pub(crate) fn redacted_url_of(info: &redis::ConnectionInfo) -> String {
    let settings = info.redis_settings();
    let user_info = match (settings.username(), settings.password()) {
        (Some(user), Some(_)) => format!("{user}:***@"),
        (None, Some(_)) => ":***@".to_owned(),
        (Some(user), None) => format!("{user}@"),
        (None, None) => String::new(),
    };
    let db = match settings.db() {
        0 => String::new(),
        db => db.to_string(),
    };
    match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => format!("redis://{user_info}{host}:{port}/{db}"),
        redis::ConnectionAddr::TcpTls { host, port, .. } => {
            format!("rediss://{user_info}{host}:{port}/{db}")
        }
        other => other.to_string(),
    }
}

/// What a failed first connection may mean when its URL and the port disagree about TLS
/// (a TLS port closes on the plain bytes of `redis://`, a plain port answers a TLS
/// handshake with nothing or with something that is not TLS), or when the handshake
/// failed: which setting to look at.
fn wrong_transport_hint(addr: &redis::ConnectionAddr, error: &redis::RedisError) -> &'static str {
    match addr {
        redis::ConnectionAddr::Tcp(..)
            if error.is_connection_dropped() && !error.is_connection_refusal() =>
        {
            " (the server closed the connection at once: if this port wants TLS, use a rediss:// URL)"
        }
        // rustls reports bytes that are not TLS as a corrupt message.
        redis::ConnectionAddr::TcpTls { .. }
            if error.is_timeout() || error.to_string().contains("corrupt message") =>
        {
            " over TLS (no TLS handshake came back: if this port does not speak TLS, use a redis:// URL)"
        }
        redis::ConnectionAddr::TcpTls { .. }
            if error.to_string().contains("invalid peer certificate") =>
        {
            " over TLS (the server's certificate is not trusted: check tls_ca_cert)"
        }
        redis::ConnectionAddr::TcpTls { .. }
            if error.to_string().contains("received fatal alert") =>
        {
            " over TLS (the server refused the handshake: check tls_client_cert and tls_client_key)"
        }
        _ => "",
    }
}

async fn manager(client: &Client, response_timeout: Duration) -> Result<ConnectionManager, Error> {
    // The bus's own loops back off between attempts, so a reconnect fails within the
    // command timeout rather than holding every caller through rounds of retries: redis-rs
    // makes two connection attempts even without retries, each given half of it.
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT.min(response_timeout / 2)))
        .set_response_timeout(Some(response_timeout))
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_secs(1))
        .set_number_of_retries(0);
    let action = || {
        format!(
            "connecting to {}",
            redacted_url_of(client.get_connection_info())
        )
    };
    match tokio::time::timeout(
        CONNECT_TIMEOUT * 2,
        ConnectionManager::new_with_config(client.clone(), config),
    )
    .await
    {
        Ok(Ok(manager)) => Ok(manager),
        Ok(Err(source)) => {
            let hint = wrong_transport_hint(client.get_connection_info().addr(), &source);
            Err(Error::redis(format!("{}{hint}", action()), source))
        }
        Err(_) => Err(Error::Timeout {
            action: action(),
            timeout: CONNECT_TIMEOUT * 2,
        }),
    }
}
