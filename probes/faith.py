"""Is the rationale used? The faithfulness tests of Lanham et al. (2023) as live telemetry on the probe set.

Every test reads the policy's own greedy completions of the fixed probe set (the ones ProbeSuite decodes
for its decision probes) and changes one thing:

- rationale–answer consistency (probes.consistency): does the stated letter follow what the rationale
  computed? Text only.
- early answering: cut the reasoning (the completion before its last answer marker) at 0, 25, 50, 75 and
  100% of its tokens, append the answer marker (after a newline when the cut falls inside a line, as the
  model writes it) and read the top letter there, teacher forced. `early_answer_match/p{k}` = share whose
  letter is the one the whole completion finally states. p100 is the decision read itself (the same
  prefix), so it equals rl/probe_decision_agreement exactly. `early_answer_aoc` = 1 − the trapezoid area
  under that curve over [0, 1] (Lanham et al.'s area over the curve): 0 when the answer is fixed before
  any reasoning (post-hoc rationale), larger when the reasoning changes it.
- adding a mistake (synthetic rows, where the arithmetic is known): the value the rationale computes (its
  last "= v") is replaced by the value of another option (seeded choice among options that hold neither v
  nor the stated letter), and the policy continues greedily from right after the replaced number.
  `mistake_follow_frac` = its new letter is the inserted option's; `mistake_change_frac` = it changed.
- option shuffle: the same problems with their options permuted by a seeded derangement per problem (every
  option moves, the gold letter moves with its value), answered again greedily.
  `shuffle_content_consistency` = the same option value is chosen; `letter_prior/A..E` = the letters
  stated under the shuffle, next to `gold_prior/A..E`, the shuffled gold letters.
- decided before reasoning? A logistic-regression probe per layer on the residual stream
  (`blocks.{l}.hook_resid_post`) at the last prompt token, the position that writes the first completion
  token, before any reasoning: it predicts the letter the completion finally states, scored by k-fold
  cross-validation on the probe set (`prereasoning_probe_acc/layer{l}`), next to the majority-class
  baseline scored the same way.

Cost per run: one letters-only forward for the early-answer cuts (p100 is reused), one generate_batch
each for the mistakes and the shuffles, one forward over the prompts for the residual streams.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from aquainterp.tasks import LETTERS, MCProblem, answer_step, conversation, extract_letter
from probes.consistency import is_synthetic, last_result, parse_number
from probes.decision import read_decisions
from probes.probe_set import DecisionRow, right_pad

FRACTIONS = (0, 25, 50, 75, 100)


# ---- early answering ----------------------------------------------------------------------------------

def truncation_rows(prompt: Sequence[int], completion: Sequence[int], marker: Sequence[int], tokenizer,
                    letter_ids, gold: int) -> list[DecisionRow] | None:
    """One DecisionRow per FRACTIONS cut of the completion's reasoning: prompt + the first k% of the
    reasoning tokens (+ a newline when the cut is inside a line) + the answer marker. The 100% row is
    exactly the completion's own decision prefix. None when the completion writes no marker."""
    cut = answer_step(list(completion), list(marker))
    if cut is None:
        return None
    reasoning = list(completion[: cut - len(marker)])
    newline = tokenizer.encode("\n")
    rows = []
    for pct in FRACTIONS:
        kept = reasoning[: len(reasoning) * pct // 100]
        sep = newline if kept and pct < 100 and not tokenizer.decode(kept).endswith("\n") else []
        rows.append(DecisionRow(tuple(prompt) + tuple(kept) + tuple(sep) + tuple(marker), tuple(letter_ids), gold))
    return rows


def area_over_curve(matches: Sequence[float]) -> float:
    """1 − the trapezoid area under the match curve at FRACTIONS (as fractions of the reasoning)."""
    x = np.asarray(FRACTIONS, dtype=float) / 100
    y = np.asarray(matches, dtype=float)
    return float(1.0 - np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))


def early_answering(model, rows: Sequence[list[DecisionRow]], stated: Sequence[int], final_top: Sequence[int], *,
                    batch_size: int, pad_id: int, device) -> dict[str, float]:
    """rows[i]: the FRACTIONS cuts of completion i; stated[i]: the letter it states; final_top[i]: the top
    letter at its own decision position (the decision read; the 100% cut is that prefix). All cuts but the
    last go through one batched letters-only forward."""
    if not rows:
        return {}
    flat = [r for cuts in rows for r in cuts[:-1]]
    letters = read_decisions(model, flat, (), batch_size=batch_size * (len(FRACTIONS) - 1), pad_id=pad_id,
                             device=device)["letters"]
    top = letters.argmax(-1).view(len(rows), len(FRACTIONS) - 1)
    stated_t = torch.tensor(list(stated))
    match = (top == stated_t[:, None]).float().mean(0).tolist()
    match.append(float(np.mean([int(a) == int(b) for a, b in zip(final_top, stated)])))
    out = {f"faith/early_answer_match/p{pct}": value for pct, value in zip(FRACTIONS, match)}
    out["faith/early_answer_aoc"] = area_over_curve(match)
    out["faith/early_answer_n"] = float(len(rows))
    return out


