"""Activation patching: which layers, positions and heads carry the answer letter.

Words as TransformerLens uses them. A *clean* prompt ends at the decision position ("... Answer:"),
where the model should say the gold letter. Its *corrupted* twin moves the answer to another letter
(options permuted, or numbers changed) or blurs the question (Gaussian noise on its token
embeddings). The *metric* is the logit difference at the decision position between the clean gold
letter and the corrupted gold letter, averaged over pairs and normalised so that the corrupted run
scores 0 and the clean run 1.

Denoising runs the corrupted prompt and writes one clean activation in (how much does this piece
restore?); noising runs the clean prompt and writes one corrupted activation in (how much does
breaking this piece hurt?). Either way a patch is one batch row: the prompt is stacked once per
(cell, pair) and one hook per layer writes every row's own (position, head) at once, so a sweep over
L×T cells and N pairs costs ceil(L·T·N / batch_size) forwards, not L·T.

On our GPT a patched forward also skips what the patch cannot change. Everything below layer l and, by
causal attention, every position before p is the unpatched base run's: a patch at (l, p) resumes at
block l from the base run's cached residual stream, computes only positions p..T-1, and lets them
attend to the base run's cached keys/values for positions < p (the model's KV-cache path). Only the
decision position goes through the final norm and the unembedding. Cells are sorted by (layer,
position) so that one batch shares its start; a patch costs about (L-l)(T-p)/(L·T) of a full forward.
A patch whose clean and corrupted activations are bitwise equal (every position before the first token
where the prompts differ, and at layer 0 every position whose token agrees) is a no-op and is not run.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from aquainterp.model.gpt import GPT
from aquainterp.model.kv_cache import KVCache
from aquainterp.patching.pairs import PatchPair

DIRECTIONS = ("denoise", "noise")
ALIGNMENTS = ("start", "end")

# sweep name -> (hook name of layer l, axes of one cell). Axes follow transformer_lens.patching:
# get_act_patch_resid_pre is [layer, pos], get_act_patch_attn_head_out_all_pos is [layer, head],
# get_act_patch_attn_head_out_by_pos is [layer, pos, head].
SWEEPS: dict[str, tuple[str, tuple[str, ...]]] = {
    "resid_pre": ("blocks.{}.hook_resid_pre", ("layer", "pos")),
    "resid_mid": ("blocks.{}.hook_resid_mid", ("layer", "pos")),
    "resid_post": ("blocks.{}.hook_resid_post", ("layer", "pos")),
    "attn_out": ("blocks.{}.hook_attn_out", ("layer", "pos")),
    "mlp_out": ("blocks.{}.hook_mlp_out", ("layer", "pos")),
    "z": ("blocks.{}.attn.hook_z", ("layer", "head")),
    "z_pos": ("blocks.{}.attn.hook_z", ("layer", "pos", "head")),
}
# A pair enters the headline only when the model gets its clean prompt right (clean letter logit difference
# > 0) and the corruption moves it by at least this many logits (clean - corrupted): a normalised value
# divides by that gap, so below it the fraction restored is mostly noise.
MIN_GAP = 0.5


def screen_pairs(clean_ld: torch.Tensor, corrupted_ld: torch.Tensor, min_gap: float = MIN_GAP) -> list[tuple[int, str]]:
    """Pairs to leave out of a headline, each with why (in pair order): the model is wrong on the clean prompt
    (clean letter logit difference < 0: there is no right answer to restore), or the clean - corrupted gap is
    below `min_gap` logits (nothing to restore, or a fraction of a tiny number)."""
    out = []
    for i, (c, d) in enumerate(zip(clean_ld.tolist(), corrupted_ld.tolist())):
        if c < 0:
            out.append((i, f"wrong on the clean prompt (clean logit diff {c:+.2f} < 0)"))
        elif c - d < min_gap:
            out.append((i, f"clean - corrupted gap {c - d:+.2f} < {min_gap:g} logits"))
    return out


# Per-position hooks that come after block l's attention: at the last layer such a patch reaches only its
# own position, so off the decision position it changes nothing (the cell keeps the base value).
AFTER_ATTENTION = ("resid_mid", "resid_post", "attn_out", "mlp_out", "z_pos")


# ---------------------------------------------------------------------------------------------------
# Sweeps


@dataclass
class SweepResult:
    """One sweep: `normalized` [*cells] (0 = corrupted run, 1 = clean run) from the pair-mean logit
    difference, and the raw per-pair logit differences `logit_diff` [*cells, n_pairs]."""

    name: str
    direction: str
    axes: tuple[str, ...]
    normalized: torch.Tensor
    logit_diff: torch.Tensor


class Patcher:
    """Clean and corrupted runs of some pairs on one model, and batched patch sweeps over them.

    Prompts of different lengths are right-padded: attention is causal, so padding never reaches the
    decision position. With align="end" the position axis counts back from each pair's decision
    position (cell T-1 is every pair's last token), which suits prompts of varied length (AQuA).
    With reuse_prefix (our GPT only) a patched forward starts at the patch's layer and position from the
    base run's cache; reuse_prefix=False runs every patch from the first token (the reference path),
    which is also what a nanochat-2026-07 model always gets (see __init__).
    """

    def __init__(self, model, pairs: list[PatchPair], *, batch_size: int = 32, align: str = "start",
                 noise_scale: float = 3.0, seed: int = 0, progress: bool = True, reuse_prefix: bool = True,
                 skip_identical: bool = True, noise: torch.Tensor | None = None):
        if not pairs:
            raise ValueError("Patcher: no pairs to patch")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Patcher: batch_size must be a positive int, got {batch_size!r}")
        if align not in ALIGNMENTS:
            raise ValueError(f"Patcher: align must be one of {ALIGNMENTS}, got {align!r}")
        for name in ("n_layers", "n_heads", "d_model"):
            if not hasattr(getattr(model, "cfg", None), name):
                raise ValueError(f"Patcher: model.cfg has no {name!r}; expected a TransformerLens-style model")
        if model.training:
            model.eval()
        self.model, self.pairs = model, list(pairs)
        self.batch_size, self.align, self.progress = batch_size, align, progress
        self.skip_identical = skip_identical
        # The resumed forward (GPT.forward_from) refuses a 2026-07 model: its blocks also read x0, value
        # embeddings and backout, so its patches run the model's own forward from the first token (the
        # reference path, exact).
        self.reuse_prefix = reuse_prefix and isinstance(model, GPT) and not model.config.is_2026
        self.device = next(model.parameters()).device
        # Noise goes on the raw token embedding (before the embedding RMSNorm renormalises it): our GPT's
        # hook_embed_raw; a TransformerBridge's hook_embed is that raw embedding.
        self._embed_hook = "hook_embed_raw" if isinstance(model, GPT) else "hook_embed"
        self.n_layers, self.n_heads = model.cfg.n_layers, model.cfg.n_heads
        self.lengths = torch.tensor([len(p.clean_ids) for p in self.pairs], device=self.device)
        self.n_pos = int(self.lengths.max())
        self.tokens = {
            "clean": self._pad([p.clean_ids for p in self.pairs]),
            "corrupted": self._pad([p.corrupted_ids for p in self.pairs]),
        }
        self.decision_pos = self.lengths - 1
        # Only letter logits are ever read: the unembedding runs on these vocabulary rows alone.
        ids = sorted({t for p in self.pairs for t in (*p.letter_ids, p.corrupted_letter_id) if t is not None})
        self.head_ids = torch.tensor(ids, device=self.device)
        self._column = {t: j for j, t in enumerate(ids)}
        self._clean_column = torch.tensor([self._column[p.clean_letter_id] for p in self.pairs], device=self.device)
        if noise is not None:  # another Patcher's noise rows for these pairs (Patcher.subset): the same corrupted runs
            if tuple(noise.shape[:2]) != (len(self.pairs), self.n_pos):
                raise ValueError(f"Patcher: noise of shape {tuple(noise.shape)} does not fit {len(self.pairs)} pairs "
                                 f"of at most {self.n_pos} tokens")
            self.noise = noise.to(self.device)
        else:
            self.noise = self._make_noise(noise_scale, seed) if any(p.noise_span for p in self.pairs) else None
        self._cache: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
        self._prefix: dict[str, dict[str, torch.Tensor]] = {}
        self._baselines()

    @torch.no_grad()
    def _baselines(self):
        all_pairs = torch.arange(len(self.pairs), device=self.device)
        # Unpatched runs through the same final steps as the patched ones, so that a patch that restores
        # the whole final residual stream reads exactly 1 and one that changes nothing exactly 0.
        run = self._final_logits if self.reuse_prefix else lambda r, pairs: self._logits(r, pairs, [])
        # The foil letter: the corrupted gold letter, or (noise) the noisy run's best non-gold letter.
        corrupted_logits = run("corrupted", all_pairs)
        foil = []
        for i, p in enumerate(self.pairs):
            if p.corrupted_letter_id is not None:
                foil.append(self._column[p.corrupted_letter_id])
            else:
                others = [self._column[t] for t in p.letter_ids if t != p.clean_letter_id]
                foil.append(max(others, key=lambda j: corrupted_logits[i, j].item()))
        self._foil_column = torch.tensor(foil, device=self.device)
        self.foil_letter = self.head_ids[self._foil_column]  # token ids
        self.clean_ld = self._letter_diff(run("clean", all_pairs), all_pairs)
        self.corrupted_ld = self._letter_diff(corrupted_logits, all_pairs)
        self.scale = float(self.clean_ld.mean() - self.corrupted_ld.mean())
        if not math.isfinite(self.scale) or self.scale == 0.0:
            raise ValueError(
                f"Patcher: the clean and corrupted runs give the same mean letter logit difference "
                f"({self.clean_ld.mean():.3g} vs {self.corrupted_ld.mean():.3g}); there is nothing to restore "
                "(untrained model, or a corruption the model ignores)"
            )
        spread = float(torch.cat([self.clean_ld, self.corrupted_ld]).abs().mean())
        if abs(self.scale) < 1e-3 * spread:
            warnings.warn(f"Patcher: clean and corrupted mean logit differences are only {self.scale:.2g} apart "
                          f"(typical size {spread:.2g}); normalised values divide by that gap and will be noisy",
                          stacklevel=3)

    def subset(self, keep: list[int]) -> Patcher:
        """A Patcher of some of these pairs (indices into self.pairs, in order) with the same settings and, for
        noise corruption, the same noise rows: each kept pair's clean and corrupted runs are the ones seen here."""
        pairs = [self.pairs[i] for i in keep]
        n_pos = max(len(p.clean_ids) for p in pairs)
        noise = None if self.noise is None else self.noise[torch.tensor(keep, device=self.noise.device), :n_pos]
        return Patcher(self.model, pairs, batch_size=self.batch_size, align=self.align, progress=self.progress,
                       reuse_prefix=self.reuse_prefix, skip_identical=self.skip_identical, noise=noise)

    # -- runs ---------------------------------------------------------------------------------------

    def _pad(self, rows) -> torch.Tensor:
        out = torch.zeros(len(rows), self.n_pos, dtype=torch.long)
        for i, ids in enumerate(rows):
            out[i, : len(ids)] = torch.tensor(ids)
            out[i, len(ids):] = ids[-1]
        return out.to(self.device)

    @torch.no_grad()
    def _make_noise(self, scale: float, seed: int) -> torch.Tensor:
        """Gaussian noise [pairs, pos, d_model] on each pair's noise span, std = scale × the std of the
        clean prompts' token embeddings (ROME's recipe); fixed once so every run sees the same noise."""
        seen = {}
        save = lambda act, hook: seen.__setitem__("embed", act)
        self.model.run_with_hooks(self.tokens["clean"], fwd_hooks=[(self._embed_hook, save)])
        std = float(seen["embed"].float().std())
        generator = torch.Generator().manual_seed(seed)
        noise = torch.zeros(len(self.pairs), self.n_pos, self.model.cfg.d_model)
        for i, p in enumerate(self.pairs):
            if p.noise_span is not None:
                start, end = p.noise_span
                noise[i, start:end] = torch.randn(end - start, noise.shape[-1], generator=generator) * scale * std
        return noise.to(self.device, seen["embed"].dtype)

    def corruption_hooks(self, pair_index: torch.Tensor) -> list:
        """Hooks that make a run on the corrupted tokens the corrupted run (the embedding noise)."""
        if self.noise is None:
            return []
        noise = self.noise[pair_index]
        return [(self._embed_hook, lambda act, hook: act + noise[:, : act.shape[1]])]

    @torch.no_grad()
    def _logits(self, run: str, pair_index: torch.Tensor, patch_hooks: list) -> torch.Tensor:
        """Letter logits [rows, head_ids] at each row's decision position, for `run` of pairs `pair_index`.

        The final norm's output is cut to the decision position first, so the unembedding (the costliest
        matmul of a small model with a 65k vocabulary) runs on one position per row instead of T.
        Every forward has exactly batch_size rows (short ones are filled with copies of their first row,
        which no hook patches): CPU matmul kernels change with the row count, and equal shapes make an
        unpatched row and a baseline bitwise equal, so "no patch" reads exactly 0 and "all" exactly 1."""
        n = len(pair_index)
        if n > self.batch_size:
            return torch.cat([self._logits(run, pair_index[i: i + self.batch_size], patch_hooks)
                              for i in range(0, n, self.batch_size)])
        filled = torch.cat([pair_index, pair_index[:1].expand(self.batch_size - n)])
        decision = self.decision_pos[filled]
        rows = torch.arange(self.batch_size, device=self.device)
        keep = lambda act, hook: act[rows, decision].unsqueeze(1)
        hooks = (self.corruption_hooks(filled) if run == "corrupted" else []) + list(patch_hooks)
        logits = self.model.run_with_hooks(self.tokens[run][filled],
                                           fwd_hooks=hooks + [("ln_final.hook_normalized", keep)])
        return logits[:n, 0][:, self.head_ids]

    @torch.no_grad()
    def prefix(self, run: str) -> dict[str, torch.Tensor]:
        """`run`'s residual stream entering every block [layer, pair, pos, d_model], its attention
        keys/values [layer, pair, kv_head, pos, d_head] (after rotary and QK-norm, as the KV cache holds
        them) and its final residual stream [pair, pos, d_model]: what a patched forward resumes from
        (cached; one full forward per run)."""
        if run not in self._prefix:
            store = {}
            save = lambda act, hook: store.__setitem__(hook.name, act)
            names = [f"blocks.{layer}.{n}" for layer in range(self.n_layers)
                     for n in ("hook_resid_pre", "attn.hook_rot_k", "attn.hook_v")]
            names.append(f"blocks.{self.n_layers - 1}.hook_resid_post")
            everyone = torch.arange(len(self.pairs), device=self.device)
            hooks = (self.corruption_hooks(everyone) if run == "corrupted" else []) + [(n, save) for n in names]
            self.model.run_with_hooks(self.tokens[run], fwd_hooks=hooks)
            stack = lambda n: torch.stack([store[f"blocks.{layer}.{n}"] for layer in range(self.n_layers)])
            self._prefix[run] = {"resid": stack("hook_resid_pre"),
                                 "k": stack("attn.hook_rot_k").transpose(2, 3),
                                 "v": stack("attn.hook_v").transpose(2, 3),
                                 "final": store[f"blocks.{self.n_layers - 1}.hook_resid_post"]}
        return self._prefix[run]

    def _final_logits(self, run: str, pair_index: torch.Tensor) -> torch.Tensor:
        """Letter logits [rows, head_ids] of the unpatched `run` from its cached final residual stream."""
        final = self.prefix(run)["final"][pair_index, self.decision_pos[pair_index]]
        return torch.cat([self._head(final[i: i + self.batch_size]) for i in range(0, len(final), self.batch_size)])

    @torch.no_grad()
    def _resumed_logits(self, run: str, pair_index: torch.Tensor, patch_hooks: list, layer: int,
                        start: int, stop: int | None = None) -> torch.Tensor:
        """Letter logits [rows, head_ids] at each row's decision position from a forward of `run` that begins at
        block `layer` and position `start` (every row's patch lies at or after both): positions < start
        are the base run's keys/values in a KV cache, the residual stream entering block `layer` is the
        base run's, and the blocks' hooks (the patch among them) fire on positions start..T-1.

        Work that cannot reach the decision position is skipped, exactly:
        - `stop` (patches after block `layer`'s attention, all at positions < stop): that block runs
          positions start..stop-1 only, since its later positions never read the patched ones; its
          output at stop.. is the base run's;
        - the last block, when no patch is inside it (or the patch is its input, hook_resid_pre), runs
          its keys/values on every position but its query, attention output and MLP at the decision
          position only (GPT.forward_from with `at`)."""
        cached, model, n = self.prefix(run), self.model, len(pair_index)
        cache = KVCache(n, self.n_layers, self.n_pos).prefill(
            cached["k"][layer:, pair_index, :, :start], cached["v"][layer:, pair_index, :, :start], first_layer=layer)
        x = cached["resid"][layer, pair_index, start: stop]
        with model.hooks(fwd_hooks=patch_hooks):
            if stop is not None:  # the patched block on its window, then the base run's later positions
                x = model.forward_from(x, layer, cache, stop_layer=layer + 1)
                after = cached["resid"][layer + 1] if layer < self.n_layers - 1 else cached["final"]
                x = torch.cat([x, after[pair_index, stop:]], dim=1)
                layer += 1
            final = model.forward_from(x, layer, cache, at=self.decision_pos[pair_index] - start)
        return self._head(final)

    def _head(self, final: torch.Tensor) -> torch.Tensor:
        """Letter logits [rows, head_ids] from final residual vectors [rows, d_model] (GPT.logits_from_resid);
        rows are filled up to batch_size so that every call has the same shapes and an unpatched row reads
        exactly the unpatched value."""
        n = final.shape[0]
        filled = torch.cat([final, final[:1].expand(max(self.batch_size - n, 0), -1)])[:, None]
        return self.model.logits_from_resid(filled, self.head_ids)[:n, 0]

    def _letter_diff(self, logits: torch.Tensor, pair_index: torch.Tensor) -> torch.Tensor:
        """Clean gold minus foil letter logit, from letter logits [rows, head_ids]."""
        rows = torch.arange(len(pair_index), device=logits.device)
        clean, foil = self._clean_column.to(logits.device), self._foil_column.to(logits.device)
        return logits[rows, clean[pair_index]] - logits[rows, foil[pair_index]]

    def metric(self, logits: torch.Tensor) -> torch.Tensor:
        """The normalised metric of full logits [n_pairs, pos, vocab] (a scalar), the same pair order;
        what transformer_lens.patching's functions take as `patching_metric`."""
        rows = torch.arange(len(self.pairs), device=logits.device)
        at_decision = logits[rows, self.decision_pos.to(logits.device)][:, self.head_ids.to(logits.device)]
        ld = self._letter_diff(at_decision, rows)
        return (ld.mean() - self.corrupted_ld.mean()) / self.scale

    def normalize(self, logit_diff: torch.Tensor) -> torch.Tensor:
        """Per-pair logit differences [..., n_pairs] -> the normalised pair-mean metric [...]."""
        return (logit_diff.mean(-1) - self.corrupted_ld.mean()) / self.scale

    @torch.no_grad()
    def activations(self, run: str, hook_template: str) -> dict[int, torch.Tensor]:
        """`run`'s activations at `hook_template`.format(layer) for every layer and pair (cached)."""
        key = (run, hook_template)
        if key not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k[1] == hook_template}  # one kind at a time
            store = {}
            save = lambda act, hook: store.__setitem__(hook.name, act.detach().clone())
            names = [hook_template.format(layer) for layer in range(self.n_layers)]
            everyone = torch.arange(len(self.pairs), device=self.device)
            hooks = (self.corruption_hooks(everyone) if run == "corrupted" else []) + [(n, save) for n in names]
            self.model.run_with_hooks(self.tokens[run], fwd_hooks=hooks)
            self._cache[key] = {layer: store[name] for layer, name in enumerate(names)}
        return self._cache[key]

    # -- sweeps -------------------------------------------------------------------------------------

    def cells(self, name: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """Axes and shape of a sweep's cell grid."""
        if name not in SWEEPS:
            raise ValueError(f"unknown sweep {name!r}; choose from {sorted(SWEEPS)}")
        axes = SWEEPS[name][1]
        sizes = {"layer": self.n_layers, "pos": self.n_pos, "head": self.n_heads}
        return axes, tuple(sizes[a] for a in axes)

    def _rows(self, name: str):
        """Every (cell, pair) patch of a sweep as flat index, pair, layer, absolute position, head
        (-1 where the sweep has no such axis), minus patches that fall outside a pair's prompt and, when
        reusing prefixes, last-layer patches after attention off the decision position (both provably
        leave the decision position alone). Sorted by (layer, position) when reusing prefixes."""
        axes, shape = self.cells(name)
        n = len(self.pairs)
        grids = torch.meshgrid(*[torch.arange(s, device=self.device) for s in (*shape, n)], indexing="ij")
        cols = {axis: g.reshape(-1) for axis, g in zip((*axes, "pair"), grids)}
        pair = cols["pair"]
        none = torch.full_like(pair, -1)
        pos, head = cols.get("pos", none), cols.get("head", none)
        keep = torch.ones_like(pair, dtype=torch.bool)
        if "pos" in axes:
            if self.align == "end":
                pos = pos - (self.n_pos - self.lengths[pair])
            keep = (pos >= 0) & (pos < self.lengths[pair])
            if self.reuse_prefix and name in AFTER_ATTENTION:
                keep &= (cols["layer"] < self.n_layers - 1) | (pos == self.decision_pos[pair])
        flat = torch.arange(pair.numel(), device=self.device)
        rows = flat[keep], pair[keep], cols["layer"][keep], pos[keep], head[keep]
        if self.reuse_prefix:
            order = torch.argsort(rows[2] * (self.n_pos + 1) + rows[3], stable=True)
            rows = tuple(r[order] for r in rows)
        return rows

    def _patch_hook(self, source: torch.Tensor, rows, pair, pos, head, start: int = 0):
        """A hook writing source[pair, pos, head] into batch rows `rows` of the running activation,
        which holds positions start..T-1."""
        def hook(act, hook):
            act = act.clone()
            if pos[0] >= 0 and head[0] >= 0:
                act[rows, pos - start, head] = source[pair, pos, head].to(act.dtype)
            elif pos[0] >= 0:
                act[rows, pos - start] = source[pair, pos].to(act.dtype)
            elif head[0] >= 0:
                act[rows, :, head] = source[pair, :, head].to(act.dtype)
            else:
                act[rows] = source[pair].to(act.dtype)
            return act
        return hook

    @torch.no_grad()
    def sweep(self, name: str, direction: str = "denoise") -> SweepResult:
        """Patch every cell of sweep `name` for every pair; one forward per `batch_size` patches."""
        if direction not in DIRECTIONS:
            raise ValueError(f"sweep: direction must be one of {DIRECTIONS}, got {direction!r}")
        axes, shape = self.cells(name)
        template = SWEEPS[name][0]
        base, other = ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
        source = self.activations(other, template)
        base_ld = self.corrupted_ld if base == "corrupted" else self.clean_ld
        # Patches outside a pair's prompt (padding) cannot reach its decision position: base value.
        ld = base_ld.expand(*shape, len(self.pairs)).clone().reshape(-1)
        flat, pair, layer, pos, head = self._rows(name)
        if self.skip_identical:  # a patch that writes the value already there changes nothing: base value
            changed = self._changed(source, self.activations(base, template), pair, layer, pos, head)
            flat, pair, layer, pos, head = (r[changed] for r in (flat, pair, layer, pos, head))
        for sl in tqdm(self._batches(layer), desc=f"{direction} {name}", disable=not self.progress):
            b_pair, b_layer, b_pos, b_head = pair[sl], layer[sl], pos[sl], head[sl]
            if self.reuse_prefix:  # one layer per batch; resume at its first patched position
                lay, start = int(b_layer[0]), max(int(b_pos.min()), 0)
                rows = torch.arange(len(b_pair), device=self.device)
                hooks = [(template.format(lay), self._patch_hook(source[lay], rows, b_pair, b_pos, b_head, start))]
                stop = int(b_pos.max()) + 1 if name in AFTER_ATTENTION else None
                logits = self._resumed_logits(base, b_pair, hooks, lay, start, stop)
            else:
                hooks = []
                for lay in torch.unique(b_layer).tolist():
                    rows = torch.nonzero(b_layer == lay).squeeze(1)
                    hooks.append((template.format(lay),
                                  self._patch_hook(source[lay], rows, b_pair[rows], b_pos[rows], b_head[rows])))
                logits = self._logits(base, b_pair, hooks)
            ld[flat[sl]] = self._letter_diff(logits, b_pair).to(ld.dtype)
        ld = ld.reshape(*shape, len(self.pairs))
        return SweepResult(name, direction, axes, self.normalize(ld), ld)

    def _changed(self, source, base, pair, layer, pos, head) -> torch.Tensor:
        """Which patches (rows as _rows gives them) write a value that differs from the base run's: a
        patch whose source activation equals the base activation bitwise is a no-op, its cell keeps the
        unpatched value exactly. Positions before the first token where the two prompts differ are such
        no-ops at every layer (causal attention), and so are layer-0 residual patches at positions
        whose tokens agree."""
        out = torch.zeros_like(pair, dtype=torch.bool)
        for lay in torch.unique(layer).tolist():
            rows = torch.nonzero(layer == lay).squeeze(1)
            differs = (source[lay] != base[lay]).any(-1)  # [pairs, pos] or [pairs, pos, head]
            p, q, h = pair[rows], pos[rows], head[rows]
            if q[0] >= 0 and h[0] >= 0:
                out[rows] = differs[p, q, h]
            elif q[0] >= 0:
                out[rows] = differs[p, q]
            elif h[0] >= 0:
                out[rows] = differs[p, :, h].any(1)
            else:
                out[rows] = differs[p].flatten(1).any(1)
        return out

    def _batches(self, layer: torch.Tensor) -> list[slice]:
        """Slices of at most batch_size patches; with prefix reuse each stays inside one layer."""
        if not self.reuse_prefix:
            return [slice(i, i + self.batch_size) for i in range(0, len(layer), self.batch_size)]
        out, bounds = [], torch.cumsum(torch.bincount(layer, minlength=self.n_layers), 0).tolist()
        for lo, hi in zip([0, *bounds[:-1]], bounds):
            out += [slice(i, min(i + self.batch_size, hi)) for i in range(lo, hi, self.batch_size)]
        return out

    def position_labels(self, tokenizer=None) -> list[str]:
        """Unique labels for the position axis: "index: token" from the longest pair's clean prompt
        (an asterisk where pairs disagree at that position)."""
        longest = max(range(len(self.pairs)), key=lambda i: len(self.pairs[i].clean_ids))
        labels = []
        for k in range(self.n_pos):
            tokens = set()
            for p in self.pairs:
                j = k - (self.n_pos - len(p.clean_ids)) if self.align == "end" else k
                if 0 <= j < len(p.clean_ids):
                    tokens.add(p.clean_ids[j])
            j = k - (self.n_pos - len(self.pairs[longest].clean_ids)) if self.align == "end" else k
            token = self.pairs[longest].clean_ids[j]
            text = tokenizer.token_str(token) if tokenizer is not None else str(token)
            index = k - self.n_pos + 1 if self.align == "end" else k
            labels.append(f"{index}: {text}{'*' if len(tokens) > 1 else ''}")
        return labels

