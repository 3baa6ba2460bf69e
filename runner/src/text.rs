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
            | '\u{E0000}'..='\u{E007F}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
