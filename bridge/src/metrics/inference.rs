//! The per-model inference metrics ([`crate::outputs::inference_metrics`]) as OpenMetrics text.
//!
//! Written here rather than through prometheus_client, whose histograms take integer counts:
//! these counts are weighted by `1 / rate`, so they are floats, which Prometheus reads as it
//! reads any sample value.

use std::fmt::{Result, Write};

use crate::outputs::inference_metrics::{
    HistogramSnapshot, MAX_MODEL_BYTES, ModelSnapshot, PoolSnapshot,
};

use super::write_label_value;

/// Every family, with its samples (none before the first call is counted).
pub(super) fn encode(out: &mut String, pools: &[PoolSnapshot]) -> Result {
    let models = || {
        pools
            .iter()
            .flat_map(|p| p.models.iter().map(move |m| (p.pool.as_str(), m)))
    };

    descriptor(
        out,
        "bridge_inference_requests",
        "counter",
        "Inference calls of this hub's workers by pool, model and result (success or error), \
         from their inference.stop and inference.exception events. Each event counts \
         1/sampling rate, so while events are sampled this estimates the calls made, not the \
         events kept.",
    )?;
    for (pool, model) in models() {
        for (result, value) in [("success", model.success), ("error", model.error)] {
            let labels = [("pool", pool), ("model", &model.model), ("result", result)];
            sample(out, "bridge_inference_requests_total", &labels, value)?;
        }
    }

    descriptor(
        out,
        "bridge_inference_tokens",
        "counter",
        "Tokens of inference calls by pool, model and direction (input_tokens, output_tokens); \
         weighted by 1/sampling rate, an estimate of every call's while sampled.",
    )?;
    for (pool, model) in models() {
        for (direction, value) in [
            ("input", model.input_tokens),
            ("output", model.output_tokens),
        ] {
            let labels = [
                ("pool", pool),
                ("model", &model.model),
                ("direction", direction),
            ];
            sample(out, "bridge_inference_tokens_total", &labels, value)?;
        }
    }

    for (name, help, pick) in [
        (
            "bridge_inference_duration_seconds",
            "Duration of inference calls, successful or not (duration_ns), by pool and model; \
             weighted by 1/sampling rate, so buckets, count and sum estimate every call's while \
             sampled.",
            (|m| &m.duration) as fn(&ModelSnapshot) -> &HistogramSnapshot,
        ),
        (
            "bridge_inference_time_to_first_token_seconds",
            "Time from an inference call's start to its first generated token \
             (time_to_first_token_ns), by pool and model; weighted by 1/sampling rate.",
            |m| &m.time_to_first_token,
        ),
        (
            "bridge_inference_queue_wait_seconds",
            "Time inference requests waited in their server's queue (queue_wait_ns), by pool \
             and model; weighted by 1/sampling rate.",
            |m| &m.queue_wait,
        ),
    ] {
        descriptor(out, name, "histogram", help)?;
        for (pool, model) in models() {
            let labels = [("pool", pool), ("model", model.model.as_str())];
            histogram(out, name, &labels, pick(model))?;
        }
    }

    descriptor(
        out,
        "bridge_inference_models_folded",
        "counter",
        &format!(
            "Inference events counted under model other because their pool had \
             metrics.max_models_per_pool models already, or their model name was longer than \
             {MAX_MODEL_BYTES} bytes or held control characters; weighted by 1/sampling rate."
        ),
    )?;
    for pool in pools {
        let labels = [("pool", pool.pool.as_str())];
        sample(
            out,
            "bridge_inference_models_folded_total",
            &labels,
            pool.folded,
        )?;
    }
    Ok(())
}

/// `help` must not hold `"`, `\` or a line break: the two text formats escape them differently.
fn descriptor(out: &mut String, name: &str, kind: &str, help: &str) -> Result {
    debug_assert!(!help.contains(['"', '\\', '\n']), "{help}");
    writeln!(out, "# HELP {name} {help}")?;
    writeln!(out, "# TYPE {name} {kind}")
}

