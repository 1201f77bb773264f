//! slim-bus inside a web service: an axum HTTP server and a bus in one binary, sharing
//! one graceful shutdown. `POST /users` publishes `UserCreated` with the request's
//! `x-request-id` as a header; a `#[slim_bus::handlers]` service stores the user, which
//! `GET /users/{id}` then serves. `GET /healthz` serves `bus.health()` as JSON (503 when
//! not ready), `GET /metrics` the bus's metrics in the Prometheus text format. HTTP serves
//! before the bus listens, so `/healthz` answers (503) while the bus waits for Redis.
//!
//! Run with:
//!
//! ```sh
//! REDIS_URL=redis://127.0.0.1:6379/ cargo run -p slim-bus-examples --example axum-service
//! curl -si localhost:3000/users -H 'content-type: application/json' -d '{"name":"Jane Roe"}'
//! curl -s localhost:3000/users/USER_ID    # 404 until the handler stored it, then 200
//! curl -s localhost:3000/healthz
//! curl -s localhost:3000/metrics | grep slim_bus_
//! ```
//!
//! `REDIS_URL` defaults to `redis://127.0.0.1:6379/` (`memory://` runs it without Redis);
//! `--listen ADDR` or `LISTEN_ADDR` sets the address (default `127.0.0.1:3000`; port 0
//! picks a free one). It prints `listening on ADDR` once it serves. On Ctrl-C or SIGTERM it
//! stops accepting connections, lets the requests in flight finish, then stops the bus:
//! running handlers finish and their acknowledgements are flushed. It exits with status 0
//! after a clean shutdown, and 1 when the listener stopped on an error (refused
//! credentials, say), so that an orchestrator restarts it.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use slim_bus::{Context, EventBus, Headers};

/// The header that carries the request id, from the HTTP request to the event's handler.
const REQUEST_ID: &str = "x-request-id";

/// How long the HTTP server may take to finish its requests in flight at shutdown; the
/// bus then has its own `shutdown_grace` for its handlers.
const HTTP_DRAIN: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
    user_name: String,
}

/// A user as the handler stored it.
#[derive(Debug, Clone, Serialize)]
struct User {
    user_id: String,
    user_name: String,
    /// The request that created it, from the event's headers.
    request_id: Option<String>,
}

/// The users the handler stored: the state it shares with the HTTP routes.
#[derive(Default)]
struct Directory {
    users: Mutex<HashMap<String, User>>,
}

impl Directory {
    fn get(&self, user_id: &str) -> Option<User> {
        lock(&self.users).get(user_id).cloned()
    }
}

#[slim_bus::handlers]
impl Directory {
    #[stream]
    async fn on_user_created(&self, event: UserCreated, ctx: Context) {
        let request_id = ctx.headers().get(REQUEST_ID).map(str::to_owned);
        tracing::info!(user_id = %event.user_id, request_id, "user stored");
        let user = User {
            user_id: event.user_id.clone(),
            user_name: event.user_name,
            request_id,
        };
        lock(&self.users).insert(event.user_id, user);
    }
}

/// What the routes share.
#[derive(Clone)]
struct AppState {
    bus: EventBus,
    directory: Arc<Directory>,
    metrics: PrometheusHandle,
}

#[derive(Debug, Deserialize)]
struct NewUser {
    name: String,
}

#[derive(Debug, Serialize)]
struct Created {
    user_id: String,
    request_id: String,
    entry_id: String,
}

