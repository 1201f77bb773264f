//! Handlers: the `StreamHandler` trait, services of several handlers, and the type-erased
//! form the consumer runs.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::batch::{BatchHandler, ErasedBatchHandler, TypedBatch};
use crate::broker::EntryFields;
use crate::codec::{self, CodecError};
use crate::context::Context;
use crate::emit::Emit;
use crate::error::HandlerError;
use crate::event::Event;
use crate::middleware::{AnyEvent, HandlerService, Layered};
use crate::partition::Declared;

/// Handles the entries of one stream, decoded into [`Self::Event`](StreamHandler::Event).
///
/// The handler runs once per delivery, concurrently with other deliveries, under the bus's
/// handler timeout. Returning `Ok(())` acknowledges the entry; an error, a timeout or a
/// panic leaves it pending so that it is delivered again.
///
/// The bus calls [`handle_and_emit`](Self::handle_and_emit), which calls
/// [`handle`](Self::handle) unless a handler that returns events to publish implements it.
///
/// # Examples
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use slim_bus::{Context, HandlerError, StreamHandler};
///
/// #[derive(Debug, Serialize, Deserialize)]
/// struct UserCreated { user_id: String }
///
/// impl slim_bus::Event for UserCreated {
///     const STREAM: Option<&'static str> = Some("user.created");
/// }
///
/// struct SendWelcomeMail;
///
/// #[slim_bus::async_trait]
/// impl StreamHandler for SendWelcomeMail {
///     type Event = UserCreated;
///
///     async fn handle(&self, event: UserCreated, ctx: Context) -> Result<(), HandlerError> {
///         println!("welcome {} (delivery {})", event.user_id, ctx.delivery_count());
///         Ok(())
///     }
/// }
/// ```
#[async_trait::async_trait]
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a stream handler",
    label = "not a handler",
    note = "implement `slim_bus::StreamHandler` for it, or put `#[slim_bus::stream]` on an async fn taking the event (and optionally a `Context`)",
    note = "a `#[slim_bus::handlers]` service struct registers all its handlers at once with `.service(Arc::new(...))`",
    note = "a batch handler (`#[slim_bus::stream(batch = N)]`, `slim_bus::BatchHandler`) registers with `.batch_handler(...)`"
)]
pub trait StreamHandler: Send + Sync + 'static {
    /// The event type entries are decoded into.
    type Event: Event;

    /// Handles one delivery of one entry.
    async fn handle(&self, event: Self::Event, ctx: Context) -> Result<(), HandlerError>;

    /// Handles one delivery of one entry and returns events to publish before the entry
    /// is acknowledged (see [`Emit`], and its "At least once"). This is what the bus calls;
    /// by default it runs [`handle`](Self::handle) and publishes nothing.
    ///
    /// A plain method returning a [`HandlerCall`], rather than an `async fn`, so that the
    /// default passes `handle`'s future on without boxing it again: a handler that
    /// returns events wraps its `async` block in [`HandlerCall::new`], and implements
    /// `handle` as this without the events, for code that calls it directly.
    ///
    /// # Examples
    ///
    /// ```
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
    /// # #[event(stream = "order.placed")]
    /// # struct OrderPlaced { order_id: String }
    /// # #[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
    /// # #[event(stream = "invoice.requested")]
    /// # struct InvoiceRequested { order_id: String }
    /// use slim_bus::{Context, Emit, HandlerCall, HandlerError, StreamHandler};
    ///
    /// struct RequestInvoice;
    ///
    /// #[slim_bus::async_trait]
    /// impl StreamHandler for RequestInvoice {
    ///     type Event = OrderPlaced;
    ///
    ///     async fn handle(&self, order: OrderPlaced, ctx: Context) -> Result<(), HandlerError> {
    ///         self.handle_and_emit(order, ctx).await.map(drop)
    ///     }
    ///
    ///     fn handle_and_emit(&self, order: OrderPlaced, _: Context) -> HandlerCall<'_> {
    ///         HandlerCall::new(async move {
    ///             let mut emit = Emit::new();
    ///             emit.push(&InvoiceRequested { order_id: order.order_id })?;
    ///             Ok(emit)
    ///         })
    ///     }
    /// }
    /// ```
    fn handle_and_emit(&self, event: Self::Event, ctx: Context) -> HandlerCall<'_> {
        HandlerCall::handled(self.handle(event, ctx))
    }

    /// This handler inside `layer`, a [`tower::Layer`]: its service gets a
    /// [`HandlerRequest`](crate::HandlerRequest) with the decoded event and the context of
    /// each call, and may time, retry, limit, enrich or short-circuit it (an error is a
    /// failed attempt; `Ok` without calling the inner service acknowledges the entry).
    /// Register the result like the handler itself; it keeps the handler's stream and
    /// settings. Layers for every handler of a bus go on the builder,
    /// [`EventBusBuilder::layer`](crate::EventBusBuilder::layer), outside this one.
    ///
    /// The service is cloned for each call, then readied and called (as tower's
    /// `oneshot` does), so a clone must share what the calls share: tower's
    /// `ConcurrencyLimit` does; a service that is not `Clone`, like `RateLimit`, goes
    /// behind a `Buffer`. See [`EventBusBuilder::layer`](crate::EventBusBuilder::layer)
    /// for how a service that is not ready meets the bus's limits.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
    /// # #[event(stream = "user.created")]
    /// # struct UserCreated { user_id: String }
    /// use slim_bus::StreamHandler;
    /// use tower::limit::ConcurrencyLimitLayer;
    ///
    /// #[slim_bus::stream]
    /// async fn send_welcome_mail(user: UserCreated) -> anyhow::Result<()> {
    ///     Ok(())
    /// }
    ///
    /// # async fn run() -> slim_bus::Result<()> {
    /// let bus = slim_bus::EventBus::builder()
    ///     .consumer_group("mailer")
    ///     // At most two mails at once, whatever the bus's `max_concurrent`.
    ///     .handler(send_welcome_mail.layer(ConcurrencyLimitLayer::new(2)))
    ///     .build()
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    fn layer<L>(self, layer: L) -> Layered<Self, L::Service>
    where
        Self: Sized,
        L: tower::Layer<HandlerService<Self>>,
        L::Service: tower::Service<crate::HandlerRequest<Self::Event>, Response = Emit>
            + Clone
            + Send
            + Sync
            + 'static,
        <L::Service as tower::Service<crate::HandlerRequest<Self::Event>>>::Error:
            Into<HandlerError>,
        <L::Service as tower::Service<crate::HandlerRequest<Self::Event>>>::Future: Send + 'static,
    {
        Layered::new(self, layer)
    }

    /// The stream this handler reads, when it is not the event type's own stream.
    ///
    /// [`EventBusBuilder::handler_on`](crate::EventBusBuilder::handler_on) overrides both.
    fn stream(&self) -> Option<&str> {
        None
    }

    /// How many failed deliveries this handler's entries get before they are
    /// dead-lettered, when not the bus's `max_deliveries`.
    fn max_deliveries(&self) -> Option<u64> {
        None
    }

    /// How long one call of this handler may take, when not the bus's `handler_timeout`.
    /// Like the bus's, it may be longer than `claim_min_idle`.
    fn handler_timeout(&self) -> Option<Duration> {
        None
    }
}

