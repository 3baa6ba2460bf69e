//! What text shows a reader: the characters that show nothing yet change how the text around
//! them reads or compares (zero-width spaces and joiners, soft hyphens, direction marks and
//! overrides, variation selectors, tags). Shared by everything that checks or shows text a
//! caller, a model or a tool wrote.

/// Whether `c` is written but not seen (Unicode format characters and their kin; control
/// characters are `char::is_control`'s).
pub fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{034F}'
            | '\u{061C}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{17B4}'
            | '\u{17B5}'
            | '\u{180B}'..='\u{180F}'
            | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FE00}'..='\u{FE0F}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}'
            | '\u{1D173}'..='\u{1D17A}'
            | '\u{E0000}'..='\u{E007F}'
            | '\u{E0100}'..='\u{E01EF}'
    )
}

/// `text` as a terminal can show it: its control and invisible characters escaped (`\n`,
/// `\u{1b}`, `\u{202e}`), so what a model, a tool or a tenant wrote cannot move the cursor,
/// rewrite lines already printed, set the clipboard or the window's title, or turn text around.
pub fn for_terminal(text: &str) -> std::borrow::Cow<'_, str> {
    escaped(text, false)
}

/// [`for_terminal`], keeping line breaks and tabs: for text shown as a block of its own (a run's
/// output, a report).
pub fn for_terminal_keeping_lines(text: &str) -> std::borrow::Cow<'_, str> {
    escaped(text, true)
}

fn escaped(text: &str, keep_lines: bool) -> std::borrow::Cow<'_, str> {
    // U+2028 and U+2029 end a line for YAML 1.1 readers and some terminals.
    let hidden = |c: char| {
        (c.is_control() && !(keep_lines && matches!(c, '\n' | '\t')))
            || matches!(c, '\u{2028}' | '\u{2029}')
            || is_invisible(c)
    };
    if !text.chars().any(hidden) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if !hidden(c) {
            out.push(c);
        } else if c.escape_debug().len() > 1 {
            out.extend(c.escape_debug());
        } else {
            // Shown as itself by `escape_debug`, though it shows nothing.
            out.extend(c.escape_unicode());
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Whether `c` is one of the combining marks any letter or digit can carry (a line under, a
/// circle around): the generic blocks, not a script's own vowel signs.
pub fn is_combining_mark(c: char) -> bool {
    matches!(
        c,
        '\u{0300}'..='\u{036F}'
            | '\u{0483}'..='\u{0489}'
            | '\u{1AB0}'..='\u{1AFF}'
            | '\u{1DC0}'..='\u{1DFF}'
            | '\u{20D0}'..='\u{20FF}'
            | '\u{FE20}'..='\u{FE2F}'
    )
}

/// The first digit, 0, of each script's own run of ten decimal digits (those compatibility
/// folding leaves as they are: full-width and mathematical digits already become ASCII).
const DIGIT_ZEROS: [u32; 52] = [
    0x0660, 0x06F0, 0x07C0, 0x0966, 0x09E6, 0x0A66, 0x0AE6, 0x0B66, 0x0BE6, 0x0C66, 0x0CE6, 0x0D66, 0x0DE6,
    0x0E50, 0x0ED0, 0x0F20, 0x1040, 0x1090, 0x17E0, 0x1810, 0x1946, 0x19D0, 0x1A80, 0x1A90, 0x1B50, 0x1BB0,
    0x1C40, 0x1C50, 0xA620, 0xA8D0, 0xA900, 0xA9D0, 0xA9F0, 0xAA50, 0xABF0, 0xFF10, 0x104A0, 0x11066,
    0x110F0, 0x11136, 0x111D0, 0x112F0, 0x11450, 0x114D0, 0x11650, 0x116C0, 0x11730, 0x118E0, 0x11C50,
    0x11D50, 0x16A60, 0x1E950,
];

/// The ASCII digit `c` stands for, when it is a decimal digit of another script (`٣` is `3`).
pub fn ascii_digit(c: char) -> Option<char> {
    let code = u32::from(c);
    DIGIT_ZEROS
        .iter()
        .find(|zero| (**zero..**zero + 10).contains(&code))
        .and_then(|zero| char::from_digit(code - zero, 10))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminal_is_shown_escapes_and_invisible_characters_as_text() {
        let hostile = "step 3 restart_pod: DENIED\u{1b}[1A\u{1b}[2Kexecuted\u{1b}]52;c;aGk=\u{7}\u{9b}2J\r\u{202e}gnp.exe\u{200b}";
        assert_eq!(
            for_terminal(hostile),
            "step 3 restart_pod: DENIED\\u{1b}[1A\\u{1b}[2Kexecuted\\u{1b}]52;c;aGk=\\u{7}\\u{9b}2J\\r\\u{202e}gnp.exe\\u{200b}"
        );
        assert_eq!(for_terminal("two\nlines"), "two\\nlines");
        assert_eq!(
            for_terminal("one\u{85}two\u{2028}three\u{2029}"),
            "one\\u{85}two\\u{2028}three\\u{2029}"
        );
        assert_eq!(
            for_terminal_keeping_lines("two\n\tlines\u{1b}[2J"),
            "two\n\tlines\\u{1b}[2J"
        );
        assert!(matches!(
            for_terminal("plain · ünïcode"),
            std::borrow::Cow::Borrowed(_)
        ));
    }

    #[test]
    fn what_shows_nothing_is_invisible_and_what_shows_is_not() {
        for c in [
            '\u{200B}',
            '\u{202E}',
            '\u{2066}',
            '\u{FEFF}',
            '\u{AD}',
            '\u{E0041}',
            '\u{FE0F}',
        ] {
            assert!(is_invisible(c), "{c:?}");
        }
        for c in ['a', ' ', '\u{A0}', '＠', '٣', '\n'] {
            assert!(!is_invisible(c), "{c:?}");
        }
    }

    #[test]
    fn digits_of_other_scripts_read_as_ascii_digits_and_nothing_else_does() {
        assert_eq!(ascii_digit('٣'), Some('3'));
        assert_eq!(ascii_digit('۹'), Some('9'));
        assert_eq!(ascii_digit('०'), Some('0'));
        assert_eq!(ascii_digit('๗'), Some('7'));
        for c in ['3', 'a', '٫', 'ↈ', '\u{0A65}'] {
            assert_eq!(ascii_digit(c), None, "{c:?}");
        }
        assert!(is_combining_mark('\u{0332}'));
        assert!(
            !is_combining_mark('\u{093F}'),
            "a script's own vowel sign is not dropped"
        );
    }
}
