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
    async fn on_created(&self, event: UserCreated) -> anyhow::Result<()> {
        let cache = std::rc::Rc::new(event.user_id);
        std::future::ready(()).await;
        drop(cache);
        Ok(())
    }
}

fn main() {
    let _ = slim_bus::EventBus::builder().service(std::sync::Arc::new(UserService));
}
