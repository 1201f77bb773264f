use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
}

struct UserService;

#[slim_bus::handlers]
impl UserService {
    #[stream]
    async fn on_created(event: UserCreated) -> anyhow::Result<()> {
        let _ = event;
        Ok(())
    }
}

fn main() {
    let _ = slim_bus::EventBus::builder().service(std::sync::Arc::new(UserService));
}
