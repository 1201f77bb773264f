//! The benchmark cases, their sizes, and how each result row is judged.

use std::fmt;
use std::time::Duration;

/// One case of the suite. Within a repetition cases run in this declaration order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Case {
    /// Hand-written redis-rs loop: `XREADGROUP COUNT 100` + one `XACK` per batch.
    Baseline,
    /// slim-bus consumer, no-op typed handler.
    Consume,
    /// As `Consume`, with a metrics recorder installed and logs at INFO.
    ConsumeObserved,
    /// As `ConsumeObserved`, with the delivery spans at INFO (`span_level`).
    ConsumeTraced,
    /// As `Consume`, with a pass-through tower layer around every handler call.
    ConsumeLayered,
    /// As `Consume`, with 1% of entries undecodable.
    Poison,
    /// As `Consume`, with 1% of entries failing once and succeeding on their retry.
    Transient,
    /// Handler computing for 200 µs, on a runtime with one worker.
    Cpu1,
    /// Handler computing for 200 µs, on a runtime with two workers.
    Cpu2,
    /// Handler awaiting 1 ms, `max_concurrent` 64.
    Io64,
    /// Handler awaiting 1 ms, `max_concurrent` 512.
    Io512,
    /// Hand-written pipelined `XADD` loop, 100 per pipeline.
    PublishRaw,
    /// Hand-written `XADD` awaited one at a time.
    PublishRawSeq,
    /// `EventBus::publish_to` awaited one at a time.
    PublishSeq,
    /// `EventBus::publish_to` from 64 concurrent tasks.
    Publish64,
    /// `EventBus::publish_batch_to` in batches as large as the raw pipelines.
    PublishBatch,
    /// XADD-to-receipt latency of a hand-written `XREADGROUP` loop, at the rate of `Latency`.
    LatencyRaw,
    /// XADD-to-handler-start latency at a fixed rate.
    Latency,
    /// Peak RSS of a child process running the hand-written consume loop.
    RssRaw,
    /// Peak RSS of a child process consuming with slim-bus.
    Rss,
    /// As `Rss`, with a five times larger backlog.
    RssBacklog,
    /// 1, 2 and 3 consumer processes in one group sharing a stream of 6 partitions.
    Compete,
    /// As `Compete`, on a 3-master Redis Cluster, next to a hand-written loop per master.
    CompeteCluster,
    /// As `Baseline`, over TLS.
    BaselineTls,
    /// As `Consume`, over TLS.
    ConsumeTls,
    /// As `PublishRaw`, over TLS.
    PublishRawTls,
    /// As `Publish64`, over TLS.
    Publish64Tls,
    /// A consumer shutting down with handlers longer than its grace and entries waiting
    /// for a retry, next to a live one: how soon the live one has handled what it held.
    Handover,
    /// Handlers running longer than `claim_min_idle` next to a consumer that scans for
    /// stale entries: how many entries run twice.
    LongHandlers,
}

