//! An operator's control command: which workers it addresses ([`Selector`]) and what it
//! changes ([`Change`]), validated from the wire and written back to it. The hub's RPCs and HTTP
//! API, the cluster's messages and the CLI's client all speak it through this one module.

use std::time::Duration;

use bridge_proto::{
    control::{parse_patterns, parse_rate},
    labels::LabelSet,
    pattern::Pattern,
    sampling::Rate,
    v1,
};

use crate::{
    error::{Error, Result},
    event_rate::EventRate,
};

/// The longest a timed change may last.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Which workers a change addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Worker(String),
    Pool(String),
    /// Every worker whose labels include all of these.
    Labels(LabelSet),
    All,
}

/// One operator command.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Rate for all events (`patterns` empty) or for each of `patterns`.
    Sampling {
        rate: Rate,
        patterns: Vec<Pattern>,
    },
    Toggle(bool),
    /// Replace the filter; both lists empty means "no filter" at this level.
    Filter {
        allow: Vec<Pattern>,
        block: Vec<Pattern>,
    },
    /// Forget this level's own settings so that it inherits again.
    Reset,
    /// Keep choosing the level's sampling rate so that the events delivered from its workers
    /// approach this goal (see `control::target`), starting from `start`: the rate the level's
    /// workers have now, so that setting a goal makes no burst. The wire carries only the
    /// goal; the hub fills in `start` before it applies the change.
    Target {
        goal: EventRate,
        start: Rate,
    },
}

/// `worker gpu-3`, `pool llama`, `workers labelled zone=a`, `all workers`: how logs and
/// messages name a selector.
impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Worker(id) => write!(f, "worker {id}"),
            Self::Pool(pool) => write!(f, "pool {pool}"),
            Self::Labels(labels) => write!(f, "workers labelled {labels}"),
            Self::All => f.write_str("all workers"),
        }
    }
}

/// `sampling 0.1 for inference.>`, `telemetry off`, `filter allow=[..] block=[..]`: how the
/// CLI and the hub's log describe a change.
impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |patterns: &[Pattern]| {
            patterns
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Self::Sampling { rate, patterns } if patterns.is_empty() => {
                write!(f, "sampling {rate}")
            }
            Self::Sampling { rate, patterns } => {
                write!(f, "sampling {rate} for {}", list(patterns))
            }
            Self::Toggle(true) => f.write_str("telemetry on"),
            Self::Toggle(false) => f.write_str("telemetry off"),
            Self::Filter { allow, block } if allow.is_empty() && block.is_empty() => {
                f.write_str("filters cleared")
            }
            Self::Filter { allow, block } => {
                write!(f, "filter allow=[{}] block=[{}]", list(allow), list(block))
            }
            Self::Reset => f.write_str("reset to inherited settings"),
            Self::Target { goal, .. } => write!(f, "target {goal}"),
        }
    }
}

impl TryFrom<Option<v1::Selector>> for Selector {
    type Error = Error;
    fn try_from(selector: Option<v1::Selector>) -> Result<Self> {
        use v1::selector::Target;
        match selector.and_then(|s| s.target) {
            Some(Target::WorkerId(id)) if !id.is_empty() => Ok(Self::Worker(id)),
            Some(Target::Pool(pool)) if !pool.is_empty() => Ok(Self::Pool(pool)),
            Some(Target::All(true)) => Ok(Self::All),
            Some(Target::Labels(selector)) => LabelSet::new(selector.labels.into_iter().collect())
                .map(Self::Labels)
                .map_err(|e| Error::invalid(format!("selector.labels: {e}"))),
            _ => Err(Error::invalid(
                "selector: name a worker id, a pool, labels, or all workers",
            )),
        }
    }
}

/// An `UpdateControlRequest`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub selector: Selector,
    pub change: Change,
    /// How long to wait for acknowledgements.
    pub wait: Duration,
    /// How long the change lasts before it undoes itself; `None`: for good.
    pub lasting: Option<Duration>,
}

/// Why `--for` / `for_ms` is refused on a reset.
pub const RESET_NOT_TIMED: &str =
    "a reset cannot be timed (it removes the level's settings and their timers)";

