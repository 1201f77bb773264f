use std::sync::Arc;

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
}

struct Mailer;

// `#[stream]` methods need `#[slim_bus::handlers]` on the impl block.
impl Mailer {
    #[allow(dead_code)]
    async fn on_user_created(&self, event: UserCreated) {
        let _ = event;
    }
}

fn main() {
    let _ = slim_bus::EventBus::builder().service(Arc::new(Mailer));
}
