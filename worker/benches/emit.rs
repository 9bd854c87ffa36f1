//! What `Emitter::emit` and a span cost the caller: disabled, sampled out, and accepted into the
//! buffer.
//! `bridge-bench` reports the same figures next to the naive encoding; this is for profiling.

use bridge_proto::{
    control::ControlState,
    protocol::inference::{
        DURATION_NS, INPUT_TOKENS, MODEL, OPERATION, OUTPUT_TOKENS, STOP, TIME_TO_FIRST_TOKEN_NS,
    },
    sampling::Rate,
};
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use worker::{Emitter, Value};

fn emitter(enabled: bool, rate: Rate, capacity: usize) -> Emitter {
    let emitter = Emitter::detached(capacity);
    emitter.apply_control(ControlState::new(1, enabled, rate, vec![], vec![], vec![]));
    emitter
}

fn emit(emitter: &Emitter, i: i64) {
    emitter.emit(
        STOP,
        &[
            (INPUT_TOKENS, Value::Int(1337)),
            (OUTPUT_TOKENS, Value::Int(black_box(i))),
            (DURATION_NS, Value::Int(48_250_000)),
        ],
        &[(MODEL, "llama-3-8b")],
        Some("6f1c9a2b8d3e4f5061728394a5b6c7d8"),
    );
}

fn bench(c: &mut Criterion) {
    let disabled = emitter(false, Rate::ALL, 1);
    c.bench_function("emit/disabled", |b| b.iter(|| emit(&disabled, 1)));
    let sampled_out = emitter(true, Rate::NONE, 1);
    c.bench_function("emit/sampled_out", |b| b.iter(|| emit(&sampled_out, 1)));
    let by_id = emitter(true, Rate::new(0.01).expect("rate"), 1 << 20);
    c.bench_function("emit/sampled_by_correlation_id_1pct", |b| {
        b.iter(|| emit(&by_id, 1))
    });
    // The buffer keeps the newest 2^20 events; past that each emit also evicts the oldest, as
    // it does in a worker whose hub is away.
    let queued = emitter(true, Rate::ALL, 1 << 20);
    c.bench_function("emit/queued", |b| b.iter(|| emit(&queued, 1)));
    // As `bridge-bench` measures it: a new emitter with room for every event, so the buffer
    // grows (fresh memory) instead of evicting.
    c.bench_function("emit/queued_filling", |b| {
        b.iter_custom(|iterations| {
            let filling = emitter(true, Rate::ALL, iterations as usize + 1);
            let started = std::time::Instant::now();
            for _ in 0..iterations {
                emit(&filling, 1);
            }
            started.elapsed()
        })
    });

    // A span is two events, `.start` and `.stop`, plus the span's own bookkeeping.
    c.bench_function("span/disabled", |b| b.iter(|| span(&disabled)));
    c.bench_function("span/queued", |b| b.iter(|| span(&queued)));
    c.bench_function("span/queued_recording_3", |b| {
        b.iter(|| span_recording(&queued, 212))
    });
}

/// A span as an inference server would end it, with three measurements taken during the call.
fn span_recording(emitter: &Emitter, output_tokens: i64) {
    let mut span = emitter.span(
        OPERATION,
        &[(MODEL, "llama-3-8b")],
        Some("6f1c9a2b8d3e4f5061728394a5b6c7d8"),
    );
    span.record(INPUT_TOKENS, 1337);
    span.record(OUTPUT_TOKENS, black_box(output_tokens));
    span.record(TIME_TO_FIRST_TOKEN_NS, 12_500_000);
    span.stop();
}

fn span(emitter: &Emitter) {
    emitter
        .span(
            OPERATION,
            &[(MODEL, "llama-3-8b")],
            Some("6f1c9a2b8d3e4f5061728394a5b6c7d8"),
        )
        .stop();
}

criterion_group!(benches, bench);
criterion_main!(benches);
