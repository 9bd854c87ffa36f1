//! A worker's effective control state and the verdict it gives each event.
//!
//! Workers apply it before queueing an event; the hub applies the same state to the events of
//! workers that have not acknowledged it, so both sides reach the same verdict.

use crate::{
    pattern::{NameError, Pattern},
    sampling::{Presampled, Rate, RateError, SamplingKey},
    v1,
};

/// A sampling rate for the events matching a pattern.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingRule {
    pub pattern: Pattern,
    pub rate: Rate,
}

/// The complete control state a worker applies (the validated form of `v1::ControlState`).
#[derive(Debug, Clone, PartialEq)]
pub struct ControlState {
    pub version: u64,
    pub enabled: bool,
    pub default_rate: Rate,
    /// Most specific first (see [`Pattern::specificity_cmp`]); the first match applies.
    rules: Vec<SamplingRule>,
    pub allow: Vec<Pattern>,
    pub block: Vec<Pattern>,
}

/// What happens to an event under a control state.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Telemetry is switched off.
    Disabled,
    /// Not on the allow list, or on the block list.
    Filtered,
    /// Lost the sampling draw at this rate.
    SampledOut(Rate),
    /// Kept; it was sampled at this rate.
    Keep(Rate),
}

/// A control state that cannot be applied; the message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ControlError {
    #[error("{field}: {source}")]
    Rate {
        field: String,
        #[source]
        source: RateError,
    },
    #[error("{field}: {source}")]
    Pattern {
        field: String,
        #[source]
        source: NameError,
    },
}

impl Default for ControlState {
    /// Everything enabled, everything kept: what a worker does before it hears from a hub.
    fn default() -> Self {
        Self {
            version: 0,
            enabled: true,
            default_rate: Rate::ALL,
            rules: Vec::new(),
            allow: Vec::new(),
            block: Vec::new(),
        }
    }
}

impl ControlState {
    pub fn new(
        version: u64,
        enabled: bool,
        default_rate: Rate,
        mut rules: Vec<SamplingRule>,
        allow: Vec<Pattern>,
        block: Vec<Pattern>,
    ) -> Self {
        rules.sort_by(|a, b| a.pattern.specificity_cmp(&b.pattern));
        rules.dedup_by(|later, earlier| later.pattern == earlier.pattern);
        Self {
            version,
            enabled,
            default_rate,
            rules,
            allow,
            block,
        }
    }

    /// Per-pattern rates, most specific first.
    pub fn rules(&self) -> &[SamplingRule] {
        &self.rules
    }

    /// The verdict for a dotted event name.
    #[inline]
    pub fn decide_name(&self, name: &str, key: SamplingKey<'_>) -> Verdict {
        self.decide(|| name.split('.'), key)
    }

    /// The verdict for an event given as parts.
    #[inline]
    pub fn decide_parts<S: AsRef<str>>(&self, parts: &[S], key: SamplingKey<'_>) -> Verdict {
        self.decide(|| parts.iter().map(AsRef::as_ref), key)
    }

    /// `tokens` yields the event name's tokens afresh on each call, so that no matcher allocates.
    #[inline]
    pub fn decide<'a, I, F>(&self, tokens: F, key: SamplingKey<'_>) -> Verdict
    where
        F: Fn() -> I,
        I: Iterator<Item = &'a str>,
    {
        self.decide_presampled(tokens, key, Presampled::NOT)
    }

    /// The verdict for an event its sender may have sampled already (see
    /// [`Presampled::resample`]): `Keep` carries the rate it was kept at overall.
    #[inline]
    pub fn decide_presampled<'a, I, F>(
        &self,
        tokens: F,
        key: SamplingKey<'_>,
        before: Presampled,
    ) -> Verdict
    where
        F: Fn() -> I,
        I: Iterator<Item = &'a str>,
    {
        if !self.enabled {
            return Verdict::Disabled;
        }
        if !self.admits(&tokens) {
            return Verdict::Filtered;
        }
        let rate = self.rate_for(&tokens);
        match before.resample(rate, key) {
            Some(kept_at) => Verdict::Keep(kept_at),
            None => Verdict::SampledOut(rate),
        }
    }

    /// The highest rate any event is kept at: the default and every rule's. A client that
    /// samples every event at this rate, whatever its name, never drops one that this state
    /// would keep.
    pub fn ceiling(&self) -> Rate {
        self.rules
            .iter()
            .map(|rule| rule.rate)
            .fold(
                self.default_rate,
                |max, rate| if rate > max { rate } else { max },
            )
    }

    /// Whether the allow and block lists let the event through.
    pub fn admits<'a, I, F>(&self, tokens: &F) -> bool
    where
        F: Fn() -> I,
        I: Iterator<Item = &'a str>,
    {
        if self.block.iter().any(|p| p.matches_tokens(tokens())) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|p| p.matches_tokens(tokens()))
    }

    /// The rate of the most specific matching rule, or the default rate.
    pub fn rate_for<'a, I, F>(&self, tokens: &F) -> Rate
    where
        F: Fn() -> I,
        I: Iterator<Item = &'a str>,
    {
        self.rules
            .iter()
            .find(|rule| rule.pattern.matches_tokens(tokens()))
            .map_or(self.default_rate, |rule| rule.rate)
    }

    /// The rate that applies to an event given as parts.
    pub fn rate_for_parts<S: AsRef<str>>(&self, parts: &[S]) -> Rate {
        self.rate_for(&|| parts.iter().map(AsRef::as_ref))
    }
}

