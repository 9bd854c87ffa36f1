//! Timed changes (`--for 15m`): settings that return to what they were when their time is up.
//!
//! A timed change stores, on each setting it makes, when it expires and the setting it replaced
//! (absent, or a value with its version). When the time is up the setting gets exactly that
//! back, version included, so the change is undone as if it had never been made: a newer change
//! at a broader level, made during the window, keeps winning after the revert, and an older one
//! that the timed change had overridden wins again. The revert itself is a new change of the
//! level (a new level version), so that workers are pushed the result.
//!
//! A later change to the same setting at the same level replaces the timed one and its timer:
//! an untimed one makes its value permanent, a timed one keeps the first one's previous
//! setting, so that stacked timed changes never leave a temporary value behind.
//!
//! Expiry times are Unix milliseconds by the wall clock, so that they mean the same after a hub
//! restart and on every hub of a cluster.

use std::time::{SystemTime, UNIX_EPOCH};

use bridge_proto::v1;
use serde::{Deserialize, Serialize};

use super::layer::{FilterSpec, Layer, Setting, deciding};

/// When a setting made by a timed change reverts, and to what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(bound(deserialize = "T: Deserialize<'de>"))]
pub struct Expiry<T> {
    /// Unix milliseconds.
    pub at_ms: u64,
    /// The setting the timed change replaced; `None` when the level did not set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Setting<T>>,
}

/// The wall clock, Unix milliseconds.
pub fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// The setting a change makes over `current`: `value` at `version`, reverting at `until` (Unix
/// milliseconds) when the change is timed.
pub fn replace<T>(
    current: Option<Setting<T>>,
    value: T,
    version: u64,
    until: Option<u64>,
) -> Setting<T> {
    let expiry = until.map(|at_ms| {
        let previous = current.and_then(|current| match current.expiry {
            // Timed over timed: what the first one replaced is what both undo to.
            Some(expiry) => expiry.previous,
            None => Some(current),
        });
        Box::new(Expiry { at_ms, previous })
    });
    Setting {
        value,
        version,
        expiry,
    }
}

/// One setting that a revert gave back, for the hub's log.
#[derive(Debug, Clone, PartialEq)]
pub struct Reverted {
    /// `sampling_rate`, `enabled`, `filter`, `rule inference.*`.
    pub setting: String,
    /// The value it has again, as `bridge control` writes it; `None`: unset, so inherited.
    pub to: Option<String>,
}

impl std::fmt::Display for Reverted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.to {
            Some(value) => write!(f, "{} back to {value}", self.setting),
            None => write!(f, "{} unset (inherited)", self.setting),
        }
    }
}

/// Gives every setting of `layer` whose expiry is at or before `now_ms` its previous setting
/// back; returns them. The caller gives the level its new version.
pub fn revert_due(layer: &mut Layer, now_ms: u64) -> Vec<Reverted> {
    let mut reverted = Vec::new();
    let mut one = |setting: String, to: Option<String>| reverted.push(Reverted { setting, to });
    if revert(&mut layer.enabled, now_ms) {
        one(
            "enabled".into(),
            layer.enabled.as_ref().map(|s| on_off(s.value)),
        );
    }
    if revert(&mut layer.sampling_rate, now_ms) {
        let to = layer.sampling_rate.as_ref().map(|s| s.value.to_string());
        one("sampling_rate".into(), to);
    }
    if revert(&mut layer.filter, now_ms) {
        one(
            "filter".into(),
            layer.filter.as_ref().map(|s| filter_text(&s.value)),
        );
    }
    if revert(&mut layer.target, now_ms) {
        one(
            "target".into(),
            layer.target.as_ref().map(|s| target_text(s.value)),
        );
    }
    let due: Vec<_> = layer
        .rules
        .iter()
        .filter(|(_, s)| is_due(s, now_ms))
        .map(|(key, _)| key.clone())
        .collect();
    for key in due {
        let mut slot = layer.rules.remove(&key);
        revert(&mut slot, now_ms);
        let to = slot.as_ref().map(|s| s.value.to_string());
        one(format!("rule {}", key.0), to);
        if let Some(setting) = slot {
            layer.rules.insert(key, setting);
        }
    }
    reverted
}

