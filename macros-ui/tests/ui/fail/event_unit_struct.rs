use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, slim_bus::Event)]
#[event(stream = "cache.flushed")]
struct CacheFlushed;

fn main() {}
