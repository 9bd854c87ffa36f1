//! Control settings at one level (global, a pool, a set of labels, a worker), and how levels
//! combine.
//!
//! Every setting remembers the version of the change that made it. A worker's effective value
//! for a setting is the newest among the levels that apply to it; between settings of the same
//! version (the ones from `config.toml`, all version 0) the more specific level wins. So the
//! configured precedence worker > label > pool > global holds until an operator changes
//! something (between two label levels, the one with more labels, see `super::labels`), and
//! then the latest command wins: `bridge sample --all 0.1` reaches every worker, and a later
//! `bridge sample gpu-3 0.5` overrides it for that worker.
//!
//! A [`Layer`] holds validated patterns and rates. Levels enter as text (commands, the state
//! file, the cluster's bucket, `config.toml`) and are validated there, whole: a level with one
//! bad pattern is refused rather than kept without it, since dropping the only entry of an
//! allow list would let every event through.

use std::{cmp::Ordering, collections::BTreeMap};

use bridge_proto::{
    control::{ControlState, SamplingRule},
    pattern::Pattern,
    sampling::Rate,
    v1,
};
use serde::{Deserialize, Serialize};

use super::{
    config::{ControlConfig, LayerConfig},
    target::EventRate,
    timed::{self, Expiry},
};

/// A value and the version of the change that set it (0: from `config.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
pub struct Setting<T> {
    pub value: T,
    pub version: u64,
    /// Set by a timed change: when the setting reverts, and to what (see `timed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expiry: Option<Box<Expiry<T>>>,
}

impl<T> Setting<T> {
    /// A value from `config.toml`, older than any runtime change.
    pub fn configured(value: T) -> Self {
        Self::new(value, 0)
    }

    /// A value set by the change of this version, for good.
    pub fn new(value: T, version: u64) -> Self {
        Self {
            value,
            version,
            expiry: None,
        }
    }

    fn map<U>(self, f: impl Fn(T) -> U) -> Setting<U> {
        self.map_with(&f)
    }

    // `dyn`: the previous setting is mapped by the same function, one level down.
    fn map_with<U>(self, f: &dyn Fn(T) -> U) -> Setting<U> {
        Setting {
            value: f(self.value),
            version: self.version,
            expiry: self.expiry.map(|expiry| {
                Box::new(Expiry {
                    at_ms: expiry.at_ms,
                    previous: expiry.previous.map(|previous| previous.map_with(f)),
                })
            }),
        }
    }

    fn try_map<U, E>(self, f: impl Fn(T) -> Result<U, E>) -> Result<Setting<U>, E> {
        self.try_map_with(&f)
    }

    fn try_map_with<U, E>(self, f: &dyn Fn(T) -> Result<U, E>) -> Result<Setting<U>, E> {
        let expiry = match self.expiry {
            Some(expiry) => Some(Box::new(Expiry {
                at_ms: expiry.at_ms,
                previous: expiry
                    .previous
                    .map(|previous| previous.try_map_with(f))
                    .transpose()?,
            })),
            None => None,
        };
        Ok(Setting {
            value: f(self.value)?,
            version: self.version,
            expiry,
        })
    }
}

/// Allow and block lists, set together.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FilterSpec {
    pub allow: Vec<Pattern>,
    pub block: Vec<Pattern>,
}

/// A rule's pattern as a map key, ordered by its text ([`Pattern`] itself has no order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleKey(pub Pattern);

impl Ord for RuleKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.as_str().cmp(other.0.as_str())
    }
}

