//! Settings of a bus, as a plain struct that can come from a config file or the environment.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Where a new consumer group starts reading a stream.
///
/// A group that is gone while the bus listens (deleted, flushed, lost in a restart of a
/// server without persistence) is created again just after the last entry delivered to
/// this consumer on that stream; this applies there only when none was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StartFrom {
    /// From the first entry: entries published before the group existed are handled too.
    #[default]
    Beginning,
    /// Only entries published after the group was created.
    NewOnly,
}

/// The settings of an [`EventBus`](crate::EventBus), with the same meaning as the
/// builder methods of the same names.
///
/// Durations are written like `"30s"` or `"250ms"` in config files.
///
/// # Examples
///
/// ```
/// let config: slim_bus::EventBusConfig = serde_json::from_str(r#"{
///     "url": "redis://127.0.0.1:6379/",
///     "consumer_group": "billing",
///     "max_concurrent": 32,
///     "handler_timeout": "10s"
/// }"#).unwrap();
/// assert_eq!(config.max_count, 100);
/// ```
///
/// Its `Debug` and `Serialize` output never holds the password of `url`: it reads `***`
/// there.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct EventBusConfig {
    /// The Redis server, e.g. `redis://127.0.0.1:6379/`, `redis://user:pass@host:6379/2`,
    /// `rediss://user:pass@host:6380/` (TLS, see `tls_ca_cert`) or
    /// `redis+unix:///run/redis.sock`. Ignored when the builder is given a `redis::Client`.
    #[serde(serialize_with = "serialize_redacted_url")]
    pub url: String,
    /// Seed nodes of a Redis Cluster, e.g. `["redis://user:pass@10.0.0.1:7000/"]`: set,
    /// the bus uses the cluster instead of `url` (leave `url` at its default). One node is
    /// enough, more let the bus start while one is down; it discovers the others. All use
    /// one scheme, `redis://` or `rediss://` (with the `tls_*` settings), and the same
    /// user and password, with which every node is reached. Empty by default.
    #[serde(serialize_with = "serialize_redacted_urls")]
    pub cluster_nodes: Vec<String>,
    /// A PEM file of the CA (or CAs) that signed the server's certificate, trusted instead
    /// of the system's root certificates for a `rediss://` URL.
    pub tls_ca_cert: Option<PathBuf>,
    /// A PEM file of the client certificate (and its chain) the bus presents to a server
    /// that authenticates clients (mutual TLS); needs `tls_client_key`.
    pub tls_client_cert: Option<PathBuf>,
    /// A PEM file of the private key of `tls_client_cert`. Its contents are never printed.
    pub tls_client_key: Option<PathBuf>,
    /// The consumer group this service reads its streams through. Required to listen;
    /// every process of one service uses the same group. No whitespace at either end.
    pub consumer_group: Option<String>,
    /// This process's name within the group. Defaults to the host name (the pod name on
    /// Kubernetes), which stays the same across restarts so a restarted process finds the
    /// entries it held. Set it when several processes of one service share a host: two
    /// processes must never share a consumer name: a listening bus holds a lease on it
    /// (see `consumer_lease_ttl`), and `listen()` refuses a name another live process
    /// holds. No whitespace at either end.
    pub consumer_name: Option<String>,
    /// The most entries asked for per stream and read.
    pub max_count: usize,
    /// How long one handler call may take before it is cancelled and its entry left pending.
    /// It may be longer than `claim_min_idle`: the entry of a running handler is kept
    /// fresh, so no other consumer claims it meanwhile.
    #[serde(with = "humantime_serde")]
    pub handler_timeout: Duration,
    /// The most handler calls running at once, across all streams of the bus.
    pub max_concurrent: usize,
    /// The most entries this consumer holds pending at once: entries being handled,
    /// entries waiting for their retry, entries being dead-lettered, and handled entries
    /// whose acknowledgement is on its way. The reader never reads or claims past it, so
    /// a failing handler cannot take more than this from the group. At least
    /// `max_concurrent`; `None` (the default) means four times `max_concurrent`: room for
    /// the next read while the acknowledgements of the last one are on the wire, and for
    /// the few entries that wait for a retry when some fail now and then, without which
    /// the clean and the transient-failure throughput drop.
    pub max_in_flight: Option<usize>,
    /// How long one blocking read waits for new entries before it is issued again.
    #[serde(with = "humantime_serde")]
    pub block_time: Duration,
    /// How long shutdown waits for running handlers; defaults to the handler timeout.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Option<Duration>,
    /// Where a consumer group that does not exist yet starts.
    pub start_from: StartFrom,
    /// How long a command (publish, ack, group creation) may wait for Redis.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// How long an entry must sit unacknowledged with another consumer before this one
    /// claims it, presuming that consumer dead: about how long the entries of a crashed
    /// consumer wait (plus up to `claim_interval`). A live consumer keeps what it holds
    /// fresh (every third of this, one `XCLAIM ... JUSTID` per stream), however long its
    /// handlers or dead-letter moves take, so this need not exceed `handler_timeout`. The
    /// retry delays follow it when they are not set (see `retry_max`).
    #[serde(with = "humantime_serde")]
    pub claim_min_idle: Duration,
    /// How often the bus looks for entries to claim from dead consumers.
    #[serde(with = "humantime_serde")]
    pub claim_interval: Duration,
    /// How long another consumer of the group must have been idle (no read, no claim),
    /// holding no pending entries, before this one removes it from the group, after
    /// each claim pass over a stream. A check of its pending entries and the removal are
    /// one atomic step, so no entry is dropped with a consumer.
    #[serde(with = "humantime_serde")]
    pub consumer_idle_removal: Duration,
    /// How long the lease of this consumer name lasts without renewal. A listening bus
    /// holds it (renewing it every third of it) so that no other live process listens
    /// under the same name; a process restarted after a crash waits up to this long for
    /// the lease of its previous life to lapse. `None` (the default) means 5 s, or twice
    /// `command_timeout` when that is longer; set, it must be at least twice
    /// `command_timeout`, so that one renewal taking the whole timeout does not let it
    /// lapse.
    #[serde(with = "humantime_serde")]
    pub consumer_lease_ttl: Option<Duration>,
    /// Whether `listen()` waits for Redis when it does not answer or is loading its data,
    /// retrying with backoff (the default), or fails at once with the connection error.
    /// Refused credentials and a rejected TLS handshake fail `listen()` at once either way.
    pub wait_for_redis: bool,
    /// After this many deliveries that failed, an entry is dead-lettered. A handler can
    /// set its own with [`StreamHandler::max_deliveries`](crate::StreamHandler::max_deliveries).
    pub max_deliveries: u64,
    /// The delay before the first retry of a failed entry; each further retry doubles it.
    /// `None` (the default) means 1 s, or `retry_max` when that is shorter.
    #[serde(with = "humantime_serde")]
    pub retry_base: Option<Duration>,
    /// The longest delay between retries. An entry waiting for its retry stays pending
    /// with this consumer and is kept fresh meanwhile, so it may be longer than
    /// `claim_min_idle`. `None` (the default) means half of `claim_min_idle`, at most 30 s
    /// (and at least an explicit `retry_base`): a service that recovers a crashed
    /// consumer's entries quickly retries quickly too.
    #[serde(with = "humantime_serde")]
    pub retry_max: Option<Duration>,
    /// The suffix of dead-letter stream names: the dead letters of `user.created` go to
    /// `{user.created}:dlq` (the braces keep both in one Redis Cluster hash slot).
    pub dead_letter_suffix: String,
    /// An opt-in cap on each dead-letter stream (`XADD MAXLEN ~`, so approximate): older
    /// dead letters are trimmed, counted in [`StreamHealth::dead_letters_trimmed`](crate::StreamHealth::dead_letters_trimmed)
    /// and logged. `None` (the default): dead letters are kept until replayed or purged.
    pub dead_letter_max_len: Option<usize>,
    /// Caps on stream lengths, by stream name, applied as entries are published
    /// (`XADD ... MAXLEN ~ N`, so approximate: Redis trims whole internal nodes, keeping a
    /// little more). The oldest entries are deleted whether every consumer group has
    /// handled them or not; see `trim_acked` for the group-aware way. A cap here overrides
    /// the event type's [`Event::MAX_LEN`](crate::Event::MAX_LEN). Empty by default.
    pub stream_max_len: BTreeMap<String, usize>,
    /// Partitioned streams, by logical stream name: each is stored as the Redis streams
    /// `NAME:{0}` ... `NAME:{N-1}`, published to by key or in turn, and read whole by a
    /// handler of `NAME` (see the README's "Partitioned streams"). Must agree with the
    /// event types' [`Event::PARTITIONS`](crate::Event::PARTITIONS). Empty by default.
    pub stream_partitions: BTreeMap<String, u32>,
    /// Group-aware retention of every stream the bus handles: while it listens, the bus
    /// deletes, every `trim_acked_interval`, the entries that every consumer group of the
    /// stream has been delivered and has acknowledged. Off by default.
    pub trim_acked: bool,
    /// More streams trimmed as `trim_acked` trims, whether the bus handles them or not
    /// (they are trimmed while the bus listens). Empty by default.
    pub trim_acked_streams: Vec<String>,
    /// How often the streams of `trim_acked` and `trim_acked_streams` are trimmed.
    #[serde(with = "humantime_serde")]
    pub trim_acked_interval: Duration,
    /// The level of the `tracing` spans of deliveries and publishes: `"debug"` (the
    /// default), `"info"`, ... At the level a service logs at, its handlers' events nest
    /// under the span of their delivery.
    #[serde(with = "level_name")]
    pub span_level: tracing::Level,
}

