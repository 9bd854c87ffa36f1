//! The one subscription `bridge top` keeps: `gpu.metrics` for the workers' GPU column,
//! `inference.stop` and `inference.exception` for the models view.
//!
//! A task of its own reads the stream into shared state that the view reads once per refresh:
//! at tens of thousands of events a second the view never wakes per event, and an event costs
//! an uncontended lock, a few map lookups and some adds ([`super::models`]). Lag notices are
//! counted for the view to show; a stream that ends or fails is opened again, its reason shown
//! meanwhile.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use bridge::{client::HubClient, render::printable};
use bridge_proto::{
    protocol::{gpu, inference},
    v1::{self, subscribe_response::Item, telemetry_value::Value},
};
use tokio::task::JoinHandle;

use super::models::{self, Models, Request};

/// Waits before opening a failed subscription again: doubling from the first, up to the second.
const RETRY: (Duration, Duration) = (Duration::from_millis(500), Duration::from_secs(5));

/// How long the hub may hold top's events to send them together: well under a refresh (50 ms at
/// the shortest), and at tens of thousands of events a second it spares the hub and top most of
/// their writes and reads.
const LINGER_MS: u32 = 20;

/// The event patterns top subscribes to.
pub const PATTERNS: [&str; 3] = [gpu::METRICS_EVENT, inference::STOP, inference::EXCEPTION];

/// The subscription's task and what it has read; dropping it stops the task.
#[derive(Debug)]
pub struct Feed {
    shared: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    models: Models,
    gpu_utilization: HashMap<String, i64>,
    /// Why there is no stream, while there is none.
    problem: Option<String>,
}

/// What the view takes from the feed at each refresh.
#[derive(Debug, Default)]
pub struct Reading {
    pub gpu_utilization: HashMap<String, i64>,
    pub models: models::Snapshot,
    pub problem: Option<String>,
}

impl Feed {
    /// Follows the hub's events, of workers in `pool` only when given.
    pub fn start(client: HubClient, pool: Option<String>) -> Self {
        let shared = Arc::new(Mutex::new(State {
            models: Models::new(Instant::now()),
            gpu_utilization: HashMap::new(),
            problem: None,
        }));
        let request = v1::SubscribeRequest {
            patterns: PATTERNS.map(str::to_owned).to_vec(),
            pool: pool.unwrap_or_default(),
            linger_ms: LINGER_MS,
            ..Default::default()
        };
        let task = tokio::spawn(follow(client, request, shared.clone()));
        Self { shared, task }
    }

