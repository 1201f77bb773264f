use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "orders", partitions = 0)]
struct OrderPlaced {
    order_id: String,
}

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "payments", partitions = "8")]
struct PaymentReceived {
    order_id: String,
}

fn main() {}
