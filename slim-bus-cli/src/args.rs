//! The command line's arguments, as clap parses them.

use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use slim_bus::EntryId;

use crate::exit::EXIT_CODES;

/// How to say where Redis is, as `--help` shows it.
const EXAMPLES: &str = "\
Examples:
  slim-bus --url redis://:PASSWORD@10.0.0.1:6379/ status orders
  slim-bus --cluster redis://10.0.0.1:7000 status orders
  REDIS_CLUSTER_NODES=redis://10.0.0.1:7000,redis://10.0.0.2:7000 slim-bus dlq list orders";

/// Inspect and operate slim-bus streams on a Redis server or a Redis Cluster: stream and
/// consumer-group status, dead letters (list, show, replay, purge), pending entries, and a
/// live tail.
#[derive(Debug, Parser)]
#[command(name = "slim-bus", version, after_help = format!("{EXAMPLES}\n\n{EXIT_CODES}"))]
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

impl Cli {
    /// Parses the command line, exiting with clap's usage error (code 2) when it is wrong.
    pub(crate) fn parse_checked() -> Self {
        let matches = Cli::command().get_matches();
        let mut cli = Cli::from_arg_matches(&matches)
            .unwrap_or_else(|error| error.format(&mut Cli::command()).exit());
        if let Err((kind, message)) = cli.connection.choose_server(&matches) {
            Cli::command().error(kind, message).exit();
        }
        if let Command::Status(status) = &cli.command
            && status.streams.is_empty()
        {
            let mut command = Cli::command();
            command.build();
            let status = command
                .find_subcommand_mut("status")
                .unwrap_or_else(|| unreachable!("`status` is a subcommand"));
            status
                .error(
                    ErrorKind::MissingRequiredArgument,
                    "status takes the streams to show, e.g. `slim-bus status user.created`: \
                     it does not scan the keyspace for them",
                )
                .exit();
        }
        cli
    }
}

impl Connection {
    /// Leaves one of `url` and `cluster` set, and `cluster` split into its nodes. A
    /// setting on the command line wins over the other's environment variable, so an
    /// exported `REDIS_URL` does not stand in the way of `--cluster`; both on the command
    /// line, or both in the environment, is an error.
    fn choose_server(&mut self, matches: &ArgMatches) -> Result<(), (ErrorKind, String)> {
        let source = |id: &str| matches.value_source(id);
        let from_env = |id: &str| source(id) == Some(ValueSource::EnvVariable);
        match (source("url"), source("cluster")) {
            (Some(ValueSource::CommandLine), Some(ValueSource::CommandLine)) => {
                return Err((
                    ErrorKind::ArgumentConflict,
                    "--url and --cluster cannot be used together: --url names one server, \
                     --cluster the nodes of a Redis Cluster"
                        .to_owned(),
                ));
            }
            (Some(ValueSource::EnvVariable), Some(ValueSource::EnvVariable)) => {
                return Err((
                    ErrorKind::ArgumentConflict,
                    "REDIS_URL and REDIS_CLUSTER_NODES are both set: unset one, or choose \
                     with --url or --cluster"
                        .to_owned(),
                ));
            }
            _ if from_env("url") && !self.cluster.is_empty() => self.url = None,
            _ if from_env("cluster") && self.url.is_some() => self.cluster.clear(),
            _ => {}
        }
        let setting = if from_env("cluster") {
            "REDIS_CLUSTER_NODES"
        } else {
            "--cluster"
        };
        let given = !self.cluster.is_empty();
        self.cluster = cluster_nodes(&self.cluster, setting)
            .map_err(|message| (ErrorKind::ValueValidation, message))?;
        if given && self.cluster.is_empty() {
            return Err((
                ErrorKind::ValueValidation,
                format!("{setting} names no node"),
            ));
        }
        Ok(())
    }
}

/// The node URLs in `values`, each of which may hold several separated by commas.
///
/// A piece that is no URL is not shown: it may be the end of a password with a comma in
/// it, which the library's redaction (of what follows `scheme://user:`) would not hide.
fn cluster_nodes(values: &[String], setting: &str) -> Result<Vec<String>, String> {
    let nodes: Vec<String> = values
        .iter()
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|node| !node.is_empty())
        .map(str::to_owned)
        .collect();
    match nodes.iter().position(|node| !node.contains("://")) {
        Some(index) => Err(format!(
            "node {} of {setting} is not a URL (redis://... or rediss://...); nodes are \
             separated by commas, and a comma in a password is written %2C",
            index + 1
        )),
        None => Ok(nodes),
    }
}

/// `--limit`: a count of 1 or more.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("the limit is 1 or more".to_owned()),
        Ok(count) => Ok(count),
        Err(error) => Err(format!("not a count: {error}")),
    }
}

/// Where the server is, as the library's settings of the same names say.
#[derive(Debug, Args)]
pub(crate) struct Connection {
    /// The Redis server: redis://[user:password@]host:port/db, rediss://... for TLS, or
    /// redis+unix:///path/to/redis.sock; for a Redis Cluster, see --cluster
    /// [default: redis://127.0.0.1:6379/]
    #[arg(long, env = "REDIS_URL", hide_env_values = true, global = true)]
    pub(crate) url: Option<String>,

    /// A seed node of a Redis Cluster, instead of --url: redis://[user:password@]host:port
    /// or rediss://... for TLS; repeat it, or separate URLs with commas (a comma in a
    /// password is written %2C). One node is enough, the others are discovered. A --url or
    /// --cluster on the command line wins over the other's environment variable.
    #[arg(
        long,
        value_name = "URL",
        env = "REDIS_CLUSTER_NODES",
        hide_env_values = true,
        global = true
    )]
    pub(crate) cluster: Vec<String>,

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
// Not `required` in clap, whose message would not say why: see `Cli::parse_checked`.
#[command(override_usage = "slim-bus status [OPTIONS] <STREAM>...")]
pub(crate) struct StatusArgs {
    /// The streams to show, e.g. `user.created` (their dead letters come with them; the
    /// logical name of a partitioned stream shows each partition).
    #[arg(value_name = "STREAM")]
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
        /// The most dead letters to list (1 or more).
        #[arg(long, default_value_t = 20, value_parser = at_least_one)]
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
    /// The most entries to show, lowest id first (1 or more).
    #[arg(long, default_value_t = 100, value_parser = at_least_one)]
    pub(crate) limit: usize,
}
