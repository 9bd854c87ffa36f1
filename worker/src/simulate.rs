//! Synthetic inference traffic, for demos, smoke tests and benchmarks.
//!
//! Each simulated request emits `inference.start` and `inference.stop` (or, for about 1 in 100,
//! `inference.exception`) with the fields of `docs/conventions.md`, the way an instrumented
//! model server would: one span, the child of an API gateway's span in a trace of its own
//! (the gateway's `traceparent`), its correlation id the trace id's hex;
//! once a second the worker also reports its one simulated GPU as `gpu.metrics`, through the
//! same code as NVML's samples, so that `bridge top` and dashboards read it like a real one.

use std::time::{Duration, Instant};

use bridge_proto::{
    protocol::inference::{
        BATCH_FILL_RATIO, BATCH_SIZE, CACHED_INPUT_TOKENS, DURATION_NS, ERROR_MESSAGE, ERROR_TYPE,
        EXCEPTION, INPUT_TOKENS, MODEL, OUTPUT_TOKENS, QUEUE_WAIT_NS, RESULT, RESULT_ERROR,
        RESULT_SUCCESS, START, STOP, SYSTEM_TIME_NS, TIME_TO_FIRST_TOKEN_NS,
    },
    trace::{SpanContext, SpanId, TraceId},
};
use rand::{RngExt, rngs::SmallRng};
use tokio_util::sync::CancellationToken;

use crate::{
    emitter::{Emitter, now_ns},
    gpu::{self, DeviceSample},
    value::Value,
};

/// What a simulated worker tells the hub it has (`x-worker-gpu`), as `GpuSource::describe`
/// would for a real one.
pub const GPU_DESCRIPTION: &str = "1x Simulated GPU";

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Simulation {
    pub model: String,
    /// Requests per second (each is two events).
    pub requests_per_second: f64,
}

/// Emits simulated traffic until `until` is cancelled.
pub async fn run(emitter: Emitter, simulation: Simulation, until: CancellationToken) {
    let mut rng: SmallRng = rand::make_rng();
    let started = Instant::now();
    let mut requests = 0u64;
    let mut gpu_reports = 0u64;
    // Tokio timers have millisecond resolution, so emit whatever is due on each tick.
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            () = until.cancelled() => return,
            _ = tick.tick() => {}
        }
        let elapsed = started.elapsed().as_secs_f64();
        let due = (elapsed * simulation.requests_per_second) as u64;
        while requests < due {
            request(&emitter, &simulation.model, &mut rng);
            requests += 1;
        }
        while gpu_reports <= elapsed as u64 {
            gpu(&emitter, &mut rng);
            gpu_reports += 1;
        }
    }
}

/// The most requests the simulated server batches together.
const MAX_BATCH_SIZE: i64 = 16;

