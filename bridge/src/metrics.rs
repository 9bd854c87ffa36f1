//! The hub's state as Prometheus metrics, read at scrape time.
//!
//! Nothing is counted twice: the collector reads the counters the hub keeps anyway (per worker,
//! per subscriber set); the only things the hot paths record for metrics alone are the two
//! latency histograms ([`crate::latency`]) and the per-model inference metrics, an output of
//! their own ([`crate::outputs::inference_metrics`], written by [`inference`]). Label cardinality
//! is bounded by the workers the hub remembers (`hub.max_remembered_workers`), the fixed
//! sets of drop reasons, and the models per pool (`metrics.max_models_per_pool`).

mod inference;

use bridge_proto::protocol::counters;
use prometheus_client::{
    collector::Collector,
    encoding::{
        DescriptorEncoder, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder,
        NoLabelSet,
    },
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{
    hub::Hub,
    latency::Snapshot,
    outputs::otlp::{Dropped, OtlpExport, SignalStats},
};

/// Worker-side outcomes reported in `bridge.worker.stats`, as metric label values.
const WORKER_DROPS: [(&str, &str); 9] = [
    (counters::SAMPLED_OUT, "sampled_out"),
    (counters::FILTERED, "filtered"),
    (counters::DISABLED, "disabled"),
    (counters::DROPPED_BUFFER_FULL, "buffer_full"),
    (counters::DROPPED_INVALID_NAME, "invalid_name"),
    (counters::DROPPED_PARSE_ERROR, "parse_error"),
    (counters::DROPPED_LINE_TOO_LONG, "line_too_long"),
    (
        counters::DROPPED_INVALID_TRACE_CONTEXT,
        "invalid_trace_context",
    ),
    (counters::DROPPED_OVER_LIMIT, "over_limit"),
];

/// Renders the hub's metrics in the OpenMetrics text format.
pub fn render(hub: &Hub) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(HubCollector { hub: hub.clone() }));
    let mut text = String::new();
    prometheus_client::encoding::text::encode_registry(&mut text, &registry)?;
    inference::encode(&mut text, &hub.inference_metrics().snapshot())?;
    prometheus_client::encoding::text::encode_eof(&mut text)?;
    Ok(text)
}

/// The content type of [`render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The content type of [`to_prometheus_text`]'s output.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Rewrites OpenMetrics text as the Prometheus text format (0.0.4), for clients that do not ask
/// for OpenMetrics (curl, promtool, older scrapers): there a counter family is named like its
/// samples (`x_total`), and there is no `# EOF`.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        text.push_str(renamed.as_deref().unwrap_or(line));
        text.push('\n');
    }
    text
}

#[derive(Debug)]
struct HubCollector {
    hub: Hub,
}

