//! A throwaway `redis-server` on a free port in a temp dir, killed and reaped on drop.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

/// How many times `start` picks a new port when another process took the one it picked.
const START_ATTEMPTS: usize = 5;
const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Per-probe socket timeout; a probe that waits longer than this just counts as "not ready yet".
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How much of the server log errors and panicking drops show.
const LOG_TAIL_LINES: usize = 40;
const LOG_FILE: &str = "redis.log";
const STDOUT_FILE: &str = "stdout.log";
const STDERR_FILE: &str = "stderr.log";
const INSTALL_HINT: &str = "install one (`apt-get install redis-server`, or run ./scripts/test.sh \
     which does it as root), point REDIS_SERVER_BIN at a redis-server binary, \
     or set REDIS_URL to use a server you already run";

/// A `redis-server` process owned by the test that started it.
///
/// It listens on `127.0.0.1` on a port nobody else was using, keeps its data and log in a
/// fresh temp dir, and persists nothing unless the [builder](RedisServer::builder) asks for
/// an AOF. Dropping it kills and reaps the process and removes the dir; if the thread is
/// panicking, the drop first prints the tail of the server log to stderr so a failing test
/// shows what the server saw.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> std::io::Result<()> {
/// use slim_bus_tests::RedisServer;
///
/// let server = RedisServer::start().await?;
/// let mut conn = server.connection().await;
/// let _: () = redis::cmd("SET").arg("k").arg("v").query_async(&mut conn).await.unwrap();
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct RedisServer {
    // Field order matters: the process must be gone before its dir is removed.
    process: Option<Process>,
    port: u16,
    tls_port: Option<u16>,
    launch: Launch,
    dir: tempfile::TempDir,
}

/// Options for a [`RedisServer`]; get one from [`RedisServer::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct RedisServerBuilder {
    binary: Option<PathBuf>,
    port: Option<u16>,
    appendonly: bool,
    appendfsync: Option<&'static str>,
    extra_args: Vec<OsString>,
    startup_timeout: Duration,
    tls: Option<TlsFiles>,
}

/// The PEM files of a TLS server, and whether it asks clients for certificates.
#[derive(Debug, Clone)]
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
    auth_clients: bool,
}

impl Default for RedisServerBuilder {
    fn default() -> Self {
        Self {
            binary: None,
            port: None,
            appendonly: false,
            appendfsync: None,
            extra_args: Vec::new(),
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            tls: None,
        }
    }
}

impl RedisServerBuilder {
    /// Runs this `redis-server` binary instead of looking one up
    /// (`$REDIS_SERVER_BIN`, then `PATH`, then `/usr/bin` and `/usr/local/bin`).
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Listens on this port instead of a free one; a port already in use fails the start
    /// instead of being retried.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Turns the append-only file on or off (off by default), so data can survive
    /// [`RedisServer::restart`].
    pub fn appendonly(mut self, enabled: bool) -> Self {
        self.appendonly = enabled;
        self
    }

    /// Fsyncs the AOF after every write (`--appendfsync always`), so nothing acknowledged is
    /// lost across a restart.
    pub fn appendfsync_always(mut self) -> Self {
        self.appendfsync = Some("always");
        self
    }