impl PartialOrd for RuleKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The settings made at one level. Its JSON (the state file, the cluster's bucket) is that of
/// `StoredLayer`; reading it validates every pattern and rate, and fails whole, naming the
/// field, when any is bad.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(try_from = "StoredLayer", into = "StoredLayer")]
pub struct Layer {
    pub enabled: Option<Setting<bool>>,
    pub sampling_rate: Option<Setting<Rate>>,
    pub rules: BTreeMap<RuleKey, Setting<Rate>>,
    pub filter: Option<Setting<FilterSpec>>,
    /// A target event rate (see `target`): while its value is `Some`, the hub chooses
    /// `sampling_rate`. `None` as a value: suspended by a timed fixed rate, until that reverts.
    pub target: Option<Setting<Option<EventRate>>>,
    /// Version of the last change at this level.
    pub version: u64,
}

impl Layer {
    pub fn is_empty(&self) -> bool {
        self.enabled.is_none()
            && self.sampling_rate.is_none()
            && self.rules.is_empty()
            && self.filter.is_none()
            && self.target.is_none()
    }

    /// The level's target and the rate it chose, while the target is in force.
    pub fn target_in_force(&self) -> Option<(EventRate, Rate)> {
        let goal = self.target.as_ref()?.value?;
        Some((goal, self.sampling_rate.as_ref()?.value))
    }

    /// A level as `config.toml` describes it, every setting at version 0; `key` (such as
    /// `control.pools.llama`) names it in errors.
    pub fn from_config(key: &str, config: &LayerConfig) -> Result<Self, Invalid> {
        let filter = if config.allow.is_some() || config.block.is_some() {
            let list = |name: &str, list: &Option<Vec<String>>| {
                patterns(
                    &format!("{key}.{name}"),
                    list.as_deref().unwrap_or_default(),
                )
            };
            Some(Setting::configured(FilterSpec {
                allow: list("allow", &config.allow)?,
                block: list("block", &config.block)?,
            }))
        } else {
            None
        };
        Ok(Self {
            enabled: config.enabled.map(Setting::configured),
            sampling_rate: config
                .sampling_rate
                .map(|r| rate(&format!("{key}.sampling_rate"), r).map(Setting::configured))
                .transpose()?,
            rules: configured_rules(&format!("{key}.rules"), &config.rules)?,
            filter,
            target: None,
            version: 0,
        })
    }

    /// The global level from `[control]`.
    pub fn global_from_config(config: &ControlConfig) -> Result<Self, Invalid> {
        Ok(Self {
            enabled: Some(Setting::configured(config.enabled)),
            sampling_rate: Some(Setting::configured(rate(
                "control.default_sampling_rate",
                config.default_sampling_rate,
            )?)),
            rules: configured_rules("control.rules", &config.rules)?,
            filter: Some(Setting::configured(FilterSpec {
                allow: patterns("control.allow", &config.allow)?,
                block: patterns("control.block", &config.block)?,
            })),
            target: None,
            version: 0,
        })
    }

    pub fn to_wire(&self) -> v1::ControlLayer {
        let names = |list: &[Pattern]| list.iter().map(ToString::to_string).collect();
        v1::ControlLayer {
            enabled: self.enabled.as_ref().map(|s| s.value),
            sampling_rate: self.sampling_rate.as_ref().map(|s| s.value.get()),
            rules: self
                .rules
                .iter()
                .map(|(key, s)| v1::SamplingRule {
                    pattern: key.0.to_string(),
                    sampling_rate: s.value.get(),
                })
                .collect(),
            filter: self.filter.as_ref().map(|s| v1::TelemetryEventFilter {
                allowed_events: names(&s.value.allow),
                blocked_events: names(&s.value.block),
            }),
            version: self.version,
            timed: timed::to_wire(self, timed::now_ms()),
            target_events_per_second: self
                .target
                .as_ref()
                .and_then(|s| s.value)
                .map(EventRate::get),
        }
    }
}

fn configured_rules(
    key: &str,
    config: &BTreeMap<String, f64>,
) -> Result<BTreeMap<RuleKey, Setting<Rate>>, Invalid> {
    rules(
        key,
        config
            .iter()
            .map(|(pattern, rate)| (pattern.clone(), Setting::configured(*rate))),
    )
}

/// Of one setting along a chain of levels (most general first), the one a worker gets, with
/// its level's `key`: the newest; between equal versions (`config.toml`'s, all 0) the more
/// specific level.
pub fn deciding_level<'a, K, T: 'a>(
    settings: impl IntoIterator<Item = (K, Option<&'a Setting<T>>)>,
) -> Option<(K, &'a Setting<T>)> {
    settings
        .into_iter()
        .filter_map(|(key, setting)| Some((key, setting?)))
        .fold(None, |winner, candidate| match winner {
            Some(winner) if winner.1.version > candidate.1.version => Some(winner),
            _ => Some(candidate),
        })
}

/// [`deciding_level`] without the level.
pub fn deciding<'a, T: 'a>(
    settings: impl IntoIterator<Item = Option<&'a Setting<T>>>,
) -> Option<&'a Setting<T>> {
    deciding_level(settings.into_iter().map(|setting| ((), setting))).map(|((), setting)| setting)
}

/// Combines levels, most general first, into the state a worker applies.
pub fn merge<'a>(layers: impl IntoIterator<Item = &'a Layer>, version: u64) -> ControlState {
    fn newer<'a, T>(current: &mut Option<&'a Setting<T>>, candidate: &'a Option<Setting<T>>) {
        *current = deciding([*current, candidate.as_ref()]);
    }
    let mut enabled = None;
    let mut rate = None;
    let mut filter = None;
    let mut rules: BTreeMap<&RuleKey, &Setting<Rate>> = BTreeMap::new();
    for layer in layers {
        newer(&mut enabled, &layer.enabled);
        newer(&mut rate, &layer.sampling_rate);
        newer(&mut filter, &layer.filter);
        for (pattern, setting) in &layer.rules {
            if let Some(winner) = deciding([rules.get(pattern).copied(), Some(setting)]) {
                rules.insert(pattern, winner);
            }
        }
    }
    let rules = rules
        .into_iter()
        .map(|(key, setting)| SamplingRule {
            pattern: key.0.clone(),
            rate: setting.value,
        })
        .collect();
    let filter = filter.map(|s| s.value.clone()).unwrap_or_default();
    ControlState::new(
        version,
        enabled.is_none_or(|s| s.value),
        rate.map_or(Rate::ALL, |s| s.value),
        rules,
        filter.allow,
        filter.block,
    )
}

