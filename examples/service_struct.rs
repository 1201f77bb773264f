//! A service struct whose methods handle three streams: `#[slim_bus::handlers]` on its
//! impl block, `#[stream]` on each handler method, and `.service(Arc::new(..))` to
//! register them all. The handlers share the one service (its repository here) through
//! the `Arc`; the struct is never cloned.
//!
//! Run with:
//!
//! ```sh
//! cargo run -p slim-bus-examples --example service-struct
//! ```
//!
//! It uses the Redis at `REDIS_URL` when that is set; otherwise it starts a throwaway
//! `redis-server` for the length of the run if one is installed, and else runs on the
//! in-memory backend (`memory://`), so no Redis is needed at all.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slim_bus::{Context, EventBus, HandlerError};
use tokio::sync::Notify;

#[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
    user_name: String,
}

#[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.renamed")]
struct UserRenamed {
    user_id: String,
    user_name: String,
}

/// No stream of its own: the handler below names the one it reads.
#[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
struct UserDeleted {
    user_id: String,
}

/// What the service's handlers can fail with.
#[derive(Debug)]
enum RepoError {
    UnknownUser(String),
}

impl std::fmt::Display for RepoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RepoError::UnknownUser(id) => write!(f, "no user `{id}`"),
        }
    }
}

impl std::error::Error for RepoError {}

/// An in-memory user repository: the state the handlers share.
#[derive(Default)]
struct Repo {
    users: Mutex<BTreeMap<String, String>>,
}

impl Repo {
    fn users(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        // A poisoned lock only means another handler panicked mid-update; the map is
        // still usable for this example.
        self.users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

struct UserService {
    repo: Repo,
    changed: Notify,
}

#[slim_bus::handlers]
impl UserService {
    /// On `user.created`, the event type's own stream, with the delivery's context.
    #[stream]
    async fn on_created(&self, event: UserCreated, ctx: Context) -> Result<(), RepoError> {
        println!("{}: {} joined", ctx.entry_id(), event.user_name);
        self.repo.users().insert(event.user_id, event.user_name);
        self.changed.notify_one();
        Ok(())
    }

    /// On `user.renamed`. Renaming a user that does not exist (yet) fails: the entry
    /// stays pending and is delivered again.
    #[stream]
    async fn on_renamed(&self, event: UserRenamed) -> Result<(), RepoError> {
        let mut users = self.repo.users();
        let name = users
            .get_mut(&event.user_id)
            .ok_or_else(|| RepoError::UnknownUser(event.user_id.clone()))?;
        println!("{name} is now {}", event.user_name);
        *name = event.user_name;
        drop(users);
        self.changed.notify_one();
        Ok(())
    }

    /// On the stream the attribute names. Returning `HandlerError` gives the handler
    /// the say over retries: deleting a user nobody knows can never succeed.
    #[stream("user.deleted")]
    async fn on_deleted(&self, event: UserDeleted) -> Result<(), HandlerError> {
        if self.repo.users().remove(&event.user_id).is_none() {
            return Err(HandlerError::permanent(RepoError::UnknownUser(
                event.user_id,
            )));
        }
        println!("{} left", event.user_id);
        self.changed.notify_one();
        Ok(())
    }

    /// Not a handler: `#[handlers]` leaves it as it is.
    fn snapshot(&self) -> BTreeMap<String, String> {
        self.repo.users().clone()
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

    let service = Arc::new(UserService {
        repo: Repo::default(),
        changed: Notify::new(),
    });
    let bus = EventBus::builder()
        .url(&url)
        .consumer_group("user-service")
        .consumer_name("service-struct")
        .handler_timeout(Duration::from_secs(5))
        .service(service.clone())
        .build()
        .await?;
    let listener = bus.listen().await?;

    // One after the other, each handled before the next: they depend on each other.
    let jane = "4d5e6f";
    bus.publish(&UserCreated {
        user_id: jane.into(),
        user_name: "Jane Doe".into(),
    })
    .await?;
    wait_until(&service, "Jane joined", |users| users.contains_key(jane)).await?;

    bus.publish(&UserRenamed {
        user_id: jane.into(),
        user_name: "Jane Roe".into(),
    })
    .await?;
    wait_until(&service, "Jane was renamed", |users| {
        users.get(jane).is_some_and(|name| name == "Jane Roe")
    })
    .await?;

    bus.publish_to(
        "user.deleted",
        &UserDeleted {
            user_id: jane.into(),
        },
    )
    .await?;
    wait_until(&service, "Jane left", |users| !users.contains_key(jane)).await?;

    listener.shutdown().await?;
    println!("done: {} users left", service.snapshot().len());
    Ok(())
}

/// Waits (at most 10 s) until the service's users satisfy `done`.
async fn wait_until(
    service: &UserService,
    what: &str,
    done: impl Fn(&BTreeMap<String, String>) -> bool,
) -> anyhow::Result<()> {
    tokio::time::timeout(Duration::from_secs(10), async {
        // `notify_one` keeps a permit when nobody waits yet, so no change is missed.
        while !done(&service.snapshot()) {
            service.changed.notified().await;
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("timed out waiting until {what}"))
}
