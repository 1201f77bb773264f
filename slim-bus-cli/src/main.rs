//! `slim-bus`: the operator's command line for slim-bus streams, built on the library's
//! inspection and dead-letter API.

use std::io::Write as _;
use std::process::ExitCode;

use slim_bus::{EventBus, EventBusConfig};

mod args;
mod asyncapi;
mod dlq;
mod exit;
mod interrupt;
mod lookup;
mod output;
mod status;
mod table;
mod tail;

use args::{Cli, Command, Connection};
use exit::{Failure, Outcome};

/// The server when none of `--url`, `--cluster` and their environment variables names
/// one: the library's default.
const DEFAULT_URL: &str = "redis://127.0.0.1:6379/";

fn main() -> ExitCode {
    // clap prints its own usage errors and exits with 2.
    let cli = Cli::parse_checked();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(&Failure::from(error)),
    };
    match runtime.block_on(run(cli)) {
        // What `head`-style pipelines expect: the reader has what it wanted.
        Ok(()) | Err(Failure::StdoutClosed) => ExitCode::SUCCESS,
        Err(failure) => fail(&failure),
    }
}

fn fail(failure: &Failure) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "error: {failure}");
    failure.exit_code()
}

async fn run(cli: Cli) -> Outcome {
    if let Command::Asyncapi(args) = &cli.command {
        return asyncapi::from_bin(args).await;
    }
    let bus = connect(&cli.connection).await?;
    let json = cli.json;
    let outcome = match cli.command {
        Command::Status(args) => status::run(&bus, &args, json).await,
        Command::Dlq(command) => dlq::run(&bus, command, json).await,
        Command::Tail(args) => tail::tail(&bus, &args, json).await,
        Command::Pending(args) => tail::pending(&bus, &args, json).await,
        Command::Asyncapi(_) => Ok(()),
    };
    outcome.map_err(|failure| name_the_cluster(failure, &cli.connection.cluster))
}

/// `failure`, naming the seed nodes when it is about talking to a cluster: the library's
/// errors name a single server's address, but on a cluster that none of the seeds
/// answers they say only that the initial connections failed.
fn name_the_cluster(failure: Failure, nodes: &[String]) -> Failure {
    if nodes.is_empty() || !matches!(failure, Failure::Redis(_)) {
        return failure;
    }
    match redacted(nodes) {
        Some(nodes) => failure.note(&format!("Redis Cluster seed nodes: {}", nodes.join(", "))),
        None => failure,
    }
}

/// `nodes` with their passwords as `***`, the way the library's config serializes them
/// (its redaction is not public otherwise).
fn redacted(nodes: &[String]) -> Option<Vec<String>> {
    let mut config = EventBusConfig::default();
    config.cluster_nodes = nodes.to_vec();
    let serde_json::Value::Object(mut settings) = serde_json::to_value(&config).ok()? else {
        return None;
    };
    let serde_json::Value::Array(shown) = settings.remove("cluster_nodes")? else {
        return None;
    };
    shown
        .into_iter()
        .map(|node| node.as_str().map(str::to_owned))
        .collect()
}

/// A bus with only the connection settings: no consumer group, no handlers, so it
/// inspects any stream and takes nothing from anyone.
async fn connect(connection: &Connection) -> Result<EventBus, Failure> {
    let builder = if connection.cluster.is_empty() {
        EventBus::builder().url(connection.url.as_deref().unwrap_or(DEFAULT_URL))
    } else {
        EventBus::builder().cluster(connection.cluster.iter().cloned())
    };
    let mut builder = builder
        .command_timeout(connection.timeout)
        .dead_letter_suffix(connection.dead_letter_suffix.clone());
    if let Some(path) = &connection.tls_ca_cert {
        builder = builder.tls_ca_cert(path);
    }
    if let Some(path) = &connection.tls_client_cert {
        builder = builder.tls_client_cert(path);
    }
    if let Some(path) = &connection.tls_client_key {
        builder = builder.tls_client_key(path);
    }
    Ok(builder.build().await?)
}
