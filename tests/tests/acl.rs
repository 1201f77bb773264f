//! Redis ACL users with the minimal rules the README gives: a publisher-only service and a
//! consuming service run the round trip, retries, claims and dead letters with exactly
//! those rules, and a user lacking one permission gets an error naming the command.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use slim_bus::{EventBus, HandlerError};
use slim_bus_tests::{RedisServer, within};
use support::{STEP, Scripted, UserCreated, read_as_dead_consumer, recv, start_server, user};

/// The README's rule for a service that only publishes `user.created`.
const PUBLISHER_RULE: &str = "resetkeys ~user.created resetchannels -@all +ping +xadd";

/// The README's rule for a service that consumes `user.created` (its dead letters go to
/// `{user.created}:dlq`).
const CONSUMER_RULE: &str = "resetkeys ~user.created ~{user.created}:* \
    ~slim-bus:consumer:mailer:* resetchannels -@all +ping +info +type +client|id +client|unblock +xgroup|create +xgroup|delconsumer \
    +xreadgroup +xack +xpending +xclaim +xautoclaim +xadd +xrange +xdel +xlen +xinfo|groups \
    +xinfo|consumers +del +get +set +pttl +incrby +hset +hdel +hmget +evalsha +script|load";

const README: &str = include_str!("../../README.md");

/// `ACL SETUSER name on >password` followed by `rule`.
async fn create_user(server: &RedisServer, name: &str, password: &str, rule: &str) {
    let mut conn = server.connection().await;
    let mut command = redis::cmd("ACL");
    command
        .arg("SETUSER")
        .arg(name)
        .arg("on")
        .arg(format!(">{password}"));
    for part in rule.split_whitespace() {
        command.arg(part);
    }
    let _: () = within("ACL SETUSER", STEP, command.query_async(&mut conn))
        .await
        .unwrap();
}

fn url(server: &RedisServer, user: &str, password: &str) -> String {
    format!("redis://{user}:{password}@127.0.0.1:{}/", server.port())
}

