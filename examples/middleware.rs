//! Middleware: tower layers around handler calls. A bus-wide layer written with
//! `tower::layer_fn` + `service_fn` times every call and logs its context; tower's own
//! `ConcurrencyLimitLayer` on one handler lets at most two of its calls run at once, while
//! the bus would run 64. The handler counts how many run at once to show it.
//!
//! Run with:
//!
//! ```sh
//! cargo run -p slim-bus-examples --example middleware
//! ```
//!
//! It uses the Redis at `REDIS_URL` when that is set; otherwise it starts a throwaway
//! `redis-server` for the length of the run if one is installed, and else runs on the
//! in-memory backend (`memory://`), so no Redis is needed at all.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slim_bus::{BusService, EventBus, HandlerRequest, StreamHandler};
use tokio::sync::Semaphore;
use tower::layer::layer_fn;
use tower::limit::ConcurrencyLimitLayer;
use tower::{ServiceExt, service_fn};

#[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "image.uploaded")]
struct ImageUploaded {
    image_id: u32,
}

static RUNNING: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// One permit per handled event, so `main` knows when all are done.
static HANDLED: Semaphore = Semaphore::const_new(0);

/// Makes a thumbnail: slow, and heavy on memory, so only two may run at once.
#[slim_bus::stream]
async fn make_thumbnail(event: ImageUploaded) {
    let running = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
    PEAK.fetch_max(running, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(20)).await;
    RUNNING.fetch_sub(1, Ordering::SeqCst);
    println!("thumbnail of image {} made", event.image_id);
    HANDLED.add_permits(1);
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let (url, _server) = slim_bus_examples::redis_for_the_example().await?;

    // Around every handler of the bus: sees the context (and the type-erased event) of
    // each call, calls the handler, and sees its outcome.
    let timing = layer_fn(|inner: BusService| {
        service_fn(move |request: HandlerRequest| {
            let inner = inner.clone();
            async move {
                let ctx = request.context().clone();
                let started = std::time::Instant::now();
                let outcome = inner.oneshot(request).await;
                println!(
                    "{} {} took {:?}: {}",
                    ctx.stream(),
                    ctx.entry_id(),
                    started.elapsed(),
                    if outcome.is_ok() { "ok" } else { "failed" }
                );
                outcome
            }
        })
    });

    let bus = EventBus::builder()
        .url(&url)
        .consumer_group("thumbnails")
        .consumer_name("middleware")
        .max_concurrent(64)
        .handler(make_thumbnail.layer(ConcurrencyLimitLayer::new(2)))
        .layer(timing)
        .build()
        .await?;
    let listener = bus.listen().await?;

    let images: Vec<ImageUploaded> = (0..10).map(|image_id| ImageUploaded { image_id }).collect();
    bus.publish_batch(&images).await?;
    tokio::time::timeout(Duration::from_secs(10), HANDLED.acquire_many(10))
        .await??
        .forget();

    listener.shutdown().await?;
    println!(
        "done: 10 thumbnails, at most {} at once",
        PEAK.load(Ordering::SeqCst)
    );
    Ok(())
}
