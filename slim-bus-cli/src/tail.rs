//! `slim-bus tail` and `slim-bus pending`: a stream's entries as they arrive, and what a
//! consumer group holds.

use std::io::Write as _;

use futures_util::StreamExt as _;
use slim_bus::{EventBus, StreamEntry};

use crate::args::{PendingArgs, TailArgs};
use crate::exit::{Failure, Outcome};
use crate::interrupt::CtrlC;
use crate::output::{self, print_json};
use crate::table::{self, Table};

pub(crate) async fn tail(bus: &EventBus, args: &TailArgs, json: bool) -> Outcome {
    let mut ctrl_c = CtrlC::listen()?;
    let entries = tokio::select! {
        () = ctrl_c.pressed() => return Ok(()),
        entries = bus.tail(&args.stream, args.from) => entries?,
    };
    let mut entries = std::pin::pin!(entries);
    let from = args
        .from
        .map_or_else(|| "new entries".to_owned(), |id| format!("after {id}"));
    // On stderr, so that stdout holds entries only; a script can wait for this line.
    let _ = writeln!(
        std::io::stderr(),
        "tailing `{}` from {from} (Ctrl-C to stop)",
        args.stream
    );
    loop {
        let entry = tokio::select! {
            () = ctrl_c.pressed() => return Ok(()),
            entry = entries.next() => entry,
        };
        match entry {
            Some(Ok(entry)) if json => print_json(&entry)?,
            Some(Ok(entry)) => print_entry(&entry)?,
            Some(Err(error)) => return Err(error.into()),
            None => return Ok(()),
        }
    }
}

/// `ID name=value name=value`, each value quoted when it holds spaces or quotes.
fn print_entry(entry: &StreamEntry) -> Outcome {
    let mut line = entry.id.to_string();
    for (name, value) in &entry.fields {
        let value = String::from_utf8_lossy(value);
        line.push(' ');
        line.push_str(name);
        line.push('=');
        if value.is_empty() || value.contains([' ', '"', '\n', '\t']) {
            line.push_str(&format!("{value:?}"));
        } else {
            line.push_str(&value);
        }
    }
    output::println(&line)
}

pub(crate) async fn pending(bus: &EventBus, args: &PendingArgs, json: bool) -> Outcome {
    let entries = bus
        .pending_entries(
            &args.stream,
            &args.group,
            args.consumer.as_deref(),
            args.limit,
        )
        .await
        .map_err(Failure::from)?;
    if json {
        return print_json(&entries);
    }
    if entries.is_empty() {
        return output::println(&format!(
            "nothing pending in group `{}` on `{}`",
            args.group, args.stream
        ));
    }
    let mut rows = Table::new(&["ID", "CONSUMER", "IDLE", "DELIVERIES"]);
    for entry in &entries {
        rows.row(vec![
            entry.id.to_string(),
            entry.consumer.clone(),
            table::duration(entry.idle),
            entry.delivery_count.to_string(),
        ]);
    }
    output::print(&rows.render())
}