impl ControlState {
    /// The control messages that convey this state to a client. Clients that acknowledge get
    /// it whole, in one message. Plain clients get it in the original design's three messages;
    /// since they apply one sampling rate to every event and ignore `event_patterns`, they are
    /// sent the [`ControlState::ceiling`], and the receiving side thins what arrives down to
    /// each event's own rate (taking the client's draw into account).
    pub fn messages(&self, acknowledges: bool) -> Vec<v1::TelemetryControl> {
        use v1::telemetry_control::Control;
        let message = |control| v1::TelemetryControl {
            control: Some(control),
        };
        if acknowledges {
            return vec![message(Control::State(v1::ControlState::from(self)))];
        }
        vec![
            message(Control::Toggle(v1::TelemetryToggle {
                enabled: self.enabled,
            })),
            message(Control::Filter(v1::TelemetryEventFilter {
                allowed_events: self.allow.iter().map(ToString::to_string).collect(),
                blocked_events: self.block.iter().map(ToString::to_string).collect(),
            })),
            message(Control::Sampling(v1::TelemetrySamplingUpdate {
                sampling_rate: self.ceiling().get(),
                event_patterns: Vec::new(),
            })),
        ]
    }
}

/// Parses a list of patterns, naming the field and index of the first bad one.
pub fn parse_patterns<S: AsRef<str>>(
    field: &str,
    patterns: &[S],
) -> Result<Vec<Pattern>, ControlError> {
    patterns
        .iter()
        .enumerate()
        .map(|(i, p)| {
            Pattern::parse(p.as_ref()).map_err(|source| ControlError::Pattern {
                field: format!("{field}[{i}]"),
                source,
            })
        })
        .collect()
}

/// Validates a rate, naming the field when it is bad.
pub fn parse_rate(field: &str, rate: f64) -> Result<Rate, ControlError> {
    Rate::new(rate).map_err(|source| ControlError::Rate {
        field: field.to_owned(),
        source,
    })
}

impl TryFrom<v1::ControlState> for ControlState {
    type Error = ControlError;

    fn try_from(wire: v1::ControlState) -> Result<Self, Self::Error> {
        let rules = wire
            .rules
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                Ok(SamplingRule {
                    pattern: Pattern::parse(&rule.pattern).map_err(|source| {
                        ControlError::Pattern {
                            field: format!("rules[{i}].pattern"),
                            source,
                        }
                    })?,
                    rate: parse_rate(&format!("rules[{i}].sampling_rate"), rule.sampling_rate)?,
                })
            })
            .collect::<Result<_, ControlError>>()?;
        Ok(Self::new(
            wire.version,
            wire.enabled,
            parse_rate("sampling_rate", wire.sampling_rate)?,
            rules,
            parse_patterns("allowed_events", &wire.allowed_events)?,
            parse_patterns("blocked_events", &wire.blocked_events)?,
        ))
    }
}