impl Case {
    pub(crate) const ALL: [Case; 29] = [
        Case::Baseline,
        Case::Consume,
        Case::ConsumeObserved,
        Case::ConsumeTraced,
        Case::ConsumeLayered,
        Case::Poison,
        Case::Transient,
        Case::Cpu1,
        Case::Cpu2,
        Case::Io64,
        Case::Io512,
        Case::PublishRaw,
        Case::PublishRawSeq,
        Case::PublishSeq,
        Case::Publish64,
        Case::PublishBatch,
        Case::LatencyRaw,
        Case::Latency,
        Case::RssRaw,
        Case::Rss,
        Case::RssBacklog,
        Case::Compete,
        Case::CompeteCluster,
        Case::BaselineTls,
        Case::ConsumeTls,
        Case::PublishRawTls,
        Case::Publish64Tls,
        Case::Handover,
        Case::LongHandlers,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Case::Baseline => "baseline",
            Case::Consume => "consume",
            Case::ConsumeObserved => "consume-observed",
            Case::ConsumeTraced => "consume-traced",
            Case::ConsumeLayered => "consume-layered",
            Case::Poison => "poison",
            Case::Transient => "transient",
            Case::Cpu1 => "cpu-1",
            Case::Cpu2 => "cpu-2",
            Case::Io64 => "io-64",
            Case::Io512 => "io-512",
            Case::PublishRaw => "publish-raw",
            Case::PublishRawSeq => "publish-raw-seq",
            Case::PublishSeq => "publish-seq",
            Case::Publish64 => "publish-64",
            Case::PublishBatch => "publish-batch",
            Case::LatencyRaw => "latency-raw",
            Case::Latency => "latency",
            Case::RssRaw => "rss-raw",
            Case::Rss => "rss",
            Case::RssBacklog => "rss-backlog",
            Case::Compete => "compete",
            Case::CompeteCluster => "compete-cluster",
            Case::BaselineTls => "baseline-tls",
            Case::ConsumeTls => "consume-tls",
            Case::PublishRawTls => "publish-raw-tls",
            Case::Publish64Tls => "publish-64-tls",
            Case::Handover => "handover",
            Case::LongHandlers => "long-handlers",
        }
    }

    /// Whether the case runs over TLS, on the throwaway server's TLS port.
    pub(crate) fn is_tls(self) -> bool {
        matches!(
            self,
            Case::BaselineTls | Case::ConsumeTls | Case::PublishRawTls | Case::Publish64Tls
        )
    }

    /// Cases selected by one word of `--cases`: a case name, or a group name.
    pub(crate) fn select(word: &str) -> Option<Vec<Case>> {
        let group: &[Case] = match word {
            "all" => &Case::ALL,
            "io" => &[Case::Io64, Case::Io512],
            "failures" => &[Case::Consume, Case::Poison, Case::Transient],
            "cpu" => &[Case::Cpu1, Case::Cpu2],
            "publish" => &[
                Case::PublishRaw,
                Case::PublishRawSeq,
                Case::PublishSeq,
                Case::Publish64,
                Case::PublishBatch,
            ],
            "memory" => &[Case::RssRaw, Case::Rss, Case::RssBacklog],
            // With the plain cases they are compared with.
            "tls" => &[
                Case::Baseline,
                Case::Consume,
                Case::PublishRaw,
                Case::Publish64,
                Case::BaselineTls,
                Case::ConsumeTls,
                Case::PublishRawTls,
                Case::Publish64Tls,
            ],
            "holding" => &[Case::Handover, Case::LongHandlers],
            // With the cases its rows are compared with.
            "cluster" => &[Case::Baseline, Case::Compete, Case::CompeteCluster],
            _ => {
                return Case::ALL
                    .into_iter()
                    .find(|case| case.name() == word)
                    .map(|case| vec![case]);
            }
        };
        Some(group.to_vec())
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How many entries each case moves.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sizes {
    pub(crate) name: &'static str,
    /// Backlog of `baseline`, `consume` and `poison`.
    pub(crate) consume: u64,
    /// Backlog of the 1 ms handler cases.
    pub(crate) io: u64,
    /// Backlog of the 200 µs CPU handler cases.
    pub(crate) cpu: u64,
    /// Entries of the pipelined and the 64-task publish cases.
    pub(crate) publish: u64,
    /// Entries of the one-at-a-time publish cases (each is a round trip).
    pub(crate) publish_seq: u64,
    /// Entries per second of the latency cases.
    pub(crate) latency_rate: u64,
    pub(crate) latency_duration: Duration,
    /// Backlog of `rss-raw` and `rss`.
    pub(crate) rss: u64,
    /// Backlog of `rss-backlog`.
    pub(crate) rss_backlog: u64,
    /// Backlog of each run of `compete` and `compete-cluster`, over all partitions.
    pub(crate) compete: u64,
    /// Entries the leaving consumer of `handover` holds, and the entries of `long-handlers`.
    pub(crate) holding: u64,
}

impl Sizes {
    /// The sizes the issue asks for.
    pub(crate) const FULL: Sizes = Sizes {
        name: "full",
        consume: 200_000,
        io: 20_000,
        cpu: 20_000,
        publish: 200_000,
        publish_seq: 20_000,
        latency_rate: 1_000,
        latency_duration: Duration::from_secs(10),
        rss: 200_000,
        rss_backlog: 1_000_000,
        compete: 120_000,
        holding: 256,
    };

    /// `--quick`: a tenth of the full sizes, for a run of well under a minute.
    pub(crate) const QUICK: Sizes = Sizes {
        name: "quick",
        consume: 20_000,
        io: 4_000,
        cpu: 4_000,
        publish: 20_000,
        publish_seq: 4_000,
        latency_rate: 1_000,
        latency_duration: Duration::from_secs(2),
        rss: 20_000,
        rss_backlog: 100_000,
        compete: 12_000,
        holding: 64,
    };

    /// The test-mode run (`cargo test`, nextest): checks that every case still works.
    pub(crate) const SMOKE: Sizes = Sizes {
        name: "smoke",
        consume: 2_000,
        io: 500,
        cpu: 500,
        publish: 2_000,
        publish_seq: 500,
        latency_rate: 1_000,
        latency_duration: Duration::from_millis(300),
        rss: 2_000,
        rss_backlog: 10_000,
        compete: 1_200,
        holding: 16,
    };
}

/// What a row measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unit {
    EntriesPerSec,
    Micros,
    MiB,
    /// A number of entries.
    Entries,
}

