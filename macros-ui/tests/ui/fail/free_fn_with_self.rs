use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "user.created")]
struct UserCreated {
    user_id: String,
}

struct Mailer;

// `#[stream]` on a method without `#[slim_bus::handlers]` on the impl block.
impl Mailer {
    #[slim_bus::stream]
    async fn on_user_created(&self, event: UserCreated) -> anyhow::Result<()> {
        let _ = event;
        Ok(())
    }
}

fn main() {}
