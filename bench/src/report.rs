//! The report: figures next to their baselines and targets, the medians and percentiles they
//! are made of, and the table or JSON object they are printed as.

use std::process::Command;

use serde::Serialize;
use serde_json::{Value as Json, json};

use crate::Section;

/// One line of the report.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Figure {
    section: Section,
    name: String,
    unit: &'static str,
    value: f64,
    baseline: Option<f64>,
    /// value / baseline.
    pub(crate) ratio: Option<f64>,
    target: Option<String>,
    met: Option<bool>,
}

impl Figure {
    pub(crate) fn new(
        section: Section,
        name: impl Into<String>,
        unit: &'static str,
        value: f64,
    ) -> Self {
        Self {
            section,
            name: name.into(),
            unit,
            value,
            baseline: None,
            ratio: None,
            target: None,
            met: None,
        }
    }

    pub(crate) fn baseline(mut self, baseline: f64) -> Self {
        self.baseline = Some(baseline);
        self.ratio = (baseline != 0.0).then(|| self.value / baseline);
        self
    }

    pub(crate) fn target(mut self, description: &str, met: bool) -> Self {
        self.target = Some(description.to_owned());
        self.met = Some(met);
        self
    }
}

/// The `q` quantile of `values` (nearest rank); NaN when there are none.
pub(crate) fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n => sorted[((n as f64 - 1.0) * q).round() as usize],
    }
}

pub(crate) fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

pub(crate) fn commit() -> String {
    Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| format!("v{}", env!("CARGO_PKG_VERSION")))
}

pub(crate) fn machine() -> Json {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .and_then(|r| r.split(':').nth(1))
        })
        .map(|m| m.trim().to_owned())
        .unwrap_or_default();
    json!({
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "model": model,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
        "executable": std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default(),
    })
}

fn human(value: f64, unit: &str) -> String {
    if value.is_nan() {
        return "-".into();
    }
    match unit {
        "events/s" | "deliveries/s" | "events" => {
            let rounded = value.round() as i64;
            let digits = rounded.abs().to_string();
            let mut grouped = String::new();
            for (i, c) in digits.chars().enumerate() {
                if i > 0 && (digits.len() - i).is_multiple_of(3) {
                    grouped.push(',');
                }
                grouped.push(c);
            }
            if rounded < 0 {
                format!("-{grouped}")
            } else {
                grouped
            }
        }
        "ms" => format!("{value:.3}"),
        "ns" | "KiB" => format!("{value:.1}"),
        _ => format!("{value:.2}"),
    }
}

pub(crate) fn print_table(report: &Json, figures: &[Figure]) {
    println!(
        "telemetry-bridge benchmark: commit {}, {} cores ({}), {} run(s) per figure, events of {} bytes, {:.0} s",
        report["commit"].as_str().unwrap_or("?"),
        report["machine"]["cores"],
        report["machine"]["model"].as_str().unwrap_or("?"),
        report["runs"],
        report["event_bytes"],
        report["seconds"].as_f64().unwrap_or(0.0),
    );
    let rows: Vec<[String; 6]> = figures
        .iter()
        .map(|f| {
            [
                f.name.clone(),
                format!("{} {}", human(f.value, f.unit), f.unit),
                f.baseline.map_or_else(|| "-".into(), |b| human(b, f.unit)),
                f.ratio.map_or_else(|| "-".into(), |r| format!("{r:.2}")),
                f.target.clone().unwrap_or_default(),
                match f.met {
                    Some(true) => "met".into(),
                    Some(false) => "NOT MET".into(),
                    None => String::new(),
                },
            ]
        })
        .collect();
    let header = ["figure", "value", "baseline", "ratio", "target", ""].map(String::from);
    let mut widths = [0usize; 6];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i == 0 || i >= 4 {
                    format!("{cell:<w$}")
                } else {
                    format!("{cell:>w$}")
                }
            })
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}