    /// Appends a raw command-line argument, e.g. `.arg("--maxmemory").arg("10mb")`.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra_args.push(arg.into());
        self
    }

    /// Appends raw command-line arguments, e.g. `.args(["--maxmemory", "10mb"])`.
    pub fn args<I, A>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Also listens with TLS, on a second free port ([`RedisServer::tls_url`]), with the
    /// server certificate of `certs`; with `auth_clients` it requires a client certificate
    /// signed by their CA (`--tls-auth-clients yes`). The plain port stays open for the
    /// harness itself: its readiness probe, `SHUTDOWN` and the tests' inspections.
    pub fn tls(mut self, certs: &crate::TestCertificates, auth_clients: bool) -> Self {
        self.tls = Some(TlsFiles {
            cert: certs.server_cert(),
            key: certs.server_key(),
            ca: certs.ca(),
            auth_clients,
        });
        self
    }

    /// How long a start (or restart) may take before it fails; 10 s by default.
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Starts the server without blocking the async runtime (the wait runs on tokio's
    /// blocking pool).
    ///
    /// # Errors
    ///
    /// See [`start_blocking`](Self::start_blocking).
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (use [`start_blocking`](Self::start_blocking) there).
    pub async fn start(self) -> io::Result<RedisServer> {
        tokio::task::spawn_blocking(move || self.start_blocking())
            .await
            .map_err(join_error)?
    }

    /// Starts the server and waits until it answers `PING`, blocking the calling thread for
    /// at most the startup timeout.
    ///
    /// # Errors
    ///
    /// [`io::ErrorKind::NotFound`] when there is no `redis-server` binary (the message says
    /// how to get one); otherwise an error carrying the tail of the server log when the server
    /// exits early or does not answer in time.
    pub fn start_blocking(self) -> io::Result<RedisServer> {
        let binary = resolve_binary(self.binary.as_deref())?;
        let attempts = if self.port.is_some() {
            1
        } else {
            START_ATTEMPTS
        };
        let mut last_error = None;
        for _ in 0..attempts {
            let port = match self.port {
                Some(port) => port,
                None => free_port()?,
            };
            let tls_port = match self.tls {
                Some(_) => Some(free_port()?),
                None => None,
            };
            let launch = Launch {
                binary: binary.clone(),
                args: self.config_args(tls_port),
                startup_timeout: self.startup_timeout,
            };
            let dir = tempfile::Builder::new()
                .prefix("slim-bus-redis-")
                .tempdir()?;
            match launch.run(port, dir.path()) {
                Ok(process) => {
                    return Ok(RedisServer {
                        process: Some(process),
                        port,
                        tls_port,
                        launch,
                        dir,
                    });
                }
                // Between dropping the probe listener and redis binding, someone else can
                // take the port: pick another one.
                Err(LaunchError::PortTaken(error)) => last_error = Some(error),
                Err(LaunchError::Other(error)) => return Err(error),
            }
        }
        Err(last_error.unwrap_or_else(|| io::Error::other("redis-server did not start")))
    }

    fn config_args(&self, tls_port: Option<u16>) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--appendonly".into(),
            if self.appendonly { "yes" } else { "no" }.into(),
        ];
        if let (Some(tls), Some(tls_port)) = (&self.tls, tls_port) {
            args.extend([
                "--tls-port".into(),
                tls_port.to_string().into(),
                "--tls-cert-file".into(),
                tls.cert.clone().into(),
                "--tls-key-file".into(),
                tls.key.clone().into(),
                "--tls-ca-cert-file".into(),
                tls.ca.clone().into(),
                "--tls-auth-clients".into(),
                if tls.auth_clients { "yes" } else { "no" }.into(),
            ]);
        }
        if let Some(policy) = self.appendfsync {
            args.push("--appendfsync".into());
            args.push(policy.into());
        }
        args.extend(self.extra_args.iter().cloned());
        args
    }
}

impl RedisServer {
    /// Options for a server with persistence, a fixed port, a given binary or extra args.
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    /// Starts a server with default options without blocking the async runtime.
    ///
    /// # Errors
    ///
    /// See [`RedisServerBuilder::start_blocking`].
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime (use [`start_blocking`](Self::start_blocking) there).
    pub async fn start() -> io::Result<Self> {
        Self::builder().start().await
    }

    /// Starts a server with default options, blocking the calling thread (at most ~10 s).
    ///
    /// # Errors
    ///
    /// See [`RedisServerBuilder::start_blocking`].
    pub fn start_blocking() -> io::Result<Self> {
        Self::builder().start_blocking()
    }

