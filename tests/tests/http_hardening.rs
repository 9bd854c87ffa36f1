//! The HTTP port against clients that misbehave or mislead: slow and idle connections, TLS,
//! Host names it must not answer to (DNS rebinding), error bodies in the documented shape; and
//! what `bridge serve` checks before it says it is listening.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use bridge_proto::{protocol::headers, v1};
use bridge_tests::{
    HubOptions, HubProcess, Pki, READER_TOKEN, bin, eventually, http_get, https_get, open_stream,
    read_lines_within, tokens_config, wait_exit,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn hub_with(config: &str) -> HubProcess {
    HubProcess::start_with(HubOptions {
        config: Some(config.to_owned()),
        ..Default::default()
    })
}

/// Reads until the peer closes (or resets) the connection; `Err` with what arrived when it is
/// still open after `within`.
fn closed_within(stream: &mut TcpStream, within: Duration) -> Result<Vec<u8>, String> {
    stream.set_read_timeout(Some(within)).expect("timeout");
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return Ok(received),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(received),
            Err(e) => {
                return Err(format!(
                    "still open ({e}) after receiving {:?}",
                    String::from_utf8_lossy(&received)
                ));
            }
        }
    }
}

/// The JSON error body of `response`, checked against the documented shape.
fn error_body(body: &str) -> Value {
    let error: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    let object = error["error"].as_object().expect("an `error` object");
    assert_eq!(object.len(), 3, "{error}");
    assert!(error["error"]["code"].is_u64(), "{error}");
    assert!(error["error"]["status"].is_string(), "{error}");
    assert!(error["error"]["message"].is_string(), "{error}");
    error
}

/// A client that sends one header line every 100 ms never completes its request head; the hub
/// closes it once `limits.http_header_timeout_ms` has passed, although it keeps talking.
#[test]
fn a_client_that_trickles_its_headers_is_cut_off() {
    let hub = hub_with("[limits]\nhttp_header_timeout_ms = 1000\nhttp_idle_timeout_ms = 60000\n");
    let mut stream = TcpStream::connect(hub.http).expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        .expect("request line");
    let mut trickle = stream.try_clone().expect("clone");
    let trickler = std::thread::spawn(move || {
        for i in 0..200 {
            std::thread::sleep(Duration::from_millis(100));
            if trickle
                .write_all(format!("X-Slow-{i}: x\r\n").as_bytes())
                .is_err()
            {
                return i;
            }
        }
        200
    });
    let started = Instant::now();
    let received = closed_within(&mut stream, Duration::from_secs(10)).expect("closed");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "closed only after {took:?}");
    assert!(
        !String::from_utf8_lossy(&received).contains("200 OK"),
        "{received:?}"
    );
    let _ = stream.shutdown(std::net::Shutdown::Both);
    assert!(trickler.join().expect("trickler") < 200);
}

