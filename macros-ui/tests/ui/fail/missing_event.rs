#[slim_bus::stream("user.created")]
async fn on_user_created() -> anyhow::Result<()> {
    Ok(())
}

fn main() {}
