//! Conditions on an event's metadata, for subscriptions: `model=llama-70b` (the event has
//! `model` and it is exactly `llama-70b`) and `result!=success` (the event has no `result`, or
//! it is anything but `success`). Values compare as bytes, case and all. The hub evaluates
//! them before anything is queued; the CLI (`--where`) and the HTTP API (`?where=`) write them
//! as text, and `SubscribeRequest.metadata_conditions` carries them.

use std::fmt;

use crate::v1;

/// Most conditions one subscription takes.
pub const MAX_CONDITIONS: usize = 16;
/// Longest key or value of a condition, in bytes.
pub const MAX_BYTES: usize = 256;

/// One condition; see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub key: String,
    pub value: String,
    /// `key!=value` rather than `key=value`.
    pub negated: bool,
}

/// Why a condition was refused, in words for a one-line error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConditionError(String);

impl Condition {
    /// Reads `KEY=VALUE` or `KEY!=VALUE`; the value is everything after the first `=` (it may
    /// hold `=`), and may be empty.
    pub fn parse(text: &str) -> Result<Self, ConditionError> {
        let Some((left, value)) = text.split_once('=') else {
            return Err(ConditionError(format!(
                "`{}`: a condition is KEY=VALUE or KEY!=VALUE",
                text.escape_debug()
            )));
        };
        let (key, negated) = match left.strip_suffix('!') {
            Some(key) => (key, true),
            None => (left, false),
        };
        Self::new(key, value, negated)
    }

    /// A condition from its parts, checked.
    pub fn new(key: &str, value: &str, negated: bool) -> Result<Self, ConditionError> {
        if key.is_empty() {
            return Err(ConditionError(
                "a condition needs a metadata key before `=` or `!=`".into(),
            ));
        }
        for (what, text) in [("key", key), ("value", value)] {
            if text.len() > MAX_BYTES {
                return Err(ConditionError(format!(
                    "a condition's {what} is {} bytes; at most {MAX_BYTES}",
                    text.len()
                )));
            }
        }
        Ok(Self {
            key: key.to_owned(),
            value: value.to_owned(),
            negated,
        })
    }

    /// Whether an event whose metadata `key` is `value` (`None`: absent) meets it.
    #[inline]
    pub fn holds(&self, value: Option<&str>) -> bool {
        (value == Some(self.value.as_str())) != self.negated
    }

    /// Checks a request's conditions: at most [`MAX_CONDITIONS`], each valid.
    pub fn from_request(conditions: &[v1::MetadataCondition]) -> Result<Vec<Self>, ConditionError> {
        if conditions.len() > MAX_CONDITIONS {
            return Err(ConditionError(format!(
                "{} metadata conditions; at most {MAX_CONDITIONS}",
                conditions.len()
            )));
        }
        conditions
            .iter()
            .enumerate()
            .map(|(i, c)| {
                Self::new(&c.key, &c.value, c.negated)
                    .map_err(|e| ConditionError(format!("metadata_conditions[{i}]: {}", e.0)))
            })
            .collect()
    }
}

impl From<&Condition> for v1::MetadataCondition {
    fn from(condition: &Condition) -> Self {
        Self {
            key: condition.key.clone(),
            value: condition.value.clone(),
            negated: condition.negated,
        }
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = if self.negated { "!=" } else { "=" };
        write!(f, "{}{op}{}", self.key, self.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_equal_and_not_equal() {
        let equal = Condition::parse("model=llama-70b").unwrap();
        assert_eq!(
            (equal.key.as_str(), equal.value.as_str(), equal.negated),
            ("model", "llama-70b", false)
        );
        let unequal = Condition::parse("result!=success").unwrap();
        assert_eq!(
            (
                unequal.key.as_str(),
                unequal.value.as_str(),
                unequal.negated
            ),
            ("result", "success", true)
        );
        // The value is the rest, `=` and all; it may be empty.
        assert_eq!(Condition::parse("q=a=b").unwrap().value, "a=b");
        assert_eq!(Condition::parse("tier=").unwrap().value, "");
        assert_eq!(
            Condition::parse("result!=success").unwrap().to_string(),
            "result!=success"
        );
    }

    #[test]
    fn refuses_what_is_not_a_condition() {
        for bad in ["model", "=llama", "!=x", ""] {
            assert!(Condition::parse(bad).is_err(), "{bad}");
        }
        let long = format!("model={}", "x".repeat(MAX_BYTES + 1));
        assert!(
            Condition::parse(&long)
                .unwrap_err()
                .to_string()
                .contains("at most 256")
        );
        let many = vec![
            v1::MetadataCondition {
                key: "k".into(),
                ..Default::default()
            };
            17
        ];
        assert!(Condition::from_request(&many).is_err());
    }

    #[test]
    fn absent_keys_meet_only_not_equal() {
        let equal = Condition::parse("model=llama").unwrap();
        let unequal = Condition::parse("model!=llama").unwrap();
        assert!(equal.holds(Some("llama")) && !unequal.holds(Some("llama")));
        assert!(!equal.holds(Some("Llama")) && unequal.holds(Some("Llama")));
        assert!(!equal.holds(None) && unequal.holds(None));
    }
}
