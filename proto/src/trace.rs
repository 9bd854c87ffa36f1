//! W3C trace context (<https://www.w3.org/TR/trace-context/>): trace and span ids, and the
//! `traceparent` header that carries them between services.
//!
//! On the wire (`TelemetryEvent.trace_id`, `.span_id`, `.parent_span_id`) the ids are their raw
//! bytes; in every text form (the `traceparent` header, the sidecar's lines, JSON, the CLI) they
//! are lower-case hex. An id of all zeros is invalid in both, as W3C says.

use std::{fmt, str::FromStr};

/// A trace id: 16 bytes, not all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TraceId([u8; 16]);

/// A span id: 8 bytes, not all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpanId([u8; 8]);

/// Why a trace context value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TraceError {
    #[error("a {what} is {len} hex digits (got {got})")]
    HexLength {
        what: &'static str,
        len: usize,
        got: usize,
    },
    #[error("a {what} is hex digits 0-9 a-f only")]
    NotHex { what: &'static str },
    #[error("a {what} of all zeros is invalid")]
    Zero { what: &'static str },
    #[error("a {what} is {len} bytes (got {got})")]
    ByteLength {
        what: &'static str,
        len: usize,
        got: usize,
    },
    #[error(
        "a traceparent is `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`, e.g. \
         00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    )]
    TraceParent,
}

macro_rules! id_type {
    ($name:ident, $len:literal, $what:literal) => {
        impl $name {
            pub const LEN: usize = $len;

            /// The id held by `bytes`, which must be exactly its length and not all zero.
            pub fn from_bytes(bytes: &[u8]) -> Result<Self, TraceError> {
                let array: [u8; $len] = bytes.try_into().map_err(|_| TraceError::ByteLength {
                    what: $what,
                    len: $len,
                    got: bytes.len(),
                })?;
                if array == [0; $len] {
                    return Err(TraceError::Zero { what: $what });
                }
                Ok(Self(array))
            }

            /// A random id (never zero).
            pub fn random() -> Self {
                loop {
                    let bytes: [u8; $len] = rand::random();
                    if bytes != [0; $len] {
                        return Self(bytes);
                    }
                }
            }

            pub fn as_bytes(&self) -> &[u8; $len] {
                &self.0
            }

            /// Parses lower- or upper-case hex (a user typing an id); [`TraceParent`] takes
            /// lower case only, as W3C requires.
            pub fn parse_any_case(text: &str) -> Result<Self, TraceError> {
                Self::from_hex(&text.to_ascii_lowercase())
            }

            fn from_hex(text: &str) -> Result<Self, TraceError> {
                let mut bytes = [0u8; $len];
                decode_hex(text, $what, &mut bytes)?;
                Self::from_bytes(&bytes)
            }
        }

        impl FromStr for $name {
            type Err = TraceError;
            /// Lower-case hex, as in a `traceparent`.
            fn from_str(text: &str) -> Result<Self, TraceError> {
                Self::from_hex(text)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self)
            }
        }
    };
}

id_type!(TraceId, 16, "trace id");
id_type!(SpanId, 8, "span id");

/// A `traceparent` header value: version `00`, the trace id, the id of the span that made the
/// call (the parent of the callee's spans) and the trace flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub flags: u8,
}

impl TraceParent {
    /// The `sampled` trace flag.
    pub const SAMPLED: u8 = 0x01;
}

impl FromStr for TraceParent {
    type Err = TraceError;

