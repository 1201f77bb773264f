//! Metrics through the `metrics` facade: a recorder installed by the application sees the
//! counters, histograms and gauges move by the right amounts, on both backends.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use slim_bus::HandlerError;
use slim_bus_tests::within;
use support::*;

/// Every metric seen so far, by name and sorted labels: counters and histogram sample
/// counts summed over snapshots (the debugging recorder resets them on each), gauges as
/// last set.
#[derive(Default)]
struct Totals(HashMap<(String, Vec<(String, String)>), f64>);

static RECORDER: OnceLock<(Snapshotter, Mutex<Totals>)> = OnceLock::new();

fn recorder() -> &'static (Snapshotter, Mutex<Totals>) {
    RECORDER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().unwrap();
        (snapshotter, Mutex::new(Totals::default()))
    })
}

/// Takes a snapshot into the totals.
fn absorb() {
    let (snapshotter, totals) = recorder();
    let mut totals = totals.lock().unwrap();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let mut key_labels: Vec<(String, String)> = key
            .key()
            .labels()
            .map(|label| (label.key().to_owned(), label.value().to_owned()))
            .collect();
        key_labels.sort();
        let slot = totals
            .0
            .entry((key.key().name().to_owned(), key_labels))
            .or_default();
        match value {
            DebugValue::Counter(n) => *slot += n as f64,
            DebugValue::Histogram(samples) => *slot += samples.len() as f64,
            DebugValue::Gauge(value) => *slot = value.into_inner(),
        }
    }
}

/// The value of `name` with `labels` in the totals, as of the last [`absorb`].
fn total(name: &str, labels: &[(&str, &str)]) -> f64 {
    let totals = recorder().1.lock().unwrap();
    let mut wanted: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    wanted.sort();
    totals
        .0
        .get(&(name.to_owned(), wanted))
        .copied()
        .unwrap_or(0.0)
}

