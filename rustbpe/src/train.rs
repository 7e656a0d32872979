//! BPE training: count regex chunks of a streamed corpus in parallel, then merge the most frequent
//! adjacent pair again and again, updating pair counts incrementally instead of recounting.
//!
//! Tie-break (deterministic, independent of thread count and corpus order): the pair with the highest
//! count wins; among equal counts, the smallest pair `(left id, right id)` in lexicographic order.
//! A pair occurring k times inside one chunk counts k times, overlapping ones included ("aaa" has
//! (a, a) twice), and a merge rewrites each chunk left to right ("aaa" becomes [aa, a]).
//! Training stops early when no pair is left (every chunk is a single token).
use std::cmp::Ordering;
use std::collections::BinaryHeap;

use ahash::{AHashMap, AHashSet};
use rayon::prelude::*;

use crate::pattern::Splitter;

pub type Pair = (u32, u32);

/// Number of distinct chunks seen so far and how often each occurred.
#[derive(Default)]
pub struct ChunkCounts {
    counts: AHashMap<String, u64>,
}

impl ChunkCounts {
    /// Splits a batch of texts in parallel (rayon) and adds their chunk counts.
    pub fn add_texts(&mut self, splitter: &Splitter, texts: &[String]) {
        let local = texts
            .par_iter()
            .fold(AHashMap::<String, u64>::new, |mut acc, text| {
                splitter.for_each_chunk(text, |chunk| match acc.get_mut(chunk) {
                    Some(c) => *c += 1,
                    None => {
                        acc.insert(chunk.to_owned(), 1);
                    }
                });
                acc
            })
            .reduce(AHashMap::new, merge_counts);
        self.counts = merge_counts(std::mem::take(&mut self.counts), local);
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

fn merge_counts(a: AHashMap<String, u64>, b: AHashMap<String, u64>) -> AHashMap<String, u64> {
    let (mut big, small) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    for (k, v) in small {
        *big.entry(k).or_insert(0) += v;
    }
    big
}

/// A heap entry: ordered by count, then by the reversed pair so that smaller pairs pop first.
#[derive(PartialEq, Eq)]
struct Candidate {
    count: i64,
    pair: Pair,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        self.count.cmp(&other.count).then_with(|| other.pair.cmp(&self.pair))
    }
}

impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Rewrites `ids` with every left-to-right occurrence of `pair` replaced by `new_id`, and adds to
/// `delta` how the word's pair multiset changed (times `weight`). Only pairs touching `pair`'s ids or
/// `new_id` can change, so only those are counted; unchanged ones cancel out.
fn merge_word(ids: &mut Vec<u32>, pair: Pair, new_id: u32, weight: i64, delta: &mut AHashMap<Pair, i64>) -> bool {
    let (a, b) = pair;
    let touches_old = |p: Pair| p.0 == a || p.0 == b || p.1 == a || p.1 == b;
    let mut out = Vec::with_capacity(ids.len());
    let mut i = 0;
    while i < ids.len() {
        if i + 1 < ids.len() && ids[i] == a && ids[i + 1] == b {
            out.push(new_id);
            i += 2;
        } else {
            out.push(ids[i]);
            i += 1;
        }
    }
    if out.len() == ids.len() {
        return false; // stale index entry: the pair is no longer in this word
    }
    for w in ids.windows(2) {
        let p = (w[0], w[1]);
        if touches_old(p) {
            *delta.entry(p).or_insert(0) -= weight;
        }
    }
    for w in out.windows(2) {
        let p = (w[0], w[1]);
        if touches_old(p) || p.0 == new_id || p.1 == new_id {
            *delta.entry(p).or_insert(0) += weight;
        }
    }
    *ids = out;
    true
}

/// Learns up to `num_merges` merges; merge k creates token id 256 + k. `on_progress(done)` is called
/// before the first merge, every 1000 merges and at the end.
pub fn learn_merges(chunks: ChunkCounts, num_merges: usize, mut on_progress: impl FnMut(usize)) -> Vec<Pair> {
    // Sorted so that the work below does not depend on hash order (the result never does).
    let mut entries: Vec<(String, u64)> = chunks.counts.into_iter().collect();
    entries.sort_unstable();
    let mut words: Vec<Vec<u32>> = entries.iter().map(|(s, _)| s.bytes().map(u32::from).collect()).collect();
    let weights: Vec<i64> = entries.iter().map(|(_, c)| *c as i64).collect();
    drop(entries);

    // Initial pair counts and, for each pair, the words it occurs in (entries may go stale later).
    let (mut pair_counts, mut where_found) = words
        .par_iter()
        .enumerate()
        .fold(
            || (AHashMap::<Pair, i64>::new(), AHashMap::<Pair, AHashSet<u32>>::new()),
            |(mut counts, mut found), (idx, ids)| {
                for w in ids.windows(2) {
                    let p = (w[0], w[1]);
                    *counts.entry(p).or_insert(0) += weights[idx];
                    found.entry(p).or_default().insert(idx as u32);
                }
                (counts, found)
            },
        )
        .reduce(
            || (AHashMap::new(), AHashMap::new()),
            |(mut c1, mut f1), (c2, f2)| {
                for (p, c) in c2 {
                    *c1.entry(p).or_insert(0) += c;
                }
                for (p, set) in f2 {
                    f1.entry(p).or_default().extend(set);
                }
                (c1, f1)
            },
        );

    let mut heap: BinaryHeap<Candidate> =
        pair_counts.iter().filter(|(_, &c)| c > 0).map(|(&pair, &count)| Candidate { count, pair }).collect();
    let mut merges = Vec::with_capacity(num_merges);
    on_progress(0);
    let mut delta: AHashMap<Pair, i64> = AHashMap::new();

    while merges.len() < num_merges {
        let Some(top) = heap.pop() else { break };
        // Counts only ever go down for pairs already in the heap, so an entry whose count is out of date
        // is re-queued with its current count; an up-to-date top is the true maximum.
        let current = pair_counts.get(&top.pair).copied().unwrap_or(0);
        if current <= 0 {
            continue;
        }
        if current != top.count {
            heap.push(Candidate { count: current, pair: top.pair });
            continue;
        }
        let new_id = (256 + merges.len()) as u32;
        merges.push(top.pair);
        if merges.len() % 1000 == 0 {
            on_progress(merges.len());
        }

        let mut touched: Vec<u32> = where_found.remove(&top.pair).map(|s| s.into_iter().collect()).unwrap_or_default();
        touched.sort_unstable();
        delta.clear();
        for &idx in &touched {
            let ids = &mut words[idx as usize];
            if merge_word(ids, top.pair, new_id, weights[idx as usize], &mut delta) {
                for w in ids.windows(2) {
                    if w[0] == new_id || w[1] == new_id {
                        where_found.entry((w[0], w[1])).or_default().insert(idx);
                    }
                }
            }
        }
        for (&pair, &d) in &delta {
            if d == 0 {
                continue;
            }
            let count = pair_counts.entry(pair).or_insert(0);
            *count += d;
            if d > 0 {
                // Only pairs containing new_id can grow, and they are new: queue them once per merge.
                heap.push(Candidate { count: *count, pair });
            }
        }
        pair_counts.remove(&top.pair);
    }
    on_progress(merges.len());
    merges
}
