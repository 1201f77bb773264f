//! What the tests of the `slim-bus` binary share: running it against a throwaway
//! redis-server, reading its output, and a proxy that makes Redis stop answering.
// Each test binary uses its part.
#![allow(dead_code)]
use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slim_bus::{Context, EventBus, EventBusBuilder, HandlerError, StreamHandler};
use slim_bus_tests::{RedisServer, within};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

/// How long any single awaited step may take.
pub(crate) const STEP: Duration = Duration::from_secs(20);

pub(crate) async fn start_server() -> RedisServer {
    slim_bus_tests::init_tracing();
    within("redis-server to start", STEP, RedisServer::start())
        .await
        .expect("redis-server starts")
}

/// The binary with nothing taken from the environment that could say where Redis is;
/// stdin is not a terminal.
pub(crate) fn slim_bus_anywhere() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_slim-bus"));
    command
        .env_remove("REDIS_URL")
        .env_remove("REDIS_CLUSTER_NODES")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    command
}

/// The binary with `--url` set and nothing taken from the environment that could point
/// it elsewhere; stdin is not a terminal.
pub(crate) fn slim_bus(url: &str) -> Command {
    let mut command = slim_bus_anywhere();
    command.arg("--url").arg(url);
    command
}

/// Runs the binary with `args` to its end.
pub(crate) async fn run(url: &str, args: &[&str]) -> Output {
    run_command(slim_bus(url).args(args)).await
}

/// Runs `command` (the binary, with its arguments) to its end.
pub(crate) async fn run_command(command: &mut Command) -> Output {
    let args: Vec<_> = command
        .as_std()
        .get_args()
        .map(|arg| arg.to_string_lossy())
        .collect();
    within(
        &format!("slim-bus {}", args.join(" ")),
        STEP,
        command.output(),
    )
    .await
    .expect("the binary runs")
}

pub(crate) fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

pub(crate) fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

#[track_caller]
pub(crate) fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(output),
        stderr(output)
    );
}

pub(crate) fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("stdout is JSON ({e}): {}", stdout(output)))
}

pub(crate) async fn redis_cmd<T: redis::FromRedisValue>(
    server: &RedisServer,
    cmd: &redis::Cmd,
) -> T {
    let mut conn = within("connect", STEP, server.connection()).await;
    within("a redis command", STEP, cmd.query_async(&mut conn))
        .await
        .unwrap()
}

pub(crate) async fn xadd(server: &RedisServer, stream: &str, order_id: &str) -> String {
    redis_cmd(
        server,
        redis::cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("order_id")
            .arg(order_id),
    )
    .await
}

/// A handler that refuses every order for good.
pub(crate) struct Refuse;

#[slim_bus::async_trait]
impl StreamHandler for Refuse {
    type Event = HashMap<String, String>;

    async fn handle(&self, _: Self::Event, _: Context) -> Result<(), HandlerError> {
        Err(HandlerError::permanent("order is refused"))
    }
}

/// Adds `count` orders and lets group `billing` dead-letter them all.
pub(crate) async fn dead_letter_orders(server: &RedisServer, count: u64) {
    dead_letter(server, "orders", count).await;
}

/// Adds `count` orders to `stream` and lets group `billing` dead-letter them all.
pub(crate) async fn dead_letter(server: &RedisServer, stream: &str, count: u64) {
    for n in 0..count {
        xadd(server, stream, &format!("o-{n}")).await;
    }
    let_billing_dead_letter(EventBus::builder().url(server.url()), &[(stream, count)]).await;
}