/// Why `--for` / `for_ms` is refused on a target rate.
pub const TARGET_NOT_TIMED: &str = "a target rate cannot be timed (a fixed rate can: sample --for; \
     it suspends the target until it reverts)";

/// Checks how long a timed change lasts: more than nothing, at most [`MAX_DURATION`], and not
/// for a reset. `what` names the field in the message.
pub fn check_lasting(what: &str, lasting: Duration, change: &Change) -> Result<()> {
    if *change == Change::Reset {
        return Err(Error::invalid(format!("{what}: {RESET_NOT_TIMED}")));
    }
    if matches!(change, Change::Target { .. }) {
        return Err(Error::invalid(format!("{what}: {TARGET_NOT_TIMED}")));
    }
    if lasting.is_zero() {
        return Err(Error::invalid(format!(
            "{what}: a timed change must last more than 0"
        )));
    }
    if lasting > MAX_DURATION {
        return Err(Error::invalid(format!(
            "{what}: {} is longer than the 30 days a timed change may last",
            humantime::format_duration(lasting)
        )));
    }
    Ok(())
}

/// Converts an `UpdateControlRequest` into its selector, change, wait and duration,
/// validating all of them.
pub fn parse_update(request: v1::UpdateControlRequest) -> Result<Update> {
    use v1::update_control_request::Change as Wire;
    let selector = Selector::try_from(request.selector)?;
    let change = match request.change {
        Some(Wire::Sampling(update)) => Change::Sampling {
            rate: parse_rate("sampling_rate", update.sampling_rate)?,
            patterns: parse_patterns("event_patterns", &update.event_patterns)?,
        },
        Some(Wire::Toggle(toggle)) => Change::Toggle(toggle.enabled),
        Some(Wire::Filter(filter)) => Change::Filter {
            allow: parse_patterns("allowed_events", &filter.allowed_events)?,
            block: parse_patterns("blocked_events", &filter.blocked_events)?,
        },
        Some(Wire::Reset(_)) => Change::Reset,
        Some(Wire::Target(target)) => Change::Target {
            goal: EventRate::per_second(target.events_per_second)
                .map_err(|e| Error::invalid(format!("target.events_per_second: {e}")))?,
            start: Rate::ALL,
        },
        None => {
            return Err(Error::invalid(
                "change: set one of sampling, toggle, filter, reset or target",
            ));
        }
    };
    // 0 is the field's default: not timed.
    let lasting = (request.for_ms != 0).then(|| Duration::from_millis(request.for_ms));
    if let Some(lasting) = lasting {
        check_lasting("for_ms", lasting, &change)?;
    }
    Ok(Update {
        selector,
        change,
        wait: Duration::from_millis(request.wait_ms.into()),
        lasting,
    })
}

impl From<&Selector> for v1::Selector {
    fn from(selector: &Selector) -> Self {
        use v1::selector::Target;
        Self {
            target: Some(match selector {
                Selector::Worker(id) => Target::WorkerId(id.clone()),
                Selector::Pool(pool) => Target::Pool(pool.clone()),
                Selector::Labels(labels) => Target::Labels(v1::LabelSelector {
                    labels: labels.labels().clone().into_iter().collect(),
                }),
                Selector::All => Target::All(true),
            }),
        }
    }
}

impl From<&Change> for v1::update_control_request::Change {
    fn from(change: &Change) -> Self {
        let names = |patterns: &[Pattern]| patterns.iter().map(ToString::to_string).collect();
        match change {
            Change::Sampling { rate, patterns } => Self::Sampling(v1::TelemetrySamplingUpdate {
                sampling_rate: rate.get(),
                event_patterns: names(patterns),
            }),
            Change::Toggle(enabled) => Self::Toggle(v1::TelemetryToggle { enabled: *enabled }),
            Change::Filter { allow, block } => Self::Filter(v1::TelemetryEventFilter {
                allowed_events: names(allow),
                blocked_events: names(block),
            }),
            Change::Reset => Self::Reset(v1::ResetControl {}),
            Change::Target { goal, .. } => Self::Target(v1::TargetRate {
                events_per_second: goal.get(),
            }),
        }
    }
}
