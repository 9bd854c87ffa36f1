//! Label levels: settings for every worker whose labels include a set of labels
//! (`bridge sample --label zone=us-east1-b 0.25`, `[control.labels."zone=us-east1-b"]`).
//!
//! A label level sits between the pool's and the worker's own: worker > label > pool > global
//! for settings of the same version (see [`super::layer`]). Several label levels can apply to
//! one worker; they come in [`LabelSet`]'s order, fewer labels first, then by canonical text, so
//! that the more specific set wins a tie. They are keyed by that canonical text in the state
//! file, the cluster's bucket and `config.toml`.

use std::collections::BTreeMap;

use bridge_proto::labels::LabelSet;
use serde::{Deserialize, Deserializer, Serializer};

use super::{
    config::LayerConfig,
    layer::{Invalid, Layer},
};

/// Label levels, in the order they apply.
pub type LabelLevels = BTreeMap<LabelSet, Layer>;

/// The levels of `configured` and `runtime` that apply to a worker with `labels`, in order
/// (for each set, its configured settings before its runtime ones).
pub fn matching<'a>(
    configured: &'a LabelLevels,
    runtime: &'a LabelLevels,
    labels: &BTreeMap<String, String>,
) -> Vec<(&'a LabelSet, [Option<&'a Layer>; 2])> {
    if labels.is_empty() || (configured.is_empty() && runtime.is_empty()) {
        return Vec::new();
    }
    let mut sets: Vec<&LabelSet> = configured
        .keys()
        .chain(runtime.keys())
        .filter(|set| set.matched_by(labels))
        .collect();
    sets.sort();
    sets.dedup();
    sets.into_iter()
        .map(|set| (set, [configured.get(set), runtime.get(set)]))
        .collect()
}

/// Whether any of these levels applies to a worker with `labels`.
pub fn any_matches(levels: &LabelLevels, labels: &BTreeMap<String, String>) -> bool {
    !labels.is_empty() && levels.keys().any(|set| set.matched_by(labels))
}

/// `[control.labels."k=v"]`, validated; a bad key or value is named by its key.
pub fn from_config(config: &BTreeMap<String, LayerConfig>) -> Result<LabelLevels, Invalid> {
    let mut levels = LabelLevels::new();
    for (text, level) in config {
        let key = format!("control.labels.\"{text}\"");
        let set = LabelSet::parse_canonical(text).map_err(|e| Invalid {
            field: key.clone(),
            message: e.to_string(),
        })?;
        let layer = Layer::from_config(&key, level)?;
        if levels.insert(set.clone(), layer).is_some() {
            return Err(Invalid {
                field: key,
                message: format!("the same labels as another entry (written {set})"),
            });
        }
    }
    Ok(levels)
}

/// The state file's `labels`: levels by canonical text.
pub mod by_text {
    use super::*;

    pub fn serialize<S: Serializer>(
        levels: &LabelLevels,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_map(levels.iter().map(|(set, layer)| (set.canonical(), layer)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<LabelLevels, D::Error> {
        BTreeMap::<String, Layer>::deserialize(deserializer)?
            .into_iter()
            .map(|(text, layer)| {
                let set = LabelSet::parse_canonical(&text)
                    .map_err(|e| serde::de::Error::custom(format!("labels.\"{text}\": {e}")))?;
                Ok((set, layer))
            })
            .collect()
    }

    /// For `skip_serializing_if`: state files without label levels stay as they were.
    pub fn is_empty(levels: &LabelLevels) -> bool {
        levels.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::layer::Setting;
    use bridge_proto::sampling::Rate;

    fn set(text: &str) -> LabelSet {
        LabelSet::parse_canonical(text).unwrap()
    }

    fn level(rate: f64) -> Layer {
        Layer {
            sampling_rate: Some(Setting::configured(Rate::new(rate).unwrap())),
            ..Default::default()
        }
    }

    #[test]
    fn matching_levels_come_fewest_labels_first_configured_before_runtime() {
        let configured: LabelLevels = [(set("zone=a"), level(0.5))].into();
        let runtime: LabelLevels = [
            (set("rack=3,zone=a"), level(0.1)),
            (set("zone=a"), level(0.2)),
            (set("gpu=h100"), level(0.3)),
            (set("rack=3"), level(0.4)),
        ]
        .into();
        let worker: BTreeMap<String, String> = [("zone", "a"), ("rack", "3")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        let found: Vec<_> = matching(&configured, &runtime, &worker)
            .into_iter()
            .map(|(set, [c, r])| (set.canonical(), c.is_some(), r.is_some()))
            .collect();
        assert_eq!(
            found,
            [
                ("rack=3".to_owned(), false, true),
                ("zone=a".to_owned(), true, true),
                ("rack=3,zone=a".to_owned(), false, true),
            ]
        );
        assert!(matching(&configured, &runtime, &BTreeMap::new()).is_empty());
        assert!(any_matches(&runtime, &worker));
        assert!(!any_matches(
            &configured,
            &[("zone".to_owned(), "b".to_owned())].into()
        ));
    }

    #[test]
    fn configured_label_levels_are_validated_naming_the_key() {
        let config: BTreeMap<String, LayerConfig> = [(
            "Zone=a".to_owned(),
            LayerConfig {
                sampling_rate: Some(0.5),
                ..Default::default()
            },
        )]
        .into();
        let error = from_config(&config).unwrap_err().to_string();
        assert!(
            error.starts_with("control.labels.\"Zone=a\": label key: \"Zone\""),
            "{error}"
        );
        let config: BTreeMap<String, LayerConfig> = [(
            "zone=a".to_owned(),
            LayerConfig {
                sampling_rate: Some(1.5),
                ..Default::default()
            },
        )]
        .into();
        let error = from_config(&config).unwrap_err().to_string();
        assert!(
            error.starts_with("control.labels.\"zone=a\".sampling_rate"),
            "{error}"
        );
    }
}
