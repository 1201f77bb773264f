use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "order.changed")]
enum OrderChanged {
    Placed { order_id: String },
    Shipped { order_id: String },
}

fn main() {}
