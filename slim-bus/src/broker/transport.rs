//! How bytes get to a server: TCP, TLS over TCP, or a Unix socket, each opened by a
//! deadline. The RESP connections of [`super::resp`] run over any of them.

use std::io;
use std::pin::Pin;

use redis::{ConnectionAddr, ConnectionInfo};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

/// A byte stream to the server: TCP, TLS over TCP, or a Unix socket.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Transport for T {}

/// Where the connections go and how: the server's address and credentials, and for a
/// `rediss://` server the TLS connector.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub(crate) info: ConnectionInfo,
    pub(crate) tls: Option<TlsConnector>,
}

async fn tcp(host: &str, port: u16, deadline: Instant) -> io::Result<tokio::net::TcpStream> {
    let stream = within(deadline, tokio::net::TcpStream::connect((host, port))).await??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

pub(crate) async fn within<T>(deadline: Instant, future: impl Future<Output = T>) -> io::Result<T> {
    tokio::time::timeout_at(deadline, future)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "redis did not answer in time"))
}

/// Why a transport could not be opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    Io(io::Error),
    /// The address is of a kind the bus does not connect to this way.
    Unsupported(String),
}

impl From<io::Error> for OpenError {
    fn from(error: io::Error) -> Self {
        OpenError::Io(error)
    }
}

/// Opens the byte stream to `endpoint`'s server by `deadline`: TCP (no Nagle delay), TLS
/// over TCP with a verified certificate, or a Unix socket.
pub(crate) async fn open(
    endpoint: &Endpoint,
    deadline: Instant,
) -> Result<Pin<Box<dyn Transport>>, OpenError> {
    let transport: Pin<Box<dyn Transport>> = match endpoint.info.addr() {
        ConnectionAddr::Tcp(host, port) => Box::pin(tcp(host, *port, deadline).await?),
        ConnectionAddr::TcpTls {
            host,
            port,
            insecure: false,
            ..
        } => {
            let Some(connector) = &endpoint.tls else {
                return Err(OpenError::Unsupported(
                    "a TLS address without TLS settings".to_owned(),
                ));
            };
            let name = rustls::pki_types::ServerName::try_from(host.as_str())
                .map_err(|e| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("`{host}` is not a name TLS can verify: {e}"),
                    )
                })?
                .to_owned();
            let stream = tcp(host, *port, deadline).await?;
            Box::pin(within(deadline, connector.connect(name, stream)).await??)
        }
        #[cfg(unix)]
        ConnectionAddr::Unix(path) => {
            Box::pin(within(deadline, tokio::net::UnixStream::connect(path)).await??)
        }
        other => {
            return Err(OpenError::Unsupported(format!(
                "slim-bus speaks to Redis over TCP, TLS with a verified certificate or a Unix socket, not {other}"
            )));
        }
    };
    Ok(transport)
}
