"""Batched sampling with a KV cache, as nanochat's Engine: prefill the prompt once, copy its cache into
`num_samples` rows, then decode one token per step for all rows together.

Returns what RL needs: the sampled ids, whether a stop token ended each sample, and log p(token) under
the model at temperature 1 (the policy's own probabilities, whatever temperature was used to sample).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from aquainterp.model import GPT


class KVCache:
    """Keys/values of every layer, [layer, batch, kv_head, pos, head_dim], filled left to right.

    Storage is allocated on the first insert, with the dtype of the keys (bf16 under autocast).
    `pos` advances after the last layer has inserted, so all layers of one forward see the same prefix.
    """

    def __init__(self, batch_size: int, num_layers: int, max_len: int):
        if min(batch_size, num_layers, max_len) < 1:
            raise ValueError(
                f"KVCache: batch_size, num_layers and max_len must be >= 1, got {batch_size}, {num_layers}, {max_len}"
            )
        self.batch_size, self.num_layers, self.max_len = batch_size, num_layers, max_len
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos = 0

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

    def expand(self, batch_size: int) -> KVCache:
        """A new cache with this (batch 1) cache's contents copied into `batch_size` rows."""
        if self.batch_size != 1:
            raise ValueError(
                f"KVCache.expand: only a batch-1 cache can be expanded, this one has {self.batch_size}"
            )
        out = KVCache(batch_size, self.num_layers, self.max_len)
        out.pos = self.pos
        if self.k is not None:
            out.k = self.k.expand(-1, batch_size, -1, -1, -1).clone()
            out.v = self.v.expand(-1, batch_size, -1, -1, -1).clone()
        return out


@dataclass
class Generation:
    prompt: list[int]
    completions: list[list[int]]  # sampled tokens per sample, stop token included if hit
    logprobs: list[list[float]]  # log p(token) under the model at temperature 1, per token
    finished: list[bool]  # True when a stop token ended the sample

    def as_batch(self, pad_token: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) [num_samples, prompt + longest completion]: prompt + completion, right-padded with
        `pad_token`; mask is 1 on sampled tokens (what an RL loss trains on), 0 on prompt and padding."""
        width = len(self.prompt) + max((len(c) for c in self.completions), default=0)
        ids = torch.full((len(self.completions), width), pad_token, dtype=torch.long)
        mask = torch.zeros((len(self.completions), width), dtype=torch.long)
        for i, completion in enumerate(self.completions):
            row = self.prompt + completion
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, len(self.prompt) : len(row)] = 1
        return ids, mask


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
    """[B, V] logits → [B] token ids. temperature 0 is greedy; top_k keeps the k largest logits."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    if top_k is not None and top_k < logits.size(-1):
        values, indices = torch.topk(logits, top_k, dim=-1)
        probs = F.softmax(values / temperature, dim=-1)
        choice = torch.multinomial(probs, 1, generator=generator)
        return indices.gather(-1, choice).squeeze(-1)
    probs = F.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class Engine:
    def __init__(self, model: GPT):
        if not isinstance(model, GPT):
            raise TypeError(f"Engine(model): expected an aquainterp GPT, got {type(model).__name__}")
        self.model = model

    @torch.no_grad()
    def generate(
        self,
        prompt: list[int],
        num_samples: int = 1,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_k: int | None = None,
        stop_tokens: Collection[int] = (),
        seed: int | None = None,
    ) -> Generation:
        """Prefill the prompt once, clone the KV cache per sample; temperature 0 = greedy."""
        model = self.model
        vocab = model.config.vocab_size
        if not prompt or not all(isinstance(t, int) and 0 <= t < vocab for t in prompt):
            raise ValueError(f"Engine.generate: prompt must be a non-empty list of token ids in [0, {vocab})")
        if num_samples < 1:
            raise ValueError(f"Engine.generate: num_samples must be >= 1, got {num_samples}")
        if max_new_tokens < 0:
            raise ValueError(f"Engine.generate: max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"Engine.generate: temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"Engine.generate: top_k must be None or >= 1, got {top_k}")
        total = len(prompt) + max_new_tokens
        if total > model.rotary_len:
            raise ValueError(
                f"Engine.generate: prompt {len(prompt)} + max_new_tokens {max_new_tokens} exceeds the "
                f"model's rotary length {model.rotary_len}"
            )
        device = model.wte.weight.device
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device)
            generator.manual_seed(seed)
        stop = set(stop_tokens)

        prefill = KVCache(1, model.config.n_layer, max(total, 1))
        logits = model(torch.tensor([prompt], dtype=torch.long, device=device), kv_cache=prefill)[:, -1, :]
        cache = prefill.expand(num_samples)
        logits = logits.expand(num_samples, -1)

        completions = [[] for _ in range(num_samples)]
        logprobs = [[] for _ in range(num_samples)]
        finished = [False] * num_samples
        for step in range(max_new_tokens):
            next_ids = sample_next_token(logits, temperature, top_k, generator)
            token_logprobs = F.log_softmax(logits.float(), dim=-1).gather(-1, next_ids[:, None]).squeeze(-1)
            for i, (token, lp) in enumerate(zip(next_ids.tolist(), token_logprobs.tolist())):
                if finished[i]:
                    continue
                completions[i].append(token)
                logprobs[i].append(lp)
                finished[i] = token in stop
            if all(finished) or step == max_new_tokens - 1:
                break
            logits = model(next_ids[:, None], kv_cache=cache)[:, -1, :]
        return Generation(prompt=list(prompt), completions=completions, logprobs=logprobs, finished=finished)
