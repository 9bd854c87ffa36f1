//! The benchmark's other processes, started by the orchestrator as `bridge-bench role ...`.
//!
//! Each role prints `ready` once it is set up, then answers every `mark` line on stdin with one
//! JSON line of its counters (so the orchestrator reads them at exactly the moments it reads the
//! server's CPU time), takes `rate N` lines where it has a rate, and exits when stdin closes.

use std::{
    io::BufRead,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use async_stream::stream;
use bridge_proto::encoded::EncodedEvent;
use bridge_proto::protocol::inference;
use bridge_proto::v1;
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use serde_json::json;
use tokio::net::TcpListener;
use worker::{Link, LinkOptions, Value, emitter::now_ns};

use crate::{
    Error, baseline,
    payload::{self, Payload},
    wire::{self, RawItem},
};

/// Connections opened at once while setting up many workers or subscribers.
const CONNECTING: usize = 128;

#[derive(Debug, clap::Subcommand)]
pub enum Role {
    /// The baseline server.
    Baseline {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Worker streams sending pre-encoded events: as fast as flow control allows, or at `--rate`
    /// in total (open loop; changed by `rate N` on stdin).
    Load {
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 1)]
        streams: usize,
        #[arg(long)]
        rate: Option<f64>,
        /// Worker ids are PREFIX-0, PREFIX-1, ...
        #[arg(long, default_value = "bench")]
        prefix: String,
        /// Events named `bench.b0` to `bench.b99`, for subscribers that each match 1 %, in place
        /// of `inference.stop`.
        #[arg(long)]
        buckets: bool,
    },
    /// Workers made with the worker library (`Link` and `Emitter::emit`), each emitting
    /// `--rate` events per second.
    Workers {
        #[arg(long)]
        target: String,
        #[arg(long)]
        workers: usize,
        #[arg(long)]
        rate: f64,
    },
    /// Subscriptions counting deliveries.
    Subscribe {
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 1)]
        subscribers: usize,
        /// Each subscriber matches a different 1 % of the events instead of all of them.
        #[arg(long)]
        buckets: bool,
        /// Record emit → delivery latency from event timestamps.
        #[arg(long)]
        latency: bool,
        /// Only events from these workers (repeatable).
        #[arg(long = "worker")]
        workers: Vec<String>,
        /// The subscriptions' `linger_ms` (0: none).
        #[arg(long, default_value_t = 0)]
        linger_ms: u32,
    },
    /// Subscriptions that are never read: the hub can send them nothing once their windows
    /// are full.
    Stall {
        #[arg(long)]
        target: String,
        #[arg(long, default_value_t = 1)]
        subscribers: usize,
    },
    /// An OTLP/gRPC logs receiver counting the log records it accepts.
    OtlpReceiver {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Connected workers that acknowledge every control state and send nothing else, or one
    /// numbered event every `--every-ms` each (as a model server between requests does).
    Idle {
        #[arg(long)]
        target: String,
        #[arg(long)]
        workers: usize,
        #[arg(long, default_value = "bench")]
        prefix: String,
        #[arg(long, default_value_t = 0)]
        every_ms: u64,
    },
}

pub async fn run(role: Role) -> Result<(), Error> {
    let result = match role {
        Role::Baseline { listen } => baseline_server(listen).await,
        Role::OtlpReceiver { listen } => otlp_receiver(listen).await,
        Role::Load {
            target,
            streams,
            rate,
            prefix,
            buckets,
        } => load(&target, streams, rate, &prefix, buckets).await,
        Role::Workers {
            target,
            workers,
            rate,
        } => library_workers(&target, workers, rate).await,
        Role::Subscribe {
            target,
            subscribers,
            buckets,
            latency,
            workers,
            linger_ms,
        } => subscribe(&target, subscribers, buckets, latency, &workers, linger_ms).await,
        Role::Stall {
            target,
            subscribers,
        } => stall(&target, subscribers).await,
        Role::Idle {
            target,
            workers,
            prefix,
            every_ms,
        } => idle(&target, workers, &prefix, every_ms).await,
    };
    result.map_err(Error::Role)
}

