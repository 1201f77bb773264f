//! The `slim-bus` binary against a throwaway redis-server: its output, its JSON, and the
//! exit codes scripts rely on.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashMap;
use std::process::{Output, Stdio};
use std::time::Duration;

use slim_bus::{Context, EventBus, HandlerError, StreamHandler};
use slim_bus_tests::{RedisServer, within};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

/// How long any single awaited step may take.
const STEP: Duration = Duration::from_secs(20);

async fn start_server() -> RedisServer {
    slim_bus_tests::init_tracing();
    within("redis-server to start", STEP, RedisServer::start())
        .await
        .expect("redis-server starts")
}

/// The binary with `--url` set and nothing taken from the environment that could point
/// it elsewhere; stdin is not a terminal.
fn slim_bus(url: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_slim-bus"));
    command
        .env_remove("REDIS_URL")
        .arg("--url")
        .arg(url)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs the binary with `args` to its end.
async fn run(url: &str, args: &[&str]) -> Output {
    within(
        &format!("slim-bus {}", args.join(" ")),
        STEP,
        slim_bus(url).args(args).output(),
    )
    .await
    .expect("the binary runs")
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

#[track_caller]
fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(output),
        stderr(output)
    );
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is JSON ({e}): {}", stdout(output)))
}

async fn redis_cmd<T: redis::FromRedisValue>(server: &RedisServer, cmd: &redis::Cmd) -> T {
    let mut conn = within("connect", STEP, server.connection()).await;
    within("a redis command", STEP, cmd.query_async(&mut conn))
        .await
        .unwrap()
}

async fn xadd(server: &RedisServer, stream: &str, order_id: &str) -> String {
    redis_cmd(
        server,
        redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("order_id")
            .arg(order_id),
    )
    .await
}

/// A handler that refuses every order for good.
struct Refuse;

#[slim_bus::async_trait]
impl StreamHandler for Refuse {
    type Event = HashMap<String, String>;

    async fn handle(&self, _: Self::Event, _: Context) -> Result<(), HandlerError> {
        Err(HandlerError::permanent("order is refused"))
    }
}