conformance!(counters_histograms_and_gauges_move_by_what_the_bus_did);
async fn counters_histograms_and_gauges_move_by_what_the_bus_did(backend: Backend) {
    recorder();
    // Each backend's run has a stream and group of its own: under `cargo test` both share
    // the process and its recorder.
    let (stream, group) = match backend {
        Backend::Redis(_) => ("metrics.redis", "metrics-redis"),
        Backend::Tls(..) => ("metrics.tls", "metrics-tls"),
        Backend::Memory(_) => ("metrics.memory", "metrics-memory"),
    };
    let (handler, mut seen) = Scripted::new(|event: UserCreated, _| async move {
        match event.seq {
            0 | 1 => Ok(()),
            2 => Err(HandlerError::permanent("bad")),
            _ => Err(HandlerError::retry_after(Duration::from_secs(600), "later")),
        }
    });
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .consumer_group(group)
            .handler_on(stream, handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for seq in 0..4 {
        within("publish", STEP, bus.publish_to(stream, &user(seq)))
            .await
            .unwrap();
    }
    for _ in 0..4 {
        recv(&mut seen, "an attempt").await;
    }

    let consumer = [
        ("messaging_destination_name", stream),
        ("messaging_consumer_group_name", group),
    ];
    let with = |extra: (&'static str, &'static str)| {
        let mut labels = consumer.to_vec();
        labels.push(extra);
        labels
    };
    within("the counters to move", STEP, async {
        loop {
            absorb();
            if total(
                "slim_bus_dead_lettered_messages_total",
                &with(("reason", "permanent")),
            ) == 1.0
                && total("slim_bus_retried_messages_total", &consumer) == 1.0
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert_eq!(
        total("slim_bus_consumed_messages_total", &with(("outcome", "ok"))),
        2.0
    );
    assert_eq!(
        total(
            "slim_bus_consumed_messages_total",
            &with(("outcome", "error"))
        ),
        2.0
    );
    for outcome in ["timeout", "panic", "decode"] {
        assert_eq!(
            total(
                "slim_bus_consumed_messages_total",
                &with(("outcome", outcome))
            ),
            0.0,
            "{outcome}"
        );
    }
    assert_eq!(
        total("slim_bus_process_duration_seconds", &consumer),
        4.0,
        "one handler duration per attempt"
    );
    assert_eq!(total("slim_bus_delivery_delay_seconds", &consumer), 4.0);
    let destination = [("messaging_destination_name", stream)];
    assert_eq!(total("slim_bus_sent_messages_total", &destination), 4.0);
    assert_eq!(total("slim_bus_send_duration_seconds", &destination), 4.0);
    assert_eq!(total("slim_bus_send_failures_total", &destination), 0.0);

    // health() refreshes the per-stream gauges: one entry waits for its retry, one is a
    // dead letter, nothing is left to deliver.
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(health.streams[0].pending, 1, "{health:?}");
    absorb();
    assert_eq!(total("slim_bus_pending_messages", &consumer), 1.0);
    assert_eq!(total("slim_bus_dead_letters_messages", &consumer), 1.0);
    assert_eq!(total("slim_bus_lag_messages", &consumer), 0.0);
    assert!(total("slim_bus_oldest_pending_age_seconds", &consumer) >= 0.0);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();

    // A publish Redis refuses: the key holds another type.
    if let Backend::Redis(server) = &backend {
        let mut redis = server.connection().await;
        let _: () = redis::cmd("SET")
            .arg("metrics.not-a-stream")
            .arg("x")
            .query_async(&mut redis)
            .await
            .unwrap();
        let refused = within(
            "a refused publish",
            STEP,
            bus.publish_to("metrics.not-a-stream", &user(9)),
        )
        .await;
        assert!(refused.is_err());
        absorb();
        let failed = [("messaging_destination_name", "metrics.not-a-stream")];
        assert_eq!(total("slim_bus_send_failures_total", &failed), 1.0);
        assert_eq!(total("slim_bus_sent_messages_total", &failed), 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_gauge_is_nan_once_redis_cannot_tell_the_lag() {
    recorder();
    let (stream, group) = ("metrics.lag-unknown", "metrics-lag-unknown");
    let server = start_server().await;
    let mut redis = server.connection().await;
    let _: () = within(
        "XGROUP CREATE",
        STEP,
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut redis),
    )
    .await
    .unwrap();
    let mut ids = Vec::new();
    for seq in 0..3 {
        let seq = seq.to_string();
        ids.push(xadd(&server, stream, &[("seq", seq.as_bytes())]).await);
    }
    let (handler, _seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        bus(&server)
            .consumer_group(group)
            .handler_on(stream, handler)
            .build(),
    )
    .await
    .unwrap();
    let consumer = [
        ("messaging_destination_name", stream),
        ("messaging_consumer_group_name", group),
    ];
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(health.streams[0].lag, Some(3), "{health:?}");
    absorb();
    assert_eq!(total("slim_bus_lag_messages", &consumer), 3.0);

    // An entry deleted from the middle of what the group has not read: Redis cannot tell
    // the lag any more, and the gauge must not go on showing the last count.
    let _: usize = within(
        "XDEL",
        STEP,
        redis::cmd("XDEL")
            .arg(stream)
            .arg(&ids[1])
            .query_async(&mut redis),
    )
    .await
    .unwrap();
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(health.streams[0].lag, None, "{health:?}");
    absorb();
    let lag = total("slim_bus_lag_messages", &consumer);
    assert!(lag.is_nan(), "the lag gauge shows {lag} for an unknown lag");
}

conformance!(own_entries_found_by_the_claim_scan_are_not_counted_as_claimed_from_others);
async fn own_entries_found_by_the_claim_scan_are_not_counted_as_claimed_from_others(
    backend: Backend,
) {
    recorder();
    let (stream, group) = match backend {
        Backend::Redis(_) => ("claims.redis", "claims-redis"),
        Backend::Tls(..) => ("claims.tls", "claims-tls"),
        Backend::Memory(_) => ("claims.memory", "claims-memory"),
    };
    let (release, released) = tokio::sync::watch::channel(false);
    let (handler, mut seen) = Scripted::new(move |event: UserCreated, _| {
        let mut released = released.clone();
        async move {
            if event.seq == 0 {
                let _ = released.wait_for(|go| *go).await;
            }
            Ok(())
        }
    });
    let bus = within(
        "build",
        STEP,
        backend
            .bus()
            .consumer_group(group)
            // One place: while the first entry runs, the bus reads nothing more.
            .max_concurrent(1)
            .max_in_flight(1)
            .claim_min_idle(Duration::from_millis(300))
            .claim_interval(Duration::from_millis(50))
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
            .handler_on(stream, handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish_to(stream, &user(0)))
        .await
        .unwrap();
    recv(&mut seen, "the first entry").await;
    for seq in 1..3 {
        within("publish", STEP, bus.publish_to(stream, &user(seq)))
            .await
            .unwrap();
    }
    // Entry 1 pending with this consumer's own name but not held (as after a read whose
    // reply was lost), entry 2 with a consumer that died.
    backend
        .read_as_dead_consumer(stream, group, "consumer-1", 1)
        .await;
    backend
        .read_as_dead_consumer(stream, group, "dead-pod", 1)
        .await;
    release.send(true).unwrap();
    for _ in 0..2 {
        recv(&mut seen, "a claimed entry").await;
    }
    backend.until_nothing_pending(stream, group).await;
    absorb();
    let labels = [
        ("messaging_destination_name", stream),
        ("messaging_consumer_group_name", group),
    ];
    assert_eq!(
        total("slim_bus_claimed_messages_total", &labels),
        1.0,
        "only the dead consumer's entry was claimed from another consumer"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}