/// The `url` of a default config: a Redis on this host.
const DEFAULT_URL: &str = "redis://127.0.0.1:6379/";

impl Default for EventBusConfig {
    fn default() -> Self {
        EventBusConfig {
            url: DEFAULT_URL.to_owned(),
            cluster_nodes: Vec::new(),
            tls_ca_cert: None,
            tls_client_cert: None,
            tls_client_key: None,
            consumer_group: None,
            consumer_name: None,
            max_count: 100,
            handler_timeout: Duration::from_secs(30),
            max_concurrent: 64,
            max_in_flight: None,
            block_time: Duration::from_secs(2),
            shutdown_grace: None,
            start_from: StartFrom::Beginning,
            command_timeout: Duration::from_secs(5),
            claim_min_idle: Duration::from_secs(60),
            claim_interval: Duration::from_secs(10),
            consumer_idle_removal: Duration::from_secs(24 * 3600),
            consumer_lease_ttl: None,
            wait_for_redis: true,
            max_deliveries: 5,
            retry_base: None,
            retry_max: None,
            dead_letter_suffix: ":dlq".to_owned(),
            dead_letter_max_len: None,
            stream_max_len: BTreeMap::new(),
            stream_partitions: BTreeMap::new(),
            trim_acked: false,
            trim_acked_streams: Vec::new(),
            trim_acked_interval: Duration::from_secs(60),
            span_level: tracing::Level::DEBUG,
        }
    }
}

