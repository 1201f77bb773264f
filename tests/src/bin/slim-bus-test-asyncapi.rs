//! The sample service of `slim_bus_tests::asyncapi_service`: builds its bus and handles
//! events until killed. With `SLIM_BUS_ASYNCAPI=PATH`, `build()` writes its AsyncAPI
//! document to PATH and ends the process instead.
//!
//! Usage: `slim-bus-test-asyncapi [redis url]` (default `memory://`), or
//! `slim-bus-test-asyncapi --test-bus`: builds the same bus as a `TestBus`, prints
//! `built` and exits.

#[tokio::main(flavor = "current_thread")]
async fn main() -> slim_bus::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "memory://".to_owned());
    if url == "--test-bus" {
        let builder = slim_bus_tests::asyncapi_service::builder("memory://");
        let _bus = slim_bus::testing::TestBus::new(builder).await?;
        println!("built");
        return Ok(());
    }
    let bus = slim_bus_tests::asyncapi_service::builder(&url)
        .build()
        .await?;
    bus.run_until(std::future::pending()).await
}
