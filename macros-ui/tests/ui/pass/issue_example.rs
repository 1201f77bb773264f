//! The forms of the issue that introduced the macros, all at once.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use slim_bus::{Context, EventBus, HandlerError};

#[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
    user_name: String,
}

#[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.deleted")]
struct UserDeleted {
    user_id: String,
}

#[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
struct Untyped {
    user_id: String,
}

#[derive(Debug)]
struct MyError;

impl std::fmt::Display for MyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("my error")
    }
}

impl std::error::Error for MyError {}

/// Greets new users.
#[slim_bus::stream("user.created")]
async fn on_user_created(event: UserCreated, ctx: slim_bus::Context) -> Result<(), MyError> {
    let _ = (event.user_id, event.user_name, ctx.delivery_count());
    Ok(())
}

#[slim_bus::stream]
async fn audit(event: UserCreated) -> anyhow::Result<()> {
    let _ = event;
    Ok(())
}

#[slim_bus::stream]
async fn infallible(_: UserDeleted) {}

#[slim_bus::stream("untyped")]
pub(crate) async fn retrying(_event: Untyped, _ctx: Context) -> Result<(), HandlerError> {
    Err(HandlerError::retry_after(
        std::time::Duration::from_secs(1),
        "later",
    ))
}

struct Repo;

struct UserService {
    repo: Repo,
}

#[slim_bus::handlers]
impl UserService {
    #[stream("user.deleted")]
    async fn on_deleted(&self, event: UserDeleted) -> Result<(), MyError> {
        let _ = (&self.repo, event);
        Ok(())
    }

    #[stream]
    async fn on_created(&self, event: UserCreated, ctx: Context) -> Result<(), HandlerError> {
        let _ = (event, ctx);
        self.helper();
        Err(HandlerError::permanent("never"))
    }

    fn helper(&self) {}
}

async fn build(repo: Repo) -> slim_bus::Result<EventBus> {
    EventBus::builder()
        .handler(on_user_created)
        .handler(audit)
        .handler(infallible)
        .handler(retrying)
        .service(Arc::new(UserService { repo }))
        .build()
        .await
}

async fn call_directly() {
    let _: anyhow::Result<()> = audit::call(UserCreated {
        user_id: "1".into(),
        user_name: "a".into(),
    })
    .await;
}

// Built, never run: creating the futures is enough to type-check them.
fn main() {
    drop(build(Repo));
    drop(call_directly());
}
