//! Sets of worker labels that select workers: `zone=us-east1-b`, `zone=a,rack=3`. A worker
//! matches a set when it has every label of it with exactly that value. Control changes
//! (label levels), `bridge workers` and subscriptions take them.
//!
//! Keys and values follow the rule for worker labels ([`crate::identity`]); a value is not
//! empty either (a worker's empty label is not kept, so it could never match). A set holds 1
//! to [`MAX_LABELS`] labels, sorted by key: its canonical text, `k=v,k2=v2`, names a label
//! level in the state file, `config.toml` and the cluster's bucket. A value may hold `,` and
//! `%`, which that text writes `%2C` and `%25` (keys hold neither), so the text reads back
//! into the same set.

use std::{collections::BTreeMap, fmt};

use crate::identity::{check_label_key, check_label_value};

/// Most labels one set holds.
pub const MAX_LABELS: usize = 16;

/// A valid, non-empty set of labels; see the module documentation. Ordered as label levels
/// apply: fewer labels first, then by canonical text.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LabelSet(BTreeMap<String, String>);

/// Why a label or a set was refused, naming it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidLabels(String);

impl LabelSet {
    /// A set from its labels, each checked.
    pub fn new(labels: BTreeMap<String, String>) -> Result<Self, InvalidLabels> {
        if labels.is_empty() {
            return Err(InvalidLabels(
                "no labels: give at least one key=value".into(),
            ));
        }
        if labels.len() > MAX_LABELS {
            return Err(InvalidLabels(format!(
                "{} labels; at most {MAX_LABELS}",
                labels.len()
            )));
        }
        for (key, value) in &labels {
            check_one(key, value)?;
        }
        Ok(Self(labels))
    }

    /// A set from `key=value` items (the CLI's repeated `--label`, the HTTP API's `?label=`);
    /// the value is everything after the first `=`.
    pub fn parse_items<'a>(
        items: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, InvalidLabels> {
        let mut labels = BTreeMap::new();
        for item in items {
            let (key, value) = split_item(item)?;
            check_one(key, value)?;
            if labels.insert(key.to_owned(), value.to_owned()).is_some() {
                return Err(InvalidLabels(format!(
                    "label `{}` is given twice",
                    key.escape_debug()
                )));
            }
        }
        Self::new(labels)
    }

    /// Reads the canonical text ([`LabelSet::canonical`]) back.
    pub fn parse_canonical(text: &str) -> Result<Self, InvalidLabels> {
        let mut labels = BTreeMap::new();
        for item in text.split(',') {
            let (key, escaped) = split_item(item)?;
            let value = unescape(escaped).ok_or_else(|| {
                InvalidLabels(format!(
                    "label `{}`: `%` in a value is written %25 (and `,` %2C)",
                    item.escape_debug()
                ))
            })?;
            check_one(key, &value)?;
            if labels.insert(key.to_owned(), value).is_some() {
                return Err(InvalidLabels(format!(
                    "label `{}` is given twice",
                    key.escape_debug()
                )));
            }
        }
        Self::new(labels)
    }

    /// `k=v,k2=v2`, keys sorted, `,` and `%` in values escaped.
    pub fn canonical(&self) -> String {
        let mut text = String::new();
        for (key, value) in &self.0 {
            if !text.is_empty() {
                text.push(',');
            }
            text.push_str(key);
            text.push('=');
            for c in value.chars() {
                match c {
                    ',' => text.push_str("%2C"),
                    '%' => text.push_str("%25"),
                    c => text.push(c),
                }
            }
        }
        text
    }

    /// Whether a worker with these labels matches: it has every label of the set.
    #[inline]
    pub fn matched_by(&self, worker: &BTreeMap<String, String>) -> bool {
        self.0
            .iter()
            .all(|(key, value)| worker.get(key).is_some_and(|v| v == value))
    }

    pub fn labels(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Never true: a set has at least one label.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn split_item(item: &str) -> Result<(&str, &str), InvalidLabels> {
    match item.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key, value)),
        _ => Err(InvalidLabels(format!(
            "label `{}`: write it as key=value",
            item.escape_debug()
        ))),
    }
}

fn check_one(key: &str, value: &str) -> Result<(), InvalidLabels> {
    check_label_key(key).map_err(|e| InvalidLabels(e.to_string()))?;
    if value.is_empty() {
        return Err(InvalidLabels(format!(
            "label `{key}`: the value is empty (workers' empty labels are not kept, so it would match none)"
        )));
    }
    check_label_value(value).map_err(|e| InvalidLabels(format!("label `{key}`: {e}")))
}

fn unescape(value: &str) -> Option<String> {
    let mut out = String::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        match rest.get(at..at + 3) {
            Some("%2C") => out.push(','),
            Some("%25") => out.push('%'),
            _ => return None,
        }
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    Some(out)
}

impl Ord for LabelSet {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.len()
            .cmp(&other.len())
            .then_with(|| self.canonical().cmp(&other.canonical()))
    }
}

impl PartialOrd for LabelSet {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The canonical text.
impl fmt::Display for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> LabelSet {
        LabelSet::parse_items(items.iter().copied()).unwrap()
    }

    #[test]
    fn canonical_text_is_sorted_and_reads_back() {
        let labels = set(&["zone=us-east1-b", "rack=r 3"]);
        assert_eq!(labels.canonical(), "rack=r 3,zone=us-east1-b");
        assert_eq!(LabelSet::parse_canonical(&labels.canonical()), Ok(labels));
        let odd = set(&["a=x,b=y", "b=100%", "c=k=v"]);
        assert_eq!(odd.canonical(), "a=x%2Cb=y,b=100%25,c=k=v");
        assert_eq!(LabelSet::parse_canonical(&odd.canonical()), Ok(odd));
        assert!(LabelSet::parse_canonical("a=50%").is_err());
    }

    #[test]
    fn fewer_labels_order_first_then_by_text() {
        let mut sets = [set(&["a=1", "b=2"]), set(&["z=1"]), set(&["b=1"])];
        sets.sort();
        let texts: Vec<_> = sets.iter().map(LabelSet::canonical).collect();
        assert_eq!(texts, ["b=1", "z=1", "a=1,b=2"]);
    }

    #[test]
    fn a_worker_matches_when_it_has_every_label() {
        let worker: BTreeMap<_, _> = [("zone", "a"), ("rack", "3")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        assert!(set(&["zone=a"]).matched_by(&worker));
        assert!(set(&["zone=a", "rack=3"]).matched_by(&worker));
        assert!(!set(&["zone=a", "rack=4"]).matched_by(&worker));
        assert!(!set(&["zone=b"]).matched_by(&worker));
        assert!(!set(&["gpu=a100"]).matched_by(&worker));
    }

    #[test]
    fn bad_labels_are_refused_naming_them() {
        let error = |items: &[&str]| {
            LabelSet::parse_items(items.iter().copied())
                .unwrap_err()
                .to_string()
        };
        assert!(error(&["zone"]).contains("`zone`: write it as key=value"));
        assert!(error(&["=x"]).contains("`=x`: write it as key=value"));
        assert!(error(&["Zone=x"]).contains("label key: \"Zone\""));
        assert!(error(&["zone=a\tb"]).contains("label `zone`"));
        assert!(error(&["zone="]).contains("the value is empty"));
        assert!(error(&["zone=a", "zone=b"]).contains("given twice"));
        assert!(error(&[]).contains("at least one"));
        let many: Vec<String> = (0..17).map(|i| format!("k{i}=v")).collect();
        assert!(error(&many.iter().map(String::as_str).collect::<Vec<_>>()).contains("at most 16"));
    }
}
