//! The per-model inference metrics as OTLP metrics: cumulative sums and histograms since the
//! export started, one resource per pool (`service.name`), pushed every
//! `export.otlp.metrics_interval_ms`.
//!
//! The hub's figures are weighted by `1 / sampling_rate` (estimates of every call), so sums are
//! doubles; OTLP histogram counts are integers, so weighted counts are rounded.

use opentelemetry_proto::tonic::{
    collector::metrics::v1::ExportMetricsServiceRequest,
    common::v1::KeyValue,
    metrics::v1::{
        AggregationTemporality, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
        ResourceMetrics, ScopeMetrics, Sum, metric::Data, number_data_point,
    },
    resource::v1::Resource,
};

use super::convert::{scope, string};
use crate::outputs::inference_metrics::{HistogramSnapshot, PoolSnapshot};

/// The request for `pools`, and how many data points it holds.
pub fn request(
    pools: &[PoolSnapshot],
    start_ns: u64,
    now_ns: u64,
) -> (ExportMetricsServiceRequest, u64) {
    let mut points = 0;
    let resource_metrics = pools
        .iter()
        .filter(|pool| !pool.models.is_empty())
        .map(|pool| {
            let mut requests = Vec::new();
            let mut tokens = Vec::new();
            let (mut duration, mut ttft, mut queue) = (Vec::new(), Vec::new(), Vec::new());
            for model in &pool.models {
                let attrs = |extra: Option<(&str, &str)>| -> Vec<KeyValue> {
                    std::iter::once(string("model", &model.model))
                        .chain(extra.map(|(k, v)| string(k, v)))
                        .collect()
                };
                let number = |attributes, value| NumberDataPoint {
                    attributes,
                    start_time_unix_nano: start_ns,
                    time_unix_nano: now_ns,
                    value: Some(number_data_point::Value::AsDouble(value)),
                    ..Default::default()
                };
                requests.push(number(attrs(Some(("result", "success"))), model.success));
                requests.push(number(attrs(Some(("result", "error"))), model.error));
                tokens.push(number(
                    attrs(Some(("direction", "input"))),
                    model.input_tokens,
                ));
                tokens.push(number(
                    attrs(Some(("direction", "output"))),
                    model.output_tokens,
                ));
                let histogram = |snapshot: &HistogramSnapshot| {
                    histogram_point(snapshot, attrs(None), start_ns, now_ns)
                };
                duration.push(histogram(&model.duration));
                ttft.push(histogram(&model.time_to_first_token));
                queue.push(histogram(&model.queue_wait));
            }
            points +=
                (requests.len() + tokens.len() + duration.len() + ttft.len() + queue.len()) as u64;
            let metrics = vec![
                sum(
                    "bridge.inference.requests",
                    "Inference calls (estimated while sampled: each counts 1 / sampling_rate).",
                    "{request}",
                    requests,
                ),
                sum(
                    "bridge.inference.tokens",
                    "Tokens in and out of inference calls (estimated while sampled).",
                    "{token}",
                    tokens,
                ),
                histogram(
                    "bridge.inference.duration",
                    "Duration of inference calls.",
                    duration,
                ),
                histogram(
                    "bridge.inference.time_to_first_token",
                    "Time to the first output token.",
                    ttft,
                ),
                histogram(
                    "bridge.inference.queue_wait",
                    "Time calls waited before inference started.",
                    queue,
                ),
            ];
            ResourceMetrics {
                resource: Some(Resource {
                    attributes: vec![string("service.name", &pool.pool)],
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(scope()),
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            }
        })
        .collect();
    (ExportMetricsServiceRequest { resource_metrics }, points)
}

fn sum(name: &str, description: &str, unit: &str, data_points: Vec<NumberDataPoint>) -> Metric {
    Metric {
        name: name.into(),
        description: description.into(),
        unit: unit.into(),
        data: Some(Data::Sum(Sum {
            data_points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    }
}

fn histogram(name: &str, description: &str, data_points: Vec<HistogramDataPoint>) -> Metric {
    Metric {
        name: name.into(),
        description: description.into(),
        unit: "s".into(),
        data: Some(Data::Histogram(Histogram {
            data_points,
            aggregation_temporality: AggregationTemporality::Cumulative as i32,
        })),
        ..Default::default()
    }
}

/// OTLP buckets are per bucket (not cumulative) and their counts integers.
fn histogram_point(
    snapshot: &HistogramSnapshot,
    attributes: Vec<KeyValue>,
    start_ns: u64,
    now_ns: u64,
) -> HistogramDataPoint {
    let explicit_bounds: Vec<f64> = snapshot
        .buckets
        .iter()
        .map(|(bound, _)| *bound)
        .filter(|bound| bound.is_finite())
        .collect();
    let mut previous = 0.0;
    let bucket_counts = snapshot
        .buckets
        .iter()
        .map(|(_, cumulative)| {
            let count = (cumulative - previous).max(0.0).round() as u64;
            previous = *cumulative;
            count
        })
        .collect();
    HistogramDataPoint {
        attributes,
        start_time_unix_nano: start_ns,
        time_unix_nano: now_ns,
        count: snapshot.count.round() as u64,
        sum: Some(snapshot.sum_seconds),
        bucket_counts,
        explicit_bounds,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outputs::inference_metrics::ModelSnapshot;

    fn histogram_of(cumulative: &[(f64, f64)], sum: f64) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: cumulative.to_vec(),
            count: cumulative.last().map_or(0.0, |(_, c)| *c),
            sum_seconds: sum,
        }
    }

    #[test]
    fn a_pools_models_become_sums_and_per_bucket_histograms() {
        let model = ModelSnapshot {
            model: "llama".into(),
            success: 10.0,
            error: 2.0,
            input_tokens: 100.0,
            output_tokens: 50.0,
            duration: histogram_of(&[(0.1, 4.0), (1.0, 10.0), (f64::INFINITY, 12.0)], 3.5),
            time_to_first_token: histogram_of(&[(f64::INFINITY, 0.0)], 0.0),
            queue_wait: histogram_of(&[(f64::INFINITY, 0.0)], 0.0),
        };
        let pools = [PoolSnapshot {
            pool: "llama-pool".into(),
            folded: 0.0,
            models: vec![model],
        }];
        let (request, points) = request(&pools, 1, 2);
        assert_eq!(points, 7);
        let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
        let Some(Data::Histogram(duration)) = &metrics[2].data else {
            panic!("{metrics:?}")
        };
        let point = &duration.data_points[0];
        assert_eq!(point.explicit_bounds, [0.1, 1.0]);
        assert_eq!(point.bucket_counts, [4, 6, 2]);
        assert_eq!((point.count, point.sum), (12, Some(3.5)));
        let Some(Data::Sum(requests)) = &metrics[0].data else {
            panic!("{metrics:?}")
        };
        assert!(requests.is_monotonic);
        assert_eq!(
            requests.data_points[1].value,
            Some(number_data_point::Value::AsDouble(2.0))
        );
    }
}
