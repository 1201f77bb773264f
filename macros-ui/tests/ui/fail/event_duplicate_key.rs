use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
#[event(stream = "user.registered")]
struct UserCreated {
    user_id: String,
}

fn main() {}
