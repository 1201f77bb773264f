use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
}

#[slim_bus::stream]
async fn on_user_created(ctx: slim_bus::Context, event: UserCreated) {
    let _ = (ctx, event);
}

fn main() {}
