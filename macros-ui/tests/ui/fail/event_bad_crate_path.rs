use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created", crate = "my crate")]
struct UserCreated {
    user_id: String,
}

fn main() {}