/// A keep-alive connection that asks nothing more is closed after
/// `limits.http_idle_timeout_ms`, which is its own setting: a long header timeout does not
/// keep it open.
#[test]
fn an_idle_keep_alive_connection_is_closed() {
    let hub = hub_with("[limits]\nhttp_header_timeout_ms = 60000\nhttp_idle_timeout_ms = 1000\n");
    let mut stream = TcpStream::connect(hub.http).expect("connect");
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("request");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut answered = Vec::new();
    let mut buffer = [0u8; 1024];
    while !answered.ends_with(b"ok\n") {
        let n = stream.read(&mut buffer).expect("the answer");
        assert!(n > 0, "closed before answering");
        answered.extend_from_slice(&buffer[..n]);
    }
    // Kept alive: a second request on the same connection is answered.
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("second request");
    answered.clear();
    while !answered.ends_with(b"ok\n") {
        let n = stream.read(&mut buffer).expect("the second answer");
        assert!(n > 0, "closed before answering again");
        answered.extend_from_slice(&buffer[..n]);
    }
    let started = Instant::now();
    let rest = closed_within(&mut stream, Duration::from_secs(10)).expect("closed when idle");
    assert!(rest.is_empty(), "{rest:?}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
}

/// A live event stream that is quiet for several idle timeouts is still open and delivers the
/// next event: the idle timeout is for connections between requests, not for responses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_outlives_the_idle_timeout() {
    let hub = hub_with("[limits]\nhttp_header_timeout_ms = 500\nhttp_idle_timeout_ms = 500\n");
    let addr = hub.http;
    let mut stream = tokio::task::spawn_blocking(move || {
        let mut stream = TcpStream::connect(addr).expect("connect");
        stream
            .write_all(b"GET /api/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .expect("request");
        stream
    })
    .await
    .expect("connect");
    hub.wait_for_subscribers(1, WAIT).await;
    // Several idle timeouts with nothing sent either way (keep-alive comments come every 15 s).
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        tokio::task::block_in_place(|| hub.subscribers()),
        Some(1.0),
        "the stream was closed"
    );
    let mut client = hub.client().await;
    let (sender, _controls) = open_stream(&mut client, &[(headers::WORKER_ID, "gpu-quiet")])
        .await
        .expect("worker stream");
    sender
        .send(v1::TelemetryEvent {
            event_parts: vec!["inference".into(), "stop".into()],
            ..Default::default()
        })
        .await
        .expect("send");
    let received = tokio::task::spawn_blocking(move || {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut received = Vec::new();
        let mut buffer = [0u8; 4096];
        while !String::from_utf8_lossy(&received).contains("inference.stop") {
            match stream.read(&mut buffer) {
                Ok(n) if n > 0 => received.extend_from_slice(&buffer[..n]),
                other => panic!(
                    "the stream ended ({other:?}) after {:?}",
                    String::from_utf8_lossy(&received)
                ),
            }
        }
        String::from_utf8_lossy(&received).into_owned()
    })
    .await
    .expect("read");
    assert!(received.contains("gpu-quiet"), "{received}");
}

/// With `[tls]`, the HTTP port speaks HTTPS with the hub's certificate, and plain HTTP gets no
/// answer, so a bearer token never crosses it in clear. With `tls.client_ca`, it wants a client
/// certificate too.
#[test]
fn the_http_port_serves_tls_with_the_hubs_certificate() {
    let pki = Pki::new("ca");
    let server = pki.issue("hub", &["127.0.0.1", "localhost"]);
    let tls = format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n",
        server.cert.display().to_string(),
        server.key.display().to_string()
    );
    let hub = hub_with(&tls);
    let healthy = https_get(hub.http, &pki.ca, None, "/healthz").expect("https");
    assert_eq!(healthy.status, 200, "{healthy:?}");
    assert_eq!(healthy.body, "ok\n");
    let workers = https_get(hub.http, &pki.ca, None, "/api/workers").expect("https");
    assert_eq!(workers.status, 200, "{workers:?}");
    assert!(workers.body.contains("\"workers\""), "{workers:?}");
    // Plain HTTP is not answered in HTTP.
    let mut plain = TcpStream::connect(hub.http).expect("connect");
    plain
        .write_all(b"GET /api/workers HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .expect("send");
    let answer = closed_within(&mut plain, Duration::from_secs(10)).expect("closed");
    assert!(
        !String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{answer:?}"
    );
    // A certificate from another CA is not trusted by clients.
    let other = Pki::new("other");
    assert!(https_get(hub.http, &other.ca, None, "/healthz").is_err());
    drop(hub);

    let client = pki.issue("prometheus", &["prometheus"]);
    let mutual = format!("{tls}client_ca = {:?}\n", pki.ca.display().to_string());
    let hub = hub_with(&mutual);
    let without = https_get(hub.http, &pki.ca, None, "/metrics");
    assert!(
        without.as_ref().map_or(true, |r| r.status == 0),
        "{without:?}"
    );
    let with = https_get(hub.http, &pki.ca, Some(&client), "/metrics").expect("https");
    assert_eq!(with.status, 200, "{with:?}");
    assert!(with.body.contains("bridge_"), "{with:?}");
}

