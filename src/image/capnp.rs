//! Cap'n Proto text: string literals that no name or value can break out of.

/// A Cap'n Proto string literal holding exactly `text`. Quotes and backslashes are escaped, and
/// every control character becomes a `\xHH` escape, so a hostile name can neither end the literal
/// nor start a new line of config.
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_escape_everything_that_could_end_a_literal() {
        assert_eq!(quote("plain"), "\"plain\"");
        assert_eq!(quote("a\"b"), "\"a\\\"b\"");
        assert_eq!(quote("back\\slash"), "\"back\\\\slash\"");
        assert_eq!(quote("line\nbreak\t\r"), "\"line\\nbreak\\t\\r\"");
        assert_eq!(quote("\u{1}\u{7f}"), "\"\\x01\\x7f\"");
        assert_eq!(quote("ünï"), "\"ünï\"");
    }

    #[test]
    fn a_quoted_string_has_no_unescaped_quote_or_raw_newline() {
        let hostile = "\"), (name = \"evil\", text = \"x\") ]\n# \\\"";
        let q = quote(hostile);
        let inner = &q[1..q.len() - 1];
        assert!(!inner.contains('\n'));
        let mut escaped = false;
        for c in inner.chars() {
            assert!(escaped || c != '"', "unescaped quote in {q}");
            escaped = !escaped && c == '\\';
        }
        assert!(!escaped, "dangling backslash in {q}");
    }
}
