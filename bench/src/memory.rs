//! Peak memory of a consumer, measured in a child process of its own: the suite re-runs its
//! own binary with `--child`, and the child reports its `VmHWM` when it is done.

use std::process::{ExitCode, Stdio};
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};

use crate::bus::{self, ConsumeSettings};
use crate::cli::{ChildArgs, ChildKind};
use crate::raw::{self, STEP, bounded};

/// The prefix of the one line of stdout a child answers with.
const RESULT_PREFIX: &str = "child-result";

/// What a child reports.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChildRun {
    pub(crate) handled: u64,
    pub(crate) seconds: f64,
    /// Peak resident set size of the child, in KiB.
    pub(crate) vm_hwm_kib: u64,
}

/// Runs a child of this binary that consumes `entries` entries of `stream` (filled, group
/// created) and waits for its report.
pub(crate) async fn run_in_child(
    kind: ChildKind,
    url: &str,
    stream: &str,
    entries: u64,
) -> anyhow::Result<ChildRun> {
    let kind = match kind {
        ChildKind::Raw => "raw",
        ChildKind::Consume => "consume",
        ChildKind::Prefill | ChildKind::Compete => {
            bail!("a {kind:?} child does not report a consume run")
        }
    };
    let exe = std::env::current_exe().context("finding this benchmark's binary")?;
    let entries_arg = entries.to_string();
    let mut child = tokio::process::Command::new(exe);
    child
        .args(["--child", kind, "--url", url, "--stream", stream])
        .args(["--entries", &entries_arg])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let limit = STEP * 2 + Duration::from_millis(entries / 2);
    let output = bounded("the child process", limit, child.output())
        .await?
        .context("running the child process")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!("the {kind} child failed ({}): {stdout}", output.status);
    }
    stdout
        .lines()
        .find_map(parse_report)
        .ok_or_else(|| anyhow!("the {kind} child printed no result: {stdout:?}"))
}

fn parse_report(line: &str) -> Option<ChildRun> {
    let mut words = line.split_whitespace();
    if words.next()? != RESULT_PREFIX {
        return None;
    }
    let (mut handled, mut seconds, mut vm_hwm_kib) = (None, None, None);
    for word in words {
        match word.split_once('=')? {
            ("handled", v) => handled = v.parse().ok(),
            ("seconds", v) => seconds = v.parse().ok(),
            ("vm_hwm_kib", v) => vm_hwm_kib = v.parse().ok(),
            _ => {}
        }
    }
    Some(ChildRun {
        handled: handled?,
        seconds: seconds?,
        vm_hwm_kib: vm_hwm_kib?,
    })
}

/// The child's `main`: consume (or fill) the stream, then print the report line.
pub(crate) fn child_main(args: ChildArgs) -> ExitCode {
    crate::init_tracing();
    let runtime = match crate::runtime() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(child(&args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {:?} child: {error:#}", args.kind);
            ExitCode::FAILURE
        }
    }
}

async fn child(args: &ChildArgs) -> anyhow::Result<()> {
    let (handled, elapsed) = match args.kind {
        ChildKind::Compete => return crate::compete::child(args).await,
        ChildKind::Prefill => {
            let mut conn = raw::connect(&args.url).await?;
            raw::prefill(&mut conn, &args.stream, args.entries, false).await?;
            raw::create_group(&mut conn, &args.stream).await?;
            println!("filled {} with {} entries", args.stream, args.entries);
            return Ok(());
        }
        ChildKind::Raw => {
            let mut conn = raw::connect(&args.url).await?;
            let elapsed = raw::consume(&mut conn, &args.stream, args.entries).await?;
            (args.entries, elapsed)
        }
        ChildKind::Consume => {
            let settings = ConsumeSettings {
                max_concurrent: 64,
                ..ConsumeSettings::default()
            };
            let run = bus::consume(&args.url, &args.stream, args.entries, &settings).await?;
            (run.handled, run.elapsed)
        }
    };
    let vm_hwm_kib = vm_hwm_kib()?;
    println!(
        "{RESULT_PREFIX} handled={handled} seconds={} vm_hwm_kib={vm_hwm_kib}",
        elapsed.as_secs_f64()
    );
    Ok(())
}

/// This process's peak resident set size (`VmHWM` in `/proc/self/status`), in KiB.
fn vm_hwm_kib() -> anyhow::Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
        .ok_or_else(|| anyhow!("/proc/self/status has no VmHWM line"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_lines_round_trip() {
        assert_eq!(
            parse_report("child-result handled=5 seconds=0.25 vm_hwm_kib=9000"),
            Some(ChildRun {
                handled: 5,
                seconds: 0.25,
                vm_hwm_kib: 9000
            })
        );
        assert_eq!(parse_report("something else"), None);
        assert_eq!(parse_report("child-result handled=5"), None);
    }

    #[test]
    fn this_process_has_a_peak_rss() {
        let kib = vm_hwm_kib().expect("linux reports VmHWM");
        assert!(kib > 0);
    }
}