impl From<&ControlState> for v1::ControlState {
    fn from(state: &ControlState) -> Self {
        Self {
            version: state.version,
            enabled: state.enabled,
            sampling_rate: state.default_rate.get(),
            rules: state
                .rules
                .iter()
                .map(|rule| v1::SamplingRule {
                    pattern: rule.pattern.to_string(),
                    sampling_rate: rule.rate.get(),
                })
                .collect(),
            allowed_events: state.allow.iter().map(ToString::to_string).collect(),
            blocked_events: state.block.iter().map(ToString::to_string).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pats(list: &[&str]) -> Vec<Pattern> {
        list.iter().map(|p| Pattern::parse(p).unwrap()).collect()
    }

    fn rule(p: &str, r: f64) -> SamplingRule {
        SamplingRule {
            pattern: Pattern::parse(p).unwrap(),
            rate: Rate::new(r).unwrap(),
        }
    }

    #[test]
    fn disabled_wins_over_everything() {
        let state = ControlState::new(1, false, Rate::ALL, vec![], vec![], vec![]);
        assert_eq!(
            state.decide_name("a.b", SamplingKey::correlation("x")),
            Verdict::Disabled
        );
    }

    #[test]
    fn block_wins_over_allow() {
        let state = ControlState::new(
            1,
            true,
            Rate::ALL,
            vec![],
            pats(&["inference.>"]),
            pats(&["inference.debug"]),
        );
        assert_eq!(
            state.decide_name("inference.stop", SamplingKey::NONE),
            Verdict::Keep(Rate::ALL)
        );
        assert_eq!(
            state.decide_name("inference.debug", SamplingKey::NONE),
            Verdict::Filtered
        );
        assert_eq!(
            state.decide_name("gpu.util", SamplingKey::NONE),
            Verdict::Filtered
        );
    }

    #[test]
    fn most_specific_rule_sets_the_rate() {
        let state = ControlState::new(
            1,
            true,
            Rate::new(0.5).unwrap(),
            vec![rule("inference.>", 0.0), rule("inference.stop", 1.0)],
            vec![],
            vec![],
        );
        assert_eq!(
            state.decide_name("inference.stop", SamplingKey::correlation("id")),
            Verdict::Keep(Rate::ALL)
        );
        assert_eq!(
            state.decide_name("inference.start", SamplingKey::correlation("id")),
            Verdict::SampledOut(Rate::NONE)
        );
        assert_eq!(state.rate_for_parts(&["gpu", "util"]).get(), 0.5);
    }

    #[test]
    fn plain_clients_are_sent_the_highest_rate_without_patterns() {
        use v1::telemetry_control::Control;
        let sampling = |state: &ControlState| {
            state
                .messages(false)
                .into_iter()
                .find_map(|m| match m.control {
                    Some(Control::Sampling(s)) => Some(s),
                    _ => None,
                })
                .expect("a sampling message")
        };
        let rules = vec![rule("inference.start", 0.1), rule("gpu.>", 0.5)];
        let state = ControlState::new(3, true, Rate::ALL, rules, vec![], vec![]);
        let sent = sampling(&state);
        assert_eq!((sent.sampling_rate, sent.event_patterns.len()), (1.0, 0));
        let state = ControlState::new(
            4,
            true,
            Rate::new(0.01).unwrap(),
            vec![rule("inference.start", 0.1), rule("gpu.>", 0.5)],
            vec![],
            vec![],
        );
        assert_eq!(sampling(&state).sampling_rate, 0.5);
        let state = ControlState::new(5, true, Rate::new(0.2).unwrap(), vec![], vec![], vec![]);
        assert_eq!(sampling(&state).sampling_rate, 0.2);
        assert_eq!(
            state.messages(true).len(),
            1,
            "acknowledging clients get the state"
        );
    }

    #[test]
    fn wire_round_trip_and_validation() {
        let state = ControlState::new(
            7,
            true,
            Rate::new(0.25).unwrap(),
            vec![rule("a.*", 0.5)],
            pats(&["a.>"]),
            pats(&["a.x"]),
        );
        let wire = v1::ControlState::from(&state);
        assert_eq!(ControlState::try_from(wire.clone()).unwrap(), state);

        let mut bad = wire.clone();
        bad.rules[0].sampling_rate = f64::NAN;
        let err = ControlState::try_from(bad).unwrap_err().to_string();
        assert!(
            err.starts_with("rules[0].sampling_rate: sampling rate NaN is invalid"),
            "{err}"
        );

        let mut bad = wire;
        bad.blocked_events.push("a..b".into());
        let err = ControlState::try_from(bad).unwrap_err().to_string();
        assert!(err.starts_with("blocked_events[1]: "), "{err}");
    }
}
