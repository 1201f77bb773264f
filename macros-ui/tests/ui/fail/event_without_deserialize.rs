// `#[derive(Event)]` with serde's `Serialize` but not `Deserialize`.
#[derive(Debug, serde::Serialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
}

fn main() {}
