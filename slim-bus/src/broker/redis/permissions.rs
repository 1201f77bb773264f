//! Permissions checked when `listen()` starts: each command the bus sends later, at its
//! first claim scan or its first dead letter, is sent once in a form that changes nothing,
//! so that a user lacking one fails `listen()` naming the command and the key, not minutes
//! later.

use redis::Value;

use super::RedisBroker;
use crate::broker::NO_PERMISSION;
use crate::error::{Error, Result, server_code};

/// A script sha that no server holds: `EVALSHA` of it answers `NOSCRIPT` once permitted.
const UNKNOWN_SCRIPT: &str = "0000000000000000000000000000000000000000";

/// The longest idle time Redis takes: `XAUTOCLAIM` and `XCLAIM` with it claim nothing.
const NEVER_IDLE_ENOUGH: &str = "9223372036854775807";

impl RedisBroker {
    /// Sends, for `stream` and its dead-letter stream, the commands that the claim scan
    /// and the dead-letter move send, each in a form without effect: `XAUTOCLAIM` and
    /// `XCLAIM` with an idle time no entry has, `XADD` of the id `0-0` (which Redis refuses
    /// after the ACL check, before it looks at the key) and `EVALSHA` of an unknown script.
    /// A `NOPERM` fails with the command and the key; any other reply means permitted.
    pub(super) async fn check_permissions_of(
        &self,
        stream: &str,
        dead_letters: &str,
        group: &str,
        consumer: &str,
    ) -> Result<()> {
        let mut xautoclaim = redis::cmd("XAUTOCLAIM");
        xautoclaim
            .arg(stream)
            .arg(group)
            .arg(consumer)
            .arg(NEVER_IDLE_ENOUGH)
            .arg("0-0")
            .arg("COUNT")
            .arg(1)
            .arg("JUSTID");
        let mut xclaim = redis::cmd("XCLAIM");
        xclaim
            .arg(stream)
            .arg(group)
            .arg(consumer)
            .arg(NEVER_IDLE_ENOUGH)
            .arg("0-0")
            .arg("JUSTID");
        let mut xadd = redis::cmd("XADD");
        xadd.arg(dead_letters)
            .arg("0-0")
            .arg("slim-bus")
            .arg("check");
        // The dead-letter move is a script on the stream's keys: its key is the stream's,
        // so that a cluster sends it to the stream's master.
        let mut evalsha = redis::cmd("EVALSHA");
        evalsha.arg(UNKNOWN_SCRIPT).arg(1).arg(stream);
        let probes = [
            ("XAUTOCLAIM", stream, xautoclaim),
            ("XCLAIM", stream, xclaim),
            ("XADD", dead_letters, xadd),
            ("EVALSHA", stream, evalsha),
        ];
        for (command, key, probe) in probes {
            match probe.query_async::<Value>(&mut self.commands()).await {
                Ok(_) => {}
                Err(error) if server_code(&error).as_deref() == Some(NO_PERMISSION) => {
                    return Err(Error::redis(
                        format!(
                            "checking that this user may run {command} on key `{key}` (the bus needs it to claim entries and to dead-letter them)"
                        ),
                        error,
                    ));
                }
                // NOSCRIPT, the refused id, NOGROUP: the command passed the ACL check.
                Err(error) if matches!(error.kind(), redis::ErrorKind::Server(_)) => {}
                Err(error) => {
                    return Err(Error::redis(
                        format!("checking that this user may run {command} on key `{key}`"),
                        error,
                    ));
                }
            }
        }
        Ok(())
    }
}