/// A [`Layer`] as JSON has it, patterns and rates as written. The shape of the state file and
/// of the bucket's values: changing it strands the files and buckets of running clusters.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct StoredLayer {
    #[serde(skip_serializing_if = "Option::is_none")]
    enabled: Option<Setting<bool>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sampling_rate: Option<Setting<f64>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    rules: BTreeMap<String, Setting<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    filter: Option<Setting<StoredFilter>>,
    /// Events per second; `null` as a value: suspended (see [`Layer::target`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<Setting<Option<f64>>>,
    version: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredFilter {
    allow: Vec<String>,
    block: Vec<String>,
}

impl TryFrom<StoredLayer> for Layer {
    type Error = Invalid;

    fn try_from(stored: StoredLayer) -> Result<Self, Invalid> {
        Ok(Self {
            enabled: stored.enabled,
            sampling_rate: stored
                .sampling_rate
                .map(|s| s.try_map(|r| rate("sampling_rate", r)))
                .transpose()?,
            rules: rules("rules", stored.rules)?,
            filter: stored
                .filter
                .map(|s| {
                    s.try_map(|f| {
                        Ok(FilterSpec {
                            allow: patterns("filter.allow", &f.allow)?,
                            block: patterns("filter.block", &f.block)?,
                        })
                    })
                })
                .transpose()?,
            target: stored
                .target
                .map(|s| {
                    s.try_map(|goal| {
                        goal.map(|goal| {
                            EventRate::per_second(goal).map_err(|e| Invalid {
                                field: "target".into(),
                                message: e.to_string(),
                            })
                        })
                        .transpose()
                    })
                })
                .transpose()?,
            version: stored.version,
        })
    }
}

impl From<Layer> for StoredLayer {
    fn from(layer: Layer) -> Self {
        let names = |list: Vec<Pattern>| list.iter().map(ToString::to_string).collect();
        Self {
            enabled: layer.enabled,
            sampling_rate: layer.sampling_rate.map(|s| s.map(Rate::get)),
            rules: layer
                .rules
                .into_iter()
                .map(|(key, s)| (key.0.to_string(), s.map(Rate::get)))
                .collect(),
            filter: layer.filter.map(|s| {
                s.map(|f| StoredFilter {
                    allow: names(f.allow),
                    block: names(f.block),
                })
            }),
            target: layer.target.map(|s| s.map(|goal| goal.map(EventRate::get))),
            version: layer.version,
        }
    }
}

/// A pattern or rate that does not validate: where it is (`filter.allow[0]`,
/// `control.pools.llama.sampling_rate`) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct Invalid {
    pub field: String,
    pub message: String,
}

fn rate(field: &str, rate: f64) -> Result<Rate, Invalid> {
    Rate::new(rate).map_err(|e| Invalid {
        field: field.to_owned(),
        message: e.to_string(),
    })
}

fn patterns(field: &str, patterns: &[String]) -> Result<Vec<Pattern>, Invalid> {
    patterns
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Pattern::parse(p).map_err(|e| Invalid {
                field: format!("{field}[{i}]"),
                message: e.to_string(),
            })
        })
        .collect()
}