impl Collector for HubCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let workers = self.hub.local_workers(None);
        let (delivered, lagged) = self.hub.subscribers().totals();

        gauge(
            &mut encoder,
            "bridge_build_info",
            "Build of the hub (value 1).",
            &[(vec![("version", env!("CARGO_PKG_VERSION"))], 1)],
        )?;
        let connected = workers.iter().filter(|w| w.connected).count();
        gauge(
            &mut encoder,
            "bridge_workers_connected",
            "Workers with an open stream.",
            &[(vec![], connected as i64)],
        )?;
        gauge(
            &mut encoder,
            "bridge_workers_known",
            "Workers the hub knows, connected or remembered.",
            &[(vec![], workers.len() as i64)],
        )?;
        gauge(
            &mut encoder,
            "bridge_subscribers",
            "Open subscriptions.",
            &[(vec![], self.hub.subscribers().subscriber_count() as i64)],
        )?;
        counter(
            &mut encoder,
            "bridge_subscriber_deliveries",
            "Events queued for subscribers.",
            &[(vec![], delivered)],
        )?;
        counter(
            &mut encoder,
            "bridge_subscriber_lagged_events",
            "Events subscribers skipped because they fell behind (each skip is also a lag notice).",
            &[(vec![], lagged)],
        )?;

        let open = self.hub.connection_load().open();
        if !open.is_empty() {
            let threads: Vec<String> = (0..open.len()).map(|t| t.to_string()).collect();
            let per_thread: Vec<_> = threads
                .iter()
                .zip(&open)
                .map(|(thread, &open)| (vec![("thread", thread.as_str())], open as i64))
                .collect();
            gauge(
                &mut encoder,
                "bridge_connection_thread_connections",
                "Open gRPC connections on each of hub.connection_threads.",
                &per_thread,
            )?;
        }
        counter(
            &mut encoder,
            "bridge_malformed_messages",
            "gRPC messages that did not decode, from any client (answered INVALID_ARGUMENT).",
            &[(vec![], bridge_proto::codec::malformed_messages())],
        )?;

        let by_worker = |f: &dyn Fn(&bridge_proto::v1::WorkerInfo) -> u64| {
            workers
                .iter()
                .map(|w| (vec![("worker", w.id.as_str())], f(w)))
                .collect::<Vec<_>>()
        };
        counter(
            &mut encoder,
            "bridge_events_received",
            "Events received from each worker (replays included).",
            &by_worker(&|w| w.events_received),
        )?;
        counter(
            &mut encoder,
            "bridge_events_delivered",
            "Events from each worker that passed the hub and were fanned out.",
            &by_worker(&|w| w.events_delivered),
        )?;
        counter(
            &mut encoder,
            "bridge_events_missing",
            "Sequence numbers missing from each worker's stream.",
            &by_worker(&|w| w.missing_events),
        )?;
        let hub_drops: Vec<_> = workers
            .iter()
            .flat_map(|w| {
                w.hub_drops.iter().map(|(reason, n)| {
                    (
                        vec![("worker", w.id.as_str()), ("reason", reason.as_str())],
                        *n,
                    )
                })
            })
            .collect();
        counter(
            &mut encoder,
            "bridge_hub_dropped_events",
            "Events the hub did not deliver, by worker and reason.",
            &hub_drops,
        )?;
        let worker_drops: Vec<_> = workers
            .iter()
            .flat_map(|w| {
                WORKER_DROPS.iter().filter_map(|(key, reason)| {
                    let n = *w.worker_counters.get(*key)?;
                    Some((vec![("worker", w.id.as_str()), ("reason", *reason)], n))
                })
            })
            .collect();
        counter(
            &mut encoder,
            "bridge_worker_dropped_events",
            "Events workers did not send, by worker and reason (from their last report).",
            &worker_drops,
        )?;
        let versions = |applied: bool| {
            workers
                .iter()
                .filter(|w| !applied || w.applied_version.is_some())
                .map(|w| {
                    let version = if applied {
                        w.applied_version.unwrap_or(0)
                    } else {
                        w.desired_version
                    };
                    (
                        vec![("worker", w.id.as_str())],
                        i64::try_from(version).unwrap_or(i64::MAX),
                    )
                })
                .collect::<Vec<_>>()
        };
        gauge(
            &mut encoder,
            "bridge_control_version_desired",
            "Version of the control state the hub wants each worker to apply.",
            &versions(false),
        )?;
        gauge(
            &mut encoder,
            "bridge_control_version_applied",
            "Version each worker acknowledged (absent while it never has).",
            &versions(true),
        )?;
        if let Some(cluster) = self.hub.cluster() {
            gauge(
                &mut encoder,
                "bridge_cluster_connected",
                "Whether this hub's NATS connection is up (cluster mode).",
                &[(
                    vec![("node", cluster.node())],
                    i64::from(cluster.connected()),
                )],
            )?;
            gauge(
                &mut encoder,
                "bridge_cluster_following",
                "Whether this hub has loaded the cluster's control state and follows it; \
                 control changes are refused while it does not.",
                &[(vec![], i64::from(cluster.following()))],
            )?;
            gauge(
                &mut encoder,
                "bridge_cluster_hubs",
                "Hubs this hub knows to be up, itself included (0 while it cannot tell).",
                &[(
                    vec![],
                    cluster.peers().map_or(0, |peers| {
                        i64::try_from(peers.len() + 1).unwrap_or(i64::MAX)
                    }),
                )],
            )?;
            let counters = &cluster.counters;
            for (name, help, value) in [
                (
                    "bridge_cluster_published_events",
                    "Events this hub sent to the other hubs.",
                    &counters.published_events,
                ),
                (
                    "bridge_cluster_published_batches",
                    "NATS messages (batches of events) this hub sent to the other hubs.",
                    &counters.published_batches,
                ),
                (
                    "bridge_cluster_dropped_events",
                    "Events not sent to the other hubs because NATS was slow or away too long, \
                     or refused them.",
                    &counters.dropped_events,
                ),
                (
                    "bridge_cluster_received_events",
                    "Events received from other hubs, each once however many subscriptions \
                     take it.",
                    &counters.received_events,
                ),
                (
                    "bridge_cluster_received_batches",
                    "NATS messages (batches of events) received from other hubs.",
                    &counters.received_batches,
                ),
                (
                    "bridge_cluster_malformed_batches",
                    "Messages on the cluster's batch subject that were not well-formed batches, \
                     dropped whole.",
                    &counters.malformed_batches,
                ),
                (
                    "bridge_cluster_malformed_events",
                    "Events of other hubs' batches that were not well-formed event deliveries, \
                     dropped.",
                    &counters.malformed_events,
                ),
            ] {
                counter(
                    &mut encoder,
                    name,
                    help,
                    &[(vec![], value.load(std::sync::atomic::Ordering::Relaxed))],
                )?;
            }
        }
        if let Some(otlp) = self.hub.otlp() {
            otlp_metrics(&mut encoder, otlp)?;
        }
        histogram(
            &mut encoder,
            "bridge_ingest_latency_seconds",
            "From an event's timestamp to the hub receiving it (worker buffering and network; \
             assumes synchronised clocks), for events the hub passed on.",
            &self.hub.ingest_latency().snapshot(),
        )?;
        histogram(
            &mut encoder,
            "bridge_fanout_latency_seconds",
            "From the hub receiving an event to a subscriber's stream taking it from its queue \
             (a subscription's linger included).",
            &self.hub.subscribers().latency().snapshot(),
        )?;
        Ok(())
    }
}

