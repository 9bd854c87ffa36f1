//! `[control]` of `config.toml`: the control state workers start from, as written. The control
//! plane validates it into levels ([`super::layer`]) when the configuration loads.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `[control]`: the control state workers start from, before any runtime change.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Whether workers emit at all.
    pub enabled: bool,
    /// Fraction of events kept when no rule matches.
    pub default_sampling_rate: f64,
    /// Per-pattern rates for every worker.
    pub rules: BTreeMap<String, f64>,
    /// Allow list for every worker (empty: everything).
    pub allow: Vec<String>,
    /// Block list for every worker.
    pub block: Vec<String>,
    /// Settings for the workers of a pool, by pool name.
    pub pools: BTreeMap<String, LayerConfig>,
    /// Settings for one worker, by worker id.
    pub workers: BTreeMap<String, LayerConfig>,
    /// Settings for every worker whose labels include these, by `k=v,k2=v2`.
    pub labels: BTreeMap<String, LayerConfig>,
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            default_sampling_rate: 1.0,
            rules: BTreeMap::new(),
            allow: Vec::new(),
            block: Vec::new(),
            pools: BTreeMap::new(),
            workers: BTreeMap::new(),
            labels: BTreeMap::new(),
        }
    }
}

/// `[control.pools.NAME]`, `[control.labels."K=V"]` and `[control.workers.ID]`: unset keys
/// inherit.
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct LayerConfig {
    pub enabled: Option<bool>,
    pub sampling_rate: Option<f64>,
    pub rules: BTreeMap<String, f64>,
    pub allow: Option<Vec<String>>,
    pub block: Option<Vec<String>>,
}
