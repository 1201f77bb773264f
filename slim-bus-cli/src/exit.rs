//! What a command's failure means to a script: its exit code, and the one line it prints.

use std::fmt;
use std::process::ExitCode;

/// The exit codes, as `--help` lists them.
pub(crate) const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  error (Redis unreachable, a wrong URL or TLS file, a refused command, ...)
  2  usage error (unknown command or option, missing or invalid argument)
  3  not found (no such stream, consumer group or dead letter)
  4  refused: a destructive command needs --yes when stdin is not a terminal, or was
     not confirmed";

/// Why a command failed.
#[derive(Debug)]
pub(crate) enum Failure {
    /// Something named does not exist.
    NotFound(String),
    /// A destructive command was not confirmed.
    Refused(String),
    /// Redis could not be reached, did not answer in time, or refused a command.
    Redis(String),
    /// Any other error, e.g. from the bus.
    Error(String),
    /// The reader of stdout went away (`slim-bus tail s | head -1`): the command ends
    /// quietly with success, as `head`-style pipelines expect.
    StdoutClosed,
}

impl Failure {
    pub(crate) fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self {
            Failure::StdoutClosed => 0,
            Failure::Error(_) | Failure::Redis(_) => 1,
            Failure::NotFound(_) => 3,
            Failure::Refused(_) => 4,
        })
    }
}

impl Failure {
    /// The same failure, with `note` after its message.
    pub(crate) fn note(self, note: &str) -> Failure {
        match self {
            Failure::NotFound(message) => Failure::NotFound(format!("{message} ({note})")),
            Failure::Refused(message) => Failure::Refused(format!("{message} ({note})")),
            Failure::Error(message) => Failure::Error(format!("{message} ({note})")),
            Failure::Redis(message) => Failure::Redis(format!("{message} ({note})")),
            Failure::StdoutClosed => Failure::StdoutClosed,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::NotFound(message)
            | Failure::Refused(message)
            | Failure::Error(message)
            | Failure::Redis(message) => f.write_str(message),
            Failure::StdoutClosed => f.write_str("stdout is closed"),
        }
    }
}

impl From<slim_bus::Error> for Failure {
    fn from(error: slim_bus::Error) -> Self {
        let message = report(&error);
        match error {
            slim_bus::Error::StreamNotFound { .. } | slim_bus::Error::GroupNotFound { .. } => {
                Failure::NotFound(message)
            }
            slim_bus::Error::Redis { .. } | slim_bus::Error::Timeout { .. } => {
                Failure::Redis(message)
            }
            _ => Failure::Error(message),
        }
    }
}

impl From<std::io::Error> for Failure {
    fn from(error: std::io::Error) -> Self {
        Failure::Error(report(&error))
    }
}

impl From<serde_json::Error> for Failure {
    fn from(error: serde_json::Error) -> Self {
        Failure::Error(report(&error))
    }
}

/// An error and its sources on one line, `outer: inner: ...`, without repeating a source
/// whose text is in the line already.
fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line.replace('\n', " ")
}

/// What commands return.
pub(crate) type Outcome = Result<(), Failure>;
