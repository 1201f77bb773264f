use serde::{Deserialize, Serialize};

// No `#[event(stream = "...")]`: the event type names no stream.
#[derive(Serialize, Deserialize, slim_bus::Event)]
struct UserCreated {
    user_id: String,
}

#[slim_bus::stream]
async fn on_user_created(event: UserCreated) -> anyhow::Result<()> {
    let _ = event;
    Ok(())
}

fn main() {
    let _ = slim_bus::EventBus::builder().handler(on_user_created);
}