fn is_due<T>(setting: &Setting<T>, now_ms: u64) -> bool {
    setting.expiry.as_ref().is_some_and(|e| e.at_ms <= now_ms)
}

fn revert<T>(slot: &mut Option<Setting<T>>, now_ms: u64) -> bool {
    if !slot.as_ref().is_some_and(|s| is_due(s, now_ms)) {
        return false;
    }
    *slot = slot.take().and_then(|s| s.expiry).and_then(|e| e.previous);
    true
}

/// The earliest expiry of the level's settings, Unix milliseconds.
pub fn earliest(layer: &Layer) -> Option<u64> {
    fn at<T>(setting: Option<&Setting<T>>) -> Option<u64> {
        setting.and_then(|s| s.expiry.as_ref()).map(|e| e.at_ms)
    }
    [
        at(layer.enabled.as_ref()),
        at(layer.sampling_rate.as_ref()),
        at(layer.filter.as_ref()),
        at(layer.target.as_ref()),
    ]
    .into_iter()
    .chain(layer.rules.values().map(|s| at(Some(s))))
    .flatten()
    .min()
}

/// The earliest expiry among the settings in force for a worker whose levels are `chain`
/// (most general first): of each setting, the one `layer::merge` takes. A timed setting that a
/// newer one overrides changes nothing when it reverts.
pub fn earliest_in_force(chain: &[&Layer]) -> Option<u64> {
    fn newest<'a, T: 'a>(settings: impl Iterator<Item = Option<&'a Setting<T>>>) -> Option<u64> {
        deciding(settings)
            .and_then(|s| s.expiry.as_ref())
            .map(|e| e.at_ms)
    }
    let mut earliest = [
        newest(chain.iter().map(|l| l.enabled.as_ref())),
        newest(chain.iter().map(|l| l.sampling_rate.as_ref())),
        newest(chain.iter().map(|l| l.filter.as_ref())),
    ]
    .into_iter()
    .flatten()
    .min();
    for layer in chain {
        for key in layer.rules.keys() {
            let at = newest(chain.iter().map(|l| l.rules.get(key)));
            earliest = earliest.into_iter().chain(at).min();
        }
    }
    earliest
}

/// The level's timed settings as `ControlLayer.timed` shows them, `now_ms` being now.
pub fn to_wire(layer: &Layer, now_ms: u64) -> Vec<v1::TimedSetting> {
    let entry = |setting: &str, pattern: String, at_ms: u64, to: Option<String>| v1::TimedSetting {
        setting: setting.to_owned(),
        pattern,
        expires_in_ms: at_ms.saturating_sub(now_ms),
        reverts_to: to,
    };
    let mut timed = Vec::new();
    if let Some(e) = layer.enabled.as_ref().and_then(|s| s.expiry.as_ref()) {
        let to = e.previous.as_ref().map(|p| on_off(p.value));
        timed.push(entry("enabled", String::new(), e.at_ms, to));
    }
    if let Some(e) = layer.sampling_rate.as_ref().and_then(|s| s.expiry.as_ref()) {
        let to = e.previous.as_ref().map(|p| p.value.to_string());
        timed.push(entry("sampling_rate", String::new(), e.at_ms, to));
    }
    for (key, setting) in &layer.rules {
        if let Some(e) = &setting.expiry {
            let to = e.previous.as_ref().map(|p| p.value.to_string());
            timed.push(entry("rule", key.0.to_string(), e.at_ms, to));
        }
    }
    if let Some(e) = layer.filter.as_ref().and_then(|s| s.expiry.as_ref()) {
        let to = e.previous.as_ref().map(|p| filter_text(&p.value));
        timed.push(entry("filter", String::new(), e.at_ms, to));
    }
    if let Some(e) = layer.target.as_ref().and_then(|s| s.expiry.as_ref()) {
        let to = e.previous.as_ref().map(|p| target_text(p.value));
        timed.push(entry("target", String::new(), e.at_ms, to));
    }
    timed
}