/// Adds `count` orders and lets group `billing` dead-letter them all.
async fn dead_letter_orders(server: &RedisServer, count: u64) {
    for n in 0..count {
        xadd(server, "orders", &format!("o-{n}")).await;
    }
    let bus = within(
        "build",
        STEP,
        EventBus::builder()
            .url(server.url())
            .consumer_group("billing")
            .consumer_name("pod-1")
            .handler_on("orders", Refuse)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let dead = bus.dead_letters("orders");
    within("every order to be dead-lettered", STEP, async {
        while dead.len().await.unwrap() < count {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// Delivers `count` new orders to `consumer` of `group` and never acknowledges them.
async fn read_and_die(server: &RedisServer, group: &str, consumer: &str, count: usize) {
    // The group may exist already (BUSYGROUP): fine.
    let mut conn = within("connect", STEP, server.connection()).await;
    let _: redis::RedisResult<redis::Value> = within(
        "XGROUP CREATE",
        STEP,
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg("orders")
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn),
    )
    .await;
    let _: redis::Value = redis_cmd(
        server,
        redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg("orders")
            .arg(">"),
    )
    .await;
}

async fn dead_letter_count(server: &RedisServer) -> u64 {
    redis_cmd(server, redis::cmd("XLEN").arg("{orders}:dlq")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_groups_consumers_and_dead_letters_as_a_table_and_as_json() {
    let server = start_server().await;
    dead_letter_orders(&server, 2).await;
    xadd(&server, "orders", "o-2").await;
    read_and_die(&server, "reports", "reports-1", 2).await;

    let table = run(&server.url(), &["status", "orders"]).await;
    assert_exit(&table, 0);
    let text = stdout(&table);
    assert!(
        text.starts_with("stream orders: 3 entries"),
        "the stream's line: {text}"
    );
    assert!(text.contains("2 dead letters in {orders}:dlq"), "{text}");
    assert!(text.contains("GROUP"), "{text}");
    let reports = text
        .lines()
        .find(|line| line.starts_with("reports "))
        .unwrap_or_else(|| panic!("a row for group reports: {text}"));
    let cells: Vec<&str> = reports.split_whitespace().collect();
    assert_eq!(cells[1..3], ["1", "2"], "lag 1, 2 pending: {reports}");
    assert!(text.contains("reports-1"), "the consumer: {text}");

    let output = run(
        &server.url(),
        &["status", "orders", "--json", "--group", "reports"],
    )
    .await;
    assert_exit(&output, 0);
    let status = json(&output);
    assert_eq!(status[0]["stream"], "orders");
    assert_eq!(status[0]["length"], 3);
    assert_eq!(status[0]["dead_letters"], 2);
    let groups = status[0]["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "only the group asked for: {status}");
    assert_eq!(groups[0]["name"], "reports");
    assert_eq!(groups[0]["lag"], 1);
    assert_eq!(groups[0]["pending"], 2);
    assert!(groups[0]["oldest_pending_idle_ms"].is_u64());
    assert_eq!(groups[0]["consumers"][0]["name"], "reports-1");
    assert_eq!(groups[0]["consumers"][0]["pending"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_shown_replayed_and_purged() {
    let server = start_server().await;
    dead_letter_orders(&server, 3).await;

    let output = run(&server.url(), &["dlq", "list", "orders", "--json"]).await;
    assert_exit(&output, 0);
    let letters = json(&output);
    let letters = letters.as_array().unwrap();
    assert_eq!(letters.len(), 3);
    assert_eq!(letters[0]["reason"], "permanent");
    assert_eq!(letters[0]["error"], "order is refused");
    assert_eq!(letters[0]["group"], "billing");
    let ids: Vec<&str> = letters.iter().map(|l| l["id"].as_str().unwrap()).collect();
    // Handlers run concurrently, so the orders may be dead-lettered in any order.
    let orders: Vec<&str> = letters
        .iter()
        .map(|l| l["fields"]["order_id"].as_str().unwrap())
        .collect();
    let mut sorted = orders.clone();
    sorted.sort();
    assert_eq!(sorted, ["o-0", "o-1", "o-2"]);

    let table = run(&server.url(), &["dlq", "list", "orders", "--limit", "2"]).await;
    assert_exit(&table, 0);
    let text = stdout(&table);
    assert_eq!(text.lines().count(), 3, "a header and two rows: {text}");
    assert!(
        text.contains("permanent") && text.contains("order is refused"),
        "{text}"
    );
    let after = run(
        &server.url(),
        &["dlq", "list", "orders", "--after", ids[1], "--json"],
    )
    .await;
    assert_eq!(
        json(&after).as_array().unwrap().len(),
        1,
        "the page after the second"
    );

    let show = run(&server.url(), &["dlq", "show", "orders", ids[1]]).await;
    assert_exit(&show, 0);
    let text = stdout(&show);
    for expected in [
        "origin stream",
        "orders",
        "pod-1",
        "permanent",
        "order_id",
        orders[1],
    ] {
        assert!(text.contains(expected), "`{expected}` in: {text}");
    }
    let missing = run(&server.url(), &["dlq", "show", "orders", "1-1"]).await;
    assert_exit(&missing, 3);
    assert_eq!(
        stderr(&missing),
        "error: no dead letter 1-1 in {orders}:dlq\n"
    );

    let replay = run(
        &server.url(),
        &["dlq", "replay", "orders", "--id", ids[0], "--yes"],
    )
    .await;
    assert_exit(&replay, 0);
    assert!(stdout(&replay).starts_with(&format!("replayed {} to `orders` as ", ids[0])));
    assert_eq!(dead_letter_count(&server).await, 2);
    let length: u64 = redis_cmd(&server, redis::cmd("XLEN").arg("orders")).await;
    assert_eq!(length, 4, "the replayed order is a new entry");

    let refused = run(&server.url(), &["dlq", "purge", "orders", "--all"]).await;
    assert_exit(&refused, 4);
    let message = stderr(&refused);
    assert!(
        message.contains("--yes") && message.contains("nothing was purged"),
        "{message}"
    );
    assert_eq!(message.lines().count(), 1, "one line: {message}");
    assert_eq!(dead_letter_count(&server).await, 2, "nothing was deleted");
    let refused = run(&server.url(), &["dlq", "replay", "orders", "--id", ids[1]]).await;
    assert_exit(&refused, 4);
    assert_eq!(dead_letter_count(&server).await, 2, "nothing was replayed");

    let purge_one = run(
        &server.url(),
        &["dlq", "purge", "orders", "--id", ids[1], "--yes"],
    )
    .await;
    assert_exit(&purge_one, 0);
    assert_eq!(dead_letter_count(&server).await, 1);
    let purge_all = run(
        &server.url(),
        &["dlq", "purge", "orders", "--all", "--yes", "--json"],
    )
    .await;
    assert_exit(&purge_all, 0);
    assert_eq!(json(&purge_all)["count"], 1);
    assert_eq!(dead_letter_count(&server).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_lists_what_each_consumer_holds() {
    let server = start_server().await;
    for n in 0..3 {
        xadd(&server, "orders", &format!("o-{n}")).await;
    }
    read_and_die(&server, "billing", "pod-1", 2).await;
    read_and_die(&server, "billing", "pod-2", 1).await;

    let table = run(&server.url(), &["pending", "orders", "billing"]).await;
    assert_exit(&table, 0);
    let text = stdout(&table);
    let rows: Vec<Vec<&str>> = text
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 3, "{text}");
    assert_eq!(rows[0][1], "pod-1");
    assert_eq!(rows[2][1], "pod-2");
    assert_eq!(rows[2][3], "1", "delivered once: {text}");

    let output = run(
        &server.url(),
        &[
            "pending",
            "orders",
            "billing",
            "--consumer",
            "pod-2",
            "--json",
        ],
    )
    .await;
    assert_exit(&output, 0);
    let entries = json(&output);
    assert_eq!(entries.as_array().unwrap().len(), 1);
    assert_eq!(entries[0]["consumer"], "pod-2");
    assert_eq!(entries[0]["delivery_count"], 1);
    assert!(entries[0]["idle_ms"].is_u64());

    let missing = run(&server.url(), &["pending", "orders", "nobody"]).await;
    assert_exit(&missing, 3);
    assert!(stderr(&missing).contains("consumer group `nobody` does not exist"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_prints_entries_published_after_it_started_until_interrupted() {
    let server = start_server().await;
    xadd(&server, "orders", "o-before").await;
    let mut child = slim_bus(&server.url())
        .args(["tail", "orders"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
    let started = within("tail to start", STEP, stderr.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        started,
        "tailing `orders` from new entries (Ctrl-C to stop)"
    );

    let id = xadd(&server, "orders", "o-after").await;
    let line = within("the new entry", STEP, stdout.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(line, format!("{id} order_id=o-after"));

    let pid = child.id().unwrap().to_string();
    let killed = within(
        "kill -INT",
        STEP,
        Command::new("kill").args(["-INT", &pid]).status(),
    )
    .await
    .unwrap();
    assert!(killed.success());
    let status = within("tail to stop on SIGINT", STEP, child.wait())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_one_line_without_the_password_and_exit_1() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://operator:s3cret-pw@127.0.0.1:{port}/");
    let output = run(&url, &["--timeout", "1s", "status", "orders"]).await;
    assert_exit(&output, 1);
    let message = stderr(&output);
    assert!(message.starts_with("error: "), "{message}");
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert_eq!(message.lines().count(), 1, "one line: {message}");
    assert!(!message.contains("s3cret-pw"), "{message}");

    let not_a_url = run("http://operator:s3cret-pw@example/", &["status", "orders"]).await;
    assert_exit(&not_a_url, 1);
    let message = stderr(&not_a_url);
    assert!(message.contains("invalid setting `url`"), "{message}");
    assert!(!message.contains("s3cret-pw"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_exits_with_the_not_found_code() {
    let server = start_server().await;
    let output = run(&server.url(), &["status", "no.such.stream"]).await;
    assert_exit(&output, 3);
    assert_eq!(
        stderr(&output),
        "error: stream `no.such.stream` does not exist\n"
    );
    assert!(output.stdout.is_empty());

    let usage = run(&server.url(), &["status"]).await;
    assert_exit(&usage, 2);
    assert!(stderr(&usage).contains("<STREAM>"));
}

/// Writes an executable shell script `name` into `dir`.
fn script(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncapi_prints_the_document_a_service_writes_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    // A stand-in for a service: what `EventBus::build` does when SLIM_BUS_ASYNCAPI is set.
    let service = script(
        dir.path(),
        "service",
        r#"echo "service log line"
[ "$1" = "--port" ] || exit 9
printf '{"asyncapi":"3.0.0","info":{"title":"billing","version":"1"}}' > "$SLIM_BUS_ASYNCAPI""#,
    );
    let service = service.to_str().unwrap();
    // No Redis is needed: the URL is never used.
    let output = run(
        "redis://127.0.0.1:1/",
        &["asyncapi", "--from-bin", service, "--", "--port", "8080"],
    )
    .await;
    assert_exit(&output, 0);
    let document = json(&output);
    assert_eq!(document["asyncapi"], "3.0.0");
    assert_eq!(document["info"]["title"], "billing");

    let silent = script(dir.path(), "not-a-service", "exit 0");
    let output = run(
        "redis://127.0.0.1:1/",
        &["asyncapi", "--from-bin", silent.to_str().unwrap()],
    )
    .await;
    assert_exit(&output, 1);
    assert!(
        stderr(&output).contains("without writing an AsyncAPI document"),
        "{}",
        stderr(&output)
    );
}
