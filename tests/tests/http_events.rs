//! The live tail over HTTP (`GET /api/events`, server-sent events): read with a real HTTP
//! client, in the shape of `bridge subscribe --format json`, with lag notices that account for
//! every event; and in a real browser (headless Chromium) through `EventSource`.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    os::unix::process::CommandExt,
    pin::Pin,
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use bridge_proto::protocol::headers;
use bridge_proto::v1;
use bridge_tests::{
    HubOptions, HubProcess, WorkerProcess, bin, eventually, http_get, open_stream, skip_without,
    worker_info,
};
use futures_util::{Stream, StreamExt};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// A server-sent events stream read with reqwest, one message at a time.
struct EventStream {
    body: Pin<Box<dyn Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: Vec<u8>,
}

impl EventStream {
    async fn open(url: &str) -> Self {
        let response = reqwest::get(url).await.expect("GET /api/events");
        assert_eq!(response.status(), 200, "{url}");
        assert_eq!(
            response
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok()),
            Some("text/event-stream")
        );
        Self {
            body: Box::pin(response.bytes_stream()),
            buffer: Vec::new(),
        }
    }

    /// The next message's event name ("message" when unnamed) and JSON data; comments
    /// (keep-alives) are skipped.
    async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let frame: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let frame = String::from_utf8(frame).expect("utf-8");
                let mut name = "message".to_owned();
                let mut data = String::new();
                for line in frame.lines() {
                    if let Some(value) = line.strip_prefix("event:") {
                        name = value.trim().to_owned();
                    } else if let Some(value) = line.strip_prefix("data:") {
                        data.push_str(value.strip_prefix(' ').unwrap_or(value));
                    }
                }
                if data.is_empty() {
                    continue;
                }
                let json = serde_json::from_str(&data).expect("data is JSON");
                return (name, json);
            }
            let chunk = tokio::time::timeout(WAIT, self.body.next())
                .await
                .expect("a message within the timeout")
                .expect("the stream is open")
                .expect("read the stream");
            self.buffer.extend_from_slice(&chunk);
        }
    }
}

