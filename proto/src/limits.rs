//! The hub's limits on one event, as the hub enforces them and as workers apply them before
//! they buffer an event.
//!
//! The hub drops an event over a shape limit (name tokens, entries, string length) and ends
//! the stream of one whose message is over `max_message_bytes`. A worker that buffered such an
//! event would replay it after every reconnect, and everything behind it with it, so workers
//! check the same limits first and drop (and count) what the hub would refuse. The hub tells
//! each worker its limits when the stream opens (`TelemetryControl.limits`); until then a
//! worker applies [`EventLimits::DEFAULT`], which are the hub's defaults.

use crate::{v1, view::EventShape};

/// Room a worker leaves for the sequence number it appends to an encoded event: a one-byte
/// key and up to ten bytes of varint.
pub const SEQUENCE_ROOM: usize = 11;

/// The limits on one event; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventLimits {
    /// The largest encoded event (`hub.max_message_bytes`).
    pub max_message_bytes: usize,
    /// Name tokens (`limits.max_event_parts`).
    pub max_event_parts: usize,
    /// Measurement plus metadata entries (`limits.max_event_entries`).
    pub max_event_entries: usize,
    /// Bytes of any name token, correlation id, map key or string value
    /// (`limits.max_string_bytes`).
    pub max_string_bytes: usize,
}

impl EventLimits {
    /// The hub's defaults.
    pub const DEFAULT: Self = Self {
        max_message_bytes: 4 * 1024 * 1024,
        max_event_parts: 16,
        max_event_entries: 256,
        max_string_bytes: 4096,
    };

    /// Whether an event of `shape`, `encoded_len` bytes long without its sequence number, is
    /// within the limits.
    ///
    /// `shape` is asked for the longest string only when the event is longer than
    /// `max_string_bytes` (none of its strings can be longer than the whole), so that the
    /// check costs a few comparisons for the events a worker sends all day.
    #[inline]
    pub fn check(
        &self,
        encoded_len: usize,
        parts: usize,
        entries: usize,
        longest_string: impl FnOnce() -> usize,
    ) -> Result<(), OverLimit> {
        if encoded_len + SEQUENCE_ROOM > self.max_message_bytes {
            return Err(OverLimit::new(
                Limit::MessageBytes,
                encoded_len,
                self.max_message_bytes,
            ));
        }
        self.check_shape_with(parts, entries, || {
            if encoded_len <= self.max_string_bytes {
                0
            } else {
                longest_string()
            }
        })
    }

    /// The shape limits alone, as the hub applies them to an event it received.
    pub fn check_shape(&self, shape: &EventShape) -> Result<(), OverLimit> {
        self.check_shape_with(shape.parts, shape.entries, || shape.longest_string)
    }

    fn check_shape_with(
        &self,
        parts: usize,
        entries: usize,
        longest_string: impl FnOnce() -> usize,
    ) -> Result<(), OverLimit> {
        if parts > self.max_event_parts {
            return Err(OverLimit::new(Limit::Parts, parts, self.max_event_parts));
        }
        if entries > self.max_event_entries {
            return Err(OverLimit::new(
                Limit::Entries,
                entries,
                self.max_event_entries,
            ));
        }
        let longest = longest_string();
        if longest > self.max_string_bytes {
            return Err(OverLimit::new(
                Limit::StringBytes,
                longest,
                self.max_string_bytes,
            ));
        }
        Ok(())
    }

    /// Checks a whole event (one relayed from another process); `encoded_len` as for
    /// [`EventLimits::check`].
    pub fn check_event(
        &self,
        event: &v1::TelemetryEvent,
        encoded_len: usize,
    ) -> Result<(), OverLimit> {
        self.check(
            encoded_len,
            event.event_parts.len(),
            event.measurements.len() + event.metadata.len(),
            || longest_string(event),
        )
    }
}

impl Default for EventLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The longest string of an event, as the hub measures it.
fn longest_string(event: &v1::TelemetryEvent) -> usize {
    let measurements = event.measurements.iter().map(|(key, value)| {
        let text = match &value.value {
            Some(v1::telemetry_value::Value::StringValue(text)) => text.len(),
            _ => 0,
        };
        key.len().max(text)
    });
    let metadata = event.metadata.iter().map(|(k, v)| k.len().max(v.len()));
    event
        .event_parts
        .iter()
        .map(String::len)
        .chain([event.correlation_id.len()])
        .chain(measurements)
        .chain(metadata)
        .max()
        .unwrap_or(0)
}

