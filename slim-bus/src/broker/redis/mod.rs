//! The Redis backend: reads of new entries and publishes over connections of their own
//! (see [`super::resp`]), everything else over a managed redis-rs connection. By role:
//! [`publish`] (pipelined `XADD`s), [`read`] (consumer groups), [`dead_letters`],
//! [`inspect`] and [`leases`]; the Lua scripts they run are in [`scripts`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::{Client, Value};
use tokio::sync::mpsc;

use self::commands::TimedConnection;
use self::publish::{PublishRequest, keep_publishing};
use self::read::ReaderState;
use self::scripts::Scripts;
use super::resp::RespConnection;
use super::topology::SingleServer;
use super::{Broker, NO_PERMISSION, TYPE_NONE, TYPE_STREAM, WRONG_TYPE, is_supported_version};
use crate::error::{Error, Result, server_code};
use crate::tls::Tls;

pub(crate) mod commands;
mod dead_letters;
mod inspect;
mod leases;
mod publish;
mod read;
mod replies;
mod scripts;

#[cfg(unix)]
fn is_unix_socket(addr: &redis::ConnectionAddr) -> bool {
    matches!(addr, redis::ConnectionAddr::Unix(_))
}

#[cfg(not(unix))]
fn is_unix_socket(_: &redis::ConnectionAddr) -> bool {
    false
}

/// How long connecting may take before it counts as a failure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct RedisBroker {
    /// The server, and the connection for acks, claims, scripts and group management.
    topology: SingleServer,
    /// `XREADGROUP ... BLOCK`, which holds its connection for the whole block time, so it
    /// gets a connection of its own, opened on first use and again after it broke.
    read_connection: tokio::sync::Mutex<Option<RespConnection>>,
    /// `XREAD ... BLOCK` of [`Inspection::read_after`](crate::broker::Inspection::read_after),
    /// for the same reason.
    tail_connection: tokio::sync::Mutex<Option<RespConnection>>,
    command_timeout: Duration,
    scripts: Scripts,
    /// Whether a read blocks, and whether a wake came while none did.
    reader: Mutex<ReaderState>,
    /// Publishes go to a task that sends them in pipelines.
    publisher: mpsc::UnboundedSender<PublishRequest>,
}

impl RedisBroker {
    /// A broker for the server `client` names, connecting in the background: this
    /// fails only for an address the bus cannot use, never because Redis is down.
    pub(crate) fn new(client: Client, tls: Option<Tls>, command_timeout: Duration) -> Result<Self> {
        let addr = client.get_connection_info().addr();
        let supported = match addr {
            redis::ConnectionAddr::Tcp(..) => true,
            redis::ConnectionAddr::TcpTls { insecure, .. } => !insecure && tls.is_some(),
            other => is_unix_socket(other),
        };
        if !supported {
            return Err(Error::config(
                "url",
                format!(
                    "{addr} is not supported: use redis:// (TCP), rediss:// (TLS, without #insecure) or a Unix socket"
                ),
            ));
        }
        let topology = SingleServer::new(client, tls.map(|tls| tls.connector), command_timeout);
        let (publisher, requests) = mpsc::unbounded_channel();
        tokio::spawn(keep_publishing(
            topology.endpoint().clone(),
            command_timeout,
            requests,
        ));
        Ok(RedisBroker {
            topology,
            publisher,
            read_connection: tokio::sync::Mutex::new(None),
            tail_connection: tokio::sync::Mutex::new(None),
            command_timeout,
            scripts: Scripts::load(),
            reader: Mutex::new(ReaderState::default()),
        })
    }

    fn commands(&self) -> TimedConnection {
        self.topology.commands()
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn ping(&self) -> Result<()> {
        redis::cmd("PING")
            .query_async::<()>(&mut self.commands())
            .await
            .map_err(|e| Error::redis("pinging the server", e))
    }

    async fn check_version(&self) -> Result<()> {
        let addr = self.topology.endpoint().info.addr().to_string();
        let info: String = match redis::cmd("INFO")
            .arg("server")
            .query_async(&mut self.commands())
            .await
        {
            Ok(info) => info,
            // A user without the right to INFO may still have all it needs.
            Err(e) if server_code(&e).as_deref() == Some(NO_PERMISSION) => {
                tracing::debug!(%addr, "INFO is not permitted; not checking the server's version");
                return Ok(());
            }
            Err(e) => {
                return Err(Error::redis(
                    format!("reading the version of the server at {addr}"),
                    e,
                ));
            }
        };
        // Valkey reports the Redis version it is compatible with here too.
        match info
            .lines()
            .find_map(|line| line.strip_prefix("redis_version:"))
        {
            Some(version) if !is_supported_version(version) => Err(Error::UnsupportedServer {
                addr,
                version: version.trim().to_owned(),
                required: "7.0",
            }),
            _ => Ok(()),
        }
    }
}

impl RedisBroker {
    /// Names the type found at the key of an [`Error::WrongType`], which the server's
    /// reply does not say.
    async fn name_type(&self, error: Error) -> Error {
        match error {
            Error::WrongType { stream, .. } => self.wrong_type(&stream).await,
            other => other,
        }
    }

    /// The error for a read of several streams that one holds another type in: names the
    /// first key that is neither a stream nor missing, or is the read's own error when
    /// every key is a stream again by now.
    async fn find_wrong_type(
        &self,
        streams: &[Arc<str>],
        error: redis::RedisError,
        action: impl FnOnce() -> String,
    ) -> Error {
        let mut pipe = redis::pipe();
        for stream in streams {
            pipe.cmd("TYPE").arg(stream.as_ref());
        }
        let types: Vec<String> = match pipe.query_async(&mut self.commands()).await {
            Ok(types) => types,
            Err(_) => return Error::redis(action(), error),
        };
        streams
            .iter()
            .zip(types)
            .find(|(_, actual)| actual != TYPE_STREAM && actual != TYPE_NONE)
            .map_or_else(
                || Error::redis(action(), error),
                |(stream, actual)| Error::WrongType {
                    stream: stream.to_string(),
                    actual,
                },
            )
    }

    /// The error for a key of the wrong type, naming the type found there.
    async fn wrong_type(&self, stream: &str) -> Error {
        let actual: String = redis::cmd("TYPE")
            .arg(stream)
            .query_async(&mut self.commands())
            .await
            .unwrap_or_else(|_| "value of another type".to_owned());
        Error::WrongType {
            stream: stream.to_owned(),
            actual,
        }
    }
}

/// Turns a WRONGTYPE reply into [`Error::WrongType`]; everything else into [`Error::Redis`].
fn classify(stream: &str, error: redis::RedisError, action: impl FnOnce() -> String) -> Error {
    if server_code(&error).as_deref() == Some(WRONG_TYPE) {
        return Error::WrongType {
            stream: stream.to_owned(),
            actual: "value of another type".to_owned(),
        };
    }
    Error::redis(action(), error)
}

fn unexpected(action: String, what: &str, reply: &Value) -> Error {
    Error::UnexpectedReply {
        action,
        detail: format!("{what}: {reply:?}"),
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}
