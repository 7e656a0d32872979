"""ProbeSuite: run the selected probes on the fixed probe set and return one metrics dict.

What the RL loop does (training/rl.py; every `--probe-every` steps, flags `--probes`, `--probe-batch`,
`--probe-decision`):

    reference = freeze_reference(model, "cpu")            # once, before RL starts
    suite = ProbeSuite(model, tokenizer, probe_problems, reference_model=reference)
    ...
    if due(step, args.probe_every):
        metrics = suite.run(step, completions=pairs, rollouts=rollouts)
        logger.log(metrics, step)
        suite.log_raw(logger, step)                       # histograms, hardest-questions table

Where the letter and attention probes read (`decision`):
- "completion" (default): the answer step of the policy's own completion. Each run decodes the probe
  set greedily (one batch, Engine.generate_batch), then one teacher-forced hooked forward per probe
  batch over prompt + completion cut right after its last answer marker: the position where a
  reasoning model picks its letter. Letter counts are the letters the completions state
  (extract_letter, as evaluation reads them); a completion without the marker is counted in
  rl/probe_no_answer_frac and left out of the letter and attention metrics, never scored.
  rl/probe_decision_agreement = how often the top letter logit there is the letter stated.
- "direct": right after "Answer:" in the prompt without any rationale (the decision of a model trained
  to answer in one token); counts are the top letter logits there.
With `rollouts` (this step's samples), the letter probes also run on them (prompt + sample, cut at
its marker): rl/rollout_letter_margin_*, rl/rollout_letter_gold_margin_*, rl/rollout_kl_letter_*.

Cost per run: the greedy decode of the probe set (completion decision), one hooked policy forward per
probe batch (entropy, option and completion mass, letter margins, logit lens, the policy side of
letter KL), the reference's letter logits on prefixes it has not seen (kept per prefix), sequence KL's
teacher-forced forwards (each distinct prompt run once), and a letters-only forward over at most
`rollout_letters` rollouts. The hardest-questions table is built on steps that are multiples of
`table_every`.

Guarantees: everything runs under torch.no_grad in eval mode, on the probe set only; train/eval mode
and the RNG state are restored, and every hook is removed, so the next training step computes exactly
what it would have without the probe run. A suite with no probes selected registers no hooks and does
no work. The attention hooks reduce each layer's pattern in the hook itself (probes.decision), so
memory stays at one layer's [B, H, T, T] pattern.

DDP: probes run on rank 0 only, on the unwrapped module (no collective is involved); `run` returns {}
on other ranks, so it is safe to call on all of them.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

from aquainterp.model.gpt import unwrap
from aquainterp.model.scoring import completion_logits
from aquainterp.tasks import LETTERS, conversation, extract_letter
from probes.consistency import classify, consistency_metrics
from probes.counts import letter_counts
from probes.decision import ATTENTION_PROBES, read_decisions, reference_letters
from probes.entropy import entropy_metrics
from probes.faith import faith_metrics
from probes.kl import kl_from_logits, kl_metrics, sequence_kl
from probes.logit_lens import gold_margins, lens_metrics
from probes.margin import letter_margins, margin_metrics
from probes.option_mass import completion_mass_metrics, option_mass_metrics, pick_option
from probes.probe_set import (
    ProbeItem,
    answer_marker,
    build_probe_set,
    completion_row,
    direct_row,
    last_token_row,
)

PROBE_NAMES = ("entropy", "option_mass", "margin", "kl", "counts", "logit_lens", "faith")
DECISIONS = ("completion", "direct", "completion_or_last")


def parse_probes(spec: str | Sequence[str]) -> tuple[str, ...]:
    """'entropy,kl' or a sequence -> validated names; '', 'none' and 'off' mean no probes."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    names = [n for n in names if n and n.lower() not in ("none", "off")]
    unknown = [n for n in names if n not in PROBE_NAMES]
    if unknown:
        raise ValueError(f"--probes: unknown probe(s) {unknown}; choose from {', '.join(PROBE_NAMES)}")
    return tuple(dict.fromkeys(names))


