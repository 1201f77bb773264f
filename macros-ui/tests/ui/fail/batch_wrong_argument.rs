use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "page.viewed")]
struct PageViewed {
    page: String,
}

#[slim_bus::stream(batch = 10)]
async fn one_at_a_time(view: PageViewed) {
    let _ = view;
}

#[slim_bus::stream(batch = 0)]
async fn empty_batches(batch: Vec<(PageViewed, slim_bus::Context)>) {
    let _ = batch;
}

fn main() {}