impl std::fmt::Debug for EventBusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Destructured so that a new field cannot be added without deciding here whether
        // it may be printed.
        let EventBusConfig {
            url,
            cluster_nodes,
            tls_ca_cert,
            tls_client_cert,
            tls_client_key,
            consumer_group,
            consumer_name,
            max_count,
            handler_timeout,
            max_concurrent,
            max_in_flight,
            block_time,
            shutdown_grace,
            start_from,
            command_timeout,
            claim_min_idle,
            claim_interval,
            consumer_idle_removal,
            max_deliveries,
            retry_base,
            retry_max,
            dead_letter_suffix,
            dead_letter_max_len,
            wait_for_redis,
            consumer_lease_ttl,
            stream_max_len,
            stream_partitions,
            trim_acked,
            trim_acked_streams,
            trim_acked_interval,
            span_level,
        } = self;
        f.debug_struct("EventBusConfig")
            .field("url", &redacted_url(url))
            .field(
                "cluster_nodes",
                &cluster_nodes
                    .iter()
                    .map(|node| redacted_url(node))
                    .collect::<Vec<_>>(),
            )
            .field("tls_ca_cert", tls_ca_cert)
            .field("tls_client_cert", tls_client_cert)
            .field("tls_client_key", tls_client_key)
            .field("consumer_group", consumer_group)
            .field("consumer_name", consumer_name)
            .field("max_count", max_count)
            .field("handler_timeout", handler_timeout)
            .field("max_concurrent", max_concurrent)
            .field("max_in_flight", max_in_flight)
            .field("block_time", block_time)
            .field("shutdown_grace", shutdown_grace)
            .field("start_from", start_from)
            .field("command_timeout", command_timeout)
            .field("claim_min_idle", claim_min_idle)
            .field("claim_interval", claim_interval)
            .field("consumer_idle_removal", consumer_idle_removal)
            .field("max_deliveries", max_deliveries)
            .field("retry_base", retry_base)
            .field("retry_max", retry_max)
            .field("dead_letter_suffix", dead_letter_suffix)
            .field("dead_letter_max_len", dead_letter_max_len)
            .field("wait_for_redis", wait_for_redis)
            .field("consumer_lease_ttl", consumer_lease_ttl)
            .field("stream_max_len", stream_max_len)
            .field("stream_partitions", stream_partitions)
            .field("trim_acked", trim_acked)
            .field("trim_acked_streams", trim_acked_streams)
            .field("trim_acked_interval", trim_acked_interval)
            .field("span_level", span_level)
            .finish()
    }
}