/// One request's events, with the fields `docs/conventions.md` names.
pub fn request(emitter: &Emitter, model: &str, rng: &mut SmallRng) {
    let trace = SpanContext::child_of(TraceId::random(), SpanId::random());
    let id = trace.trace_id.to_string();
    let emit = |name: &str, measurements: &[(&str, Value<'_>)], metadata: &[(&str, &str)]| {
        emitter.emit_in(name, measurements, metadata, &id, Some(&trace));
    };
    let batch_size: i64 = [1, 2, 4, 8, MAX_BATCH_SIZE][rng.random_range(0..5)];
    let input_tokens: i64 = rng.random_range(16..2048);
    let output_tokens: i64 = rng.random_range(1..512);
    let now = now_ns();
    emit(
        START,
        &[(SYSTEM_TIME_NS, Value::Int(now))],
        &[(MODEL, model)],
    );
    let ms = 1_000_000.0;
    let duration_ns = ((5.0 + output_tokens as f64 * rng.random_range(0.02..0.08)) * ms) as i64;
    let queue_wait_ns = (rng.random_range(0.0..3.0) * ms) as i64;
    let end = [
        (SYSTEM_TIME_NS, Value::Int(now + duration_ns)),
        (DURATION_NS, Value::Int(duration_ns)),
        (INPUT_TOKENS, Value::Int(input_tokens)),
        (QUEUE_WAIT_NS, Value::Int(queue_wait_ns)),
        (BATCH_SIZE, Value::Int(batch_size)),
        (
            BATCH_FILL_RATIO,
            Value::Float(batch_size as f64 / MAX_BATCH_SIZE as f64),
        ),
    ];
    if rng.random_range(0..100) == 0 {
        emit(
            EXCEPTION,
            &end,
            &[
                (MODEL, model),
                (RESULT, RESULT_ERROR),
                (ERROR_TYPE, "CudaOutOfMemory"),
                (ERROR_MESSAGE, "simulated: CUDA out of memory"),
            ],
        );
    } else {
        let time_to_first_token_ns = (duration_ns as f64 * rng.random_range(0.05..0.3)) as i64;
        let cached_input_tokens = input_tokens * rng.random_range(0..=50) / 100;
        let generated = [
            (OUTPUT_TOKENS, Value::Int(output_tokens)),
            (CACHED_INPUT_TOKENS, Value::Int(cached_input_tokens)),
            (TIME_TO_FIRST_TOKEN_NS, Value::Int(time_to_first_token_ns)),
        ];
        let measurements: Vec<_> = end.into_iter().chain(generated).collect();
        emit(
            STOP,
            &measurements,
            &[(MODEL, model), (RESULT, RESULT_SUCCESS)],
        );
    }
}

/// One sample of the simulated GPU, emitted as a real device's would be.
pub fn gpu(emitter: &Emitter, rng: &mut SmallRng) {
    gpu::emit(emitter, &[gpu_sample(rng)]);
}

fn gpu_sample(rng: &mut SmallRng) -> DeviceSample {
    DeviceSample {
        index: 0,
        uuid: "GPU-simulated-0000".into(),
        name: "Simulated GPU".into(),
        utilization_gpu_percent: Some(rng.random_range(55..=99)),
        utilization_memory_percent: Some(rng.random_range(20..=60)),
        memory_used_bytes: Some(rng.random_range(30..70) << 30),
        memory_total_bytes: Some(80 << 30),
        temperature_celsius: Some(rng.random_range(55..=80)),
        power_watts: Some((rng.random_range(200.0..400.0_f64) * 10.0).round() / 10.0),
        sm_clock_mhz: Some(1410),
        // A simulated model server has no real process on a device to name.
        processes: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The simulated GPU carries every documented `gpu.metrics` key a real device reports, so
    /// anything built against NVML's events (top, dashboards) works on the demo too.
    #[test]
    fn the_simulated_gpu_reports_like_a_real_one() {
        use bridge_proto::protocol::gpu::{METRICS_EVENT, UTILIZATION_GPU_PERCENT};
        let simulated = Emitter::detached(8);
        gpu(&simulated, &mut rand::make_rng());
        let real = Emitter::detached(8);
        let mut fake = gpu::FakeGpus::new(1);
        fake.devices[0].processes.clear();
        gpu::emit(&real, &fake.devices);
        let (simulated, real) = (&simulated.buffered()[0], &real.buffered()[0]);
        assert_eq!(simulated.event_parts.join("."), METRICS_EVENT);
        assert_eq!(simulated.event_parts, real.event_parts);
        let keys = |e: &bridge_proto::v1::TelemetryEvent| {
            let mut keys: Vec<String> = e.measurements.keys().cloned().collect();
            keys.sort();
            keys
        };
        assert_eq!(keys(simulated), keys(real));
        assert!(keys(simulated).contains(&UTILIZATION_GPU_PERCENT.to_owned()));
    }

    /// Simulated requests carry the conventional names, so the demo exercises what real
    /// instrumented servers send.
    #[test]
    fn simulated_requests_follow_the_inference_conventions() {
        use bridge_proto::protocol::inference;
        let emitter = Emitter::detached(1024);
        let mut rng = rand::make_rng();
        for _ in 0..300 {
            request(&emitter, "llama", &mut rng);
        }
        let events = emitter.buffered();
        for event in &events {
            let name = event.event_parts.join(".");
            assert!([START, STOP, EXCEPTION].contains(&name.as_str()), "{name}");
            assert_eq!(event.metadata[MODEL], "llama");
            for key in event.measurements.keys().chain(event.metadata.keys()) {
                assert!(
                    inference::MEASUREMENTS.contains(&key.as_str())
                        || inference::METADATA.contains(&key.as_str()),
                    "{key} is not a conventional name"
                );
            }
        }
        let stop = events
            .iter()
            .find(|e| e.event_parts.join(".") == STOP)
            .expect("a stop");
        for key in [
            DURATION_NS,
            INPUT_TOKENS,
            OUTPUT_TOKENS,
            TIME_TO_FIRST_TOKEN_NS,
            QUEUE_WAIT_NS,
            BATCH_SIZE,
        ] {
            assert!(stop.measurements.contains_key(key), "{key}");
        }
        assert_eq!(stop.metadata[RESULT], RESULT_SUCCESS);
        // One span per request, in a trace of its own under a gateway's span.
        let start = &events[0];
        assert_eq!(
            (
                start.trace_id.len(),
                start.span_id.len(),
                start.parent_span_id.len()
            ),
            (16, 8, 8)
        );
        assert_eq!(
            (&events[1].trace_id, &events[1].span_id),
            (&start.trace_id, &start.span_id)
        );
        assert_ne!(events[2].trace_id, start.trace_id);
    }
}
