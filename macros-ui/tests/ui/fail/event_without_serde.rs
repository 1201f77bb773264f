// `#[derive(Event)]` without serde's derives.
#[derive(Debug, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
}

fn main() {}
