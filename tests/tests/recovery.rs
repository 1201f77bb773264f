//! Recovery after what a server forgets or a consumer stops in the middle of: a consumer
//! group that is gone (deleted, flushed, lost in a restart without persistence) is created
//! again just after the last entry delivered to this consumer, and a retry asked for with
//! `retry_after` keeps its time across a restart of the bus. Each test runs against a real
//! redis-server and the in-memory backend.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use slim_bus::{EventBus, HandlerError, StartFrom};
use slim_bus_tests::within;
use support::*;
use tokio::sync::mpsc;

/// How a group is lost.
#[derive(Clone, Copy, Debug)]
enum Loss {
    /// `XGROUP DESTROY`: the stream stays.
    DestroyGroup,
    /// `DEL` of the stream, with its groups.
    DeleteStream,
    /// `FLUSHALL`, as a restart of a server without persistence.
    FlushAll,
}

/// Loses the group `tests` of `user.created` as `loss` says and publishes `seqs` in the
/// same step (a `MULTI` on Redis; with nothing awaited in between on the in-memory
/// backend, whose clock is paused), so that they are published before the bus notices.
async fn lose_group_and_publish(backend: &Backend, publisher: &EventBus, loss: Loss, seqs: &[u64]) {
    match backend {
        Backend::Memory(broker) => {
            match loss {
                Loss::DestroyGroup => assert!(broker.destroy_group("user.created", "tests")),
                Loss::DeleteStream => broker.delete_stream("user.created"),
                Loss::FlushAll => broker.flush_all(),
            }
            let users: Vec<UserCreated> = seqs.iter().copied().map(user).collect();
            if !users.is_empty() {
                within("publish", STEP, publisher.publish_batch(&users))
                    .await
                    .unwrap();
            }
        }
        _ => {
            let server = backend.server().unwrap();
            let mut conn = server.connection().await;
            let mut pipe = redis::pipe();
            pipe.atomic();
            match loss {
                Loss::DestroyGroup => {
                    pipe.cmd("XGROUP")
                        .arg("DESTROY")
                        .arg("user.created")
                        .arg("tests")
                        .ignore();
                }
                Loss::DeleteStream => {
                    pipe.cmd("DEL").arg("user.created").ignore();
                }
                Loss::FlushAll => {
                    pipe.cmd("FLUSHALL").ignore();
                }
            }
            for &seq in seqs {
                let user = user(seq);
                pipe.cmd("XADD")
                    .arg("user.created")
                    .arg("*")
                    .arg("user_id")
                    .arg(&user.user_id)
                    .arg("user_name")
                    .arg(&user.user_name)
                    .arg("seq")
                    .arg(seq)
                    .ignore();
            }
            let () = within("MULTI ... EXEC", STEP, pipe.query_async(&mut conn))
                .await
                .unwrap();
        }
    }
}

/// Receives handled seqs until each of `expected` was handled, then, once nothing is
/// pending, takes whatever else was handled: every seq handled, sorted.
async fn handled(
    backend: &Backend,
    seen: &mut mpsc::UnboundedReceiver<Seen<UserCreated>>,
    expected: &[u64],
) -> Vec<u64> {
    let mut handled = Vec::new();
    while !expected.iter().all(|seq| handled.contains(seq)) {
        handled.push(recv(seen, "an entry to be handled").await.event.seq);
    }
    backend.until_nothing_pending("user.created", "tests").await;
    while let Ok(seen) = seen.try_recv() {
        handled.push(seen.event.seq);
    }
    handled.sort_unstable();
    handled
}

