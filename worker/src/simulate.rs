//! Synthetic inference traffic, for demos, smoke tests and benchmarks.
//!
//! Each simulated request emits `inference.start` and `inference.stop` (or, for about 1 in 100,
//! `inference.exception`) with one correlation id, the way an instrumented model server would;
//! once a second the worker also reports its one simulated GPU as `gpu.metrics`, through the
//! same code as NVML's samples, so that `bridge top` and dashboards read it like a real one.

use std::time::{Duration, Instant};

use rand::{RngExt, rngs::SmallRng};
use tokio_util::sync::CancellationToken;

use crate::{
    emitter::{Emitter, new_correlation_id},
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

/// One request's events.
pub fn request(emitter: &Emitter, model: &str, rng: &mut SmallRng) {
    let id = new_correlation_id();
    let batch_size: i64 = [1, 2, 4, 8, 16][rng.random_range(0..5)];
    let tokens_in: i64 = rng.random_range(16..2048);
    let tokens_out: i64 = rng.random_range(1..512);
    let metadata = [("model", model), ("route", "/v1/completions")];
    emitter.emit(
        "inference.start",
        &[
            ("batch_size", Value::Int(batch_size)),
            ("tokens_in", Value::Int(tokens_in)),
        ],
        &metadata,
        Some(&id),
    );
    let round = |ms: f64| (ms * 100.0).round() / 100.0;
    let latency_ms = round(5.0 + tokens_out as f64 * rng.random_range(0.02..0.08));
    if rng.random_range(0..100) == 0 {
        emitter.emit(
            "inference.exception",
            &[("duration_ms", Value::Float(latency_ms))],
            &[
                ("model", model),
                ("result", "error"),
                ("error_type", "CudaOutOfMemory"),
            ],
            Some(&id),
        );
    } else {
        emitter.emit(
            "inference.stop",
            &[
                ("batch_size", Value::Int(batch_size)),
                ("tokens_in", Value::Int(tokens_in)),
                ("tokens_out", Value::Int(tokens_out)),
                ("duration_ms", Value::Float(latency_ms)),
                (
                    "ttft_ms",
                    Value::Float(round(latency_ms * rng.random_range(0.05..0.3))),
                ),
            ],
            &[("model", model), ("result", "success")],
            Some(&id),
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
}
