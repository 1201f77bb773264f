//! `rediss://`: a bus trusting only a CA, and every way a TLS setup goes wrong, each a
//! clear error from `build()` within the command timeout. The behaviour cases over mutual
//! TLS are the `::tls` runs of the conformance tests in `core.rs` and `failures.rs`.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use slim_bus::{EventBus, EventBusBuilder};
use slim_bus_tests::within;
use support::{Record, STEP, UserCreated, start_server, start_tls_server, tls_builder, user};

/// The command timeout of the buses that are meant to fail: each must fail well within
/// [`STEP`], and no later than this allows.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// Builds `builder` and listens, which must fail within the command timeout (and a margin
/// for the connect attempts of redis-rs) although `listen()` waits for a Redis that is
/// down: waiting cannot fix these settings. Returns the whole error report.
async fn build_error(builder: EventBusBuilder) -> String {
    let started = Instant::now();
    let (handler, _seen) = Record::<UserCreated>::new();
    let error = within("listen to fail", STEP, async {
        let bus = builder
            .command_timeout(COMMAND_TIMEOUT)
            .consumer_group("tests")
            .handler(handler)
            .build()
            .await?;
        bus.listen().await.map(drop)
    })
    .await
    .expect_err("listen fails");
    let took = started.elapsed();
    assert!(
        took < COMMAND_TIMEOUT * 3,
        "listen took {took:?} to fail: {error}"
    );
    let report = format!("{:#}", anyhow::Error::new(error));
    // A connection that failed is not a failed command.
    assert!(
        !report.contains("reading the version of the server"),
        "{report}"
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_trusting_the_servers_ca_round_trips_over_tls() {
    let (server, certs) = start_tls_server(false).await;
    let (handler, mut seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        EventBus::builder()
            .url(server.tls_url())
            .tls_ca_cert(certs.ca())
            .consumer_group("tests")
            .block_time(Duration::from_millis(200))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    let id = within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    let delivery = support::recv(&mut seen, "the delivery").await;
    assert_eq!((delivery.entry_id, delivery.event), (id, user(1)));
    support::until_nothing_pending(&server, "user.created", "tests").await;
    assert!(within("health", STEP, bus.health()).await.connected);
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_is_refused_naming_the_problem() {
    let (server, certs) = start_tls_server(false).await;
    let url = format!(
        "rediss://:Recognisable-Pa55word@127.0.0.1:{}/",
        server.tls_port().unwrap()
    );
    let report = build_error(EventBus::builder().url(url).tls_ca_cert(certs.other_ca())).await;
    assert!(
        report.contains("invalid peer certificate: UnknownIssuer"),
        "{report}"
    );
    assert!(report.contains("check tls_ca_cert"), "{report}");
    assert!(!report.contains("Recognisable-Pa55word"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_the_server_rejects_fails_the_build() {
    let (server, certs) = start_tls_server(true).await;
    let stranger = EventBus::builder()
        .url(server.tls_url())
        .tls_ca_cert(certs.ca())
        .tls_client_cert(certs.stranger_cert())
        .tls_client_key(certs.stranger_key());
    let report = build_error(stranger).await;
    assert!(
        report.contains("received fatal alert: UnknownCA"),
        "{report}"
    );
    assert!(report.contains("check tls_client_cert"), "{report}");

    let anonymous = EventBus::builder()
        .url(server.tls_url())
        .tls_ca_cert(certs.ca());
    let report = build_error(anonymous).await;
    assert!(
        report.contains("received fatal alert: CertificateRequired"),
        "{report}"
    );

    // The same server takes the client certificate its CA signed.
    let bus = within("build", STEP, tls_builder(&server, &certs).build())
        .await
        .unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_url_at_a_tls_port_and_a_tls_url_at_a_plain_port_fail_fast() {
    let (server, certs) = start_tls_server(false).await;
    let plain_at_tls = format!("redis://127.0.0.1:{}/", server.tls_port().unwrap());
    let report = build_error(EventBus::builder().url(plain_at_tls)).await;
    assert!(report.contains("use a rediss:// URL"), "{report}");

    // The plain server waits for the end of a command that never comes: the handshake
    // times out, and listen() fails rather than wait for a Redis that is up.
    let plain = start_server().await;
    let tls_at_plain = format!("rediss://127.0.0.1:{}/", plain.port());
    let report = within(
        "the error within the command timeout",
        COMMAND_TIMEOUT + Duration::from_millis(500),
        build_error(
            EventBus::builder()
                .url(tls_at_plain)
                .tls_ca_cert(certs.ca()),
        ),
    )
    .await;
    assert!(report.contains("connecting to"), "{report}");
}

#[tokio::test]
async fn pem_files_that_are_missing_unreadable_or_empty_are_named_with_their_setting() {
    let certs = slim_bus_tests::TestCertificates::generate().unwrap();
    let missing = certs.dir().join("missing.pem");
    let not_pem = certs.dir().join("not-pem.txt");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let url = "rediss://127.0.0.1:1/";
    let cases: [(&str, EventBusBuilder, &Path); 5] = [
        (
            "tls_ca_cert",
            EventBus::builder().url(url).tls_ca_cert(&missing),
            &missing,
        ),
        (
            "tls_ca_cert",
            EventBus::builder().url(url).tls_ca_cert(certs.dir()),
            certs.dir(),
        ),
        (
            "tls_ca_cert",
            EventBus::builder().url(url).tls_ca_cert(&not_pem),
            &not_pem,
        ),
        (
            "tls_client_cert",
            EventBus::builder()
                .url(url)
                .tls_ca_cert(certs.ca())
                .tls_client_cert(&missing)
                .tls_client_key(certs.client_key()),
            &missing,
        ),
        (
            "tls_client_key",
            EventBus::builder()
                .url(url)
                .tls_ca_cert(certs.ca())
                .tls_client_cert(certs.client_cert())
                .tls_client_key(&not_pem),
            &not_pem,
        ),
    ];
    for (setting, builder, path) in cases {
        let error = within("build", STEP, builder.build())
            .await
            .expect_err("build fails");
        let message = error.to_string();
        assert!(
            matches!(&error, slim_bus::Error::Config { setting: s, .. } if *s == setting),
            "{error:?}"
        );
        assert!(
            message.contains(&format!("`{}`", path.display())),
            "{message}"
        );
    }
    let key = std::fs::read_to_string(certs.client_key()).unwrap();
    let mismatched = within(
        "build",
        STEP,
        EventBus::builder()
            .url(url)
            .tls_client_cert(certs.client_cert())
            .tls_client_key(certs.stranger_key())
            .build(),
    )
    .await
    .expect_err("a key of another certificate is refused");
    let message = mismatched.to_string();
    assert!(message.contains("tls_client_key"), "{message}");
    assert!(!message.contains(key.lines().nth(1).unwrap()), "{message}");

    let half = within(
        "build",
        STEP,
        EventBus::builder()
            .url(url)
            .tls_client_cert(certs.client_cert())
            .build(),
    )
    .await
    .expect_err("a certificate without its key is refused");
    assert!(half.to_string().contains("tls_client_key"), "{half}");
}

#[tokio::test]
async fn tls_settings_with_a_plain_url_or_an_insecure_url_are_refused() {
    let certs = slim_bus_tests::TestCertificates::generate().unwrap();
    let error = within(
        "build",
        STEP,
        EventBus::builder()
            .url("redis://127.0.0.1:1/")
            .tls_ca_cert(certs.ca())
            .build(),
    )
    .await
    .expect_err("a CA for a plain URL is refused");
    assert!(
        error.to_string().contains("`tls_ca_cert`") && error.to_string().contains("rediss://"),
        "{error}"
    );
    let error = within(
        "build",
        STEP,
        EventBus::builder()
            .url("rediss://127.0.0.1:1/#insecure")
            .build(),
    )
    .await
    .expect_err("#insecure is refused");
    assert!(error.to_string().contains("#insecure"), "{error}");
}

/// The read and publish connections verify the server as the redis-rs client does: given
/// a client that trusts the server, but settings that do not, publishing fails naming the
/// certificate problem, within the command timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_connection_verifies_the_server_certificate_too() {
    let (server, certs) = start_tls_server(false).await;
    let trusting = redis::Client::build_with_tls(
        server.tls_url(),
        redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(certs.ca()).unwrap()),
        },
    )
    .unwrap();
    let bus = within(
        "build",
        STEP,
        EventBus::builder()
            .client(trusting)
            .tls_ca_cert(certs.other_ca())
            .command_timeout(COMMAND_TIMEOUT)
            .build(),
    )
    .await
    .unwrap();
    let error = within("publish", STEP, bus.publish(&user(1)))
        .await
        .expect_err("the publish connection does not trust the server");
    let report = format!("{:#}", anyhow::Error::new(error));
    assert!(report.contains("UnknownIssuer"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bus_on_a_tls_cluster_reaches_every_master_over_tls_from_one_seed() {
    slim_bus_tests::init_tracing();
    let certs = slim_bus_tests::TestCertificates::generate().unwrap();
    let cluster = within(
        "the cluster to start",
        Duration::from_secs(120),
        slim_bus_tests::RedisCluster::start_tls(&certs),
    )
    .await
    .unwrap();
    // A stream on each master.
    let masters = cluster.masters().await.unwrap();
    let mut streams: Vec<(String, u16)> = Vec::new();
    for n in 0.. {
        let stream = format!("s{n}.events");
        let owner = cluster.master_of(&stream).await.unwrap();
        if !streams.iter().any(|(_, port)| *port == owner) {
            streams.push((stream, owner));
        }
        if streams.len() == masters.len() {
            break;
        }
    }
    let (handler, mut seen) = Record::<UserCreated>::new();
    let mut builder = EventBus::builder()
        .cluster([cluster.nodes()[0].tls_url()])
        .tls_ca_cert(certs.ca())
        .consumer_group("tests")
        .block_time(Duration::from_millis(200));
    for (stream, _) in &streams {
        builder = builder.handler_on(
            stream.clone(),
            Record {
                seen: handler.seen.clone(),
            },
        );
    }
    let bus = within("build", STEP, builder.build()).await.unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for (seq, (stream, _)) in streams.iter().enumerate() {
        within("publish", STEP, bus.publish_to(stream, &user(seq as u64)))
            .await
            .unwrap();
    }
    let mut handled = std::collections::BTreeSet::new();
    while handled.len() < streams.len() {
        let delivery = support::recv(&mut seen, "a delivery").await;
        handled.insert(delivery.stream);
    }
    assert_eq!(
        handled,
        streams.iter().map(|(stream, _)| stream.clone()).collect()
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}