/// A hub without tokens answers only to loopback names, and to those listed in
/// `hub.http_allowed_hosts`: a web page that points its own name at the hub (DNS rebinding)
/// gets 403 in the documented shape. With tokens, every name is answered.
#[test]
fn a_hub_without_tokens_answers_only_to_its_own_names() {
    let hub = hub_with("[hub]\nhttp_allowed_hosts = [\"bridge.internal\"]\n");
    for host in ["localhost", "localhost:9464", "127.0.0.1:80", "[::1]:9464"] {
        let answer = http_get(hub.http, "/api/workers", &[("Host", host)]);
        assert_eq!(answer.status, 200, "{host}: {answer:?}");
    }
    let listed = http_get(
        hub.http,
        "/api/workers",
        &[("Host", "bridge.internal:9464")],
    );
    assert_eq!(listed.status, 200, "{listed:?}");
    for path in ["/api/workers", "/api/control", "/metrics"] {
        let rebound = http_get(hub.http, path, &[("Host", "attacker.example:9464")]);
        assert_eq!(rebound.status, 403, "{path}: {rebound:?}");
        let error = error_body(&rebound.body);
        assert_eq!(error["error"]["code"], 403);
        assert_eq!(error["error"]["status"], "PERMISSION_DENIED");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("attacker.example") && message.contains("http_allowed_hosts"),
            "{message}"
        );
    }
    drop(hub);

    let hub = hub_with(&tokens_config());
    let authorization = format!("Bearer {READER_TOKEN}");
    let answer = http_get(
        hub.http,
        "/api/workers",
        &[
            ("Host", "bridge.example.com"),
            ("Authorization", &authorization),
        ],
    );
    assert_eq!(answer.status, 200, "{answer:?}");
}

/// 405, 414 and the 413 of an oversized body come in the documented JSON shape, with the gRPC
/// status name that fits.
#[test]
fn refusals_before_the_routes_have_json_bodies() {
    let hub = HubProcess::start();
    let wrong_method = raw_request(
        hub.http,
        "POST /api/workers HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert!(wrong_method.starts_with("HTTP/1.1 405"), "{wrong_method}");
    assert!(
        wrong_method.to_ascii_lowercase().contains("\r\nallow: get"),
        "{wrong_method}"
    );
    let error = error_body(body_of(&wrong_method));
    assert_eq!(error["error"]["status"], "UNIMPLEMENTED");
    assert!(
        error["error"]["message"].as_str().unwrap().contains("POST"),
        "{error}"
    );

    let long = http_get(
        hub.http,
        &format!("/api/events?pattern={}", "a".repeat(20_000)),
        &[],
    );
    assert_eq!(long.status, 414, "{long:?}");
    let error = error_body(&long.body);
    assert_eq!(error["error"]["status"], "RESOURCE_EXHAUSTED");

    let huge = format!(r#"{{"allowed_events": ["{}"]}}"#, "a".repeat(100_000));
    let too_large = raw_request(
        hub.http,
        &format!(
            "PUT /api/control HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{huge}",
            huge.len()
        ),
    );
    assert!(too_large.starts_with("HTTP/1.1 413"), "{too_large:.200}");
    let error = error_body(body_of(&too_large));
    assert_eq!(error["error"]["status"], "RESOURCE_EXHAUSTED");
}

/// A control change the hub cannot write to its state file is refused with 500 INTERNAL in the
/// documented shape, and logged as an error.
#[test]
fn a_failed_state_write_is_a_documented_500_and_an_error_in_the_log() {
    let hub = HubProcess::start();
    // A directory where the new state file is written first: creating it fails, even as root.
    std::fs::create_dir_all(hub.state_dir.join("control.json.tmp")).expect("block the write");
    let answer = raw_request(
        hub.http,
        "PUT /api/control HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 22\r\nConnection: close\r\n\r\n{\"sampling_rate\": 0.5}",
    );
    assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
    let error = error_body(body_of(&answer));
    assert_eq!(error["error"]["status"], "INTERNAL");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("control.json"),
        "{error}"
    );
    let log = hub.log();
    assert!(
        log.lines()
            .any(|line| line.contains("ERROR") && line.contains("state file cannot be written")),
        "{log}"
    );
}

fn raw_request(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream.write_all(request.as_bytes()).expect("send");
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw);
    String::from_utf8_lossy(&raw).into_owned()
}

