//! `slim-bus asyncapi --from-bin`: the AsyncAPI document of a service, from its own
//! binary, which writes it when `SLIM_BUS_ASYNCAPI` names a file.

use std::process::Stdio;

use serde_json::Value;

use crate::args::AsyncApiArgs;
use crate::exit::{Failure, Outcome};
use crate::output;

pub(crate) async fn from_bin(args: &AsyncApiArgs) -> Outcome {
    let bin = args.from_bin.display();
    // A directory of its own (a random name, mode 0700), so that no other user can
    // predict the path, put a link there or read the document; removed when dropped.
    // tempfile leaves the mode to the umask unless told.
    let mut builder = tempfile::Builder::new();
    builder.prefix("slim-bus-asyncapi-");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        builder.permissions(std::fs::Permissions::from_mode(0o700));
    }
    let dir = builder
        .tempdir()
        .map_err(|e| Failure::Error(format!("cannot create a temporary directory: {e}")))?;
    let path = dir.path().join("asyncapi.json");
    // The service's own output goes to stderr, so that stdout holds the document only.
    let mut child = tokio::process::Command::new(&args.from_bin)
        .args(&args.args)
        .env(slim_bus::ASYNCAPI_ENV, &path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| Failure::Error(format!("cannot run {bin}: {e}")))?;
    let status = match tokio::time::timeout(args.wait, child.wait()).await {
        Ok(status) => status?,
        Err(_) => {
            let _ = child.kill().await;
            return Err(Failure::Error(format!(
                "{bin} did not exit within {}: does it build its EventBus before it waits for anything else?",
                humantime::format_duration(args.wait)
            )));
        }
    };
    let written = std::fs::read(&path);
    drop(dir);
    let text = match written {
        Ok(text) => text,
        Err(_) => {
            return Err(Failure::Error(format!(
                "{bin} exited ({status}) without writing an AsyncAPI document: does it build an EventBus of slim-bus?"
            )));
        }
    };
    if !status.success() {
        return Err(Failure::Error(format!("{bin} failed ({status})")));
    }
    let document: Value = serde_json::from_slice(&text)
        .map_err(|e| Failure::Error(format!("{bin} wrote a document that is not JSON: {e}")))?;
    output::println(&serde_json::to_string_pretty(&document)?)
}