/// A value that registers several handlers at once: a service struct whose methods
/// handle streams, as generated by `#[slim_bus::handlers]`.
///
/// The service is shared by its handlers through the `Arc`, not cloned.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a stream service",
    label = "not a service of handlers",
    note = "put `#[slim_bus::handlers]` on its impl block and `#[stream]` on each handler method",
    note = "a single handler registers with `.handler(...)`"
)]
pub trait StreamService: Send + Sync + 'static {
    /// Adds this service's handlers.
    fn register(self: Arc<Self>, handlers: &mut Handlers);
}

/// The handlers of a bus under construction; a [`StreamService`] adds to it.
#[derive(Default)]
pub struct Handlers {
    pub(crate) registrations: Vec<Registration>,
}

impl Handlers {
    /// Registers `handler` on its stream ([`StreamHandler::stream`], else the event's).
    pub fn handler<H: StreamHandler>(&mut self, handler: H) -> &mut Self {
        let stream = handler
            .stream()
            .or(<H::Event as Event>::STREAM)
            .map(str::to_owned);
        self.push(stream, handler)
    }

    /// Registers `handler` on `stream`, whatever the handler or its event type name.
    pub fn handler_on<H: StreamHandler>(
        &mut self,
        stream: impl Into<String>,
        handler: H,
    ) -> &mut Self {
        self.push(Some(stream.into()), handler)
    }

