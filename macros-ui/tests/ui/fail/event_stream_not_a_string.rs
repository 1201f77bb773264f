use serde::{Deserialize, Serialize};

const STREAM: &str = "user.created";

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = STREAM)]
struct UserCreated {
    user_id: String,
}

fn main() {}
