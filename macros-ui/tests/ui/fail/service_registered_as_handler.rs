use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
}

struct Mailer;

#[slim_bus::handlers]
impl Mailer {
    #[stream]
    async fn on_user_created(&self, event: UserCreated) {
        let _ = event;
    }
}

fn main() {
    // A service registers with `.service(Arc::new(Mailer))`.
    let _ = slim_bus::EventBus::builder().handler(Mailer);
}
