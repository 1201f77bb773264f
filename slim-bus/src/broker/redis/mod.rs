//! The Redis backend: reads of new entries and publishes over connections of their own
//! (see [`super::resp`]), everything else over a managed redis-rs connection. By role:
//! [`publish`] (pipelined `XADD`s), [`new_entries`] and [`read`] (consumer groups), [`dead_letters`],
//! [`inspect`] and [`leases`]; the Lua scripts they run are in [`scripts`].

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::{Client, Value};

use self::connections::ConnectionPool;
use self::new_entries::ReaderState;
use self::publish::Publishers;
use self::scripts::Scripts;
use super::topology::{Cluster, Commands, SingleServer, Topology};
use super::{Broker, NO_PERMISSION, TYPE_NONE, TYPE_STREAM, WRONG_TYPE, is_supported_version};
use crate::error::{Error, Result, server_code};
use crate::tls::Tls;

pub(crate) mod commands;
mod connections;
mod dead_letters;
mod inspect;
mod leases;
mod new_entries;
mod permissions;
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
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub(crate) struct RedisBroker {
    /// The server or cluster, and the connection for acks, claims, scripts and group
    /// management.
    topology: Topology,
    /// `XREADGROUP ... BLOCK`, which holds its connection for the whole block time, so it
    /// gets a connection of its own (one per hash slot read on a cluster), opened on first
    /// use and again after it broke.
    read_connections: ConnectionPool,
    /// `XREAD ... BLOCK` of [`Inspection::read_after`](crate::broker::Inspection::read_after),
    /// for the same reason.
    tail_connections: ConnectionPool,
    command_timeout: Duration,
    scripts: Scripts,
    /// Whether reads block, and whether a wake came while none did.
    reader: Mutex<ReaderState>,
    /// An error of one slot's read that came with entries from another: returned by the
    /// next read.
    deferred_read_error: Mutex<Option<Error>>,
    /// Publishes go to a task per server (per master on a cluster) that sends them in
    /// pipelines.
    publishers: Publishers,
}

/// Whether the bus can reach a server at `addr` with the TLS settings it has.
fn check_address(addr: &redis::ConnectionAddr, has_tls: bool, setting: &'static str) -> Result<()> {
    let supported = match addr {
        redis::ConnectionAddr::Tcp(..) => true,
        redis::ConnectionAddr::TcpTls { insecure, .. } => !insecure && has_tls,
        other => is_unix_socket(other),
    };
    if supported {
        return Ok(());
    }
    Err(Error::config(
        setting,
        format!(
            "{addr} is not supported: use redis:// (TCP), rediss:// (TLS, without #insecure) or a Unix socket"
        ),
    ))
}

impl RedisBroker {
    /// A broker for the server `client` names, connecting in the background: this
    /// fails only for an address the bus cannot use, never because Redis is down.
    pub(crate) fn new(client: Client, tls: Option<Tls>, command_timeout: Duration) -> Result<Self> {
        check_address(client.get_connection_info().addr(), tls.is_some(), "url")?;
        let topology = SingleServer::new(client, tls.map(|tls| tls.connector), command_timeout);
        let publishers = Publishers::one(topology.endpoint().clone(), command_timeout);
        Ok(Self::with_topology(
            Topology::Single(topology),
            publishers,
            command_timeout,
        ))
    }

    /// A broker for the Redis Cluster behind `seeds`, connecting in the background.
    pub(crate) fn cluster(
        seeds: Vec<redis::ConnectionInfo>,
        tls: Option<Tls>,
        command_timeout: Duration,
    ) -> Result<Self> {
        for seed in &seeds {
            if matches!(seed.addr(), redis::ConnectionAddr::Unix(..)) {
                return Err(Error::config(
                    "cluster_nodes",
                    format!(
                        "{} is a Unix socket: cluster nodes are TCP addresses",
                        seed.addr()
                    ),
                ));
            }
            check_address(seed.addr(), tls.is_some(), "cluster_nodes")?;
        }
        let cluster = Cluster::new(
            seeds,
            tls.map(|tls| (tls.connector, tls.certificates)),
            command_timeout,
        )?;
        Ok(Self::with_topology(
            Topology::Cluster(cluster),
            Publishers::per_master(),
            command_timeout,
        ))
    }

    fn with_topology(
        topology: Topology,
        publishers: Publishers,
        command_timeout: Duration,
    ) -> Self {
        RedisBroker {
            topology,
            read_connections: ConnectionPool::default(),
            tail_connections: ConnectionPool::default(),
            command_timeout,
            scripts: Scripts::load(),
            reader: Mutex::new(ReaderState::default()),
            deferred_read_error: Mutex::new(None),
            publishers,
        }
    }

    fn commands(&self) -> Commands {
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

    async fn check_permissions(
        &self,
        stream: &str,
        dead_letters: &str,
        group: &str,
        consumer: &str,
    ) -> Result<()> {
        self.check_permissions_of(stream, dead_letters, group, consumer)
            .await
    }

    async fn check_version(&self) -> Result<()> {
        let addr = self.topology.describe();
        let info: Value = match redis::cmd("INFO")
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
            // No connection (refused credentials, a failed TLS handshake, a server that
            // does not answer): the cause names the server and what failed.
            Err(e) if is_connection_failure(&e) => {
                return Err(Error::redis("connecting to the server", e));
            }
            Err(e) => {
                return Err(Error::redis(
                    format!("reading the version of the server at {addr}"),
                    e,
                ));
            }
        };
        // A cluster answers for each of its nodes, by address.
        let infos: Vec<(String, Value)> = match info {
            Value::Map(nodes) => nodes
                .into_iter()
                .map(|(node, info)| {
                    let node =
                        redis::from_redis_value::<String>(node).unwrap_or_else(|_| addr.clone());
                    (node, info)
                })
                .collect(),
            info => vec![(addr, info)],
        };
        for (addr, info) in infos {
            let info: String = redis::from_redis_value(info).map_err(|e| {
                Error::redis(
                    format!("reading the version of the server at {addr}"),
                    e.into(),
                )
            })?;
            // Valkey reports the Redis version it is compatible with here too.
            if let Some(version) = info
                .lines()
                .find_map(|line| line.strip_prefix("redis_version:"))
                && !is_supported_version(version)
            {
                return Err(Error::UnsupportedServer {
                    addr,
                    version: version.trim().to_owned(),
                    required: "7.0",
                });
            }
        }
        Ok(())
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
        let keys: Vec<&str> = streams.iter().map(|stream| &**stream).collect();
        self.find_wrong_key(&keys, Error::redis(action(), error))
            .await
    }

    /// The error for a command or script over several stream keys that answered
    /// `WRONGTYPE`: the first of `streams` that holds neither a stream nor nothing, so the
    /// error names the key that is wrong (a dead-letter stream, say) rather than the stream
    /// the command was about; `fallback` when none does by now.
    async fn find_wrong_key(&self, streams: &[&str], fallback: Error) -> Error {
        // One TYPE at a time: the keys of a cluster need not share a slot here.
        for &key in streams {
            let Ok(actual) = redis::cmd("TYPE")
                .arg(key)
                .query_async::<String>(&mut self.commands())
                .await
            else {
                break;
            };
            if actual != TYPE_STREAM && actual != TYPE_NONE {
                return Error::WrongType {
                    stream: key.to_owned(),
                    actual,
                };
            }
        }
        fallback
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

/// Whether `error` says no connection could be opened, rather than that a command failed.
fn is_connection_failure(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::AuthenticationFailed
        || error.kind() == redis::ErrorKind::Io && error.to_string().contains("not connected to ")
}