/// A `tracing::Level` as its lowercase name in config files: `"info"`, `"debug"`, ...
mod level_name {
    use serde::{Deserialize, Deserializer, Serializer};
    use tracing::Level;

    pub(super) fn serialize<S: Serializer>(
        level: &Level,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&level.as_str().to_ascii_lowercase())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Level, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(|_| {
            serde::de::Error::custom(format!(
                "`{name}` is not a level: use \"error\", \"warn\", \"info\", \"debug\" or \"trace\""
            ))
        })
    }
}

fn serialize_redacted_urls<S: serde::Serializer>(
    urls: &[String],
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(urls.iter().map(|url| redacted_url(url)))
}

fn serialize_redacted_url<S: serde::Serializer>(
    url: &str,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&redacted_url(url))
}

/// `url` with its password replaced by `***`: the part of the user info after its first
/// `:`, and the value of a `pass` or `password` query parameter (as `redis+unix://` URLs
/// carry it). Works on text that does not parse as a URL too, since the errors for such
/// URLs show them: the user info is taken to end at the last `@`, wherever that is, so a
/// password holding `/`, `?` or `#` is hidden whole as well. A URL whose authority is
/// empty (`redis+unix:///path`) has no user info, only query parameters.
pub(crate) fn redacted_url(url: &str) -> String {
    const HIDDEN: &str = "***";
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    if let Some(scheme_end) = rest.find("://") {
        let (scheme, after) = rest.split_at(scheme_end + 3);
        out.push_str(scheme);
        rest = after;
        if let Some(at) = rest.rfind('@').filter(|_| !rest.starts_with('/')) {
            let (user_info, after) = rest.split_at(at);
            match user_info.split_once(':') {
                Some((user, _)) => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(HIDDEN);
                }
                None => out.push_str(user_info),
            }
            rest = after;
        }
    }
    let Some(query_start) = rest.find('?') else {
        out.push_str(rest);
        return out;
    };
    out.push_str(&rest[..=query_start]);
    let query = &rest[query_start + 1..];
    let (query, fragment) = match query.find('#') {
        Some(hash) => query.split_at(hash),
        None => (query, ""),
    };
    for (i, parameter) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match parameter.split_once('=') {
            Some((name, _)) if name == "pass" || name == "password" => {
                out.push_str(name);
                out.push('=');
                out.push_str(HIDDEN);
            }
            _ => out.push_str(parameter),
        }
    }
    out.push_str(fragment);
    out
}

/// The longest duration a setting takes: far beyond any sensible value, and short enough
/// that deadlines computed from it never overflow the clock.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// The longest delay between retries when neither `retry_max` nor a short
/// `claim_min_idle` says otherwise.
const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(30);

