use serde::{Deserialize, Serialize};

// No `#[event(stream = "...")]`: the event type names no stream.
#[derive(Serialize, Deserialize, slim_bus::Event)]
struct AuditRecord {
    subject: String,
}

struct AuditService;

#[slim_bus::handlers]
impl AuditService {
    #[stream]
    async fn on_record(&self, record: AuditRecord) -> anyhow::Result<()> {
        let _ = record;
        Ok(())
    }
}

fn main() {
    let _ = slim_bus::EventBus::builder().service(std::sync::Arc::new(AuditService));
}
