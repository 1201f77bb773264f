//! Headers: published next to the event in reserved `@h.` fields, handed to the handler
//! apart from the event, kept by dead letters and restored by a replay.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::{Deserialize, Serialize};
use slim_bus::{Context, HandlerError, Headers, StreamHandler};
use slim_bus_tests::within;
use support::*;
use tokio::sync::mpsc;

/// An event with a field of its own whose name looks like the bus's reserved ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Tagged {
    user_id: String,
    #[serde(rename = "@tag")]
    tag: String,
}

impl slim_bus::Event for Tagged {
    const STREAM: Option<&'static str> = Some("tagged");
}

/// What the handler saw: the event and the headers, apart.
#[derive(Debug)]
struct Delivery {
    event: Tagged,
    headers: Headers,
    entry_id: slim_bus::EntryId,
}

/// Reports each delivery; fails it for good while `fail` is set.
struct Report {
    seen: mpsc::UnboundedSender<Delivery>,
    fail: Arc<AtomicBool>,
}

#[slim_bus::async_trait]
impl StreamHandler for Report {
    type Event = Tagged;

    async fn handle(&self, event: Tagged, ctx: Context) -> Result<(), HandlerError> {
        let _ = self.seen.send(Delivery {
            event,
            headers: ctx.headers().clone(),
            entry_id: ctx.entry_id(),
        });
        if self.fail.load(Ordering::SeqCst) {
            return Err(HandlerError::permanent("refused for the test"));
        }
        Ok(())
    }
}

fn report(fail: bool) -> (Report, mpsc::UnboundedReceiver<Delivery>, Arc<AtomicBool>) {
    let (seen, rx) = mpsc::unbounded_channel();
    let fail = Arc::new(AtomicBool::new(fail));
    let handler = Report {
        seen,
        fail: fail.clone(),
    };
    (handler, rx, fail)
}

fn tagged() -> Tagged {
    Tagged {
        user_id: "u1".into(),
        tag: "@vip".into(),
    }
}

fn request_headers() -> Headers {
    [("request-id", "r-42"), ("tenant", "acme")]
        .into_iter()
        .collect()
}

conformance!(headers_reach_the_handler_apart_from_the_event_and_are_stored_under_h);
async fn headers_reach_the_handler_apart_from_the_event_and_are_stored_under_h(backend: Backend) {
    let (handler, mut seen, _) = report(false);
    let bus = within(
        "build",
        STEP,
        // One at a time, so that the deliveries are reported in order.
        backend.bus().max_concurrent(1).handler(handler).build(),
    )
    .await
    .unwrap();
    let with = within(
        "publish with headers",
        STEP,
        bus.publish_with_headers(&tagged(), &request_headers()),
    )
    .await
    .unwrap();
    let without = within("publish", STEP, bus.publish(&tagged()))
        .await
        .unwrap();

    // What XRANGE shows: the event's fields (its own `@tag` escaped), then the headers.
    let entries = backend.entries("tagged").await;
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].0, with.to_string());
    assert_eq!(
        entries[0].1,
        [
            ("user_id".to_owned(), "u1".to_owned()),
            ("@@tag".to_owned(), "@vip".to_owned()),
            ("@h.request-id".to_owned(), "r-42".to_owned()),
            ("@h.tenant".to_owned(), "acme".to_owned()),
        ]
    );
    assert_eq!(
        entries[1].1,
        [
            ("user_id".to_owned(), "u1".to_owned()),
            ("@@tag".to_owned(), "@vip".to_owned()),
        ],
        "no headers, no header fields"
    );

    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let first = recv(&mut seen, "the entry with headers").await;
    assert_eq!(first.entry_id, with);
    assert_eq!(first.event, tagged());
    assert_eq!(first.headers, request_headers());
    assert_eq!(first.headers.get("request-id"), Some("r-42"));
    let second = recv(&mut seen, "the entry without headers").await;
    assert_eq!(second.entry_id, without);
    assert_eq!(second.event, tagged());
    assert!(second.headers.is_empty());
    backend.until_nothing_pending("tagged", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(headers_written_raw_by_another_producer_reach_the_handler);
async fn headers_written_raw_by_another_producer_reach_the_handler(backend: Backend) {
    // A producer in another language writes the same fields; a reserved name the bus does
    // not know (`@other`) is no field of the event.
    backend
        .xadd(
            "tagged",
            &[
                ("user_id", b"u1"),
                ("@@tag", b"@vip"),
                ("@other", b"ignored"),
                ("@h.request-id", b"r-7"),
            ],
        )
        .await;
    let (handler, mut seen, _) = report(false);
    let bus = within("build", STEP, backend.bus().handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let delivery = recv(&mut seen, "the raw entry").await;
    assert_eq!(delivery.event, tagged());
    assert_eq!(
        delivery.headers.iter().collect::<Vec<_>>(),
        [("request-id", "r-7")]
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(dead_letters_keep_headers_and_a_replay_restores_them);
async fn dead_letters_keep_headers_and_a_replay_restores_them(backend: Backend) {
    let (handler, mut seen, fail) = report(true);
    let bus = within("build", STEP, backend.bus().handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within(
        "publish with headers",
        STEP,
        bus.publish_with_headers(&tagged(), &request_headers()),
    )
    .await
    .unwrap();
    recv(&mut seen, "the failing attempt").await;
    backend.until_nothing_pending("tagged", "tests").await;

    let dead = bus.dead_letters("tagged");
    let letters = within("list", STEP, dead.list(None, 10)).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].headers(), request_headers());
    assert_eq!(letters[0].field("@@tag"), Some("@vip"));

    fail.store(false, Ordering::SeqCst);
    let replayed = within("replay", STEP, dead.replay(letters[0].id))
        .await
        .unwrap();
    let again = recv(&mut seen, "the replayed entry").await;
    assert_eq!(Some(again.entry_id), replayed);
    assert_eq!(again.event, tagged());
    assert_eq!(again.headers, request_headers());
    backend.until_nothing_pending("tagged", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(a_header_name_that_cannot_be_stored_publishes_nothing);
async fn a_header_name_that_cannot_be_stored_publishes_nothing(backend: Backend) {
    let bus = within("build", STEP, backend.builder().build())
        .await
        .unwrap();
    for bad in ["", "request id", "a:b"] {
        let headers: Headers = [("ok", "1"), (bad, "2")].into_iter().collect();
        let error = within(
            "publish",
            STEP,
            bus.publish_with_headers(&tagged(), &headers),
        )
        .await
        .unwrap_err();
        match &error {
            slim_bus::Error::InvalidHeader { name, .. } => assert_eq!(name, bad),
            other => panic!("expected InvalidHeader for {bad:?}, got {other}"),
        }
        assert!(error.to_string().contains("invalid header name"), "{error}");
    }
    assert_eq!(backend.stream_len("tagged").await, 0);
}