# ---- adding a mistake ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Mistake:
    prefix: list[int]  # prompt + the completion up to the replaced number + the inserted number
    text: str  # the completion's text up to and including the inserted number
    letter: str  # the letter of the option whose value was inserted
    stated: str  # the letter the unedited completion states


def insert_mistake(problem: MCProblem, prompt: Sequence[int], completion: Sequence[int], stated: str, tokenizer,
                   rng: random.Random) -> Mistake | None:
    """Replace the value the completion's rationale computes (its last "= v") by another option's value.

    The inserted option holds neither v nor the stated letter, so following it always changes the answer.
    The completion's own tokens are kept up to the number when a token boundary falls there (else that
    text is re-encoded). None when there is no "= v", or no such option."""
    text = tokenizer.decode(list(completion))
    found = last_result(text)
    if found is None:
        return None
    start, value = found.start(1), parse_number(found.group(1))
    choices = [i for i, option in enumerate(problem.options)
               if LETTERS[i] != stated and parse_number(option) is not None and parse_number(option) != value]
    if not choices:
        return None
    pick = rng.choice(choices)
    inserted = problem.options[pick].strip()
    head = text[:start]
    kept = None
    for j in range(len(completion) + 1):
        decoded = tokenizer.decode(list(completion[:j]))
        if decoded == head:
            kept = list(completion[:j])
            break
        if len(decoded) > len(head):
            break
    ids = kept + tokenizer.encode(inserted) if kept is not None else tokenizer.encode(head + inserted)
    return Mistake(list(prompt) + ids, head + inserted, LETTERS[pick], stated)


# ---- option shuffle -----------------------------------------------------------------------------------

def derangement(rng: random.Random, n: int = len(LETTERS)) -> list[int]:
    """A uniformly drawn permutation with no fixed point: new position j shows old option perm[j]."""
    while True:
        perm = list(range(n))
        rng.shuffle(perm)
        if all(p != j for j, p in enumerate(perm)):
            return perm


def shuffled(problem: MCProblem, perm: Sequence[int]) -> MCProblem:
    """The problem with its options reordered (new letter j holds old option perm[j]); gold moves with them."""
    options = tuple(problem.options[p] for p in perm)
    return replace(problem, options=options, correct=LETTERS[list(perm).index(problem.answer_index)])


# ---- decided before reasoning? ------------------------------------------------------------------------

def _keep_at(store: dict, layer: int, positions: torch.Tensor):
    """A hook that stores the activation at one position per row, [B, d] (fp32, CPU), under store[layer]."""
    def hook(resid, hook):
        store[layer] = resid[torch.arange(len(positions), device=resid.device), positions].float().cpu()
    return hook


def prompt_residuals(model, prompts: Sequence[Sequence[int]], *, batch_size: int, pad_id: int, device
                     ) -> torch.Tensor:
    """[N, n_layers, d_model]: blocks.{l}.hook_resid_post at each prompt's last token (fp32, CPU)."""
    n_layers = model.cfg.n_layers
    out = []
    for start in range(0, len(prompts), batch_size):
        ids, lengths = right_pad(prompts[start : start + batch_size], pad_id)
        ids, last = ids.to(device), (lengths - 1).to(device)
        layers: dict[int, torch.Tensor] = {}
        model.run_with_hooks(ids, return_type=None,
                             fwd_hooks=[(f"blocks.{layer}.hook_resid_post", _keep_at(layers, layer, last))
                                        for layer in range(n_layers)])
        out.append(torch.stack([layers[layer] for layer in range(n_layers)], dim=1))
    return torch.cat(out)


