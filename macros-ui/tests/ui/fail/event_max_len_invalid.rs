use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created", max_len = 0)]
struct UserCreated {
    user_id: String,
}

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.deleted", max_len = "1000")]
struct UserDeleted {
    user_id: String,
}

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.renamed", max_len = -5)]
struct UserRenamed {
    user_id: String,
}

fn main() {}
