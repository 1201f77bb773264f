//! The slim-bus benchmark suite: throughput, latency and memory of the consumer and the
//! publisher, each against a hand-written redis-rs baseline in the same run.
//!
//! Run with:
//!
//! ```sh
//! cargo bench -p slim-bus-bench                                  # full suite, 3 reps
//! cargo bench -p slim-bus-bench -- --quick                       # smaller sizes, 1 rep
//! cargo bench -p slim-bus-bench -- --reps 5 --cases baseline,consume
//! ```
//!
//! See BENCHMARKS.md at the repository root for the cases and the latest results.

fn main() -> std::process::ExitCode {
    slim_bus_bench::main()
}
