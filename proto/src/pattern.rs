//! Event names and the patterns that match them.
//!
//! Names are dotted tokens (`inference.stop`). Patterns follow NATS subjects: `*` matches exactly
//! one token, `>` (only as the last token) matches one or more trailing tokens. The same matcher
//! serves sampling rules, worker filters and subscriber filters, on the hub and in workers.

use std::{cmp::Ordering, fmt, str::FromStr};

/// Why a pattern or an event name was rejected. The message names the offending input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("pattern is empty")]
    EmptyPattern,
    #[error("event name is empty")]
    EmptyName,
    #[error(
        "`{input}` has an empty token at position {position} (tokens are separated by single dots)"
    )]
    EmptyToken { input: String, position: usize },
    #[error("`{input}`: `>` may only be the last token")]
    TailNotLast { input: String },
    #[error(
        "`{input}`: token `{token}` mixes a wildcard with text; `*` and `>` must be whole tokens"
    )]
    PartialWildcard { input: String, token: String },
    #[error("`{input}`: event names cannot contain wildcards (`{token}`)")]
    WildcardInName { input: String, token: String },
    #[error("`{input}`: token `{token}` contains whitespace or a control character")]
    BadCharacter { input: String, token: String },
    #[error("`{input}`: token `{token}` contains a dot; put each token in its own part")]
    DotInPart { input: String, token: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Token {
    Literal(Box<str>),
    /// `*`: exactly one token.
    Star,
    /// `>`: one or more trailing tokens.
    Tail,
}

/// A validated event pattern such as `inference.*` or `gpu.>`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    source: Box<str>,
    tokens: Box<[Token]>,
}

impl Pattern {
    /// Parses a pattern, saying exactly what is wrong with a malformed one.
    pub fn parse(input: &str) -> Result<Self, NameError> {
        if input.is_empty() {
            return Err(NameError::EmptyPattern);
        }
        let parts: Vec<&str> = input.split('.').collect();
        let last = parts.len() - 1;
        let mut tokens = Vec::with_capacity(parts.len());
        for (index, part) in parts.iter().enumerate() {
            check_token_chars(input, part, index)?;
            let token = match *part {
                "*" => Token::Star,
                ">" if index == last => Token::Tail,
                ">" => {
                    return Err(NameError::TailNotLast {
                        input: input.into(),
                    });
                }
                text if text.contains(['*', '>']) => {
                    return Err(NameError::PartialWildcard {
                        input: input.into(),
                        token: text.into(),
                    });
                }
                text => Token::Literal(text.into()),
            };
            tokens.push(token);
        }
        Ok(Self {
            source: input.into(),
            tokens: tokens.into(),
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.source
    }

    /// Whether the pattern matches every event name (`>`).
    pub fn matches_everything(&self) -> bool {
        matches!(*self.tokens, [Token::Tail])
    }

    /// The tokens of a pattern that names one event exactly (no `*` or `>`).
    pub fn exact_name(&self) -> Option<impl Iterator<Item = &str> + Clone> {
        let literals = self.tokens.iter().map(|token| match token {
            Token::Literal(literal) => Some(&**literal),
            Token::Star | Token::Tail => None,
        });
        literals
            .clone()
            .all(|literal| literal.is_some())
            .then(|| literals.flatten())
    }

    /// Matches a dotted event name such as `inference.stop`.
    pub fn matches_name(&self, name: &str) -> bool {
        self.matches_tokens(name.split('.'))
    }

    /// Matches an event given as its parts (`["inference", "stop"]`).
    pub fn matches_parts<S: AsRef<str>>(&self, parts: &[S]) -> bool {
        self.matches_tokens(parts.iter().map(AsRef::as_ref))
    }

    /// Matches a sequence of name tokens without allocating.
    pub fn matches_tokens<'a>(&self, mut name: impl Iterator<Item = &'a str>) -> bool {
        for token in self.tokens.iter() {
            match token {
                Token::Tail => return name.next().is_some(),
                Token::Star => {
                    if name.next().is_none() {
                        return false;
                    }
                }
                Token::Literal(literal) => {
                    if name.next() != Some(&**literal) {
                        return false;
                    }
                }
            }
        }
        name.next().is_none()
    }

    /// Orders patterns most specific first: more literal tokens, then without `>`, then fewer
    /// tokens of `*`, then by text so that the order is total and stable.
    pub fn specificity_cmp(&self, other: &Self) -> Ordering {
        let key = |p: &Self| {
            let literals = p
                .tokens
                .iter()
                .filter(|t| matches!(t, Token::Literal(_)))
                .count();
            let tail = p.tokens.last() == Some(&Token::Tail);
            let stars = p.tokens.iter().filter(|t| **t == Token::Star).count();
            (std::cmp::Reverse(literals), tail, stars)
        };
        key(self)
            .cmp(&key(other))
            .then_with(|| self.source.cmp(&other.source))
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

impl fmt::Debug for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pattern({:?})", &*self.source)
    }
}

impl FromStr for Pattern {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn check_token_chars(input: &str, token: &str, index: usize) -> Result<(), NameError> {
    if token.is_empty() {
        return Err(NameError::EmptyToken {
            input: input.into(),
            position: index + 1,
        });
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(NameError::BadCharacter {
            input: input.into(),
            token: token.into(),
        });
    }
    Ok(())
}

/// Checks an event given as parts: at least one part, each a non-empty token without dots,
/// wildcards or whitespace.
pub fn validate_event_parts<S: AsRef<str>>(parts: &[S]) -> Result<(), NameError> {
    validate_event_tokens(parts.iter().map(AsRef::as_ref))
}

/// [`validate_event_parts`] for tokens given one by one.
pub fn validate_event_tokens<'a>(
    parts: impl Iterator<Item = &'a str> + Clone,
) -> Result<(), NameError> {
    // Every worker event's name passes here: one pass over the bytes of names that are plain
    // printable ASCII (nearly all), the full checks, which say what is wrong, for the rest.
    let mut tokens = 0;
    let plain = parts.clone().all(|part| {
        tokens += 1;
        !part.is_empty() && part.bytes().all(plain_token_byte)
    });
    if plain && tokens > 0 {
        return Ok(());
    }
    explain_event_tokens(parts)
}

/// A byte a name token, or a NATS subject token, holds as it is: printable ASCII other than
/// the separator and the wildcards (non-ASCII characters may be whitespace or control
/// characters, which neither allows).
pub fn plain_token_byte(byte: u8) -> bool {
    byte.is_ascii_graphic() && !matches!(byte, b'.' | b'*' | b'>')
}

/// [`validate_event_tokens`] for names that are not plain: checks them character by character
/// and names the first problem.
fn explain_event_tokens<'a>(parts: impl Iterator<Item = &'a str> + Clone) -> Result<(), NameError> {
    let all = parts.clone();
    let mut empty = true;
    for (index, part) in parts.enumerate() {
        empty = false;
        let joined = || all.clone().collect::<Vec<_>>().join(".");
        if part.contains('.') {
            return Err(NameError::DotInPart {
                input: joined(),
                token: part.into(),
            });
        }
        check_name_token(&joined, part, index)?;
    }
    if empty {
        return Err(NameError::EmptyName);
    }
    Ok(())
}