/// The first retry delay when `retry_base` is not set.
const DEFAULT_RETRY_BASE: Duration = Duration::from_secs(1);

/// The consumer-name lease's TTL when `consumer_lease_ttl` is not set and
/// `command_timeout` is short.
const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

/// The shortest lease TTL: renewals every third of it must stay cheap.
const MIN_LEASE_TTL: Duration = Duration::from_millis(100);

/// How many command timeouts a lease lasts at least. A renewal starts a third of the TTL
/// after the last one and may take a whole command timeout; with a TTL of twice the
/// timeout it ends by five sixths of the TTL, before the lease lapses.
const LEASE_TTL_PER_COMMAND_TIMEOUT: u32 = 2;

/// The ceiling Redis puts on one `BLOCK` (it takes milliseconds as a signed 64-bit
/// integer); a far smaller one keeps shutdown and reconnects responsive anyway.
const MAX_BLOCK_TIME: Duration = Duration::from_secs(60);

impl EventBusConfig {
    /// `cluster_nodes`: each a `redis://` or `rediss://` URL, all of one scheme, and not
    /// with a `url` of its own.
    fn check_cluster_nodes(&self) -> Result<()> {
        let Some(first) = self.cluster_nodes.first() else {
            return Ok(());
        };
        if self.url != DEFAULT_URL {
            return Err(Error::config(
                "cluster_nodes",
                "cannot be used with url: set one of them (a cluster's nodes, or one server)",
            ));
        }
        let scheme = |node: &str| node.split_once("://").map(|(scheme, _)| scheme.to_owned());
        let first_scheme = scheme(first);
        for node in &self.cluster_nodes {
            match scheme(node).as_deref() {
                Some("redis" | "rediss") => {}
                _ => {
                    return Err(Error::config(
                        "cluster_nodes",
                        format!(
                            "`{}` is not a redis:// or rediss:// URL",
                            redacted_url(node)
                        ),
                    ));
                }
            }
            if scheme(node) != first_scheme {
                return Err(Error::config(
                    "cluster_nodes",
                    "mixes redis:// and rediss://: every node of a cluster is reached the same way",
                ));
            }
        }
        Ok(())
    }

