//! Helpers for the integration tests: real `bridge` and `worker` processes on loopback ports,
//! the CLI as a user runs it, and waiting on conditions (never on fixed sleeps).

use std::{
    future::Future,
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bridge::client::HubClient;
use bridge_proto::v1;

pub mod openapi;
mod pki;
pub mod raw;
pub use bridge_bench::fault_proxy::{Mode as ProxyMode, Proxy};
pub use pki::{Issued, Pki};

/// For a test whose external tool is missing: a failure when `./test.sh` declared the tool
/// required (it sets `require`, after installing the tool), otherwise a note on stderr that the
/// test (or check) is skipped.
///
/// libtest has no runtime skip, so such a test reports `ok`; the note is the only sign. It is
/// written to the process's stderr directly: libtest captures what `eprintln!` prints (and shows
/// it only for failed tests), but not writes to the stderr handle.
pub fn skip_without(require: &str, missing: &str) {
    use std::io::Write;
    assert!(
        std::env::var_os(require).is_none(),
        "{missing}; it is required here ({require} is set)"
    );
    // libtest runs each test on a thread named after it.
    let test = std::thread::current()
        .name()
        .filter(|name| *name != "main")
        .map(|name| format!(" {name}"))
        .unwrap_or_default();
    let _ = writeln!(
        std::io::stderr().lock(),
        "skipping{test}: {missing} (./test.sh installs it)"
    );
}

/// A token of each role, and the hub configuration that grants them: `fleet` (worker),
/// `dashboards` (reader) and `oncall` (admin).
pub const WORKER_TOKEN: &str = "worker-token-5f0c2a9e7b";
pub const READER_TOKEN: &str = "reader-token-93d1e6a4c2";
pub const ADMIN_TOKEN: &str = "admin-token-0b8f47d2e1a6";

pub fn tokens_config() -> String {
    format!(
        r#"
[[auth.tokens]]
name = "fleet"
role = "worker"
token = "{WORKER_TOKEN}"
[[auth.tokens]]
name = "dashboards"
role = "reader"
token = "{READER_TOKEN}"
[[auth.tokens]]
name = "oncall"
role = "admin"
token = "{ADMIN_TOKEN}"
"#
    )
}

/// Builds the binaries once per test process and returns the path of `name`.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        // The test executable lives in target/<profile>/deps; the binaries one level up.
        let exe = std::env::current_exe().expect("test executable path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_owned();
        let mut build = Command::new(env!("CARGO"));
        build.args([
            "build",
            "--quiet",
            "-p",
            "telemetry-bridge",
            "-p",
            "telemetry-worker",
            "-p",
            "bridge-bench",
            "--bins",
        ]);
        let sibling = bridge::workspace::sibling_build(&profile_dir);
        build.args(&sibling.args);
        for key in &sibling.remove_env {
            build.env_remove(key);
        }
        let status = build
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build of the binaries failed");
        profile_dir
    });
    dir.join(name)
}

/// Everything a test needs to start a hub.
#[derive(Debug, Default, Clone)]
pub struct HubOptions {
    /// Reuse a state directory (e.g. across a restart); a fresh temporary one otherwise.
    pub state_dir: Option<PathBuf>,
    /// Listen here (e.g. the address of a hub that was killed); `127.0.0.1:0` otherwise.
    pub listen: Option<SocketAddr>,
    /// Extra configuration, TOML.
    pub config: Option<String>,
}

/// A `bridge serve` process. Killed when dropped.
#[derive(Debug)]
pub struct HubProcess {
    child: Child,
    pub addr: SocketAddr,
    pub url: String,
    /// The HTTP port (/metrics, /healthz, /readyz).
    pub http: SocketAddr,
    pub state_dir: PathBuf,
    log: PathBuf,
    _temp: tempfile::TempDir,
}

impl HubProcess {
    pub fn start() -> Self {
        Self::start_with(HubOptions::default())
    }

