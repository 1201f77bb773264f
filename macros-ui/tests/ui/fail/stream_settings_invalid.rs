use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
}

#[slim_bus::stream(max_deliveries = 0, timeout = "5 parsecs")]
async fn never_delivered(event: UserCreated) {
    let _ = event;
}

#[slim_bus::stream("user.created.copy", max_deliveries = "3", timeout = 5)]
async fn written_as_the_wrong_kind(event: UserCreated) {
    let _ = event;
}

struct Mailer;

#[slim_bus::handlers]
impl Mailer {
    #[stream("user.created.mail", timeout = "0s", retries = 3)]
    async fn on_user_created(&self, event: UserCreated) {
        let _ = event;
    }
}

fn main() {}