/// `POST /users`: publishes `UserCreated`; the user exists once its handler ran, so the
/// answer is 202 Accepted.
async fn create_user(
    State(state): State<AppState>,
    request_headers: HeaderMap,
    Json(new_user): Json<NewUser>,
) -> Response {
    let request_id = request_headers
        .get(REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .map_or_else(|| unique_id("req"), str::to_owned);
    let user_id = unique_id("u");
    let mut headers = Headers::new();
    headers.insert(REQUEST_ID, request_id.clone());
    let event = UserCreated {
        user_id: user_id.clone(),
        user_name: new_user.name,
    };
    match state.bus.publish_with_headers(&event, &headers).await {
        Ok(entry_id) => (
            StatusCode::ACCEPTED,
            [(REQUEST_ID, request_id.clone())],
            Json(Created {
                user_id,
                request_id,
                entry_id: entry_id.to_string(),
            }),
        )
            .into_response(),
        Err(error) => {
            tracing::error!(error = %error, request_id, "publishing UserCreated failed");
            (StatusCode::SERVICE_UNAVAILABLE, error.to_string()).into_response()
        }
    }
}

/// `GET /users/{id}`: the user once the handler stored it, else 404.
async fn get_user(State(state): State<AppState>, Path(user_id): Path<String>) -> Response {
    match state.directory.get(&user_id) {
        Some(user) => Json(user).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `GET /healthz`: the bus's health as JSON; 503 when it is not ready.
async fn healthz(State(state): State<AppState>) -> Response {
    let health = state.bus.health().await;
    let status = if health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(health)).into_response()
}

/// `GET /metrics`: everything recorded, in the Prometheus text format.
async fn serve_metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs go to stderr; stdout says where the service listens.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let listen = listen_addr()?;
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned());

    // The recorder first: the bus describes its metrics when it is built.
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let directory = Arc::new(Directory::default());
    let bus = EventBus::builder()
        .url(redis_url)
        .consumer_group("user-directory")
        .service(directory.clone())
        .build()
        .await?;

    let app = Router::new()
        .route("/users", post(create_user))
        .route("/users/{id}", get(get_user))
        .route("/healthz", get(healthz))
        .route("/metrics", get(serve_metrics))
        .with_state(AppState {
            bus: bus.clone(),
            directory,
            metrics,
        });
    let tcp = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on {}", tcp.local_addr()?);

    // HTTP serves before the bus listens: while `listen()` waits for Redis (it does by
    // default), `/healthz` answers 503 with `connected` and `listening` false, instead of
    // a refused connection that reads as a dead process.
    let (stop_http, http_stopped) = tokio::sync::watch::channel(());
    let mut http_stopped = http_stopped;
    let server = axum::serve(tcp, app).with_graceful_shutdown(async move {
        let _ = http_stopped.changed().await;
    });
    let mut server = std::pin::pin!(server.into_future());
    let mut signal = std::pin::pin!(shutdown_signal());

    let listener = tokio::select! {
        served = &mut server => {
            served?;
            anyhow::bail!("the HTTP server stopped by itself");
        }
        listening = bus.listen() => Some(listening?),
        // Stopped while the bus still waited for Redis: nothing to hand over.
        () = &mut signal => None,
    };
    if let Some(mut listener) = listener {
        tokio::select! {
            served = &mut server => {
                served?;
                anyhow::bail!("the HTTP server stopped by itself");
            }
            stopped = &mut listener => {
                // Already logged at ERROR by the bus; exit non-zero so that we get restarted.
                let error = stopped.err().map_or_else(
                    || anyhow::anyhow!("the listener stopped"),
                    anyhow::Error::from,
                );
                return Err(error.context("the bus stopped listening"));
            }
            () = &mut signal => tracing::info!("shutting down"),
        }
        stop(stop_http, &mut server).await?;
        listener.shutdown().await?;
    } else {
        tracing::info!("shutting down before the bus listened");
        stop(stop_http, &mut server).await?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// Stops the HTTP server and lets its requests in flight finish, for up to
/// [`HTTP_DRAIN`]. HTTP stops before the bus: its requests in flight may still publish.
/// The bus then lets its running handlers finish (within `shutdown_grace`) and flushes
/// their acks.
async fn stop<F>(
    stop_http: tokio::sync::watch::Sender<()>,
    server: &mut Pin<&mut F>,
) -> anyhow::Result<()>
where
    F: Future<Output = std::io::Result<()>>,
{
    let _ = stop_http.send(());
    match tokio::time::timeout(HTTP_DRAIN, server).await {
        Ok(served) => served?,
        Err(_) => tracing::warn!(
            "HTTP requests still running after {HTTP_DRAIN:?}; stopping the bus anyway"
        ),
    }
    Ok(())
}

/// `--listen ADDR`, else `LISTEN_ADDR`, else `127.0.0.1:3000`.
fn listen_addr() -> anyhow::Result<SocketAddr> {
    let mut args = std::env::args().skip(1);
    let mut listen = std::env::var("LISTEN_ADDR").ok();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => {
                listen = Some(
                    args.next()
                        .ok_or_else(|| anyhow::anyhow!("--listen needs an address"))?,
                )
            }
            other => {
                anyhow::bail!("unknown argument `{other}`; usage: axum-service [--listen ADDR]")
            }
        }
    }
    let listen = listen.unwrap_or_else(|| "127.0.0.1:3000".to_owned());
    listen
        .parse()
        .map_err(|error| anyhow::anyhow!("invalid listen address `{listen}`: {error}"))
}

/// Resolves on Ctrl-C, or on SIGTERM: what Kubernetes, systemd and `docker stop` send.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
                return;
            }
            Err(error) => tracing::warn!(%error, "no SIGTERM handler; stopping on Ctrl-C only"),
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// An id unique within this process and unlikely to repeat across restarts.
fn unique_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}-{started:x}-{n}")
}

/// The map behind the mutex, also after a handler panicked while holding it.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