/// A goal from the issue, printed next to the result; never asserted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Target {
    /// The ratio to the reference row is at least this.
    RatioAtLeast(f64),
    /// The ratio to the reference row is at most this.
    RatioAtMost(f64),
    /// The value, in the row's unit, is at most this.
    AtMost(f64),
}

/// The identity of one result row: what it measures and what it is compared with.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    /// Stable key, e.g. `consume` or `latency p99`.
    pub(crate) id: String,
    /// What was run, e.g. "200k entries, no-op handler, max_concurrent 64".
    pub(crate) what: String,
    pub(crate) unit: Unit,
    /// The row whose value (same repetition) the ratio divides by.
    pub(crate) reference: Option<String>,
    pub(crate) target: Option<Target>,
}

impl Row {
    pub(crate) fn new(id: impl Into<String>, what: impl Into<String>, unit: Unit) -> Self {
        Row {
            id: id.into(),
            what: what.into(),
            unit,
            reference: None,
            target: None,
        }
    }

    pub(crate) fn vs(mut self, reference: impl Into<String>) -> Self {
        self.reference = Some(reference.into());
        self
    }

    pub(crate) fn target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }
}

/// One row's result in one repetition.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Measurement {
    pub(crate) row: Row,
    pub(crate) outcome: Reading,
}

/// What a measurement read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reading {
    Value(f64),
}

/// `20000` as `20k`, `1000000` as `1M`, for row descriptions.
pub(crate) fn count(n: u64) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1_000 && n.is_multiple_of(1_000) {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn case_names_and_groups_select_cases() {
        for case in Case::ALL {
            assert_eq!(Case::select(case.name()), Some(vec![case]));
        }
        assert_eq!(
            Case::select("memory"),
            Some(vec![Case::RssRaw, Case::Rss, Case::RssBacklog])
        );
        assert_eq!(Case::select("all").map(|c| c.len()), Some(Case::ALL.len()));
        assert_eq!(Case::select("nope"), None);
    }

    #[test]
    fn counts_print_short() {
        assert_eq!(count(200_000), "200k");
        assert_eq!(count(1_000_000), "1M");
        assert_eq!(count(2_500), "2500");
    }
}
