//! A consumer process for tests that kill consumers: it listens to `user.created` and
//! prints `started <seq> <delivery count>` when a handler starts, `handled <seq>` when one
//! finishes, so a test knows what the process held when it was killed.
//!
//! Usage: `slim-bus-test-consumer <redis url> <consumer name> <handler mode>`, where the
//! mode is `hang` (handlers never finish), `work:<millis>` (each takes that long), or
//! `ledger:<millis>:<max in flight>` for the fault-injection suite: each handler takes
//! from half to twice `<millis>` (by its entry's seq, so that handlers started together end
//! at different times) and then prints `ledger <entry id> <seq> <delivery count>` instead of
//! the lines above; the bus reads and runs at most `<max in flight>` entries at once and uses
//! the suite's short timings, so entries of a killed process are claimed within seconds.
//! `partitioned:<partitions>:<millis>` reads `user.created` as a partitioned stream of
//! `<partitions>` partitions, each handler taking `<millis>`, and prints
//! `handled-in <partition stream> <entry id> <seq> <delivery count>` for each, for the
//! tests of competing consumers.

use std::io::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slim_bus::{Context, EventBus, EventBusBuilder, HandlerError, StreamHandler};

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

/// The handler of `ledger` mode: one line per finished handler, naming the entry, so that
/// a test can count how often each entry was handled.
struct LedgerHandler {
    work: Duration,
}

#[slim_bus::async_trait]
impl StreamHandler for LedgerHandler {
    type Event = UserCreated;

    async fn handle(&self, event: UserCreated, ctx: Context) -> Result<(), HandlerError> {
        // 1/2, 1, 3/2 or 2 times the work.
        let halves = u32::try_from(event.seq % 4).unwrap_or(0) + 1;
        tokio::time::sleep(self.work * halves / 2).await;
        say(format!(
            "ledger {} {} {}",
            ctx.entry_id(),
            event.seq,
            ctx.delivery_count()
        ));
        Ok(())
    }
}

/// The handler of `partitioned` mode: one line per finished handler, naming the partition
/// stream and entry.
struct PartitionedHandler {
    work: Duration,
}

#[slim_bus::async_trait]
impl StreamHandler for PartitionedHandler {
    type Event = UserCreated;

    async fn handle(&self, event: UserCreated, ctx: Context) -> Result<(), HandlerError> {
        tokio::time::sleep(self.work).await;
        say(format!(
            "handled-in {} {} {} {}",
            ctx.stream(),
            ctx.entry_id(),
            event.seq,
            ctx.delivery_count()
        ));
        Ok(())
    }
}

fn bus(url: String, name: String) -> EventBusBuilder {
    EventBus::builder()
        .url(url)
        .consumer_group("tests")
        .consumer_name(name)
        .block_time(Duration::from_millis(200))
        // A short command timeout keeps the lease at its 5 s floor, so that a process
        // restarted after a kill waits at most that long for its name.
        .command_timeout(Duration::from_secs(1))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    slim_bus_tests::init_tracing();
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(name), Some(mode)) = (args.next(), args.next(), args.next()) else {
        return Err(
            "usage: slim-bus-test-consumer <redis url> <consumer name> <hang|work:MILLIS|ledger:MILLIS:MAX_IN_FLIGHT|partitioned:PARTITIONS:MILLIS>"
                .into(),
        );
    };
    let builder = if let Some(partitioned) = mode.strip_prefix("partitioned:") {
        let Some((partitions, work)) = partitioned.split_once(':') else {
            return Err(format!("mode `{mode}` is not partitioned:PARTITIONS:MILLIS").into());
        };
        bus(url, name)
            .stream_partitions("user.created", partitions.parse()?)
            .max_concurrent(8)
            .max_count(8)
            .handler(PartitionedHandler {
                work: Duration::from_millis(work.parse()?),
            })
    } else if let Some(ledger) = mode.strip_prefix("ledger:") {
        let Some((work, max_in_flight)) = ledger.split_once(':') else {
            return Err(format!("mode `{mode}` is not ledger:MILLIS:MAX_IN_FLIGHT").into());
        };
        let max_in_flight: usize = max_in_flight.parse()?;
        // The fault-injection suite's timings (tests/tests/faults_support).
        bus(url, name)
            .handler_timeout(Duration::from_secs(1))
            .claim_min_idle(Duration::from_secs(2))
            .claim_interval(Duration::from_millis(200))
            .command_timeout(Duration::from_secs(1))
            .retry_backoff(Duration::from_millis(10), Duration::from_millis(100))
            .max_concurrent(max_in_flight)
            .max_count(max_in_flight)
            .handler(LedgerHandler {
                work: Duration::from_millis(work.parse()?),
            })
    } else {
        let work = match mode.strip_prefix("work:") {
            Some(millis) => Some(Duration::from_millis(millis.parse()?)),
            None if mode == "hang" => None,
            None => return Err(format!("unknown mode `{mode}`").into()),
        };
        bus(url, name)
            .handler_timeout(Duration::from_secs(30))
            .claim_min_idle(Duration::from_secs(31))
            .handler(Handler { work })
    };
    let bus = builder.build().await?;
    let listener = bus.listen().await?;
    say("listening".to_owned());
    listener.await?;
    Ok(())
}