    /// Registers the batch handler `handler` on its stream ([`BatchHandler::stream`],
    /// else the event's).
    pub fn batch_handler<H: BatchHandler>(&mut self, handler: H) -> &mut Self {
        let stream = handler
            .stream()
            .or(<H::Event as Event>::STREAM)
            .map(str::to_owned);
        self.push_batch(stream, handler)
    }

    /// Registers the batch handler `handler` on `stream`.
    pub fn batch_handler_on<H: BatchHandler>(
        &mut self,
        stream: impl Into<String>,
        handler: H,
    ) -> &mut Self {
        self.push_batch(Some(stream.into()), handler)
    }

    fn push<H: StreamHandler>(&mut self, stream: Option<String>, handler: H) -> &mut Self {
        self.registrations.push(Registration {
            stream,
            handler_name: std::any::type_name::<H>(),
            event_stream: <H::Event as Event>::STREAM,
            declared: Declared::of::<H::Event>(),
            handler: RegisteredHandler::One(Arc::new(Typed(handler))),
        });
        self
    }

    fn push_batch<H: BatchHandler>(&mut self, stream: Option<String>, handler: H) -> &mut Self {
        self.registrations.push(Registration {
            stream,
            handler_name: std::any::type_name::<H>(),
            event_stream: <H::Event as Event>::STREAM,
            declared: Declared::of::<H::Event>(),
            handler: RegisteredHandler::Batch(Arc::new(TypedBatch(handler))),
        });
        self
    }
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.registrations
                    .iter()
                    .map(|r| (&r.stream, r.handler_name)),
            )
            .finish()
    }
}

pub(crate) struct Registration {
    pub(crate) stream: Option<String>,
    pub(crate) handler_name: &'static str,
    /// The stream of the handler's event type ([`Event::STREAM`]), which its
    /// [`declared`](Self::declared) partitions are of.
    pub(crate) event_stream: Option<&'static str>,
    /// What the handler's event type declares about its stream.
    pub(crate) declared: Declared,
    pub(crate) handler: RegisteredHandler,
}

/// A registered handler, type-erased: of one entry at a time, or of batches.
#[derive(Clone)]
pub(crate) enum RegisteredHandler {
    One(Arc<dyn ErasedHandler>),
    Batch(Arc<dyn ErasedBatchHandler>),
}

impl RegisteredHandler {
    pub(crate) fn max_deliveries(&self) -> Option<u64> {
        match self {
            RegisteredHandler::One(handler) => handler.max_deliveries(),
            RegisteredHandler::Batch(handler) => handler.max_deliveries(),
        }
    }

    pub(crate) fn handler_timeout(&self) -> Option<Duration> {
        match self {
            RegisteredHandler::One(handler) => handler.handler_timeout(),
            RegisteredHandler::Batch(handler) => handler.handler_timeout(),
        }
    }
}