fn event(name: &str, i: i64, pad: &str) -> v1::TelemetryEvent {
    let mut event = v1::TelemetryEvent {
        event_parts: name.split('.').map(String::from).collect(),
        ..Default::default()
    };
    event.measurements.insert(
        "i".into(),
        v1::TelemetryValue {
            value: Some(v1::telemetry_value::Value::IntValue(i)),
        },
    );
    event.metadata.insert("pad".into(), pad.into());
    event
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_carry_the_filtered_tail_and_account_for_lag() {
    let hub = HubProcess::start_with(HubOptions {
        config: Some("[hub]\nsubscriber_queue = 64\n".into()),
        ..Default::default()
    });
    let url = format!(
        "http://{}/api/events?pattern=inference.%3E&worker=flood",
        hub.http
    );
    let mut events = EventStream::open(&url).await;
    // The CLI's JSON tail of the same events, to compare shapes with.
    let mut cli = Command::new(bin("bridge"))
        .args(["--hub", &hub.url, "subscribe", "--format", "json"])
        .args(["--worker", "flood", "--limit", "1", "inference.>"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("bridge subscribe");
    hub.wait_for_subscribers(2, WAIT).await;

    let mut client = hub.client().await;
    let (sender, _controls) = open_stream(&mut client, &[(headers::WORKER_ID, "flood")])
        .await
        .expect("worker stream");
    sender
        .send(event("inference.start", 0, "first"))
        .await
        .expect("send");
    let (name, first) = events.next().await;
    assert_eq!(name, "message");
    let mut line = String::new();
    let stdout = cli.stdout.take().expect("stdout");
    tokio::task::block_in_place(|| BufReader::new(stdout).read_line(&mut line))
        .expect("read the CLI's line");
    let _ = cli.wait();
    let from_cli: Value = serde_json::from_str(&line).expect("the CLI prints JSON");
    assert_eq!(
        first, from_cli,
        "SSE and `bridge subscribe --format json` differ"
    );
    assert_eq!(first["type"], "event");
    assert_eq!(first["event"], "inference.start");
    assert_eq!(first["worker_id"], "flood");
    assert_eq!(first["measurements"]["i"], 0);

    // Flood while the stream is not read: 20,000 events of 2 KiB (far more than socket
    // buffers hold), one in ten outside the pattern.
    let pad = "x".repeat(2000);
    let total = 20_000;
    for i in 1..=total {
        let name = if i % 10 == 0 {
            "gpu.util"
        } else {
            "inference.token"
        };
        sender.send(event(name, i, &pad)).await.expect("send");
    }
    let matching = total - total / 10;
    eventually("the hub to receive the flood", WAIT, || {
        let mut client = client.clone();
        async move {
            let info = worker_info(&mut client, "flood").await?;
            (info.events_received > u64::try_from(total).unwrap()).then_some(())
        }
    })
    .await;

    let (mut delivered, mut skipped, mut lag_notices, mut last) = (0, 0, 0, 0);
    while delivered + skipped < matching {
        let (name, message) = events.next().await;
        assert_eq!(name, "message");
        match message["type"].as_str() {
            Some("event") => {
                assert_eq!(message["event"], "inference.token", "{message}");
                let i = message["measurements"]["i"].as_i64().expect("i");
                assert!(i > last, "out of order: {i} after {last}");
                last = i;
                delivered += 1;
            }
            Some("lag") => {
                let count = message["skipped"].as_i64().expect("skipped");
                assert!(count > 0, "{message}");
                skipped += count;
                lag_notices += 1;
            }
            _ => panic!("unexpected message {message}"),
        }
    }
    assert_eq!(
        delivered + skipped,
        matching,
        "every event delivered or counted as skipped"
    );
    assert!(
        lag_notices > 0 && skipped > 0,
        "the stream was never told it lagged"
    );
    assert!(
        delivered >= 64,
        "at least a queue's worth arrived: {delivered}"
    );
}

/// A one-page web server on loopback: serves its page at `/` and hands what the page POSTs to
/// `/report` to `reports`.
struct PageServer {
    port: u16,
    page: Arc<Mutex<String>>,
    reports: std::sync::mpsc::Receiver<String>,
}

impl PageServer {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the page server");
        let port = listener.local_addr().expect("address").port();
        let page = Arc::new(Mutex::new(String::new()));
        let (reports, received) = std::sync::mpsc::channel();
        let serving = page.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let _ = answer(stream, &serving, &reports);
            }
        });
        Self {
            port,
            page,
            reports: received,
        }
    }
}

fn answer(
    mut stream: std::net::TcpStream,
    page: &Mutex<String>,
    reports: &std::sync::mpsc::Sender<String>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let (content_type, reply) = if request_line.starts_with("POST /report") {
        let _ = reports.send(String::from_utf8_lossy(&body).into_owned());
        ("text/plain", String::new())
    } else if request_line.starts_with("GET / ") {
        ("text/html", page.lock().expect("page").clone())
    } else {
        ("text/plain", "not here".to_owned())
    };
    write!(
        stream,
        "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
        reply.len()
    )
}