fn body_of(response: &str) -> &str {
    response.split_once("\r\n\r\n").map_or("", |(_, body)| body)
}

/// `bridge serve` with `config`: its exit status, stdout and stderr, for a hub that must not
/// start.
fn serve_refused(config: &str) -> (Option<i32>, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).expect("config");
    let stdout = dir.path().join("stdout");
    let stderr = dir.path().join("stderr");
    let mut child = Command::new(bin("bridge"))
        .args(["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .arg("--config")
        .arg(&path)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).expect("stdout"))
        .stderr(std::fs::File::create(&stderr).expect("stderr"))
        .spawn()
        .expect("run bridge serve");
    // A hub that starts instead of refusing is stopped, and reported as still running (`None`).
    let status = wait_exit(&mut child, WAIT);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    (
        status.and_then(|status| status.code()),
        std::fs::read_to_string(&stdout).unwrap_or_default(),
        std::fs::read_to_string(&stderr).unwrap_or_default(),
    )
}

/// A bad `tls.cert` (or key) stops the hub before it prints `listening on` or `http on`.
#[test]
fn a_bad_certificate_path_fails_before_any_address_is_printed() {
    let (code, stdout, stderr) =
        serve_refused("[tls]\ncert = \"/nonexistent/hub.pem\"\nkey = \"/nonexistent/hub.key\"\n");
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("tls.cert") && stderr.contains("/nonexistent/hub.pem"),
        "{stderr}"
    );
    // A file that is not a certificate is found out at start too.
    let dir = tempfile::tempdir().expect("temp dir");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").expect("junk");
    let (code, stdout, stderr) = serve_refused(&format!(
        "[tls]\ncert = {:?}\nkey = {:?}\n",
        junk.display().to_string(),
        junk.display().to_string()
    ));
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(stderr.contains("holds no PEM certificate"), "{stderr}");
}

fn token_file_config(dir: &std::path::Path, contents: &str, mode: u32) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("ops.token");
    std::fs::write(&path, contents).expect("token file");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    format!(
        "[[auth.tokens]]\nname = \"ops\"\nrole = \"admin\"\ntoken_file = {:?}\n",
        path.display().to_string()
    )
}

/// A token file holds one token: a second line is refused naming the file and the line (it
/// used to be read as one token with a newline in it, which no client can send).
#[test]
fn a_token_file_of_two_tokens_is_refused_naming_the_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = token_file_config(
        dir.path(),
        "first-token-0123456789\nsecond-token-0123456789\n",
        0o600,
    );
    let (code, stdout, stderr) = serve_refused(&config);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("ops.token line 2") && stderr.contains("one token"),
        "{stderr}"
    );
}

/// A token file every user may read is served, with a warning naming it.
#[test]
fn a_world_readable_token_file_is_warned_about() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = token_file_config(dir.path(), "ops-token-0123456789abcdef\n\n", 0o644);
    let hub = hub_with(&config);
    let answer = http_get(
        hub.http,
        "/api/workers",
        &[("Authorization", "Bearer ops-token-0123456789abcdef")],
    );
    assert_eq!(answer.status, 200, "{answer:?}");
    let log = hub.log();
    assert!(
        log.lines().any(|line| line.contains("WARN")
            && line.contains("readable by every user")
            && line.contains("ops.token")),
        "{log}"
    );
    drop(hub);
    let private = tempfile::tempdir().expect("temp dir");
    let hub = hub_with(&token_file_config(
        private.path(),
        "ops-token-0123456789abcdef\n",
        0o600,
    ));
    assert!(
        !hub.log().contains("readable by every user"),
        "{}",
        hub.log()
    );
}

