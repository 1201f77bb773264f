//! The `slim-bus` binary with `--cluster`: on a throwaway Redis Cluster (six nodes, three
//! masters with a replica each) reached through one seed, the status, dead letters and
//! tail of streams on different masters; and without one, how `--cluster` and `--url`
//! (and their environment variables) go together, and what an error says about the seeds.
#![allow(clippy::unwrap_used, missing_docs)]

mod support;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use slim_bus::EventBus;
use slim_bus_tests::{RedisCluster, within};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

use support::*;

/// Six nodes starting and agreeing on a loaded 2-core machine.
const START: Duration = Duration::from_secs(120);

async fn start_cluster() -> RedisCluster {
    slim_bus_tests::init_tracing();
    within("the cluster to start", START, RedisCluster::start())
        .await
        .unwrap()
}

/// The binary with `--cluster seed`.
fn slim_bus_on(seed: &str) -> Command {
    let mut command = slim_bus_anywhere();
    command.arg("--cluster").arg(seed);
    command
}

async fn run_on(seed: &str, args: &[&str]) -> std::process::Output {
    run_command(slim_bus_on(seed).args(args)).await
}

/// `count` stream names, each served by a different master: `s0.orders`, `s1.orders`, ...
async fn streams_on_different_masters(cluster: &RedisCluster, count: usize) -> Vec<String> {
    let mut found: Vec<(String, u16)> = Vec::new();
    for n in 0.. {
        let stream = format!("s{n}.orders");
        let owner = within("master_of", STEP, cluster.master_of(&stream))
            .await
            .unwrap();
        if found.iter().all(|(_, port)| *port != owner) {
            found.push((stream, owner));
        }
        if found.len() == count {
            break;
        }
    }
    found.into_iter().map(|(stream, _)| stream).collect()
}

