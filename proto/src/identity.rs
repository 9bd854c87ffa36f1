//! The names a worker gives itself: its id, its pool, its label keys and values.
//!
//! They arrive as request metadata (`x-worker-id`, `x-worker-pool`, `x-worker-label-<key>`)
//! and end up in log lines, metrics labels, NATS subjects, file names and terminals, so every
//! participant holds them to one rule, this one, where they enter: the hub refuses a stream
//! that breaks it (INVALID_ARGUMENT), and the worker library and the sidecar refuse to start
//! with such a name rather than retry a stream the hub will never take.
//!
//! - A worker id or pool name is 1 to [`MAX_NAME_BYTES`] ASCII letters, digits, `.`, `_` or
//!   `-`, starting with a letter or a digit (so never `.`, `..` or a leading `-` that reads as
//!   a command-line flag). A host name qualifies.
//! - A label key is 1 to [`MAX_LABEL_KEY_BYTES`] lower-case ASCII letters, digits, `_` or
//!   `-`, starting with a letter (HTTP/2 lower-cases header names, so the worker library
//!   lower-cases a key before checking it).
//! - A label value is free text of up to [`MAX_LABEL_VALUE_BYTES`] bytes: printable ASCII
//!   (spaces included), as a header value must be.

/// Longest worker id or pool name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest label key (without the `x-worker-label-` prefix), in bytes.
pub const MAX_LABEL_KEY_BYTES: usize = 63;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_BYTES: usize = 256;

/// Which name is checked, for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    WorkerId,
    Pool,
    LabelKey,
    LabelValue,
}

impl NameKind {
    fn what(self) -> &'static str {
        match self {
            NameKind::WorkerId => "worker id",
            NameKind::Pool => "pool name",
            NameKind::LabelKey => "label key",
            NameKind::LabelValue => "label value",
        }
    }

    fn rule(self) -> String {
        match self {
            NameKind::WorkerId | NameKind::Pool => format!(
                "1 to {MAX_NAME_BYTES} ASCII letters, digits, '.', '_' or '-', starting with a letter or digit"
            ),
            NameKind::LabelKey => format!(
                "1 to {MAX_LABEL_KEY_BYTES} lower-case ASCII letters, digits, '_' or '-', starting with a letter"
            ),
            NameKind::LabelValue => {
                format!("up to {MAX_LABEL_VALUE_BYTES} bytes of printable ASCII")
            }
        }
    }
}

/// A name that breaks the rule; its message names the rule and shows the name escaped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {:?} is not a valid {}: {problem}; a {} is {}", kind.what(), shown(name), kind.what(), kind.what(), kind.rule())]
pub struct InvalidName {
    pub kind: NameKind,
    /// The name as given, cut short when long.
    name: String,
    problem: String,
}

/// At most 64 characters of a name, for a message.
fn shown(name: &str) -> String {
    match name.char_indices().nth(64) {
        Some((at, _)) => format!("{}…", &name[..at]),
        None => name.to_owned(),
    }
}

impl InvalidName {
    fn new(kind: NameKind, name: &str, problem: impl Into<String>) -> Self {
        Self {
            kind,
            name: shown(name),
            problem: problem.into(),
        }
    }
}

/// Checks a worker id or a pool name (`kind` says which).
pub fn check_name(kind: NameKind, name: &str) -> Result<(), InvalidName> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    check(
        kind,
        name,
        MAX_NAME_BYTES,
        allowed,
        u8::is_ascii_alphanumeric,
    )
}

/// Checks a label key in its wire form (lower case).
pub fn check_label_key(key: &str) -> Result<(), InvalidName> {
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-');
    check(
        NameKind::LabelKey,
        key,
        MAX_LABEL_KEY_BYTES,
        allowed,
        u8::is_ascii_lowercase,
    )
}

