//! Quickstart: a publisher and a handler exchanging typed events through Redis Streams.
//!
//! Run with:
//!
//! ```sh
//! cargo run -p slim-bus-examples --example quickstart
//! ```
//!
//! It uses the Redis at `REDIS_URL` when that is set; otherwise it starts a throwaway
//! `redis-server` for the length of the run if one is installed, and else runs on the
//! in-memory backend (`memory://`), so no Redis is needed at all.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use slim_bus::{Context, EventBus, HandlerError, StreamHandler};
use tokio::sync::mpsc;

/// The event: its fields become the fields of one stream entry.
#[derive(Debug, Serialize, Deserialize)]
struct UserCreated {
    user_id: String,
    user_name: String,
}

impl slim_bus::Event for UserCreated {
    const STREAM: Option<&'static str> = Some("user.created");
}

/// The handler: runs once per entry of `user.created`.
struct SendWelcomeMail {
    sent: mpsc::UnboundedSender<String>,
}

#[slim_bus::async_trait]
impl StreamHandler for SendWelcomeMail {
    type Event = UserCreated;

    async fn handle(&self, event: UserCreated, ctx: Context) -> Result<(), HandlerError> {
        println!(
            "handled {} ({}): welcome, {}!",
            ctx.entry_id(),
            ctx.stream(),
            event.user_name
        );
        self.sent.send(event.user_id)?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let (url, _server) = slim_bus_examples::redis_for_the_example().await?;

    let (sent, mut welcomed) = mpsc::unbounded_channel();
    let bus = EventBus::builder()
        .url(&url)
        .consumer_group("mailer")
        .consumer_name("quickstart")
        .handler_timeout(Duration::from_secs(5))
        .handler(SendWelcomeMail { sent })
        .build()
        .await?;
    let listener = bus.listen().await?;

    let users = [
        ("1a2b3c", "John Doe"),
        ("4d5e6f", "Jane Roe"),
        ("7g8h9i", "Max Mustermann"),
    ];
    for (user_id, user_name) in users {
        let id = bus
            .publish(&UserCreated {
                user_id: user_id.into(),
                user_name: user_name.into(),
            })
            .await?;
        println!("published {id}: {user_name}");
    }
    for _ in users {
        tokio::time::timeout(Duration::from_secs(10), welcomed.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the handler stopped"))?;
    }

    listener.shutdown().await?;
    println!("done: every event was handled and acknowledged");
    Ok(())
}
