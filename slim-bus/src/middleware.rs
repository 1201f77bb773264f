//! Middleware: tower layers around handler calls, per bus and per handler.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceExt};

use crate::broker::EntryFields;
use crate::codec::CodecError;
use crate::context::Context;
use crate::emit::Emit;
use crate::error::HandlerError;
use crate::handler::{ErasedHandler, HandlerCall, HandlerFuture, StreamHandler};

/// One handler call as a layer's service sees it: the decoded event and its [`Context`].
///
/// A per-handler layer ([`StreamHandler::layer`]) sees the handler's own event type; a
/// bus-wide one ([`EventBusBuilder::layer`](crate::EventBusBuilder::layer)) sees every
/// handler's calls, with the event as an [`AnyEvent`].
pub struct HandlerRequest<E = AnyEvent> {
    event: E,
    context: Context,
}

impl<E> HandlerRequest<E> {
    /// A call of the handler with `event` in `context`.
    pub fn new(event: E, context: Context) -> Self {
        HandlerRequest { event, context }
    }

    /// The decoded event.
    pub fn event(&self) -> &E {
        &self.event
    }

    /// The decoded event, to change before the handler sees it.
    pub fn event_mut(&mut self) -> &mut E {
        &mut self.event
    }

    /// The delivery: stream, entry id, delivery count, deadline.
    pub fn context(&self) -> &Context {
        &self.context
    }

    /// The event and the context.
    pub fn into_parts(self) -> (E, Context) {
        (self.event, self.context)
    }
}

impl<E: fmt::Debug> fmt::Debug for HandlerRequest<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerRequest")
            .field("event", &self.event)
            .field("context", &self.context)
            .finish()
    }
}

/// A decoded event whose type a bus-wide layer does not know: downcast it to look inside.
pub struct AnyEvent {
    event: Box<dyn Any + Send>,
    type_name: &'static str,
}

impl AnyEvent {
    pub(crate) fn new<E: Send + 'static>(event: E) -> Self {
        AnyEvent {
            event: Box::new(event),
            type_name: std::any::type_name::<E>(),
        }
    }

    /// The event, if it is an `E`.
    pub fn downcast_ref<E: 'static>(&self) -> Option<&E> {
        self.event.downcast_ref()
    }

    /// The event, if it is an `E`, to change before the handler sees it.
    pub fn downcast_mut<E: 'static>(&mut self) -> Option<&mut E> {
        self.event.downcast_mut()
    }

    /// The name of the event's type, as [`std::any::type_name`] gives it.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    pub(crate) fn downcast<E: 'static>(self) -> Result<E, AnyEvent> {
        let type_name = self.type_name;
        self.event
            .downcast()
            .map(|event| *event)
            .map_err(|event| AnyEvent { event, type_name })
    }
}

impl fmt::Debug for AnyEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("AnyEvent").field(&self.type_name).finish()
    }
}

/// The service a bus-wide layer wraps: every handler of the bus, type-erased.
pub type BusService = BoxCloneSyncService<HandlerRequest, Emit, HandlerError>;

/// A handler as the innermost service of its per-handler layers: calls
/// [`StreamHandler::handle_and_emit`]. Always ready.
pub struct HandlerService<H>(Arc<H>);

impl<H> Clone for HandlerService<H> {
    fn clone(&self) -> Self {
        HandlerService(self.0.clone())
    }
}

impl<H> fmt::Debug for HandlerService<H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HandlerService")
            .field(&std::any::type_name::<H>())
            .finish()
    }
}

impl<H: StreamHandler> Service<HandlerRequest<H::Event>> for HandlerService<H> {
    type Response = Emit;
    type Error = HandlerError;
    type Future = HandlerCall<'static>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: HandlerRequest<H::Event>) -> HandlerCall<'static> {
        let handler = self.0.clone();
        HandlerCall::new(async move {
            let (event, ctx) = request.into_parts();
            handler.handle_and_emit(event, ctx).await
        })
    }
}

/// A handler with a layer around it, made by [`StreamHandler::layer`]; a
/// [`StreamHandler`] itself, on the stream and with the settings of the handler inside.
pub struct Layered<H, S> {
    handler: Arc<H>,
    service: S,
}

impl<H, S> fmt::Debug for Layered<H, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Layered")
            .field("handler", &std::any::type_name::<H>())
            .field("service", &std::any::type_name::<S>())
            .finish()
    }
}

