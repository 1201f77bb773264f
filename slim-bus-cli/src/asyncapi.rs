//! `slim-bus asyncapi --from-bin`: the AsyncAPI document of a service, from its own
//! binary, which writes it when `SLIM_BUS_ASYNCAPI` names a file.

use std::process::Stdio;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::args::AsyncApiArgs;
use crate::exit::{Failure, Outcome};

pub(crate) async fn from_bin(args: &AsyncApiArgs) -> Outcome {
    let bin = args.from_bin.display();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    let path = std::env::temp_dir().join(format!(
        "slim-bus-asyncapi-{}-{nanos}.json",
        std::process::id()
    ));
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
    let _ = std::fs::remove_file(&path);
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
    println!("{}", serde_json::to_string_pretty(&document)?);
    Ok(())
}
