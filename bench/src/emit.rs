//! Emit: the cost of `Emitter::emit` in the caller's thread, next to the naive way of doing the
//! same: building the generated message and encoding it.

use std::time::Instant;

use bridge_proto::{
    control::ControlState,
    sampling::Rate,
    v1::{TelemetryEvent, TelemetryValue, telemetry_value::Value as Wire},
};
use prost::Message;
use worker::{Emitter, Value};

use crate::{
    Plan, Section, progress,
    report::{Figure, median},
};

/// Nanoseconds per call of `emit` with realistic arguments, for emitters in three states.
#[derive(Debug, Clone, Copy)]
pub struct EmitCost {
    pub disabled_ns: f64,
    pub sampled_out_ns: f64,
    pub queued_ns: f64,
    /// Building a `TelemetryEvent` from the same arguments and encoding it.
    pub naive_ns: f64,
}

const MEASUREMENTS: usize = 3;

#[inline(never)]
fn emit_one(emitter: &Emitter, i: u64) {
    let measurements: [(&str, Value<'_>); MEASUREMENTS] = [
        ("tokens_in", Value::Int(1337)),
        ("tokens_out", Value::Int(i as i64)),
        ("duration_ms", Value::Float(48.25)),
    ];
    emitter.emit(
        "inference.stop",
        &measurements,
        &[("model", "llama-3-8b")],
        Some("6f1c9a2b8d3e4f5061728394a5b6c7d8"),
    );
}

#[inline(never)]
fn naive_one(out: &mut Vec<Vec<u8>>, i: u64) {
    let value = |v| TelemetryValue { value: Some(v) };
    let event = TelemetryEvent {
        event_parts: "inference.stop".split('.').map(str::to_owned).collect(),
        measurements: [
            ("tokens_in".to_owned(), value(Wire::IntValue(1337))),
            ("tokens_out".to_owned(), value(Wire::IntValue(i as i64))),
            ("duration_ms".to_owned(), value(Wire::FloatValue(48.25))),
        ]
        .into(),
        metadata: [("model".to_owned(), "llama-3-8b".to_owned())].into(),
        timestamp_ns: 1,
        correlation_id: "6f1c9a2b8d3e4f5061728394a5b6c7d8".to_owned(),
        sequence: i,
        sampling_rate: 0.0,
        control_version: 1,
        ..Default::default()
    };
    out.push(event.encode_to_vec());
}

fn per_call(iterations: u64, mut f: impl FnMut(u64)) -> f64 {
    let started = Instant::now();
    for i in 0..iterations {
        f(i);
    }
    started.elapsed().as_nanos() as f64 / iterations as f64
}

/// One measurement of each; `scale` shortens it (quick runs).
pub fn measure(scale: u64) -> EmitCost {
    let fast = 2_000_000 / scale;
    let slow = 200_000 / scale;
    let with = |enabled: bool, rate: Rate, capacity: usize| {
        let emitter = Emitter::detached(capacity);
        emitter.apply_control(ControlState::new(1, enabled, rate, vec![], vec![], vec![]));
        emitter
    };
    let disabled = with(false, Rate::ALL, 1);
    let sampled_out = with(true, Rate::NONE, 1);
    let queued = with(true, Rate::ALL, slow as usize + 1);
    let mut naive = Vec::with_capacity(slow as usize);
    EmitCost {
        disabled_ns: per_call(fast, |i| emit_one(&disabled, i)),
        sampled_out_ns: per_call(fast, |i| emit_one(&sampled_out, i)),
        queued_ns: per_call(slow, |i| emit_one(&queued, i)),
        naive_ns: per_call(slow, |i| naive_one(&mut naive, i)),
    }
}

/// The figures: the median of at least three measurements.
pub(crate) fn emit_cost(plan: &Plan) -> Vec<Figure> {
    let runs: Vec<EmitCost> = (0..plan.runs.max(3))
        .map(|i| {
            progress(&format!("emit cost (run {})", i + 1));
            measure(plan.emit_scale)
        })
        .collect();
    let pick = |f: fn(&EmitCost) -> f64| median(runs.iter().map(f).collect());
    let naive = pick(|c| c.naive_ns);
    let disabled = pick(|c| c.disabled_ns);
    let sampled_out = pick(|c| c.sampled_out_ns);
    let queued = pick(|c| c.queued_ns);
    vec![
        Figure::new(Section::Emit, "emit, telemetry disabled", "ns", disabled)
            .baseline(naive)
            .target("<= 20 ns", disabled <= 20.0),
        Figure::new(Section::Emit, "emit, sampled out", "ns", sampled_out)
            .baseline(naive)
            .target("<= 20 ns", sampled_out <= 20.0),
        Figure::new(Section::Emit, "emit, queued", "ns", queued)
            .baseline(naive)
            .target("<= 150 ns", queued <= 150.0),
    ]
}