def due(step: int, every: int) -> bool:
    """True on the steps the probes run: every `every` steps starting at 0; never when every <= 0."""
    return every > 0 and step % every == 0


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _completion_pairs(completions) -> list[tuple[list[int], list[int]]]:
    """Accept (prompt, completion) pairs or engine Generations; errors name the bad entry."""
    pairs = []
    for i, entry in enumerate(completions):
        if hasattr(entry, "prompt") and hasattr(entry, "completions"):
            pairs.extend((list(entry.prompt), list(c)) for c in entry.completions)
            continue
        try:
            prompt, completion = entry
        except (TypeError, ValueError) as e:
            raise TypeError(f"ProbeSuite.run: completions[{i}] must be a (prompt_ids, completion_ids) pair "
                            f"or a Generation, got {type(entry).__name__}") from e
        pairs.append((list(prompt), list(completion)))
    for i, (prompt, completion) in enumerate(pairs):
        if not prompt or not completion:
            raise ValueError(f"ProbeSuite.run: completion pair {i} has an empty "
                             f"{'prompt' if not prompt else 'completion'}")
    return pairs


def _letter_index(letter: str | None) -> int | None:
    return None if letter is None else LETTERS.index(letter)


def _agreement(written, predicted) -> float | None:
    """Fraction of rows whose top letter logit is the letter the completion states (rows that state one)."""
    stated = [(w, p) for w, p in zip(written, predicted.tolist()) if w is not None]
    return sum(w == p for w, p in stated) / len(stated) if stated else None


def _rollout_triples(rollouts) -> list[tuple[list[int], list[int], object]]:
    """(prompt, completion, problem) for every non-empty sample of RL Rollouts (objects with .prompt,
    .completions and .problem) or of given triples."""
    triples = []
    for i, entry in enumerate(rollouts):
        if hasattr(entry, "completions") and hasattr(entry, "problem"):
            triples.extend((list(entry.prompt), list(c), entry.problem) for c in entry.completions if c)
            continue
        try:
            prompt, completion, problem = entry
        except (TypeError, ValueError) as e:
            raise TypeError(f"ProbeSuite.run: rollouts[{i}] must be a Rollout or a (prompt_ids, completion_ids, "
                            f"problem) triple, got {type(entry).__name__}") from e
        if completion:
            triples.append((list(prompt), list(completion), problem))
    return triples


