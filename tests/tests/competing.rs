//! Competing consumers: bus processes in one consumer group share the work of a
//! partitioned stream, and without failures each entry is handled exactly once.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Stdio;
use std::time::Duration;

use slim_bus::partition_stream;
use slim_bus_tests::within;
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

const PARTITIONS: u32 = 6;
const ENTRIES: u64 = 3000;

/// One handled entry, as a consumer process printed it.
#[derive(Debug)]
struct Handled {
    consumer: String,
    stream: String,
    entry_id: String,
    seq: u64,
    delivery_count: u64,
}

/// A `slim-bus-test-consumer` process in `partitioned` mode; its handled entries go to
/// `handled`.
struct ConsumerProcess {
    child: tokio::process::Child,
}

impl ConsumerProcess {
    async fn start(url: &str, name: &str, handled: mpsc::UnboundedSender<Handled>) -> Self {
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_slim-bus-test-consumer"))
            .arg(url)
            .arg(name)
            .arg(format!("partitioned:{PARTITIONS}:1"))
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the consumer process starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (listening, listens) = tokio::sync::oneshot::channel();
        let owner = name.to_owned();
        tokio::spawn(async move {
            let mut listening = Some(listening);
            while let Ok(Some(line)) = lines.next_line().await {
                let words: Vec<&str> = line.split(' ').collect();
                match words.as_slice() {
                    ["listening"] => {
                        if let Some(listening) = listening.take() {
                            let _ = listening.send(());
                        }
                    }
                    ["handled-in", stream, entry_id, seq, delivery_count] => {
                        let _ = handled.send(Handled {
                            consumer: owner.clone(),
                            stream: (*stream).to_owned(),
                            entry_id: (*entry_id).to_owned(),
                            seq: seq.parse().unwrap(),
                            delivery_count: delivery_count.parse().unwrap(),
                        });
                    }
                    _ => eprintln!("[{owner}] {line}"),
                }
            }
        });
        within(&format!("{name} to listen"), STEP, listens)
            .await
            .expect("the consumer process prints `listening`");
        ConsumerProcess { child }
    }

    async fn stop(mut self) {
        within("kill", STEP, self.child.kill()).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_in_one_group_share_a_partitioned_stream_and_handle_each_entry_once() {
    let server = start_server().await;
    let (tx, mut handled) = mpsc::unbounded_channel();
    let mut processes = Vec::new();
    for name in ["pod-1", "pod-2", "pod-3"] {
        processes.push(ConsumerProcess::start(&server.url(), name, tx.clone()).await);
    }
    drop(tx);

    let publisher = within(
        "build",
        STEP,
        bus(&server)
            .stream_partitions("user.created", PARTITIONS)
            .build(),
    )
    .await
    .unwrap();
    let events: Vec<UserCreated> = (0..ENTRIES).map(user).collect();
    for chunk in events.chunks(100) {
        within("publish_batch", STEP, publisher.publish_batch(chunk))
            .await
            .unwrap();
    }

    let mut ledger: BTreeMap<(String, String), Vec<Handled>> = BTreeMap::new();
    let mut by_consumer: BTreeMap<String, u64> = BTreeMap::new();
    let mut seqs = BTreeSet::new();
    within(
        "every entry to be handled",
        Duration::from_secs(60),
        async {
            while seqs.len() < ENTRIES as usize {
                let entry = handled.recv().await.expect("the processes are running");
                *by_consumer.entry(entry.consumer.clone()).or_default() += 1;
                seqs.insert(entry.seq);
                ledger
                    .entry((entry.stream.clone(), entry.entry_id.clone()))
                    .or_default()
                    .push(entry);
            }
        },
    )
    .await;
    for partition in 0..PARTITIONS {
        until_nothing_pending(
            &server,
            &partition_stream("user.created", partition),
            "tests",
        )
        .await;
    }
    for process in processes {
        process.stop().await;
    }
    // What the processes printed before they stopped, a second handling included: the
    // channel closes once every process's output has been read to its end.
    while let Some(entry) = within("the processes' last output", STEP, handled.recv()).await {
        *by_consumer.entry(entry.consumer.clone()).or_default() += 1;
        ledger
            .entry((entry.stream.clone(), entry.entry_id.clone()))
            .or_default()
            .push(entry);
    }

    eprintln!("entries handled per process: {by_consumer:?}");
    assert_eq!(
        by_consumer.len(),
        3,
        "a process got no share: {by_consumer:?}"
    );
    assert_eq!(by_consumer.values().sum::<u64>(), ENTRIES);
    let twice: Vec<_> = ledger
        .values()
        .filter(|handled| handled.len() > 1)
        .collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    assert_eq!(ledger.len() as u64, ENTRIES);
    assert_eq!(seqs, (0..ENTRIES).collect());
    assert!(
        ledger
            .values()
            .flatten()
            .all(|entry| entry.delivery_count == 1),
        "an entry was delivered again without a failure"
    );
    let partitions: BTreeSet<&str> = ledger.keys().map(|(stream, _)| stream.as_str()).collect();
    assert_eq!(partitions.len(), PARTITIONS as usize, "{partitions:?}");
}