#[test]
fn the_readme_gives_the_rules_these_tests_use() {
    let readme = README.split_whitespace().collect::<Vec<_>>().join(" ");
    for rule in [PUBLISHER_RULE, CONSUMER_RULE] {
        let rule = rule.split_whitespace().collect::<Vec<_>>().join(" ");
        assert!(readme.contains(&rule), "README lacks the rule `{rule}`");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_and_a_consumer_with_the_minimal_rules_do_everything() {
    let server = start_server().await;
    create_user(&server, "publisher", "pub-secret", PUBLISHER_RULE).await;
    create_user(&server, "mailer", "mailer-secret", CONSUMER_RULE).await;

    let publisher = within(
        "build the publisher",
        STEP,
        EventBus::builder()
            .url(url(&server, "publisher", "pub-secret"))
            .build(),
    )
    .await
    .unwrap();
    // A consumer that died holding the first entry leaves it for the claim scan.
    within("publish", STEP, publisher.publish(&user(0)))
        .await
        .unwrap();
    read_as_dead_consumer(&server, "user.created", "mailer", "dead-pod", 1).await;
    within(
        "publish a batch",
        STEP,
        publisher.publish_batch(&[user(1), user(2), user(3)]),
    )
    .await
    .unwrap();
    assert!(within("health", STEP, publisher.health()).await.connected);

    // 0 is claimed, 1 succeeds, 2 succeeds on its third delivery, 3 always fails.
    let (handler, mut seen) =
        Scripted::new(|event: UserCreated, ctx: slim_bus::Context| async move {
            match event.seq {
                2 if ctx.delivery_count() < 3 => Err(HandlerError::new("not yet")),
                3 => Err(HandlerError::new("never")),
                _ => Ok(()),
            }
        });
    let consumer = within(
        "build the consumer",
        STEP,
        EventBus::builder()
            .url(url(&server, "mailer", "mailer-secret"))
            .consumer_group("mailer")
            .consumer_name("mailer-1")
            .block_time(Duration::from_millis(200))
            .handler_timeout(Duration::from_millis(200))
            .claim_min_idle(Duration::from_millis(300))
            .claim_interval(Duration::from_millis(50))
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(50))
            .max_deliveries(3)
            .handler(handler.max_deliveries(3))
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, consumer.listen()).await.unwrap();
    let mut deliveries = Vec::new();
    while deliveries.len() < 1 + 1 + 3 + 3 {
        let delivery = recv(&mut seen, "a delivery").await;
        deliveries.push((delivery.event.seq, delivery.delivery_count));
    }
    deliveries.sort_unstable();
    assert_eq!(
        deliveries,
        [
            (0, 2),
            (1, 1),
            (2, 1),
            (2, 2),
            (2, 3),
            (3, 1),
            (3, 2),
            (3, 3)
        ],
        "the claimed entry, the round trip, the retries and the dead-lettered one"
    );
    support::until_nothing_pending(&server, "user.created", "mailer").await;

    let health = within("health", STEP, consumer.health()).await;
    assert!(health.connected, "{health:?}");
    assert_eq!(health.streams.len(), 1, "{health:?}");
    assert_eq!(health.streams[0].dead_letters, 1, "{health:?}");
    assert_eq!(health.streams[0].error, None, "{health:?}");
    let dead = consumer.dead_letters("user.created");
    let letters = within("list dead letters", STEP, dead.list(None, 10))
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].error, "never");
    within("purge the dead letters", STEP, dead.purge_all())
        .await
        .unwrap();
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_lacking_one_permission_gets_an_error_naming_the_command() {
    let server = start_server().await;
    let without_xreadgroup = CONSUMER_RULE.replace(" +xreadgroup", "");
    create_user(&server, "mailer", "mailer-secret", &without_xreadgroup).await;
    let (handler, _seen) = Scripted::new(|_: UserCreated, _| async { Ok(()) });
    let consumer = within(
        "build",
        STEP,
        EventBus::builder()
            .url(url(&server, "mailer", "mailer-secret"))
            .consumer_group("mailer")
            .block_time(Duration::from_millis(200))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, consumer.listen()).await.unwrap();
    let error = within("the listener to stop", STEP, listener)
        .await
        .expect_err("a consumer that may not read stops");
    let report = format!("{:#}", anyhow::Error::new(error));
    assert!(report.to_lowercase().contains("noperm"), "{report}");
    assert!(report.contains("xreadgroup"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_listen_and_a_publish_at_once_naming_the_redacted_url() {
    let server = start_server().await;
    create_user(&server, "mailer", "mailer-secret", CONSUMER_RULE).await;
    let (handler, _seen) = Scripted::new(|_: UserCreated, _| async { Ok(()) });
    let consumer = within(
        "build",
        STEP,
        EventBus::builder()
            .url(url(&server, "mailer", "not-the-secret"))
            .consumer_group("mailer")
            .block_time(Duration::from_millis(200))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    // listen() waits for a Redis that does not answer (wait_for_redis is on by default),
    // but refused credentials are not something waiting fixes.
    let error = within("listen", Duration::from_secs(5), consumer.listen())
        .await
        .expect_err("refused credentials fail listen()");
    let report = format!("{:#}", anyhow::Error::new(error));
    let redacted = format!("redis://mailer:***@127.0.0.1:{}/", server.port());
    assert!(report.contains(&redacted), "{report}");
    assert!(!report.contains("not-the-secret"), "{report}");
    assert!(report.contains("AuthenticationFailed"), "{report}");

    let error = within(
        "publish",
        Duration::from_secs(5),
        consumer.publish(&user(1)),
    )
    .await
    .expect_err("refused credentials fail a publish");
    let report = format!("{:#}", anyhow::Error::new(error));
    assert!(report.contains(&redacted), "{report}");
    assert!(report.contains("AuthenticationFailed"), "{report}");
    assert!(!report.contains("not-the-secret"), "{report}");
    assert!(report.contains("WRONGPASS"), "{report}");
    assert!(report.contains("nothing was written"), "{report}");
    // Each cause once.
    assert_eq!(
        report.matches("invalid username-password pair").count(),
        1,
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_move_refused_by_acl_shows_in_health_naming_the_key() {
    let server = start_server().await;
    create_user(&server, "mailer", "mailer-secret", CONSUMER_RULE).await;
    let (handler, mut seen) =
        Scripted::new(|_: UserCreated, _| async { Err(HandlerError::permanent("bad")) });
    let consumer = within(
        "build",
        STEP,
        EventBus::builder()
            .url(url(&server, "mailer", "mailer-secret"))
            .consumer_group("mailer")
            .block_time(Duration::from_millis(200))
            // A move that keeps failing holds the shutdown for the grace.
            .shutdown_grace(Duration::from_millis(500))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, consumer.listen()).await.unwrap();
    // Taken away after listen() checked it: the user may read the dead letters (health
    // counts them), not write them.
    create_user(
        &server,
        "mailer",
        "mailer-secret",
        "resetkeys ~user.created %R~{user.created}:* ~slim-bus:consumer:mailer:*",
    )
    .await;
    within("publish", STEP, consumer.publish(&user(1)))
        .await
        .unwrap();
    recv(&mut seen, "the failing attempt").await;
    let stream = within("health to show the failing move", STEP, async {
        loop {
            let health = consumer.health().await;
            if let Some(stream) = health
                .streams
                .into_iter()
                .find(|s| s.error.is_some() && s.dead_letter_moves_failing > 0)
            {
                return stream;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(stream.dead_letter_moves_failing, 1, "{stream:?}");
    let error = stream.error.unwrap_or_default();
    assert!(error.contains("`{user.created}:dlq`"), "{error}");
    assert!(error.to_lowercase().contains("noperm"), "{error}");
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_lacking_a_claim_or_dead_letter_permission_fails_listen_naming_it() {
    let server = start_server().await;
    let cases = [
        (
            "no-xautoclaim",
            CONSUMER_RULE.replace(" +xautoclaim", ""),
            "XAUTOCLAIM on key `user.created`",
        ),
        // The consumer-name lease, taken first, is a script too.
        (
            "no-evalsha",
            CONSUMER_RULE.replace(" +evalsha", ""),
            "`slim-bus:consumer:mailer:no-evalsha`",
        ),
        (
            "no-dlq-writes",
            CONSUMER_RULE.replace(" ~{user.created}:*", " %R~{user.created}:*"),
            "XADD on key `{user.created}:dlq`",
        ),
    ];
    for (name, rule, named) in cases {
        create_user(&server, name, "secret", &rule).await;
        let (handler, _seen) = Scripted::new(|_: UserCreated, _| async { Ok(()) });
        let consumer = within(
            "build",
            STEP,
            EventBus::builder()
                .url(url(&server, name, "secret"))
                .consumer_group("mailer")
                .consumer_name(name)
                .block_time(Duration::from_millis(200))
                .handler(handler)
                .build(),
        )
        .await
        .unwrap();
        // A missing permission is not something waiting for Redis fixes.
        let error = within("listen", STEP, consumer.listen())
            .await
            .expect_err("a consumer lacking a permission fails listen()");
        let report = format!("{:#}", anyhow::Error::new(error));
        assert!(report.contains(named), "{name}: {report}");
        assert!(report.to_lowercase().contains("noperm"), "{name}: {report}");
    }
    // XCLAIM, which claims send too, checked the same way.
    let rule = CONSUMER_RULE.replace(" +xclaim", "");
    create_user(&server, "no-xclaim", "secret", &rule).await;
    let (handler, _seen) = Scripted::new(|_: UserCreated, _| async { Ok(()) });
    let consumer = within(
        "build",
        STEP,
        EventBus::builder()
            .url(url(&server, "no-xclaim", "secret"))
            .consumer_group("mailer")
            .consumer_name("no-xclaim")
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let error = within("listen", STEP, consumer.listen())
        .await
        .expect_err("a consumer that may not XCLAIM fails listen()");
    let report = format!("{:#}", anyhow::Error::new(error));
    assert!(report.contains("XCLAIM on key `user.created`"), "{report}");
}
