//! Encoding and decoding with learned merges: bytes of each regex chunk are merged lowest rank first
//! (leftmost first among equal ranks), which is what HF `tokenizers` BPE and tiktoken do.
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use ahash::AHashMap;

use crate::pattern::Splitter;
use crate::train::Pair;

/// nanochat's special tokens, in nanochat's order; their ids follow the merges.
pub const SPECIAL_TOKENS: [&str; 9] = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
];

/// Chunks up to this many bytes are encoded by rescanning, longer ones with a heap.
const SHORT_CHUNK: usize = 32;

pub struct Encoder {
    splitter: Splitter,
    merges: Vec<Pair>,
    /// pair -> id of the merged token (256 + rank, so a smaller id is a higher priority).
    ranks: AHashMap<Pair, u32>,
    /// Byte string of every non-special token, indexed by id.
    token_bytes: Vec<Vec<u8>>,
}

impl Encoder {
    /// Builds the vocabulary from merges, checking that each merge only uses earlier tokens and that
    /// no two tokens have the same bytes (an HF vocabulary is keyed by the token's string).
    pub fn new(merges: Vec<Pair>) -> Result<Self, String> {
        let splitter = Splitter::new()?;
        let mut token_bytes: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let mut ranks = AHashMap::with_capacity(merges.len());
        let mut seen: AHashMap<Vec<u8>, u32> = token_bytes.iter().cloned().zip(0u32..).collect();
        for (k, &(a, b)) in merges.iter().enumerate() {
            let new_id = (256 + k) as u32;
            if a >= new_id || b >= new_id {
                return Err(format!("merge #{k} ({a}, {b}) uses a token id >= {new_id}, which does not exist yet"));
            }
            if ranks.insert((a, b), new_id).is_some() {
                return Err(format!("merge #{k} ({a}, {b}) appears twice"));
            }
            let mut bytes = token_bytes[a as usize].clone();
            bytes.extend_from_slice(&token_bytes[b as usize]);
            if let Some(other) = seen.insert(bytes.clone(), new_id) {
                return Err(format!("merge #{k} ({a}, {b}) makes the same bytes {bytes:?} as token {other}"));
            }
            token_bytes.push(bytes);
        }
        Ok(Encoder { splitter, merges, ranks, token_bytes })
    }

    pub fn merges(&self) -> &[Pair] {
        &self.merges
    }

    /// Ordinary tokens (bytes + merges), without the special tokens.
    pub fn num_ordinary(&self) -> usize {
        self.token_bytes.len()
    }

    pub fn vocab_size(&self) -> usize {
        self.token_bytes.len() + SPECIAL_TOKENS.len()
    }

    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.token_bytes.get(id as usize).map(|b| b.as_slice())
    }

    pub fn special_id(&self, name: &str) -> Option<u32> {
        SPECIAL_TOKENS.iter().position(|s| *s == name).map(|i| (self.num_ordinary() + i) as u32)
    }

    /// Token ids of `text` (special-token strings in it are ordinary text).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        self.splitter.for_each_chunk(text, |chunk| self.encode_chunk(chunk.as_bytes(), &mut out));
        out
    }

    fn encode_chunk(&self, bytes: &[u8], out: &mut Vec<u32>) {
        if bytes.len() <= SHORT_CHUNK {
            self.encode_short(bytes, out)
        } else {
            self.encode_long(bytes, out)
        }
    }

    /// Rescans the chunk for its best pair after every merge: O(len^2), fastest for short chunks.
    fn encode_short(&self, bytes: &[u8], out: &mut Vec<u32>) {
        let mut ids: Vec<u32> = bytes.iter().map(|&b| u32::from(b)).collect();
        while ids.len() >= 2 {
            // The best merge present; a smaller merged id means an earlier (higher-priority) merge.
            let best = ids.windows(2).filter_map(|w| self.ranks.get(&(w[0], w[1])).copied()).min();
            let Some(new_id) = best else { break };
            let (a, b) = self.merges[(new_id - 256) as usize];
            let mut write = 0;
            let mut read = 0;
            while read < ids.len() {
                if read + 1 < ids.len() && ids[read] == a && ids[read + 1] == b {
                    ids[write] = new_id;
                    read += 2;
                } else {
                    ids[write] = ids[read];
                    read += 1;
                }
                write += 1;
            }
            ids.truncate(write);
        }
        out.extend_from_slice(&ids);
    }

    /// Same result with a heap of (merged id, position) over a linked list of symbols: O(len log len),
    /// so a long chunk (a run of spaces, a base64 blob) cannot take quadratic time.
    fn encode_long(&self, bytes: &[u8], out: &mut Vec<u32>) {
        const NONE: usize = usize::MAX;
        let n = bytes.len();
        let mut ids: Vec<u32> = bytes.iter().map(|&b| u32::from(b)).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
        let mut next: Vec<usize> = (0..n).map(|i| if i + 1 == n { NONE } else { i + 1 }).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        for i in 0..n - 1 {
            if let Some(&r) = self.ranks.get(&(ids[i], ids[i + 1])) {
                heap.push(Reverse((r, i)));
            }
        }
        // Lowest merged id first, leftmost first among equal ids. Merging makes only pairs containing
        // the new token, whose merged ids are larger, so entries pop in the order a rescan would pick.
        while let Some(Reverse((r, i))) = heap.pop() {
            let j = next[i];
            if !alive[i] || j == NONE || self.ranks.get(&(ids[i], ids[j])) != Some(&r) {
                continue; // stale: a neighbour was merged since this entry was pushed
            }
            ids[i] = r;
            alive[j] = false;
            next[i] = next[j];
            if next[j] != NONE {
                prev[next[j]] = i;
            }
            if prev[i] != NONE {
                if let Some(&r2) = self.ranks.get(&(ids[prev[i]], r)) {
                    heap.push(Reverse((r2, prev[i])));
                }
            }
            if next[i] != NONE {
                if let Some(&r2) = self.ranks.get(&(r, ids[next[i]])) {
                    heap.push(Reverse((r2, i)));
                }
            }
        }
        out.extend((0..n).filter(|&i| alive[i]).map(|i| ids[i]));
    }

    /// Bytes of the given tokens; special tokens decode to their names.
    pub fn decode_bytes(&self, ids: &[i64]) -> Result<Vec<u8>, String> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for (pos, &id) in ids.iter().enumerate() {
            if id < 0 || id as usize >= self.vocab_size() {
                return Err(format!(
                    "token id {id} at position {pos} is out of range: the vocabulary has ids 0..{}",
                    self.vocab_size() - 1
                ));
            }
            let id = id as usize;
            match self.token_bytes.get(id) {
                Some(b) => out.extend_from_slice(b),
                None => out.extend_from_slice(SPECIAL_TOKENS[id - self.num_ordinary()].as_bytes()),
            }
        }
        Ok(out)
    }
}
