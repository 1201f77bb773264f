//! Batch handlers: batches of at most `max_batch`, one outcome per entry (acknowledged,
//! retried, then dead-lettered), and undecodable entries dead-lettered on their own. Each
//! test runs against a real redis-server and the in-memory backend.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use slim_bus::{BatchHandler, BatchOutcome, Context, DeadLetterReason, HandlerError};
use slim_bus_tests::within;
use support::*;
use tokio::sync::mpsc;

/// Reports each batch as `(seq, delivery count)` pairs; fails the entries with an odd
/// `seq`, every time.
struct FailOdd {
    max_batch: usize,
    batches: mpsc::UnboundedSender<Vec<(u64, u64)>>,
}

#[slim_bus::async_trait]
impl BatchHandler for FailOdd {
    type Event = UserCreated;

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    async fn handle_batch(&self, batch: Vec<(UserCreated, Context)>) -> BatchOutcome {
        let _ = self.batches.send(
            batch
                .iter()
                .map(|(event, ctx)| (event.seq, ctx.delivery_count()))
                .collect(),
        );
        BatchOutcome::each(
            batch
                .iter()
                .map(|(event, _)| {
                    if event.seq % 2 == 1 {
                        Err(HandlerError::new(format!("odd {}", event.seq)))
                    } else {
                        Ok(())
                    }
                })
                .collect(),
        )
    }

    fn max_deliveries(&self) -> Option<u64> {
        Some(2)
    }
}

