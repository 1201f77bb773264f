//! The `slim-bus` binary against a throwaway redis-server: its output, its JSON, and the
//! exit codes scripts rely on.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::process::Stdio;

use slim_bus_tests::{RedisServer, within};
use tokio::io::{AsyncBufReadExt, BufReader};

use support::*;

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

    interrupt(&child).await;
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

    for args in [
        &["dlq", "list", "no.such.stream"][..],
        &["dlq", "list", "no.such.stream", "--json"],
        &["dlq", "show", "no.such.stream", "1-1"],
        &["dlq", "replay", "no.such.stream", "--all", "--yes"],
        &["dlq", "purge", "no.such.stream", "--id", "1-1", "--yes"],
    ] {
        let output = run(&server.url(), args).await;
        assert_exit(&output, 3);
        assert_eq!(
            stderr(&output),
            "error: stream `no.such.stream` does not exist, nor its dead-letter stream \
             {no.such.stream}:dlq\n",
            "{args:?}"
        );
        assert!(output.stdout.is_empty(), "{args:?}");
    }

    // A stream without dead letters is no error.
    xadd(&server, "orders", "o-1").await;
    let none = run(&server.url(), &["dlq", "list", "orders"]).await;
    assert_exit(&none, 0);
    assert_eq!(stdout(&none), "no dead letters in {orders}:dlq\n");
    let none = run(
        &server.url(),
        &["dlq", "purge", "orders", "--all", "--json"],
    )
    .await;
    assert_exit(&none, 0);
    assert_eq!(json(&none)["count"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_say_what_is_wrong_and_exit_2() {
    // No Redis is needed: usage errors come before connecting.
    let url = "redis://127.0.0.1:1/";
    let usage = run(url, &["status"]).await;
    assert_exit(&usage, 2);
    let message = stderr(&usage);
    assert!(
        message.contains("status takes the streams to show")
            && message.contains("does not scan the keyspace"),
        "{message}"
    );
    assert!(message.contains("<STREAM>"), "the usage line: {message}");

    for args in [
        &["dlq", "list", "orders", "--limit", "0"][..],
        &["pending", "orders", "billing", "--limit", "0"],
    ] {
        let output = run(url, args).await;
        assert_exit(&output, 2);
        let message = stderr(&output);
        assert!(
            message.contains("--limit") && message.contains("the limit is 1 or more"),
            "{args:?}: {message}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_ends_each_command_quietly_with_success() {
    let server = start_server().await;
    dead_letter_orders(&server, 1).await;
    read_and_die(&server, "reports", "reports-1", 1).await;
    let letters = json(&run(&server.url(), &["dlq", "list", "orders", "--json"]).await);
    let id = letters[0]["id"].as_str().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let service = script(
        dir.path(),
        "service",
        r#"printf '{"asyncapi":"3.0.0"}' > "$SLIM_BUS_ASYNCAPI""#,
    );
    let service = service.to_str().unwrap();

    for args in [
        &["status", "orders"][..],
        &["status", "orders", "--json"],
        &["status", "orders", "--watch", "--interval", "10ms"],
        &["dlq", "list", "orders"],
        &["dlq", "list", "orders", "--json"],
        &["dlq", "show", "orders", &id],
        &["dlq", "show", "orders", &id, "--json"],
        &["pending", "orders", "reports"],
        &["pending", "orders", "reports", "--json"],
        &["tail", "orders", "--from", "0-0"],
        &["tail", "orders", "--from", "0-0", "--json"],
        &["asyncapi", "--from-bin", service],
    ] {
        let output = within(
            &format!("slim-bus {}", args.join(" ")),
            STEP,
            // Not `output()`, which would pipe stdout to this process.
            slim_bus(&server.url())
                .args(args)
                .stdout(closed_pipe())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
                .wait_with_output(),
        )
        .await
        .unwrap();
        assert_exit(&output, 0);
        // `tail` says on stderr where it starts; nothing else is said.
        let said = stderr(&output);
        assert!(
            said.is_empty() || said.starts_with("tailing `orders` from after 0-0"),
            "{args:?}: {said}"
        );
        assert_eq!(
            said.lines().count(),
            usize::from(!said.is_empty()),
            "{said}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_watch_ends_on_ctrl_c_while_redis_does_not_answer() {
    let server = start_server().await;
    xadd(&server, "orders", "o-1").await;
    let proxy = StallProxy::start(&server).await;
    let mut child = slim_bus(&proxy.url())
        .args(["--timeout", "60s", "--json", "status", "orders", "--watch"])
        .args(["--interval", "10ms"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = within("the first status", STEP, stdout.next_line())
        .await
        .unwrap()
        .unwrap();
    assert!(first.contains(r#""stream":"orders""#), "{first}");

    // The next refresh starts with `TYPE orders`, which Redis now never answers.
    proxy.hold(b"\r\nTYPE\r\n");
    within("a refresh to wait on Redis", STEP, proxy.held()).await;
    interrupt(&child).await;
    let status = within("status --watch to stop on SIGINT", STEP, child.wait())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_ends_on_ctrl_c_while_it_looks_for_where_to_start() {
    let server = start_server().await;
    xadd(&server, "orders", "o-1").await;
    let proxy = StallProxy::start(&server).await;
    // `tail` without --from asks for the stream's newest entry before it prints anything.
    proxy.hold(b"\r\nTYPE\r\n");
    let child = slim_bus(&proxy.url())
        .args(["--timeout", "60s", "tail", "orders"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    within("tail to wait on Redis", STEP, proxy.held()).await;
    interrupt(&child).await;
    let output = within("tail to stop on SIGINT", STEP, child.wait_with_output())
        .await
        .unwrap();
    assert_exit(&output, 0);
    assert!(output.stdout.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_fails_part_way_reports_what_it_replayed() {
    let server = start_server().await;
    dead_letter_orders(&server, 3).await;
    let letters = json(&run(&server.url(), &["dlq", "list", "orders", "--json"]).await);
    let ids: Vec<String> = letters
        .as_array()
        .unwrap()
        .iter()
        .map(|letter| letter["id"].as_str().unwrap().to_owned())
        .collect();
    let proxy = StallProxy::start(&server).await;
    // Redis never answers the replay of the second: it times out.
    proxy.hold(ids[1].as_bytes());
    let args = [
        "--timeout",
        "1s",
        "dlq",
        "replay",
        "orders",
        "--yes",
        "--id",
        &ids[0],
        &ids[1],
        &ids[2],
    ];
    let output = run(&proxy.url(), &args).await;
    assert_exit(&output, 1);
    let text = stdout(&output);
    assert!(
        text.starts_with(&format!("replayed {} to `orders` as ", ids[0])),
        "{text}"
    );
    assert_eq!(text.lines().count(), 1, "{text}");
    let message = stderr(&output);
    assert!(
        message.contains("1 of 3 replayed before it; the others are still in {orders}:dlq"),
        "{message}"
    );

    let args = [
        "--timeout",
        "1s",
        "--json",
        "dlq",
        "replay",
        "orders",
        "--yes",
        "--id",
        &ids[2],
        &ids[1],
    ];
    let output = run(&proxy.url(), &args).await;
    assert_exit(&output, 1);
    let result = json(&output);
    assert_eq!(result["count"], 1, "{result}");
    assert_eq!(result["replayed"][0]["id"], ids[2].as_str(), "{result}");
    assert!(
        result["error"]
            .as_str()
            .unwrap()
            .contains("1 of 2 replayed"),
        "{result}"
    );
    drop(proxy);
    assert_eq!(dead_letter_count(&server).await, 1, "the held one is left");
}

/// Runs `dlq ACTION orders --all --yes --json` while a dead letter arrives between the
/// listing and the first replay or purge; returns what it printed.
async fn act_on_all_while_one_arrives(server: &RedisServer, action: &str) -> serde_json::Value {
    let letters = json(&run(&server.url(), &["dlq", "list", "orders", "--json"]).await);
    let first = letters[0]["id"].as_str().unwrap().to_owned();
    let proxy = StallProxy::start(server).await;
    proxy.hold(first.as_bytes());
    let child = slim_bus(&proxy.url())
        .args(["--json", "dlq", action, "orders", "--all", "--yes"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    within(&format!("the first {action}"), STEP, proxy.held()).await;
    redis_cmd::<String>(
        server,
        redis::cmd("XADD")
            .arg("{orders}:dlq")
            .arg("*")
            .arg("order_id")
            .arg("o-late"),
    )
    .await;
    proxy.release();
    let output = within(
        &format!("dlq {action} --all"),
        STEP,
        child.wait_with_output(),
    )
    .await
    .unwrap();
    assert_exit(&output, 0);
    json(&output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_and_purge_all_act_on_the_dead_letters_there_were_when_confirmed() {
    let server = start_server().await;
    dead_letter_orders(&server, 2).await;
    let replayed = act_on_all_while_one_arrives(&server, "replay").await;
    assert_eq!(replayed["count"], 2, "{replayed}");
    assert_eq!(
        replayed["replayed"].as_array().unwrap().len(),
        2,
        "{replayed}"
    );
    assert_eq!(dead_letter_count(&server).await, 1, "the late one is left");

    xadd(&server, "{orders}:dlq", "o-later").await;
    let purged = act_on_all_while_one_arrives(&server, "purge").await;
    assert_eq!(purged["count"], 2, "{purged}");
    let left = json(&run(&server.url(), &["dlq", "list", "orders", "--json"]).await);
    let left = left.as_array().unwrap();
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0]["fields"]["order_id"], "o-late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_stream_shows_each_partition_and_dead_letters_name_them() {
    let server = start_server().await;
    xadd(&server, "orders:{0}", "o-0").await;
    xadd(&server, "orders:{2}", "o-2").await;
    dead_letter(&server, "orders:{1}", 2).await;

    let table = run(&server.url(), &["status", "orders"]).await;
    assert_exit(&table, 0);
    let text = stdout(&table);
    assert!(
        text.starts_with("partitioned stream orders: 3 partitions, orders:{0} ... orders:{2}\n"),
        "{text}"
    );
    assert!(
        text.contains("stream orders:{1}: 2 entries")
            && text.contains("2 dead letters in orders:{1}:dlq"),
        "{text}"
    );
    let output = run(&server.url(), &["status", "orders", "--json"]).await;
    assert_exit(&output, 0);
    let statuses = json(&output);
    let streams: Vec<&str> = statuses
        .as_array()
        .unwrap()
        .iter()
        .map(|status| status["stream"].as_str().unwrap())
        .collect();
    assert_eq!(streams, ["orders:{0}", "orders:{1}", "orders:{2}"]);
    assert_eq!(statuses[1]["dead_letters"], 2);

    for args in [
        &["dlq", "list", "orders"][..],
        &["dlq", "show", "orders", "1-1"],
        &["dlq", "replay", "orders", "--all", "--yes"],
        &["dlq", "purge", "orders", "--id", "1-1", "--yes"],
    ] {
        let output = run(&server.url(), args).await;
        assert_exit(&output, 3);
        assert_eq!(
            stderr(&output),
            "error: `orders` is a partitioned stream: name a partition, \
             `orders:{0}` ... `orders:{2}`\n",
            "{args:?}"
        );
    }
    let letters = run(&server.url(), &["dlq", "list", "orders:{1}", "--json"]).await;
    assert_exit(&letters, 0);
    assert_eq!(json(&letters).as_array().unwrap().len(), 2);
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

    // Where the document is written: a directory of its own, private, removed afterwards.
    let tmp = tempfile::tempdir().unwrap();
    let record = dir.path().join("record");
    let recording = script(
        dir.path(),
        "recording-service",
        r#"printf '%s\n' "$SLIM_BUS_ASYNCAPI" > "$RECORD"
stat -c %a "$(dirname "$SLIM_BUS_ASYNCAPI")" >> "$RECORD"
printf '{"asyncapi":"3.0.0"}' > "$SLIM_BUS_ASYNCAPI""#,
    );
    let output = within(
        "slim-bus asyncapi",
        STEP,
        slim_bus("redis://127.0.0.1:1/")
            .env("TMPDIR", tmp.path())
            .env("RECORD", &record)
            .args(["asyncapi", "--from-bin", recording.to_str().unwrap()])
            .output(),
    )
    .await
    .unwrap();
    assert_exit(&output, 0);
    let recorded = std::fs::read_to_string(&record).unwrap();
    let mut recorded = recorded.lines();
    let path = std::path::Path::new(recorded.next().unwrap());
    let own_dir = path.parent().unwrap();
    assert_eq!(own_dir.parent(), Some(tmp.path()), "{path:?}");
    assert_eq!(recorded.next(), Some("700"), "the directory's mode");
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "the directory is removed"
    );

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