/// The OTLP export's accounting: for each signal, offered = exported + dropped + queue items.
fn otlp_metrics(encoder: &mut DescriptorEncoder, otlp: &OtlpExport) -> Result<(), std::fmt::Error> {
    use std::sync::atomic::Ordering::Relaxed;
    let signals: Vec<_> = otlp.stats().collect();
    let per_signal = |value: &dyn Fn(&SignalStats) -> u64| -> Vec<(Labels<'_>, u64)> {
        signals
            .iter()
            .map(|(signal, stats)| (vec![("signal", signal.name())], value(stats)))
            .collect()
    };
    counter(
        encoder,
        "bridge_otlp_offered",
        "Records handed to the OTLP export (events matching `export.otlp.logs`; spans' end events).",
        &per_signal(&|s| s.offered.load(Relaxed)),
    )?;
    counter(
        encoder,
        "bridge_otlp_exported",
        "Records the OTLP collector accepted.",
        &per_signal(&|s| s.exported.load(Relaxed)),
    )?;
    let dropped: Vec<(Labels<'_>, u64)> = signals
        .iter()
        .flat_map(|(signal, stats)| {
            Dropped::ALL.map(|reason| {
                (
                    vec![("signal", signal.name()), ("reason", reason.name())],
                    stats.dropped(reason),
                )
            })
        })
        .collect();
    counter(
        encoder,
        "bridge_otlp_dropped",
        "Records not exported: queue_full (the collector slow or away), rejected (by the collector), not_a_span (an end event without span ids or duration_ns), shutdown.",
        &dropped,
    )?;
    let queued: Vec<(Labels<'_>, i64)> = per_signal(&|s| s.pending.load(Relaxed))
        .into_iter()
        .map(|(labels, n)| (labels, i64::try_from(n).unwrap_or(i64::MAX)))
        .collect();
    gauge(
        encoder,
        "bridge_otlp_queue_items",
        "Records queued for the OTLP collector or in an export request.",
        &queued,
    )
}

/// A sample's labels; empty for a metric without any.
type Labels<'a> = Vec<(&'a str, &'a str)>;

/// One counter family; `name` without `_total` (the encoder adds it).
fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels<'_>, u64)],
) -> Result<(), std::fmt::Error> {
    family(encoder, name, help, MetricType::Counter, samples, |v, m| {
        ConstCounter::new(*v).encode(m)
    })
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Labels<'_>, i64)],
) -> Result<(), std::fmt::Error> {
    family(encoder, name, help, MetricType::Gauge, samples, |v, m| {
        ConstGauge::new(*v).encode(m)
    })
}

fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    snapshot: &Snapshot,
) -> Result<(), std::fmt::Error> {
    encoder
        .encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(
            snapshot.sum_seconds,
            snapshot.count,
            &snapshot.buckets,
            None,
        )
}

fn family<V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: &[(Labels<'_>, V)],
    encode: impl Fn(&V, MetricEncoder<'_>) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    if let [(labels, value)] = samples
        && labels.is_empty()
    {
        return encode(value, metric);
    }
    for (labels, value) in samples {
        let labels: Vec<_> = labels.iter().map(|(k, v)| (*k, Escaped(v))).collect();
        encode(value, metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A label value as the exposition formats spell it: prometheus_client writes values as they
/// are, and worker ids and pools (printable ASCII from request metadata) may hold `"` or `\`.
#[derive(Debug)]
struct Escaped<'a>(&'a str);

impl EncodeLabelValue for Escaped<'_> {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        write_label_value(encoder, self.0)
    }
}

/// Writes `value` escaped for a label value between double quotes (both text formats escape
/// the same three characters).
fn write_label_value(out: &mut impl std::fmt::Write, value: &str) -> std::fmt::Result {
    let mut rest = value;
    while let Some(at) = rest.find(['\\', '"', '\n']) {
        out.write_str(&rest[..at])?;
        out.write_str(match rest.as_bytes()[at] {
            b'\\' => "\\\\",
            b'"' => "\\\"",
            _ => "\\n",
        })?;
        rest = &rest[at + 1..];
    }
    out.write_str(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped() {
        let mut out = String::new();
        write_label_value(&mut out, "a\"b\\c\nd é").unwrap();
        assert_eq!(out, r#"a\"b\\c\nd é"#);
    }
}
