//! The Lua scripts of the Redis backend (`slim-bus/src/broker/scripts/*.lua`) run by hand
//! with `redis-cli --eval`, as each script's header shows: an operator can move, replay
//! and inspect with the same scripts the bus runs.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use redis::AsyncCommands;
use slim_bus_tests::{RedisServer, find_cli, within};

const STEP: Duration = Duration::from_secs(15);

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../slim-bus/src/broker/scripts")
        .join(name)
}

/// `redis-cli -p PORT --eval SCRIPT keys... , args...`: its output, one reply item a line.
async fn eval(server: &RedisServer, name: &str, keys: &[&str], args: &[&str]) -> Vec<String> {
    let path = script(name);
    let header = std::fs::read_to_string(&path).unwrap();
    assert!(
        header
            .lines()
            .take_while(|line| line.starts_with("--"))
            .any(|line| line.contains(&format!("redis-cli --eval {name}"))),
        "{name} shows how to run it"
    );
    let cli = find_cli(server.binary()).unwrap();
    let output = within(
        "redis-cli --eval",
        STEP,
        tokio::process::Command::new(&cli)
            .args(["-p", &server.port().to_string(), "--no-raw", "--eval"])
            .arg(&path)
            .args(keys)
            .arg(",")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && !stdout.contains("(error)"),
        "{name}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout.lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_script_runs_with_redis_cli_eval_as_its_header_shows() {
    slim_bus_tests::init_tracing();
    let server = within("redis-server", STEP, RedisServer::start())
        .await
        .unwrap();
    let mut conn = within("connect", STEP, server.connection()).await;
    let _: () = within(
        "XGROUP CREATE",
        STEP,
        redis::cmd("XGROUP")
            .arg(&["CREATE", "orders", "billing", "0", "MKSTREAM"][..])
            .query_async(&mut conn),
    )
    .await
    .unwrap();
    let id: String = within(
        "XADD",
        STEP,
        conn.xadd("orders", "*", &[("order_id", "o-1"), ("@note", "mine")]),
    )
    .await
    .unwrap();
    let _: redis::Value = within(
        "XREADGROUP",
        STEP,
        redis::cmd("XREADGROUP")
            .arg(&["GROUP", "billing", "consumer-1", "STREAMS", "orders", ">"][..])
            .query_async(&mut conn),
    )
    .await
    .unwrap();

    let moved = eval(
        &server,
        "dead_letter.lua",
        &["orders", "{orders}:dlq", "{orders}:dlq:trimmed"],
        &["billing", "consumer-1", &id, "1000", "@reason", "permanent"],
    )
    .await;
    assert_eq!(moved, ["1) (integer) 1", "2) (integer) 0"]);
    let letters: redis::streams::StreamRangeReply =
        within("XRANGE", STEP, conn.xrange_all("{orders}:dlq"))
            .await
            .unwrap();
    let letter = &letters.ids[0];
    assert_eq!(
        letter.get::<String>("@@note").as_deref(),
        Some("mine"),
        "an event's own `@` name is escaped"
    );
    assert_eq!(
        letter.get::<String>("@reason").as_deref(),
        Some("permanent")
    );

    let replayed = eval(
        &server,
        "replay.lua",
        &["{orders}:dlq", "orders"],
        &[&letter.id],
    )
    .await;
    assert_eq!(replayed.len(), 1);
    assert!(replayed[0].contains('-'), "a new entry id: {replayed:?}");
    let dead: usize = within("XLEN", STEP, conn.xlen("{orders}:dlq"))
        .await
        .unwrap();
    assert_eq!(dead, 0, "the replayed dead letter is deleted");

    // The group reads and acknowledges the replayed entry: the original one, dead-lettered,
    // is then done with (the last one delivered is kept).
    let _: redis::Value = within(
        "XREADGROUP",
        STEP,
        redis::cmd("XREADGROUP")
            .arg(&["GROUP", "billing", "consumer-1", "STREAMS", "orders", ">"][..])
            .query_async(&mut conn),
    )
    .await
    .unwrap();
    let acked: usize = within(
        "XACK",
        STEP,
        conn.xack("orders", "billing", &[replayed[0].trim_matches('"')]),
    )
    .await
    .unwrap();
    assert_eq!(acked, 1);
    let trimmed = eval(&server, "trim_acked.lua", &["orders"], &["10000"]).await;
    assert_eq!(trimmed, ["(integer) 1"]);
    let removed = eval(
        &server,
        "remove_idle_consumers.lua",
        &["orders"],
        &["billing", "0", "someone-else"],
    )
    .await;
    assert_eq!(removed, ["1) \"consumer-1\""]);

    let key = "slim-bus:consumer:billing:consumer-1";
    assert_eq!(
        eval(&server, "hold_lease.lua", &[key], &["pod-a", "30000"]).await,
        ["1) (integer) 1"]
    );
    let taken = eval(&server, "hold_lease.lua", &[key], &["pod-b", "30000"]).await;
    assert_eq!(taken[..2], ["1) (integer) 0", "2) \"pod-a\""]);
    assert_eq!(
        eval(&server, "release_lease.lua", &[key], &["pod-b"]).await,
        ["(integer) 0"],
        "only the holder releases"
    );
    assert_eq!(
        eval(&server, "release_lease.lua", &[key], &["pod-a"]).await,
        ["(integer) 1"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_acked_deletes_at_most_as_many_entries_as_it_is_given_per_call() {
    slim_bus_tests::init_tracing();
    let server = within("redis-server", STEP, RedisServer::start())
        .await
        .unwrap();
    let mut conn = within("connect", STEP, server.connection()).await;
    let _: () = within(
        "XGROUP CREATE",
        STEP,
        redis::cmd("XGROUP")
            .arg(&["CREATE", "orders", "billing", "0", "MKSTREAM"][..])
            .query_async(&mut conn),
    )
    .await
    .unwrap();
    let mut ids = Vec::new();
    for n in 0..25 {
        let id: String = within(
            "XADD",
            STEP,
            conn.xadd("orders", "*", &[("order_id", n.to_string())]),
        )
        .await
        .unwrap();
        ids.push(id);
    }
    let _: redis::Value = within(
        "XREADGROUP",
        STEP,
        redis::cmd("XREADGROUP")
            .arg(&["GROUP", "billing", "consumer-1", "STREAMS", "orders", ">"][..])
            .query_async(&mut conn),
    )
    .await
    .unwrap();
    let acked: usize = within("XACK", STEP, conn.xack("orders", "billing", &ids))
        .await
        .unwrap();
    assert_eq!(acked, 25);
    // 24 may go (the last one delivered is kept): 10, 10, then the 4 left.
    for expected in ["(integer) 10", "(integer) 10", "(integer) 4", "(integer) 0"] {
        let trimmed = eval(&server, "trim_acked.lua", &["orders"], &["10"]).await;
        assert_eq!(trimmed, [expected]);
    }
    let left: usize = within("XLEN", STEP, conn.xlen("orders")).await.unwrap();
    assert_eq!(left, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn touch_own_sets_the_idle_time_of_its_own_entries_only_and_keeps_their_counts() {
    slim_bus_tests::init_tracing();
    let server = within("redis-server", STEP, RedisServer::start())
        .await
        .unwrap();
    let mut conn = within("connect", STEP, server.connection()).await;
    let id = one_entry_delivered(&mut conn, "held").await;

    // Another consumer's touch leaves the entry alone: it is never taken back.
    let other = eval(
        &server,
        "touch_own.lua",
        &["held"],
        &["billing", "consumer-2", "0", "leave", &id],
    )
    .await;
    assert_eq!(other, ["(empty array)"]);
    assert_eq!(pending(&mut conn, "held").await[0].1, "consumer-1");

    // The hand-over: idle set to claim_min_idle, the delivery count kept.
    let handed = eval(
        &server,
        "touch_own.lua",
        &["held"],
        &["billing", "consumer-1", "60000", "leave", &id],
    )
    .await;
    assert_eq!(handed, [format!("1) \"{id}\"")]);
    let row = pending(&mut conn, "held").await.remove(0);
    assert_eq!((row.1.as_str(), row.3), ("consumer-1", 1));
    assert!(row.2 >= 60_000, "idle {} ms", row.2);

    // Keeping it fresh: idle back to about zero, still one delivery.
    eval(
        &server,
        "touch_own.lua",
        &["held"],
        &["billing", "consumer-1", "0", "leave", &id],
    )
    .await;
    let row = pending(&mut conn, "held").await.remove(0);
    assert!(row.2 < 60_000, "idle {} ms", row.2);
    assert_eq!(row.3, 1);

    // Acknowledged while a touch is on its way: still the caller's, and not put back in
    // the pending list, where nothing would ever acknowledge it again.
    let acked: usize = within("XACK", STEP, conn.xack("held", "billing", &[&id]))
        .await
        .unwrap();
    assert_eq!(acked, 1);
    let kept = eval(
        &server,
        "touch_own.lua",
        &["held"],
        &["billing", "consumer-1", "0", "leave", &id],
    )
    .await;
    assert_eq!(kept, [format!("1) \"{id}\"")]);
    assert!(pending(&mut conn, "held").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_own_puts_back_an_entry_pending_with_no_one_only_when_asked() {
    slim_bus_tests::init_tracing();
    let server = within("redis-server", STEP, RedisServer::start())
        .await
        .unwrap();
    let mut conn = server.connection().await;
    let id = one_entry_delivered(&mut conn, "retried").await;
    let acked: usize = within("XACK", STEP, conn.xack("retried", "billing", &[&id]))
        .await
        .unwrap();
    assert_eq!(acked, 1);
    let left = eval(
        &server,
        "claim_own.lua",
        &["retried"],
        &["billing", "consumer-1", "leave", &id],
    )
    .await;
    assert_eq!(left, ["1) (nil)"]);
    let put_back = eval(
        &server,
        "claim_own.lua",
        &["retried"],
        &["billing", "consumer-1", "put-back", &id],
    )
    .await;
    assert_eq!(put_back[0], format!("1) 1) \"{id}\""), "{put_back:?}");
    let rows = pending(&mut conn, "retried").await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].1, "consumer-1");
}

/// Creates group `billing` on `stream` and one entry there, delivered to `consumer-1`;
/// returns the entry's id.
async fn one_entry_delivered(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> String {
    let _: () = within(
        "XGROUP CREATE",
        STEP,
        redis::cmd("XGROUP")
            .arg(&["CREATE", stream, "billing", "0", "MKSTREAM"][..])
            .query_async(conn),
    )
    .await
    .unwrap();
    let id: String = within("XADD", STEP, conn.xadd(stream, "*", &[("n", "1")]))
        .await
        .unwrap();
    let _: redis::Value = within(
        "XREADGROUP",
        STEP,
        redis::cmd("XREADGROUP")
            .arg(&["GROUP", "billing", "consumer-1", "STREAMS", stream, ">"][..])
            .query_async(conn),
    )
    .await
    .unwrap();
    id
}

/// The pending list of group `billing` on `stream`: id, consumer, idle ms, deliveries.
async fn pending(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<(String, String, i64, i64)> {
    within(
        "XPENDING",
        STEP,
        redis::cmd("XPENDING")
            .arg(stream)
            .arg(&["billing", "-", "+", "10"][..])
            .query_async(conn),
    )
    .await
    .unwrap()
}
