//! A consumer process for tests that kill consumers: it listens to `user.created` and
//! prints `started <seq> <delivery count>` when a handler starts, `handled <seq>` when one
//! finishes, so a test knows what the process held when it was killed.
//!
//! Usage: `slim-bus-test-consumer <redis url> <consumer name> <handler mode>`, where the
//! mode is `hang` (handlers never finish) or `work:<millis>` (each takes that long).

use std::io::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slim_bus::{Context, EventBus, HandlerError, StreamHandler};

#[derive(Debug, Serialize, Deserialize)]
struct UserCreated {
    user_id: String,
    user_name: String,
    seq: u64,
}

impl slim_bus::Event for UserCreated {
    const STREAM: Option<&'static str> = Some("user.created");
}

struct Handler {
    work: Option<Duration>,
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    // The test reads these lines; losing one only makes the test wait and fail.
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[slim_bus::async_trait]
impl StreamHandler for Handler {
    type Event = UserCreated;

    async fn handle(&self, event: UserCreated, ctx: Context) -> Result<(), HandlerError> {
        say(format!("started {} {}", event.seq, ctx.delivery_count()));
        match self.work {
            Some(work) => tokio::time::sleep(work).await,
            None => std::future::pending::<()>().await,
        }
        say(format!("handled {}", event.seq));
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    slim_bus_tests::init_tracing();
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(name), Some(mode)) = (args.next(), args.next(), args.next()) else {
        return Err(
            "usage: slim-bus-test-consumer <redis url> <consumer name> <hang|work:MILLIS>".into(),
        );
    };
    let work = match mode.strip_prefix("work:") {
        Some(millis) => Some(Duration::from_millis(millis.parse()?)),
        None if mode == "hang" => None,
        None => return Err(format!("unknown mode `{mode}`").into()),
    };
    let bus = EventBus::builder()
        .url(url)
        .consumer_group("tests")
        .consumer_name(name)
        .block_time(Duration::from_millis(200))
        .handler_timeout(Duration::from_secs(30))
        .claim_min_idle(Duration::from_secs(31))
        .handler(Handler { work })
        .build()
        .await?;
    let listener = bus.listen().await?;
    say("listening".to_owned());
    listener.await?;
    Ok(())
}
