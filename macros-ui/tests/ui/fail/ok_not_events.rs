use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
}

#[slim_bus::stream]
async fn on_user_created(event: UserCreated) -> anyhow::Result<String> {
    Ok(event.user_id)
}

fn main() {
    let _ = slim_bus::EventBus::builder().handler(on_user_created);
}