    /// `redis://127.0.0.1:PORT/`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// `rediss://127.0.0.1:TLS_PORT/` for a server started with
    /// [`tls`](RedisServerBuilder::tls).
    ///
    /// # Panics
    ///
    /// For a server without TLS.
    pub fn tls_url(&self) -> String {
        match self.tls_port {
            Some(port) => format!("rediss://127.0.0.1:{port}/"),
            None => panic!("this redis-server was started without TLS"),
        }
    }

    /// The TLS port, for a server started with [`tls`](RedisServerBuilder::tls).
    pub fn tls_port(&self) -> Option<u16> {
        self.tls_port
    }

    /// The TCP port the server listens on (kept across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The process id, or `None` after [`stop`](Self::stop).
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(|process| process.child.id())
    }

    /// The server's working dir (`--dir`), where an AOF or RDB file would live.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A client for this server.
    pub fn client(&self) -> redis::Client {
        let addr = redis::ConnectionAddr::Tcp(Ipv4Addr::LOCALHOST.to_string(), self.port);
        // Converting a TCP address into connection info cannot fail; only URL parsing can.
        match redis::Client::open(addr) {
            Ok(client) => client,
            Err(error) => unreachable!("a TCP address is always valid connection info: {error}"),
        }
    }

    /// A multiplexed connection with a 5 s connect timeout and no response timeout, so
    /// `XREADGROUP ... BLOCK` of any length works; bound each command with
    /// [`within`](crate::within).
    ///
    /// # Panics
    ///
    /// When the server does not accept the connection; the message includes the server log.
    pub async fn connection(&self) -> MultiplexedConnection {
        match self.try_connection().await {
            Ok(connection) => connection,
            Err(error) => panic!(
                "could not connect to redis-server at {}: {error}\n{}",
                self.url(),
                self.log_tail(LOG_TAIL_LINES)
            ),
        }
    }

    /// Like [`connection`](Self::connection), returning the error instead of panicking.
    ///
    /// # Errors
    ///
    /// When the connection or its handshake fails or takes longer than 5 s.
    pub async fn try_connection(&self) -> redis::RedisResult<MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(None);
        self.client()
            .get_multiplexed_async_connection_with_config(&config)
            .await
    }

    /// Stops the server (`SHUTDOWN`, which flushes the AOF) and starts it again on the same
    /// port and dir, so an AOF is reloaded; waits until it answers `PING` again. Existing
    /// connections break. Works after [`stop`](Self::stop) too.
    ///
    /// # Errors
    ///
    /// When the old process does not exit in time (it is then killed) or the new one does
    /// not start; the message carries the server log.
    pub async fn restart(&mut self) -> io::Result<()> {
        let old = self.process.take();
        let (launch, port, dir) = (self.launch.clone(), self.port, self.dir.path().to_owned());
        // Both halves run on the blocking pool; the `Process` guard kills the new server if
        // this future is dropped before it gets back.
        let new = tokio::task::spawn_blocking(move || {
            if let Some(old) = old {
                old.shutdown(port, &dir)?;
            }
            launch.run(port, &dir).map_err(LaunchError::into_io)
        })
        .await
        .map_err(join_error)??;
        self.process = Some(new);
        Ok(())
    }

    /// [`restart`](Self::restart) for sync callers; blocks the calling thread.
    ///
    /// # Errors
    ///
    /// See [`restart`](Self::restart).
    pub fn restart_blocking(&mut self) -> io::Result<()> {
        if let Some(old) = self.process.take() {
            old.shutdown(self.port, self.dir.path())?;
        }
        let new = self
            .launch
            .run(self.port, self.dir.path())
            .map_err(LaunchError::into_io)?;
        self.process = Some(new);
        Ok(())
    }

    /// Shuts the server down (`SHUTDOWN`, flushing the AOF) and reaps it; the dir stays
    /// until drop, and [`restart`](Self::restart) brings the server back.
    ///
    /// # Errors
    ///
    /// When it does not exit within 10 s (it is then killed).
    pub async fn stop(&mut self) -> io::Result<()> {
        let Some(old) = self.process.take() else {
            return Ok(());
        };
        let (port, dir) = (self.port, self.dir.path().to_owned());
        tokio::task::spawn_blocking(move || old.shutdown(port, &dir))
            .await
            .map_err(join_error)?
    }

    /// [`stop`](Self::stop) for sync callers; blocks the calling thread.
    ///
    /// # Errors
    ///
    /// See [`stop`](Self::stop).
    pub fn stop_blocking(&mut self) -> io::Result<()> {
        match self.process.take() {
            Some(old) => old.shutdown(self.port, self.dir.path()),
            None => Ok(()),
        }
    }

    /// Kills the process with `SIGKILL` and reaps it, as a crash or an OOM kill would end
    /// it: nothing is flushed, and clients see their connections reset.
    /// [`restart`](Self::restart) brings it back on the same port and dir.
    ///
    /// # Errors
    ///
    /// When the server is stopped already.
    pub fn kill(&mut self) -> io::Result<()> {
        let process = self
            .process
            .take()
            .ok_or_else(|| io::Error::other("redis-server is stopped"))?;
        // `Process::drop` sends SIGKILL and waits for the exit.
        drop(process);
        Ok(())
    }

    /// The `redis-server` (or `valkey-server`) binary this server runs.
    pub fn binary(&self) -> &Path {
        &self.launch.binary
    }

    /// Freezes the process (`SIGSTOP`): connections stay open but nothing is answered, as
    /// with a hung or partitioned server.
    ///
    /// # Errors
    ///
    /// When the server is stopped or the `kill` command fails.
    pub fn pause(&self) -> io::Result<()> {
        self.running()?.signal("STOP")
    }

    /// Thaws a [`pause`](Self::pause)d process (`SIGCONT`).
    ///
    /// # Errors
    ///
    /// When the server is stopped or the `kill` command fails.
    pub fn resume(&self) -> io::Result<()> {
        self.running()?.signal("CONT")
    }

    /// The last `lines` lines of the server log, plus its stdout/stderr when they hold
    /// anything (config errors land there before the log file is opened).
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(self.dir.path(), lines)
    }

    fn running(&self) -> io::Result<&Process> {
        self.process
            .as_ref()
            .ok_or_else(|| io::Error::other("redis-server is stopped"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- redis-server {} (dir {}) ----\n{}\n---- end of redis-server log ----",
                self.url(),
                self.dir.path().display(),
                self.log_tail(LOG_TAIL_LINES)
            );
        }
        // `Process::drop` then kills and reaps; `dir` is removed after it.
    }
}

