//! The command line's arguments, as clap parses them.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use slim_bus::EntryId;

use crate::exit::EXIT_CODES;

/// Inspect and operate slim-bus streams on a Redis server: stream and consumer-group
/// status, dead letters (list, show, replay, purge), pending entries, and a live tail.
#[derive(Debug, Parser)]
#[command(name = "slim-bus", version, after_help = EXIT_CODES)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) connection: Connection,

    /// Print JSON instead of tables (one document; one per line for `tail` and
    /// `status --watch`).
    #[arg(long, global = true)]
    pub(crate) json: bool,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Where the server is, as the library's settings of the same names say.
#[derive(Debug, Args)]
pub(crate) struct Connection {
    /// The Redis server: redis://[user:password@]host:port/db, rediss://... for TLS, or
    /// redis+unix:///path/to/redis.sock; single servers only (no Redis Cluster)
    /// [default: redis://127.0.0.1:6379/]
    #[arg(long, env = "REDIS_URL", hide_env_values = true, global = true)]
    pub(crate) url: Option<String>,

    /// PEM file of the CA that signed the server's certificate (rediss:// only; default:
    /// the system's root certificates).
    #[arg(long, value_name = "PEM", global = true)]
    pub(crate) tls_ca_cert: Option<PathBuf>,

    /// PEM file of the client certificate, for a server that authenticates clients.
    #[arg(long, value_name = "PEM", global = true, requires = "tls_client_key")]
    pub(crate) tls_client_cert: Option<PathBuf>,

    /// PEM file of the client certificate's key.
    #[arg(long, value_name = "PEM", global = true, requires = "tls_client_cert")]
    pub(crate) tls_client_key: Option<PathBuf>,

    /// The suffix of dead-letter streams: those of `user.created` are in
    /// `{user.created}<SUFFIX>`.
    #[arg(long, default_value = ":dlq", value_name = "SUFFIX", global = true)]
    pub(crate) dead_letter_suffix: String,

    /// How long each command may wait for Redis, e.g. `5s` or `500ms`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    pub(crate) timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Per stream: its length and dead letters, and per consumer group the lag, pending
    /// entries, oldest pending age, last delivered id and the consumers.
    Status(StatusArgs),
    /// List, show, replay or purge the dead letters of a stream.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Print the entries of a stream as they arrive, until Ctrl-C; reads without a
    /// consumer group, so it takes nothing from anyone.
    Tail(TailArgs),
    /// The pending entries of a consumer group: who holds each, for how long, and how
    /// often it was delivered.
    Pending(PendingArgs),
    /// Print the AsyncAPI 3.0 document of a service built on slim-bus: runs its binary
    /// with SLIM_BUS_ASYNCAPI set, which makes its `EventBus` build write the document and
    /// end the process before connecting to anything.
    Asyncapi(AsyncApiArgs),
}

#[derive(Debug, Args)]
pub(crate) struct AsyncApiArgs {
    /// The service's binary.
    #[arg(long, value_name = "PATH")]
    pub(crate) from_bin: PathBuf,
    /// How long the service may take to build its bus and exit.
    #[arg(long = "wait", default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) wait: Duration,
    /// Arguments for the service (after `--`).
    #[arg(last = true, value_name = "ARGS")]
    pub(crate) args: Vec<String>,
}

#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
    /// The streams to show, e.g. `user.created` (their dead letters come with them).
    #[arg(required = true, value_name = "STREAM")]
    pub(crate) streams: Vec<String>,

    /// Show only this consumer group.
    #[arg(long, value_name = "GROUP")]
    pub(crate) group: Option<String>,

    /// Refresh in place until Ctrl-C.
    #[arg(long)]
    pub(crate) watch: bool,

    /// How often `--watch` refreshes, e.g. `2s`.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration, requires = "watch")]
    pub(crate) interval: Duration,
}

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// The dead letters of a stream, oldest first.
    List {
        /// The stream whose dead letters to list (not the dead-letter stream's name).
        stream: String,
        /// The most dead letters to list.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// List those after this dead-letter id (the last id of the previous page).
        #[arg(long, value_name = "ID")]
        after: Option<EntryId>,
    },
    /// One dead letter: its metadata and every original field.
    Show {
        /// The stream whose dead letter it is.
        stream: String,
        /// The dead letter's id (in the dead-letter stream).
        id: EntryId,
    },
    /// Move dead letters back to their stream as new entries, so the handlers run on
    /// them again. Asks for confirmation on a terminal; needs --yes otherwise.
    Replay(Selection),
    /// Delete dead letters for good. Asks for confirmation on a terminal; needs --yes
    /// otherwise.
    Purge(Selection),
}

/// Which dead letters a replay or purge is about.
#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("which").required(true).args(["ids", "all"]))]
pub(crate) struct Selection {
    /// The stream whose dead letters these are.
    pub(crate) stream: String,
    /// These dead letters (repeat the option, or give several ids after it).
    #[arg(long = "id", value_name = "ID", num_args = 1..)]
    pub(crate) ids: Vec<EntryId>,
    /// Every dead letter of the stream.
    #[arg(long)]
    pub(crate) all: bool,
    /// Do it without asking.
    #[arg(long, short)]
    pub(crate) yes: bool,
}

#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    /// The stream to follow.
    pub(crate) stream: String,
    /// Start after this entry id (`0-0` for every entry there is); by default only the
    /// entries added from now on.
    #[arg(long, value_name = "ID")]
    pub(crate) from: Option<EntryId>,
}

#[derive(Debug, Args)]
pub(crate) struct PendingArgs {
    /// The stream.
    pub(crate) stream: String,
    /// The consumer group.
    pub(crate) group: String,
    /// Show only the entries this consumer holds.
    #[arg(long, value_name = "CONSUMER")]
    pub(crate) consumer: Option<String>,
    /// The most entries to show, lowest id first.
    #[arg(long, default_value_t = 100)]
    pub(crate) limit: usize,
}