    pub fn start_with(options: HubOptions) -> Self {
        let temp = tempfile::tempdir().expect("temp dir");
        let state_dir = options
            .state_dir
            .unwrap_or_else(|| temp.path().join("state"));
        let log = temp.path().join("hub.log");
        let listen = options
            .listen
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        let mut command = Command::new(bin("bridge"));
        command
            .args([
                "serve",
                "--listen",
                &listen.to_string(),
                "--http",
                "127.0.0.1:0",
            ])
            .arg("--state-dir")
            .arg(&state_dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log file"));
        if let Some(config) = options.config {
            let path = temp.path().join("config.toml");
            std::fs::write(&path, config).expect("write config");
            command.arg("--config").arg(path);
        }
        let mut child = command.spawn().expect("spawn bridge serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = read_lines_within(stdout, 2, Duration::from_secs(20))
            .unwrap_or_else(|| panic!("hub did not report its addresses; log:\n{}", read(&log)))
            .into_iter();
        let mut address = |prefix: &str| -> SocketAddr {
            let line = lines.next().unwrap_or_default();
            line.strip_prefix(prefix)
                .and_then(|a| a.trim().parse().ok())
                .unwrap_or_else(|| panic!("expected `{prefix}ADDR` from the hub, got {line:?}"))
        };
        let addr = address("listening on ");
        let http = address("http on ");
        Self {
            child,
            addr,
            url: format!("http://{addr}"),
            http,
            state_dir,
            log,
            _temp: temp,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open subscriptions, as the hub's `/metrics` counts them.
    pub fn subscribers(&self) -> Option<f64> {
        let metrics = http_get(self.http, "/metrics", &[]).body;
        metrics.lines().find_map(|line| {
            line.strip_prefix("bridge_subscribers ")?
                .trim()
                .parse()
                .ok()
        })
    }

    /// Waits until exactly `count` subscriptions are open (panics after `timeout`), so that a
    /// test sends its events only once every subscriber it started can receive them.
    pub async fn wait_for_subscribers(&self, count: usize, timeout: Duration) {
        let what = format!("{count} subscription(s) to be open");
        eventually(&what, timeout, || async {
            let open = tokio::task::block_in_place(|| self.subscribers());
            (open == Some(count as f64)).then_some(())
        })
        .await;
    }

    pub async fn client(&self) -> HubClient {
        HubClient::connect(&self.url, Duration::from_secs(5))
            .await
            .expect("connect to hub")
    }

    /// SIGKILL: the hub gets no chance to clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, and the exit status.
    pub fn terminate(&mut self) -> ExitStatus {
        signal(self.child.id(), "TERM");
        wait_exit(&mut self.child, Duration::from_secs(15)).expect("hub exits after SIGTERM")
    }

    pub fn log(&self) -> String {
        read(&self.log)
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- hub log ---\n{}", self.log());
        }
    }
}

/// A `worker` process. Stopped with SIGTERM when dropped.
#[derive(Debug)]
pub struct WorkerProcess {
    child: Child,
    log: PathBuf,
    _temp: tempfile::TempDir,
}

/// Reconnects quickly, so restart tests stay short.
pub const QUICK_WORKER_CONFIG: &str =
    "[worker]\nbackoff_initial_ms = 20\nbackoff_max_ms = 200\nstats_interval_ms = 100\n";

impl WorkerProcess {
    /// `worker --hub URL --id ID [--pool POOL] ARGS...`, with [`QUICK_WORKER_CONFIG`].
    pub fn start(hub: &str, id: &str, pool: &str, args: &[&str]) -> Self {
        let mut command = Self::command(hub, id, pool, QUICK_WORKER_CONFIG, args);
        command.command.stdout(Stdio::null());
        Self::spawn(command, true)
    }

    /// The `worker` command, for a test to adjust (stdio, environment) before [`Self::spawn`];
    /// `config` is the contents of its configuration file.
    pub fn command(hub: &str, id: &str, pool: &str, config: &str, args: &[&str]) -> WorkerCommand {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("worker.toml");
        std::fs::write(&path, config).expect("write worker config");
        let mut command = Command::new(bin("worker"));
        command
            .arg("--config")
            .arg(&path)
            .args(["--hub", hub, "--id", id])
            .env("RUST_LOG", "info");
        if !pool.is_empty() {
            command.args(["--pool", pool]);
        }
        command.args(args);
        WorkerCommand { command, dir }
    }

    /// Starts `command`; with `log_stderr`, its stderr goes to a log file shown on failure
    /// (otherwise the caller set up stderr).
    pub fn spawn(mut command: WorkerCommand, log_stderr: bool) -> Self {
        let log = command.dir.path().join("worker.log");
        if log_stderr {
            command
                .command
                .stderr(std::fs::File::create(&log).expect("log file"));
        }
        Self {
            child: command.command.spawn().expect("spawn worker"),
            log,
            _temp: command.dir,
        }
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.child
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit on its own.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        wait_exit(&mut self.child, timeout).expect("worker exits in time")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log(&self) -> String {
        read(&self.log)
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        signal(self.child.id(), "TERM");
        if wait_exit(&mut self.child, Duration::from_secs(5)).is_none() {
            self.kill();
        }
        if std::thread::panicking() {
            eprintln!("--- worker log ---\n{}", self.log());
        }
    }
}

/// A `worker` command line and the directory holding its configuration.
#[derive(Debug)]
pub struct WorkerCommand {
    pub command: Command,
    dir: tempfile::TempDir,
}

/// What a finished CLI command printed and how it exited.
#[derive(Debug)]
pub struct CliOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// Standard output as the JSON lines of `--format json`.
    ///
    /// # Panics
    /// On a line that is not JSON (a test failure).
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).expect("json line"))
            .collect()
    }
}

