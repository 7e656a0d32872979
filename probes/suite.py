"""ProbeSuite: run the selected probes on the fixed probe set and return one metrics dict.

What the RL loop does (training/rl.py; every `--probe-every` steps, flags `--probes` and `--probe-batch`):

    reference = freeze_reference(model, "cpu")            # once, before RL starts
    suite = ProbeSuite(model, tokenizer, probe_problems, reference_model=reference)
    ...
    if due(step, args.probe_every):
        metrics = suite.run(step, completions=rollouts)   # rollouts: (prompt, completion) pairs or Generations
        logger.log(metrics, step)
        suite.log_raw(logger, step)                       # histograms, hardest-questions table

Cost: one hooked policy forward per probe batch gives entropy, option mass, letter margins, counts and
the policy side of letter KL. The reference is frozen and the probe set fixed, so the reference's letter
logits are computed on the first run and reused (recomputed if the reference's tensors change in
place or are replaced); sequence KL's teacher-forced forwards (policy and reference, along the given
completions, each distinct prompt run once) are the only other per-run forwards. The hardest-questions table, whose greedy
completions cost more than everything else together, is built only on steps that are multiples of
`table_every` (sparser than the probe cadence), with completions for its `hardest_k` rows only.

Guarantees: everything runs under torch.no_grad in eval mode, on the probe set only; train/eval mode
and the RNG state are restored, and every hook is removed, so the next training step computes exactly
what it would have without the probe run. A suite with no probes selected registers no hooks and does
no work. The attention hooks (entropy, option mass) reduce each layer's pattern in the hook itself, so
memory stays at one layer's [B, H, T, T] pattern. A CPU reference (freeze_reference(model, "cpu"))
saves accelerator memory at the price of CPU forwards for the letter and sequence KL.

DDP: probes run on rank 0 only, on the unwrapped module (no collective is involved); `run` returns {}
on other ranks, so it is safe to call on all of them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from aquainterp.kv_cache import completion_logits
from aquainterp.tasks import LETTERS, conversation
from probes.counts import letter_counts
from probes.entropy import entropy_metrics, query_window, window_entropy
from probes.kl import kl_from_logits, kl_metrics, sequence_kl
from probes.margin import letter_margins, margin_metrics
from probes.option_mass import decision_rows, option_mass, option_mass_metrics, pick_option, span_mask
from probes.probe_set import ProbeItem, build_probe_set, right_pad
from probes.reference import unwrap

PROBE_NAMES = ("entropy", "option_mass", "margin", "kl", "counts")
ATTENTION_PROBES = ("entropy", "option_mass")


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


def _is_pattern(name: str) -> bool:
    return name.endswith("attn.hook_pattern")


def _leave_unchanged(tensor, hook):
    """A hook that reads nothing: it only switches the model to its explicit-softmax attention path."""
    return None


class _PatternReducer:
    """Forward hooks on hook_pattern that reduce each layer's pattern for one batch, at once, to the
    window entropies [B, H, W] and the decision row's option masses [B, H, 5] (then free it)."""

    def __init__(self, want: Sequence[str], n_layers: int, lengths: torch.Tensor, window: int, mask):
        self.want, self.lengths, self.mask = want, lengths, mask
        self.positions, self.valid = query_window(lengths, window)
        self.per_layer = {key: [None] * n_layers for key in ("entropy", "entropy_normalized", "option_mass")}

    def hook(self, layer: int):
        def reduce(pattern, hook):
            if "entropy" in self.want:
                ent, norm = window_entropy(pattern, self.positions, self.valid)
                self.per_layer["entropy"][layer] = ent
                self.per_layer["entropy_normalized"][layer] = norm
            if "option_mass" in self.want:
                rows = decision_rows(pattern, self.lengths)
                self.per_layer["option_mass"][layer] = option_mass(rows, self.mask)
        return reduce

    def stacked(self) -> dict[str, torch.Tensor]:
        """{name: [B, L, H, ...]} for the quantities that were computed."""
        return {k: torch.stack(v, dim=1) for k, v in self.per_layer.items() if v[0] is not None}


