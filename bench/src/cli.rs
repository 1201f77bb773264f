//! Command-line and environment options.
//!
//! `cargo bench` runs the target with `--bench` appended to the user's arguments; `cargo
//! test` and nextest run it without, which selects the smoke run (nextest first asks for the
//! test list with `--list`).

use crate::cases::{Case, Sizes};

pub(crate) const USAGE: &str = "\
usage: cargo bench -p slim-bus-bench -- [--reps N] [--cases LIST] [--quick] [CASE...]

  --reps N       repetitions; cases are interleaved within each (default 3, 1 with --quick)
  --cases LIST   comma-separated case or group names (default all)
  --quick        a tenth of the full sizes, for a quick look
  CASE...        the same as --cases

environment: BENCH_REPS, BENCH_CASES, BENCH_QUICK=1 (arguments win);
             REDIS_URL=redis://HOST:PORT/ uses that server instead of starting a throwaway
             redis-server (the suite only touches keys named slim-bus-bench:*; the *-tls
             cases need the throwaway server, which then also listens with TLS)

cases:  baseline consume poison transient cpu-1 cpu-2 io-64 io-512 publish-raw
        publish-raw-seq publish-seq publish-64 publish-batch latency-raw latency rss-raw
        rss rss-backlog compete compete-cluster baseline-tls consume-tls publish-raw-tls
        publish-64-tls
groups: all failures (consume poison transient) cpu io publish memory
        tls (the *-tls cases and the plain ones they compare with)
        cluster (compete-cluster, on a throwaway 3-master Redis Cluster, with baseline
        and compete)";

/// What the process was started to do.
#[derive(Debug, PartialEq)]
pub(crate) enum Mode {
    /// `cargo bench`: the suite.
    Bench(Options),
    /// `cargo test` or nextest running the bench target: every case once at tiny sizes.
    Smoke(Options),
    /// nextest's `--list`; `ignored` asks for the ignored tests, of which there are none.
    List {
        ignored: bool,
    },
    /// A test filter that does not match the smoke test: nothing to do.
    Nothing,
    /// A child process the suite started to measure a consumer on its own.
    Child(ChildArgs),
    Help,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Options {
    pub(crate) reps: usize,
    pub(crate) cases: Vec<Case>,
    pub(crate) sizes: Sizes,
    pub(crate) redis_url: Option<String>,
}

/// `--child KIND --url URL --stream NAME --entries N`, or `--cluster SEED` for `--url`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChildArgs {
    pub(crate) kind: ChildKind,
    /// The server, or with `cluster` a seed node of the cluster.
    pub(crate) url: String,
    /// `--cluster SEED` instead of `--url URL`: the bus runs on a Redis Cluster (the
    /// `compete` child only).
    pub(crate) cluster: bool,
    pub(crate) stream: String,
    pub(crate) entries: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChildKind {
    /// Consume the stream with the hand-written loop.
    Raw,
    /// Consume the stream with slim-bus.
    Consume,
    /// Fill the stream and create the group (for profiling a `consume` child by hand).
    Prefill,
    /// One of the competing consumer processes of the `compete` case (`--entries` is its
    /// index, naming its consumer).
    Compete,
}

/// The name nextest and `cargo test` filters see.
pub(crate) const SMOKE_TEST: &str = "smoke";

pub(crate) fn parse(args: &[String], env: impl Fn(&str) -> Option<String>) -> Result<Mode, String> {
    if args.first().map(String::as_str) == Some("--child") {
        return parse_child(&args[1..]).map(Mode::Child);
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        return Ok(Mode::Help);
    }
    let redis_url = env("REDIS_URL").filter(|url| !url.trim().is_empty());
    if !args.iter().any(|a| a == "--bench") {
        return Ok(parse_test_mode(args, redis_url));
    }

    let mut reps = env("BENCH_REPS");
    let mut case_words: Vec<String> = env("BENCH_CASES")
        .map(|list| split_list(&list))
        .unwrap_or_default();
    let mut quick = env("BENCH_QUICK").is_some_and(|v| !v.is_empty() && v != "0");
    let mut from_args: Vec<String> = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag, Some(value.to_owned())),
            _ => (arg.as_str(), None),
        };
        let mut value = |name: &str| {
            inline
                .clone()
                .or_else(|| args.next().cloned())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match flag {
            "--bench" => {}
            "--quick" => quick = true,
            "--reps" => reps = Some(value("--reps")?),
            "--cases" => from_args.extend(split_list(&value("--cases")?)),
            other if other.starts_with('-') => {
                return Err(format!("unknown option `{other}`\n\n{USAGE}"));
            }
            word => from_args.extend(split_list(word)),
        }
    }
    if !from_args.is_empty() {
        case_words = from_args;
    }
    let reps = match reps {
        Some(reps) => match reps.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("--reps takes a positive number, not `{reps}`")),
        },
        None if quick => 1,
        None => 3,
    };
    Ok(Mode::Bench(Options {
        reps,
        cases: cases(&case_words)?,
        sizes: if quick { Sizes::QUICK } else { Sizes::FULL },
        redis_url,
    }))
}

/// libtest's interface, as far as nextest and `cargo test` use it.
fn parse_test_mode(args: &[String], redis_url: Option<String>) -> Mode {
    let ignored = args.iter().any(|a| a == "--ignored");
    if args.iter().any(|a| a == "--list") {
        return Mode::List { ignored };
    }
    let exact = args.iter().any(|a| a == "--exact");
    let mut filters = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // Options of libtest that take a value.
            "--skip" | "--test-threads" | "--color" | "--format" | "-Z" | "--logfile" => {
                args.next();
            }
            a if a.starts_with('-') => {}
            filter => filters.push(filter),
        }
    }
    let matches = filters.is_empty()
        || filters.iter().any(|f| {
            if exact {
                *f == SMOKE_TEST
            } else {
                SMOKE_TEST.contains(f)
            }
        });
    if ignored || !matches {
        return Mode::Nothing;
    }
    Mode::Smoke(Options {
        reps: 1,
        cases: Case::ALL.to_vec(),
        sizes: Sizes::SMOKE,
        redis_url,
    })
}