async fn dead_letter_count(bus: &slim_bus::EventBus, expected: usize) -> Vec<slim_bus::DeadLetter> {
    let dead = bus.dead_letters("user.created");
    within("the dead letters", STEP, async {
        loop {
            let letters = dead.list(None, 100).await.unwrap();
            if letters.len() >= expected {
                return letters;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

conformance!(a_batch_handler_gets_batches_of_at_most_its_size_and_each_entry_its_own_outcome);
async fn a_batch_handler_gets_batches_of_at_most_its_size_and_each_entry_its_own_outcome(
    backend: Backend,
) {
    let (batches, mut seen) = mpsc::unbounded_channel();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
            .batch_handler(FailOdd {
                max_batch: 4,
                batches,
            })
            .build(),
    )
    .await
    .unwrap();
    // Published before listening, so that one read brings more than a batch.
    let ids = within(
        "publish",
        STEP,
        bus.publish_batch(&(0..10).map(user).collect::<Vec<_>>()),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();

    // Ten first deliveries and five retries of the odd ones.
    let mut deliveries: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    let mut calls = 0;
    while deliveries.values().map(Vec::len).sum::<usize>() < 15 {
        let batch = recv(&mut seen, "a batch").await;
        assert!(
            !batch.is_empty() && batch.len() <= 4,
            "batch of {}",
            batch.len()
        );
        calls += 1;
        for (seq, count) in batch {
            deliveries.entry(seq).or_default().push(count);
        }
    }
    assert!(
        calls < 15,
        "entries were handled in batches, not one by one"
    );
    for (seq, counts) in &deliveries {
        let expected: &[u64] = if seq % 2 == 1 { &[1, 2] } else { &[1] };
        assert_eq!(counts, expected, "deliveries of seq {seq}");
    }

    let letters = dead_letter_count(&bus, 5).await;
    backend.until_nothing_pending("user.created", "tests").await;
    let mut dead: Vec<_> = letters
        .iter()
        .map(|letter| {
            assert_eq!(letter.reason, Some(DeadLetterReason::Handler));
            assert_eq!(letter.delivery_count, 2);
            letter.origin_id.unwrap()
        })
        .collect();
    dead.sort_unstable();
    let odd: Vec<_> = ids.iter().copied().skip(1).step_by(2).collect();
    assert_eq!(
        dead, odd,
        "the odd entries, and only they, are dead letters"
    );
    assert!(
        seen.try_recv().is_err(),
        "no delivery after the dead letters"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// Reports the `seq` of each entry it gets; succeeds.
struct Collect {
    seqs: mpsc::UnboundedSender<u64>,
}

#[slim_bus::async_trait]
impl BatchHandler for Collect {
    type Event = UserCreated;

    fn max_batch(&self) -> usize {
        10
    }

    async fn handle_batch(&self, batch: Vec<(UserCreated, Context)>) -> BatchOutcome {
        for (event, _) in &batch {
            let _ = self.seqs.send(event.seq);
        }
        BatchOutcome::ok()
    }
}

conformance!(an_undecodable_entry_of_a_batch_is_dead_lettered_and_the_others_are_handled);
async fn an_undecodable_entry_of_a_batch_is_dead_lettered_and_the_others_are_handled(
    backend: Backend,
) {
    let (seqs, mut seen) = mpsc::unbounded_channel();
    let bus = within(
        "build",
        STEP,
        backend.bus().batch_handler(Collect { seqs }).build(),
    )
    .await
    .unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    let poison = backend
        .xadd(
            "user.created",
            &[("user_id", b"u2"), ("user_name", b"U"), ("seq", b"two")],
        )
        .await;
    within("publish", STEP, bus.publish(&user(3)))
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();

    let mut handled = vec![
        recv(&mut seen, "an entry").await,
        recv(&mut seen, "an entry").await,
    ];
    handled.sort_unstable();
    assert_eq!(handled, [1, 3]);
    let letters = dead_letter_count(&bus, 1).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].origin_id.unwrap().to_string(), poison);
    assert_eq!(letters[0].reason, Some(DeadLetterReason::Decode));
    assert!(letters[0].error.contains("seq"), "{}", letters[0].error);
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// Panics on its first call, then handles every batch; reports each call's seqs.
struct PanicsOnce {
    calls: std::sync::atomic::AtomicUsize,
    seqs: mpsc::UnboundedSender<Vec<u64>>,
}

#[slim_bus::async_trait]
impl BatchHandler for PanicsOnce {
    type Event = UserCreated;

    fn max_batch(&self) -> usize {
        10
    }

    async fn handle_batch(&self, batch: Vec<(UserCreated, Context)>) -> BatchOutcome {
        let _ = self
            .seqs
            .send(batch.iter().map(|(event, _)| event.seq).collect());
        if self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            panic!("the batch handler panics once");
        }
        BatchOutcome::ok()
    }
}

conformance!(an_undecodable_entry_of_a_batch_whose_call_panics_is_dead_lettered_at_once);
async fn an_undecodable_entry_of_a_batch_whose_call_panics_is_dead_lettered_at_once(
    backend: Backend,
) {
    let (seqs, mut calls) = mpsc::unbounded_channel();
    let handler = PanicsOnce {
        calls: Default::default(),
        seqs,
    };
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .retry_backoff(Duration::from_millis(20), Duration::from_millis(50))
            .batch_handler(handler)
            .build(),
    )
    .await
    .unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    let poison = backend
        .xadd(
            "user.created",
            &[("user_id", b"u2"), ("user_name", b"U"), ("seq", b"two")],
        )
        .await;
    within("publish", STEP, bus.publish(&user(3)))
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();

    assert_eq!(recv(&mut calls, "the call that panics").await, [1, 3]);
    let mut retried = Vec::new();
    while retried.len() < 2 {
        retried.extend(recv(&mut calls, "the retried entries").await);
    }
    retried.sort_unstable();
    assert_eq!(retried, [1, 3], "only the entries that decode are retried");
    let letters = dead_letter_count(&bus, 1).await;
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].origin_id.unwrap().to_string(), poison);
    assert_eq!(letters[0].reason, Some(DeadLetterReason::Decode));
    assert_eq!(
        letters[0].delivery_count, 1,
        "dead-lettered on its first delivery, not retried"
    );
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// A service whose method handles `user.created` in batches of at most three.
struct Store {
    sizes: mpsc::UnboundedSender<Vec<u64>>,
}

#[slim_bus::handlers]
impl Store {
    #[stream(batch = 3)]
    async fn store(&self, batch: Vec<(UserCreated, Context)>) -> Vec<Result<(), HandlerError>> {
        let _ = self
            .sizes
            .send(batch.iter().map(|(event, _)| event.seq).collect());
        batch.iter().map(|_| Ok(())).collect()
    }
}

conformance!(a_handlers_method_with_batch_gets_batches_of_at_most_its_size);
async fn a_handlers_method_with_batch_gets_batches_of_at_most_its_size(backend: Backend) {
    let (sizes, mut seen) = mpsc::unbounded_channel();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .service(std::sync::Arc::new(Store { sizes }))
            .build(),
    )
    .await
    .unwrap();
    within(
        "publish",
        STEP,
        bus.publish_batch(&(0..7).map(user).collect::<Vec<_>>()),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let mut handled = Vec::new();
    while handled.len() < 7 {
        let batch = recv(&mut seen, "a batch").await;
        assert!(batch.len() <= 3, "batch of {}", batch.len());
        handled.extend(batch);
    }
    handled.sort_unstable();
    assert_eq!(handled, (0..7).collect::<Vec<_>>());
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}
