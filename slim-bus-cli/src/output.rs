//! What commands print on stdout, written so that a reader that went away (`| head -1`)
//! ends the command quietly instead of with a panic or an error.

use std::io::Write as _;

use crate::exit::{Failure, Outcome};

/// Writes `text` to stdout as it is, and flushes it.
///
/// # Errors
///
/// [`Failure::StdoutClosed`] when the reader of stdout is gone, and other write errors.
pub(crate) fn print(text: &str) -> Outcome {
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
        .map_err(|error| match error.kind() {
            std::io::ErrorKind::BrokenPipe => Failure::StdoutClosed,
            _ => Failure::from(error),
        })
}

/// Writes `line` and a newline to stdout.
pub(crate) fn println(line: &str) -> Outcome {
    print(&format!("{line}\n"))
}

/// Prints `value` as one line of JSON.
pub(crate) fn print_json(value: &impl serde::Serialize) -> Outcome {
    println(&serde_json::to_string(value)?)
}
