//! Ctrl-C for the commands that run until it (`tail`, `status --watch`): listened for once,
//! from the start, so that one pressed while the command waits on Redis or writes its
//! output is not missed.

use std::future::Future;
use std::pin::Pin;

use futures_util::FutureExt as _;

use crate::exit::Failure;

/// A Ctrl-C listener: every Ctrl-C from its creation on is seen by [`pressed`](Self::pressed),
/// whenever that is polled.
pub(crate) struct CtrlC {
    /// The one `ctrl_c()` future of the command; `None` once it resolved.
    pending: Option<Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>>,
}

impl CtrlC {
    /// Starts listening. The first poll of `ctrl_c()` installs the handler (until then a
    /// Ctrl-C ends the process), so it is polled here once rather than in a later `select!`.
    pub(crate) fn listen() -> Result<Self, Failure> {
        let mut pending = Box::pin(tokio::signal::ctrl_c());
        match (&mut pending).now_or_never() {
            None => Ok(CtrlC {
                pending: Some(pending),
            }),
            Some(Ok(())) => Ok(CtrlC { pending: None }),
            Some(Err(error)) => Err(Failure::Error(format!("cannot listen for Ctrl-C: {error}"))),
        }
    }

    /// Resolves once Ctrl-C was pressed since [`listen`](Self::listen), at once when it was
    /// pressed while nothing polled this.
    ///
    /// # Cancellation safety
    ///
    /// Cancel-safe: a Ctrl-C is not lost when this is dropped in a `select!`.
    pub(crate) async fn pressed(&mut self) {
        if let Some(pending) = &mut self.pending {
            // Once installed the handler cannot fail: an error is no Ctrl-C to wait for.
            let _ = pending.await;
            self.pending = None;
        }
    }
}
