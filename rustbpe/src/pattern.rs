//! The pre-tokenization split: text is cut into chunks and BPE never merges across chunk boundaries.
//!
//! The pattern is GPT-4's as nanochat uses it (numbers grouped by at most 2 digits, not 3, which spends
//! fewer merges on numbers in a small vocabulary). It needs a lookahead, `\s+(?!\S)`, so it is run here
//! with the fast DFA-based `regex` crate on an equivalent pattern plus one fix-up, instead of with a
//! backtracking engine:
//! - the possessive quantifiers (`?+`, `++`) can be plain greedy ones: no branch could backtrack into them;
//! - `\s+(?!\S)|\s+` becomes `\s+` and, when that branch matched a whitespace run of 2+ characters that
//!   is followed by a non-space, the run gives back its last character (what the lookahead does), so
//!   " x" keeps its space. Tests check chunks and ids against Python `regex` and HF `tokenizers`.
use regex_automata::meta::Regex;
use regex_automata::{Anchored, Input};

/// The pattern as written (Oniguruma/`regex`-module syntax); exported to tokenizer.json.
pub const SPLIT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";

/// SPLIT_PATTERN without possessive quantifiers and lookahead (see the module docs).
const DFA_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+";

pub struct Splitter {
    regex: Regex,
}

impl Splitter {
    pub fn new() -> Result<Self, String> {
        let regex = Regex::new(DFA_PATTERN).map_err(|e| format!("invalid split pattern: {e}"))?;
        Ok(Splitter { regex })
    }

    /// Calls `f` on each chunk of `text` in order; the chunks concatenate back to `text`.
    pub fn for_each_chunk<'t>(&self, text: &'t str, mut f: impl FnMut(&'t str)) {
        let mut pos = 0;
        while pos < text.len() {
            // Anchored at `pos`: the match must start there, so no reverse scan for its start is needed.
            let input = Input::new(text).range(pos..).anchored(Anchored::Yes);
            let m = match self.regex.find(input) {
                Some(m) if m.end() > pos => m,
                // Unreachable: every character starts a non-empty match of some branch. Never drop text.
                _ => {
                    f(&text[pos..]);
                    return;
                }
            };
            let mut end = m.end();
            if end < text.len() {
                let mut chars = text[pos..m.end()].chars();
                let last = chars.next_back();
                // The final `\s+` branch is the only one that ends in whitespace other than \r or \n.
                if let Some(c) = last {
                    if c.is_whitespace() && c != '\r' && c != '\n' && chars.next().is_some() {
                        end -= c.len_utf8();
                    }
                }
            }
            f(&text[pos..end]);
            pos = end;
        }
    }
}