/// Checks a dotted event name such as `inference.stop`.
pub fn validate_event_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::EmptyName);
    }
    for (index, token) in name.split('.').enumerate() {
        check_name_token(&|| name.to_owned(), token, index)?;
    }
    Ok(())
}

fn check_name_token(
    input: &dyn Fn() -> String,
    token: &str,
    index: usize,
) -> Result<(), NameError> {
    if token.is_empty() {
        return Err(NameError::EmptyToken {
            input: input(),
            position: index + 1,
        });
    }
    if token.contains(['*', '>']) {
        return Err(NameError::WildcardInName {
            input: input(),
            token: token.into(),
        });
    }
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(NameError::BadCharacter {
            input: input(),
            token: token.into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn star_matches_exactly_one_token() {
        assert!(p("inference.*").matches_name("inference.start"));
        assert!(!p("inference.*").matches_name("inference.batch.start"));
        assert!(!p("inference.*").matches_name("inference"));
        assert!(p("*.stop").matches_name("tool.stop"));
        assert!(p("*").matches_name("x"));
        assert!(!p("*").matches_name("x.y"));
    }

    #[test]
    fn tail_matches_one_or_more_trailing_tokens() {
        assert!(p("inference.>").matches_name("inference.start"));
        assert!(p("inference.>").matches_name("inference.batch.start"));
        assert!(!p("inference.>").matches_name("inference"));
        assert!(!p("inference.>").matches_name("training.start"));
        assert!(p(">").matches_name("anything.at.all"));
        assert!(p(">").matches_everything());
    }

    #[test]
    fn literals_match_whole_tokens_only() {
        assert!(p("gpu.util").matches_name("gpu.util"));
        assert!(!p("gpu.util").matches_name("gpu.utilisation"));
        assert!(!p("gpu.util").matches_name("gpu.util.x"));
        assert!(p("a.b").matches_parts(&["a", "b"]));
    }

    #[test]
    fn malformed_patterns_say_what_is_wrong() {
        let err = |s: &str| Pattern::parse(s).unwrap_err().to_string();
        assert_eq!(err(""), "pattern is empty");
        assert!(
            err("a..b").contains("empty token at position 2"),
            "{}",
            err("a..b")
        );
        assert!(err("a.").contains("empty token at position 2"));
        assert!(err(".a").contains("empty token at position 1"));
        assert!(err("a.>.b").contains("`>` may only be the last token"));
        assert!(err("infer*").contains("mixes a wildcard with text"));
        assert!(err("a.b>").contains("mixes a wildcard with text"));
        assert!(err("a b").contains("whitespace"));
    }

    #[test]
    fn event_names_are_validated() {
        assert!(validate_event_name("inference.stop").is_ok());
        assert!(validate_event_name("").is_err());
        assert!(validate_event_name("a..b").is_err());
        assert!(validate_event_name("a.*").is_err());
        assert!(validate_event_parts(&["a", "b"]).is_ok());
        assert!(validate_event_parts::<&str>(&[]).is_err());
        assert!(validate_event_parts(&["a.b"]).is_err());
        assert!(validate_event_parts(&["a", ""]).is_err());
    }

    #[test]
    fn specificity_prefers_literals_then_no_tail() {
        let mut v = [
            p(">"),
            p("inference.>"),
            p("inference.*"),
            p("inference.stop"),
            p("*.*"),
        ];
        v.sort_by(Pattern::specificity_cmp);
        let order: Vec<_> = v.iter().map(Pattern::as_str).collect();
        assert_eq!(
            order,
            ["inference.stop", "inference.*", "inference.>", "*.*", ">"]
        );
    }

    /// The obvious recursive definition, to check the iterative matcher against.
    fn naive(pattern: &[&str], name: &[&str]) -> bool {
        match (pattern.split_first(), name.split_first()) {
            (None, None) => true,
            (Some((&">", [])), Some(_)) => true,
            (Some((&"*", rest)), Some((_, name_rest))) => naive(rest, name_rest),
            (Some((lit, rest)), Some((tok, name_rest))) => lit == tok && naive(rest, name_rest),
            _ => false,
        }
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("a".to_string()),
            Just("b".to_string()),
            Just("cd".to_string())
        ]
    }

    fn pattern_tokens() -> impl Strategy<Value = Vec<String>> {
        (
            prop::collection::vec(prop_oneof![token(), Just("*".to_string())], 0..4),
            any::<bool>(),
        )
            .prop_filter_map("non-empty", |(mut tokens, tail)| {
                if tail {
                    tokens.push(">".into());
                }
                (!tokens.is_empty()).then_some(tokens)
            })
    }

    proptest! {
        #[test]
        fn matcher_agrees_with_naive_reference(
            pattern in pattern_tokens(),
            name in prop::collection::vec(token(), 1..5),
        ) {
            let pattern_refs: Vec<&str> = pattern.iter().map(String::as_str).collect();
            let name_refs: Vec<&str> = name.iter().map(String::as_str).collect();
            let parsed = Pattern::parse(&pattern.join(".")).unwrap();
            let expected = naive(&pattern_refs, &name_refs);
            prop_assert_eq!(parsed.matches_parts(&name_refs), expected);
            prop_assert_eq!(parsed.matches_name(&name.join(".")), expected);
        }

        /// The one-pass check of plain names accepts exactly what the full checks accept.
        #[test]
        fn the_plain_name_pass_agrees_with_the_full_checks(
            parts in prop::collection::vec(
                prop_oneof![
                    "[a-z0-9_-]{0,6}",
                    "[ -~]{0,4}",
                    "[\\x00-\\x20\\x7f\u{85}\u{a0}\u{2028}é]{0,3}",
                    "\\PC{0,4}",
                ],
                0..4,
            ),
        ) {
            let tokens = || parts.iter().map(String::as_str);
            prop_assert_eq!(
                validate_event_tokens(tokens()).is_ok(),
                explain_event_tokens(tokens()).is_ok(),
                "{:?}", parts
            );
        }

        #[test]
        fn parser_never_panics(input in "\\PC{0,24}") {
            let _ = Pattern::parse(&input);
            let _ = validate_event_name(&input);
        }
    }
}
