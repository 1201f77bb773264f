//! The macros against a real redis-server: derived events, `#[stream]` functions and
//! `#[handlers]` services receive what is published, and their outcomes reach the bus.
#![allow(clippy::unwrap_used)]
// Handlers that await nothing must not trip it: they must be `async` all the same.
#![warn(clippy::unused_async)]

mod support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slim_bus::{Context, DeadLetterReason, Event, HandlerError, StreamHandler};
use slim_bus_tests::within;
use support::*;
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "account.opened")]
struct AccountOpened {
    account_id: String,
    owner: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "account.closed")]
struct AccountClosed {
    account_id: String,
}

/// No stream of its own: handlers name one, and publishers use `publish_to`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, slim_bus::Event)]
struct AccountAudited {
    account_id: String,
    note: String,
}

fn opened(n: u32) -> AccountOpened {
    AccountOpened {
        account_id: format!("a{n}"),
        owner: format!("Owner {n}"),
    }
}

/// What a handler saw: the event as text, the stream, and (when it takes one) the
/// context's delivery count.
#[derive(Debug, Clone, PartialEq)]
struct Delivery {
    handler: &'static str,
    stream: Option<String>,
    event: String,
    delivery_count: Option<u64>,
}

type Deliveries = mpsc::UnboundedSender<Delivery>;

fn delivery(handler: &'static str, event: impl std::fmt::Debug, ctx: Option<&Context>) -> Delivery {
    Delivery {
        handler,
        stream: ctx.map(|ctx| ctx.stream().to_owned()),
        event: format!("{event:?}"),
        delivery_count: ctx.map(Context::delivery_count),
    }
}

/// What `handler` reports for `event`: with the stream and a first delivery when it takes
/// the context (`stream` is then `Some`).
fn expected(handler: &'static str, event: impl std::fmt::Debug, stream: Option<&str>) -> Delivery {
    Delivery {
        handler,
        stream: stream.map(str::to_owned),
        event: format!("{event:?}"),
        delivery_count: stream.map(|_| 1),
    }
}

#[test]
fn derived_events_name_their_stream_or_none() {
    assert_eq!(AccountOpened::STREAM, Some("account.opened"));
    assert_eq!(AccountClosed::STREAM, Some("account.closed"));
    assert_eq!(AccountAudited::STREAM, None);
}

/// A service whose three handlers read three streams, sharing the service's state.
struct Accounts {
    seen: Deliveries,
}

#[slim_bus::handlers]
impl Accounts {
    /// On the event type's stream, `account.opened`.
    #[stream]
    async fn on_opened(&self, event: AccountOpened) -> anyhow::Result<()> {
        self.report(delivery("on_opened", event, None))
    }

    #[stream("account.closed")]
    async fn on_closed(&self, event: AccountClosed, ctx: Context) -> Result<(), HandlerError> {
        Ok(self.report(delivery("on_closed", event, Some(&ctx)))?)
    }

    /// An event type without a stream, on the stream the attribute names.
    #[stream("account.audited")]
    async fn on_audited(&self, event: AccountAudited, ctx: Context) {
        let _ = self.report(delivery("on_audited", event, Some(&ctx)));
    }

    fn report(&self, delivery: Delivery) -> anyhow::Result<()> {
        self.seen.send(delivery)?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_receives_each_event_type_on_its_stream_and_is_shared_not_cloned() {
    let server = start_server().await;
    let (seen, mut deliveries) = mpsc::unbounded_channel();
    let accounts = Arc::new(Accounts { seen });
    let bus = within(
        "build",
        STEP,
        bus(&server).service(accounts.clone()).build(),
    )
    .await
    .unwrap();
    // One reference here, one in each of the three handlers: shared, not cloned.
    assert_eq!(Arc::strong_count(&accounts), 4);
    let mut streams: Vec<&str> = bus.streams().collect();
    streams.sort_unstable();
    assert_eq!(
        streams,
        ["account.audited", "account.closed", "account.opened"]
    );
    let listener = within("listen", STEP, bus.listen()).await.unwrap();

    within("publish", STEP, bus.publish(&opened(1)))
        .await
        .unwrap();
    let closed = AccountClosed {
        account_id: "a1".into(),
    };
    within("publish", STEP, bus.publish(&closed)).await.unwrap();
    let audited = AccountAudited {
        account_id: "a1".into(),
        note: "checked".into(),
    };
    within(
        "publish_to",
        STEP,
        bus.publish_to("account.audited", &audited),
    )
    .await
    .unwrap();

    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(recv(&mut deliveries, "a delivery to the service").await);
    }
    got.sort_by_key(|delivery| delivery.handler);
    assert_eq!(
        got,
        [
            expected("on_audited", &audited, Some("account.audited")),
            expected("on_closed", &closed, Some("account.closed")),
            expected("on_opened", opened(1), None),
        ]
    );
    for stream in ["account.opened", "account.closed", "account.audited"] {
        until_nothing_pending(&server, stream, "tests").await;
    }
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_methods_stay_callable_as_written() {
    let (seen, mut deliveries) = mpsc::unbounded_channel();
    let accounts = Accounts { seen };
    within("a direct call", STEP, accounts.on_opened(opened(2)))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut deliveries, "the direct call").await,
        expected("on_opened", opened(2), None)
    );
}

