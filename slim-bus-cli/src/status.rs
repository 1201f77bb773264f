//! `slim-bus status`: streams, their consumer groups and dead letters.

use std::io::IsTerminal as _;

use slim_bus::{EventBus, StreamStatus};

use crate::args::StatusArgs;
use crate::exit::Outcome;
use crate::interrupt::CtrlC;
use crate::lookup;
use crate::output::{self, print_json};
use crate::table::{self, Table};

/// Clears a terminal and moves the cursor home, so that `--watch` refreshes in place.
const CLEAR: &str = "\x1b[H\x1b[2J";

pub(crate) async fn run(bus: &EventBus, args: &StatusArgs, json: bool) -> Outcome {
    if !args.watch {
        return show(bus, args, json, false).await;
    }
    let in_place = !json && std::io::stdout().is_terminal();
    let mut ctrl_c = CtrlC::listen()?;
    loop {
        // Ctrl-C also ends a refresh that waits on a server that does not answer.
        tokio::select! {
            () = ctrl_c.pressed() => return Ok(()),
            shown = show(bus, args, json, in_place) => shown?,
        }
        tokio::select! {
            () = ctrl_c.pressed() => return Ok(()),
            () = tokio::time::sleep(args.interval) => {}
        }
    }
}

/// What one name on the command line shows.
enum Shown {
    Stream(StreamStatus),
    /// The logical name of a partitioned stream, and each partition's status.
    Partitioned(String, Vec<StreamStatus>),
}

async fn show(bus: &EventBus, args: &StatusArgs, json: bool, in_place: bool) -> Outcome {
    let mut shown = Vec::with_capacity(args.streams.len());
    for stream in &args.streams {
        shown.push(match bus.stream_status(stream).await {
            Ok(status) => Shown::Stream(status),
            Err(not_found @ slim_bus::Error::StreamNotFound { .. }) => {
                let partitions = lookup::partitions(bus, stream).await?;
                if partitions.is_empty() {
                    return Err(not_found.into());
                }
                Shown::Partitioned(stream.clone(), partitions)
            }
            Err(error) => return Err(error.into()),
        });
    }
    for status in shown.iter_mut().flat_map(|shown| match shown {
        Shown::Stream(status) => std::slice::from_mut(status),
        Shown::Partitioned(_, partitions) => partitions.as_mut_slice(),
    }) {
        if let Some(group) = &args.group {
            status.groups.retain(|g| &g.name == group);
        }
    }
    if json {
        // One status per Redis stream: each partition's, in place of its logical name.
        let statuses: Vec<&StreamStatus> = shown
            .iter()
            .flat_map(|shown| match shown {
                Shown::Stream(status) => std::slice::from_ref(status),
                Shown::Partitioned(_, partitions) => partitions.as_slice(),
            })
            .collect();
        return print_json(&statuses);
    }
    let mut out = String::new();
    if in_place {
        out.push_str(CLEAR);
    }
    for (index, shown) in shown.iter().enumerate() {
        if index > 0 {
            out.push('\n');
        }
        match shown {
            Shown::Stream(status) => out.push_str(&render(status, args.group.as_deref())),
            Shown::Partitioned(stream, partitions) => {
                let names: Vec<&str> = partitions.iter().map(|p| p.stream.as_str()).collect();
                out.push_str(&format!(
                    "partitioned stream {stream}: {} partitions, {}\n",
                    names.len(),
                    match names.as_slice() {
                        [first, .., last] => format!("{first} ... {last}"),
                        _ => names.join(""),
                    }
                ));
                for status in partitions {
                    out.push('\n');
                    out.push_str(&render(status, args.group.as_deref()));
                }
            }
        }
    }
    output::print(&out)
}

fn render(status: &StreamStatus, group: Option<&str>) -> String {
    let mut out = format!(
        "stream {}: {} entries (newest {}), {} dead letters in {}\n",
        status.stream,
        status.length,
        table::or_dash(status.last_entry_id),
        status.dead_letters,
        status.dead_letter_stream,
    );
    if status.groups.is_empty() {
        match group {
            Some(group) => out.push_str(&format!("no consumer group `{group}`\n")),
            None => out.push_str("no consumer groups\n"),
        }
        return out;
    }
    let mut groups = Table::new(&[
        "GROUP",
        "LAG",
        "PENDING",
        "OLDEST PENDING",
        "LAST DELIVERED",
        "CONSUMERS",
    ]);
    let mut consumers = Table::new(&["CONSUMER", "GROUP", "PENDING", "IDLE"]);
    for group in &status.groups {
        groups.row(vec![
            group.name.clone(),
            table::or_dash(group.lag),
            group.pending.to_string(),
            table::or_dash(group.oldest_pending_idle.map(table::duration)),
            group.last_delivered_id.to_string(),
            group.consumers.len().to_string(),
        ]);
        for consumer in &group.consumers {
            consumers.row(vec![
                consumer.name.clone(),
                group.name.clone(),
                consumer.pending.to_string(),
                table::duration(consumer.idle),
            ]);
        }
    }
    out.push_str(&groups.render());
    if status
        .groups
        .iter()
        .any(|group| !group.consumers.is_empty())
    {
        out.push('\n');
        out.push_str(&consumers.render());
    }
    out
}
