//! The slim-bus benchmark suite, run by the `throughput` bench target:
//! `cargo bench -p slim-bus-bench`.
//!
//! Every case runs against one Redis server (a throwaway `redis-server`, or `REDIS_URL`),
//! on a fresh stream per repetition, with the cases interleaved within each repetition so
//! that drift of the machine hits all of them alike. Each slim-bus case is compared with a
//! hand-written redis-rs loop measured in the same run. See BENCHMARKS.md for the cases and
//! the latest results.
//!
//! Under `cargo test` and nextest (no `--bench` argument) the target runs one test,
//! `smoke`: every case once at tiny sizes, checking counts but never timings.

mod bus;
mod cases;
mod cli;
mod compete;
mod handover;
mod memory;
mod observe;
mod raw;
mod report;
mod suite;

use std::process::ExitCode;

use crate::cli::Mode;

/// Parses the arguments and runs the suite, the smoke test, or a child process.
pub fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = match cli::parse(&args, |name| std::env::var(name).ok()) {
        Ok(mode) => mode,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(2);
        }
    };
    match mode {
        Mode::Help => println!("{}", cli::USAGE),
        Mode::List { ignored } => {
            if !ignored {
                println!("{}: test", cli::SMOKE_TEST);
            }
        }
        Mode::Nothing => {}
        Mode::Child(args) => return memory::child_main(args),
        Mode::Bench(options) => return run_suite(options, false),
        Mode::Smoke(options) => return run_suite(options, true),
    }
    ExitCode::SUCCESS
}

fn run_suite(options: cli::Options, smoke: bool) -> ExitCode {
    init_tracing();
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(suite::run(options)) {
        Ok(true) => {
            if smoke {
                println!("test {} ... ok", cli::SMOKE_TEST);
            }
            ExitCode::SUCCESS
        }
        Ok(false) => ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// The runtime of the suite and of its children: a multi-threaded one with a worker per
/// CPU, as a service would run.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Installs the switched metrics recorder (see [`observe`]), and logs at `RUST_LOG` to
/// stderr when it is set. Otherwise warnings and errors are still formatted, as a service
/// would, but into a sink: the poison case logs one error per
/// undecodable entry, and that cost belongs to the measurement, not to the terminal.
fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let _ = match EnvFilter::try_from_default_env() {
        Ok(filter) => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init()
            .map_err(drop),
        Err(_) => {
            // Reloadable: the `consume-observed` case logs at INFO for its run.
            use tracing_subscriber::layer::SubscriberExt;
            use tracing_subscriber::util::SubscriberInitExt;
            let (filter, handle) = tracing_subscriber::reload::Layer::new(EnvFilter::new("warn"));
            observe::set_filter_handle(handle);
            tracing_subscriber::registry()
                .with(filter)
                .with(tracing_subscriber::fmt::layer().with_writer(std::io::sink))
                .try_init()
                .map_err(drop)
        }
    };
    observe::install_recorder();
}