fn histogram(
    out: &mut String,
    name: &str,
    labels: &[(&str, &str)],
    histogram: &HistogramSnapshot,
) -> Result {
    let bucket = format!("{name}_bucket");
    for (le, count) in &histogram.buckets {
        let le = if le.is_finite() {
            format!("{le:?}")
        } else {
            "+Inf".to_owned()
        };
        let labels: Vec<_> = labels
            .iter()
            .copied()
            .chain([("le", le.as_str())])
            .collect();
        sample(out, &bucket, &labels, *count)?;
    }
    sample(out, &format!("{name}_sum"), labels, histogram.sum_seconds)?;
    sample(out, &format!("{name}_count"), labels, histogram.count)
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: f64) -> Result {
    out.push_str(name);
    for (i, (key, value)) in labels.iter().enumerate() {
        out.push_str(if i == 0 { "{" } else { "," });
        out.push_str(key);
        out.push_str("=\"");
        write_label_value(out, value)?;
        out.push('"');
    }
    if !labels.is_empty() {
        out.push('}');
    }
    out.push(' ');
    number(out, value)?;
    out.push('\n');
    Ok(())
}

/// A sample value as both formats spell it. Sums cannot become infinite in practice, but a
/// worker may claim a tiny sampling rate, and the exposition must stay parseable whatever it is.
fn number(out: &mut String, value: f64) -> Result {
    match value {
        v if v.is_nan() => out.push_str("NaN"),
        f64::INFINITY => out.push_str("+Inf"),
        f64::NEG_INFINITY => out.push_str("-Inf"),
        // Debug is the shortest form that reads back exactly ("2.0", "1e-7").
        v => write!(out, "{v:?}")?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(count: f64) -> HistogramSnapshot {
        HistogramSnapshot {
            buckets: vec![(0.005, count / 2.0), (f64::INFINITY, count)],
            count,
            sum_seconds: 0.25,
        }
    }

    #[test]
    fn families_are_written_with_escaped_labels_and_float_counts() {
        let pools = [PoolSnapshot {
            pool: "p\"1".into(),
            folded: 2.5,
            models: vec![ModelSnapshot {
                model: "a\\b\nc".into(),
                success: 3.0,
                error: 0.5,
                input_tokens: 1e21,
                output_tokens: f64::INFINITY,
                duration: histogram(3.0),
                time_to_first_token: histogram(1.0),
                queue_wait: histogram(0.0),
            }],
        }];
        let mut out = String::new();
        encode(&mut out, &pools).unwrap();
        let labels = r#"pool="p\"1",model="a\\b\nc""#;
        for line in [
            format!("bridge_inference_requests_total{{{labels},result=\"success\"}} 3.0"),
            format!("bridge_inference_requests_total{{{labels},result=\"error\"}} 0.5"),
            format!("bridge_inference_tokens_total{{{labels},direction=\"input\"}} 1e21"),
            format!("bridge_inference_tokens_total{{{labels},direction=\"output\"}} +Inf"),
            format!("bridge_inference_duration_seconds_bucket{{{labels},le=\"0.005\"}} 1.5"),
            format!("bridge_inference_duration_seconds_bucket{{{labels},le=\"+Inf\"}} 3.0"),
            format!("bridge_inference_duration_seconds_sum{{{labels}}} 0.25"),
            format!("bridge_inference_duration_seconds_count{{{labels}}} 3.0"),
            format!("bridge_inference_queue_wait_seconds_count{{{labels}}} 0.0"),
            "bridge_inference_models_folded_total{pool=\"p\\\"1\"} 2.5".to_owned(),
            "# TYPE bridge_inference_time_to_first_token_seconds histogram".to_owned(),
        ] {
            assert!(out.lines().any(|l| l == line), "no `{line}` in\n{out}");
        }
        let mut empty = String::new();
        encode(&mut empty, &[]).unwrap();
        assert_eq!(empty.lines().count(), 12, "{empty}");
        assert!(empty.lines().all(|l| l.starts_with("# ")), "{empty}");
    }
}
