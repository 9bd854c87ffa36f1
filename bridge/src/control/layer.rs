//! Control settings at one level (global, a pool, a worker), and how levels combine.
//!
//! Every setting remembers the version of the change that made it. A worker's effective value
//! for a setting is the newest among the levels that apply to it; between settings of the same
//! version (the ones from `config.toml`, all version 0) the more specific level wins. So the
//! configured precedence worker > pool > global holds until an operator changes something, and
//! then the latest command wins: `bridge sample --all 0.1` reaches every worker, and a later
//! `bridge sample gpu-3 0.5` overrides it for that worker.

use std::collections::BTreeMap;

use bridge_proto::{
    control::{ControlState, SamplingRule},
    pattern::Pattern,
    sampling::Rate,
    v1,
};
use serde::{Deserialize, Serialize};

use crate::config::{ControlConfig, LayerConfig};

/// A value and the version of the change that set it (0: from `config.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setting<T> {
    pub value: T,
    pub version: u64,
}

impl<T> Setting<T> {
    /// A value from `config.toml`, older than any runtime change.
    pub fn configured(value: T) -> Self {
        Self { value, version: 0 }
    }
}

/// Allow and block lists, set together.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct FilterSpec {
    pub allow: Vec<String>,
    pub block: Vec<String>,
}

/// The settings made at one level. Patterns and rates were validated before they got here.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Layer {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<Setting<bool>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling_rate: Option<Setting<f64>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rules: BTreeMap<String, Setting<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<Setting<FilterSpec>>,
    /// Version of the last change at this level.
    pub version: u64,
}

impl Layer {
    pub fn is_empty(&self) -> bool {
        self.enabled.is_none()
            && self.sampling_rate.is_none()
            && self.rules.is_empty()
            && self.filter.is_none()
    }

    /// A level as `config.toml` describes it; every setting has version 0.
    pub fn from_config(config: &LayerConfig) -> Self {
        Self {
            enabled: config.enabled.map(Setting::configured),
            sampling_rate: config.sampling_rate.map(Setting::configured),
            rules: rules_from_config(&config.rules),
            filter: (config.allow.is_some() || config.block.is_some()).then(|| {
                Setting::configured(FilterSpec {
                    allow: config.allow.clone().unwrap_or_default(),
                    block: config.block.clone().unwrap_or_default(),
                })
            }),
            version: 0,
        }
    }

    /// The global level from `[control]`.
    pub fn global_from_config(config: &ControlConfig) -> Self {
        Self {
            enabled: Some(Setting::configured(config.enabled)),
            sampling_rate: Some(Setting::configured(config.default_sampling_rate)),
            rules: rules_from_config(&config.rules),
            filter: Some(Setting::configured(FilterSpec {
                allow: config.allow.clone(),
                block: config.block.clone(),
            })),
            version: 0,
        }
    }

    pub fn to_wire(&self) -> v1::ControlLayer {
        v1::ControlLayer {
            enabled: self.enabled.as_ref().map(|s| s.value),
            sampling_rate: self.sampling_rate.as_ref().map(|s| s.value),
            rules: self
                .rules
                .iter()
                .map(|(pattern, s)| v1::SamplingRule {
                    pattern: pattern.clone(),
                    sampling_rate: s.value,
                })
                .collect(),
            filter: self.filter.as_ref().map(|s| v1::TelemetryEventFilter {
                allowed_events: s.value.allow.clone(),
                blocked_events: s.value.block.clone(),
            }),
            version: self.version,
        }
    }
}

fn rules_from_config(rules: &BTreeMap<String, f64>) -> BTreeMap<String, Setting<f64>> {
    rules
        .iter()
        .map(|(p, r)| (p.clone(), Setting::configured(*r)))
        .collect()
}

/// Combines levels, most general first, into the state a worker applies.
///
/// Values that fail to parse are skipped rather than trusted: they were validated on the way
/// in, so this only guards against a hand-edited state file.
pub fn merge<'a>(layers: impl IntoIterator<Item = &'a Layer>, version: u64) -> ControlState {
    fn newer<T: Clone>(current: &mut Option<Setting<T>>, candidate: &Option<Setting<T>>) {
        if let Some(candidate) = candidate
            && current
                .as_ref()
                .is_none_or(|c| candidate.version >= c.version)
        {
            *current = Some(candidate.clone());
        }
    }
    let mut enabled = None;
    let mut rate = None;
    let mut filter = None;
    let mut rules: BTreeMap<&str, Setting<f64>> = BTreeMap::new();
    for layer in layers {
        newer(&mut enabled, &layer.enabled);
        newer(&mut rate, &layer.sampling_rate);
        newer(&mut filter, &layer.filter);
        for (pattern, setting) in &layer.rules {
            match rules.get(pattern.as_str()) {
                Some(current) if current.version > setting.version => {}
                _ => {
                    rules.insert(pattern, setting.clone());
                }
            }
        }
    }
    let rules = rules
        .into_iter()
        .filter_map(|(pattern, setting)| {
            Some(SamplingRule {
                pattern: Pattern::parse(pattern).ok()?,
                rate: Rate::new(setting.value).ok()?,
            })
        })
        .collect();
    let parse_all = |list: &[String]| -> Vec<Pattern> {
        list.iter().filter_map(|p| Pattern::parse(p).ok()).collect()
    };
    let filter = filter.map(|s| s.value).unwrap_or_default();
    ControlState::new(
        version,
        enabled.is_none_or(|s| s.value),
        rate.and_then(|s| Rate::new(s.value).ok())
            .unwrap_or(Rate::ALL),
        rules,
        parse_all(&filter.allow),
        parse_all(&filter.block),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(rate: Option<(f64, u64)>, version: u64) -> Layer {
        Layer {
            sampling_rate: rate.map(|(value, version)| Setting { value, version }),
            version,
            ..Default::default()
        }
    }

    #[test]
    fn configured_levels_follow_specificity() {
        let global = layer(Some((1.0, 0)), 0);
        let pool = layer(Some((0.5, 0)), 0);
        let worker = layer(Some((0.1, 0)), 0);
        assert_eq!(merge([&global, &pool, &worker], 1).default_rate.get(), 0.1);
        assert_eq!(merge([&global, &pool], 1).default_rate.get(), 0.5);
    }

    #[test]
    fn the_latest_change_wins_over_a_narrower_older_one() {
        let global = layer(Some((0.2, 5)), 5);
        let worker = layer(Some((0.9, 3)), 3);
        assert_eq!(merge([&global, &worker], 5).default_rate.get(), 0.2);
        let worker = layer(Some((0.9, 6)), 6);
        assert_eq!(merge([&global, &worker], 6).default_rate.get(), 0.9);
    }

    #[test]
    fn rules_merge_per_pattern() {
        let mut global = Layer::default();
        global.rules.insert(
            "a.*".into(),
            Setting {
                value: 0.5,
                version: 1,
            },
        );
        global.rules.insert(
            "b.*".into(),
            Setting {
                value: 0.5,
                version: 1,
            },
        );
        let mut worker = Layer::default();
        worker.rules.insert(
            "a.*".into(),
            Setting {
                value: 0.1,
                version: 2,
            },
        );
        let state = merge([&global, &worker], 2);
        let rates: Vec<_> = state
            .rules()
            .iter()
            .map(|r| (r.pattern.as_str(), r.rate.get()))
            .collect();
        assert_eq!(rates, [("a.*", 0.1), ("b.*", 0.5)]);
    }
}
