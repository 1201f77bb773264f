//! Spans and logs: a span per delivery that the handler's events nest under, one per
//! publish, DEBUG per outcome, INFO when reading works again after a failure, ERROR when
//! the listener stops on an error it cannot recover from. A capturing subscriber is set
//! as the default of each test's thread (the runtimes are single-threaded).
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slim_bus::HandlerError;
use slim_bus_tests::within;
use support::*;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record as SpanRecord};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// A span as created, with its fields (recorded later ones included).
#[derive(Debug, Clone)]
struct SpanSeen {
    name: String,
    fields: HashMap<String, String>,
}

/// An event with its fields and the spans it happened in, innermost first.
#[derive(Debug, Clone)]
struct EventSeen {
    level: Level,
    fields: HashMap<String, String>,
    scope: Vec<SpanSeen>,
}

impl EventSeen {
    fn message(&self) -> &str {
        self.fields.get("message").map_or("", String::as_str)
    }

    fn in_span(&self, name: &str) -> Option<&SpanSeen> {
        self.scope.iter().find(|span| span.name == name)
    }
}

#[derive(Default, Clone)]
struct Captured {
    spans: Arc<Mutex<Vec<SpanSeen>>>,
    events: Arc<Mutex<Vec<EventSeen>>>,
}

impl Captured {
    fn spans(&self, name: &str) -> Vec<SpanSeen> {
        let spans = self.spans.lock().unwrap();
        spans.iter().filter(|s| s.name == name).cloned().collect()
    }

    fn events(&self) -> Vec<EventSeen> {
        self.events.lock().unwrap().clone()
    }

