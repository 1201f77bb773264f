//! `slim-bus dlq`: list, show, replay and purge the dead letters of a stream, through
//! the library's [`DeadLetters`].

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use serde::Serialize;
use slim_bus::{DeadLetter, DeadLetters, EntryId, EventBus};

use crate::args::{DlqCommand, Selection};
use crate::exit::{Failure, Outcome};
use crate::output::{self, print_json};
use crate::table::{self, Table};

pub(crate) async fn run(bus: &EventBus, command: DlqCommand, json: bool) -> Outcome {
    match command {
        DlqCommand::List {
            stream,
            limit,
            after,
        } => list(&bus.dead_letters(&stream), limit, after, json).await,
        DlqCommand::Show { stream, id } => show(&bus.dead_letters(&stream), id, json).await,
        DlqCommand::Replay(selection) => {
            replay(&bus.dead_letters(&selection.stream), &selection, json).await
        }
        DlqCommand::Purge(selection) => {
            purge(&bus.dead_letters(&selection.stream), &selection, json).await
        }
    }
}

async fn list(dead: &DeadLetters, limit: usize, after: Option<EntryId>, json: bool) -> Outcome {
    let letters = dead.list(after, limit).await?;
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

async fn show(dead: &DeadLetters, id: EntryId, json: bool) -> Outcome {
    let Some(letter) = dead.get(id).await? else {
        return Err(not_found(dead, &[id]));
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

/// What `dlq replay` did, as `--json` prints it.
#[derive(Serialize)]
struct Replayed {
    /// Each dead letter replayed, with the id of its new entry in the origin stream.
    replayed: Vec<ReplayedLetter>,
    /// `--all`: how many were replayed.
    count: usize,
}

#[derive(Serialize)]
struct ReplayedLetter {
    id: String,
    new_id: String,
}

async fn replay(dead: &DeadLetters, selection: &Selection, json: bool) -> Outcome {
    confirm(dead, selection, "replay", "replayed").await?;
    if selection.all {
        let count = dead.replay_all().await?;
        if json {
            return print_json(&Replayed {
                replayed: Vec::new(),
                count,
            });
        }
        return output::println(&format!(
            "replayed {count} dead letters to `{}`",
            dead.origin()
        ));
    }
    let mut replayed = Vec::new();
    let mut missing = Vec::new();
    for &id in &selection.ids {
        match dead.replay(id).await? {
            Some(new_id) => replayed.push(ReplayedLetter {
                id: id.to_string(),
                new_id: new_id.to_string(),
            }),
            None => missing.push(id),
        }
    }
    if json {
        let count = replayed.len();
        print_json(&Replayed { replayed, count })?;
    } else {
        for letter in &replayed {
            output::println(&format!(
                "replayed {} to `{}` as {}",
                letter.id,
                dead.origin(),
                letter.new_id
            ))?;
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(not_found(dead, &missing))
    }
}

/// What `dlq purge` did, as `--json` prints it.
#[derive(Serialize)]
struct Purged {
    /// How many dead letters were deleted.
    count: u64,
}

async fn purge(dead: &DeadLetters, selection: &Selection, json: bool) -> Outcome {
    confirm(dead, selection, "purge", "purged").await?;
    let (count, missing) = if selection.all {
        let count = dead.len().await?;
        dead.purge_all().await?;
        (count, Vec::new())
    } else {
        let mut count = 0;
        let mut missing = Vec::new();
        for &id in &selection.ids {
            if dead.purge(id).await? {
                count += 1;
            } else {
                missing.push(id);
            }
        }
        (count, missing)
    };
    if json {
        print_json(&Purged { count })?;
    } else {
        output::println(&format!(
            "purged {count} dead letters from {}",
            dead.stream()
        ))?;
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(not_found(dead, &missing))
    }
}

/// Asks on a terminal whether to go on, unless `--yes`; refuses without a terminal.
async fn confirm(dead: &DeadLetters, selection: &Selection, verb: &str, done: &str) -> Outcome {
    if selection.yes {
        return Ok(());
    }
    let what = if selection.all {
        format!(
            "all {} dead letters of `{}` ({})",
            dead.len().await?,
            dead.origin(),
            dead.stream()
        )
    } else {
        format!(
            "{} dead letter(s) of `{}` ({})",
            selection.ids.len(),
            dead.origin(),
            dead.stream()
        )
    };
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

fn not_found(dead: &DeadLetters, ids: &[EntryId]) -> Failure {
    let ids: Vec<String> = ids.iter().map(EntryId::to_string).collect();
    Failure::NotFound(format!(
        "no dead letter {} in {}",
        ids.join(", "),
        dead.stream()
    ))
}