    pub fn read(&self) -> Reading {
        let now = Instant::now();
        let mut state = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        Reading {
            gpu_utilization: state.gpu_utilization.clone(),
            models: state.models.snapshot(now),
            problem: state.problem.clone(),
        }
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn follow(mut client: HubClient, request: v1::SubscribeRequest, shared: Arc<Mutex<State>>) {
    let set_problem = |problem: Option<String>| {
        shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .problem = problem;
    };
    let mut wait = RETRY.0;
    loop {
        let ended = match client.subscribe(request.clone()).await {
            Ok(mut stream) => {
                set_problem(None);
                wait = RETRY.0;
                loop {
                    match stream.message().await {
                        Ok(Some(response)) => {
                            let now = Instant::now();
                            let mut state = shared.lock().unwrap_or_else(PoisonError::into_inner);
                            state.receive(now, response);
                        }
                        Ok(None) => break "the hub ended the event stream".to_owned(),
                        Err(status) => break format!("event stream: {}", status.message()),
                    }
                }
            }
            Err(error) => format!("cannot subscribe: {error}"),
        };
        set_problem(Some(format!(
            "{}; again in {}",
            printable(&ended),
            humantime::format_duration(wait)
        )));
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY.1);
    }
}

impl State {
    fn receive(&mut self, now: Instant, response: v1::SubscribeResponse) {
        let delivery = match response.item {
            Some(Item::Event(delivery)) => delivery,
            Some(Item::Lagged(lag)) => {
                self.models.lagged(now, lag.skipped);
                return;
            }
            None => return,
        };
        let Some(event) = &delivery.event else {
            return;
        };
        let parts = &event.event_parts;
        let failed = if named(parts, inference::STOP) {
            false
        } else if named(parts, inference::EXCEPTION) {
            true
        } else {
            if named(parts, gpu::METRICS_EVENT)
                && let Some(percent) = gpu_utilization(event)
            {
                self.gpu_utilization.insert(delivery.worker_id, percent);
            }
            return;
        };
        let request = Request {
            failed,
            weight: models::weight(delivery.sampling_rate),
            duration_ns: count(event, inference::DURATION_NS),
            time_to_first_token_ns: count(event, inference::TIME_TO_FIRST_TOKEN_NS),
            output_tokens: count(event, inference::OUTPUT_TOKENS),
        };
        let model = event
            .metadata
            .get(inference::MODEL)
            .map_or("", String::as_str);
        self.models.record(now, &delivery.pool, model, &request);
    }
}

/// Whether `parts` are the tokens of the dotted `name`.
fn named(parts: &[String], name: &str) -> bool {
    let mut tokens = name.split('.');
    parts.iter().all(|part| tokens.next() == Some(part)) && tokens.next().is_none()
}

/// A measurement that counts something (nanoseconds, tokens): an int, or a float rounded, not
/// negative.
fn count(event: &v1::TelemetryEvent, key: &str) -> Option<u64> {
    match event.measurements.get(key)?.value {
        Some(Value::IntValue(n)) => u64::try_from(n).ok(),
        Some(Value::FloatValue(n)) if n.is_finite() && n >= 0.0 => Some(n.round() as u64),
        _ => None,
    }
}

/// The utilisation percent of a `gpu.metrics` event. NVML reports an int; an app writing its own
/// event in that shape may send a float, which is shown rounded rather than not at all.
pub fn gpu_utilization(event: &v1::TelemetryEvent) -> Option<i64> {
    match event.measurements.get(gpu::UTILIZATION_GPU_PERCENT)?.value {
        Some(Value::IntValue(percent)) => Some(percent),
        Some(Value::FloatValue(percent)) if percent.is_finite() => Some(percent.round() as i64),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(n: i64) -> v1::TelemetryValue {
        v1::TelemetryValue {
            value: Some(Value::IntValue(n)),
        }
    }

    fn delivery(name: &str, rate: f64, measurements: &[(&str, i64)]) -> v1::SubscribeResponse {
        let event = v1::TelemetryEvent {
            event_parts: name.split('.').map(str::to_owned).collect(),
            measurements: measurements
                .iter()
                .map(|(k, v)| ((*k).to_owned(), int(*v)))
                .collect(),
            metadata: [(inference::MODEL.to_owned(), "llama-70b".to_owned())].into(),
            ..Default::default()
        };
        v1::SubscribeResponse {
            item: Some(Item::Event(v1::EventDelivery {
                worker_id: "gpu-1".into(),
                pool: "llama".into(),
                event: Some(event),
                sampling_rate: rate,
                received_ns: 0,
            })),
        }
    }

    #[test]
    fn names_match_whole_tokens_only() {
        let parts = |name: &str| name.split('.').map(str::to_owned).collect::<Vec<_>>();
        assert!(named(&parts("inference.stop"), inference::STOP));
        assert!(!named(&parts("inference.stop.x"), inference::STOP));
        assert!(!named(&parts("inference"), inference::STOP));
        assert!(!named(&parts("inference.stopped"), inference::STOP));
    }

    /// The feed reads the conventions' names (`docs/conventions.md`), weighs by the delivered
    /// rate, and counts lag notices; other events and `inference.start` count for nothing.
    #[test]
    fn the_feed_reads_inference_events_gpu_metrics_and_lag() {
        let origin = Instant::now();
        let mut state = State {
            models: Models::new(origin),
            gpu_utilization: HashMap::new(),
            problem: None,
        };
        let stop = [
            (inference::DURATION_NS, 20_000_000),
            (inference::TIME_TO_FIRST_TOKEN_NS, 2_000_000),
            (inference::OUTPUT_TOKENS, 50),
        ];
        state.receive(origin, delivery(inference::STOP, 0.5, &stop));
        state.receive(
            origin,
            delivery(inference::EXCEPTION, 0.5, &[(inference::DURATION_NS, 1)]),
        );
        state.receive(origin, delivery(inference::START, 0.5, &[]));
        state.receive(
            origin,
            delivery(
                gpu::METRICS_EVENT,
                1.0,
                &[(gpu::UTILIZATION_GPU_PERCENT, 40)],
            ),
        );
        state.receive(
            origin,
            v1::SubscribeResponse {
                item: Some(Item::Lagged(v1::LagNotice { skipped: 12 })),
            },
        );
        assert_eq!(state.gpu_utilization.get("gpu-1"), Some(&40));
        let snapshot = state.models.snapshot(origin);
        assert_eq!(snapshot.skipped, 12);
        let [row] = &snapshot.rows[..] else {
            panic!("{snapshot:?}")
        };
        assert_eq!(
            (row.pool.as_str(), row.model.as_str()),
            ("llama", "llama-70b")
        );
        assert_eq!(row.events, 2);
        assert_eq!(row.requests_per_second, 4.0);
        assert_eq!(row.error_share, 0.5);
        assert_eq!(row.output_tokens_per_second, 100.0);
        assert!(row.time_to_first_token_p50_ns.is_some());
    }
}
