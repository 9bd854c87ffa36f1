//! A worker written from the telemetry-stream seed design: its `GrpcTelemetryEmitter` as the
//! seed document gives it, in Python over stubs generated from the .proto
//! (`tests/python/seed_emitter.py`). It sends no identity and never acknowledges, but it applies
//! the `sampling` messages it is sent, so sampling cuts its cost at the source: streaming to the
//! hub, and to a sidecar's local endpoint.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use bridge_tests::{
    HubProcess, PythonGrpc, Recorder, WorkerProcess, eventually, first_connected, matching, name,
    run_cli,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);
/// Rounds (an `inference.start` and an `inference.stop` each) per measurement window.
const ROUNDS: u64 = 1000;

/// The emitter's counters at one moment: rounds started, and per event name how many it was
/// asked to emit and how many passed its own sampling into its send queue.
#[derive(Debug, Clone, Copy)]
struct Stats {
    next: u64,
    emitted: u64,
    sent: u64,
}

impl Stats {
    fn parse(line: &Value) -> Option<Self> {
        let stats = line.get("stats")?;
        let total = |key: &str| {
            stats[key]
                .as_object()
                .map(|by_name| by_name.values().filter_map(Value::as_u64).sum())
        };
        Some(Self {
            next: stats["next"].as_u64()?,
            emitted: total("emitted")?,
            sent: total("sent")?,
        })
    }

    /// The fraction of what the app emitted between `self` and `later` that the client sent.
    fn sent_fraction(self, later: Stats) -> f64 {
        (later.sent - self.sent) as f64 / (later.emitted - self.emitted) as f64
    }
}

/// The seed emitter as a child process, its stdout lines (controls and stats) kept in order.
struct SeedEmitter {
    child: Child,
    lines: Arc<Mutex<Vec<Value>>>,
}

impl SeedEmitter {
    fn start(python: &PythonGrpc, target: &str) -> Self {
        let mut child = python
            .script("seed_emitter.py")
            .arg(target)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the seed emitter");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(value) = serde_json::from_str(&line) {
                    sink.lock().expect("lines").push(value);
                }
            }
        });
        Self { child, lines }
    }

    fn lines(&self) -> Vec<Value> {
        self.lines.lock().expect("lines").clone()
    }

    /// Waits for a `sampling` message after line `position` that sets `rate`; returns its
    /// line's position, after which the emitter samples at `rate`.
    async fn sampling_message(&self, position: usize, rate: f64) -> usize {
        let (at, sampling) = eventually(
            &format!("a sampling message with rate {rate} to reach the seed emitter"),
            WAIT,
            || {
                let found = self
                    .lines()
                    .into_iter()
                    .enumerate()
                    .skip(position)
                    // proto3's JSON leaves out a rate of 0 and every empty list.
                    .find(|(_, line)| {
                        line["sampling"].is_object()
                            && line["sampling"]["samplingRate"].as_f64().unwrap_or(0.0) == rate
                    });
                async move { found }
            },
        )
        .await;
        assert!(
            sampling["sampling"].get("eventPatterns").is_none(),
            "plain clients ignore patterns, so none are sent: {sampling}"
        );
        at
    }

    /// The first stats the emitter printed after line `position`, once it got as far as `next`.
    async fn stats(&self, position: usize, next: u64) -> Stats {
        eventually("the seed emitter to get on", WAIT, || {
            let found = self.lines()[position..]
                .iter()
                .filter_map(Stats::parse)
                .find(|stats| stats.next >= next);
            async move { found }
        })
        .await
    }

    /// The stats at the start and end of a window of [`ROUNDS`] rounds after line `position`.
    async fn window(&self, position: usize) -> (Stats, Stats) {
        let start = self.stats(position, 0).await;
        let end = self.stats(position, start.next + ROUNDS).await;
        (start, end)
    }
}

