//! No password reaches any output of the bus: `Debug` and `Serialize` of its builder and
//! config, its errors (malformed URL, bad database number, refused credentials), its log
//! lines and its health snapshot.
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slim_bus::{EventBus, EventBusConfig};
use slim_bus_tests::within;
use support::{Record, STEP, UserCreated, start_server, user};
use tracing_subscriber::util::SubscriberInitExt;

/// A password no output could contain by chance.
const PASSWORD: &str = "Recognisable-Pa55word";

/// Everything the bus's log lines say while it lives, on this thread (the tests run on a
/// current-thread runtime, so the bus's tasks log here too).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        tracing_subscriber::fmt()
            .with_env_filter("trace")
            .with_writer(move || logs.clone())
            .with_ansi(false)
            .finish()
            .set_default()
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

/// Fails naming `what` if `output` holds the password.
fn assert_hidden(what: &str, output: &str) {
    assert!(
        !output.contains(PASSWORD),
        "{what} shows the password: {output}"
    );
}

/// Display, Debug and the whole report (with every source) of an error.
fn assert_error_hidden(what: &str, error: slim_bus::Error) {
    assert_hidden(&format!("{what} (Display)"), &error.to_string());
    assert_hidden(&format!("{what} (Debug)"), &format!("{error:?}"));
    assert_hidden(
        &format!("{what} (report)"),
        &format!("{:#}", anyhow::Error::new(error)),
    );
}

#[test]
fn the_builder_and_the_config_print_and_serialize_no_password() {
    let url = format!("rediss://service:{PASSWORD}@redis.internal:6380/2");
    let config: EventBusConfig =
        serde_json::from_value(serde_json::json!({ "url": url, "consumer_group": "billing" }))
            .unwrap();
    assert_eq!(config.url, url, "the config itself keeps the password");
    let debug = format!("{config:?}");
    assert_hidden("Debug of EventBusConfig", &debug);
    assert!(
        debug.contains("rediss://service:***@redis.internal:6380/2"),
        "the URL is shown with its password hidden: {debug}"
    );
    assert_hidden(
        "Serialize of EventBusConfig",
        &serde_json::to_string(&config).unwrap(),
    );
    assert_hidden(
        "Debug of EventBusBuilder",
        &format!("{:?}", EventBus::builder().config(config.clone())),
    );
    assert_hidden(
        "Debug of EventBusBuilder",
        &format!("{:#?}", EventBus::builder().url(url.as_str())),
    );
}

#[tokio::test]
async fn errors_for_malformed_urls_and_bad_databases_show_no_password() {
    let logs = Logs::default();
    let _capture = logs.capture();
    for url in [
        // Not a URL at all: the port is out of range.
        format!("redis://service:{PASSWORD}@127.0.0.1:99999/"),
        format!("rediss://service:{PASSWORD}@[::1/"),
        // A password with characters that end the authority, unescaped.
        format!("redis://service:a/{PASSWORD}@127.0.0.1:6379/"),
        // A database that is not a number.
        format!("redis://service:{PASSWORD}@127.0.0.1:1/not-a-number"),
        format!("redis+unix:///run/redis.sock?pass={PASSWORD}&db=x"),
    ] {
        let error = within("build", STEP, EventBus::builder().url(url.as_str()).build())
            .await
            .expect_err("the URL is refused");
        assert!(
            matches!(error, slim_bus::Error::Config { setting: "url", .. }),
            "{error:?}"
        );
        assert_error_hidden(&format!("the error for {url}"), error);
    }
    assert_hidden("the log", &logs.text());
}

#[tokio::test]
async fn refused_credentials_and_a_working_bus_show_no_password() {
    let server = start_server().await;
    let logs = Logs::default();
    let _capture = logs.capture();
    let mut conn = server.connection().await;
    let _: () = within(
        "CONFIG SET requirepass",
        STEP,
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("requirepass")
            .arg(format!("other-{PASSWORD}"))
            .query_async(&mut conn),
    )
    .await
    .unwrap();

    let refused = format!("redis://:{PASSWORD}@127.0.0.1:{}/", server.port());
    let error = within("build", STEP, EventBus::builder().url(refused).build())
        .await
        .expect_err("the server refuses the password");
    let report = format!("{error:?}");
    assert!(report.contains("AuthenticationFailed"), "{report}");
    assert_error_hidden("the error for a refused password", error);

    let _: () = within(
        "CONFIG SET requirepass",
        STEP,
        redis::cmd("CONFIG")
            .arg("SET")
            .arg("requirepass")
            .arg(PASSWORD)
            .query_async(&mut conn),
    )
    .await
    .unwrap();
    let (handler, mut seen) = Record::<UserCreated>::new();
    let bus = within(
        "build",
        STEP,
        EventBus::builder()
            .url(format!("redis://:{PASSWORD}@127.0.0.1:{}/", server.port()))
            .consumer_group("tests")
            .block_time(Duration::from_millis(100))
            .handler(handler)
            .build(),
    )
    .await
    .unwrap();
    assert_hidden("Debug of EventBus", &format!("{bus:?}"));
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    within("publish", STEP, bus.publish(&user(1)))
        .await
        .unwrap();
    support::recv(&mut seen, "the delivery").await;
    assert_hidden(
        "the health snapshot",
        &format!("{:?}", within("health", STEP, bus.health()).await),
    );
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
    let logs = logs.text();
    assert!(logs.contains("listening"), "the log was captured: {logs}");
    assert_hidden("the log", &logs);
}