async fn baseline_server(listen: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("bind {listen}: {e}"))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening on {address}");
    baseline::serve(listener).await
}

/// Counts the log records of every export request and accepts them all.
#[derive(Debug, Default, Clone)]
struct CountingReceiver {
    records: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::LogsService
    for CountingReceiver
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest,
        >,
    ) -> Result<
        tonic::Response<opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceResponse>,
        tonic::Status,
    > {
        let records: usize = request
            .get_ref()
            .resource_logs
            .iter()
            .flat_map(|r| &r.scope_logs)
            .map(|s| s.log_records.len())
            .sum();
        self.records.fetch_add(records as u64, Relaxed);
        Ok(tonic::Response::new(Default::default()))
    }
}

async fn otlp_receiver(listen: SocketAddr) -> Result<(), String> {
    use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::LogsServiceServer;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| format!("bind {listen}: {e}"))?;
    let address = listener.local_addr().map_err(|e| e.to_string())?;
    let receiver = CountingReceiver::default();
    let records = receiver.records.clone();
    let service = LogsServiceServer::new(receiver)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .max_decoding_message_size(64 << 20);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    println!("listening on {address}");
    serve_marks(move || json!({ "records": records.load(Relaxed) }), |_| {}).await;
    Ok(())
}

/// Answers `mark` lines with `report()` and passes `rate N` to `set_rate`, until stdin closes.
async fn serve_marks(
    report: impl Fn() -> serde_json::Value + Send + Sync + 'static,
    set_rate: impl Fn(f64) + Send + Sync + 'static,
) {
    println!("ready");
    let _ = tokio::task::spawn_blocking(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line == "mark" {
                println!("{}", report());
            } else if let Some(rate) = line.strip_prefix("rate ").and_then(|r| r.parse().ok()) {
                set_rate(rate);
            }
        }
    })
    .await;
}

/// Opens `count` things concurrently (a bounded number at a time), failing on the first error.
async fn open_all<T, F, Fut>(count: usize, open: F) -> Result<Vec<T>, String>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    futures_util::stream::iter(0..count)
        .map(open)
        .buffer_unordered(CONNECTING)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

async fn load(
    target: &str,
    streams: usize,
    rate: Option<f64>,
    prefix: &str,
    buckets: bool,
) -> Result<(), String> {
    let sent = Arc::new(AtomicU64::new(0));
    // Events per second over all streams, as f64 bits; 0 means as fast as possible.
    let total_rate = Arc::new(AtomicU64::new(rate.unwrap_or(0.0).to_bits()));
    let payload = Arc::new(if buckets {
        Payload::buckets()
    } else {
        Payload::default()
    });
    let open_loop = rate.is_some();
    let mut senders = Vec::with_capacity(streams);
    let firsts = {
        let mut queues = Vec::with_capacity(streams);
        for _ in 0..streams {
            let (tx, rx) = tokio::sync::mpsc::channel::<EncodedEvent>(65_536);
            senders.push(tx);
            queues.push(Mutex::new(Some(rx)));
        }
        let queues = Arc::new(queues);
        open_all(streams, |k| {
            let (sent, payload, queues) = (sent.clone(), payload.clone(), queues.clone());
            async move {
                let channel = wire::connect(target).await?;
                let events: std::pin::Pin<
                    Box<dyn futures_util::Stream<Item = EncodedEvent> + Send>,
                > = if open_loop {
                    let queue = queues[k]
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take()
                        .ok_or("queue taken twice")?;
                    Box::pin(tokio_stream::wrappers::ReceiverStream::new(queue))
                } else {
                    Box::pin(stream! {
                        let mut sequence = 0u64;
                        loop {
                            sequence += 1;
                            sent.fetch_add(1, Relaxed);
                            yield payload.event(sequence, now_ns());
                        }
                    })
                };
                let mut versions = wire::worker_stream(channel, &format!("{prefix}-{k}"), events)
                    .await
                    .map_err(|e| e.to_string())?;
                let first = versions.next().await;
                // Keep reading, so that acknowledgements keep flowing.
                tokio::spawn(async move { while versions.next().await.is_some() {} });
                Ok(first)
            }
        })
        .await?
    };
    drop(firsts);
    if open_loop {
        let (sent, payload, total_rate) = (sent.clone(), payload.clone(), total_rate.clone());
        std::thread::spawn(move || pace(&senders, &payload, &total_rate, &sent));
    }
    serve_marks(
        move || json!({ "events": sent.load(Relaxed) }),
        move |rate| total_rate.store(rate.to_bits(), Relaxed),
    )
    .await;
    Ok(())
}

