//! The sample service of `slim_bus_tests::asyncapi_service`: builds its bus and handles
//! events until killed. With `SLIM_BUS_ASYNCAPI=PATH`, `build()` writes its AsyncAPI
//! document to PATH and ends the process instead.
//!
//! Usage: `slim-bus-test-asyncapi [redis url]` (default `memory://`).

#[tokio::main(flavor = "current_thread")]
async fn main() -> slim_bus::Result<()> {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "memory://".to_owned());
    let bus = slim_bus_tests::asyncapi_service::builder(&url)
        .build()
        .await?;
    bus.run_until(std::future::pending()).await
}
