//! What an output costs ingest per event, on one thread. `bridge-bench` measures the whole hub;
//! this is for the outputs' own paths and for profiling them.

use std::hint::black_box;

use bridge::outputs::{
    Delivery, Output,
    inference_metrics::InferenceMetrics,
    subscribers::{Filter, Subscribers},
};
use bridge_proto::{
    condition::Condition,
    pattern::{Pattern, validate_event_tokens},
    protocol::{gpu, inference},
    v1::{TelemetryEvent, TelemetryValue, telemetry_value::Value},
    view::{EventView, RelayedDelivery},
};
use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message;

/// An `inference.stop` as `worker --simulate` sends it: the conventions' fields.
fn stop(model: &str) -> EventView {
    let int = |v| TelemetryValue {
        value: Some(Value::IntValue(v)),
    };
    let measurements = [
        (inference::SYSTEM_TIME_NS, int(1_795_000_000_000_000_000)),
        (inference::DURATION_NS, int(48_250_000)),
        (inference::INPUT_TOKENS, int(1_337)),
        (inference::OUTPUT_TOKENS, int(211)),
        (inference::CACHED_INPUT_TOKENS, int(512)),
        (inference::TIME_TO_FIRST_TOKEN_NS, int(9_100_000)),
        (inference::QUEUE_WAIT_NS, int(1_200_000)),
        (inference::BATCH_SIZE, int(8)),
    ];
    EventView::from_event(&TelemetryEvent {
        event_parts: vec![inference::OPERATION.into(), "stop".into()],
        measurements: measurements
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        metadata: [
            (inference::MODEL.to_owned(), model.to_owned()),
            (
                inference::RESULT.to_owned(),
                inference::RESULT_SUCCESS.to_owned(),
            ),
        ]
        .into(),
        correlation_id: "6f1c9a2b8d3e4f5061728394a5b6c7d8".into(),
        sequence: 42,
        timestamp_ns: 1_795_000_000_000_000_000,
        ..Default::default()
    })
    .expect("view")
}

fn bench(c: &mut Criterion) {
    let metrics = InferenceMetrics::new(1);
    let recorder = std::cell::RefCell::new(metrics.recorder("llama"));
    let offer = |view: &EventView, rate| recorder.borrow_mut().record(black_box(view), rate);
    let counted = stop("llama-3-8b");
    let folded = stop("mistral-7b");
    offer(&counted, 1.0);
    c.bench_function("inference_metrics/stop", |b| {
        b.iter(|| offer(&counted, 1.0))
    });
    c.bench_function("inference_metrics/stop_sampled", |b| {
        b.iter(|| offer(&counted, 0.25))
    });
    c.bench_function("inference_metrics/stop_folded_into_other", |b| {
        b.iter(|| offer(&folded, 1.0))
    });
    let other = EventView::from_event(&TelemetryEvent {
        event_parts: gpu::METRICS_EVENT.split('.').map(str::to_owned).collect(),
        ..Default::default()
    })
    .expect("view");
    c.bench_function("inference_metrics/other_event", |b| {
        b.iter(|| offer(&other, 1.0))
    });
    // Reading the fields alone (what `stop` reads), beside a full decode.
    c.bench_function("event_view/lookup_7_keys", |b| {
        b.iter(|| {
            black_box(&counted).lookup(
                [
                    inference::DURATION_NS,
                    inference::TIME_TO_FIRST_TOKEN_NS,
                    inference::QUEUE_WAIT_NS,
                    inference::INPUT_TOKENS,
                    inference::OUTPUT_TOKENS,
                ],
                [inference::MODEL, inference::RESULT],
            )
        })
    });
    c.bench_function("event_view/inference_call", |b| {
        b.iter(|| black_box(&counted).inference_call())
    });
    // What ingest pays: decoding the view (which indexes a call's fields) and offering it,
    // beside decoding alone; an event other than a call's end, beside it.
    let encoded = counted.as_bytes().to_vec();
    let renamed = {
        let mut event = counted.to_event().expect("event");
        event.event_parts = vec![inference::OPERATION.into(), "queued".into()];
        EventView::from_event(&event)
            .expect("view")
            .as_bytes()
            .to_vec()
    };
    c.bench_function("event_view/decode_stop", |b| {
        b.iter(|| EventView::decode(black_box(encoded.as_slice())))
    });
    // The check every worker event's name passes at ingest.
    let stop_view = stop("llama-3-70b");
    c.bench_function("event_view/check_name_tokens", |b| {
        b.iter(|| validate_event_tokens(black_box(&stop_view).parts()))
    });
    c.bench_function("event_view/decode_same_fields_other_name", |b| {
        b.iter(|| EventView::decode(black_box(renamed.as_slice())))
    });
    c.bench_function("inference_metrics/decode_and_offer_stop", |b| {
        b.iter(|| {
            let view = EventView::decode(black_box(encoded.as_slice())).expect("view");
            offer(&view, 1.0)
        })
    });
    // Fan-out to 10 subscribers of `inference.>`, without and with `--where model=... --where
    // result!=success` on each: the cost of a metadata filter per subscriber and event.
    let fan_out = |conditions: &[&str]| {
        let subscribers = Subscribers::new(1 << 20);
        let subscriptions: Vec<_> = (0..10)
            .map(|_| {
                subscribers.subscribe(Filter {
                    patterns: vec![Pattern::parse("inference.>").expect("pattern")],
                    metadata: conditions
                        .iter()
                        .map(|c| Condition::parse(c).expect("condition"))
                        .collect(),
                    ..Default::default()
                })
            })
            .collect();
        (subscribers, subscriptions)
    };
    for (name, conditions) in [
        ("subscribers/fan_out_10", &[][..]),
        (
            "subscribers/fan_out_10_where",
            &["model=llama-3-8b", "result!=error"][..],
        ),
    ] {
        let (subscribers, mut subscriptions) = fan_out(conditions);
        c.bench_function(name, |b| {
            b.iter(|| {
                subscribers.offer(&Delivery::local("gpu-3", "llama", &counted, 1.0, 1));
                for subscription in &mut subscriptions {
                    while subscription.queue.try_recv().is_ok() {}
                }
            })
        });
    }
    // The same fan-out for an event from another hub, as the cluster's receiving side offers it.
    let (subscribers, mut subscriptions) = fan_out(&[]);
    let encoded = Delivery::local("gpu-3", "llama", &counted, 1.0, 1)
        .encoded()
        .clone();
    c.bench_function("subscribers/fan_out_10_relayed", |b| {
        b.iter(|| {
            let relayed = RelayedDelivery::check(black_box(encoded.as_bytes())).expect("check");
            subscribers.offer(&Delivery::from_other_hub(&relayed));
            for subscription in &mut subscriptions {
                while subscription.queue.try_recv().is_ok() {}
            }
        })
    });
    c.bench_function("event_view/to_event", |b| {
        b.iter(|| black_box(&counted).to_event())
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