/// Two tokens with the same name are refused, naming the name and both entries.
#[test]
fn duplicate_token_names_are_refused() {
    let config = "[[auth.tokens]]\nname = \"ops\"\nrole = \"admin\"\ntoken = \"first-token-0123456789\"\n\
                  [[auth.tokens]]\nname = \"ops\"\nrole = \"reader\"\ntoken = \"second-token-0123456789\"\n";
    let (code, stdout, stderr) = serve_refused(config);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("auth.tokens[1].name")
            && stderr.contains("`ops`")
            && stderr.contains("auth.tokens[0]"),
        "{stderr}"
    );
}

/// At start-up the hub raises its soft open-file limit to the hard one, and warns, naming both
/// numbers, when that is still below what `limits.max_connections` needs.
#[test]
fn the_open_file_limit_is_raised_and_a_short_one_warned_about() {
    let dir = tempfile::tempdir().expect("temp dir");
    let start = |max_connections: u32| {
        let config = dir.path().join(format!("{max_connections}.toml"));
        std::fs::write(
            &config,
            format!("[limits]\nmax_connections = {max_connections}\n"),
        )
        .expect("config");
        let log = dir.path().join(format!("{max_connections}.log"));
        // A soft limit of 256 below the machine's hard limit, as a login shell often sets.
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("ulimit -Sn 256 && exec \"$@\"")
            .arg("sh")
            .arg(bin("bridge"))
            .args(["serve", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
            .arg("--config")
            .arg(&config)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let started = read_lines_within(stdout, 2, WAIT);
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id()));
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            started.is_some(),
            "{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        (
            limits.expect("/proc limits"),
            std::fs::read_to_string(&log).expect("log"),
        )
    };
    let hard = hard_open_files();
    let (limits, log) = start(16);
    let open_files = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("Max open files");
    let soft: Vec<&str> = open_files.split_whitespace().collect();
    assert_eq!(soft[3], hard.to_string(), "{open_files}");
    assert!(!log.contains("open-file limit"), "{log}");

    // Far more connections than any hard limit here allows.
    let (_, log) = start(10_000_000);
    let needed = 2 * 10_000_000u64 + 256;
    let warning = log
        .lines()
        .find(|line| line.contains("open-file limit"))
        .unwrap_or_else(|| panic!("no warning in {log}"));
    assert!(
        warning.contains(&hard.to_string()) && warning.contains(&needed.to_string()),
        "{warning}"
    );
}

fn hard_open_files() -> u64 {
    let output = Command::new("sh")
        .args(["-c", "ulimit -Hn"])
        .output()
        .expect("ulimit");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("a number")
}

/// Peer strings in text log lines have their control characters escaped, so an event name with
/// a newline cannot forge a line; and a huge name is cut, so one event cannot write a line of
/// hundreds of kilobytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_names_cannot_forge_or_bloat_log_lines() {
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let forged = "2026-01-01T00:00:00.000000Z  INFO bridge::hub: forged line";
    let (newline, _controls) = open_stream(&mut client, &[(headers::WORKER_ID, "gpu-forger")])
        .await
        .expect("worker stream");
    newline
        .send(v1::TelemetryEvent {
            event_parts: vec!["inference".into(), format!("stop\n{forged}\u{1b}[2J")],
            ..Default::default()
        })
        .await
        .expect("send");
    let (huge, _controls2) = open_stream(&mut client, &[(headers::WORKER_ID, "gpu-huge")])
        .await
        .expect("worker stream");
    huge.send(v1::TelemetryEvent {
        event_parts: vec!["ab".to_owned(); 200_000],
        ..Default::default()
    })
    .await
    .expect("send");
    let log = eventually("both refusals to be logged", WAIT, || async {
        let log = hub.log();
        (log.matches("dropping invalid events").count() >= 2).then_some(log)
    })
    .await;
    for line in log.lines() {
        assert!(
            !line.contains("forged line") || line.contains("dropping invalid events"),
            "a forged line: {line:?}"
        );
        assert!(!line.contains('\u{1b}'), "a raw escape: {line:?}");
        assert!(line.len() < 16 * 1024, "a line of {} bytes", line.len());
    }
    assert!(log.contains("stop\\n2026-01-01"), "{log}");
    assert!(log.contains("more bytes]"), "{log}");
}