    /// Checks every setting, reporting every invalid one in one [`Error::Config`].
    pub(crate) fn validate(&self) -> Result<()> {
        let mut invalid: Vec<Error> = Vec::new();
        let mut reject = |setting: &'static str, reason: String| {
            invalid.push(Error::config(setting, reason));
        };
        let durations = [
            ("handler_timeout", Some(self.handler_timeout)),
            ("shutdown_grace", self.shutdown_grace),
            ("command_timeout", Some(self.command_timeout)),
            ("claim_min_idle", Some(self.claim_min_idle)),
            ("claim_interval", Some(self.claim_interval)),
            ("consumer_idle_removal", Some(self.consumer_idle_removal)),
            ("consumer_lease_ttl", self.consumer_lease_ttl),
            ("retry_base", self.retry_base),
            ("retry_max", self.retry_max),
            ("trim_acked_interval", Some(self.trim_acked_interval)),
        ];
        for (setting, duration) in durations {
            if duration.is_some_and(|d| d > MAX_DURATION) {
                reject(setting, "must be at most 365 days".to_owned());
            }
        }
        if self.url.trim().is_empty() {
            reject("url", "must not be empty".to_owned());
        }
        if self.max_count == 0 {
            reject("max_count", "must be at least 1".to_owned());
        }
        if self.max_concurrent == 0 {
            reject("max_concurrent", "must be at least 1".to_owned());
        }
        if self.max_concurrent > tokio::sync::Semaphore::MAX_PERMITS {
            reject(
                "max_concurrent",
                "is larger than a semaphore can count".to_owned(),
            );
        }
        if let Some(max_in_flight) = self.max_in_flight {
            if max_in_flight < self.max_concurrent {
                reject(
                    "max_in_flight",
                    format!(
                        "must be at least max_concurrent ({}): every running handler holds an entry",
                        self.max_concurrent
                    ),
                );
            }
            if max_in_flight > tokio::sync::Semaphore::MAX_PERMITS {
                reject(
                    "max_in_flight",
                    "is larger than a semaphore can count".to_owned(),
                );
            }
        }
        if self.handler_timeout.is_zero() {
            reject("handler_timeout", "must be longer than zero".to_owned());
        }
        if self.block_time < Duration::from_millis(1) || self.block_time > MAX_BLOCK_TIME {
            reject(
                "block_time",
                format!("must be between 1ms and {MAX_BLOCK_TIME:?}"),
            );
        }
        if self.command_timeout.is_zero() {
            reject("command_timeout", "must be longer than zero".to_owned());
        }
        if self.claim_min_idle.is_zero() {
            reject("claim_min_idle", "must be longer than zero".to_owned());
        }
        if self.claim_interval.is_zero() {
            reject("claim_interval", "must be longer than zero".to_owned());
        }
        if self.consumer_idle_removal.is_zero() {
            reject(
                "consumer_idle_removal",
                "must be longer than zero".to_owned(),
            );
        }
        if let Some(ttl) = self.consumer_lease_ttl {
            if ttl < MIN_LEASE_TTL {
                reject(
                    "consumer_lease_ttl",
                    format!("must be at least {MIN_LEASE_TTL:?}"),
                );
            } else if ttl < self.command_timeout * LEASE_TTL_PER_COMMAND_TIMEOUT {
                reject(
                    "consumer_lease_ttl",
                    format!(
                        "({ttl:?}) must be at least {LEASE_TTL_PER_COMMAND_TIMEOUT} times command_timeout ({:?}): one renewal may take the whole command timeout, and the lease must not lapse meanwhile; raise consumer_lease_ttl or lower command_timeout",
                        self.command_timeout
                    ),
                );
            }
        }
        if self.max_deliveries == 0 {
            reject("max_deliveries", "must be at least 1".to_owned());
        }
        if self.retry_base.is_some_and(|base| base.is_zero()) {
            reject("retry_base", "must be longer than zero".to_owned());
        }
        if let (Some(base), Some(max)) = (self.retry_base, self.retry_max)
            && max < base
        {
            reject(
                "retry_max",
                format!("({max:?}) must not be shorter than retry_base ({base:?})"),
            );
        }
        if self.dead_letter_suffix.is_empty() {
            reject(
                "dead_letter_suffix",
                "must not be empty: the dead letters would go to the stream itself".to_owned(),
            );
        }
        if self.dead_letter_max_len == Some(0) {
            reject("dead_letter_max_len", "must be at least 1".to_owned());
        }
        for (stream, max_len) in &self.stream_max_len {
            if stream.is_empty() {
                reject("stream_max_len", "names an empty stream".to_owned());
            }
            if *max_len == 0 {
                reject(
                    "stream_max_len",
                    format!(
                        "must be at least 1 (stream `{stream}`): a cap of 0 would delete every entry as it is published"
                    ),
                );
            }
        }
        if self.trim_acked_streams.iter().any(String::is_empty) {
            reject("trim_acked_streams", "names an empty stream".to_owned());
        }
        if self.trim_acked_interval.is_zero() {
            reject("trim_acked_interval", "must be longer than zero".to_owned());
        }
        let checks = [
            self.check_cluster_nodes(),
            check_name("consumer_group", self.consumer_group.as_deref()),
            check_name("consumer_name", self.consumer_name.as_deref()),
        ]
        .into_iter()
        .chain(self.stream_partitions.iter().map(|(stream, &partitions)| {
            crate::partition::check_partitioned(stream, partitions, "stream_partitions")
        }));
        invalid.extend(checks.filter_map(Result::err));
        Error::configs(invalid)
    }

    /// The longest delay between retries: `retry_max` when set, else half of
    /// `claim_min_idle` up to 30 s (and no shorter than an explicit `retry_base`).
    pub(crate) fn effective_retry_max(&self) -> Duration {
        self.retry_max.unwrap_or_else(|| {
            (self.claim_min_idle / 2)
                .min(DEFAULT_RETRY_MAX)
                .max(self.retry_base.unwrap_or(Duration::ZERO))
        })
    }

    /// The delay before the first retry: `retry_base` when set, else 1 s, or the longest
    /// delay when that is shorter.
    pub(crate) fn effective_retry_base(&self) -> Duration {
        self.retry_base
            .unwrap_or_else(|| DEFAULT_RETRY_BASE.min(self.effective_retry_max()))
    }

    /// How long the consumer-name lease lasts: `consumer_lease_ttl` when set, else 5 s,
    /// or twice `command_timeout` when that is longer.
    pub(crate) fn effective_consumer_lease_ttl(&self) -> Duration {
        self.consumer_lease_ttl.unwrap_or_else(|| {
            DEFAULT_LEASE_TTL.max(
                self.command_timeout
                    .saturating_mul(LEASE_TTL_PER_COMMAND_TIMEOUT),
            )
        })
    }

    /// The most entries one consumer holds pending at once.
    pub(crate) fn effective_max_in_flight(&self) -> usize {
        self.max_in_flight.unwrap_or_else(|| {
            self.max_concurrent
                .saturating_mul(4)
                .min(tokio::sync::Semaphore::MAX_PERMITS)
        })
    }

    /// The grace period of shutdown.
    pub(crate) fn effective_shutdown_grace(&self) -> Duration {
        self.shutdown_grace.unwrap_or(self.handler_timeout)
    }
}