    /// As W3C specifies: version `00` is exactly `00-<32>-<16>-<2>`; a later version may add
    /// fields after a `-`, which are ignored; version `ff` is invalid.
    fn from_str(text: &str) -> Result<Self, TraceError> {
        let text = text.trim_matches([' ', '\t']);
        let bytes = text.as_bytes();
        if bytes.len() < 55 || !bytes.is_ascii() {
            return Err(TraceError::TraceParent);
        }
        let version = &text[..2];
        let later_version = match version {
            "00" => false,
            "ff" => return Err(TraceError::TraceParent),
            _ if version.bytes().all(is_lower_hex) => true,
            _ => return Err(TraceError::TraceParent),
        };
        if (!later_version && bytes.len() != 55) || (bytes.len() > 55 && bytes[55] != b'-') {
            return Err(TraceError::TraceParent);
        }
        if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
            return Err(TraceError::TraceParent);
        }
        let mut flags = [0u8; 1];
        decode_hex(&text[53..55], "trace flags", &mut flags)?;
        Ok(Self {
            trace_id: text[3..35].parse()?,
            span_id: text[36..52].parse()?,
            flags: flags[0],
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

/// Where an event sits in a trace: `TelemetryEvent.trace_id`, `.span_id`, `.parent_span_id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
}

impl SpanContext {
    /// A span of its own trace.
    pub fn root(trace_id: TraceId) -> Self {
        Self {
            trace_id,
            span_id: SpanId::random(),
            parent_span_id: None,
        }
    }

    /// A new span whose parent is `parent` (of this process or, through a `traceparent`, of
    /// the caller).
    pub fn child_of(trace_id: TraceId, parent: SpanId) -> Self {
        Self {
            trace_id,
            span_id: SpanId::random(),
            parent_span_id: Some(parent),
        }
    }
}

/// A trace id that is a function of a correlation id, for a span that starts a trace under an
/// id its caller chose: every process that reports that request under the same id, each
/// without a `traceparent`, lands in one trace and samples it alike. The two halves are
/// `fmix64(fnv1a64(id))` and `fmix64` of that xor `0x9e3779b97f4a7c15`, big-endian (see
/// docs/conventions.md).
pub fn trace_id_for(correlation_id: &str) -> TraceId {
    let high = crate::sampling::hash(correlation_id.as_bytes());
    let low = crate::sampling::fmix64(high ^ 0x9e37_79b9_7f4a_7c15);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&high.to_be_bytes());
    bytes[8..].copy_from_slice(&low.to_be_bytes());
    TraceId::from_bytes(&bytes).unwrap_or_else(|_| TraceId::random())
}

/// Lower-case hex of `bytes` (for ids as they came off the wire, already validated).
pub fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        text.push(char::from(HEX[usize::from(byte >> 4)]));
        text.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    text
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn is_lower_hex(byte: u8) -> bool {
    byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for byte in bytes {
        write!(f, "{byte:02x}")?;
    }
    Ok(())
}

fn decode_hex(text: &str, what: &'static str, out: &mut [u8]) -> Result<(), TraceError> {
    if text.len() != out.len() * 2 {
        return Err(TraceError::HexLength {
            what,
            len: out.len() * 2,
            got: text.chars().count(),
        });
    }
    let nibble = |byte: u8| match byte {
        b'0'..=b'9' => Ok(byte - b'0'),
        b'a'..=b'f' => Ok(byte - b'a' + 10),
        _ => Err(TraceError::NotHex { what }),
    };
    for (slot, pair) in out.iter_mut().zip(text.as_bytes().chunks_exact(2)) {
        *slot = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_w3c_example_round_trips() {
        let parent: TraceParent = EXAMPLE.parse().unwrap();
        assert_eq!(
            parent.trace_id.to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(parent.span_id.to_string(), "00f067aa0ba902b7");
        assert_eq!(parent.flags, TraceParent::SAMPLED);
        assert_eq!(parent.to_string(), EXAMPLE);
        assert_eq!(
            hex(parent.trace_id.as_bytes()),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }

    #[test]
    fn invalid_traceparents_are_refused() {
        for bad in [
            "",
            "00",
            "garbage",
            // All-zero ids.
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Upper case, wrong lengths, wrong separators, version ff, trailing data on 00.
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-zz",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0é4736-00f067aa0ba902b7-01",
        ] {
            assert!(bad.parse::<TraceParent>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_later_version_is_read_for_the_fields_it_shares() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        let parent: TraceParent = later.parse().unwrap();
        assert_eq!(parent.to_string(), EXAMPLE);
    }

    #[test]
    fn a_trace_id_for_a_correlation_id_is_stable() {
        assert_eq!(trace_id_for("req-1"), trace_id_for("req-1"));
        assert_ne!(trace_id_for("req-1"), trace_id_for("req-2"));
        // Pinned (computed independently from the documented formula): processes of
        // different versions, or languages, must put one request in one trace.
        assert_eq!(
            trace_id_for("req-1").to_string(),
            "41bf9201cad1d3b5d223600f88f5fe46"
        );
    }

    #[test]
    fn ids_from_bytes_check_length_and_zero() {
        assert!(TraceId::from_bytes(&[1; 16]).is_ok());
        assert_eq!(
            TraceId::from_bytes(&[1; 15]),
            Err(TraceError::ByteLength {
                what: "trace id",
                len: 16,
                got: 15
            })
        );
        assert!(SpanId::from_bytes(&[0; 8]).is_err());
        assert!(SpanId::random().as_bytes() != &[0; 8]);
        assert_eq!(
            TraceId::parse_any_case("4BF92F3577B34DA6A3CE929D0E0E4736").unwrap(),
            "4bf92f3577b34da6a3ce929d0e0e4736".parse().unwrap()
        );
    }
}
