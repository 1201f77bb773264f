//! Edge cases at the limits: absurd delays, replays of entries that fail again, reads at
//! shutdown, and unsupported servers.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use slim_bus::{Error, EventBus, EventBusBuilder, HandlerError};
use slim_bus_tests::{RedisServer, within};
use support::*;

fn edge_bus(server: &RedisServer) -> EventBusBuilder {
    bus(server)
        .handler_timeout(Duration::from_millis(500))
        .claim_min_idle(Duration::from_secs(5))
        .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_all_ends_even_when_the_replayed_entries_fail_again() {
    let server = start_server().await;
    let (handler, mut seen) =
        Scripted::new(|_: UserCreated, _| async { Err(HandlerError::permanent("still broken")) });
    let bus = within("build", STEP, edge_bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let users: Vec<UserCreated> = (0..50).map(user).collect();
    within("publish", STEP, bus.publish_batch(&users))
        .await
        .unwrap();
    for _ in 0..50 {
        recv(&mut seen, "a first attempt").await;
    }
    let dead = bus.dead_letters("user.created");
    within("dead letters", STEP, async {
        while dead.len().await.unwrap() < 50 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // While it replays, the listener dead-letters the replayed entries again.
    assert_eq!(
        within("replay_all", STEP, dead.replay_all()).await.unwrap(),
        50
    );
    for _ in 0..50 {
        recv(&mut seen, "a replayed attempt").await;
    }
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_absurd_retry_delay_leaves_the_entry_pending_without_harming_the_bus() {
    let server = start_server().await;
    let (handler, mut seen) = Scripted::new(|event: UserCreated, _| async move {
        if event.seq == 0 {
            Err(HandlerError::retry_after(Duration::MAX, "much later"))
        } else {
            Ok(())
        }
    });
    let bus = within("build", STEP, edge_bus(&server).handler(handler).build())
        .await
        .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let users: Vec<UserCreated> = (0..3).map(user).collect();
    within("publish", STEP, bus.publish_batch(&users))
        .await
        .unwrap();
    let mut handled: Vec<u64> = Vec::new();
    for _ in 0..3 {
        handled.push(recv(&mut seen, "a delivery").await.event.seq);
    }
    handled.sort_unstable();
    assert_eq!(handled, [0, 1, 2]);
    within("acks", STEP, async {
        while pending_count(&server, "user.created", "tests").await != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within("publish", STEP, bus.publish(&user(3)))
        .await
        .unwrap();
    assert_eq!(
        recv(&mut seen, "a later entry").await.event.seq,
        3,
        "the bus still handles entries"
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_returns_the_bus_reads_nothing_more() {
    let server = start_server().await;
    let (handler, mut seen) = Scripted::new(|_: UserCreated, _| async { Ok(()) });
    let bus = within(
        "build",
        STEP,
        edge_bus(&server)
            .block_time(Duration::from_secs(5))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    assert_eq!(recv(&mut seen, "the first entry").await.event.seq, 1);
    // The reader is blocked in a 5 s read now.
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    within("publish", STEP, bus.publish(&user(2)))
        .await
        .unwrap();
    let health = within("health", STEP, bus.health()).await;
    assert_eq!(
        health.streams[0].pending, 0,
        "no consumer took the entry published after shutdown"
    );
    assert_eq!(health.streams[0].lag, Some(1));
}

/// Serves the RESP commands that arrive on `listener` as a server reporting
/// `redis_version` would: `INFO` gets a server section with that version, every other
/// command `+OK`. Redis 6 cannot be installed next to the harness's server, and only the
/// version matters here.
async fn serve_as_version(listener: tokio::net::TcpListener, version: &'static str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(async move {
            let mut buffer = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                while let Some((command, used)) = parse_command(&buffer) {
                    buffer.drain(..used);
                    let reply = if command.eq_ignore_ascii_case(b"INFO") {
                        let info = format!("# Server\r\nredis_version:{version}\r\n");
                        format!("${}\r\n{info}\r\n", info.len())
                    } else {
                        "+OK\r\n".to_owned()
                    };
                    if socket.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
                match socket.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(read) => buffer.extend_from_slice(&chunk[..read]),
                }
            }
        });
    }
}

/// The name of the RESP command at the start of `bytes` and its length, once all of it is
/// there.
fn parse_command(bytes: &[u8]) -> Option<(Vec<u8>, usize)> {
    fn line(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
        let end = bytes[at..].windows(2).position(|w| w == b"\r\n")? + at;
        Some((&bytes[at..end], end + 2))
    }
    let (header, mut at) = line(bytes, 0)?;
    let count: usize = std::str::from_utf8(header.strip_prefix(b"*")?)
        .ok()?
        .parse()
        .ok()?;
    let mut name = None;
    for _ in 0..count {
        let (header, start) = line(bytes, at)?;
        let len: usize = std::str::from_utf8(header.strip_prefix(b"$")?)
            .ok()?
            .parse()
            .ok()?;
        if bytes.len() < start + len + 2 {
            return None;
        }
        name.get_or_insert_with(|| bytes[start..start + len].to_vec());
        at = start + len + 2;
    }
    Some((name?, at))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_on_a_server_older_than_redis_7_fails_with_its_version() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_as_version(listener, "6.2.14"));
    let (handler, _seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        EventBus::builder()
            .url(format!("redis://{addr}/"))
            .consumer_group("tests")
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let err = within("listen", STEP, bus.listen()).await.unwrap_err();
    assert!(
        matches!(&err, Error::UnsupportedServer { version, required: "7.0", .. } if version == "6.2.14"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!("the server at {addr} runs Redis 6.2.14; slim-bus needs Redis 7.0 or newer")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_reporting_redis_7_or_newer_is_accepted() {
    for version in ["7.0.0", "7.2.4", "8.2.1"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_as_version(listener, version));
        let (handler, _seen) = Record::<UserCreated>::new();
        let bus = within(
            "build",
            STEP,
            EventBus::builder()
                .url(format!("redis://{addr}/"))
                .consumer_group("tests")
                .command_timeout(Duration::from_millis(500))
                .handler(handler)
                .build(),
        )
        .await
        .unwrap();
        // The fake server answers `+OK` where a stream command needs more, so the
        // listener fails later, but not for the version.
        let outcome = within("listen", STEP, bus.listen()).await;
        assert!(
            !matches!(outcome, Err(Error::UnsupportedServer { .. })),
            "{version}: {:?}",
            outcome.err()
        );
    }
}
