use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
}

struct UserService;

trait OnCreated {
    async fn on_created(&self, event: UserCreated) -> anyhow::Result<()>;
}

#[slim_bus::handlers]
impl OnCreated for UserService {
    #[stream]
    async fn on_created(&self, event: UserCreated) -> anyhow::Result<()> {
        let _ = event;
        Ok(())
    }
}

fn main() {}
