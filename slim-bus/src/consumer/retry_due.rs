//! Retries asked for with `retry_after` that outlive the process: their due times are kept
//! in Redis, so that a consumer that restarts runs them at their time rather than at once.
//!
//! Only `retry_after` is recorded: a backoff retry is due within `retry_max`, which a
//! restart takes about as long as, and an entry handled at once is never recorded, so a
//! success costs nothing. The hash is `{stream}:retry_at:<group>` (in the stream's slot),
//! field the entry id, value the due time in unix milliseconds; a field is deleted when its
//! entry is settled (acknowledged, dead-lettered, retried with a backoff of its own). A
//! field left behind (the process stopped between the settlement and the delete, or
//! another consumer claimed and settled the entry) is a few bytes, and a due time in the
//! past means what no field means: run now.

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::broker::{Broker, retry_due_key};
use crate::event::EntryId;

/// The hashes of the due times of one consumer's routes, and which entries have a field.
pub(crate) struct RetryDues {
    /// The hash of each route, by stream index.
    keys: Box<[String]>,
    /// The entries, by stream index, whose due time this process recorded or recovered:
    /// those whose field to delete when they are settled.
    recorded: Mutex<HashSet<(usize, EntryId)>>,
}

impl RetryDues {
    pub(crate) fn new<'a>(streams: impl IntoIterator<Item = &'a str>, group: &str) -> Self {
        RetryDues {
            keys: streams
                .into_iter()
                .map(|stream| retry_due_key(stream, group))
                .collect(),
            recorded: Mutex::new(HashSet::new()),
        }
    }

    fn recorded(&self) -> std::sync::MutexGuard<'_, HashSet<(usize, EntryId)>> {
        self.recorded.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that the retry of `id` is due in `delay`. A failure is logged: the retry
    /// still runs at its time in this process, and after a restart at once, as it would
    /// without the record.
    pub(crate) async fn record(
        &self,
        broker: &dyn Broker,
        stream_index: usize,
        id: EntryId,
        delay: Duration,
    ) {
        let Some(key) = self.keys.get(stream_index) else {
            return;
        };
        let due = unix_millis(SystemTime::now() + delay);
        match broker.record_retry_due(key, id, due).await {
            Ok(()) => {
                self.recorded().insert((stream_index, id));
            }
            Err(error) => tracing::warn!(
                entry_id = %id,
                error = &error as &dyn std::error::Error,
                "could not record when the retry is due; after a restart it runs at once"
            ),
        }
    }

    /// Deletes the field of `id`, if this process recorded or recovered one: the entry is
    /// settled, or its retry no longer waits for the recorded time.
    pub(crate) async fn forget(&self, broker: &dyn Broker, stream_index: usize, id: EntryId) {
        if !self.recorded().remove(&(stream_index, id)) {
            return;
        }
        let Some(key) = self.keys.get(stream_index) else {
            return;
        };
        if let Err(error) = broker.forget_retry_dues(key, &[id]).await {
            tracing::debug!(
                entry_id = %id,
                error = &error as &dyn std::error::Error,
                "could not delete the due time of a settled retry; it is in the past and harmless"
            );
        }
    }

    /// For each of `ids` (entries of stream `stream_index` this consumer held when it last
    /// stopped), how long until its recorded retry is due: `None` to run it now. Entries
    /// with a field are remembered, so that settling them deletes it.
    pub(crate) async fn waiting(
        &self,
        broker: &dyn Broker,
        stream_index: usize,
        ids: &[EntryId],
    ) -> Vec<Option<Duration>> {
        let Some(key) = self.keys.get(stream_index) else {
            return vec![None; ids.len()];
        };
        let dues = match broker.retry_dues(key, ids).await {
            Ok(dues) if dues.len() == ids.len() => dues,
            Ok(_) => vec![None; ids.len()],
            Err(error) => {
                tracing::warn!(
                    error = &error as &dyn std::error::Error,
                    "could not read when the retries of the recovered entries are due; running them now"
                );
                return vec![None; ids.len()];
            }
        };
        let now = unix_millis(SystemTime::now());
        let mut recorded = self.recorded();
        ids.iter()
            .zip(dues)
            .map(|(&id, due)| {
                let due = due?;
                recorded.insert((stream_index, id));
                (due > now).then(|| Duration::from_millis(due - now))
            })
            .collect()
    }
}

fn unix_millis(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    })
}