/// Headless Chromium, or `None` when it is not installed (./test.sh installs it and sets
/// BRIDGE_REQUIRE_CHROMIUM, so CI never skips).
fn chromium() -> Option<&'static str> {
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new(name)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if found {
            return Some(name);
        }
    }
    skip_without(
        "BRIDGE_REQUIRE_CHROMIUM",
        "no chromium (Debian package chromium) for the browser test",
    );
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_event_source_receives_live_events() {
    let Some(browser) = chromium() else { return };
    // The page's origin must be allowed by the hub, and the page must know the hub's address.
    let server = PageServer::start();
    let hub = HubProcess::start_with(HubOptions {
        config: Some(format!(
            "[hub]\nhttp_allowed_origins = [\"http://127.0.0.1:{}\"]\n",
            server.port
        )),
        ..Default::default()
    });
    let _worker = WorkerProcess::start(&hub.url, "gpu-7", "llama", &["--simulate", "50"]);
    *server.page.lock().expect("page") = format!(
        r#"<!doctype html><html><body><script>
const received = [];
const source = new EventSource("http://{hub}/api/events?pattern=inference.%3E&worker=gpu-7");
source.onmessage = (message) => {{
  const item = JSON.parse(message.data);
  if (item.type !== "event") return;
  received.push(item);
  if (received.length === 3) {{
    source.close();
    fetch("/report", {{ method: "POST", body: JSON.stringify(received) }});
  }}
}};
source.onerror = () => {{
  if (source.readyState === EventSource.CLOSED) {{
    fetch("/report", {{ method: "POST", body: "closed" }});
  }}
}};
</script></body></html>"#,
        hub = hub.http
    );
    let profile = tempfile::tempdir().expect("browser profile");
    let mut browser = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            // Containers often have a small /dev/shm, where Chromium would crash.
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("http://127.0.0.1:{}/", server.port))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start chromium");
    let report =
        tokio::task::block_in_place(|| server.reports.recv_timeout(Duration::from_secs(60)));
    // Chromium runs several processes; its group goes with it.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{}", browser.id())])
        .status();
    let _ = browser.wait();
    let report = report.expect("the page reports the events it received");
    let received: Value = serde_json::from_str(&report)
        .unwrap_or_else(|_| panic!("the page's EventSource failed: {report}"));
    let received = received.as_array().expect("an array");
    assert_eq!(received.len(), 3);
    for item in received {
        assert_eq!(item["worker_id"], "gpu-7", "{item}");
        assert!(
            item["event"]
                .as_str()
                .is_some_and(|e| e.starts_with("inference.")),
            "{item}"
        );
    }
}

/// curl sends the `>` of `?pattern=inference.>` as typed, which the HTTP stack refuses; the 400
/// says why and how to send it, in the API's error shape, and the encoded form is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pattern_sent_unencoded_gets_a_400_that_says_why() {
    let hub = HubProcess::start();
    let refused = http_get(
        hub.http,
        "/api/events?pattern=inference.>&worker=gpu-3",
        &[],
    );
    assert_eq!(refused.status, 400, "{refused:?}");
    let error: Value = serde_json::from_str(&refused.body).expect("a JSON error");
    let message = error["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("`>`") && message.contains("%3E") && message.contains("--data-urlencode"),
        "{message}"
    );
    assert_eq!(error["error"]["status"], "INVALID_ARGUMENT");
    let served = http_get(hub.http, "/api/workers?pool=%3E", &[]);
    assert_eq!(served.status, 200, "{served:?}");
}

/// `?trace=` follows one request: only its events arrive, with their ids in hex.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tail_follows_one_trace() {
    let hub = HubProcess::start();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut events =
        EventStream::open(&format!("http://{}/api/events?trace={trace}", hub.http)).await;
    hub.wait_for_subscribers(1, WAIT).await;
    let mut client = hub.client().await;
    let (sender, _controls) = open_stream(&mut client, &[(headers::WORKER_ID, "gpu-3")])
        .await
        .expect("worker stream");
    let traces = [vec![0x11; 16], hex_bytes(trace), vec![0x22; 16]];
    for (i, trace_id) in traces.into_iter().enumerate() {
        let mut traced = event("inference.stop", i as i64, "");
        traced.trace_id = trace_id;
        traced.span_id = vec![0x0a; 8];
        sender.send(traced).await.expect("send");
    }
    let (_, only) = events.next().await;
    assert_eq!(only["trace_id"], trace, "{only}");
    assert_eq!(only["span_id"], "0a".repeat(8));
    assert_eq!(only["measurements"]["i"], 1);
}

fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}