impl Drop for SeedEmitter {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The round of a delivered event, from its correlation id `py-N`.
fn round(delivery: &bridge_proto::v1::EventDelivery) -> u64 {
    delivery
        .event
        .as_ref()
        .and_then(|e| e.correlation_id.strip_prefix("py-"))
        .and_then(|n| n.parse().ok())
        .expect("a correlation id py-N")
}

/// `kept` of `n` events is a plausible draw at `rate`: within six standard deviations.
fn assert_rate(what: &str, kept: usize, n: usize, rate: f64) {
    let expected = n as f64 * rate;
    let sd = (n as f64 * rate * (1.0 - rate)).sqrt();
    assert!(
        (kept as f64 - expected).abs() < 6.0 * sd,
        "{what}: {kept} of {n}, expected about {expected:.0} at rate {rate}"
    );
}

/// The deliveries from rounds `[start, end)`, once the tail got past `end`.
async fn delivered(
    tail: &Recorder,
    start: Stats,
    end: Stats,
) -> Vec<bridge_proto::v1::EventDelivery> {
    eventually("the window's events to reach the subscriber", WAIT, || {
        let past = tail.deliveries().iter().any(|d| round(d) >= end.next);
        async move { past.then_some(()) }
    })
    .await;
    tail.deliveries()
        .into_iter()
        .filter(|d| (start.next..end.next).contains(&round(d)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_emitter_is_sent_sampling_and_samples_at_the_source() {
    sampling_at_the_source(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_emitter_on_a_sidecars_local_endpoint_samples_at_the_source() {
    sampling_at_the_source(true).await;
}

/// The seed emitter streams to the hub, or `via_sidecar` to a sidecar's local endpoint (its
/// events then come from the sidecar's worker id, and the sidecar applies the hub's control).
async fn sampling_at_the_source(via_sidecar: bool) {
    let Some(python) = PythonGrpc::set_up() else {
        return;
    };
    let hub = HubProcess::start();
    let mut client = hub.client().await;
    let tail = Recorder::start(&mut client, matching(&["inference.>"])).await;
    let socket_dir = tempfile::tempdir().expect("temp dir");
    let socket = socket_dir.path().join("worker.sock");
    let socket = socket.to_str().expect("utf-8");
    let _sidecar =
        via_sidecar.then(|| WorkerProcess::start(&hub.url, "side-seed", "", &["--local", socket]));
    let target = if via_sidecar {
        format!("unix:{socket}")
    } else {
        hub.addr.to_string()
    };
    let seed = SeedEmitter::start(&python, &target);
    let worker = eventually("the emitter's worker to be listed", WAIT, || {
        first_connected(&client)
    })
    .await;
    assert_eq!(
        worker.id.starts_with("anon-"),
        !via_sidecar,
        "{}",
        worker.id
    );

    // On connect it is sent the rate of its state, 1.0, and sends everything.
    let connected = seed.sampling_message(0, 1.0).await;
    let (start, end) = seed.window(connected).await;
    let before = start.sent_fraction(end);
    assert!(before > 0.95, "before any change it sent {before:.3}");

    // At 0.1 it sends a tenth of what it did, and the hub delivers those at 0.1 without
    // thinning them again (0.1 × 0.1 would leave a hundredth).
    let asked = seed.lines().len();
    let out = run_cli(&hub.url, &["sample", &worker.id, "0.1"]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let cut = seed.sampling_message(asked, 0.1).await;
    let (start, end) = seed.window(cut).await;
    let after = start.sent_fraction(end);
    assert_rate(
        "events the client sent at 0.1",
        (end.sent - start.sent) as usize,
        (end.emitted - start.emitted) as usize,
        0.1 * before,
    );
    let window = delivered(&tail, start, end).await;
    assert_rate(
        "events delivered at 0.1",
        window.len(),
        (end.emitted - start.emitted) as usize,
        0.1,
    );
    assert!(
        window.iter().all(|d| d.sampling_rate == 0.1),
        "deliveries say the rate they were kept at"
    );
    println!("sent {before:.3} of events at 1.0, {after:.3} at 0.1");

    // A rule for inference.start under a default of 1.0: the client is sent 1.0 and sends
    // everything again, the hub keeps a tenth of the starts and every stop.
    let asked = seed.lines().len();
    let out = run_cli(&hub.url, &["reset", &worker.id]).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    seed.sampling_message(asked, 1.0).await;
    let asked = seed.lines().len();
    let rule = ["sample", &worker.id, "0.1", "--pattern", "inference.start"];
    let out = run_cli(&hub.url, &rule).await;
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let ruled = seed.sampling_message(asked, 1.0).await;
    let (start, end) = seed.window(ruled).await;
    assert!(start.sent_fraction(end) > 0.95);
    let window = delivered(&tail, start, end).await;
    let (starts, stops): (Vec<_>, Vec<_>) =
        window.iter().partition(|d| name(d) == "inference.start");
    let stopped: BTreeSet<u64> = stops.iter().map(|d| round(d)).collect();
    let rounds = (end.next - start.next) as usize;
    assert_eq!(
        (stopped.len(), stops.len()),
        (rounds, rounds),
        "every inference.stop arrives, once"
    );
    assert!(stops.iter().all(|d| d.sampling_rate == 1.0));
    assert_rate(
        "inference.start delivered under its rule",
        starts.len(),
        (end.next - start.next) as usize,
        0.1,
    );
    assert!(starts.iter().all(|d| d.sampling_rate == 0.1));
}