fn check_name(setting: &'static str, name: Option<&str>) -> Result<()> {
    match name {
        Some(name) if name.trim().is_empty() => Err(Error::config(setting, "must not be empty")),
        // Redis keeps the whitespace: `" billing"` would be another group than `billing`.
        Some(name) if name.trim() != name => Err(Error::config(
            setting,
            format!("`{name}` must not start or end with whitespace"),
        )),
        _ => Ok(()),
    }
}

/// The default consumer name: the host name, stable across restarts of the same pod or
/// machine.
pub(crate) fn default_consumer_name() -> String {
    let host = gethostname::gethostname();
    let host = host.to_string_lossy();
    if host.trim().is_empty() {
        "slim-bus".to_owned()
    } else {
        host.into_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{EventBusConfig, redacted_url};
    use crate::error::Error;

    /// The settings an invalid config names, in order, and its message.
    fn invalid_settings(config: &EventBusConfig) -> (Vec<&'static str>, String) {
        match &config.validate() {
            Err(error @ Error::Config { setting, also, .. }) => {
                let mut settings = vec![*setting];
                settings.extend(also.iter().map(|invalid| invalid.setting()));
                (settings, error.to_string())
            }
            other => panic!("expected an invalid config, got {other:?}"),
        }
    }

    #[test]
    fn a_short_claim_min_idle_alone_is_valid_and_the_retry_delays_follow_it() {
        let config = EventBusConfig {
            claim_min_idle: Duration::from_secs(2),
            ..EventBusConfig::default()
        };
        config
            .validate()
            .expect("claim_min_idle(2s) alone is valid");
        assert_eq!(config.effective_retry_max(), Duration::from_secs(1));
        assert_eq!(config.effective_retry_base(), Duration::from_secs(1));

        let tiny = EventBusConfig {
            claim_min_idle: Duration::from_millis(300),
            ..EventBusConfig::default()
        };
        tiny.validate()
            .expect("claim_min_idle(300ms) alone is valid");
        assert_eq!(tiny.effective_retry_max(), Duration::from_millis(150));
        assert_eq!(tiny.effective_retry_base(), Duration::from_millis(150));

        let defaults = EventBusConfig::default();
        assert_eq!(defaults.effective_retry_max(), Duration::from_secs(30));
        assert_eq!(defaults.effective_retry_base(), Duration::from_secs(1));
    }

    #[test]
    fn an_explicit_retry_max_may_outlast_claim_min_idle_but_not_fall_below_retry_base() {
        // Entries waiting for their retry are kept fresh: no claim scan takes them.
        let long = EventBusConfig {
            claim_min_idle: Duration::from_secs(2),
            retry_max: Some(Duration::from_secs(5)),
            ..EventBusConfig::default()
        };
        long.validate()
            .expect("retry_max past claim_min_idle is valid");
        let crossed = EventBusConfig {
            retry_base: Some(Duration::from_secs(3)),
            retry_max: Some(Duration::from_secs(2)),
            ..EventBusConfig::default()
        };
        let (settings, message) = invalid_settings(&crossed);
        assert_eq!(settings, ["retry_max"], "{message}");
        assert!(message.contains("retry_base (3s)"), "{message}");
    }

    #[test]
    fn the_lease_ttl_follows_the_command_timeout_and_an_explicit_conflict_names_both() {
        let defaults = EventBusConfig::default();
        assert_eq!(
            defaults.effective_consumer_lease_ttl(),
            Duration::from_secs(10)
        );
        let quick = EventBusConfig {
            command_timeout: Duration::from_millis(500),
            ..EventBusConfig::default()
        };
        assert_eq!(quick.effective_consumer_lease_ttl(), Duration::from_secs(5));
        let slow = EventBusConfig {
            command_timeout: Duration::from_secs(20),
            ..EventBusConfig::default()
        };
        slow.validate()
            .expect("the lease follows a long command timeout");
        assert_eq!(slow.effective_consumer_lease_ttl(), Duration::from_secs(40));

        let conflict = EventBusConfig {
            consumer_lease_ttl: Some(Duration::from_secs(5)),
            command_timeout: Duration::from_secs(5),
            ..EventBusConfig::default()
        };
        let (settings, message) = invalid_settings(&conflict);
        assert_eq!(settings, ["consumer_lease_ttl"], "{message}");
        assert!(message.contains("command_timeout (5s)"), "{message}");
        assert!(
            message.contains("(5s) must be at least 2 times"),
            "{message}"
        );
    }

    #[test]
    fn every_invalid_setting_is_reported_at_once() {
        let config = EventBusConfig {
            max_count: 0,
            block_time: Duration::ZERO,
            consumer_group: Some(" billing".to_owned()),
            ..EventBusConfig::default()
        };
        let (settings, message) = invalid_settings(&config);
        assert_eq!(
            settings,
            ["max_count", "block_time", "consumer_group"],
            "{message}"
        );
        assert!(
            message.starts_with("invalid setting `max_count`: must be at least 1; invalid setting `block_time`: must be between"),
            "{message}"
        );
    }

    #[test]
    fn span_levels_are_written_as_lowercase_names() {
        let config: EventBusConfig =
            serde_json::from_str(r#"{"span_level": "info"}"#).expect("a level name");
        assert_eq!(config.span_level, tracing::Level::INFO);
        assert_eq!(
            serde_json::to_value(&config).expect("serializes")["span_level"],
            "info"
        );
        assert_eq!(EventBusConfig::default().span_level, tracing::Level::DEBUG);
        let error = serde_json::from_str::<EventBusConfig>(r#"{"span_level": "loud"}"#)
            .expect_err("not a level");
        assert!(
            error.to_string().contains("`loud` is not a level"),
            "{error}"
        );
    }

    #[test]
    fn passwords_are_hidden_in_urls_that_parse_and_in_those_that_do_not() {
        let cases = [
            ("redis://127.0.0.1:6379/", "redis://127.0.0.1:6379/"),
            (
                "redis://user:s3cret@host:6379/2",
                "redis://user:***@host:6379/2",
            ),
            ("rediss://:s3cret@host/", "rediss://:***@host/"),
            ("redis://user@host/", "redis://user@host/"),
            ("redis://u:s3/c?r#e@t@host/x", "redis://u:***@host/x"),
            (
                "redis://u:s3cret@host/notanumber",
                "redis://u:***@host/notanumber",
            ),
            (
                "redis+unix:///run/redis.sock?db=1&pass=s3cret&user=u",
                "redis+unix:///run/redis.sock?db=1&pass=***&user=u",
            ),
            (
                "unix:///run/redis.sock?password=s3cret#x",
                "unix:///run/redis.sock?password=***#x",
            ),
            (
                "unix:///run/redis.sock?pass=s3:c@ret",
                "unix:///run/redis.sock?pass=***",
            ),
            ("not a url at all", "not a url at all"),
        ];
        for (url, expected) in cases {
            assert_eq!(redacted_url(url), expected, "{url}");
        }
    }
}