/// The future of a handler call: of [`StreamHandler::handle_and_emit`], and of the
/// services that layers wrap ([`HandlerService`]). Resolves to the events to publish, or
/// the error.
#[must_use = "futures do nothing unless polled"]
pub struct HandlerCall<'a>(CallFuture<'a>);

enum CallFuture<'a> {
    /// `handle`'s own future, whose `Ok` publishes nothing.
    Handled(Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>),
    Emitting(Pin<Box<dyn Future<Output = Result<Emit, HandlerError>> + Send + 'a>>),
}

impl<'a> HandlerCall<'a> {
    /// A call that runs `future`, boxed.
    pub fn new(future: impl Future<Output = Result<Emit, HandlerError>> + Send + 'a) -> Self {
        HandlerCall(CallFuture::Emitting(Box::pin(future)))
    }

    /// A call of [`StreamHandler::handle`], taking its boxed future as it is; its `Ok`
    /// publishes nothing.
    pub fn handled(
        future: Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'a>>,
    ) -> Self {
        HandlerCall(CallFuture::Handled(future))
    }
}

impl Future for HandlerCall<'_> {
    type Output = Result<Emit, HandlerError>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut self.0 {
            CallFuture::Handled(future) => future
                .as_mut()
                .poll(cx)
                .map(|result| result.map(|()| Emit::new())),
            CallFuture::Emitting(future) => future.as_mut().poll(cx),
        }
    }
}

impl std::fmt::Debug for HandlerCall<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerCall").finish_non_exhaustive()
    }
}

pub(crate) type HandlerFuture<'a> = HandlerCall<'a>;

/// A handler with its event type erased, so the consumer stores handlers of every type
/// side by side. Decoding happens here, in the handler's task.
pub(crate) trait ErasedHandler: Send + Sync + 'static {
    fn max_deliveries(&self) -> Option<u64>;

    fn handler_timeout(&self) -> Option<Duration>;

    /// Decodes the entry and calls the handler: the whole of a call without layers.
    fn call<'a>(
        &'a self,
        fields: &EntryFields,
        ctx: Context,
    ) -> Result<HandlerFuture<'a>, CodecError>;

    /// Decodes the entry, for the bus-wide layers.
    fn decode(&self, fields: &EntryFields) -> Result<AnyEvent, CodecError>;

    /// Calls the handler with an event [`decode`](Self::decode) gave, from inside the
    /// bus-wide layers.
    fn call_decoded(self: Arc<Self>, event: AnyEvent, ctx: Context) -> HandlerFuture<'static>;
}

struct Typed<H>(H);

impl<H: StreamHandler> ErasedHandler for Typed<H> {
    fn max_deliveries(&self) -> Option<u64> {
        self.0.max_deliveries()
    }

    fn handler_timeout(&self) -> Option<Duration> {
        self.0.handler_timeout()
    }

    fn call<'a>(
        &'a self,
        fields: &EntryFields,
        ctx: Context,
    ) -> Result<HandlerFuture<'a>, CodecError> {
        let event = codec::from_pairs::<H::Event>(fields.pairs())?;
        Ok(self.0.handle_and_emit(event, ctx))
    }

    fn decode(&self, fields: &EntryFields) -> Result<AnyEvent, CodecError> {
        codec::from_pairs::<H::Event>(fields.pairs()).map(AnyEvent::new)
    }

    fn call_decoded(self: Arc<Self>, event: AnyEvent, ctx: Context) -> HandlerFuture<'static> {
        match event.downcast::<H::Event>() {
            Ok(event) => HandlerCall::new(async move { self.0.handle_and_emit(event, ctx).await }),
            Err(other) => {
                let error = HandlerError::permanent(format!(
                    "a layer replaced the event of type `{}` with one of type `{}`",
                    std::any::type_name::<H::Event>(),
                    other.type_name()
                ));
                HandlerCall::new(std::future::ready(Err(error)))
            }
        }
    }
}