/// A spawned `redis-server`, killed and reaped when dropped.
#[derive(Debug)]
struct Process {
    child: Child,
}

impl Process {
    fn signal(&self, signal: &str) -> io::Result<()> {
        // The child is not reaped while we hold it, so its pid cannot have been reused.
        let status = Command::new("kill")
            .args(["-s", signal, &self.child.id().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|error| with_context(error, "could not run `kill`"))?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "`kill -s {signal} {}` failed with {status}",
                self.child.id()
            )))
        }
    }

    /// `SHUTDOWN` (graceful: fsyncs the AOF), waits for the exit, kills on timeout.
    fn shutdown(mut self, port: u16, dir: &Path) -> io::Result<()> {
        if self.child.try_wait()?.is_some() {
            return Ok(());
        }
        // A paused server would never read the SHUTDOWN.
        let _ = self.signal("CONT");
        if send_shutdown(port).is_err() {
            // Falls back to SIGTERM, which redis treats like SHUTDOWN.
            let _ = self.signal("TERM");
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        drop(self);
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "redis-server on port {port} did not exit within {STOP_TIMEOUT:?} of SHUTDOWN, \
                 killed it\n{}",
                log_tail(dir, LOG_TAIL_LINES)
            ),
        ))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // SIGKILL works on a SIGSTOPped process too; errors mean it already exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What it takes to run the server again on a given port and dir.
