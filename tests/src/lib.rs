//! Test harness for slim-bus: throwaway `redis-server` processes and helpers that keep every
//! awaited test step bounded.
//!
//! Each test starts its own [`RedisServer`] on a free port (or a whole [`RedisCluster`] of
//! them), so tests run in parallel and never touch a shared Redis (in particular not the
//! one on `127.0.0.1:6379`).
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use std::time::Duration;
//! use slim_bus_tests::{RedisServer, within};
//!
//! slim_bus_tests::init_tracing();
//! let server = within("redis-server start", Duration::from_secs(15), RedisServer::start()).await?;
//! let mut conn = within("connect", Duration::from_secs(5), server.connection()).await;
//! # Ok(())
//! # }
//! ```

pub mod asyncapi_service;
mod cluster;
mod proxy;
mod server;
mod tls;

use std::future::Future;
use std::time::Duration;

pub use cluster::{ClusterNode, RedisCluster, find_cli};
pub use proxy::Proxy;
pub use server::{RedisServer, RedisServerBuilder};
pub use tls::TestCertificates;

/// Installs a `tracing` fmt subscriber that writes through the test harness (so output is
/// captured per test) with the filter from `RUST_LOG`, `warn` by default.
///
/// Safe to call from every test: only the first call installs anything.
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // Another test (or the binary) already installed one: keep it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Awaits `fut`, failing the test if it takes longer than `dur`.
///
/// # Panics
///
/// With "timed out after {dur:?} waiting for {what}" when `fut` does not finish in time.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(server: &slim_bus_tests::RedisServer) {
/// use std::time::Duration;
/// let mut conn = slim_bus_tests::within("connect", Duration::from_secs(5), server.connection()).await;
/// # }
/// ```
pub async fn within<T>(what: &str, dur: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(dur, fut).await {
        Ok(output) => output,
        Err(_) => panic!("timed out after {dur:?} waiting for {what}"),
    }
}
