//! The handle of a running listener.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
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

/// Where a bus's listener is: none, starting (`listen()` waits for Redis, takes the lease,
/// creates the groups), or listening. Only one listener runs at a time, and `health()`
/// reports `listening` only from a successful `listen()`.
#[derive(Debug, Default)]
pub(crate) struct ListenerPhase(AtomicU8);

const NOT_LISTENING: u8 = 0;
const STARTING: u8 = 1;
const LISTENING: u8 = 2;

impl ListenerPhase {
    /// Claims the bus for a new listener; `None` when one is starting or listening
    /// already. The listener's phase goes back to none when the guard is dropped.
    pub(crate) fn start(self: &Arc<Self>) -> Option<PhaseGuard> {
        self.0
            .compare_exchange(NOT_LISTENING, STARTING, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| PhaseGuard(self.clone()))
    }

    /// Whether a `listen()` succeeded and its listener has not stopped.
    pub(crate) fn is_listening(&self) -> bool {
        self.0.load(Ordering::Acquire) == LISTENING
    }
}

/// Holds a listener's phase; back to none when its run ends, however it ends (a failed
/// `listen()` included).
#[derive(Debug)]
pub(crate) struct PhaseGuard(Arc<ListenerPhase>);

impl PhaseGuard {
    /// `listen()` succeeded.
    pub(crate) fn listening(&self) {
        self.0.0.store(LISTENING, Ordering::Release);
    }
}

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        self.0.0.store(NOT_LISTENING, Ordering::Release);
    }
}