#[derive(Debug, Clone)]
struct Launch {
    binary: PathBuf,
    args: Vec<OsString>,
    startup_timeout: Duration,
}

#[derive(Debug)]
enum LaunchError {
    PortTaken(io::Error),
    Other(io::Error),
}

impl LaunchError {
    fn into_io(self) -> io::Error {
        match self {
            LaunchError::PortTaken(error) | LaunchError::Other(error) => error,
        }
    }
}

impl Launch {
    /// Spawns the server and waits until it answers `PING` and reports our pid.
    fn run(&self, port: u16, dir: &Path) -> Result<Process, LaunchError> {
        let process = self.spawn(port, dir).map_err(LaunchError::Other)?;
        self.wait_ready(process, port, dir)
    }

    fn spawn(&self, port: u16, dir: &Path) -> io::Result<Process> {
        let mut command = Command::new(&self.binary);
        command
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(dir)
            .args(["--save", ""])
            .arg("--logfile")
            .arg(dir.join(LOG_FILE))
            .args(["--daemonize", "no", "--protected-mode", "no"])
            .args(&self.args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(append(&dir.join(STDOUT_FILE))?)
            .stderr(append(&dir.join(STDERR_FILE))?);
        match command.spawn() {
            Ok(child) => Ok(Process { child }),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "could not run redis-server binary {}: {error}; {INSTALL_HINT}",
                    self.binary.display()
                ),
            )),
            Err(error) => Err(with_context(
                error,
                &format!("could not run {}", self.binary.display()),
            )),
        }
    }

    fn wait_ready(
        &self,
        mut process: Process,
        port: u16,
        dir: &Path,
    ) -> Result<Process, LaunchError> {
        let deadline = Instant::now() + self.startup_timeout;
        loop {
            match process.child.try_wait() {
                Ok(Some(status)) => return Err(exited_early(status, port, dir)),
                Ok(None) => {}
                Err(error) => return Err(LaunchError::Other(error)),
            }
            let last_probe = match probe(port) {
                Ok(pid) if pid == process.child.id() => return Ok(process),
                // Some other server owns the port and ours will fail to bind it.
                Ok(pid) => {
                    return Err(LaunchError::PortTaken(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("port {port} is served by another redis-server (pid {pid})"),
                    )));
                }
                Err(error) => error,
            };
            if Instant::now() >= deadline {
                drop(process);
                return Err(LaunchError::Other(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "redis-server on port {port} did not answer PING within {:?} \
                         (last probe: {last_probe})\n{}",
                        self.startup_timeout,
                        log_tail(dir, LOG_TAIL_LINES)
                    ),
                )));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

fn exited_early(status: ExitStatus, port: u16, dir: &Path) -> LaunchError {
    let tail = log_tail(dir, LOG_TAIL_LINES);
    let error = |kind| {
        io::Error::new(
            kind,
            format!(
                "redis-server on port {port} exited with {status} before answering PING\n{tail}"
            ),
        )
    };
    if tail.contains("Address already in use") {
        LaunchError::PortTaken(error(io::ErrorKind::AddrInUse))
    } else {
        LaunchError::Other(error(io::ErrorKind::Other))
    }
}

