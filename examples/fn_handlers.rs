//! Handlers as plain async functions: `#[slim_bus::stream]` turns each into a value that
//! `.handler(..)` registers, on the stream the attribute names or the event type's own.
//! Shows a handler with the delivery's `Context` and one without, `anyhow::Result` and
//! `()` returns, and that the function stays callable as `name::call(..)`.
//!
//! Run with:
//!
//! ```sh
//! cargo run -p slim-bus-examples --example fn-handlers
//! ```
//!
//! It uses the Redis at `REDIS_URL` when that is set; otherwise it starts a throwaway
//! `redis-server` for the length of the run if one is installed, and else runs on the
//! in-memory backend (`memory://`), so no Redis is needed at all.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use slim_bus::{Context, EventBus};
use tokio::sync::Semaphore;

#[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
    user_name: String,
}

/// One permit per handled event, so `main` knows when all are done.
static HANDLED: Semaphore = Semaphore::const_new(0);

/// Sends the welcome mail. Reads `user.created`, the event type's stream, and uses the
/// context to tell first deliveries from redeliveries.
#[slim_bus::stream]
async fn send_welcome_mail(event: UserCreated, ctx: Context) -> anyhow::Result<()> {
    anyhow::ensure!(
        !event.user_name.is_empty(),
        "user {} has no name",
        event.user_id
    );
    if ctx.delivery_count() > 1 {
        println!("(delivery {} of {})", ctx.delivery_count(), ctx.entry_id());
    }
    println!("welcome mail sent to {}", event.user_name);
    HANDLED.add_permits(1);
    Ok(())
}

/// Keeps an audit trail of the same events on a stream of its own, `user.created.audit`,
/// and cannot fail.
#[slim_bus::stream("user.created.audit")]
async fn audit(event: UserCreated) {
    println!("audit: user {} created", event.user_id);
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

    let bus = EventBus::builder()
        .url(&url)
        .consumer_group("mailer")
        .consumer_name("fn-handlers")
        .handler_timeout(Duration::from_secs(5))
        .handler(send_welcome_mail)
        .handler(audit)
        .build()
        .await?;
    let listener = bus.listen().await?;

    let users = [("1a2b3c", "John Doe"), ("4d5e6f", "Jane Roe")];
    for (user_id, user_name) in users {
        let event = UserCreated {
            user_id: user_id.into(),
            user_name: user_name.into(),
        };
        bus.publish(&event).await?;
        bus.publish_to("user.created.audit", &event).await?;
    }
    let handled = u32::try_from(users.len() * 2)?;
    tokio::time::timeout(Duration::from_secs(10), HANDLED.acquire_many(handled))
        .await??
        .forget();

    listener.shutdown().await?;
    println!("done: every event was handled and acknowledged");

    // The function as written, outside any bus: handy in unit tests.
    audit::call(UserCreated {
        user_id: "0".into(),
        user_name: "Nobody".into(),
    })
    .await;
    Ok(())
}