/// With `start_from` new entries only, a lost group created again at `$` would skip what
/// was published between the loss and the heal: it is created just after the last entry
/// delivered instead, and those entries are handled.
async fn entries_published_while_the_group_is_lost_are_handled(backend: Backend, loss: Loss) {
    let (handler, mut seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .start_from(StartFrom::NewOnly)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let publisher = within("build a publisher", STEP, backend.builder().build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, publisher.publish(&user(1)))
        .await
        .unwrap();
    assert_eq!(handled(&backend, &mut seen, &[1]).await, [1]);

    lose_group_and_publish(&backend, &publisher, loss, &[2, 3]).await;
    within("publish", STEP, publisher.publish(&user(4)))
        .await
        .unwrap();
    assert_eq!(
        handled(&backend, &mut seen, &[2, 3, 4]).await,
        [2, 3, 4],
        "{loss:?}: what was published before the heal is handled"
    );
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

conformance!(entries_published_while_the_group_is_destroyed_are_handled);
async fn entries_published_while_the_group_is_destroyed_are_handled(backend: Backend) {
    entries_published_while_the_group_is_lost_are_handled(backend, Loss::DestroyGroup).await
}

conformance!(entries_published_after_the_stream_is_deleted_are_handled);
async fn entries_published_after_the_stream_is_deleted_are_handled(backend: Backend) {
    entries_published_while_the_group_is_lost_are_handled(backend, Loss::DeleteStream).await
}

conformance!(entries_published_after_a_flushall_are_handled);
async fn entries_published_after_a_flushall_are_handled(backend: Backend) {
    entries_published_while_the_group_is_lost_are_handled(backend, Loss::FlushAll).await
}

// With `start_from` the beginning, a lost group created again at `0` would handle the
// whole retained stream again: it is created just after the last entry delivered
// instead, and only new entries are handled.
conformance!(a_lost_group_on_a_retained_stream_does_not_handle_old_entries_again);
async fn a_lost_group_on_a_retained_stream_does_not_handle_old_entries_again(backend: Backend) {
    let (handler, mut seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .start_from(StartFrom::Beginning)
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let publisher = within("build a publisher", STEP, backend.builder().build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let users: Vec<UserCreated> = (1..=3).map(user).collect();
    within("publish", STEP, publisher.publish_batch(&users))
        .await
        .unwrap();
    assert_eq!(handled(&backend, &mut seen, &[1, 2, 3]).await, [1, 2, 3]);

    lose_group_and_publish(&backend, &publisher, Loss::DestroyGroup, &[4]).await;
    within("publish", STEP, publisher.publish(&user(5)))
        .await
        .unwrap();
    assert_eq!(
        handled(&backend, &mut seen, &[4, 5]).await,
        [4, 5],
        "entries handled before the loss are not handled again"
    );
    backend.until_nothing_pending("user.created", "tests").await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    assert_eq!(backend.stream_len("user.created").await, 5);
}

/// How many retry due times group `tests` has recorded on `user.created`.
async fn recorded_retry_dues(backend: &Backend) -> usize {
    match backend {
        Backend::Memory(broker) => broker.recorded_retry_dues("user.created", "tests"),
        _ => {
            let mut conn = backend.server().unwrap().connection().await;
            within(
                "HLEN",
                STEP,
                redis::cmd("HLEN")
                    .arg("{user.created}:retry_at:tests")
                    .query_async(&mut conn),
            )
            .await
            .unwrap()
        }
    }
}

// A handler that asked for its retry in 3 s is not run again at once when the bus restarts
// (recovering what it held), but at that time.
conformance!(a_retry_asked_for_keeps_its_time_across_a_restart);
async fn a_retry_asked_for_keeps_its_time_across_a_restart(backend: Backend) {
    const ASKED: Duration = Duration::from_secs(3);
    let (later, mut first_calls) = Scripted::<UserCreated>::new(|_, _| async {
        Err(HandlerError::retry_after(
            ASKED,
            "the downstream asks for later",
        ))
    });
    let bus = within("build", STEP, backend.bus().handler(later).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    let first = recv(&mut first_calls, "the first delivery").await;
    let asked_at = tokio::time::Instant::now();
    within("the due time to be recorded", STEP, async {
        while recorded_retry_dues(&backend).await == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    assert_eq!(backend.pending_count("user.created", "tests").await, 1);

    let (handler, mut calls) = Record::<UserCreated>::new();
    let restarted = within("build", STEP, backend.bus().handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, restarted.listen()).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(1), calls.recv())
            .await
            .is_err(),
        "the recovered entry ran before the time its handler asked for"
    );
    let again = recv(&mut calls, "the retry at its time").await;
    assert_eq!(again.entry_id, first.entry_id);
    assert!(asked_at.elapsed() >= Duration::from_secs(1));
    backend.until_nothing_pending("user.created", "tests").await;
    within("the due time to be deleted", STEP, async {
        while recorded_retry_dues(&backend).await > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}