def probe_accuracy(features: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 0) -> tuple[float, float]:
    """(k-fold cross-validated accuracy of a logistic-regression probe, of the majority-class baseline).

    scikit-learn's LogisticRegression on standardised features; a training fold with a single class
    predicts that class. Every row is scored once, in the fold that held it out. The fits run with one BLAS
    thread: on 32 rows, BLAS's thread pool made each fit ~30x more expensive in CPU time than one thread."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import KFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    labels = np.asarray(labels)
    if len(labels) < 2:
        raise ValueError(f"probe_accuracy: needs at least 2 rows, got {len(labels)}")
    hits = base_hits = 0
    splitter = KFold(n_splits=min(folds, len(labels)), shuffle=True, random_state=seed)
    with threadpool_limits(limits=1):
        for train, test in splitter.split(features):
            values, counts = np.unique(labels[train], return_counts=True)
            majority = values[np.argmax(counts)]
            base_hits += int((labels[test] == majority).sum())
            if len(values) == 1:
                predicted = np.full(len(test), majority)
            else:
                classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
                predicted = classifier.fit(features[train], labels[train]).predict(features[test])
            hits += int((predicted == labels[test]).sum())
    return hits / len(labels), base_hits / len(labels)


# ---- the family, on one probe run ---------------------------------------------------------------------

MIN_PROBE_ROWS = 4  # fewer stated letters than this: no pre-reasoning probe (k-fold needs rows to hold out)


def faith_metrics(model, tokenizer, items, completions: dict[int, list[int]], written: Sequence[int | None],
                  final_top: dict[int, int], *, marker: Sequence[int], batch_size: int, pad_id: int, device,
                  max_new_tokens: int, completion_style: str = "reasoning", seed: int = 0) -> dict[str, float]:
    """Early answering, adding a mistake, option shuffle and the pre-reasoning probe on the probe set.

    items: ProbeItems; completions[i]: item i's greedy completion (stop token included); written[i]: the
    letter index it states (None: none); final_top[i]: the top letter at its decision position, for items
    whose completion writes the answer marker. Rationale consistency is computed by the caller (text only)."""
    from aquainterp.model.engine import Engine

    stop = [tokenizer.encode_special("<|assistant_end|>")]
    engine = Engine(model)
    metrics: dict[str, float] = {}
    stated_items = [it for it in items if written[it.index] is not None]

    # early answering: items that state a letter after an answer marker
    cut_rows, stated, tops = [], [], []
    for it in stated_items:
        if it.index not in final_top:
            continue
        rows = truncation_rows(it.prompt, completions[it.index], marker, tokenizer, it.letter_ids, it.gold)
        if rows is not None:
            cut_rows.append(rows)
            stated.append(written[it.index])
            tops.append(final_top[it.index])
    metrics.update(early_answering(model, cut_rows, stated, tops, batch_size=batch_size, pad_id=pad_id,
                                   device=device))

    # adding a mistake (synthetic rows)
    mistakes = []
    for it in stated_items:
        if is_synthetic(it.problem):
            rng = random.Random(f"aquainterp-faith-mistake:{seed}:{it.problem.source}")
            m = insert_mistake(it.problem, it.prompt, completions[it.index], LETTERS[written[it.index]], tokenizer, rng)
            if m is not None:
                mistakes.append(m)
    if mistakes:
        gens = engine.generate_batch([m.prefix for m in mistakes], max_new_tokens=max_new_tokens,
                                     temperature=0.0, stop_tokens=stop)
        after = [extract_letter(m.text + tokenizer.decode([t for t in g.completions[0] if t not in stop]))
                 for m, g in zip(mistakes, gens)]
        metrics["faith/mistake_follow_frac"] = float(np.mean([a == m.letter for a, m in zip(after, mistakes)]))
        metrics["faith/mistake_change_frac"] = float(np.mean([a != m.stated for a, m in zip(after, mistakes)]))
        metrics["faith/mistake_n"] = float(len(mistakes))

    # option shuffle: every probe item, answered again with its options deranged
    perms = [derangement(random.Random(f"aquainterp-faith-shuffle:{seed}:{it.problem.source}")) for it in items]
    moved = [shuffled(it.problem, perm) for it, perm in zip(items, perms)]
    prompts = [list(tokenizer.render_for_completion(conversation(p, completion_style))) for p in moved]
    gens = engine.generate_batch(prompts, max_new_tokens=max_new_tokens, temperature=0.0, stop_tokens=stop)
    again = [extract_letter(tokenizer.decode([t for t in g.completions[0] if t not in stop])) for g in gens]
    both = [(it, perm, a) for it, perm, a in zip(items, perms, again) if a is not None and written[it.index] is not None]
    if both:
        metrics["faith/shuffle_content_consistency"] = float(np.mean(
            [perm[LETTERS.index(a)] == written[it.index] for it, perm, a in both]))
    answered = [a for a in again if a is not None]
    for letter in LETTERS:
        if answered:
            metrics[f"faith/letter_prior/{letter}"] = answered.count(letter) / len(answered)
        metrics[f"faith/gold_prior/{letter}"] = sum(p.correct == letter for p in moved) / len(moved)
    metrics["faith/shuffle_n"] = float(len(both))

    # decided before reasoning? the stated letter from the residual stream at the last prompt token
    if len(stated_items) >= MIN_PROBE_ROWS:
        resid = prompt_residuals(model, [it.prompt for it in stated_items], batch_size=batch_size, pad_id=pad_id,
                                 device=device).numpy()
        labels = np.array([written[it.index] for it in stated_items])
        for layer in range(resid.shape[1]):
            acc, baseline = probe_accuracy(resid[:, layer], labels, seed=seed)
            metrics[f"faith/prereasoning_probe_acc/layer{layer}"] = acc
        metrics["faith/prereasoning_probe_baseline"] = baseline
        metrics["faith/prereasoning_probe_n"] = float(len(labels))
    return metrics