/// A target as `bridge control` writes it: `60/s`, or `suspended`.
fn target_text(target: Option<super::target::EventRate>) -> String {
    target.map_or_else(|| "suspended".to_owned(), |goal| goal.to_string())
}

fn on_off(enabled: bool) -> String {
    if enabled { "on" } else { "off" }.to_owned()
}

fn filter_text(filter: &FilterSpec) -> String {
    let list = |patterns: &[bridge_proto::pattern::Pattern]| {
        patterns
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    format!(
        "allow=[{}] block=[{}]",
        list(&filter.allow),
        list(&filter.block)
    )
}

#[cfg(test)]
mod tests {
    use bridge_proto::{pattern::Pattern, sampling::Rate};

    use super::*;
    use crate::{
        command::Change,
        control::{apply_timed_change, layer::merge},
    };

    fn sampling(r: f64) -> Change {
        Change::Sampling {
            rate: Rate::new(r).unwrap(),
            patterns: vec![],
        }
    }

    fn rate_of(layers: &[&Layer]) -> f64 {
        merge(layers.iter().copied(), 99).default_rate.get()
    }

    #[test]
    fn a_timed_change_reverts_to_the_value_and_version_it_replaced() {
        let mut worker = Layer::default();
        apply_timed_change(&mut worker, &sampling(0.5), 3, None);
        apply_timed_change(&mut worker, &sampling(0.1), 5, Some(1_000));
        assert_eq!(earliest(&worker), Some(1_000));
        assert!(revert_due(&mut worker, 999).is_empty(), "not due yet");
        assert_eq!(worker.sampling_rate.as_ref().unwrap().value.get(), 0.1);
        let reverted = revert_due(&mut worker, 1_000);
        assert_eq!(reverted.len(), 1);
        assert_eq!(reverted[0].to_string(), "sampling_rate back to 0.5");
        assert_eq!(
            worker.sampling_rate,
            Some(Setting::new(Rate::new(0.5).unwrap(), 3))
        );
        assert_eq!(earliest(&worker), None);
    }

    #[test]
    fn a_setting_the_level_did_not_have_is_removed_again() {
        let mut worker = Layer::default();
        apply_timed_change(&mut worker, &Change::Toggle(false), 4, Some(10));
        let reverted = revert_due(&mut worker, 20);
        assert_eq!(reverted[0].to_string(), "enabled unset (inherited)");
        assert!(worker.is_empty());
    }

    #[test]
    fn broader_changes_win_after_the_revert_as_if_it_had_never_been_made() {
        // global 0.2 (v2), then worker 0.9 for a while (v3): the worker has 0.9.
        let mut global = Layer::default();
        apply_timed_change(&mut global, &sampling(0.2), 2, None);
        let mut worker = Layer::default();
        apply_timed_change(&mut worker, &sampling(0.9), 3, Some(100));
        assert_eq!(rate_of(&[&global, &worker]), 0.9);
        assert_eq!(earliest_in_force(&[&global, &worker]), Some(100));
        // The older global change wins again after the revert.
        revert_due(&mut worker, 100);
        assert_eq!(rate_of(&[&global, &worker]), 0.2);

        // A newer global change made during the window keeps winning after it.
        let mut worker = Layer::default();
        apply_timed_change(&mut worker, &sampling(0.9), 5, Some(200));
        apply_timed_change(&mut global, &sampling(0.4), 6, None);
        assert_eq!(rate_of(&[&global, &worker]), 0.4);
        assert_eq!(
            earliest_in_force(&[&global, &worker]),
            None,
            "the timed setting is not in force"
        );
        revert_due(&mut worker, 200);
        assert_eq!(rate_of(&[&global, &worker]), 0.4);
    }

    #[test]
    fn a_later_change_replaces_the_timer_and_stacked_timed_changes_undo_to_the_first_value() {
        let mut layer = Layer::default();
        apply_timed_change(&mut layer, &sampling(0.5), 1, None);
        apply_timed_change(&mut layer, &sampling(0.1), 2, Some(100));
        apply_timed_change(&mut layer, &sampling(0.2), 3, Some(300));
        assert_eq!(
            earliest(&layer),
            Some(300),
            "the second timer replaced the first"
        );
        assert!(revert_due(&mut layer, 200).is_empty());
        revert_due(&mut layer, 300);
        assert_eq!(
            layer.sampling_rate,
            Some(Setting::new(Rate::new(0.5).unwrap(), 1))
        );

        // An untimed change makes its value permanent.
        apply_timed_change(&mut layer, &sampling(0.1), 4, Some(100));
        apply_timed_change(&mut layer, &sampling(0.3), 5, None);
        assert_eq!(earliest(&layer), None);
        assert!(revert_due(&mut layer, u64::MAX).is_empty());
        assert_eq!(layer.sampling_rate.as_ref().unwrap().value.get(), 0.3);

        // A change to another setting leaves the timer alone; a reset removes it.
        apply_timed_change(&mut layer, &sampling(0.1), 6, Some(100));
        apply_timed_change(&mut layer, &Change::Toggle(false), 7, None);
        assert_eq!(earliest(&layer), Some(100));
        apply_timed_change(&mut layer, &Change::Reset, 8, None);
        assert_eq!(earliest(&layer), None);
    }

    #[test]
    fn rules_revert_one_pattern_at_a_time() {
        let rule = |r: f64, p: &str| Change::Sampling {
            rate: Rate::new(r).unwrap(),
            patterns: vec![Pattern::parse(p).unwrap()],
        };
        let mut layer = Layer::default();
        apply_timed_change(&mut layer, &rule(0.5, "a.*"), 1, None);
        apply_timed_change(&mut layer, &rule(0.1, "a.*"), 2, Some(100));
        apply_timed_change(&mut layer, &rule(0.1, "b.*"), 3, Some(100));
        let wire = to_wire(&layer, 40);
        assert_eq!(wire.len(), 2);
        assert_eq!(
            (
                wire[0].pattern.as_str(),
                wire[0].expires_in_ms,
                wire[0].reverts_to.as_deref()
            ),
            ("a.*", 60, Some("0.5"))
        );
        assert_eq!(wire[1].reverts_to, None);
        let reverted: Vec<_> = revert_due(&mut layer, 100)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            reverted,
            ["rule a.* back to 0.5", "rule b.* unset (inherited)"]
        );
        assert_eq!(layer.rules.len(), 1);
    }

    #[test]
    fn expiries_are_stored_and_read_back() {
        let mut layer = Layer::default();
        apply_timed_change(&mut layer, &sampling(0.5), 1, None);
        apply_timed_change(&mut layer, &sampling(0.1), 2, Some(1_700_000_000_000));
        let json = serde_json::to_string(&layer).unwrap();
        assert!(
            json.contains(
                r#""expiry":{"at_ms":1700000000000,"previous":{"value":0.5,"version":1}}"#
            ),
            "{json}"
        );
        let read: Layer = serde_json::from_str(&json).unwrap();
        assert_eq!(read, layer);
        let bad = json.replace(r#""value":0.5"#, r#""value":5"#);
        let err = serde_json::from_str::<Layer>(&bad).unwrap_err().to_string();
        assert!(
            err.starts_with("sampling_rate: sampling rate 5 is invalid"),
            "{err}"
        );
    }
}