/// Where the free handlers of one test report; each test has its own, so tests that share
/// a process don't see each other's deliveries.
fn reporter(slot: &'static OnceLock<Deliveries>) -> mpsc::UnboundedReceiver<Delivery> {
    let (seen, deliveries) = mpsc::unbounded_channel();
    slot.set(seen).expect("one bus per test");
    deliveries
}

fn report(slot: &OnceLock<Deliveries>, delivery: Delivery) -> anyhow::Result<()> {
    slot.get()
        .ok_or_else(|| anyhow::anyhow!("no reporter"))?
        .send(delivery)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fn_handlers_with_and_without_context_receive_their_events() {
    static SEEN: OnceLock<Deliveries> = OnceLock::new();

    /// With the context, on the event type's stream.
    #[slim_bus::stream]
    async fn welcome(event: AccountOpened, ctx: Context) -> anyhow::Result<()> {
        report(&SEEN, delivery("welcome", event, Some(&ctx)))
    }

    /// Without it, on a stream of its own.
    #[slim_bus::stream("account.closed.audit")]
    async fn audit_closing(event: AccountClosed) -> Result<(), HandlerError> {
        Ok(report(&SEEN, delivery("audit_closing", event, None))?)
    }

    let server = start_server().await;
    let mut deliveries = reporter(&SEEN);
    let bus = within(
        "build",
        STEP,
        bus(&server).handler(welcome).handler(audit_closing).build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();

    within("publish", STEP, bus.publish(&opened(3)))
        .await
        .unwrap();
    let closed = AccountClosed {
        account_id: "a3".into(),
    };
    within(
        "publish_to",
        STEP,
        bus.publish_to("account.closed.audit", &closed),
    )
    .await
    .unwrap();

    let mut got = vec![
        recv(&mut deliveries, "a delivery").await,
        recv(&mut deliveries, "another delivery").await,
    ];
    got.sort_by_key(|delivery| delivery.handler);
    assert_eq!(
        got,
        [
            expected("audit_closing", &closed, None),
            expected("welcome", opened(3), Some("account.opened")),
        ]
    );
    until_nothing_pending(&server, "account.opened", "tests").await;
    until_nothing_pending(&server, "account.closed.audit", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fn_handlers_stay_callable_through_call() {
    static SEEN: OnceLock<Deliveries> = OnceLock::new();

    #[slim_bus::stream]
    async fn count_closing(event: AccountClosed) -> anyhow::Result<()> {
        report(&SEEN, delivery("count_closing", event, None))
    }

    let mut deliveries = reporter(&SEEN);
    let closed = AccountClosed {
        account_id: "a4".into(),
    };
    within("a direct call", STEP, count_closing::call(closed.clone()))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut deliveries, "the direct call").await,
        expected("count_closing", &closed, None)
    );
    // The handler value is a unit struct with the function's name.
    assert_eq!(count_closing.stream(), None);
}

/// A handler's own error type.
#[derive(Debug)]
struct LedgerDown;

impl std::fmt::Display for LedgerDown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the ledger is down")
    }
}

impl std::error::Error for LedgerDown {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anyhow_and_custom_errors_leave_the_entry_pending() {
    static SEEN: OnceLock<Deliveries> = OnceLock::new();

    #[slim_bus::stream("ledger.anyhow")]
    async fn fails_with_anyhow(event: AccountOpened) -> anyhow::Result<()> {
        report(&SEEN, delivery("fails_with_anyhow", event, None))?;
        anyhow::bail!("the ledger is down")
    }

    #[slim_bus::stream("ledger.custom")]
    async fn fails_with_custom_error(event: AccountOpened) -> Result<(), LedgerDown> {
        let _ = report(&SEEN, delivery("fails_with_custom_error", event, None));
        Err(LedgerDown)
    }

