use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "orders", partitions = 8, key = "order_id")]
struct OrderPlaced {
    #[serde(skip_serializing, default)]
    order_id: String,
    cents: u64,
}

fn main() {}
