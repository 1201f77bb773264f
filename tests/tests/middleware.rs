//! Tower layers around handler calls: what a layer's service sees, short-circuits, limits,
//! and layers on one handler only. Each test runs against a real redis-server and the
//! in-memory backend.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slim_bus::{
    BusService, Context, DeadLetterReason, Emit, HandlerError, HandlerRequest, HandlerService,
    StreamHandler,
};
use slim_bus_tests::within;
use support::*;
use tokio::sync::mpsc;
use tower::layer::layer_fn;
use tower::limit::ConcurrencyLimitLayer;
use tower::{ServiceExt, service_fn};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
}

impl slim_bus::Event for OrderPlaced {
    const STREAM: Option<&'static str> = Some("order.placed");
}

/// What a bus-wide layer saw of one call.
#[derive(Debug)]
struct Call {
    stream: String,
    entry_id: slim_bus::EntryId,
    delivery_count: u64,
    event_type: &'static str,
    seq: Option<u64>,
}

conformance!(a_bus_layer_sees_the_context_and_event_of_each_call_then_calls_the_handler);
async fn a_bus_layer_sees_the_context_and_event_of_each_call_then_calls_the_handler(
    backend: Backend,
) {
    let (calls, mut seen_calls) = mpsc::unbounded_channel();
    let layer = layer_fn(move |inner: BusService| {
        let calls = calls.clone();
        service_fn(move |request: HandlerRequest| {
            let ctx = request.context();
            let _ = calls.send(Call {
                stream: ctx.stream().to_owned(),
                entry_id: ctx.entry_id(),
                delivery_count: ctx.delivery_count(),
                event_type: request.event().type_name(),
                seq: request.event().downcast_ref::<UserCreated>().map(|e| e.seq),
            });
            inner.clone().oneshot(request)
        })
    });
    let (handler, mut handled) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend.bus().handler(handler).layer(layer).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let id = within("publish", STEP, bus.publish(&user(3)))
        .await
        .unwrap();

    let call = recv(&mut seen_calls, "the layer's call").await;
    assert_eq!(call.stream, "user.created");
    assert_eq!(call.entry_id, id);
    assert_eq!(call.delivery_count, 1);
    assert!(
        call.event_type.ends_with("UserCreated"),
        "{}",
        call.event_type
    );
    assert_eq!(call.seq, Some(3));
    assert_eq!(recv(&mut handled, "the handler's call").await.entry_id, id);
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(a_layer_that_returns_an_error_fails_the_attempt_without_calling_the_handler);
async fn a_layer_that_returns_an_error_fails_the_attempt_without_calling_the_handler(
    backend: Backend,
) {
    let attempts = Arc::new(AtomicUsize::new(0));
    let counted = attempts.clone();
    let refuse = layer_fn(move |_inner: BusService| {
        let counted = counted.clone();
        service_fn(move |_request: HandlerRequest| {
            counted.fetch_add(1, Ordering::SeqCst);
            std::future::ready(Err::<Emit, _>(HandlerError::new("refused by the layer")))
        })
    });
    let (handler, mut handled) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .max_deliveries(2)
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
            .handler(handler)
            .layer(refuse)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let id = within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();

    let dead = bus.dead_letters("user.created");
    let letters = within("the dead letter", STEP, async {
        loop {
            let letters = dead.list(None, 10).await.unwrap();
            if !letters.is_empty() {
                return letters;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].origin_id, Some(id));
    assert_eq!(
        letters[0].delivery_count, 2,
        "retried once, then dead-lettered"
    );
    assert_eq!(letters[0].reason, Some(DeadLetterReason::Handler));
    assert_eq!(letters[0].error, "refused by the layer");
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert!(handled.try_recv().is_err(), "the handler was never called");
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(a_layer_that_returns_ok_acknowledges_the_entry_without_calling_the_handler);
async fn a_layer_that_returns_ok_acknowledges_the_entry_without_calling_the_handler(
    backend: Backend,
) {
    let (skipped, mut seen_skips) = mpsc::unbounded_channel();
    let skip = layer_fn(move |_inner: BusService| {
        let skipped = skipped.clone();
        service_fn(move |request: HandlerRequest| {
            let _ = skipped.send(request.context().entry_id());
            std::future::ready(Ok::<_, HandlerError>(Emit::new()))
        })
    });
    let (handler, mut handled) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend.bus().handler(handler).layer(skip).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let id = within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();

    assert_eq!(recv(&mut seen_skips, "the layer's call").await, id);
    backend.until_nothing_pending("user.created", "tests").await;
    assert!(handled.try_recv().is_err(), "the handler was never called");
    assert!(
        bus.dead_letters("user.created")
            .list(None, 1)
            .await
            .unwrap()
            .is_empty()
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(a_handler_layer_applies_to_that_handler_only_and_sees_its_typed_event);
async fn a_handler_layer_applies_to_that_handler_only_and_sees_its_typed_event(backend: Backend) {
    let (layered_calls, mut seen_layered) = mpsc::unbounded_channel();
    let layer = layer_fn(move |inner: HandlerService<Record<OrderPlaced>>| {
        let layered_calls = layered_calls.clone();
        service_fn(move |request: HandlerRequest<OrderPlaced>| {
            let _ = layered_calls.send(request.event().order_id.clone());
            inner.clone().oneshot(request)
        })
    });
    let (orders, mut handled_orders) = Record::<OrderPlaced>::new();
    let (users, mut handled_users) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .handler(orders.layer(layer))
            .handler(users)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish a user", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    within(
        "publish an order",
        STEP,
        bus.publish(&OrderPlaced {
            order_id: "o-1".into(),
        }),
    )
    .await
    .unwrap();

    recv(&mut handled_users, "the user handler's call").await;
    let order = recv(&mut handled_orders, "the order handler's call").await;
    assert_eq!(order.stream, "order.placed");
    assert_eq!(recv(&mut seen_layered, "the layer's call").await, "o-1");
    backend.until_nothing_pending("user.created", "tests").await;
    backend.until_nothing_pending("order.placed", "tests").await;
    assert!(
        seen_layered.try_recv().is_err(),
        "the layer saw only the order handler's call"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// Counts the calls running at once and the most there ever were.
struct Gauge {
    running: AtomicUsize,
    peak: AtomicUsize,
    done: mpsc::UnboundedSender<u64>,
}

struct Measured(Arc<Gauge>);

#[slim_bus::async_trait]
impl StreamHandler for Measured {
    type Event = UserCreated;

    async fn handle(&self, event: UserCreated, _ctx: Context) -> Result<(), HandlerError> {
        let gauge = &self.0;
        let now = gauge.running.fetch_add(1, Ordering::SeqCst) + 1;
        gauge.peak.fetch_max(now, Ordering::SeqCst);
        // Long enough for other deliveries to start if the limit let them.
        tokio::time::sleep(Duration::from_millis(5)).await;
        gauge.running.fetch_sub(1, Ordering::SeqCst);
        let _ = gauge.done.send(event.seq);
        Ok(())
    }
}

conformance!(a_tower_concurrency_limit_of_one_never_lets_two_handler_calls_run_at_once);
async fn a_tower_concurrency_limit_of_one_never_lets_two_handler_calls_run_at_once(
    backend: Backend,
) {
    let (done, mut finished) = mpsc::unbounded_channel();
    let gauge = Arc::new(Gauge {
        running: AtomicUsize::new(0),
        peak: AtomicUsize::new(0),
        done,
    });
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .max_concurrent(8)
            .handler(Measured(gauge.clone()))
            .layer(ConcurrencyLimitLayer::new(1))
            .build(),
    )
    .await
    .unwrap();
    for seq in 0..30 {
        within("publish", STEP, bus.publish(&user(seq)))
            .await
            .unwrap();
    }
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let mut handled = Vec::new();
    for _ in 0..30 {
        handled.push(recv(&mut finished, "a handled entry").await);
    }
    handled.sort_unstable();
    assert_eq!(handled, (0..30).collect::<Vec<_>>());
    assert_eq!(gauge.peak.load(Ordering::SeqCst), 1, "peak concurrency");
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// A service that is never ready (and never wakes its caller).
#[derive(Clone)]
struct NeverReady;

impl tower::Service<HandlerRequest> for NeverReady {
    type Response = Emit;
    type Error = HandlerError;
    type Future = std::future::Ready<Result<Emit, HandlerError>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), HandlerError>> {
        std::task::Poll::Pending
    }

    fn call(&mut self, _: HandlerRequest) -> Self::Future {
        panic!("called without being ready")
    }
}

conformance!(a_service_that_never_gets_ready_holds_the_call_back_until_the_handler_timeout);
async fn a_service_that_never_gets_ready_holds_the_call_back_until_the_handler_timeout(
    backend: Backend,
) {
    let (handler, mut handled) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .handler_timeout(Duration::from_millis(200))
            .max_deliveries(1)
            .handler(handler)
            .layer(layer_fn(|_inner: BusService| NeverReady))
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let id = within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();

    let dead = bus.dead_letters("user.created");
    let letters = within("the dead letter", STEP, async {
        loop {
            let letters = dead.list(None, 10).await.unwrap();
            if !letters.is_empty() {
                return letters;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(letters[0].origin_id, Some(id));
    assert_eq!(letters[0].reason, Some(DeadLetterReason::Timeout));
    assert!(handled.try_recv().is_err(), "the handler was never called");
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}
