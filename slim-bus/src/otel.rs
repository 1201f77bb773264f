//! Trace context across services (feature `opentelemetry`): publishes carry their span's
//! context in headers, and each delivery's span continues it.
//!
//! Both directions go through OpenTelemetry's global text map propagator, as
//! instrumentation libraries should, so the application picks the format:
//! `opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new())` writes the
//! W3C `traceparent` and `tracestate` headers. The spans are `tracing` spans; the
//! application's `tracing-opentelemetry` layer makes them OpenTelemetry spans.

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TraceContextExt;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::broker::EntryFields;
use crate::headers::Headers;

impl Injector for Headers {
    /// Sets header `key`, unless `value` is empty: the W3C propagator sets `tracestate`
    /// also when there is none, and an empty header says nothing an absent one does not.
    fn set(&mut self, key: &str, value: String) {
        if !value.is_empty() {
            self.insert(key, value);
        }
    }
}

impl Extractor for Headers {
    fn get(&self, key: &str) -> Option<&str> {
        Headers::get(self, key)
    }

    fn keys(&self) -> Vec<&str> {
        self.iter().map(|(name, _)| name).collect()
    }
}

/// `headers` with the trace context of `span` added, when `span` is an OpenTelemetry span
/// with a valid context; `None` when there is nothing to add. A header the caller set
/// (e.g. a `traceparent` forwarded on purpose) is kept as it is.
pub(crate) fn with_trace_context(span: &tracing::Span, headers: &Headers) -> Option<Headers> {
    let trace = trace_context(span)?;
    let mut merged = headers.clone();
    for (name, value) in trace.iter() {
        if merged.get(name).is_none() {
            merged.insert(name, value);
        }
    }
    Some(merged)
}

/// The trace context of the publish span `span` as headers, or, when its level turns it
/// off, of the span the publish is called in; `None` when there is none (no subscriber, no
/// OpenTelemetry layer, an invalid context, a no-op propagator).
pub(crate) fn trace_context(span: &tracing::Span) -> Option<Headers> {
    let cx = span_context(span).or_else(|| span_context(&tracing::Span::current()))?;
    let mut headers = Headers::new();
    opentelemetry::global::get_text_map_propagator(|propagator| {
        propagator.inject_context(&cx, &mut headers);
    });
    (!headers.is_empty()).then_some(headers)
}

/// The OpenTelemetry context of `span`, if it is enabled and has a valid one.
fn span_context(span: &tracing::Span) -> Option<opentelemetry::Context> {
    if span.is_disabled() {
        return None;
    }
    let cx = span.context();
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes the trace context in an entry's headers, if any, the parent of `span`, the span
/// of its delivery. Call it before the span is first entered. A span its level turns off
/// continues nothing: the handler's own spans then start traces of their own.
pub(crate) fn continue_trace(span: &tracing::Span, fields: Option<&EntryFields>) {
    let Some(fields) = fields else {
        return;
    };
    if span.is_disabled() {
        return;
    }
    let headers = Headers::of_entry(fields);
    if headers.is_empty() {
        return;
    }
    let parent =
        opentelemetry::global::get_text_map_propagator(|propagator| propagator.extract(&headers));
    if parent.span().span_context().is_valid() {
        // Fails only without an OpenTelemetry layer, when there is no trace to continue.
        let _ = span.set_parent(parent);
    }
}
