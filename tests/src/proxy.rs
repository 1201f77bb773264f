//! A TCP proxy on loopback that forwards to a server and can cut every connection on command,
//! for tests of what a client does when the network drops its connections.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A TCP proxy on `127.0.0.1` in front of one upstream address.
///
/// Every accepted connection is forwarded to the upstream over a connection of its own.
/// [`drop_connections`](Self::drop_connections) resets all of them at once (both sides see
/// a TCP reset, as when a NAT or load balancer forgets them); connections made afterwards
/// are forwarded normally. [`set_upstream`](Self::set_upstream) sends the connections made
/// from then on to another server, as a DNS name that moves after a failover does, and
/// leaves those open where they are. A client that cannot reach the upstream through the
/// proxy sees its connection accepted and then reset.
///
/// Dropping the proxy stops accepting and resets every connection.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(server: &slim_bus_tests::RedisServer) -> std::io::Result<()> {
/// use slim_bus_tests::Proxy;
///
/// let proxy = Proxy::start(([127, 0, 0, 1], server.port())).await?;
/// let client = redis::Client::open(proxy.url()).unwrap();
/// // ... use the client, then:
/// proxy.drop_connections();
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    /// Bumped by every `drop_connections`; each connection task ends when it changes, or
    /// when the sender is dropped with the proxy.
    generation: watch::Sender<u64>,
    counters: Arc<Counters>,
    upstream: Arc<Mutex<SocketAddr>>,
    accept: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicUsize,
}

impl Proxy {
    /// Listens on a free port of `127.0.0.1` and forwards every connection to `upstream`.
    ///
    /// # Errors
    ///
    /// When no port can be bound.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime.
    pub async fn start(upstream: impl Into<SocketAddr>) -> io::Result<Proxy> {
        let upstream = Arc::new(Mutex::new(upstream.into()));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (generation, _) = watch::channel(0);
        let counters = Arc::new(Counters::default());
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream.clone(),
            generation.clone(),
            counters.clone(),
        ));
        Ok(Proxy {
            addr,
            generation,
            counters,
            upstream,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `redis://127.0.0.1:PORT/` of the proxy.
    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Resets every connection open right now, on both sides; returns how many there were.
    /// The connections close in the background, a moment after this returns.
    pub fn drop_connections(&self) -> usize {
        let open = self.counters.open.load(Ordering::Acquire);
        self.generation.send_modify(|generation| *generation += 1);
        open
    }

    /// Forwards the connections accepted from now on to `upstream`; those open stay with
    /// the server they reach.
    pub fn set_upstream(&self, upstream: impl Into<SocketAddr>) {
        *self
            .upstream
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = upstream.into();
    }

    /// How many connections the proxy has accepted so far: a client that reconnects shows
    /// up here once per attempt.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Acquire)
    }

    /// How many connections are being forwarded right now.
    pub fn open_connections(&self) -> usize {
        self.counters.open.load(Ordering::Acquire)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Dropping `generation` with `self` ends every connection task.
        self.accept.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: Arc<Mutex<SocketAddr>>,
    generation: watch::Sender<u64>,
    counters: Arc<Counters>,
) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            // Out of file descriptors and the like: the next accept may work.
            Err(_) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        counters.accepted.fetch_add(1, Ordering::AcqRel);
        // Subscribing before the task starts means a drop ordered from now on reaches it.
        let dropped = generation.subscribe();
        let upstream = *upstream
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tokio::spawn(forward(client, upstream, dropped, counters.clone()));
    }
}

async fn forward(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut dropped: watch::Receiver<u64>,
    counters: Arc<Counters>,
) {
    // Reset rather than close politely: the peer gets ECONNRESET, bytes in flight are lost.
    let _ = client.set_zero_linger();
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = server.set_zero_linger();
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    counters.open.fetch_add(1, Ordering::AcqRel);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        // A new generation, or the proxy is gone.
        _ = dropped.changed() => {}
    }
    counters.open.fetch_sub(1, Ordering::AcqRel);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::within;

    const STEP: Duration = Duration::from_secs(5);

    /// An upstream that echoes whatever it reads, on every connection.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = socket.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, message: &[u8]) -> io::Result<Vec<u8>> {
        stream.write_all(message).await?;
        let mut reply = vec![0; message.len()];
        stream.read_exact(&mut reply).await?;
        Ok(reply)
    }

    #[tokio::test]
    async fn forwards_both_ways() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let mut stream = within("connect", STEP, TcpStream::connect(proxy.addr()))
            .await
            .unwrap();
        let reply = within("echo", STEP, round_trip(&mut stream, b"ping"))
            .await
            .unwrap();
        assert_eq!(reply, b"ping");
        assert_eq!(proxy.accepted(), 1);
        assert_eq!(
            proxy.url(),
            format!("redis://127.0.0.1:{}/", proxy.addr().port())
        );
    }

    #[tokio::test]
    async fn drop_connections_resets_open_ones_and_new_ones_work() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let mut first = TcpStream::connect(proxy.addr()).await.unwrap();
        within("echo", STEP, round_trip(&mut first, b"a"))
            .await
            .unwrap();
        assert_eq!(proxy.drop_connections(), 1);
        // The reset arrives asynchronously: reading sees it as an error or an end of stream.
        let mut buf = [0; 1];
        let read = within("the reset", STEP, first.read(&mut buf)).await;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        within("the connection count to drop", STEP, async {
            while proxy.open_connections() > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;

        let mut second = TcpStream::connect(proxy.addr()).await.unwrap();
        let reply = within("echo after the drop", STEP, round_trip(&mut second, b"b"))
            .await
            .unwrap();
        assert_eq!(reply, b"b");
        assert_eq!(proxy.accepted(), 2);
    }

    #[tokio::test]
    async fn an_unreachable_upstream_resets_the_client() {
        // Bind and drop to get a port nobody listens on.
        let closed = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap()
            .local_addr()
            .unwrap();
        let proxy = Proxy::start(closed).await.unwrap();
        let mut stream = TcpStream::connect(proxy.addr()).await.unwrap();
        let mut buf = [0; 1];
        let read = within("the reset", STEP, stream.read(&mut buf)).await;
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[tokio::test]
    async fn redis_commands_pass_through() {
        let server = within("redis-server start", STEP * 3, crate::RedisServer::start())
            .await
            .unwrap();
        let proxy = Proxy::start((Ipv4Addr::LOCALHOST, server.port()))
            .await
            .unwrap();
        let client = redis::Client::open(proxy.url()).unwrap();
        let mut conn = within("connect", STEP, client.get_multiplexed_async_connection())
            .await
            .unwrap();
        let pong: String = within("PING", STEP, redis::cmd("PING").query_async(&mut conn))
            .await
            .unwrap();
        assert_eq!(pong, "PONG");
    }
}
