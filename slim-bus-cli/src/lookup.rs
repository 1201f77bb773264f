//! What a stream name on the command line stands for: a stream, its dead letters, or the
//! logical name of a partitioned stream, which Redis holds as `NAME:{0}` ... `NAME:{N-1}`.

use slim_bus::{DeadLetters, EventBus, StreamStatus, partition_stream};

use crate::exit::Failure;

/// The most partitions looked for under one logical name.
const MAX_PARTITIONS: u32 = 1024;

/// Whether the stream `key` exists.
pub(crate) async fn exists(bus: &EventBus, key: &str) -> Result<bool, Failure> {
    match bus.stream_status(key).await {
        Ok(_) => Ok(true),
        Err(slim_bus::Error::StreamNotFound { .. }) => Ok(false),
        Err(error) => Err(error.into()),
    }
}

/// The status of each partition of `stream` taken as a partitioned stream's logical name:
/// of `stream:{0}`, `stream:{1}`, ... up to the first that does not exist (empty when
/// `stream:{0}` does not exist).
pub(crate) async fn partitions(bus: &EventBus, stream: &str) -> Result<Vec<StreamStatus>, Failure> {
    let mut statuses = Vec::new();
    for partition in 0..MAX_PARTITIONS {
        match bus
            .stream_status(&partition_stream(stream, partition))
            .await
        {
            Ok(status) => statuses.push(status),
            Err(slim_bus::Error::StreamNotFound { .. }) => break,
            Err(error) => return Err(error.into()),
        }
    }
    Ok(statuses)
}

/// The names of the partitions `stream:{0}` ... of a stream of `count` partitions, for a
/// message: `` `orders:{0}` ... `orders:{3}` ``.
fn partition_names(stream: &str, count: u32) -> String {
    let first = partition_stream(stream, 0);
    match count {
        0 | 1 => format!("`{first}`"),
        2 => format!("`{first}` or `{}`", partition_stream(stream, 1)),
        _ => format!("`{first}` ... `{}`", partition_stream(stream, count - 1)),
    }
}

/// Why a dead-letter command found nothing under `dead`'s stream: the failure to report
/// when neither the stream nor its dead-letter stream exists (for a partitioned stream's
/// logical name, one that names its partitions), or `None` when either exists.
pub(crate) async fn missing(
    bus: &EventBus,
    dead: &DeadLetters,
) -> Result<Option<Failure>, Failure> {
    if exists(bus, dead.origin()).await? || exists(bus, dead.stream()).await? {
        return Ok(None);
    }
    let partitions = partitions(bus, dead.origin()).await?;
    let count = u32::try_from(partitions.len()).unwrap_or(MAX_PARTITIONS);
    Ok(Some(if count > 0 {
        Failure::NotFound(format!(
            "`{}` is a partitioned stream: name a partition, {}",
            dead.origin(),
            partition_names(dead.origin(), count)
        ))
    } else {
        Failure::NotFound(format!(
            "stream `{}` does not exist, nor its dead-letter stream {}",
            dead.origin(),
            dead.stream()
        ))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_named_first_to_last() {
        assert_eq!(partition_names("orders", 1), "`orders:{0}`");
        assert_eq!(partition_names("orders", 2), "`orders:{0}` or `orders:{1}`");
        assert_eq!(
            partition_names("orders", 4),
            "`orders:{0}` ... `orders:{3}`"
        );
    }
}