class ProbeSuite:
    def __init__(self, model, tokenizer, problems, probes: str | Sequence[str] = PROBE_NAMES,
                 reference_model=None, batch_size: int = 8, device=None, reference_device=None,
                 entropy_window: int = 8, kl_sequences: int = 8, max_new_tokens: int = 64,
                 completion_style: str = "reasoning", hardest_k: int = 5, table_completions: bool = True,
                 table_every: int = 50, progress: bool = True, decision: str = "completion",
                 rollout_letters: int = 64, faith_every: int = 1, seed: int = 0):
        """problems: the fixed probe set, MCProblems (or ProbeItems from build_probe_set, to share one).
        reference_model: the frozen pre-RL policy (freeze_reference), needed by "kl". kl_sequences: how
        many probe problems get a greedy completion for sequence KL when the caller passes none.
        hardest_k: rows of the hardest-questions table; table_completions: fill its completion column
        with greedy completions (generated for those rows if the run made none). table_every: the table is
        built on steps that are multiples of it (0 = never), so with the RL loop's probe_every it appears
        on probe steps that are also multiples of table_every. progress: a tqdm bar over the probe
        batches (shown when there are 4 or more). decision: where the letter and attention probes read,
        "completion" (the answer step of the policy's own greedy completion; needs the tokenizer) or
        "direct" (right after "Answer:" in a prompt without rationale). rollout_letters: at most this
        many of a run's rollouts get the letter probes. faith_every: the "faith" family (probes.faith,
        probes.consistency) runs on steps that are multiples of it (default 1: every run; 0 = never).
        seed: the faith family's seeded choices (inserted mistakes, option permutations, probe folds)."""
        self.model = unwrap(model)
        self.tokenizer = tokenizer
        self.probes = parse_probes(probes)
        if batch_size < 1:
            raise ValueError(f"ProbeSuite: batch_size must be >= 1, got {batch_size}")
        if table_every < 0:
            raise ValueError(f"ProbeSuite: table_every must be >= 0 (0 = no hardest-questions table), "
                             f"got {table_every}")
        if decision not in DECISIONS:
            raise ValueError(f"ProbeSuite: decision must be one of {DECISIONS}, got {decision!r}")
        if faith_every < 0:
            raise ValueError(f"ProbeSuite: faith_every must be >= 0 (0 = no faith probes), got {faith_every}")
        if decision == "completion_or_last" and self.probes:
            self._stop = tokenizer.encode_special("<|assistant_end|>")
        if rollout_letters < 0:
            raise ValueError(f"ProbeSuite: rollout_letters must be >= 0, got {rollout_letters}")
        if decision != "direct" and self.probes and tokenizer is None:
            raise ValueError("ProbeSuite: decision='completion' generates and reads the policy's completions, "
                             "so it needs the tokenizer (or use decision='direct')")
        if "faith" in self.probes and tokenizer is None:
            raise ValueError("ProbeSuite: the 'faith' probes generate and read completions, so they need the tokenizer")
        self.decision, self.rollout_letters = decision, rollout_letters
        self._reads_completion = decision != "direct"  # "completion" or "completion_or_last"
        self.faith_every, self.seed = faith_every, seed
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else _device_of(self.model)
        self.reference = None
        if "kl" in self.probes:
            if reference_model is None:
                raise ValueError("ProbeSuite: the 'kl' probe needs reference_model "
                                 "(probes.reference.freeze_reference(model) before RL starts)")
            self.reference = unwrap(reference_model)
            if reference_device is not None and _device_of(self.reference) != torch.device(reference_device):
                self.reference.to(reference_device)
            self.reference.eval().requires_grad_(False)
        self.entropy_window = entropy_window
        self.kl_sequences = kl_sequences
        self.max_new_tokens = max_new_tokens
        self.completion_style = completion_style
        self.hardest_k = hardest_k
        self.table_completions = table_completions
        self.table_every = table_every
        self.progress = progress
        if problems and all(isinstance(p, ProbeItem) for p in problems):
            self.items: list[ProbeItem] = list(problems)
        else:
            self.items = build_probe_set(tokenizer, problems, completion_style) if self.probes else []
        self.pad_id = getattr(tokenizer, "bos_token_id", 0)
        self._marker = answer_marker(tokenizer) if tokenizer is not None and self.probes else []
        self._letter_ids = self.items[0].letter_ids if self.items else ()
        self.last_raw: dict = {}
        self.last_seconds: dict[str, float] = {}
        self._reference_cache: dict = {}  # DecisionRow -> reference letter logits [5], while the key holds
        self._reference_key: tuple | None = None
        self._last_prefixes: dict[int, tuple[int, ...]] = {}  # probe index -> decision prefix of the last run
        self._said: set[str] = set()  # reasons already printed by _say_what_is_empty

    # ---- the run -----------------------------------------------------------------------------------

    def run(self, step: int, completions=None, table: bool | None = None, rollouts=None,
            faith: bool | None = None) -> dict[str, float]:
        """Metrics for this step (design names). completions: sampled (prompt, completion) token pairs
        (or engine Generations) for sequence KL; None = greedy completions of the first `kl_sequences`
        probe problems. rollouts: this step's samples (RL Rollouts, or (prompt, completion, problem)
        triples) for the rollout letter metrics; None = none. table: build the hardest-questions table (needs "margin"); None = on steps that
        are multiples of `table_every`. faith: run the "faith" family (if selected); None = on steps that
        are multiples of `faith_every`. Raw arrays for histograms/heatmaps/tables land in `self.last_raw`."""
        if not self.probes or _rank() != 0:
            self.last_raw = {}
            return {}
        model = self.model
        was_training = model.training
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=cuda):
                run_faith = "faith" in self.probes and (due(step, self.faith_every) if faith is None
                                                        else faith and self.faith_every > 0)
                return self._measure(step, completions, rollouts,
                                     due(step, self.table_every) if table is None else table, run_faith)
        finally:
            model.train(was_training)

    def _measure(self, step, completions, rollouts, table: bool, run_faith: bool = False) -> dict[str, float]:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        n = len(self.items)
        generated: dict[int, list[int]] = {}
        if self._reads_completion:
            generated = self._greedy(range(n))
            texts = {i: self.tokenizer.decode(c) for i, c in generated.items()}
            written = [_letter_index(extract_letter(texts[i])) for i in range(n)]
            rows = [completion_row(it.prompt, generated[it.index], self._marker, it.letter_ids, it.gold,
                                   it.prompt_spans) for it in self.items]
            if self.decision == "completion_or_last":  # no answer marker: read at the completion's last token
                marked = [row is not None for row in rows]
                rows = [row if row is not None else last_token_row(it.prompt, generated[it.index], self._stop,
                                                                    it.letter_ids, it.gold, it.prompt_spans)
                        for row, it in zip(rows, self.items)]
        else:
            texts, written = {}, [None] * n
            rows = [direct_row(it) for it in self.items]
            if run_faith:  # the faith family reads the policy's own completions whatever the decision
                generated = self._greedy(range(n))
                texts = {i: self.tokenizer.decode(c) for i, c in generated.items()}
        timings["generate"] = time.perf_counter() - t0
        answered = [i for i, row in enumerate(rows) if row is not None]
        self._last_prefixes = {i: rows[i].ids for i in answered}
        metrics: dict[str, float] = {}
        raw: dict = {"step": step, "decision": self.decision, "answered": answered, "written": written,
                     "decision_ids": [rows[i].ids for i in answered]}
        if self.decision == "completion":
            metrics["rl/probe_no_answer_frac"] = 1.0 - len(answered) / n
        elif self.decision == "completion_or_last":  # every row is read; say how many at their last token
            metrics["rl/probe_no_answer_frac"] = 1.0 - sum(marked) / n
            metrics["rl/probe_last_token_frac"] = 1.0 - sum(marked) / n
            raw["read_at_last_token"] = [i for i, m in enumerate(marked) if not m]
        if answered:
            t1 = time.perf_counter()
            metrics.update(self._decision_metrics([rows[i] for i in answered], [written[i] for i in answered], raw))
            timings["forward"] = time.perf_counter() - t1
        if "counts" in self.probes:
            if self._reads_completion:  # the letters the completions state, as evaluation reads them
                stated = torch.tensor([w for w in written if w is not None], dtype=torch.long)
            else:
                stated = torch.as_tensor(raw.get("predicted", np.zeros(0)), dtype=torch.long)
            metrics.update(letter_counts(stated))
        if "kl" in self.probes:
            t2 = time.perf_counter()
            if completions is None:
                chosen = self.items[: self.kl_sequences]
                missing = {it.index for it in chosen} - set(generated)
                if missing:
                    generated.update(self._greedy(missing))
                pairs = [(self._completion_prompt(it), generated[it.index]) for it in chosen]
            else:
                pairs = _completion_pairs(completions)
            kl_seq = self._sequence_kl(pairs)
            timings["kl_sequence"] = time.perf_counter() - t2
            metrics.update(kl_metrics(kl_seq, "kl_sequence"))
            raw["kl_sequence"] = kl_seq.numpy()
        if rollouts and "margin" in self.probes:
            t3 = time.perf_counter()
            metrics.update(self._rollout_metrics(rollouts))
            timings["rollouts"] = time.perf_counter() - t3
        if run_faith:
            t5 = time.perf_counter()
            metrics.update(self._faith(generated, texts, raw))
            timings["faith"] = time.perf_counter() - t5
        if table and "margin" in self.probes and self.hardest_k > 0:
            t4 = time.perf_counter()
            raw["hardest"] = self._hardest_table(raw, generated, texts)
            timings["hardest_table"] = time.perf_counter() - t4
        timings["total"] = time.perf_counter() - t0
        self.last_raw, self.last_seconds = raw, timings
        self._say_what_is_empty(metrics, run_faith)
        return metrics

    def _decision_metrics(self, rows, written, raw) -> dict[str, float]:
        """Every letter and attention probe at the decision positions of `rows` (all answered)."""
        lens = "logit_lens" in self.probes
        collected = read_decisions(self.model, rows, self.probes, batch_size=self.batch_size, pad_id=self.pad_id,
                                   device=self.device, entropy_window=self.entropy_window, lens=lens,
                                   progress=self.progress)
        letters, gold = collected["letters"], collected["gold"]
        margin, gold_margin, predicted = letter_margins(letters, gold)
        # the option the policy chose: the letter its completion states, else (direct) the top letter logit
        chosen = torch.tensor([p if w is None else w for w, p in zip(written, predicted.tolist())])
        metrics: dict[str, float] = {}
        raw.update(letter_logits=letters.numpy(), gold=gold.numpy(), predicted=predicted.numpy(),
                   chosen=chosen.numpy(), letter_margin=margin.numpy(), letter_gold_margin=gold_margin.numpy())
        agreement = _agreement(written, predicted)
        if agreement is not None:
            metrics["rl/probe_decision_agreement"] = agreement
        if "margin" in self.probes:
            metrics.update(margin_metrics(margin, gold_margin))
        if "entropy" in self.probes:
            ent, norm = collected["entropy"], collected["entropy_normalized"]  # [N, L, H, W]
            ent_lh, norm_lh = ent.nanmean(dim=(0, 3)), norm.nanmean(dim=(0, 3))
            metrics.update(entropy_metrics(ent_lh))
            metrics["attn/entropy_normalized_mean"] = float(norm_lh.mean())
            raw.update(entropy=ent_lh.numpy(), entropy_normalized=norm_lh.numpy(),
                       decision_entropy=ent[..., -1].mean(0).numpy())
        if "option_mass" in self.probes:
            mass = collected["option_mass"]  # [N, L, H, 5]
            metrics.update(option_mass_metrics(mass, gold, chosen))
            raw.update(option_mass=mass.sum(-1).mean(0).numpy(), option_mass_per_option=mass.numpy(),
                       gold_option_mass=pick_option(mass, gold).mean(0).numpy())
            if self._reads_completion:
                comp = collected["completion_mass"]  # [N, L, H]
                metrics.update(completion_mass_metrics(comp))
                raw["completion_mass"] = comp.mean(0).numpy()
        if "kl" in self.probes:
            reference = self._reference_letter_logits(rows, any(p in self.probes for p in ATTENTION_PROBES))
            kl_letter = kl_from_logits(letters, reference)
            metrics.update(kl_metrics(kl_letter, "kl_letter"))
            raw["kl_letter"] = kl_letter.numpy()
        if lens:
            lens_margin = gold_margins(collected["lens_letters"], gold)  # [N, L]
            metrics.update(lens_metrics(lens_margin))
            raw["logit_lens_gold_margin"] = lens_margin.numpy()
        return metrics

    def _say_what_is_empty(self, metrics: dict, run_faith: bool) -> None:
        """One console line per probe family that measured nothing on this run, and why; each reason once
        per suite (the dashboards name the panels that stay empty)."""
        reasons = []
        letter_probes = [p for p in self.probes if p not in ("counts", "faith")]
        if letter_probes and metrics.get("rl/probe_no_answer_frac") == 1.0 and self.decision == "completion":
            reasons.append(f"{', '.join(letter_probes)}: no greedy completion of the {len(self.items)} probe "
                           "problems writes the answer marker 'Answer:', so there is no answer step to read "
                           "(rl/probe_no_answer_frac = 1.0); a policy SFT-trained on the reasoning or checked "
                           "style writes it; --probe-decision completion_or_last reads such completions at their "
                           "last token instead, --probe-decision direct the prompt-only position")
        if run_faith and "faith/mistake_n" not in metrics:
            reasons.append("faith mistake: no completion states a letter after a synthetic rationale with a final "
                           "'= value' (the inserted-mistake test needs both; AQuA-RAT rows are skipped)")
        if run_faith and "faith/early_answer_n" not in metrics:
            reasons.append("faith early answering: no completion states a letter after 'Answer:'")
        for reason in reasons:
            if reason not in self._said:
                self._said.add(reason)
                print(f"[probes] nothing measured by {reason}", file=sys.stderr, flush=True)

    def _faith(self, generated: dict[int, list[int]], texts: dict[int, str], raw: dict) -> dict[str, float]:
        """The faith family on the probe set's greedy completions: rationale consistency (text), then
        early answering, an inserted mistake, an option shuffle and the pre-reasoning probe (probes.faith)."""
        readings = [classify(it.problem, texts[it.index]) for it in self.items]
        raw["consistency"] = [r.case for r in readings]
        written = [None if r.stated is None else LETTERS.index(r.stated) for r in readings]
        if self._reads_completion:  # the decision read already has the top letter at each answer step
            final_top = dict(zip(raw["answered"], (int(p) for p in raw.get("predicted", []))))
        else:
            rows = {it.index: completion_row(it.prompt, generated[it.index], self._marker, it.letter_ids, it.gold)
                    for it in self.items}
            rows = {i: row for i, row in rows.items() if row is not None}
            final_top = {}
            if rows:
                letters = read_decisions(self.model, list(rows.values()), (), batch_size=self.batch_size,
                                         pad_id=self.pad_id, device=self.device)["letters"]
                final_top = dict(zip(rows, letters.argmax(-1).tolist()))
        metrics = consistency_metrics(readings)
        metrics.update(faith_metrics(self.model, self.tokenizer, self.items, generated, written, final_top,
                                     marker=self._marker, batch_size=self.batch_size, pad_id=self.pad_id,
                                     device=self.device, max_new_tokens=self.max_new_tokens,
                                     completion_style=self.completion_style, seed=self.seed))
        return metrics

    def _rollout_metrics(self, rollouts) -> dict[str, float]:
        """The letter probes on this step's sampled completions (prompt + sample, cut at its answer
        marker): rl/rollout_letter_margin_*, rl/rollout_letter_gold_margin_*, rl/rollout_kl_letter_*,
        rl/rollout_no_answer_frac, rl/rollout_decision_agreement. At most `rollout_letters` samples."""
        triples = _rollout_triples(rollouts)[: self.rollout_letters]
        if not triples:
            return {}
        letter_ids = self._letter_ids
        rows, written = [], []
        for prompt, completion, problem in triples:
            row = completion_row(prompt, completion, self._marker, letter_ids, LETTERS.index(problem.correct))
            if row is not None:
                rows.append(row)
                written.append(_letter_index(extract_letter(self.tokenizer.decode(completion))))
        metrics = {"rl/rollout_no_answer_frac": 1.0 - len(rows) / len(triples)}
        if not rows:
            return metrics
        collected = read_decisions(self.model, rows, (), batch_size=self.batch_size, pad_id=self.pad_id,
                                   device=self.device)
        margin, gold_margin, predicted = letter_margins(collected["letters"], collected["gold"])
        named = margin_metrics(margin, gold_margin)
        metrics.update({k.replace("rl/letter_", "rl/rollout_letter_"): v for k, v in named.items()})
        agreement = _agreement(written, predicted)
        if agreement is not None:
            metrics["rl/rollout_decision_agreement"] = agreement
        if self.reference is not None:
            reference = reference_letters(self.reference, rows, batch_size=self.batch_size, pad_id=self.pad_id,
                                          hooked=False)
            metrics.update(kl_metrics(kl_from_logits(collected["letters"], reference), "rollout_kl_letter"))
        return metrics

    def _reference_letter_logits(self, rows, hooked: bool) -> torch.Tensor:
        """The frozen reference's letter logits [N, 5] at the rows' decision positions.

        Kept per prefix, so a prefix the policy produced before (the direct prompts, an unchanged greedy
        completion) is not run again. The cache is dropped when any reference tensor is replaced or
        edited in place (identity and version counter; edits through `.data` bypass the counter: the
        reference must stay frozen, as freeze_reference makes it). `hooked`: use the explicit attention
        path the policy's hooked forward used, so an unchanged policy gives a letter KL of exactly 0."""
        tensors = [*self.reference.parameters(), *self.reference.buffers()]
        key = (hooked, tuple((id(t), t._version) for t in tensors))
        if key != self._reference_key:
            self._reference_cache, self._reference_key = {}, key
        todo = [row for row in dict.fromkeys(rows) if row not in self._reference_cache]
        if todo:
            values = reference_letters(self.reference, todo, batch_size=self.batch_size, pad_id=self.pad_id,
                                       hooked=hooked)
            self._reference_cache.update(zip(todo, values))
        return torch.stack([self._reference_cache[row] for row in rows])

    def _sequence_kl(self, pairs) -> torch.Tensor:
        """Exact full-vocab KL(policy || reference) per completion token, teacher forced, mean per pair.

        Pairs that share a prompt (RL's samples of one problem) run it once: completion_logits."""
        by_prompt: dict[tuple[int, ...], list[int]] = {}
        for i, (prompt, _) in enumerate(pairs):
            by_prompt.setdefault(tuple(prompt), []).append(i)
        values = torch.empty(len(pairs))
        for prompt, members in by_prompt.items():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                completions = [pairs[i][1] for i in chunk]
                policy, targets = completion_logits(self.model, list(prompt), completions, self.pad_id)
                reference, _ = completion_logits(self.reference, list(prompt), completions, self.pad_id)
                values[chunk] = sequence_kl(policy, reference.to(policy.device), targets >= 0).cpu()
                del policy, reference
        return values

    # ---- completions and the hardest-questions table -------------------------------------------------

    def _completion_prompt(self, item: ProbeItem) -> list[int]:
        if item.prompt:
            return list(item.prompt)
        return list(self.tokenizer.render_for_completion(conversation(item.problem, self.completion_style)))

    def _greedy(self, indices) -> dict[int, list[int]]:
        """Greedy completions (temperature 0) of the given probe problems, stop token included, decoded
        together in one batch."""
        from aquainterp.model.engine import Engine  # the engine is only needed when we generate ourselves

        indices = sorted(indices)
        stop = [self.tokenizer.encode_special("<|assistant_end|>")]
        gens = Engine(self.model).generate_batch([self._completion_prompt(self.items[i]) for i in indices],
                                                 max_new_tokens=self.max_new_tokens, temperature=0.0,
                                                 stop_tokens=stop)
        return {index: list(gen.completions[0]) for index, gen in zip(indices, gens)}

    def _hardest_table(self, raw, generated, texts) -> dict:
        """The hardest_k problems at the decision read: completions without an answer first, then by
        signed gold margin (most confidently wrong first). model_letter is the letter the completion
        states (completion decision) or the top letter logit (direct decision)."""
        answered = raw["answered"]
        gold_margin = dict(zip(answered, raw.get("letter_gold_margin", [])))
        margin = dict(zip(answered, raw.get("letter_margin", [])))
        predicted = dict(zip(answered, raw.get("predicted", [])))
        unanswered = [i for i in range(len(self.items)) if i not in gold_margin]
        order = (unanswered + sorted(gold_margin, key=lambda i: float(gold_margin[i])))[: self.hardest_k]
        if self.decision == "direct":
            missing = {i for i in order if i not in generated}
            if missing and self.table_completions:
                generated.update(self._greedy(missing))
            texts = {i: self.tokenizer.decode(c) for i, c in generated.items()}
        rows = []
        for i in order:
            problem = self.items[i].problem
            options = " ".join(f"{letter}) {text}" for letter, text in zip(LETTERS, problem.options))
            if self._reads_completion:
                letter = raw["written"][i]
            else:
                letter = int(predicted[i])
            text = texts.get(i, "")
            rows.append([i, problem.question, options, "" if letter is None else LETTERS[letter], problem.correct,
                         round(float(gold_margin[i]), 4) if i in gold_margin else None,
                         round(float(margin[i]), 4) if i in margin else None, text,
                         classify(problem, text).case if text else ""])
        columns = ["index", "question", "options", "model_letter", "gold_letter", "gold_margin", "margin",
                   "completion", "consistency"]
        return {"columns": columns, "rows": rows}

    # ---- logging and figures ---------------------------------------------------------------------------

    def log_raw(self, logger, step: int, figures: Sequence[int] = ()) -> None:
        """Histograms (margins, KL) and the hardest-questions table of the last run, through Logger;
        with `figures` (probe prompt indices), also the attention figures (W&B online, files offline)."""
        raw = self.last_raw
        for key in ("letter_margin", "letter_gold_margin", "kl_letter", "kl_sequence"):
            if key in raw:
                values = [float(v) for v in raw[key] if math.isfinite(float(v))]
                logger.log_histogram(f"rl/{key}", values, step)
        if "hardest" in raw:
            logger.log_table("rl/hardest_questions", raw["hardest"]["columns"], raw["hardest"]["rows"], step)
        if figures:
            for name, figure in self.attention_figures(prompt_indices=figures).items():
                logger.log_figure(name, figure, step)

    def _figure_prefix(self, index: int) -> tuple[int, ...]:
        if index in self._last_prefixes:
            return self._last_prefixes[index]
        item = self.items[index]
        return item.prompt if self._reads_completion and item.prompt else item.ids

    def attention_figures(self, prompt_indices: Sequence[int] = (0,), max_tokens: int = 48) -> dict:
        """Plotly figures: for each chosen probe prompt, a layer×head grid of attention patterns over its
        last `max_tokens` tokens up to the decision position of the last run (the completion cut at its
        answer marker; the prompt alone under the direct decision or when the completion wrote no
        marker); and, after a run, layer×head heatmaps of entropy, option and completion mass."""
        from probes.figures import matrix_heatmap, pattern_grid

        figures = {}
        model = self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                for index in prompt_indices:
                    if not 0 <= index < len(self.items):
                        raise IndexError(f"attention_figures: prompt index {index} outside the probe set "
                                         f"of {len(self.items)}")
                    ids_list = self._figure_prefix(index)
                    ids = torch.tensor([ids_list], device=self.device)
                    _, cache = model.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_pattern"))
                    patterns = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0]
                                            for layer in range(model.cfg.n_layers)]).float().cpu()
                    labels = ([self.tokenizer.token_str(t) for t in ids_list] if self.tokenizer is not None
                              else [str(t) for t in ids_list])
                    figures[f"attn/patterns/prompt{index}"] = pattern_grid(
                        patterns, labels, max_tokens, title=f"probe prompt {index}: attention patterns")
        finally:
            model.train(was_training)
        for key, title in (("entropy", "attention entropy (nats)"), ("option_mass", "attention mass on options"),
                           ("gold_option_mass", "attention mass on the gold option"),
                           ("completion_mass", "attention mass on the completion's own tokens")):
            if key in self.last_raw:
                figures[f"attn/{key}_heatmap"] = matrix_heatmap(self.last_raw[key], title)
        return figures
