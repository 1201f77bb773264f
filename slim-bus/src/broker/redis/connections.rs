//! The bus's own RESP connections for blocking reads, one per hash slot on a cluster (one
//! on a single server): taken out for a read and put back after a whole reply, so that a
//! read dropped mid-way (at shutdown) closes its socket, and with it the server's side of
//! the blocked read.

use std::collections::HashMap;

use tokio::time::Instant;

use super::{CONNECT_TIMEOUT, RedisBroker};
use crate::broker::resp::{RespConnection, RespError, is_failover_line};
use crate::broker::topology::{ConnectionKey, NodeAddr};
use crate::error::{Error, Result};

/// A connection to the node that served its key when it was opened.
pub(super) struct NodeConnection {
    pub(super) node: Option<NodeAddr>,
    pub(super) connection: RespConnection,
}

/// Idle connections by key.
#[derive(Default)]
pub(super) struct ConnectionPool {
    idle: tokio::sync::Mutex<HashMap<ConnectionKey, NodeConnection>>,
}

impl ConnectionPool {
    /// An idle connection to the node serving `key`, else a new one (with its client id,
    /// for `CLIENT UNBLOCK`, when `with_id`).
    pub(super) async fn take(
        &self,
        broker: &RedisBroker,
        key: ConnectionKey,
        with_id: bool,
    ) -> Result<NodeConnection> {
        let node = broker.topology.node(key).await?;
        let idle = self.idle.lock().await.remove(&key);
        if let Some(idle) = idle
            && idle.node == node
            && !idle.connection.is_dirty()
        {
            return Ok(idle);
        }
        let endpoint = broker.topology.endpoint(node.as_ref());
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let connection = if with_id {
            RespConnection::connect_with_id(&endpoint, deadline).await
        } else {
            RespConnection::connect(&endpoint, deadline).await
        };
        match connection {
            Ok(connection) => Ok(NodeConnection { node, connection }),
            Err(error) => {
                broker.topology.connection_lost();
                let addr = endpoint.info.addr().to_string();
                Err(Error::redis(
                    format!("connecting to {addr}"),
                    error.into_redis(),
                ))
            }
        }
    }

    /// Puts a connection back after its request, unless `outcome` leaves it unusable: an
    /// error reply leaves it usable, unless it says the server behind it cannot serve now
    /// (a new connection may reach one that can).
    pub(super) async fn put_back<T>(
        &self,
        broker: &RedisBroker,
        key: ConnectionKey,
        connection: NodeConnection,
        outcome: &std::result::Result<T, RespError>,
    ) {
        let reusable = match outcome {
            Ok(_) => true,
            Err(RespError::Server(line)) => !is_failover_line(line),
            Err(_) => false,
        };
        if reusable {
            self.idle.lock().await.insert(key, connection);
        } else {
            broker.topology.connection_lost();
        }
    }
}
