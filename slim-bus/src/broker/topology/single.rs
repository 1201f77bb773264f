//! One server (or whatever answers at one address, e.g. a primary behind a failover
//! proxy): every key is served there.

use std::sync::Arc;
use std::time::Duration;

use redis::Client;
use tokio_rustls::TlsConnector;

use crate::broker::redis::commands::{CommandConnection, TimedConnection};
use crate::broker::transport::Endpoint;

/// The server every command goes to, and the connection that carries every command but
/// reads of new entries and publishes (which open RESP connections to [`endpoint`]).
///
/// [`endpoint`]: SingleServer::endpoint
pub(crate) struct SingleServer {
    endpoint: Endpoint,
    /// Acks, claims, scripts and group management. Never blocks on the server, so its
    /// response timeout can stay short.
    commands: Arc<CommandConnection>,
}

impl SingleServer {
    /// The server `client` names, its command connection opening in the background.
    pub(crate) fn new(
        client: Client,
        tls: Option<TlsConnector>,
        command_timeout: Duration,
    ) -> Self {
        let endpoint = Endpoint {
            info: client.get_connection_info().clone(),
            tls,
        };
        SingleServer {
            endpoint,
            commands: CommandConnection::open_in_background(client, command_timeout),
        }
    }

    /// Where the read and publish connections go.
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// A handle on the command connection.
    pub(crate) fn commands(&self) -> TimedConnection {
        self.commands.handle()
    }
}
