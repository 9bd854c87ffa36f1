//! Names as single tokens of NATS subjects and key-value keys, which give '.' and a few other
//! characters a meaning: the bytes a name may keep stay, every other byte (and the escape
//! character itself) is written as the escape character and two hex digits, and the empty
//! name is the escape character alone. Subjects escape with '~', keys with '=' (the only
//! characters besides letters, digits, '-' and '_' that a key may hold).

use std::borrow::Cow;

/// `text` as one token: bytes `keep` accepts stay, the others are written `<escape>HH`.
pub(super) fn escape(text: &str, escape: u8, keep: impl Fn(u8) -> bool) -> String {
    if text.is_empty() {
        return char::from(escape).into();
    }
    let mut token = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte != escape && keep(byte) {
            token.push(char::from(byte));
        } else {
            token.push(char::from(escape));
            token.push_str(&format!("{byte:02X}"));
        }
    }
    token
}

/// The inverse of [`escape`]; `None` for a token it cannot have written. Borrows the token
/// when it holds no escapes (nearly always).
pub(super) fn unescape(token: &str, escape: u8) -> Option<Cow<'_, str>> {
    let bytes = token.as_bytes();
    if bytes == [escape] {
        return Some(Cow::Borrowed(""));
    }
    if !bytes.contains(&escape) {
        return Some(Cow::Borrowed(token));
    }
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == escape {
            out.push(u8::from_str_radix(token.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().map(Cow::Owned)
}