/// Lets group `billing`, on a bus from `builder` (which says where Redis is), dead-letter
/// every entry of each stream: waits until each has as many dead letters as it is paired
/// with.
pub(crate) async fn let_billing_dead_letter(builder: EventBusBuilder, streams: &[(&str, u64)]) {
    let mut builder = builder.consumer_group("billing").consumer_name("pod-1");
    for &(stream, _) in streams {
        builder = builder.handler_on(stream, Refuse);
    }
    let bus = within("build", STEP, builder.build()).await.unwrap();
    let listener = within("listen", STEP, bus.listen()).await.unwrap();
    for &(stream, count) in streams {
        let dead = bus.dead_letters(stream);
        within(
            &format!("every entry of {stream} to be dead-lettered"),
            STEP,
            async {
                // The listener has no event for this to await; Redis is asked until it is so.
                while dead.len().await.unwrap() < count {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        )
        .await;
    }
    within("shutdown", STEP, listener.shutdown()).await.unwrap();
}

/// Delivers `count` new orders to `consumer` of `group` and never acknowledges them.
pub(crate) async fn read_and_die(server: &RedisServer, group: &str, consumer: &str, count: usize) {
    // The group may exist already (BUSYGROUP): fine.
    let mut conn = within("connect", STEP, server.connection()).await;
    let _: redis::RedisResult<redis::Value> = within(
        "XGROUP CREATE",
        STEP,
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg("orders")
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn),
    )
    .await;
    let _: redis::Value = redis_cmd(
        server,
        redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg("orders")
            .arg(">"),
    )
    .await;
}

pub(crate) async fn dead_letter_count(server: &RedisServer) -> u64 {
    redis_cmd(server, redis::cmd("XLEN").arg("{orders}:dlq")).await
}

/// Writes an executable shell script `name` into `dir`.
pub(crate) fn script(dir: &std::path::Path, name: &str, body: &str) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// Sends SIGINT to `child`, as Ctrl-C on a terminal does.
pub(crate) async fn interrupt(child: &Child) {
    let pid = child.id().expect("the child runs").to_string();
    let killed = within(
        "kill -INT",
        STEP,
        Command::new("kill").args(["-INT", &pid]).status(),
    )
    .await
    .unwrap();
    assert!(killed.success());
}

/// A stdout whose reader is gone before the binary starts, as in `slim-bus ... | head -0`
/// once `head` exited: every write to it fails with a broken pipe.
pub(crate) fn closed_pipe() -> Stdio {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Stdio::from(writer)
}

/// A TCP proxy in front of a Redis server that forwards everything until told to
/// [`hold`](Self::hold) the requests with given bytes: such a request, and whatever its
/// connection sends after it, is not forwarded until [`release`](Self::release), so its
/// client waits on Redis for as long as the test likes.
pub(crate) struct StallProxy {
    addr: SocketAddr,
    shared: Arc<Stall>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct Stall {
    /// The bytes that make a request held; `None` while nothing is held.
    pattern: Mutex<Option<Vec<u8>>>,
    /// Notified (with a permit kept for a later waiter) each time a request is held.
    held: Notify,
    /// Wakes the held connections, which then forward what they hold.
    released: Notify,
}

impl StallProxy {
    pub(crate) async fn start(server: &RedisServer) -> StallProxy {
        let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, server.port()));
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Stall::default());
        let stall = shared.clone();
        let accept = tokio::spawn(async move {
            // Dropped with the accept task, which aborts every connection's task.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                connections.spawn(forward(client, upstream, stall.clone()));
            }
        });
        StallProxy {
            addr,
            shared,
            accept,
        }
    }

    /// `redis://127.0.0.1:PORT/` of the proxy.
    pub(crate) fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// From now on, holds every request that contains `pattern` (every request at all for
    /// an empty one), on any connection.
    pub(crate) fn hold(&self, pattern: &[u8]) {
        *self.shared.pattern.lock().unwrap() = Some(pattern.to_vec());
    }

    /// Waits until a request is held (or returns at once when one was since the last call).
    pub(crate) async fn held(&self) {
        self.shared.held.notified().await;
    }

    /// Stops holding: what is held is forwarded, and so is everything after it.
    pub(crate) fn release(&self) {
        *self.shared.pattern.lock().unwrap() = None;
        self.shared.released.notify_waiters();
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn forward(client: TcpStream, upstream: SocketAddr, stall: Arc<Stall>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let replies =
        tokio::spawn(async move { tokio::io::copy(&mut server_read, &mut client_write).await });
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = match client_read.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let request = &buffer[..read];
        let hold = stall
            .pattern
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|pattern| {
                pattern.is_empty() || request.windows(pattern.len()).any(|w| w == pattern)
            });
        if hold {
            // Waiting for the release before saying it is held, so that none is missed.
            let released = stall.released.notified();
            let mut released = std::pin::pin!(released);
            released.as_mut().enable();
            stall.held.notify_one();
            released.await;
        }
        if server_write.write_all(request).await.is_err() {
            break;
        }
    }
    replies.abort();
}
