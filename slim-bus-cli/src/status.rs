//! `slim-bus status`: streams, their consumer groups and dead letters.

use std::io::IsTerminal as _;

use slim_bus::{EventBus, StreamStatus};

use crate::args::StatusArgs;
use crate::exit::Outcome;
use crate::interrupt::CtrlC;
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

async fn show(bus: &EventBus, args: &StatusArgs, json: bool, in_place: bool) -> Outcome {
    let mut statuses = Vec::with_capacity(args.streams.len());
    for stream in &args.streams {
        let mut status = bus.stream_status(stream).await?;
        if let Some(group) = &args.group {
            status.groups.retain(|g| &g.name == group);
        }
        statuses.push(status);
    }
    if json {
        return print_json(&statuses);
    }
    let mut out = String::new();
    if in_place {
        out.push_str(CLEAR);
    }
    for (index, status) in statuses.iter().enumerate() {
        if index > 0 {
            out.push('\n');
        }
        out.push_str(&render(status, args.group.as_deref()));
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