    let server = start_server().await;
    let mut deliveries = reporter(&SEEN);
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .handler(fails_with_anyhow)
            .handler(fails_with_custom_error)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for stream in ["ledger.anyhow", "ledger.custom"] {
        within("publish_to", STEP, bus.publish_to(stream, &opened(5)))
            .await
            .unwrap();
    }
    let mut failed = Vec::new();
    while failed.len() < 2 {
        let delivery = recv(&mut deliveries, "a failing call").await;
        if !failed.contains(&delivery.handler) {
            failed.push(delivery.handler);
        }
    }
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    assert_eq!(pending_count(&server, "ledger.anyhow", "tests").await, 1);
    assert_eq!(pending_count(&server, "ledger.custom", "tests").await, 1);
}

/// Gives up on every entry, as a trait handler: the reference for the macro handler below.
struct GivesUp(Deliveries);

#[slim_bus::async_trait]
impl StreamHandler for GivesUp {
    type Event = AccountOpened;

    async fn handle(&self, event: AccountOpened, _ctx: Context) -> Result<(), HandlerError> {
        let _ = self.0.send(delivery("trait handler", event, None));
        Err(HandlerError::permanent("this account can never be opened"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_failure_from_a_macro_handler_is_treated_like_one_from_a_trait_handler() {
    static SEEN: OnceLock<Deliveries> = OnceLock::new();

    #[slim_bus::stream("outcome.macro")]
    async fn gives_up(event: AccountOpened) -> Result<(), HandlerError> {
        let _ = report(&SEEN, delivery("macro handler", event, None));
        Err(HandlerError::permanent("this account can never be opened"))
    }

    let server = start_server().await;
    let mut deliveries = reporter(&SEEN);
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .handler(gives_up)
            .handler_on("outcome.trait", GivesUp(SEEN.get().unwrap().clone()))
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for stream in ["outcome.macro", "outcome.trait"] {
        within("publish_to", STEP, bus.publish_to(stream, &opened(6)))
            .await
            .unwrap();
    }
    let mut called = Vec::new();
    while called.len() < 2 {
        let delivery = recv(&mut deliveries, "a call that gives up").await;
        if !called.contains(&delivery.handler) {
            called.push(delivery.handler);
        }
    }
    // Both are dead-lettered on their first delivery, with the handler's error.
    for stream in ["outcome.macro", "outcome.trait"] {
        until_nothing_pending(&server, stream, "tests").await;
        let letters = within("list", STEP, bus.dead_letters(stream).list(None, 10))
            .await
            .unwrap();
        assert_eq!(letters.len(), 1, "{stream}");
        assert_eq!(
            letters[0].reason,
            Some(DeadLetterReason::Permanent),
            "{stream}"
        );
        assert_eq!(letters[0].delivery_count, 1, "{stream}");
        assert_eq!(
            letters[0].error, "this account can never be opened",
            "{stream}"
        );
    }
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_event_type_is_handled_on_two_streams_with_handler_on() {
    static SEEN: OnceLock<Deliveries> = OnceLock::new();

    #[slim_bus::stream("audit.default")]
    async fn audit_eu(event: AccountAudited, ctx: Context) {
        let _ = report(&SEEN, delivery("audit_eu", event, Some(&ctx)));
    }

    #[slim_bus::stream("audit.default")]
    async fn audit_us(event: AccountAudited, ctx: Context) {
        let _ = report(&SEEN, delivery("audit_us", event, Some(&ctx)));
    }

    let server = start_server().await;
    let mut deliveries = reporter(&SEEN);
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .handler_on("audit.eu", audit_eu)
            .handler_on("audit.us", audit_us)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let audited = |region: &str| AccountAudited {
        account_id: "a7".into(),
        note: format!("audited in {region}"),
    };
    for region in ["eu", "us"] {
        let stream = format!("audit.{region}");
        within(
            "publish_to",
            STEP,
            bus.publish_to(&stream, &audited(region)),
        )
        .await
        .unwrap();
    }
    let mut got = vec![
        recv(&mut deliveries, "a delivery").await,
        recv(&mut deliveries, "another delivery").await,
    ];
    got.sort_by_key(|delivery| delivery.handler);
    assert_eq!(
        got,
        [
            expected("audit_eu", audited("eu"), Some("audit.eu")),
            expected("audit_us", audited("us"), Some("audit.us")),
        ]
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// A crate that re-exports slim-bus under another path, as a service's own platform crate
/// would.
mod platform {
    pub(crate) use slim_bus as events;
}

mod reexported {
    use super::*;
    use crate::platform::events;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, events::Event)]
    #[event(stream = "invoice.paid", crate = "crate::platform::events")]
    pub(super) struct InvoicePaid {
        pub(super) invoice_id: String,
    }

    #[events::stream(crate = "crate::platform::events")]
    pub(super) async fn on_paid(event: InvoicePaid) -> anyhow::Result<()> {
        report(
            &super::REEXPORTED,
            delivery("on_paid", event.invoice_id, None),
        )
    }

    pub(super) struct Billing;

    #[events::handlers(crate = "crate::platform::events")]
    impl Billing {
        #[stream("invoice.paid.billing")]
        async fn on_paid(&self, event: InvoicePaid) -> anyhow::Result<()> {
            report(
                &super::REEXPORTED,
                delivery("Billing::on_paid", event.invoice_id, None),
            )
        }
    }
}

static REEXPORTED: OnceLock<Deliveries> = OnceLock::new();

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn macros_work_through_a_reexport_with_crate() {
    use reexported::{Billing, InvoicePaid};

    assert_eq!(InvoicePaid::STREAM, Some("invoice.paid"));
    let server = start_server().await;
    let mut deliveries = reporter(&REEXPORTED);
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .handler(reexported::on_paid)
            .service(Arc::new(Billing))
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let paid = InvoicePaid {
        invoice_id: "i1".into(),
    };
    within("publish", STEP, bus.publish(&paid)).await.unwrap();
    within(
        "publish_to",
        STEP,
        bus.publish_to("invoice.paid.billing", &paid),
    )
    .await
    .unwrap();
    let mut got = vec![
        recv(&mut deliveries, "a delivery").await.handler,
        recv(&mut deliveries, "another delivery").await.handler,
    ];
    got.sort_unstable();
    assert_eq!(got, ["Billing::on_paid", "on_paid"]);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handlers_on_one_stream_are_rejected_at_build() {
    #[slim_bus::stream]
    async fn first(_: AccountOpened) {}

    #[slim_bus::stream("account.opened")]
    async fn second(_: AccountOpened) {}

    let server = start_server().await;
    let error = within(
        "build",
        STEP,
        bus(&server).handler(first).handler(second).build(),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&error, slim_bus::Error::DuplicateHandler { stream, .. } if stream == "account.opened"),
        "{error}"
    );
}

/// Settings on the attribute override the bus's for that handler only: the timeout is
/// honoured by the consumer, and the entry is given up on after that many deliveries.
#[tokio::test(start_paused = true)]
async fn stream_attribute_settings_override_the_bus_for_their_handler() {
    use slim_bus::testing::{Outcome, TestBus};

    #[slim_bus::stream("settings.slow", max_deliveries = 2, timeout = "50ms")]
    async fn slow(event: AccountAudited) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let _ = event;
    }

    struct Ledger;

    #[slim_bus::handlers]
    impl Ledger {
        #[stream("settings.failing", max_deliveries = 1)]
        async fn failing(&self, event: AccountAudited) -> anyhow::Result<()> {
            anyhow::bail!("ledger refused {}", event.account_id)
        }

        // The bus's settings: a 1 s sleep fits its 5 s timeout.
        #[stream("settings.default")]
        async fn patient(&self, event: AccountAudited) {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = event;
        }
    }

    let builder = slim_bus::EventBus::builder()
        .handler_timeout(Duration::from_secs(5))
        .max_deliveries(5)
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(10))
        .handler(slow)
        .service(Arc::new(Ledger));
    let mut bus = TestBus::new(builder).await.unwrap();
    let audited = AccountAudited {
        account_id: "a1".into(),
        note: "n".into(),
    };
    let slow_id = bus
        .bus()
        .publish_to("settings.slow", &audited)
        .await
        .unwrap();
    let failing_id = bus
        .bus()
        .publish_to("settings.failing", &audited)
        .await
        .unwrap();
    let patient_id = bus
        .bus()
        .publish_to("settings.default", &audited)
        .await
        .unwrap();
    bus.run_until_idle().await.unwrap();

    let Outcome::DeadLettered {
        deliveries: 2,
        reason: Some(DeadLetterReason::Timeout),
        error,
    } = bus.outcome(slow_id)
    else {
        panic!(
            "not given up on after 2 timeouts: {:?}",
            bus.outcome(slow_id)
        );
    };
    assert!(error.contains("within 50ms"), "{error}");
    assert!(
        matches!(
            bus.outcome(failing_id),
            Outcome::DeadLettered {
                deliveries: 1,
                reason: Some(DeadLetterReason::Handler),
                ..
            }
        ),
        "{:?}",
        bus.outcome(failing_id)
    );
    assert_eq!(bus.outcome(patient_id), Outcome::Acked { deliveries: 1 });
}