/// Checks a label value.
pub fn check_label_value(value: &str) -> Result<(), InvalidName> {
    let kind = NameKind::LabelValue;
    if value.len() > MAX_LABEL_VALUE_BYTES {
        return Err(InvalidName::new(
            kind,
            value,
            format!("it is {} bytes long", value.len()),
        ));
    }
    match value.chars().find(|c| !(c.is_ascii_graphic() || *c == ' ')) {
        Some(c) => Err(InvalidName::new(
            kind,
            value,
            format!("{c:?} is not allowed"),
        )),
        None => Ok(()),
    }
}

fn check(
    kind: NameKind,
    name: &str,
    max: usize,
    allowed: impl Fn(u8) -> bool,
    first: impl Fn(&u8) -> bool,
) -> Result<(), InvalidName> {
    if name.is_empty() {
        return Err(InvalidName::new(kind, name, "it is empty"));
    }
    if name.len() > max {
        return Err(InvalidName::new(
            kind,
            name,
            format!("it is {} bytes long", name.len()),
        ));
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii() || !allowed(*c as u8)) {
        return Err(InvalidName::new(
            kind,
            name,
            format!("{c:?} is not allowed"),
        ));
    }
    if !first(&name.as_bytes()[0]) {
        return Err(InvalidName::new(
            kind,
            name,
            "it does not start with a letter or digit",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_pools_are_a_small_character_set() {
        for good in [
            "gpu-3",
            "llama",
            "node_1.example.com",
            "A",
            "0",
            &"x".repeat(128),
        ] {
            assert_eq!(check_name(NameKind::WorkerId, good), Ok(()), "{good}");
        }
        for (bad, problem) in [
            ("../../etc/passwd", "'/' is not allowed"),
            (" ", "' ' is not allowed"),
            ("", "it is empty"),
            (".", "does not start"),
            ("..", "does not start"),
            ("-rf", "does not start"),
            ("a b", "' ' is not allowed"),
            ("inj\",forged=\"yes", "'\"' is not allowed"),
            ("tab\there", "'\\t' is not allowed"),
            ("gpu-ü", "'ü' is not allowed"),
            (&"x".repeat(129), "129 bytes long"),
        ] {
            let error = check_name(NameKind::Pool, bad).unwrap_err().to_string();
            assert!(error.contains(problem), "{bad:?}: {error}");
            assert!(error.starts_with("pool name: "), "{error}");
        }
    }

    /// The message shows what was refused without letting it forge a log line.
    #[test]
    fn the_message_escapes_and_shortens_the_name() {
        let error = check_name(NameKind::WorkerId, "a\nb")
            .unwrap_err()
            .to_string();
        assert!(
            !error.contains('\n') && error.contains(r#""a\nb""#),
            "{error}"
        );
        let error = check_name(NameKind::WorkerId, &"/".repeat(10_000))
            .unwrap_err()
            .to_string();
        assert!(error.len() < 400, "{error}");
    }

    /// `bridge.proto` states the rule with these very numbers.
    #[test]
    fn the_proto_documents_the_rule() {
        let proto = include_str!("../telemetry/bridge/v1/bridge.proto").replace("\n  //", "");
        for stated in [
            format!("Worker ids and pool names are 1 to {MAX_NAME_BYTES} ASCII letters"),
            format!("label keys 1 to {MAX_LABEL_KEY_BYTES} lower-case letters"),
            format!("label values up to {MAX_LABEL_VALUE_BYTES} bytes of printable ASCII"),
        ] {
            assert!(proto.contains(&stated), "bridge.proto should say: {stated}");
        }
    }

    #[test]
    fn label_keys_are_lower_case_and_values_printable() {
        for good in ["zone", "rack-2", "gpu_type"] {
            assert_eq!(check_label_key(good), Ok(()));
        }
        for bad in ["Zone", "2zone", "", "a.b", "a/b", &"k".repeat(64)] {
            assert!(check_label_key(bad).is_err(), "{bad}");
        }
        for good in ["us-east1-b", "two words", "", &"v".repeat(256)] {
            assert_eq!(check_label_value(good), Ok(()));
        }
        for bad in ["a\nb", "é", &"v".repeat(257)] {
            assert!(check_label_value(bad).is_err(), "{bad}");
        }
    }
}