/// Rules keyed by pattern; a bad one is named by its pattern (`rules."a..b"`).
fn rules(
    field: &str,
    rules: impl IntoIterator<Item = (String, Setting<f64>)>,
) -> Result<BTreeMap<RuleKey, Setting<Rate>>, Invalid> {
    rules
        .into_iter()
        .map(|(pattern, setting)| {
            let field = format!("{field}.\"{pattern}\"");
            let key = Pattern::parse(&pattern).map_err(|e| Invalid {
                field: field.clone(),
                message: e.to_string(),
            })?;
            Ok((RuleKey(key), setting.try_map(|r| rate(&field, r))?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(rate: Option<(f64, u64)>, version: u64) -> Layer {
        Layer {
            sampling_rate: rate
                .map(|(value, version)| Setting::new(Rate::new(value).unwrap(), version)),
            version,
            ..Default::default()
        }
    }

    fn rule(pattern: &str, rate: f64, version: u64) -> (RuleKey, Setting<Rate>) {
        (
            RuleKey(Pattern::parse(pattern).unwrap()),
            Setting::new(Rate::new(rate).unwrap(), version),
        )
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
        global
            .rules
            .extend([rule("a.*", 0.5, 1), rule("b.*", 0.5, 1)]);
        let mut worker = Layer::default();
        worker.rules.extend([rule("a.*", 0.1, 2)]);
        let state = merge([&global, &worker], 2);
        let rates: Vec<_> = state
            .rules()
            .iter()
            .map(|r| (r.pattern.as_str(), r.rate.get()))
            .collect();
        assert_eq!(rates, [("a.*", 0.1), ("b.*", 0.5)]);
    }

    /// Written by the hub before levels were validated types: state files and buckets in this
    /// shape must still load, and be written back the same.
    const STORED: &str = r#"{
        "enabled": {"value": false, "version": 4},
        "sampling_rate": {"value": 0.25, "version": 7},
        "rules": {"inference.*": {"value": 0.5, "version": 3}},
        "filter": {"value": {"allow": ["inference.>"], "block": ["inference.debug"]}, "version": 9},
        "version": 9
    }"#;

    #[test]
    fn the_stored_json_shape_is_unchanged() {
        let layer: Layer = serde_json::from_str(STORED).unwrap();
        let state = merge([&layer], 9);
        assert!(!state.enabled);
        assert_eq!(state.default_rate.get(), 0.25);
        assert_eq!(state.rules()[0].pattern.as_str(), "inference.*");
        assert_eq!(state.allow[0].as_str(), "inference.>");
        assert_eq!(state.block[0].as_str(), "inference.debug");
        let written = serde_json::to_value(&layer).unwrap();
        let stored: serde_json::Value = serde_json::from_str(STORED).unwrap();
        assert_eq!(written, stored);
        // Unset settings stay out of the JSON, as before.
        assert_eq!(
            serde_json::to_string(&Layer::default()).unwrap(),
            r#"{"version":0}"#
        );
    }

    #[test]
    fn a_stored_level_with_one_bad_value_is_refused_whole_naming_it() {
        let with = |from: &str, to: &str| {
            let json = STORED.replacen(from, to, 1);
            assert_ne!(json, STORED, "{from} is in the sample");
            serde_json::from_str::<Layer>(&json)
                .expect_err(&json)
                .to_string()
        };
        let err = with(
            r#""allow": ["inference.>"]"#,
            r#""allow": ["inference.>", "inference..stop"]"#,
        );
        assert!(
            err.starts_with("filter.allow[1]: `inference..stop` has an empty token at position 2"),
            "{err}"
        );
        let err = with(r#"["inference.debug"]"#, r#"["a.>.b"]"#);
        assert!(err.starts_with("filter.block[0]: `a.>.b`"), "{err}");
        let err = with(r#""inference.*": {"#, r#""infer*": {"#);
        assert!(
            err.starts_with("rules.\"infer*\": `infer*`: token `infer*` mixes a wildcard"),
            "{err}"
        );
        let err = with(r#""value": 0.5"#, r#""value": 1.5"#);
        assert!(
            err.starts_with("rules.\"inference.*\": sampling rate 1.5 is invalid"),
            "{err}"
        );
        let err = with(r#""value": 0.25"#, r#""value": -1"#);
        assert!(
            err.starts_with("sampling_rate: sampling rate -1 is invalid"),
            "{err}"
        );
        let err = with(r#""enabled": {"#, r#""extra": 1, "enabled": {"#);
        assert!(err.contains("unknown field `extra`"), "{err}");
    }
}
