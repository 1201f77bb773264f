//! Trace context across services (feature `opentelemetry`): a publish in one service
//! writes its span's W3C `traceparent` into the entry's headers, and the delivery span in
//! another service continues that trace. Two buses on one throwaway Redis, spans exported
//! to memory. The subscriber is the default of the test's thread (the runtime is
//! single-threaded), the propagator the process-wide one, as an application sets them.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use opentelemetry::trace::{SpanId, TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use slim_bus_tests::{RedisServer, within};
use support::*;
use tracing::Instrument;
use tracing::subscriber::DefaultGuard;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Layer as _, SubscriberExt};

/// The exported spans once one named `name` is among them.
async fn until_exported(exporter: &InMemorySpanExporter, name: &str) -> Vec<SpanData> {
    within(&format!("span `{name}` to be exported"), STEP, async {
        loop {
            let spans = exporter.get_finished_spans().unwrap();
            if spans.iter().any(|span| span.name == name) {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// Spans at `level` and above go to an OpenTelemetry tracer that exports to memory, on
/// this thread until the guard is dropped; the propagator is the W3C one.
fn trace_to_memory(level: LevelFilter) -> (InMemorySpanExporter, DefaultGuard) {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry().with(
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("slim-bus-tests"))
            .with_filter(level),
    );
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    (exporter, tracing::subscriber::set_default(subscriber))
}

/// Whether an entry of `user.created` has field `name`.
async fn entries_have(server: &RedisServer, name: &str) -> bool {
    entries(server, "user.created")
        .await
        .iter()
        .any(|(_, fields)| fields.iter().any(|(field, _)| field == name))
}

#[tokio::test]
async fn a_delivery_span_continues_the_trace_of_the_publish_in_another_service() {
    let (exporter, _default) = trace_to_memory(LevelFilter::DEBUG);
    let server = within("redis-server to start", STEP, RedisServer::start())
        .await
        .unwrap();
    // Service A only publishes; service B handles.
    let service_a = within("build A", STEP, bus(&server).build()).await.unwrap();
    let (handler, mut seen) = Record::<UserCreated>::new();
    let service_b = within(
        "build B",
        STEP,
        bus(&server).consumer_group("b").handler(handler).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, service_b.listen()).await.unwrap();

    // A's HTTP handler publishes inside its request span.
    let request = tracing::info_span!("POST /users");
    let request_trace = request.context().span().span_context().trace_id();
    let id = within(
        "publish",
        STEP,
        service_a.publish(&user(1)).instrument(request.clone()),
    )
    .await
    .unwrap();
    drop(request);

    let delivery = recv(&mut seen, "the delivery in B").await;
    assert_eq!(delivery.entry_id, id);
    let spans = until_exported(&exporter, "slim_bus.process").await;
    let named = |name: &str| {
        spans
            .iter()
            .find(|span| span.name == name)
            .unwrap_or_else(|| panic!("no span `{name}` in {spans:#?}"))
    };
    let send = named("slim_bus.send");
    let process = named("slim_bus.process");
    assert_eq!(send.span_context.trace_id(), request_trace);
    assert_eq!(
        process.span_context.trace_id(),
        request_trace,
        "B's delivery is in the trace of A's request"
    );
    assert_eq!(
        process.parent_span_id,
        send.span_context.span_id(),
        "B's delivery span is a child of A's publish span"
    );
    assert!(process.parent_span_is_remote);
    assert_ne!(process.parent_span_id, SpanId::INVALID);

    // On the wire: the W3C header, as `@h.traceparent`; no `tracestate`, which is empty.
    assert!(
        !entries_have(&server, "@h.tracestate").await,
        "an empty tracestate is not written"
    );
    let entries = entries(&server, "user.created").await;
    let traceparent = entries[0]
        .1
        .iter()
        .find(|(name, _)| name == "@h.traceparent")
        .map(|(_, value)| value.clone())
        .unwrap_or_else(|| panic!("no traceparent in {entries:?}"));
    assert_eq!(
        traceparent,
        format!("00-{}-{}-01", request_trace, send.span_context.span_id())
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test]
async fn a_publish_whose_span_is_off_passes_on_the_trace_of_the_span_it_is_called_in() {
    // Spans at INFO and above: A's publish span (DEBUG by default) is off, B raises its
    // delivery span to INFO.
    let (exporter, _default) = trace_to_memory(LevelFilter::INFO);
    let server = within("redis-server to start", STEP, RedisServer::start())
        .await
        .unwrap();
    let service_a = within("build A", STEP, bus(&server).build()).await.unwrap();
    let (handler, mut seen) = Record::<UserCreated>::new();
    let service_b = within(
        "build B",
        STEP,
        bus(&server)
            .consumer_group("b")
            .span_level(tracing::Level::INFO)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, service_b.listen()).await.unwrap();

    let request = tracing::info_span!("POST /users");
    let request_context = request.context().span().span_context().clone();
    within(
        "publish",
        STEP,
        service_a.publish(&user(1)).instrument(request.clone()),
    )
    .await
    .unwrap();
    drop(request);

    recv(&mut seen, "the delivery in B").await;
    let spans = until_exported(&exporter, "slim_bus.process").await;
    assert!(
        !spans.iter().any(|span| span.name == "slim_bus.send"),
        "the publish span is off: {spans:#?}"
    );
    let process = spans
        .iter()
        .find(|span| span.name == "slim_bus.process")
        .unwrap();
    assert_eq!(process.span_context.trace_id(), request_context.trace_id());
    assert_eq!(
        process.parent_span_id,
        request_context.span_id(),
        "B's delivery span is a child of A's request span"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}