/// Runs `bridge --hub HUB ARGS...` to completion, or kills it after a minute (a hung command
/// then shows as `code: None` instead of hanging the test).
pub fn cli(hub: &str, args: &[&str]) -> CliOutput {
    let mut child = Command::new(bin("bridge"))
        .arg("--hub")
        .arg(hub)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run bridge");
    let read_all = |mut pipe: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let stdout = read_all(Box::new(child.stdout.take().expect("stdout")));
    let stderr = read_all(Box::new(child.stderr.take().expect("stderr")));
    let status = wait_exit(&mut child, Duration::from_secs(60));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    CliOutput {
        code: status.and_then(|s| s.code()),
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// [`cli`] without blocking the async test's runtime.
pub async fn run_cli(hub: &str, args: &[&str]) -> CliOutput {
    let hub = hub.to_owned();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&hub, &args)
    })
    .await
    .expect("cli task")
}

/// A subscription to events matching any of `patterns`.
pub fn matching(patterns: &[&str]) -> v1::SubscribeRequest {
    v1::SubscribeRequest {
        patterns: patterns.iter().map(|p| (*p).to_owned()).collect(),
        ..Default::default()
    }
}

/// The first connected worker `ListWorkers` reports.
pub async fn first_connected(client: &HubClient) -> Option<v1::WorkerInfo> {
    let mut client = client.clone();
    client
        .list_workers(None)
        .await
        .ok()?
        .into_iter()
        .find(|w| w.connected)
}

