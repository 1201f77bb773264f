use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
}

struct UserService<R> {
    repo: R,
}

#[slim_bus::handlers]
impl<R: Send + Sync + 'static> UserService<R> {
    #[stream]
    async fn on_created(&self, event: UserCreated) -> anyhow::Result<()> {
        let _ = (&self.repo, event);
        Ok(())
    }
}

fn main() {}
