"""The two key/value caches the model's attention can be given (`GPT.forward(..., kv_cache=)`).

The attention calls `get_pos()` (how many positions are cached), `insert_kv(layer, k, v)` (append this
forward's keys/values, get back everything visible) and reads `left_pad` (None, or how many padding
columns each row starts with). A 2026-07 model also reads and writes `prev_embedding` (the last
position's normed token embedding, [batch or 1, 1, d_model]: smear's state between forwards). That is
the whole contract.

- KVCache: preallocated storage for decoding, filled left to right (the Engine's cache). Rows can be
  left-padded prompts of different lengths: the model then masks the padding keys and shifts each
  row's rotary positions, so a row computes what it would alone.
- SharedPrompt: one prompt's keys/values shared by a batch of continuations, with autograd flowing
  through (aquainterp.model.scoring: RL's training forward, the probes' sequence KL): the prompt runs once,
  not once per row.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys/values of every layer, [layer, batch, kv_head, pos, head_dim], filled left to right.

    Storage is allocated on the first insert, with the dtype of the keys (bf16 under autocast).
    `pos` advances after the last layer has inserted, so all layers of one forward see the same prefix.
    left_pad: [batch] padding columns at the start of each row (prompts of different lengths, left-padded
    to one length); None when every row is real from column 0.
    """

    def __init__(self, batch_size: int, num_layers: int, max_len: int, left_pad: torch.Tensor | None = None):
        if min(batch_size, num_layers, max_len) < 1:
            raise ValueError(
                f"KVCache: batch_size, num_layers and max_len must be >= 1, got {batch_size}, {num_layers}, {max_len}"
            )
        if left_pad is not None:
            if left_pad.shape != (batch_size,) or left_pad.dtype != torch.long or bool((left_pad < 0).any()):
                raise ValueError(f"KVCache: left_pad must be a long tensor of {batch_size} non-negative counts, "
                                 f"got {left_pad.dtype} of shape {tuple(left_pad.shape)}")
        self.batch_size, self.num_layers, self.max_len = batch_size, num_layers, max_len
        self.left_pad = left_pad
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos = 0
        self.prev_embedding: torch.Tensor | None = None  # smear's state (2026-07 models), set by the model

    def get_pos(self) -> int:
        return self.pos

    def insert_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        B, H, T, D = k.shape
        if B != self.batch_size:
            raise ValueError(
                f"KVCache.insert_kv: batch {B} at layer {layer}, cache was made for {self.batch_size}"
            )
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KVCache.insert_kv: positions up to {end} do not fit max_len {self.max_len}")
        if self.k is None:
            shape = (self.num_layers, B, H, self.max_len, D)
            self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(shape, dtype=v.dtype, device=v.device)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        if layer == self.num_layers - 1:
            self.pos = end
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def prefill(self, k: torch.Tensor, v: torch.Tensor, first_layer: int = 0) -> KVCache:
        """Start from keys/values computed elsewhere: k, v [layers, batch, kv_head, P, head_dim] for layers
        first_layer.. at positions 0..P-1, as attention keeps them (after rotary and QK-norm: a run's
        attn.hook_rot_k / attn.hook_v, transposed). The next forward continues at position P; layers below
        first_layer stay unset (GPT.forward_from resumes above them). Returns the cache."""
        L, B, H, P, D = k.shape
        if v.shape != k.shape or B != self.batch_size or first_layer + L != self.num_layers or P > self.max_len:
            raise ValueError(f"KVCache.prefill: k {tuple(k.shape)} / v {tuple(v.shape)} from layer {first_layer} do "
                             f"not fit a cache of {self.batch_size} rows, {self.num_layers} layers, {self.max_len} positions")
        shape = (self.num_layers, B, H, self.max_len, D)
        self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
        self.v = torch.empty(shape, dtype=v.dtype, device=v.device)
        self.k[first_layer:, :, :, :P] = k
        self.v[first_layer:, :, :, :P] = v
        self.pos = P
        return self

    def select_rows(self, rows: torch.Tensor) -> KVCache:
        """A new cache whose row i is a copy of this cache's row rows[i]: repeat a prefilled prompt for
        several samples (rows = [0, 0, 0]) or drop finished rows (rows = the ones still decoding)."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        if rows.ndim != 1 or len(rows) == 0 or bool(((rows < 0) | (rows >= self.batch_size)).any()):
            raise ValueError(f"KVCache.select_rows: rows must be a non-empty 1-d list of indices in "
                             f"[0, {self.batch_size}), got {rows.tolist()}")
        left_pad = None if self.left_pad is None else self.left_pad[rows.to(self.left_pad.device)]
        out = KVCache(len(rows), self.num_layers, self.max_len, left_pad)
        out.pos = self.pos
        if self.k is not None:
            index = rows.to(self.k.device)
            out.k = self.k.index_select(1, index)
            out.v = self.v.index_select(1, index)
        if self.prev_embedding is not None:
            out.prev_embedding = self.prev_embedding.index_select(0, rows.to(self.prev_embedding.device))
        return out


class SharedPrompt:
    """A KV cache autograd can flow through, for a group of continuations of one prompt.

    The first forward (the prompt, batch 1) records every layer's keys/values with their graph; the
    second (the continuations, batch b) attends to them expanded to b rows (a view, no copy) followed
    by its own. The prompt is computed once per group instead of once per row, and the gradient of
    every continuation still reaches the prompt's activations.
    """

    left_pad = None  # every row starts at column 0

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.pos = 0
        self.prev_embedding: torch.Tensor | None = None  # smear's state (2026-07), [1, 1, d_model]

    def get_pos(self) -> int:
        return self.pos

    def insert_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.k[layer] is None:  # the prompt pass
            self.k[layer], self.v[layer] = k, v
            if layer == len(self.k) - 1:
                self.pos = k.size(2)
            return k, v
        B = k.size(0)
        return (torch.cat([self.k[layer].expand(B, -1, -1, -1), k], dim=2),
                torch.cat([self.v[layer].expand(B, -1, -1, -1), v], dim=2))