/// A bare `StreamTelemetry` client, as any language generated from the .proto would open one,
/// with `metadata` as its request metadata. Events sent on the returned sender go to the hub.
pub async fn open_stream(
    client: &mut HubClient,
    metadata: &[(&'static str, &str)],
) -> Result<
    (
        tokio::sync::mpsc::Sender<v1::TelemetryEvent>,
        tonic::Streaming<v1::TelemetryControl>,
    ),
    tonic::Status,
> {
    let (events, outbound) = tokio::sync::mpsc::channel(1024);
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(outbound));
    for (key, value) in metadata {
        let value = value
            .parse()
            .map_err(|_| tonic::Status::internal("metadata value"))?;
        request.metadata_mut().insert(*key, value);
    }
    let controls = client.raw().stream_telemetry(request).await?.into_inner();
    Ok((events, controls))
}

/// Polls `check` every 5 ms until it yields a value; panics naming `what` after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The value of the sample `series` (name and labels exactly as exposed), if present.
pub fn metric_sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// `promtool check metrics` (Prometheus's own linter) on `text`. ./test.sh installs promtool
/// and sets BRIDGE_REQUIRE_PROMTOOL; a plain `cargo test` without it skips this check.
pub fn promtool_check(text: &str) {
    use std::io::Write;
    let spawned = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(error) => {
            skip_without(
                "BRIDGE_REQUIRE_PROMTOOL",
                &format!("no promtool (Debian package prometheus) for its check: {error}"),
            );
            return;
        }
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One worker as `ListWorkers` reports it, by id.
pub async fn worker_info(client: &mut HubClient, id: &str) -> Option<v1::WorkerInfo> {
    client
        .list_workers(None)
        .await
        .ok()?
        .into_iter()
        .find(|w| w.id == id)
}

/// A subscription read in the background: it records everything it receives, in order.
#[derive(Debug, Clone)]
pub struct Recorder {
    items: Arc<Mutex<Vec<v1::subscribe_response::Item>>>,
    ended: Arc<AtomicBool>,
}

impl Recorder {
    pub async fn start(client: &mut HubClient, request: v1::SubscribeRequest) -> Self {
        let mut stream = client.subscribe(request).await.expect("subscribe");
        let tail = Self {
            items: Arc::default(),
            ended: Arc::default(),
        };
        let (items, ended) = (tail.items.clone(), tail.ended.clone());
        tokio::spawn(async move {
            while let Ok(Some(response)) = stream.message().await {
                if let Some(item) = response.item {
                    items.lock().expect("tail lock").push(item);
                }
            }
            ended.store(true, Ordering::SeqCst);
        });
        tail
    }

    /// Event deliveries so far.
    pub fn deliveries(&self) -> Vec<v1::EventDelivery> {
        self.items
            .lock()
            .expect("tail lock")
            .iter()
            .filter_map(|item| match item {
                v1::subscribe_response::Item::Event(d) => Some(d.clone()),
                v1::subscribe_response::Item::Lagged(_) => None,
            })
            .collect()
    }

    /// Deliveries so far that were sampled at `rate`.
    pub fn count_at_rate(&self, rate: f64) -> usize {
        self.deliveries()
            .iter()
            .filter(|d| d.sampling_rate == rate)
            .count()
    }

    /// Everything so far, lag notices included.
    pub fn items(&self) -> Vec<v1::subscribe_response::Item> {
        self.items.lock().expect("tail lock").clone()
    }

    pub fn ended(&self) -> bool {
        self.ended.load(Ordering::SeqCst)
    }
}

/// A plain HTTP/1.1 response: status code, header block, body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

/// `GET path` on `addr` with a blocking socket, as curl would send it, with extra `headers`
/// (`Host` among them replaces the default, the address).
pub fn http_get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to the http port");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    // `Host` names the address unless the caller names another.
    let host = if headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        String::new()
    } else {
        format!("Host: {addr}\r\n")
    };
    // One write, as curl does: a server that answers after the request line may close early.
    let request = format!("GET {path} HTTP/1.1\r\n{host}{extra}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).expect("send request");
    let mut raw = String::new();
    stream.read_to_string(&mut raw).expect("read response");
    parse_response(&raw)
}

/// `GET path` on `addr` over TLS, trusting `ca`, with `client` as the client certificate.
/// `Err` when the TLS handshake or the exchange fails.
pub fn https_get(
    addr: SocketAddr,
    ca: &Path,
    client: Option<&Issued>,
    path: &str,
) -> Result<HttpResponse, String> {
    use std::io::{Read, Write};
    use tokio_rustls::rustls::{
        self, ClientConfig, ClientConnection, RootCertStore, StreamOwned,
        pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA PEM")).expect("CA certificate");
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(issued) => {
            let chain = CertificateDer::pem_file_iter(&issued.cert)
                .expect("client cert")
                .collect::<Result<Vec<_>, _>>()
                .expect("client cert PEM");
            let key = PrivateKeyDer::from_pem_file(&issued.key).expect("client key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client certificate")
        }
    };
    let name = ServerName::IpAddress(addr.ip().into());
    let connection =
        ClientConnection::new(Arc::new(config), name).map_err(|e| format!("TLS: {e}"))?;
    let socket = std::net::TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut stream = StreamOwned::new(connection, socket);
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // Servers often close without a TLS close_notify; what arrived is the answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(format!("read: {e}")),
    }
    Ok(parse_response(&String::from_utf8_lossy(&raw)))
}

