use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
struct Audit {
    changed_by: String,
    revision: u32,
}

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
    #[serde(default, flatten)]
    audit: Audit,
}

fn main() {}