/// The open-loop schedule, on a thread of its own: OS sleeps are far finer than the async
/// runtime's millisecond timer. Each event is stamped with the time it was due, so that any
/// delay, the generator's own included, counts as latency and none is omitted.
fn pace(
    senders: &[tokio::sync::mpsc::Sender<EncodedEvent>],
    payload: &Payload,
    total_rate: &AtomicU64,
    sent: &AtomicU64,
) {
    let (started, started_ns) = (Instant::now(), now_ns());
    let mut sequences = vec![0u64; senders.len()];
    let mut next_due = Duration::ZERO;
    let mut i = 0usize;
    loop {
        let rate = f64::from_bits(total_rate.load(Relaxed));
        if rate <= 0.0 {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let interval = Duration::from_secs_f64(1.0 / rate);
        let now = started.elapsed();
        if next_due + Duration::from_millis(100) < now {
            // A rate change: do not burst to pay an old schedule's debt.
            next_due = now;
        }
        while next_due <= now {
            let k = i % senders.len();
            i += 1;
            sequences[k] += 1;
            let intended = started_ns + i64::try_from(next_due.as_nanos()).unwrap_or(i64::MAX);
            // Blocks when the server falls far behind; the stamps keep the delay honest.
            if senders[k]
                .blocking_send(payload.event(sequences[k], intended))
                .is_err()
            {
                return;
            }
            sent.fetch_add(1, Relaxed);
            next_due += interval;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// Real worker-library workers, as a model server would run them.
async fn library_workers(target: &str, workers: usize, rate: f64) -> Result<(), String> {
    let emitted = Arc::new(AtomicU64::new(0));
    let mut links = Vec::with_capacity(workers);
    for k in 0..workers {
        let link = Link::start(LinkOptions::new(target, format!("bench-{k}")))
            .map_err(|e| e.to_string())?;
        links.push(link);
    }
    for link in &links {
        let mut state = link.state();
        tokio::time::timeout(
            Duration::from_secs(60),
            state.wait_for(|s| matches!(s, worker::LinkState::Connected { applied: Some(_) })),
        )
        .await
        .map_err(|_| "a worker did not connect in time".to_owned())?
        .map_err(|e| e.to_string())?;
    }
    for (k, link) in links.iter().enumerate() {
        let (emitter, emitted) = (link.emitter(), emitted.clone());
        tokio::spawn(async move {
            let interval = Duration::from_secs_f64(1.0 / rate);
            // Spread the workers over the interval instead of emitting in lockstep.
            tokio::time::sleep(interval.mul_f64(k as f64 / workers as f64)).await;
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut i = 0i64;
            loop {
                tick.tick().await;
                i += 1;
                emitter.emit(
                    inference::STOP,
                    &[
                        (inference::INPUT_TOKENS, Value::Int(1337)),
                        (inference::OUTPUT_TOKENS, Value::Int(i)),
                        (inference::DURATION_NS, Value::Int(48_250_000)),
                    ],
                    &[(inference::MODEL, "llama-3-8b")],
                    Some("6f1c9a2b8d3e4f5061728394a5b6c7d8"),
                );
                emitted.fetch_add(1, Relaxed);
            }
        });
    }
    serve_marks(move || json!({ "events": emitted.load(Relaxed) }), |_| {}).await;
    drop(links);
    Ok(())
}

#[derive(Debug)]
struct Deliveries {
    count: AtomicU64,
    lagged: AtomicU64,
    latency: Mutex<Histogram<u64>>,
}

async fn subscribe(
    target: &str,
    subscribers: usize,
    buckets: bool,
    latency: bool,
    workers: &[String],
    linger_ms: u32,
) -> Result<(), String> {
    let deliveries = Arc::new(Deliveries {
        count: AtomicU64::new(0),
        lagged: AtomicU64::new(0),
        latency: Mutex::new(
            Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?,
        ),
    });
    let streams = open_all(subscribers, |k| async move {
        let channel = wire::connect(target).await?;
        let patterns = if buckets {
            vec![payload::bucket_name(k as u64 % payload::BUCKETS)]
        } else {
            vec![">".to_owned()]
        };
        wire::subscribe(
            channel,
            v1::SubscribeRequest {
                patterns,
                worker_ids: workers.to_vec(),
                linger_ms,
                ..Default::default()
            },
            latency,
        )
        .await
        .map_err(|e| e.to_string())
    })
    .await?;
    for mut items in streams {
        let deliveries = deliveries.clone();
        tokio::spawn(async move {
            while let Ok(Some(item)) = items.message().await {
                match item {
                    RawItem::Event { timestamp_ns } => {
                        deliveries.count.fetch_add(1, Relaxed);
                        if latency {
                            let micros = (now_ns() - timestamp_ns).max(1000) / 1000;
                            let mut histogram =
                                deliveries.latency.lock().unwrap_or_else(|p| p.into_inner());
                            histogram.saturating_record(u64::try_from(micros).unwrap_or(1));
                        }
                    }
                    RawItem::Lagged(skipped) => {
                        deliveries.lagged.fetch_add(skipped, Relaxed);
                    }
                }
            }
        });
    }
    serve_marks(
        move || {
            let mut histogram = deliveries.latency.lock().unwrap_or_else(|p| p.into_inner());
            let report = json!({
                "deliveries": deliveries.count.load(Relaxed),
                "lagged": deliveries.lagged.load(Relaxed),
                "latency_us": {
                    "count": histogram.len(),
                    "p50": histogram.value_at_quantile(0.5),
                    "p99": histogram.value_at_quantile(0.99),
                    "p999": histogram.value_at_quantile(0.999),
                    "max": histogram.max(),
                },
            });
            histogram.reset();
            report
        },
        |_| {},
    )
    .await;
    Ok(())
}

async fn stall(target: &str, subscribers: usize) -> Result<(), String> {
    let held = open_all(subscribers, |_| async move {
        let channel = wire::connect(target).await?;
        wire::subscribe(channel, v1::SubscribeRequest::default(), false)
            .await
            .map_err(|e| e.to_string())
    })
    .await?;
    serve_marks(|| json!({}), |_| {}).await;
    drop(held);
    Ok(())
}

/// Numbered events, one every `every`, starting at a random point of the first interval so
/// that many workers do not send in step.
fn trickle(every: Duration) -> impl tokio_stream::Stream<Item = EncodedEvent> + Send {
    stream! {
        let offset = every.mul_f64(rand::random::<f64>());
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
        for sequence in 1.. {
            tick.tick().await;
            let event = v1::TelemetryEvent {
                event_parts: vec!["bench".into(), "heartbeat".into()],
                timestamp_ns: now_ns(),
                sequence,
                ..Default::default()
            };
            yield EncodedEvent::from_bytes(prost::Message::encode_to_vec(&event).into());
        }
    }
}

async fn idle(target: &str, workers: usize, prefix: &str, every_ms: u64) -> Result<(), String> {
    let applied = Arc::new(AtomicU64::new(0));
    let streams = open_all(workers, |k| async move {
        let channel = wire::connect(target).await?;
        let events = if every_ms == 0 {
            tokio_stream::pending().boxed()
        } else {
            trickle(Duration::from_millis(every_ms)).boxed()
        };
        let mut versions = wire::worker_stream(channel, &format!("{prefix}-{k}"), events)
            .await
            .map_err(|e| e.to_string())?;
        versions.next().await;
        Ok(versions)
    })
    .await?;
    for mut versions in streams {
        let applied = applied.clone();
        tokio::spawn(async move {
            while versions.next().await.is_some() {
                applied.fetch_add(1, Relaxed);
            }
        });
    }
    serve_marks(move || json!({ "applied": applied.load(Relaxed) }), |_| {}).await;
    Ok(())
}
