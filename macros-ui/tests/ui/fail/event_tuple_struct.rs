use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.deleted")]
struct UserDeleted(String);

fn main() {}
