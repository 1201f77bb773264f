//! `slim-bus dlq`: list, show, replay and purge the dead letters of a stream, through
//! the library's [`DeadLetters`].

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use serde::Serialize;
use slim_bus::{DeadLetter, DeadLetters, EntryId, EventBus};

use crate::args::{DlqCommand, Selection};
use crate::exit::{Failure, Outcome};
use crate::lookup;
use crate::output::{self, print_json};
use crate::table::{self, Table};

pub(crate) async fn run(bus: &EventBus, command: DlqCommand, json: bool) -> Outcome {
    match command {
        DlqCommand::List {
            stream,
            limit,
            after,
        } => list(bus, &bus.dead_letters(&stream), limit, after, json).await,
        DlqCommand::Show { stream, id } => show(bus, &bus.dead_letters(&stream), id, json).await,
        DlqCommand::Replay(selection) => {
            replay(bus, &bus.dead_letters(&selection.stream), &selection, json).await
        }
        DlqCommand::Purge(selection) => {
            purge(bus, &bus.dead_letters(&selection.stream), &selection, json).await
        }
    }
}

async fn list(
    bus: &EventBus,
    dead: &DeadLetters,
    limit: usize,
    after: Option<EntryId>,
    json: bool,
) -> Outcome {
    let letters = dead.list(after, limit).await?;
    if letters.is_empty()
        && let Some(missing) = lookup::missing(bus, dead).await?
    {
        return Err(missing);
    }
    if json {
        return print_json(&letters);
    }
    if letters.is_empty() {
        return output::println(&format!("no dead letters in {}", dead.stream()));
    }
    let mut rows = Table::new(&[
        "ID",
        "ORIGIN ID",
        "REASON",
        "DELIVERIES",
        "FAILED AT",
        "GROUP",
        "ERROR",
    ]);
    for letter in &letters {
        rows.row(vec![
            letter.id.to_string(),
            table::or_dash(letter.origin_id),
            table::or_dash(letter.reason),
            letter.delivery_count.to_string(),
            table::or_dash(letter.failed_at.map(table::time)),
            letter.group.clone(),
            table::cut(&letter.error, 60),
        ]);
    }
    output::print(&rows.render())
}

async fn show(bus: &EventBus, dead: &DeadLetters, id: EntryId, json: bool) -> Outcome {
    let Some(letter) = dead.get(id).await? else {
        return Err(not_found(bus, dead, &[id]).await);
    };
    if json {
        return print_json(&letter);
    }
    output::print(&render(&letter))
}

fn render(letter: &DeadLetter) -> String {
    let mut meta = Table::new(&["id", &letter.id.to_string()]);
    meta.row(vec!["origin stream".into(), letter.origin_stream.clone()]);
    meta.row(vec!["origin id".into(), table::or_dash(letter.origin_id)]);
    meta.row(vec!["group".into(), letter.group.clone()]);
    meta.row(vec!["consumer".into(), letter.consumer.clone()]);
    meta.row(vec!["deliveries".into(), letter.delivery_count.to_string()]);
    meta.row(vec!["reason".into(), table::or_dash(letter.reason)]);
    meta.row(vec![
        "failed at".into(),
        table::or_dash(letter.failed_at.map(table::time)),
    ]);
    meta.row(vec!["error".into(), letter.error.replace('\n', " ")]);
    let mut out = meta.render();
    out.push_str("\nfields:\n");
    let mut fields = Table::new(&[]);
    for (name, value) in &letter.fields {
        fields.row(vec![
            format!("  {name}"),
            String::from_utf8_lossy(value).into_owned(),
        ]);
    }
    let rendered = fields.render();
    // The table's empty header is its first line.
    out.push_str(rendered.strip_prefix('\n').unwrap_or(&rendered));
    out
}

/// How many dead letters `--all` lists per page while it takes note of them.
const PAGE: usize = 1000;

/// How many purges of single dead letters are in flight at once (pipelined on one
/// connection).
const PURGES_IN_FLIGHT: usize = 32;