class ProbeSuite:
    def __init__(self, model, tokenizer, problems, probes: str | Sequence[str] = PROBE_NAMES,
                 reference_model=None, batch_size: int = 8, device=None, reference_device=None,
                 entropy_window: int = 8, kl_sequences: int = 8, max_new_tokens: int = 64,
                 completion_style: str = "reasoning", hardest_k: int = 5, table_completions: bool = True,
                 table_every: int = 50, progress: bool = True):
        """problems: the fixed probe set, MCProblems (or ProbeItems from build_probe_set, to share one).
        reference_model: the frozen pre-RL policy (freeze_reference), needed by "kl". kl_sequences: how
        many probe problems get a greedy completion for sequence KL when the caller passes none.
        hardest_k: rows of the hardest-questions table; table_completions: fill its completion column
        with greedy completions (generated for those rows if the run made none). table_every: the table is
        built on steps that are multiples of it (0 = never), so with the RL loop's probe_every it appears
        on probe steps that are also multiples of table_every. progress: a tqdm bar over the probe
        batches (shown when there are 4 or more)."""
        self.model = unwrap(model)
        self.tokenizer = tokenizer
        self.probes = parse_probes(probes)
        if batch_size < 1:
            raise ValueError(f"ProbeSuite: batch_size must be >= 1, got {batch_size}")
        if table_every < 0:
            raise ValueError(f"ProbeSuite: table_every must be >= 0 (0 = no hardest-questions table), "
                             f"got {table_every}")
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
            self.items = build_probe_set(tokenizer, problems) if self.probes else []
        self.pad_id = getattr(tokenizer, "bos_token_id", 0)
        self.last_raw: dict = {}
        self.last_seconds: dict[str, float] = {}
        self._batches: list[dict[str, torch.Tensor]] | None = None  # padded probe batches, built once
        self._order: torch.Tensor | None = None  # item index of each batched row
        self._reference_letters: torch.Tensor | None = None  # [N, 5], valid while _reference_key holds
        self._reference_key: tuple | None = None

    # ---- the run -----------------------------------------------------------------------------------

    def run(self, step: int, completions=None, table: bool | None = None) -> dict[str, float]:
        """Metrics for this step (design names). completions: sampled (prompt, completion) token pairs
        (or engine Generations) for sequence KL; None = greedy completions of the first `kl_sequences`
        probe problems. table: build the hardest-questions table (needs "margin"); None = on steps that
        are multiples of `table_every`. Raw arrays for histograms/heatmaps/tables land in `self.last_raw`."""
        if not self.probes or _rank() != 0:
            self.last_raw = {}
            return {}
        model = self.model
        was_training = model.training
        cuda = [self.device.index or 0] if self.device.type == "cuda" else []
        model.eval()
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=cuda):
                return self._measure(step, completions, due(step, self.table_every) if table is None else table)
        finally:
            model.train(was_training)

    def _measure(self, step, completions, table: bool) -> dict[str, float]:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        collected = self._forward_probe_set()
        timings["forward"] = time.perf_counter() - t0
        letters, gold = collected["letters"], collected["gold"]
        margin, gold_margin, predicted = letter_margins(letters, gold)
        metrics: dict[str, float] = {}
        raw: dict = {"step": step, "letter_logits": letters.numpy(), "gold": gold.numpy(),
                     "predicted": predicted.numpy()}
        if "entropy" in self.probes:
            ent, norm = collected["entropy"], collected["entropy_normalized"]  # [N, L, H, W]
            ent_lh, norm_lh = ent.nanmean(dim=(0, 3)), norm.nanmean(dim=(0, 3))
            metrics.update(entropy_metrics(ent_lh))
            metrics["attn/entropy_normalized_mean"] = float(norm_lh.mean())
            raw.update(entropy=ent_lh.numpy(), entropy_normalized=norm_lh.numpy(),
                       decision_entropy=ent[..., -1].mean(0).numpy())
        if "option_mass" in self.probes:
            mass = collected["option_mass"]  # [N, L, H, 5]
            metrics.update(option_mass_metrics(mass, gold, predicted))
            raw.update(option_mass=mass.sum(-1).mean(0).numpy(), option_mass_per_option=mass.numpy(),
                       gold_option_mass=pick_option(mass, gold).mean(0).numpy())
        if "margin" in self.probes:
            metrics.update(margin_metrics(margin, gold_margin))
            raw.update(letter_margin=margin.numpy(), letter_gold_margin=gold_margin.numpy())
        if "counts" in self.probes:
            metrics.update(letter_counts(predicted))
        if "kl" in self.probes:
            kl_letter = kl_from_logits(letters, collected["reference_letters"])
            metrics.update(kl_metrics(kl_letter, "kl_letter"))
            raw["kl_letter"] = kl_letter.numpy()
        generated: dict[int, list[int]] = {}
        if "kl" in self.probes:
            t1 = time.perf_counter()
            if completions is None:
                chosen = self.items[: self.kl_sequences]
                generated.update(self._greedy({it.index for it in chosen}))
                pairs = [(self._completion_prompt(it), generated[it.index]) for it in chosen]
            else:
                pairs = _completion_pairs(completions)
            timings["generate"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            kl_seq = self._sequence_kl(pairs)
            timings["kl_sequence"] = time.perf_counter() - t2
            metrics.update(kl_metrics(kl_seq, "kl_sequence"))
            raw["kl_sequence"] = kl_seq.numpy()
        if table and "margin" in self.probes and self.hardest_k > 0:
            t3 = time.perf_counter()
            raw["hardest"] = self._hardest_table(gold_margin, margin, predicted, generated)
            timings["hardest_table"] = time.perf_counter() - t3
        timings["total"] = time.perf_counter() - t0
        self.last_raw, self.last_seconds = raw, timings
        return metrics

    def _probe_batches(self) -> list[dict[str, torch.Tensor]]:
        """The fixed probe set as right-padded batches on the device: padded ids, lengths, letter ids,
        gold letters and (for option mass) the span masks. Built on the first run, reused after.
        Items are batched in order of length, so little compute goes to padding; `_in_probe_order`
        puts the concatenated results back in probe-set order."""
        if self._batches is None:
            self._batches = []
            order = sorted(range(len(self.items)), key=lambda i: len(self.items[i].ids))
            self._order = torch.tensor(order)
            for start in range(0, len(order), self.batch_size):
                batch = [self.items[i] for i in order[start : start + self.batch_size]]
                ids, lengths = right_pad([it.ids for it in batch], self.pad_id)
                entry = {"ids": ids.to(self.device), "lengths": lengths.to(self.device),
                         "letter_ids": torch.tensor([it.letter_ids for it in batch], device=self.device),
                         "gold": torch.tensor([it.gold for it in batch])}
                if "option_mass" in self.probes:
                    entry["mask"] = span_mask([it.spans for it in batch], ids.shape[1], device=self.device)
                self._batches.append(entry)
        return self._batches

    def _forward_probe_set(self) -> dict[str, torch.Tensor]:
        """One hooked policy forward per probe batch; hooks reduce each layer's pattern at once."""
        want_attn = [p for p in ATTENTION_PROBES if p in self.probes]
        n_layers = self.model.cfg.n_layers
        out: dict[str, list[torch.Tensor]] = {"letters": [], "gold": [], "entropy": [], "entropy_normalized": [],
                                              "option_mass": []}
        batches = self._probe_batches()
        for batch in tqdm(batches, desc="probes", leave=False, disable=not self.progress or len(batches) < 4):
            ids, lengths = batch["ids"], batch["lengths"]
            reducer = _PatternReducer(want_attn, n_layers, lengths, self.entropy_window, batch.get("mask"))
            if want_attn:
                hooks = [(f"blocks.{layer}.attn.hook_pattern", reducer.hook(layer)) for layer in range(n_layers)]
                logits = self.model.run_with_hooks(ids, fwd_hooks=hooks, logits_at=lengths - 1)
            else:
                logits = self.model(ids, logits_at=lengths - 1)  # [B, vocab]: the decision positions only
            out["letters"].append(logits.gather(-1, batch["letter_ids"]).float().cpu())
            del logits
            out["gold"].append(batch["gold"])
            for key, value in reducer.stacked().items():
                out[key].append(value.cpu())  # one device-to-host copy per batch, not one per layer
        collected = {k: self._in_probe_order(torch.cat(v)) for k, v in out.items() if v}
        if self.reference is not None:
            collected["reference_letters"] = self._reference_letter_logits(bool(want_attn))
        return collected

    def _reference_letter_logits(self, hooked: bool) -> torch.Tensor:
        """The frozen reference's letter logits on the probe set [N, 5]: computed once, then reused.

        The key is every reference tensor's identity and in-place version counter, so loading new
        weights or editing them in place recomputes (edits through `.data` bypass the counter: the
        reference must stay frozen, as freeze_reference makes it). `hooked`: use the same explicit
        attention path as the policy forward, so an unchanged policy gives a letter KL of exactly 0."""
        tensors = [*self.reference.parameters(), *self.reference.buffers()]
        key = (hooked, tuple((id(t), t._version) for t in tensors))
        if key != self._reference_key:
            ref_device = _device_of(self.reference)
            values = []
            for batch in self._probe_batches():
                ids, decision = batch["ids"].to(ref_device), batch["lengths"].to(ref_device) - 1
                if hooked:
                    logits = self.reference.run_with_hooks(ids, fwd_hooks=[(_is_pattern, _leave_unchanged)],
                                                           logits_at=decision)
                else:
                    logits = self.reference(ids, logits_at=decision)
                values.append(logits.gather(-1, batch["letter_ids"].to(ref_device)).float().cpu())
                del logits
            self._reference_letters, self._reference_key = self._in_probe_order(torch.cat(values)), key
        return self._reference_letters

    def _in_probe_order(self, batched: torch.Tensor) -> torch.Tensor:
        """Rows concatenated over _probe_batches (sorted by length) -> rows in probe-set order."""
        out = torch.empty_like(batched)
        out[self._order] = batched
        return out

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
        return list(self.tokenizer.render_for_completion(conversation(item.problem, self.completion_style)))

    def _greedy(self, indices) -> dict[int, list[int]]:
        """Greedy completions (temperature 0) of the given probe problems, stop token included, decoded
        together in one batch."""
        from aquainterp.engine import Engine  # the engine is only needed when we generate ourselves

        indices = sorted(indices)
        stop = [self.tokenizer.encode_special("<|assistant_end|>")]
        gens = Engine(self.model).generate_batch([self._completion_prompt(self.items[i]) for i in indices],
                                                 max_new_tokens=self.max_new_tokens, temperature=0.0,
                                                 stop_tokens=stop)
        return {index: list(gen.completions[0]) for index, gen in zip(indices, gens)}

    def _hardest_table(self, gold_margin, margin, predicted, generated) -> dict:
        """The hardest_k problems by signed gold margin (most confidently wrong first)."""
        order = torch.argsort(gold_margin)[: self.hardest_k].tolist()
        missing = {i for i in order if i not in generated}
        if missing and self.table_completions:
            generated.update(self._greedy(missing))
        rows = []
        for i in order:
            problem = self.items[i].problem
            options = " ".join(f"{letter}) {text}" for letter, text in zip(LETTERS, problem.options))
            rows.append([i, problem.question, options, LETTERS[int(predicted[i])], problem.correct,
                         round(float(gold_margin[i]), 4), round(float(margin[i]), 4),
                         self.tokenizer.decode(generated[i]) if i in generated else ""])
        columns = ["index", "question", "options", "model_letter", "gold_letter", "gold_margin", "margin",
                   "completion"]
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

    def attention_figures(self, prompt_indices: Sequence[int] = (0,), max_tokens: int = 48) -> dict:
        """Plotly figures: for each chosen probe prompt, a layer×head grid of attention patterns over its
        last `max_tokens` tokens; and, after a run, layer×head heatmaps of entropy and option mass."""
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
                    ids = torch.tensor([self.items[index].ids], device=self.device)
                    _, cache = model.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_pattern"))
                    patterns = torch.stack([cache[f"blocks.{layer}.attn.hook_pattern"][0]
                                            for layer in range(model.cfg.n_layers)]).float().cpu()
                    ids_list = self.items[index].ids
                    labels = ([self.tokenizer.token_str(t) for t in ids_list] if self.tokenizer is not None
                              else [str(t) for t in ids_list])
                    figures[f"attn/patterns/prompt{index}"] = pattern_grid(
                        patterns, labels, max_tokens, title=f"probe prompt {index}: attention patterns")
        finally:
            model.train(was_training)
        for key, title in (("entropy", "attention entropy (nats)"), ("option_mass", "attention mass on options"),
                           ("gold_option_mass", "attention mass on the gold option")):
            if key in self.last_raw:
                figures[f"attn/{key}_heatmap"] = matrix_heatmap(self.last_raw[key], title)
        return figures