    async fn until_event(&self, what: &str, found: impl Fn(&EventSeen) -> bool) -> EventSeen {
        within(what, STEP, async {
            loop {
                if let Some(event) = self.events().into_iter().find(|e| found(e)) {
                    break event;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Captured {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        let seen = SpanSeen {
            name: attrs.metadata().name().to_owned(),
            fields,
        };
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(seen);
        }
    }

    fn on_record(&self, id: &Id, values: &SpanRecord<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(seen) = span.extensions_mut().get_mut::<SpanSeen>()
        {
            values.record(&mut Fields(&mut seen.fields));
        }
    }

    fn on_close(&self, id: Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id)
            && let Some(seen) = span.extensions().get::<SpanSeen>()
        {
            self.spans.lock().unwrap().push(seen.clone());
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = HashMap::new();
        event.record(&mut Fields(&mut fields));
        let scope = ctx
            .event_scope(event)
            .map(|scope| {
                scope
                    .filter_map(|span| span.extensions().get::<SpanSeen>().cloned())
                    .collect()
            })
            .unwrap_or_default();
        self.events.lock().unwrap().push(EventSeen {
            level: *event.metadata().level(),
            fields,
            scope,
        });
    }
}

fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let subscriber = tracing_subscriber::registry().with(captured.clone());
    let guard = tracing::subscriber::set_default(subscriber);
    (captured, guard)
}

async fn deliveries_and_publishes_have_spans(backend: Backend) {
    let (captured, _guard) = capture();
    let (handler, mut seen) = Scripted::new(|event: UserCreated, _| async move {
        match event.seq {
            0 => {
                tracing::info!(seq = event.seq, "the handler's own event");
                Ok(())
            }
            _ => Err(HandlerError::permanent("bad")),
        }
    });
    let bus = within("build", STEP, backend.bus().handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let handled = within("publish", STEP, bus.publish(&user(0)))
        .await
        .unwrap();
    let failed = within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    recv(&mut seen, "the first attempt").await;
    recv(&mut seen, "the second attempt").await;

    let own = captured
        .until_event("the handler's event", |e| {
            e.message() == "the handler's own event"
        })
        .await;
    let process = own
        .in_span("slim_bus.process")
        .unwrap_or_else(|| panic!("the handler's event is not in a delivery span: {own:?}"));
    let field = |name: &str| process.fields.get(name).map(String::as_str);
    assert_eq!(field("messaging.system"), Some("redis"));
    assert_eq!(field("messaging.operation.type"), Some("process"));
    assert_eq!(field("messaging.destination.name"), Some("user.created"));
    assert_eq!(field("messaging.consumer.group.name"), Some("tests"));
    assert_eq!(field("consumer"), Some("consumer-1"));
    assert_eq!(
        field("messaging.message.id"),
        Some(handled.to_string().as_str())
    );
    assert_eq!(field("delivery_count"), Some("1"));

    let ok = captured
        .until_event("the DEBUG outcome of the first", |e| {
            e.level == Level::DEBUG && e.fields.get("outcome").map(String::as_str) == Some("ok")
        })
        .await;
    assert_eq!(
        ok.in_span("slim_bus.process").unwrap().fields["messaging.message.id"],
        handled.to_string()
    );
    let error = captured
        .until_event("the DEBUG outcome of the second", |e| {
            e.level == Level::DEBUG && e.fields.get("outcome").map(String::as_str) == Some("error")
        })
        .await;
    assert_eq!(
        error.in_span("slim_bus.process").unwrap().fields["messaging.message.id"],
        failed.to_string()
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();

    let sends = captured.spans("slim_bus.send");
    let ids: Vec<&str> = sends
        .iter()
        .filter_map(|span| span.fields.get("messaging.message.id").map(String::as_str))
        .collect();
    assert_eq!(
        ids,
        [handled.to_string(), failed.to_string()],
        "one span per publish, with the entry id recorded: {sends:?}"
    );
    for send in &sends {
        assert_eq!(send.fields["messaging.destination.name"], "user.created");
        assert_eq!(send.fields["messaging.operation.type"], "send");
    }
}

#[tokio::test]
async fn deliveries_and_publishes_have_spans_redis() {
    deliveries_and_publishes_have_spans(Backend::redis().await).await;
}

#[tokio::test(start_paused = true)]
async fn deliveries_and_publishes_have_spans_memory() {
    deliveries_and_publishes_have_spans(Backend::memory()).await;
}

/// A subscriber that lets INFO and above through, as a service logging at INFO.
fn capture_at_info() -> (Captured, tracing::subscriber::DefaultGuard) {
    use tracing_subscriber::filter::LevelFilter;
    let captured = Captured::default();
    let subscriber =
        tracing_subscriber::registry().with(captured.clone().with_filter(LevelFilter::INFO));
    let guard = tracing::subscriber::set_default(subscriber);
    (captured, guard)
}

/// Handles one entry whose handler logs at INFO; returns that event as captured.
async fn handler_event_at_info(span_level: Option<Level>) -> EventSeen {
    let (captured, _guard) = capture_at_info();
    let backend = Backend::memory();
    let (handler, mut seen) = Scripted::new(|_: UserCreated, _| async move {
        tracing::info!("the handler's own event");
        Ok(())
    });
    let mut builder = backend.bus().handler(handler);
    if let Some(level) = span_level {
        builder = builder.span_level(level);
    }
    let bus = within("build", STEP, builder.build()).await.unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(0)))
        .await
        .unwrap();
    recv(&mut seen, "the attempt").await;
    let own = captured
        .until_event("the handler's event", |e| {
            e.message() == "the handler's own event"
        })
        .await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    own
}

#[tokio::test(start_paused = true)]
async fn delivery_spans_are_debug_unless_span_level_raises_them() {
    let default = handler_event_at_info(None).await;
    assert!(
        default.in_span("slim_bus.process").is_none(),
        "a DEBUG span is not seen by an INFO subscriber: {default:?}"
    );
    let raised = handler_event_at_info(Some(Level::INFO)).await;
    assert!(
        raised.in_span("slim_bus.process").is_some(),
        "at span_level INFO the handler's event nests under its delivery: {raised:?}"
    );
}

#[tokio::test]
async fn reading_again_after_a_failure_logs_info() {
    let (captured, _guard) = capture();
    let server = start_server().await;
    let (handler, _seen) = Record::<UserCreated>::new();
    let bus = within("build", STEP, bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    // The reader's connection exists once it has read.
    within("a first read", STEP, async {
        while bus.health().await.since_last_read.is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let mut conn = server.connection().await;
    // Drops the listener's connections (not this one): its next read fails.
    let _: redis::Value = within(
        "CLIENT KILL",
        STEP,
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .query_async(&mut conn),
    )
    .await
    .unwrap();
    let failed = captured
        .until_event("the failed read", |e| {
            e.level == Level::WARN && e.message().starts_with("redis command failed")
        })
        .await;
    let again = captured
        .until_event("the INFO line of reading again", |e| {
            e.level == Level::INFO && e.message().contains("again after")
        })
        .await;
    assert!(
        again.fields.contains_key("failed_attempts"),
        "{again:?} after {failed:?}"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test]
async fn a_listener_stopped_by_an_unrecoverable_error_logs_error() {
    let (captured, _guard) = capture();
    let server = start_server().await;
    let (handler, _seen) = Record::<UserCreated>::new();
    let bus = within("build", STEP, bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let mut conn = server.connection().await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("requirepass")
        .arg("s3cret")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: redis::Value = within(
        "CLIENT KILL",
        STEP,
        redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .query_async(&mut conn),
    )
    .await
    .unwrap_or(redis::Value::Nil);
    within("the listener to give up", STEP, listener)
        .await
        .unwrap_err();
    let stopped = captured
        .until_event("the ERROR line", |e| {
            e.level == Level::ERROR && e.message().contains("listener stopped")
        })
        .await;
    assert!(stopped.fields.contains_key("error"), "{stopped:?}");
}

/// The retry and dead-letter warnings of a delivery are emitted in its span, so that
/// what a layer records there (a request id) shows on them.
async fn retry_and_dead_letter_warnings_carry_the_delivery_span(backend: Backend) {
    let (captured, _guard) = capture_at_info();
    let (handler, mut seen) =
        Scripted::new(|event: UserCreated, ctx: slim_bus::Context| async move {
            match (event.seq, ctx.delivery_count()) {
                (0, 1) => Err(HandlerError::new("flaky")),
                (0, _) => Ok(()),
                _ => Err(HandlerError::permanent("bad")),
            }
        });
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .span_level(Level::INFO)
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let flaky = within("publish", STEP, bus.publish(&user(0)))
        .await
        .unwrap();
    let bad = within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    for _ in 0..3 {
        recv(&mut seen, "an attempt").await;
    }
    let retry = captured
        .until_event("the retry warning", |e| {
            e.level == Level::WARN && e.message().contains("will retry")
        })
        .await;
    let dead = captured
        .until_event("the dead-letter warning", |e| {
            e.level == Level::WARN && e.message().contains("dead-lettering")
        })
        .await;
    for (event, id) in [(&retry, flaky), (&dead, bad)] {
        let span = event
            .in_span("slim_bus.process")
            .unwrap_or_else(|| panic!("not in the delivery's span: {event:?}"));
        assert_eq!(
            span.fields["messaging.message.id"],
            id.to_string(),
            "{event:?}"
        );
    }
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test]
async fn retry_and_dead_letter_warnings_carry_the_delivery_span_redis() {
    retry_and_dead_letter_warnings_carry_the_delivery_span(Backend::redis().await).await;
}

#[tokio::test(start_paused = true)]
async fn retry_and_dead_letter_warnings_carry_the_delivery_span_memory() {
    retry_and_dead_letter_warnings_carry_the_delivery_span(Backend::memory()).await;
}

/// A handler that fails while the listener shuts down is not retried here: its warning
/// says the entry stays pending, not that it will be retried.
async fn a_failure_during_shutdown_says_the_entry_stays_pending(backend: Backend) {
    let (captured, _guard) = capture_at_info();
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let (handler, mut seen) = Scripted::new({
        let release = release.clone();
        move |_: UserCreated, _| {
            let release = release.clone();
            async move {
                let _permit = release.acquire().await.map_err(HandlerError::new)?;
                Err(HandlerError::new("the payment service is gone"))
            }
        }
    });
    let bus = within("build", STEP, backend.bus().handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(0)))
        .await
        .unwrap();
    recv(&mut seen, "the handler to start").await;
    listener.shutdown_handle().shutdown();
    release.add_permits(1);
    within("shutdown", STEP, listener).await.unwrap();
    let failure = captured
        .until_event("the failure's warning", |e| {
            e.level == Level::WARN && e.message().contains("failure")
        })
        .await;
    assert!(
        failure
            .message()
            .contains("while shutting down; the entry stays pending"),
        "{failure:?}"
    );
    let retries: Vec<EventSeen> = captured
        .events()
        .into_iter()
        .filter(|e| e.message().contains("will retry"))
        .collect();
    assert!(retries.is_empty(), "{retries:?}");
}

#[tokio::test]
async fn a_failure_during_shutdown_says_the_entry_stays_pending_redis() {
    a_failure_during_shutdown_says_the_entry_stays_pending(Backend::redis().await).await;
}

#[tokio::test(start_paused = true)]
async fn a_failure_during_shutdown_says_the_entry_stays_pending_memory() {
    a_failure_during_shutdown_says_the_entry_stays_pending(Backend::memory()).await;
}

/// An outage is a few lines: the first failure of the reader and of the acknowledgements
/// at WARN, the next ones at DEBUG, and one INFO line each when Redis answers again.
#[tokio::test]
async fn an_outage_logs_one_warning_and_one_line_when_it_heals() {
    let (captured, _guard) = capture();
    let server = start_server().await;
    let release = Arc::new(tokio::sync::Semaphore::new(0));
    let (handler, mut seen) = Scripted::new({
        let release = release.clone();
        move |_: UserCreated, _| {
            let release = release.clone();
            async move {
                let _permit = release.acquire().await.map_err(HandlerError::new)?;
                Ok(())
            }
        }
    });
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .command_timeout(Duration::from_millis(200))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(0)))
        .await
        .unwrap();
    recv(&mut seen, "the handler to start").await;
    server.pause().unwrap();
    // Its acknowledgement meets the frozen server.
    release.add_permits(1);
    let failures = |captured: &Captured, prefix: &str| {
        captured
            .events()
            .into_iter()
            .filter(|e| e.message().starts_with(prefix))
            .map(|e| e.level)
            .collect::<Vec<_>>()
    };
    // A reconnect to a frozen server waits for the connect timeout (5 s).
    within("two failed reads and acknowledgements", STEP * 2, async {
        while failures(&captured, "redis command failed").len() < 2
            || failures(&captured, "acknowledging failed").len() < 2
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    server.resume().unwrap();
    for healed in [
        "redis answers the listener again",
        "acknowledging works again",
    ] {
        captured
            .until_event(healed, |e| {
                e.level == Level::INFO && e.message().starts_with(healed)
            })
            .await;
    }
    for prefix in ["redis command failed", "acknowledging failed"] {
        let levels = failures(&captured, prefix);
        assert_eq!(levels[0], Level::WARN, "{prefix}: {levels:?}");
        assert!(
            levels[1..].iter().all(|level| *level == Level::DEBUG),
            "{prefix}: {levels:?}"
        );
    }
    until_nothing_pending(&server, "user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// Fails every entry of its batch on its first delivery.
struct FailFirstDeliveries;

#[slim_bus::async_trait]
impl slim_bus::BatchHandler for FailFirstDeliveries {
    type Event = UserCreated;

    fn max_batch(&self) -> usize {
        10
    }

    async fn handle_batch(
        &self,
        batch: Vec<(UserCreated, slim_bus::Context)>,
    ) -> slim_bus::BatchOutcome {
        slim_bus::BatchOutcome::each(
            batch
                .iter()
                .map(|(_, ctx)| match ctx.delivery_count() {
                    1 => Err(HandlerError::new("flaky")),
                    _ => Ok(()),
                })
                .collect(),
        )
    }
}

/// Each entry of a batch settles in its own span: its retry warning carries its id.
async fn a_batch_entrys_retry_warning_carries_its_id(backend: Backend) {
    let (captured, _guard) = capture_at_info();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .span_level(Level::INFO)
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
            .batch_handler(FailFirstDeliveries)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let id = within("publish", STEP, bus.publish(&user(0)))
        .await
        .unwrap();
    let retry = captured
        .until_event("the retry warning", |e| {
            e.level == Level::WARN && e.message().contains("will retry")
        })
        .await;
    let span = retry
        .scope
        .iter()
        .find(|span| span.fields.contains_key("messaging.message.id"))
        .unwrap_or_else(|| panic!("not in a span with the entry's id: {retry:?}"));
    assert_eq!(span.fields["messaging.message.id"], id.to_string());
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test]
async fn a_batch_entrys_retry_warning_carries_its_id_redis() {
    a_batch_entrys_retry_warning_carries_its_id(Backend::redis().await).await;
}

#[tokio::test(start_paused = true)]
async fn a_batch_entrys_retry_warning_carries_its_id_memory() {
    a_batch_entrys_retry_warning_carries_its_id(Backend::memory()).await;
}
