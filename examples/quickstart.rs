//! Quickstart: the README's tour, runnable. A `#[derive(Event)]` struct, a `#[stream]`
//! handler, a bus that publishes and listens, and a graceful shutdown on Ctrl-C or
//! SIGTERM (what Kubernetes and systemd send to stop a process).
//!
//! Run with:
//!
//! ```sh
//! cargo run -p slim-bus-examples --example quickstart
//! ```
//!
//! It uses the Redis at `REDIS_URL` when that is set; otherwise it starts a throwaway
//! `redis-server` for the length of the run if one is installed, and else runs on the
//! in-memory backend (`memory://`), so no Redis is needed at all. It stops by itself once
//! every event it published was handled, or earlier on Ctrl-C or SIGTERM.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use slim_bus::{Context, EventBus};
use tokio::sync::Semaphore;

/// The event: its fields become the fields of one stream entry of `user.created`.
#[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
    user_name: String,
}

/// One permit per handled event, so that `main` knows when all are done.
static WELCOMED: Semaphore = Semaphore::const_new(0);

/// Runs once per `user.created` entry; `Ok` acknowledges it.
#[slim_bus::stream]
async fn send_welcome_mail(event: UserCreated, ctx: Context) -> Result<(), std::io::Error> {
    println!(
        "welcome {} (entry {}, delivery {})",
        event.user_name,
        ctx.entry_id(),
        ctx.delivery_count()
    );
    WELCOMED.add_permits(1);
    Ok(())
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, whichever comes first.
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
            Err(error) => eprintln!("cannot listen for SIGTERM ({error}); only Ctrl-C stops this"),
        }
    }
    // Without a handler for the signal, waiting for it is waiting for ever.
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
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

    let bus = EventBus::builder()
        .url(&url)
        .consumer_group("mailer")
        .consumer_name("quickstart")
        .handler_timeout(Duration::from_secs(5))
        .handler(send_welcome_mail)
        .build()
        .await?;

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

    // Handle events until every one published above was handled, or until Ctrl-C or
    // SIGTERM; then shut down gracefully: running handlers finish, acks are flushed.
    let all_welcomed = async {
        if let Ok(permits) = WELCOMED
            .acquire_many(u32::try_from(users.len()).unwrap_or(u32::MAX))
            .await
        {
            permits.forget();
            println!("done: every event was handled and acknowledged");
        }
    };
    bus.run_until(async {
        tokio::select! {
            () = all_welcomed => {}
            () = shutdown_signal() => println!("stopping on a signal"),
        }
    })
    .await?;
    Ok(())
}