/// A port on loopback that nothing listens on.
fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_dead_letters_and_tail_of_streams_on_three_masters_through_one_seed() {
    let cluster = start_cluster().await;
    let masters = within("masters", STEP, cluster.masters()).await.unwrap();
    assert_eq!(masters.len(), 3, "{masters:?}");
    // A replica, which serves none of the streams: the masters are found from it.
    let seed = cluster
        .nodes()
        .iter()
        .find(|node| !masters.contains(&node.port()))
        .unwrap()
        .url();
    let streams = streams_on_different_masters(&cluster, 3).await;
    let (refused, also_refused, plain) = (&streams[0], &streams[1], &streams[2]);

    let bus = within(
        "build",
        STEP,
        EventBus::builder().cluster([seed.clone()]).build(),
    )
    .await
    .unwrap();
    for (stream, count) in [(refused, 2), (also_refused, 1), (plain, 3)] {
        for n in 0..count {
            let order = HashMap::from([("order_id", format!("o-{n}"))]);
            within("publish", STEP, bus.publish_to(stream, &order))
                .await
                .unwrap();
        }
    }
    let_billing_dead_letter(
        EventBus::builder().cluster([seed.clone()]),
        &[(refused, 2), (also_refused, 1)],
    )
    .await;

    let table = run_on(&seed, &["status", plain]).await;
    assert_exit(&table, 0);
    let text = stdout(&table);
    assert!(
        text.starts_with(&format!("stream {plain}: 3 entries")),
        "{text}"
    );
    let output = run_on(&seed, &["--json", "status", refused, also_refused, plain]).await;
    assert_exit(&output, 0);
    let statuses = json(&output);
    let shown: Vec<(&str, u64, u64)> = statuses
        .as_array()
        .unwrap()
        .iter()
        .map(|status| {
            (
                status["stream"].as_str().unwrap(),
                status["length"].as_u64().unwrap(),
                status["dead_letters"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        shown,
        [
            (refused.as_str(), 2, 2),
            (also_refused.as_str(), 1, 1),
            (plain.as_str(), 3, 0)
        ],
        "{statuses}"
    );
    assert_eq!(statuses[0]["groups"][0]["name"], "billing", "{statuses}");
    let pending = run_on(&seed, &["--json", "pending", refused, "billing"]).await;
    assert_exit(&pending, 0);
    assert_eq!(json(&pending), serde_json::json!([]), "all were settled");

    let output = run_on(&seed, &["dlq", "list", refused, "--json"]).await;
    assert_exit(&output, 0);
    let letters = json(&output);
    let letters = letters.as_array().unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(letters[0]["reason"], "permanent");
    assert_eq!(letters[0]["error"], "order is refused");
    let mut orders: Vec<&str> = letters
        .iter()
        .map(|letter| letter["fields"]["order_id"].as_str().unwrap())
        .collect();
    orders.sort_unstable();
    assert_eq!(orders, ["o-0", "o-1"]);
    let table = run_on(&seed, &["dlq", "list", also_refused]).await;
    assert_exit(&table, 0);
    let text = stdout(&table);
    assert_eq!(text.lines().count(), 2, "a header and a row: {text}");
    assert!(text.contains("order is refused"), "{text}");

    let replay = run_on(&seed, &["dlq", "replay", refused, "--all", "--yes"]).await;
    assert_exit(&replay, 0);
    let text = stdout(&replay);
    assert_eq!(
        text.lines().last(),
        Some(format!("replayed 2 dead letters to `{refused}`").as_str()),
        "{text}"
    );
    assert_eq!(
        within("dead letters", STEP, bus.dead_letters(refused).len())
            .await
            .unwrap(),
        0,
        "replayed"
    );
    assert_eq!(
        within("dead letters", STEP, bus.dead_letters(also_refused).len())
            .await
            .unwrap(),
        1,
        "another stream's are left"
    );
    let output = run_on(&seed, &["--json", "status", refused]).await;
    assert_exit(&output, 0);
    assert_eq!(
        json(&output)[0]["length"],
        4,
        "the replayed orders are new entries"
    );
    let none = run_on(&seed, &["dlq", "list", refused]).await;
    assert_exit(&none, 0);
    assert_eq!(
        stdout(&none),
        format!("no dead letters in {{{refused}}}:dlq\n")
    );

    let purge = run_on(&seed, &["dlq", "purge", also_refused, "--all", "--yes"]).await;
    assert_exit(&purge, 0);
    assert_eq!(
        within("dead letters", STEP, bus.dead_letters(also_refused).len())
            .await
            .unwrap(),
        0,
        "purged"
    );

    let mut child = slim_bus_on(&seed)
        .args(["tail", plain, "--from", "0-0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for n in 0..3 {
        let line = within("an entry from tail", STEP, lines.next_line())
            .await
            .unwrap()
            .unwrap();
        assert!(line.contains(&format!("order_id=o-{n}")), "{line}");
    }
    interrupt(&child).await;
    let status = within("tail to stop on SIGINT", STEP, child.wait())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_and_cluster_together_are_a_usage_error() {
    // No Redis is needed: usage errors come before connecting.
    let (url, node) = ("redis://127.0.0.1:1/", "redis://127.0.0.1:2/");
    for args in [
        &["--url", url, "--cluster", node, "status", "orders"][..],
        &["status", "orders", "--cluster", node, "--url", url],
    ] {
        let output = run_command(slim_bus_anywhere().args(args)).await;
        assert_exit(&output, 2);
        let message = stderr(&output);
        assert!(
            message.starts_with("error: --url and --cluster cannot be used together"),
            "{args:?}: {message}"
        );
    }

    let output = run_command(
        slim_bus_anywhere()
            .env("REDIS_URL", url)
            .env("REDIS_CLUSTER_NODES", node)
            .args(["status", "orders"]),
    )
    .await;
    assert_exit(&output, 2);
    let message = stderr(&output);
    assert!(
        message.starts_with("error: REDIS_URL and REDIS_CLUSTER_NODES are both set"),
        "{message}"
    );

    // A comma in a password splits the URL: the piece after it is not shown.
    let split = "redis://operator:s3cret,pw@127.0.0.1:1/";
    let output =
        run_command(slim_bus_anywhere().args(["--cluster", split, "status", "orders"])).await;
    assert_exit(&output, 2);
    let message = stderr(&output);
    assert!(
        message.contains("node 2 of --cluster is not a URL") && message.contains("%2C"),
        "{message}"
    );
    assert!(
        !message.contains("s3cret") && !message.contains("pw@"),
        "{message}"
    );
    let output =
        run_command(slim_bus_anywhere().args(["--cluster", " , ", "status", "orders"])).await;
    assert_exit(&output, 2);
    assert!(
        stderr(&output).starts_with("error: --cluster names no node"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_cluster_is_one_line_naming_its_seeds_without_passwords() {
    let seeds = [unused_port(), unused_port()]
        .map(|port| format!("redis://operator:s3cret-pw@127.0.0.1:{port}/"));
    let named = format!(
        "(Redis Cluster seed nodes: {}, {})",
        seeds[0].replace("s3cret-pw", "***"),
        seeds[1].replace("s3cret-pw", "***")
    );

    // `--cluster` on the command line wins over an exported REDIS_URL.
    let output = run_command(
        slim_bus_anywhere()
            .env("REDIS_URL", "redis://127.0.0.1:1/")
            .args(["--timeout", "1s", "--cluster", &seeds[0], "--cluster"])
            .args([&seeds[1], "status", "orders"]),
    )
    .await;
    assert_exit(&output, 1);
    let message = stderr(&output);
    assert!(message.starts_with("error: "), "{message}");
    assert!(message.trim_end().ends_with(&named), "{message}");
    assert_eq!(message.lines().count(), 1, "one line: {message}");
    assert!(!message.contains("s3cret-pw"), "{message}");

    // The same nodes from the environment, separated by a comma.
    let output = run_command(
        slim_bus_anywhere()
            .env("REDIS_CLUSTER_NODES", seeds.join(","))
            .args(["--timeout", "1s", "dlq", "list", "orders"]),
    )
    .await;
    assert_exit(&output, 1);
    let message = stderr(&output);
    assert!(message.trim_end().ends_with(&named), "{message}");
    assert!(!message.contains("s3cret-pw"), "{message}");

    // `--url` on the command line wins over REDIS_CLUSTER_NODES: it is a single server.
    let output = run_command(
        slim_bus_anywhere()
            .env("REDIS_CLUSTER_NODES", seeds.join(","))
            .args(["--timeout", "1s", "--url", &seeds[0], "status", "orders"]),
    )
    .await;
    assert_exit(&output, 1);
    let message = stderr(&output);
    assert!(!message.contains("Redis Cluster"), "{message}");
    assert!(!message.contains("s3cret-pw"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tls_options_apply_to_the_cluster_nodes() {
    let port = unused_port();
    let missing = std::env::temp_dir().join(format!("no-such-ca-{port}.pem"));
    let missing = missing.to_str().unwrap();
    let tls_seed = format!("rediss://127.0.0.1:{port}/");
    let output = run_on(&tls_seed, &["--tls-ca-cert", missing, "status", "orders"]).await;
    assert_exit(&output, 1);
    let message = stderr(&output);
    assert!(
        message.contains("invalid setting `tls_ca_cert`") && message.contains("cannot be read"),
        "{message}"
    );

    let plain_seed = format!("redis://127.0.0.1:{port}/");
    let output = run_on(&plain_seed, &["--tls-ca-cert", missing, "status", "orders"]).await;
    assert_exit(&output, 1);
    assert!(
        stderr(&output).contains("is set, but the URL does not use TLS"),
        "{}",
        stderr(&output)
    );
}
