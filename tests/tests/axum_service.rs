//! The axum-service example (examples/axum_service.rs, built here as the `axum-service`
//! binary), run as a process against a throwaway Redis: what a user does with it from the
//! outside, over HTTP, then SIGTERM and a clean exit with nothing left pending.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use serde_json::Value;
use slim_bus_tests::within;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The consumer group of the example's bus.
const GROUP: &str = "user-directory";

/// One HTTP response: status, headers (names lowercase) and body.
#[derive(Debug)]
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {}", self.body))
    }
}

/// Sends one HTTP/1.1 request on a connection of its own and reads the whole response.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response {
    within(&format!("{method} {path}"), STEP, async {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.unwrap();
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no end of headers in {raw:?}"));
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {raw:?}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_owned()))
            .collect();
        assert!(
            !headers
                .iter()
                .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked")),
            "this client reads sized bodies only: {raw:?}"
        );
        Response {
            status,
            headers,
            body: body.to_owned(),
        }
    })
    .await
}

/// The sum of the samples of Prometheus metric `name` whose labels include all `labels`
/// (as `key="value"`); 0 when there is none.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The published and the successfully handled count of `user.created`, from `/metrics`.
async fn counters(addr: SocketAddr) -> (f64, f64) {
    let response = http(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(response.status, 200, "{response:?}");
    let stream = r#"messaging_destination_name="user.created""#;
    (
        metric(&response.body, "slim_bus_sent_messages_total", &[stream]),
        metric(
            &response.body,
            "slim_bus_consumed_messages_total",
            &[stream, r#"outcome="ok""#],
        ),
    )
}

/// Starts the service on a free port; returns it and the address it listens on.
async fn start_service(redis_url: &str) -> (Child, SocketAddr) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_axum-service"))
        .args(["--listen", "127.0.0.1:0"])
        .env("REDIS_URL", redis_url)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("the axum-service binary starts");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = within("`listening on ADDR`", STEP, lines.next_line())
        .await
        .unwrap()
        .expect("the service prints where it listens");
    let addr = line
        .strip_prefix("listening on ")
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
    (child, addr)
}

/// Sends SIGTERM, as Kubernetes, systemd and `docker stop` do, and waits for the exit.
async fn terminate(child: &mut Child) -> ExitStatus {
    let pid = child.id().expect("the service still runs").to_string();
    let kill = within(
        "kill -TERM",
        STEP,
        Command::new("kill").args(["-s", "TERM", &pid]).status(),
    )
    .await
    .unwrap();
    assert!(kill.success(), "kill -s TERM {pid}: {kill}");
    within("the service to exit after SIGTERM", STEP, child.wait())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_publishes_handles_reports_and_shuts_down_cleanly() {
    let server = start_server().await;
    let (mut child, addr) = start_service(&server.url()).await;

    // HTTP serves before the bus listens: wait for the listener.
    let health = within("the bus to listen", STEP, async {
        loop {
            let health = http(addr, "GET", "/healthz", &[], "").await;
            if health.status == 200 && health.json()["listening"] == true {
                break health.json();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(health["connected"], true, "{health}");
    assert!(
        health["streams"]
            .as_array()
            .unwrap()
            .iter()
            .any(|stream| stream["stream"] == "user.created"),
        "{health}"
    );
    let (sent_before, handled_before) = counters(addr).await;

    // A request with its own id, and one without: the service makes one up.
    let json = [("content-type", "application/json")];
    let with_id = http(
        addr,
        "POST",
        "/users",
        &[json[0], ("x-request-id", "req-from-the-test")],
        r#"{"name":"Jane Roe"}"#,
    )
    .await;
    assert_eq!(with_id.status, 202, "{with_id:?}");
    assert_eq!(with_id.header("x-request-id"), Some("req-from-the-test"));
    let jane = with_id.json()["user_id"].as_str().unwrap().to_owned();
    let without_id = http(addr, "POST", "/users", &json, r#"{"name":"John Doe"}"#).await;
    assert_eq!(without_id.status, 202, "{without_id:?}");
    let made_up = without_id.header("x-request-id").unwrap().to_owned();
    assert!(made_up.starts_with("req-"), "{made_up}");
    let john = without_id.json()["user_id"].as_str().unwrap().to_owned();

    // The handler's effect, as a client sees it: the user exists once it ran.
    for (user_id, name, request_id) in [
        (&jane, "Jane Roe", "req-from-the-test"),
        (&john, "John Doe", made_up.as_str()),
    ] {
        let user = within("the handler to store the user", STEP, async {
            loop {
                let response = http(addr, "GET", &format!("/users/{user_id}"), &[], "").await;
                match response.status {
                    200 => return response.json(),
                    404 => tokio::time::sleep(Duration::from_millis(20)).await,
                    other => panic!("GET /users/{user_id}: {other} {response:?}"),
                }
            }
        })
        .await;
        assert_eq!(user["user_name"], name, "{user}");
        assert_eq!(
            user["request_id"], request_id,
            "the header reached the handler"
        );
    }
    assert_eq!(
        http(addr, "GET", "/users/nobody", &[], "").await.status,
        404
    );

    // The counters moved by one per request: two published, two handled (counted once the
    // handler returned, so shortly after its effect is visible).
    let (sent, handled) = within("the handled counter to reach 2", STEP, async {
        loop {
            let (sent, handled) = counters(addr).await;
            if handled - handled_before >= 2.0 {
                return (sent, handled);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(sent - sent_before, 2.0);
    assert_eq!(handled - handled_before, 2.0);

    let status = terminate(&mut child).await;
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert_eq!(pending_count(&server, "user.created", GROUP).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_503_while_the_bus_waits_for_redis_and_sigterm_stops_the_wait() {
    // A port nothing listens on: the bus waits for Redis, HTTP serves meanwhile.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (mut child, addr) = start_service(&format!("redis://127.0.0.1:{port}/")).await;
    for _ in 0..3 {
        let health = http(addr, "GET", "/healthz", &[], "").await;
        assert_eq!(health.status, 503, "{health:?}");
        let health = health.json();
        assert_eq!(health["connected"], false, "{health}");
        assert_eq!(health["listening"], false, "{health}");
    }
    let status = terminate(&mut child).await;
    assert!(status.success(), "a stop while waiting is clean: {status}");
}