/// `PING` until `+PONG` (it answers `-LOADING` while reading the AOF), then the pid from
/// `INFO server`, so a server that someone else started on the port is not mistaken for ours.
fn probe(port: u16) -> io::Result<u32> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT))?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;

    writer.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.starts_with("+PONG") {
        return Err(io::Error::other(format!(
            "PING answered {:?}",
            line.trim_end()
        )));
    }

    writer.write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")?;
    line.clear();
    reader.read_line(&mut line)?;
    let len: usize = line
        .strip_prefix('$')
        .and_then(|len| len.trim_end().parse().ok())
        .ok_or_else(|| io::Error::other(format!("INFO answered {:?}", line.trim_end())))?;
    let mut body = vec![0; len + 2];
    reader.read_exact(&mut body)?;
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|line| line.strip_prefix("process_id:")?.trim().parse().ok())
        .ok_or_else(|| io::Error::other("INFO server has no process_id"))
}

fn send_shutdown(port: u16) -> io::Result<()> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, PROBE_TIMEOUT)?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT))?;
    stream.write_all(b"*1\r\n$8\r\nSHUTDOWN\r\n")
}

pub(crate) fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// The explicit binary, else `$REDIS_SERVER_BIN`, else `redis-server` on `PATH`, else the
/// usual install locations.
fn resolve_binary(explicit: Option<&Path>) -> io::Result<PathBuf> {
    let configured = explicit
        .map(|path| (path.to_owned(), "the configured binary"))
        .or_else(|| {
            std::env::var_os("REDIS_SERVER_BIN")
                .filter(|value| !value.is_empty())
                .map(|value| (PathBuf::from(value), "REDIS_SERVER_BIN"))
        });
    if let Some((path, source)) = configured {
        return if path.is_file() {
            Ok(path)
        } else {
            Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "redis-server binary {} ({source}) does not exist; {INSTALL_HINT}",
                    path.display()
                ),
            ))
        };
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .map(|dir| dir.join("redis-server"))
        .chain(["/usr/bin/redis-server", "/usr/local/bin/redis-server"].map(PathBuf::from))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no redis-server binary on PATH, in /usr/bin or in /usr/local/bin; {INSTALL_HINT}"
                ),
            )
        })
}