fn parse_response(raw: &str) -> HttpResponse {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let (status_line, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    HttpResponse {
        status,
        headers: headers.to_ascii_lowercase(),
        body: body.to_owned(),
    }
}

/// An int measurement of a delivered event.
pub fn int(delivery: &v1::EventDelivery, key: &str) -> Option<i64> {
    match delivery.event.as_ref()?.measurements.get(key)?.value {
        Some(v1::telemetry_value::Value::IntValue(v)) => Some(v),
        _ => None,
    }
}

/// The worker's sequence number of a delivered event (0: unnumbered).
pub fn sequence(delivery: &v1::EventDelivery) -> u64 {
    delivery.event.as_ref().map_or(0, |e| e.sequence)
}

/// The dotted name of a delivered event.
pub fn name(delivery: &v1::EventDelivery) -> String {
    delivery
        .event
        .as_ref()
        .map(|e| e.event_parts.join("."))
        .unwrap_or_default()
}

/// A Python interpreter with `grpcio`, and client code generated from `bridge.proto` by
/// `grpcio-tools`: a client of the contract in another language.
#[derive(Debug)]
pub struct PythonGrpc {
    pub python: String,
    generated: tempfile::TempDir,
}

impl PythonGrpc {
    /// `None` (test skipped, said on stderr) when no Python with grpcio is found, unless
    /// `BRIDGE_REQUIRE_PYTHON` is set (as `./test.sh` does), which makes that a failure.
    pub fn set_up() -> Option<Self> {
        let python = python_with(&["grpc", "grpc_tools"])?;
        let generated = tempfile::tempdir().expect("temp dir");
        let root = repo_root();
        let status = Command::new(&python)
            .args(["-m", "grpc_tools.protoc", "-I"])
            .arg(root.join("proto"))
            .arg(format!("--python_out={}", generated.path().display()))
            .arg(format!("--grpc_python_out={}", generated.path().display()))
            .arg(root.join("proto/telemetry/bridge/v1/bridge.proto"))
            .status()
            .expect("run grpc_tools.protoc");
        assert!(
            status.success(),
            "Python code generation from bridge.proto failed"
        );
        Some(Self { python, generated })
    }

    /// `python tests/python/SCRIPT`, with the generated code importable.
    pub fn script(&self, script: &str) -> Command {
        let mut command = Command::new(&self.python);
        command
            .arg(repo_root().join("tests/python").join(script))
            .env("PYTHONPATH", self.generated.path());
        command
    }
}

/// The test Python (`BRIDGE_TEST_PYTHON`, else python3) when it can import `modules`; else
/// `None`, the test skipped and said so on stderr, unless `BRIDGE_REQUIRE_PYTHON` is set (as
/// `./test.sh` does), which makes that a failure.
pub fn python_with(modules: &[&str]) -> Option<String> {
    let python = std::env::var("BRIDGE_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let ok = Command::new(&python)
        .args(["-c", &format!("import {}", modules.join(", "))])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        skip_without(
            "BRIDGE_REQUIRE_PYTHON",
            &format!("{python} cannot import {}", modules.join(", ")),
        );
        return None;
    }
    Some(python)
}

/// The repository's top directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_owned()
}

/// Sends a signal (by name, e.g. "TERM") to a process.
pub fn signal(pid: u32, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status();
}

pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn read_line_within(
    stdout: impl std::io::Read + Send + 'static,
    timeout: Duration,
) -> Option<String> {
    read_lines_within(stdout, 1, timeout)?.pop()
}

/// The first `count` lines of `stdout` (with their line endings), or `None` if they do not all
/// come within `timeout`; the rest is drained in the background.
pub fn read_lines_within(
    stdout: impl std::io::Read + Send + 'static,
    count: usize,
    timeout: Duration,
) -> Option<Vec<String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut lines = Vec::with_capacity(count);
        for _ in 0..count {
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            lines.push(line);
        }
        let _ = tx.send(lines);
        // Keep draining so the hub never blocks on a full pipe.
        let mut sink = String::new();
        while reader.read_line(&mut sink).is_ok_and(|n| n > 0) {
            sink.clear();
        }
    });
    rx.recv_timeout(timeout)
        .ok()
        .filter(|lines| lines.iter().all(|l| !l.is_empty()))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A `nats-server` with JetStream on a free loopback port, killed when dropped. Its
/// JetStream store outlives a [`NatsServer::kill`], as a real server's disk would.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    pub url: String,
    store: tempfile::TempDir,
}

impl NatsServer {
    /// Starts one, or returns `None` when nats-server is not installed (./test.sh installs it
    /// and sets BRIDGE_REQUIRE_NATS, so CI never skips).
    pub fn start() -> Option<Self> {
        let store = tempfile::tempdir().expect("temp dir");
        match spawn_nats("-1", store.path()) {
            Ok((child, url)) => Some(Self { child, url, store }),
            Err(error) => {
                skip_without(
                    "BRIDGE_REQUIRE_NATS",
                    &format!("no nats-server (Debian package nats-server): {error}"),
                );
                None
            }
        }
    }

    pub fn port(&self) -> String {
        self.url.rsplit(':').next().unwrap_or_default().to_owned()
    }

    /// A hub in cluster mode on this server, named `node`.
    pub fn hub(&self, node: &str) -> HubProcess {
        self.hub_with(node, HubOptions::default())
    }

    /// [`NatsServer::hub`] with `options`; their `config` goes on in the `[cluster]` table (its
    /// own keys first, then any other table).
    pub fn hub_with(&self, node: &str, options: HubOptions) -> HubProcess {
        HubProcess::start_with(HubOptions {
            config: Some(format!(
                "[cluster]\nnats_url = \"{}\"\nnode = \"{node}\"\n{}",
                self.url,
                options.config.as_deref().unwrap_or_default()
            )),
            ..options
        })
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port with an empty JetStream store, as a server
    /// whose disk was lost would come back.
    pub fn restart_empty(&mut self) {
        self.kill();
        std::fs::remove_dir_all(self.store.path()).expect("clear the JetStream store");
        std::fs::create_dir_all(self.store.path()).expect("recreate the store directory");
        self.restart();
    }

    /// Starts the server again on the same port, with the same JetStream store.
    pub fn restart(&mut self) {
        self.kill();
        let (child, url) =
            spawn_nats(&self.port(), self.store.path()).expect("nats-server restarts");
        assert_eq!(url, self.url, "nats-server came back on another address");
        self.child = child;
    }
}

/// Spawns nats-server on `port` ("-1": a free one); returns it and its URL once it listens.
fn spawn_nats(port: &str, store: &Path) -> std::io::Result<(Child, String)> {
    let mut child = Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", port, "-js", "-sd"])
        .arg(store)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().expect("stderr");
    let (found, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // "[INF] Listening for client connections on 127.0.0.1:4222"; then keep draining
        // so that the server never blocks on a full pipe.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("Listening for client connections on") {
                let _ = found.send(line);
            }
        }
    });
    let line = listening
        .recv_timeout(Duration::from_secs(20))
        .expect("nats-server to listen");
    let address = line.rsplit(' ').next().expect("address").trim().to_owned();
    Ok((child, format!("nats://{address}")))
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
