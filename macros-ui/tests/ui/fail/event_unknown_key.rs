use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created", topic = "users")]
struct UserCreated {
    user_id: String,
}

// The impl is still there: no second error here.
fn assert_event<E: slim_bus::Event>() {}

fn main() {
    assert_event::<UserCreated>();
}
