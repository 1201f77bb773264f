use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
}

#[slim_bus::stream]
async fn on_user_created(event: UserCreated, ctx: slim_bus::Context, retries: u32) -> anyhow::Result<()> {
    let _ = (event, ctx, retries);
    Ok(())
}

fn main() {}