fn parse_child(args: &[String]) -> Result<ChildArgs, String> {
    let mut kind = None;
    let mut url = None;
    let mut cluster = false;
    let mut stream = None;
    let mut entries = None;
    let mut args = args.iter();
    if let Some(word) = args.next() {
        kind = Some(match word.as_str() {
            "raw" => ChildKind::Raw,
            "consume" => ChildKind::Consume,
            "prefill" => ChildKind::Prefill,
            "compete" => ChildKind::Compete,
            other => return Err(format!("unknown child kind `{other}`")),
        });
    }
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .cloned()
            .ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => url = Some(value),
            "--cluster" => {
                url = Some(value);
                cluster = true;
            }
            "--stream" => stream = Some(value),
            "--entries" => {
                entries = Some(
                    value
                        .parse()
                        .map_err(|_| format!("--entries takes a number, not `{value}`"))?,
                );
            }
            "--bench" => {}
            other => return Err(format!("unknown child option `{other}`")),
        }
    }
    Ok(ChildArgs {
        kind: kind.ok_or("--child needs a kind: raw, consume, prefill or compete")?,
        url: url.ok_or("--child needs --url or --cluster")?,
        cluster,
        stream: stream.ok_or("--child needs --stream")?,
        entries: entries.ok_or("--child needs --entries")?,
    })
}

fn split_list(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The selected cases in suite order, each once.
fn cases(words: &[String]) -> Result<Vec<Case>, String> {
    if words.is_empty() {
        return Ok(Case::ALL.to_vec());
    }
    let mut selected = Vec::new();
    for word in words {
        let cases =
            Case::select(word).ok_or_else(|| format!("unknown case `{word}`\n\n{USAGE}"))?;
        selected.extend(cases);
    }
    Ok(Case::ALL
        .into_iter()
        .filter(|case| selected.contains(case))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_owned).collect()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn bench(line: &str, env: impl Fn(&str) -> Option<String>) -> Options {
        match parse(&args(line), env) {
            Ok(Mode::Bench(options)) => options,
            other => panic!("{line:?} parsed as {other:?}"),
        }
    }

    #[test]
    fn cargo_bench_defaults_to_every_case_three_times_at_full_size() {
        let options = bench("--bench", no_env);
        assert_eq!(options.reps, 3);
        assert_eq!(options.cases, Case::ALL.to_vec());
        assert_eq!(options.sizes, Sizes::FULL);
    }

    #[test]
    fn cases_reps_and_quick_come_from_args_in_suite_order() {
        let options = bench("--reps 5 --cases consume,baseline --quick --bench", no_env);
        assert_eq!(options.reps, 5);
        assert_eq!(options.cases, vec![Case::Baseline, Case::Consume]);
        assert_eq!(options.sizes, Sizes::QUICK);
        let options = bench("--reps=2 memory --bench", no_env);
        assert_eq!(options.reps, 2);
        assert_eq!(
            options.cases,
            vec![Case::RssRaw, Case::Rss, Case::RssBacklog]
        );
    }

    #[test]
    fn env_sets_what_args_leave_open() {
        let env = |name: &str| match name {
            "BENCH_REPS" => Some("4".to_owned()),
            "BENCH_CASES" => Some("latency".to_owned()),
            "BENCH_QUICK" => Some("1".to_owned()),
            _ => None,
        };
        let options = bench("--bench", env);
        assert_eq!((options.reps, options.cases), (4, vec![Case::Latency]));
        assert_eq!(options.sizes, Sizes::QUICK);
        assert_eq!(
            bench("--reps 2 poison --bench", env).cases,
            vec![Case::Poison]
        );
    }

    #[test]
    fn bad_options_are_errors() {
        assert!(parse(&args("--reps 0 --bench"), no_env).is_err());
        assert!(parse(&args("--cases nope --bench"), no_env).is_err());
        assert!(parse(&args("--frobnicate --bench"), no_env).is_err());
    }

    #[test]
    fn test_mode_lists_and_runs_the_smoke_test() {
        assert_eq!(
            parse(&args("--list --format terse"), no_env),
            Ok(Mode::List { ignored: false })
        );
        assert!(matches!(
            parse(&args("smoke --exact --nocapture"), no_env),
            Ok(Mode::Smoke(_))
        ));
        assert!(matches!(parse(&[], no_env), Ok(Mode::Smoke(_))));
        assert_eq!(parse(&args("some_other_test"), no_env), Ok(Mode::Nothing));
        assert_eq!(parse(&args("--ignored"), no_env), Ok(Mode::Nothing));
    }

    #[test]
    fn child_args_parse() {
        let mode = parse(
            &args("--child consume --url redis://x/ --stream s --entries 10"),
            no_env,
        );
        assert_eq!(
            mode,
            Ok(Mode::Child(ChildArgs {
                kind: ChildKind::Consume,
                url: "redis://x/".to_owned(),
                cluster: false,
                stream: "s".to_owned(),
                entries: 10,
            }))
        );
        assert!(parse(&args("--child consume --url u"), no_env).is_err());
        let Ok(Mode::Child(on_cluster)) = parse(
            &args("--child compete --cluster redis://seed/ --stream s --entries 1"),
            no_env,
        ) else {
            panic!("--cluster does not parse");
        };
        assert_eq!(
            (on_cluster.url.as_str(), on_cluster.cluster),
            ("redis://seed/", true)
        );
    }
}