impl<H: StreamHandler, S> Layered<H, S> {
    pub(crate) fn new<L>(handler: H, layer: L) -> Self
    where
        L: Layer<HandlerService<H>, Service = S>,
    {
        let handler = Arc::new(handler);
        let service = layer.layer(HandlerService(handler.clone()));
        Layered { handler, service }
    }
}

#[async_trait::async_trait]
impl<H, S> StreamHandler for Layered<H, S>
where
    H: StreamHandler,
    S: Service<HandlerRequest<H::Event>, Response = Emit> + Clone + Send + Sync + 'static,
    S::Error: Into<HandlerError>,
    S::Future: Send + 'static,
{
    type Event = H::Event;

    /// Runs the layered call and drops the events it returns; the bus calls
    /// [`handle_and_emit`](StreamHandler::handle_and_emit).
    async fn handle(&self, event: H::Event, ctx: Context) -> Result<(), HandlerError> {
        self.handle_and_emit(event, ctx).await.map(drop)
    }

    fn handle_and_emit(&self, event: H::Event, ctx: Context) -> HandlerCall<'_> {
        // A clone per call, readied then called, as tower's `oneshot` does: calls run
        // concurrently, and a clone of a limit shares the limit.
        let call = self
            .service
            .clone()
            .oneshot(HandlerRequest::new(event, ctx));
        HandlerCall::new(async move { call.await.map_err(Into::into) })
    }

    fn stream(&self) -> Option<&str> {
        self.handler.stream()
    }

    fn max_deliveries(&self) -> Option<u64> {
        self.handler.max_deliveries()
    }

    fn handler_timeout(&self) -> Option<Duration> {
        self.handler.handler_timeout()
    }
}

/// A bus-wide layer, applied to each handler's service when the bus is built.
pub(crate) type BusLayer = Arc<dyn Fn(BusService) -> BusService + Send + Sync>;

pub(crate) fn bus_layer<L>(layer: L) -> BusLayer
where
    L: Layer<BusService> + Send + Sync + 'static,
    L::Service: Service<HandlerRequest, Response = Emit> + Clone + Send + Sync + 'static,
    <L::Service as Service<HandlerRequest>>::Error: Into<HandlerError>,
    <L::Service as Service<HandlerRequest>>::Future: Send + 'static,
{
    Arc::new(move |inner| BusService::new(layer.layer(inner).map_err(Into::into)))
}

/// `handler` inside the bus-wide `layers`, the last one outermost; `handler` itself
/// when there are none, so that a bus without layers calls its handlers as before.
pub(crate) fn with_bus_layers(
    handler: Arc<dyn ErasedHandler>,
    layers: &[BusLayer],
) -> Arc<dyn ErasedHandler> {
    if layers.is_empty() {
        return handler;
    }
    let inner = BusService::new(ErasedService(handler.clone()));
    let service = layers.iter().fold(inner, |service, layer| layer(service));
    Arc::new(BusLayered { handler, service })
}

/// A type-erased handler as the innermost service of the bus-wide layers.
#[derive(Clone)]
struct ErasedService(Arc<dyn ErasedHandler>);

impl Service<HandlerRequest> for ErasedService {
    type Response = Emit;
    type Error = HandlerError;
    type Future = HandlerFuture<'static>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), HandlerError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: HandlerRequest) -> Self::Future {
        let (event, ctx) = request.into_parts();
        self.0.clone().call_decoded(event, ctx)
    }
}

/// A handler inside the bus-wide layers.
struct BusLayered {
    handler: Arc<dyn ErasedHandler>,
    service: BusService,
}

impl ErasedHandler for BusLayered {
    fn max_deliveries(&self) -> Option<u64> {
        self.handler.max_deliveries()
    }

    fn handler_timeout(&self) -> Option<Duration> {
        self.handler.handler_timeout()
    }

    fn call<'a>(
        &'a self,
        fields: &EntryFields,
        ctx: Context,
    ) -> Result<HandlerFuture<'a>, CodecError> {
        // Decoded first: an entry that does not decode is dead-lettered without a call.
        let event = self.handler.decode(fields)?;
        let call = self
            .service
            .clone()
            .oneshot(HandlerRequest::new(event, ctx));
        Ok(HandlerCall::new(call))
    }

    fn decode(&self, fields: &EntryFields) -> Result<AnyEvent, CodecError> {
        self.handler.decode(fields)
    }

    fn call_decoded(self: Arc<Self>, event: AnyEvent, ctx: Context) -> HandlerFuture<'static> {
        HandlerCall::new(
            self.service
                .clone()
                .oneshot(HandlerRequest::new(event, ctx)),
        )
    }
}