impl From<&v1::HubLimits> for EventLimits {
    /// A limit the hub left at 0 (one it does not have, or an older hub) is the default.
    fn from(limits: &v1::HubLimits) -> Self {
        let or = |value: u64, default: usize| {
            usize::try_from(value)
                .ok()
                .filter(|v| *v > 0)
                .unwrap_or(default)
        };
        let d = Self::DEFAULT;
        Self {
            max_message_bytes: or(limits.max_message_bytes, d.max_message_bytes),
            max_event_parts: or(limits.max_event_parts.into(), d.max_event_parts),
            max_event_entries: or(limits.max_event_entries.into(), d.max_event_entries),
            max_string_bytes: or(limits.max_string_bytes.into(), d.max_string_bytes),
        }
    }
}

impl From<EventLimits> for v1::HubLimits {
    fn from(limits: EventLimits) -> Self {
        let small = |value: usize| u32::try_from(value).unwrap_or(u32::MAX);
        Self {
            max_message_bytes: limits.max_message_bytes as u64,
            max_event_parts: small(limits.max_event_parts),
            max_event_entries: small(limits.max_event_entries),
            max_string_bytes: small(limits.max_string_bytes),
        }
    }
}

/// Which limit an event broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    MessageBytes,
    Parts,
    Entries,
    StringBytes,
}

impl Limit {
    /// What is counted, and the hub's configuration key for it.
    fn describe(self) -> (&'static str, &'static str) {
        match self {
            Limit::MessageBytes => ("bytes encoded", "hub.max_message_bytes"),
            Limit::Parts => ("name tokens", "limits.max_event_parts"),
            Limit::Entries => (
                "measurements and metadata entries",
                "limits.max_event_entries",
            ),
            Limit::StringBytes => ("bytes in one string", "limits.max_string_bytes"),
        }
    }
}

/// An event over one of the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{value} {}, over the limit of {limit} ({})", self.limit_kind.describe().0, self.limit_kind.describe().1)]
pub struct OverLimit {
    pub limit_kind: Limit,
    pub value: usize,
    pub limit: usize,
}

impl OverLimit {
    fn new(limit_kind: Limit, value: usize, limit: usize) -> Self {
        Self {
            limit_kind,
            value,
            limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn event(parts: usize, entries: usize, longest: usize) -> v1::TelemetryEvent {
        v1::TelemetryEvent {
            event_parts: (0..parts).map(|i| format!("p{i}")).collect(),
            metadata: (0..entries)
                .map(|i| {
                    (
                        format!("k{i}"),
                        if i == 0 {
                            "v".repeat(longest)
                        } else {
                            "v".into()
                        },
                    )
                })
                .collect(),
            ..Default::default()
        }
    }

    fn check(limits: &EventLimits, event: &v1::TelemetryEvent) -> Result<(), OverLimit> {
        limits.check_event(event, event.encoded_len())
    }

    #[test]
    fn each_limit_is_checked_and_named() {
        let limits = EventLimits::DEFAULT;
        assert_eq!(check(&limits, &event(16, 256, 4096)), Ok(()));
        for (event, key) in [
            (event(17, 1, 1), "limits.max_event_parts"),
            (event(1, 257, 1), "limits.max_event_entries"),
            (event(1, 1, 4097), "limits.max_string_bytes"),
        ] {
            let error = check(&limits, &event).unwrap_err().to_string();
            assert!(error.contains(key), "{error}");
        }
        let roomy = EventLimits {
            max_string_bytes: 8 << 20,
            ..limits
        };
        let error = check(&roomy, &event(1, 1, 5 << 20)).unwrap_err();
        assert_eq!(error.limit_kind, Limit::MessageBytes);
        assert!(error.to_string().contains("hub.max_message_bytes"));
    }

    /// What the worker checks is what the hub measures on the same bytes.
    #[test]
    fn the_worker_measures_what_the_hub_measures() {
        let event = event(3, 4, 100);
        let view = crate::view::EventView::from_event(&event).unwrap();
        assert_eq!(view.shape().longest_string, longest_string(&event));
        assert_eq!(view.shape().parts, event.event_parts.len());
        assert_eq!(view.shape().entries, 4);
    }

    /// `bridge.proto` states the defaults a worker applies before it hears a hub.
    #[test]
    fn the_proto_documents_the_defaults() {
        let proto = include_str!("../telemetry/bridge/v1/bridge.proto").replace("\n//", "");
        let d = EventLimits::DEFAULT;
        let stated = format!(
            "applies the hub's defaults: {}, {}, {} and {}.",
            d.max_message_bytes, d.max_event_parts, d.max_event_entries, d.max_string_bytes
        );
        assert!(proto.contains(&stated), "bridge.proto should say: {stated}");
    }

    #[test]
    fn the_hub_limits_travel_and_zero_means_the_default() {
        let limits = EventLimits {
            max_message_bytes: 2048,
            ..EventLimits::DEFAULT
        };
        assert_eq!(EventLimits::from(&v1::HubLimits::from(limits)), limits);
        assert_eq!(
            EventLimits::from(&v1::HubLimits::default()),
            EventLimits::DEFAULT
        );
    }
}