/// The dead letters a replay or purge acts on: those given with `--id`, or with `--all`
/// every dead letter there is now, listed before the confirmation so that what arrives
/// while the prompt waits is left alone. `Err` for `--all` on a stream that does not exist.
async fn selected(
    bus: &EventBus,
    dead: &DeadLetters,
    selection: &Selection,
) -> Result<Vec<EntryId>, Failure> {
    if !selection.all {
        return Ok(selection.ids.clone());
    }
    let mut ids = Vec::new();
    let mut after = None;
    loop {
        let page = dead.list(after, PAGE).await?;
        let Some(last) = page.last() else {
            break;
        };
        after = Some(last.id);
        ids.extend(page.iter().map(|letter| letter.id));
    }
    if ids.is_empty()
        && let Some(missing) = lookup::missing(bus, dead).await?
    {
        return Err(missing);
    }
    Ok(ids)
}

/// What `dlq replay` did, as `--json` prints it, also when it failed part way.
#[derive(Serialize)]
struct Replayed {
    /// Each dead letter replayed, with the id of its new entry in the origin stream.
    replayed: Vec<ReplayedLetter>,
    /// How many were replayed.
    count: usize,
    /// Those not found: ids given that are not dead letters, or with `--all` dead letters
    /// replayed or purged by someone else meanwhile.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    missing: Vec<String>,
    /// Why it stopped before the end; those not replayed are still dead letters.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
struct ReplayedLetter {
    id: String,
    new_id: String,
}

async fn replay(bus: &EventBus, dead: &DeadLetters, selection: &Selection, json: bool) -> Outcome {
    let ids = selected(bus, dead, selection).await?;
    if ids.is_empty() && json {
        return print_json(&Replayed {
            replayed: Vec::new(),
            count: 0,
            missing: Vec::new(),
            error: None,
        });
    }
    if ids.is_empty() {
        return done_nothing(dead, "replayed");
    }
    confirm(dead, selection, ids.len(), "replay", "replayed").await?;
    let mut replayed = Vec::new();
    let mut missing = Vec::new();
    let mut failed = None;
    // Once stdout is gone, the replay still goes on: it was confirmed, and stopping half
    // way would leave the operator to find out what was done.
    let mut printing = !json;
    for &id in &ids {
        match dead.replay(id).await {
            Ok(Some(new_id)) => {
                if printing {
                    printing = output::println(&format!(
                        "replayed {id} to `{}` as {new_id}",
                        dead.origin()
                    ))
                    .is_ok();
                }
                replayed.push(ReplayedLetter {
                    id: id.to_string(),
                    new_id: new_id.to_string(),
                });
            }
            Ok(None) => missing.push(id),
            Err(error) => {
                failed = Some(Failure::from(error).note(&format!(
                    "{} of {} replayed before it; the others are still in {}",
                    replayed.len(),
                    ids.len(),
                    dead.stream()
                )));
                break;
            }
        }
    }
    let count = replayed.len();
    // Only ids given that were not found: the error says all there is to say.
    let silent = count == 0 && failed.is_none() && !selection.all;
    if silent {
        // Nothing to print.
    } else if json {
        let _ = print_json(&Replayed {
            replayed,
            count,
            missing: missing.iter().map(EntryId::to_string).collect(),
            error: failed.as_ref().map(ToString::to_string),
        });
    } else if printing && selection.all {
        let _ = output::println(&format!(
            "replayed {count} dead letters to `{}`",
            dead.origin()
        ));
    }
    finish(bus, dead, selection, failed, &missing).await
}

/// What `dlq purge` did, as `--json` prints it, also when it failed part way.
#[derive(Serialize)]
struct Purged {
    /// How many dead letters were deleted.
    count: u64,
    /// Those not found, as in [`Replayed::missing`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    missing: Vec<String>,
    /// Why it stopped before the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

async fn purge(bus: &EventBus, dead: &DeadLetters, selection: &Selection, json: bool) -> Outcome {
    let ids = selected(bus, dead, selection).await?;
    if ids.is_empty() && json {
        return print_json(&Purged {
            count: 0,
            missing: Vec::new(),
            error: None,
        });
    }
    if ids.is_empty() {
        return done_nothing(dead, "purged");
    }
    confirm(dead, selection, ids.len(), "purge", "purged").await?;
    let mut count = 0;
    let mut missing = Vec::new();
    let mut failed = None;
    // One command per dead letter, so that only those noted are deleted; a batch of them
    // in flight at a time, each batch seen to its end, so that the count is exact when
    // one fails.
    for batch in ids.chunks(PURGES_IN_FLIGHT) {
        let purges = batch
            .iter()
            .map(|&id| async move { (id, dead.purge(id).await) });
        for (id, purged) in futures_util::future::join_all(purges).await {
            match purged {
                Ok(true) => count += 1,
                Ok(false) => missing.push(id),
                Err(error) => {
                    failed.get_or_insert(Failure::from(error));
                }
            }
        }
        if failed.is_some() {
            break;
        }
    }
    let failed = failed.map(|failure| {
        failure.note(&format!(
            "{count} of {} purged; the others are still in {}",
            ids.len(),
            dead.stream()
        ))
    });
    // Only ids given that were not found: the error says all there is to say.
    let silent = count == 0 && failed.is_none() && !selection.all;
    if silent {
        // Nothing to print.
    } else if json {
        let _ = print_json(&Purged {
            count,
            missing: missing.iter().map(EntryId::to_string).collect(),
            error: failed.as_ref().map(ToString::to_string),
        });
    } else {
        let _ = output::println(&format!(
            "purged {count} dead letters from {}",
            dead.stream()
        ));
    }
    finish(bus, dead, selection, failed, &missing).await
}

/// `--all` with no dead letters, in text: nothing to confirm, nothing done.
fn done_nothing(dead: &DeadLetters, done: &str) -> Outcome {
    output::println(&format!(
        "no dead letters in {}; nothing was {done}",
        dead.stream()
    ))
}

/// The outcome of a replay or purge once its result is printed: the error it stopped on,
/// or for ids given that were not found, which; gone dead letters noted by `--all` are not
/// an error (someone else replayed or purged them meanwhile).
async fn finish(
    bus: &EventBus,
    dead: &DeadLetters,
    selection: &Selection,
    failed: Option<Failure>,
    missing: &[EntryId],
) -> Outcome {
    match failed {
        Some(failure) => Err(failure),
        None if missing.is_empty() || selection.all => Ok(()),
        None => Err(not_found(bus, dead, missing).await),
    }
}

/// Asks on a terminal whether to go on with `count` dead letters, unless `--yes`; refuses
/// without a terminal.
async fn confirm(
    dead: &DeadLetters,
    selection: &Selection,
    count: usize,
    verb: &str,
    done: &str,
) -> Outcome {
    if selection.yes {
        return Ok(());
    }
    let what = format!(
        "{}{count} dead letter(s) of `{}` ({})",
        if selection.all { "all " } else { "" },
        dead.origin(),
        dead.stream()
    );
    if !std::io::stdin().is_terminal() {
        return Err(Failure::Refused(format!(
            "not confirmed: {verb} {what} needs --yes when stdin is not a terminal; nothing was {done}"
        )));
    }
    let mut stderr = std::io::stderr().lock();
    write!(stderr, "{verb} {what}? [y/N] ")?;
    stderr.flush()?;
    drop(stderr);
    let answer = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).map(|_| line)
    })
    .await
    .map_err(|e| Failure::Error(format!("reading the answer: {e}")))??;
    if matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes") {
        Ok(())
    } else {
        Err(Failure::Refused(format!(
            "not confirmed; nothing was {done}"
        )))
    }
}

/// No dead letters `ids`: because the stream does not exist (or is a partitioned
/// stream's logical name), or because there are no such dead letters.
async fn not_found(bus: &EventBus, dead: &DeadLetters, ids: &[EntryId]) -> Failure {
    // The dead letters' absence is the news; what the lookup failed on is not.
    if let Ok(Some(missing)) = lookup::missing(bus, dead).await {
        return missing;
    }
    let ids: Vec<String> = ids.iter().map(EntryId::to_string).collect();
    Failure::NotFound(format!(
        "no dead letter {} in {}",
        ids.join(", "),
        dead.stream()
    ))
}
