//! The handle of a running listener.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// A running listener, returned by [`EventBus::listen`](crate::EventBus::listen).
///
/// Awaiting it waits until the listener stops: `Ok(())` after a shutdown, or the error
/// that stopped it (only errors that cannot heal do; connection trouble is retried).
/// [`shutdown`](Self::shutdown) stops it gracefully. Dropping it starts the same graceful
/// shutdown in the background without waiting for it.
#[must_use = "dropping a listener shuts it down"]
#[derive(Debug)]
pub struct Listener {
    task: JoinHandle<Result<()>>,
    shutdown: CancellationToken,
}

impl Listener {
    pub(crate) fn new(task: JoinHandle<Result<()>>, shutdown: CancellationToken) -> Self {
        Listener { task, shutdown }
    }

    /// Stops reading, waits for running handlers up to the grace period, flushes their
    /// acknowledgements, and returns once the listener has stopped. Entries whose handlers
    /// did not finish stay pending and are delivered again on the next start.
    ///
    /// # Errors
    ///
    /// The error that had stopped the listener before, if any.
    pub async fn shutdown(self) -> Result<()> {
        self.shutdown.cancel();
        self.await
    }

    /// A handle that starts the shutdown from elsewhere (a signal handler, an HTTP
    /// endpoint) while this listener is awaited.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }
}

impl Future for Listener {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.task)
            .poll(cx)
            .map(|joined| match joined {
                Ok(result) => result,
                Err(error) => Err(Error::Internal {
                    detail: format!("the listener task failed: {error}"),
                }),
            })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Starts a listener's graceful shutdown; see [`Listener::shutdown_handle`].
#[derive(Debug, Clone)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    /// Starts the shutdown; await the [`Listener`] to know when it is done.
    pub fn shutdown(&self) {
        self.0.cancel();
    }
}