fn log_tail(dir: &Path, lines: usize) -> String {
    let mut out = String::new();
    for (name, always) in [(LOG_FILE, true), (STDOUT_FILE, false), (STDERR_FILE, false)] {
        match fs::read(dir.join(name)) {
            Ok(bytes) if !bytes.is_empty() => {
                let text = String::from_utf8_lossy(&bytes);
                let all: Vec<&str> = text.lines().collect();
                let shown = &all[all.len().saturating_sub(lines)..];
                out.push_str(&format!("--- {name} (last {} lines) ---\n", shown.len()));
                for line in shown {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            _ if always => out.push_str(&format!("--- {name}: empty or missing ---\n")),
            _ => {}
        }
    }
    out
}

fn append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn with_context(error: io::Error, context: &str) -> io::Error {
    io::Error::new(error.kind(), format!("{context}: {error}"))
}

fn join_error(error: tokio::task::JoinError) -> io::Error {
    io::Error::other(format!("redis-server start/stop task failed: {error}"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::within;
    use redis::AsyncCommands;

    const STEP: Duration = Duration::from_secs(15);

    async fn ping(server: &RedisServer) -> String {
        let mut conn = within("connect", STEP, server.connection()).await;
        within("PING", STEP, redis::cmd("PING").query_async(&mut conn))
            .await
            .unwrap()
    }

    fn alive(pid: u32) -> bool {
        Path::new(&format!("/proc/{pid}")).exists()
    }

    #[tokio::test]
    async fn two_servers_run_side_by_side() {
        let (a, b) = within("two starts", STEP, async {
            tokio::join!(RedisServer::start(), RedisServer::start())
        })
        .await;
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_ne!(a.port(), b.port());
        assert_ne!(a.port(), 6379);
        assert_eq!(ping(&a).await, "PONG");
        assert_eq!(ping(&b).await, "PONG");
        assert_eq!(a.url(), format!("redis://127.0.0.1:{}/", a.port()));
    }

    #[tokio::test]
    async fn restart_keeps_data_with_appendonly() {
        let mut server = within(
            "start",
            STEP,
            RedisServer::builder()
                .appendonly(true)
                .appendfsync_always()
                .start(),
        )
        .await
        .unwrap();
        let (port, old_pid) = (server.port(), server.pid());
        let mut conn = within("connect", STEP, server.connection()).await;
        let _: () = within("SET", STEP, conn.set("survivor", "yes"))
            .await
            .unwrap();

        within("restart", STEP, server.restart()).await.unwrap();
        assert_eq!(server.port(), port);
        assert_ne!(server.pid(), old_pid);

        let mut conn = within("reconnect", STEP, server.connection()).await;
        let value: Option<String> = within("GET", STEP, conn.get("survivor")).await.unwrap();
        assert_eq!(value.as_deref(), Some("yes"));
    }

    #[tokio::test]
    async fn stop_then_restart_brings_it_back() {
        let mut server = within("start", STEP, RedisServer::start()).await.unwrap();
        within("stop", STEP, server.stop()).await.unwrap();
        assert_eq!(server.pid(), None);
        assert!(server.try_connection().await.is_err());
        within("restart", STEP, server.restart()).await.unwrap();
        assert_eq!(ping(&server).await, "PONG");
    }

    #[tokio::test]
    async fn kill_ends_the_process_at_once_and_restart_brings_it_back() {
        let mut server = within("start", STEP, RedisServer::start()).await.unwrap();
        let pid = server.pid().unwrap();
        server.kill().unwrap();
        assert_eq!(server.pid(), None);
        assert!(!alive(pid), "killed and reaped");
        assert!(server.kill().is_err(), "nothing left to kill");
        within("restart", STEP, server.restart()).await.unwrap();
        assert_eq!(ping(&server).await, "PONG");
    }

    #[test]
    fn drop_kills_and_reaps_the_process() {
        let server = RedisServer::start_blocking().unwrap();
        let pid = server.pid().unwrap();
        let dir = server.dir().to_owned();
        assert!(alive(pid));
        drop(server);
        assert!(!alive(pid), "redis-server {pid} still alive after drop");
        assert!(!dir.exists(), "temp dir {} left behind", dir.display());
    }

    #[tokio::test]
    async fn pause_stops_answers_until_resume() {
        let server = within("start", STEP, RedisServer::start()).await.unwrap();
        let mut conn = within("connect", STEP, server.connection()).await;
        server.pause().unwrap();
        let answer = tokio::time::timeout(
            Duration::from_millis(300),
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        assert!(answer.is_err(), "a paused server answered: {answer:?}");
        server.resume().unwrap();
        let pong: String = within(
            "PING after resume",
            STEP,
            redis::cmd("PING").query_async(&mut conn),
        )
        .await
        .unwrap();
        assert_eq!(pong, "PONG");
    }

    #[test]
    fn missing_binary_is_not_found_with_a_hint() {
        let error = RedisServer::builder()
            .binary("/nonexistent/slim-bus/redis-server")
            .start_blocking()
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        let message = error.to_string();
        assert!(
            message.contains("apt-get install redis-server"),
            "{message}"
        );
        assert!(message.contains("REDIS_SERVER_BIN"), "{message}");
        assert!(message.contains("REDIS_URL"), "{message}");
    }

    #[test]
    fn failed_start_reports_the_server_output() {
        let error = RedisServer::builder()
            .arg("--no-such-directive")
            .arg("1")
            .start_blocking()
            .unwrap_err();
        let message = error.to_string();
        assert!(message.contains("exited with"), "{message}");
        assert!(message.contains("no-such-directive"), "{message}");
    }

    #[test]
    fn taken_fixed_port_fails_instead_of_hijacking() {
        let first = RedisServer::start_blocking().unwrap();
        let error = RedisServer::builder()
            .port(first.port())
            .start_blocking()
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::AddrInUse, "{error}");
    }
}
