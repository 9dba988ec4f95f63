//! Text that reaches a terminal: control characters made visible.
//!
//! A pipeline from another team may hide what it runs behind a carriage return (`\r` moves the
//! cursor back, so the harmless tail overwrites the real command on screen), ANSI escape
//! sequences (which can clear lines or recolour text) or Unicode bidirectional overrides (which
//! reorder what is shown). Everything fpipe prints from a pipeline file, a parameter or a
//! stage's log goes through [`visible`] first.

use std::borrow::Cow;

/// `s` with every control character written as an escape (`\r`, `\x1b`, `\u{202e}`), so what
/// a terminal shows is what the text holds. Newlines are kept when `keep_newlines` is true
/// (multi-line commands and log tails print line by line); tabs are kept.
pub fn visible(s: &str, keep_newlines: bool) -> Cow<'_, str> {
    if !s.chars().any(|c| hidden(c, keep_newlines)) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !hidden(c, keep_newlines) {
            out.push(c);
            continue;
        }
        match c {
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x80 => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push_str(&format!("\\u{{{:04x}}}", c as u32)),
        }
    }
    Cow::Owned(out)
}

/// One line of text for the terminal: like [`visible`], newlines escaped too.
pub fn visible_line(s: &str) -> Cow<'_, str> {
    visible(s, false)
}

fn hidden(c: char, keep_newlines: bool) -> bool {
    match c {
        '\n' => !keep_newlines,
        '\t' => false,
        // C0 and C1 controls, DEL.
        c if c.is_control() => true,
        // Bidirectional embeddings, overrides and isolates; zero-width joiners and marks that
        // make two different strings look alike.
        '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => true,
        '\u{feff}' => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_become_visible() {
        assert_eq!(visible("echo hi", true), "echo hi");
        assert!(matches!(visible("plain", true), Cow::Borrowed(_)));
        assert_eq!(
            visible("rm -rf ~ \r echo safe", true),
            "rm -rf ~ \\r echo safe"
        );
        assert_eq!(visible("a\x1b[2Kb", true), "a\\x1b[2Kb");
        assert_eq!(visible("x\u{202e}y", true), "x\\u{202e}y");
        assert_eq!(visible("x\u{9b}y", true), "x\\u{009b}y");
        assert_eq!(visible("a\nb\tc", true), "a\nb\tc");
        assert_eq!(visible_line("a\nb"), "a\\nb");
        assert_eq!(visible("\x7f", true), "\\x7f");
    }
}
