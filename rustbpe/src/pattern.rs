//! The pre-tokenization split pattern: text is cut into chunks by this regex and BPE never merges
//! across chunk boundaries.
use fancy_regex::Regex;

/// GPT-4's split pattern as nanochat uses it: numbers are grouped by at most 2 digits (GPT-4 uses 3),
/// which spends fewer merges on number chunks in a small vocabulary.
pub const SPLIT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

pub fn compile(pattern: &str) -> Result<Regex, String> {
    Regex::new(pattern).map_err(|e| format!("invalid split pattern {pattern:?}: {e}"))
}

/// Calls `f` on every chunk of `text`; a regex runtime failure (backtrack limit) becomes an error.
pub fn for_each_chunk<'t>(regex: &Regex, text: &'t str, mut f: impl FnMut(&'t str)) -> Result<(), String> {
    for m in regex.find_iter(text) {
        let m = m.map_err(|e| format!("split pattern failed on text starting {:?}: {e}", preview(text)))?;
        f(m.as_str());
    }
    Ok(())
}

fn preview(text: &str) -> String {
    text.chars().take(40).collect()
}
