use std::rc::Rc;

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
}

async fn save(_: &str) {}

#[slim_bus::stream]
async fn on_user_created(event: UserCreated) -> anyhow::Result<()> {
    let cache = Rc::new(event.user_id);
    save(&cache).await;
    drop(cache);
    Ok(())
}

fn main() {
    let _ = slim_bus::EventBus::builder().handler(on_user_created);
}
