//! Batch handlers: `#[stream(batch = N)]` on functions and methods, with each return type.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use slim_bus::{BatchOutcome, Context, EventBus, HandlerError};

#[derive(Debug, Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "page.viewed")]
struct PageViewed {
    page: String,
}

#[slim_bus::stream(batch = 100)]
async fn count_views(batch: Vec<(PageViewed, Context)>) {
    let _ = batch.len();
}

#[slim_bus::stream("views.stored", batch = 50, max_deliveries = 3, timeout = "10s")]
async fn store_views(batch: Vec<(PageViewed, slim_bus::Context)>) -> anyhow::Result<()> {
    let _ = batch;
    Ok(())
}

#[slim_bus::stream("views.each", batch = 10)]
async fn each(batch: Vec<(PageViewed, Context)>) -> Vec<Result<(), HandlerError>> {
    batch
        .iter()
        .map(|(view, _)| {
            if view.page.is_empty() {
                Err("no page".into())
            } else {
                Ok(())
            }
        })
        .collect()
}

#[slim_bus::stream("views.outcome", batch = 10)]
async fn outcome(_batch: Vec<(PageViewed, Context)>) -> BatchOutcome {
    BatchOutcome::ok()
}

struct Analytics;

#[slim_bus::handlers]
impl Analytics {
    #[stream("views.analytics", batch = 20)]
    async fn on_views(&self, batch: Vec<(PageViewed, Context)>) -> Result<(), HandlerError> {
        let _ = batch;
        Ok(())
    }

    #[stream("views.single")]
    async fn on_view(&self, view: PageViewed) {
        let _ = view;
    }
}

fn main() {
    let _ = EventBus::builder()
        .batch_handler(count_views)
        .batch_handler(store_views)
        .batch_handler(each)
        .batch_handler(outcome)
        .service(Arc::new(Analytics));
}
