#[slim_bus::stream("user.created")]
async fn on_any<E: slim_bus::Event>(event: E) -> anyhow::Result<()> {
    let _ = event;
    Ok(())
}

fn main() {}
