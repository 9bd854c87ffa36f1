//! Log lines that a peer cannot forge or bloat.
//!
//! Worker ids, pools, event names and patterns come from the network and reach log lines, in
//! fields and inside error messages. In the text format a newline in one would start what
//! reads as a line of its own, and an escape sequence would drive the reader's terminal; a
//! name of 200,000 parts made one line of 400 KB. [`SafeFields`] writes every field with
//! control characters escaped (`\n`, `\u{1b}`) and cuts any value longer than
//! [`MAX_VALUE_BYTES`] with a marker saying how much was left out. The JSON format escapes by
//! itself; [`CappedJson`] cuts its long strings the same way, keeping each line valid JSON.

use std::{
    fmt::{self, Write as _},
    io,
};

use tracing::field::{Field, Visit};
use tracing_subscriber::{
    field::RecordFields,
    fmt::{FormatFields, MakeWriter, format::Writer},
};

/// The most of one field's value a log line carries.
pub const MAX_VALUE_BYTES: usize = 2048;

/// Text-format fields with control characters escaped and long values cut.
#[derive(Debug, Clone, Copy, Default)]
pub struct SafeFields;

impl<'writer> FormatFields<'writer> for SafeFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut visitor = Visitor {
            writer: &mut writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Visitor<'a, 'w> {
    writer: &'a mut Writer<'w>,
    first: bool,
    result: fmt::Result,
}

impl Visit for Visitor<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.write(field, value, false);
        } else {
            // Quoted, as the default text format shows strings.
            self.write(field, value, true);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.write(field, &value.to_string(), false);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.write(field, &format!("{value:?}"), false);
    }
}

impl Visitor<'_, '_> {
    fn write(&mut self, field: &Field, value: &str, quoted: bool) {
        if self.result.is_err() {
            return;
        }
        let name = field.name();
        if name.starts_with("log.") {
            return;
        }
        let mut line = String::with_capacity(value.len().min(MAX_VALUE_BYTES) + name.len() + 8);
        if !self.first {
            line.push(' ');
        }
        self.first = false;
        if name != "message" {
            line.push_str(name.strip_prefix("r#").unwrap_or(name));
            line.push('=');
        }
        if quoted {
            line.push('"');
        }
        escape_into(&mut line, value, quoted);
        if quoted {
            line.push('"');
        }
        self.result = self.writer.write_str(&line);
    }
}

/// Appends `value` to `out` with control characters (and the Unicode ones that reorder or break
/// lines) escaped, and `"` and `\` too when it is `quoted`, cut at [`MAX_VALUE_BYTES`].
fn escape_into(out: &mut String, value: &str, quoted: bool) {
    let cut = cut_at(value, MAX_VALUE_BYTES);
    for c in value[..cut].chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '"' | '\\' if quoted => {
                out.push('\\');
                out.push(c);
            }
            c if needs_escape(c) => {
                let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    if cut < value.len() {
        let _ = write!(out, "…[{} more bytes]", value.len() - cut);
    }
}

/// Control characters, line and paragraph separators, and bidirectional overrides (which can
/// make a line read as something else).
fn needs_escape(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// The largest char boundary at or below `max`.
fn cut_at(value: &str, max: usize) -> usize {
    if value.len() <= max {
        return value.len();
    }
    (0..=max)
        .rev()
        .find(|&i| value.is_char_boundary(i))
        .unwrap_or(0)
}

/// A writer for the JSON format that cuts, in a line longer than it should be, every string
/// longer than [`MAX_VALUE_BYTES`]; other lines pass through untouched.
#[derive(Debug, Clone, Copy, Default)]
pub struct CappedJson;

impl<'a> MakeWriter<'a> for CappedJson {
    type Writer = CappedJsonWriter;

    fn make_writer(&'a self) -> Self::Writer {
        CappedJsonWriter
    }
}

/// Writes to stderr; see [`CappedJson`].
#[derive(Debug)]
pub struct CappedJsonWriter;

/// Lines up to this long are written as they are.
const MAX_JSON_LINE: usize = 4 * MAX_VALUE_BYTES;

impl io::Write for CappedJsonWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The formatter writes each line whole, in one call.
        if buf.len() <= MAX_JSON_LINE {
            return io::stderr().write(buf);
        }
        io::stderr().write_all(&cap_json_line(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// `line` (one JSON object and a newline) with long strings cut; unchanged if it is not JSON.
fn cap_json_line(line: &[u8]) -> Vec<u8> {
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(line) else {
        return line.to_vec();
    };
    cap_strings(&mut value);
    let mut out = value.to_string().into_bytes();
    out.push(b'\n');
    out
}

fn cap_strings(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(s) if s.len() > MAX_VALUE_BYTES => {
            let cut = cut_at(s, MAX_VALUE_BYTES);
            let more = s.len() - cut;
            s.truncate(cut);
            let _ = write!(s, "…[{more} more bytes]");
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(cap_strings),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(cap_strings),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(value: &str, quoted: bool) -> String {
        let mut out = String::new();
        escape_into(&mut out, value, quoted);
        out
    }

    #[test]
    fn control_characters_cannot_start_a_line() {
        let forged = "inference\n2026-01-01T00:00:00Z  INFO forged\r\u{1b}[2J\u{2028}\u{202e}x";
        let out = escaped(forged, false);
        assert!(!out.chars().any(needs_escape), "{out}");
        assert_eq!(
            out,
            "inference\\n2026-01-01T00:00:00Z  INFO forged\\r\\u{1b}[2J\\u{2028}\\u{202e}x"
        );
        assert_eq!(escaped("a\"b\\c", true), "a\\\"b\\\\c");
        assert_eq!(escaped("a\"b\\c", false), "a\"b\\c");
        assert_eq!(escaped("gpu-3 llama é", false), "gpu-3 llama é");
    }

    #[test]
    fn long_values_are_cut_with_a_marker() {
        let long = "ab.".repeat(200_000);
        let out = escaped(&long, false);
        assert!(out.len() < MAX_VALUE_BYTES + 40, "{}", out.len());
        assert!(
            out.ends_with(&format!("…[{} more bytes]", long.len() - MAX_VALUE_BYTES)),
            "{}",
            &out[out.len() - 40..]
        );
        // Never inside a character.
        let wide = "é".repeat(MAX_VALUE_BYTES);
        assert!(escaped(&wide, false).starts_with("éé"));
    }

    #[test]
    fn long_json_lines_stay_json() {
        let name = "x.".repeat(100_000);
        let line = format!(
            "{}\n",
            serde_json::json!({"fields": {"message": "dropping", "event": name}, "level": "WARN"})
        );
        let capped = cap_json_line(line.as_bytes());
        assert!(capped.len() < MAX_JSON_LINE, "{}", capped.len());
        assert_eq!(capped.last(), Some(&b'\n'));
        let value: serde_json::Value = serde_json::from_slice(&capped).expect("still JSON");
        assert_eq!(value["level"], "WARN");
        assert!(
            value["fields"]["event"]
                .as_str()
                .unwrap()
                .ends_with("more bytes]")
        );
    }
}
