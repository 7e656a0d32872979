"""nanochat's GPT, written as a TransformerLens HookedRootModule.

The math is nanochat's (gpt.py, the version without value embeddings): token embedding, a parameter-free
RMSNorm right after it, pre-norm blocks of rotary attention (rotary first, then QK-norm, GQA through
n_kv_head) and a ReLU² MLP, a final RMSNorm, an untied lm_head and logits soft-capped at 15 in fp32.
No biases, no learned norm weights.

What we add is the module tree: every intermediate activation passes through a `HookPoint` whose name is
the one TransformerLens users know (`blocks.3.attn.hook_pattern`, ...), so `run_with_cache`,
`run_with_hooks`, `hooks()` and `ActivationCache` work as on a HookedTransformer. Unused hooks cost one
identity module call each. Attention has two paths with the same numbers: the fused SDPA kernel, and an
explicit softmax(QKᵀ) taken only when someone has a hook on the scores or the pattern (the fused kernel
never materialises them).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.config import TransformerLensConfig
from transformer_lens.FactoredMatrix import FactoredMatrix

from aquainterp.model.hook_point import DirectCall, HookPoint
from aquainterp.model.lens import Embed, GPTCache, LensMixin, SoftcapOutput, Unembed, lens_config

if TYPE_CHECKING:
    from aquainterp.model.kv_cache import KVCache

SOFTCAP = 15.0
ROPE_BASE = 10000.0

# The two nanochat architectures (see GPTConfig.architecture and docs/nanochat.md).
ARCH_2025_10 = "nanochat-2025-10"  # the Oct-2025 speedrun GPT: what HF NanoChat and TL's bridge represent
ARCH_2026_07 = "nanochat-2026-07"  # nanochat HEAD 92d63d4: windows, value embeddings, smear, backout, λs
ARCHITECTURES = (ARCH_2025_10, ARCH_2026_07)
# Per-preset defaults of the fields left None: (rope_base, window_pattern, pad_vocab_size_to).
_PRESET_DEFAULTS = {ARCH_2025_10: (10000.0, None, 1), ARCH_2026_07: (100000.0, "SSSL", 64)}
QK_SCALE_2026 = 1.2  # 2026-07 multiplies q and k by this after QK-norm
VE_GATE_CHANNELS = 12  # value-embedding gate reads the first 12 channels of the block input
SMEAR_CHANNELS = 24  # smear gate reads the first 24 channels of the current token's embedding
_INT_FIELDS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA when < n_head)
    n_embd: int = 768
    # Which nanochat: "nanochat-2025-10" (default, so every existing config keeps its meaning) or
    # "nanochat-2026-07" (rotary base 1e5, q/k ×1.2, sliding windows, resid/x0 λs, value embeddings,
    # smear, backout, vocab padded to 64). Fields below left None take the preset's value.
    architecture: str = ARCH_2025_10
    rope_base: float | None = None
    window_pattern: str | None = None  # 2026-07: "S"/"L" per layer, tiled, last layer always L
    pad_vocab_size_to: int | None = None  # embedding/lm_head rows rounded up to a multiple; logits cropped
    # "bfloat16" reproduces nanochat 2c4473d (2026-01), which keeps its cos/sin tables in bf16 (logits move
    # by ~4e-3 against fp32 tables); "float32" (default) is exact and what HF NanoChat computes.
    rotary_dtype: str = "float32"
    mlp_hidden: int | None = None  # MLP width; None = 4 × n_embd (HF NanoChat's intermediate_size)
    norm_eps: float | None = None  # RMSNorm eps; None = torch's default (finfo eps), as nanochat

    def __post_init__(self):
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"GPTConfig.architecture must be one of {list(ARCHITECTURES)}, got {self.architecture!r}")
        rope_base, pattern, pad = _PRESET_DEFAULTS[self.architecture]
        if self.rope_base is None:
            self.rope_base = rope_base
        if self.window_pattern is None:
            self.window_pattern = pattern
        if self.pad_vocab_size_to is None:
            self.pad_vocab_size_to = pad
        if isinstance(self.rope_base, bool) or not isinstance(self.rope_base, (int, float)) or not self.rope_base > 1:
            raise ValueError(f"GPTConfig.rope_base must be a number > 1, got {self.rope_base!r}")
        self.rope_base = float(self.rope_base)
        if self.window_pattern is not None:
            if self.architecture == ARCH_2025_10:
                raise ValueError(f"GPTConfig.window_pattern: {ARCH_2025_10} has no sliding windows "
                                 f"(got {self.window_pattern!r}); use architecture {ARCH_2026_07!r}")
            if not isinstance(self.window_pattern, str) or not self.window_pattern or set(self.window_pattern.upper()) - set("SL"):
                raise ValueError(f"GPTConfig.window_pattern must be a non-empty string of S and L, got {self.window_pattern!r}")
            self.window_pattern = self.window_pattern.upper()
        for name in ("pad_vocab_size_to", "mlp_hidden"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.rotary_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"GPTConfig.rotary_dtype must be 'float32' or 'bfloat16', got {self.rotary_dtype!r}")
        if self.norm_eps is not None and (isinstance(self.norm_eps, bool) or not isinstance(self.norm_eps, (int, float))
                                          or not 0 < self.norm_eps < 1):
            raise ValueError(f"GPTConfig.norm_eps must be a number in (0, 1) or None, got {self.norm_eps!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"GPTConfig: n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}"
            )
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPTConfig: head_dim={self.n_embd // self.n_head} must be even for rotary")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        """Rows of wte/lm_head/value embeddings: vocab_size rounded up to pad_vocab_size_to."""
        return -(-self.vocab_size // self.pad_vocab_size_to) * self.pad_vocab_size_to

    @property
    def d_mlp(self) -> int:
        return 4 * self.n_embd if self.mlp_hidden is None else self.mlp_hidden

    @property
    def is_2026(self) -> bool:
        return self.architecture == ARCH_2026_07

    def window_sizes(self) -> list[int | None]:
        """Per layer, how many earlier positions a query may see besides itself (None = all).

        nanochat's rule: the pattern tiles the layers, L = sequence_len, S = ceil(sequence_len/4/128)·128,
        the last layer always L. A query at position i sees keys i-w .. i."""
        if self.window_pattern is None:
            return [None] * self.n_layer
        short = -(-self.sequence_len // 4 // 128) * 128
        sizes = [short if self.window_pattern[i % len(self.window_pattern)] == "S" else self.sequence_len
                 for i in range(self.n_layer)]
        sizes[-1] = self.sequence_len
        return sizes

    def has_value_embedding(self, layer: int) -> bool:
        """2026-07: value embeddings on alternating layers, the last one included."""
        return self.is_2026 and layer % 2 == (self.n_layer - 1) % 2

    @classmethod
    def from_depth(
        cls, depth, vocab_size=65536, sequence_len=2048, aspect_ratio=64, head_dim=128, n_kv_head=None,
        architecture=ARCH_2025_10,
    ):
        """nanochat's sizing rule: width = depth × aspect_ratio, heads of about head_dim channels."""
        if not isinstance(depth, int) or depth < 1:
            raise ValueError(f"GPTConfig.from_depth: depth must be a positive int, got {depth!r}")
        n_embd = depth * aspect_ratio
        n_head = max(1, math.ceil(n_embd / head_dim))
        if n_embd % n_head:
            raise ValueError(
                f"GPTConfig.from_depth: width {n_embd} (depth {depth} × aspect_ratio {aspect_ratio}) does not split "
                f"into {n_head} equal heads of about {head_dim}; pick a depth or aspect_ratio that does"
            )
        return cls(
            sequence_len=sequence_len,
            vocab_size=vocab_size,
            n_layer=depth,
            n_head=n_head,
            n_kv_head=n_head if n_kv_head is None else n_kv_head,
            n_embd=n_embd,
            architecture=architecture,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d) -> GPTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"GPTConfig.from_dict: unknown keys {unknown}; expected a subset of {sorted(known)}"
            )
        return cls(**d)


def _check_positions(what: str, positions, B: int, T: int) -> None:
    """One position per row (forward's logits_at, forward_from's at): an integer tensor [B] in [0, T)."""
    if (not isinstance(positions, torch.Tensor) or positions.shape != (B,) or positions.is_floating_point()
            or bool(((positions < 0) | (positions >= T)).any())):
        got = positions.tolist() if isinstance(positions, torch.Tensor) else positions
        raise ValueError(f"{what} must be an integer tensor of {B} positions in [0, {T}), got {got}")


def norm(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Parameter-free RMSNorm over the last dim; eps None = torch's default (as nanochat)."""
    return F.rms_norm(x, (x.size(-1),), eps=eps)


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of each head: nanochat's sign convention (HF NanoChat's rotate_half agrees).

    x is [B, T, H, D]; cos/sin are [1 or B, T, 1, D/2] in fp32 and are cast to x's dtype, as HF does.
    """
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos + x2 * sin, x1 * (-sin) + x2 * cos], dim=-1)


def rotary_tables(seq_len: int, head_dim: int, base: float = ROPE_BASE, device=None, dtype=torch.float32):
    """cos/sin tables [1, seq_len, 1, head_dim/2], computed in fp32 and stored in `dtype` (fp32 matches HF;
    nanochat 2c4473d stores bf16 ones, see GPTConfig.rotary_dtype)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_freq)
    return freqs.cos()[None, :, None, :].to(dtype), freqs.sin()[None, :, None, :].to(dtype)


def rotary_positions(left_pad: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """[B, length] rotary positions of columns start.. of left-padded rows: each row's first real token
    is position 0, as if it ran alone (padding columns get 0; they are masked)."""
    columns = torch.arange(start, start + length, device=left_pad.device)
    return (columns[None, :] - left_pad[:, None]).clamp_(min=0)


def causal_mask(start: int, Tq: int, Tk: int, device, left_pad: torch.Tensor | None = None,
                window: int | None = None) -> torch.Tensor:
    """Boolean mask (True = may attend) for queries at columns start.. over keys 0..Tk-1: [Tq, Tk],
    causal. With left_pad, [B, 1, Tq, Tk]: also no real token sees a padding key, and a padding query
    sees itself only, so its (unused) output stays finite instead of a softmax over nothing.
    window: a query at column i sees keys i-window .. i only (nanochat's sliding window)."""
    q_col = torch.arange(start, start + Tq, device=device)[:, None]
    k_col = torch.arange(Tk, device=device)[None, :]
    visible = k_col <= q_col
    if window is not None:
        visible = visible & (q_col - k_col <= window)
    if left_pad is None:
        return visible
    return ((visible & (k_col >= left_pad[:, None, None])) | (k_col == q_col))[:, None]


def _active(hook: HookPoint) -> bool:
    return bool(hook.fwd_hooks or hook.bwd_hooks)


class RMSNormPre(DirectCall):
    """Parameter-free RMSNorm with TL's `hook_scale` and `hook_normalized`.

    The fused F.rms_norm is used unless someone hooks `hook_scale`; then the scale is computed explicitly
    (sqrt(mean x² + eps), what TL caches for `apply_ln_to_stack`) and x is divided by it.
    """

    def __init__(self, eps: float | None = None):
        super().__init__()
        self.eps = eps  # None = torch's default, finfo(dtype).eps
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _active(self.hook_scale):
            eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
            scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + eps).sqrt())
            y = x / scale
        else:
            y = norm(x, self.eps)
        return self.hook_normalized(y)


class CausalSelfAttention(DirectCall):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.c_q = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.eps = config.norm_eps
        self.qk_scale = QK_SCALE_2026 if config.is_2026 else 1.0
        self.window = config.window_sizes()[layer_idx]  # None = full causal attention
        # 2026-07 value embeddings: v += 3·sigmoid(ve_gate(x[..., :12])) · value_embeds[layer](ids), per kv head
        self.ve_gate = (nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False)
                        if config.has_value_embedding(layer_idx) else None)
        self.hook_q = HookPoint()  # [batch, pos, head, d_head]
        self.hook_k = HookPoint()  # [batch, pos, kv_head, d_head]
        self.hook_v = HookPoint()  # [batch, pos, kv_head, d_head]: the values attention mixes (ve included)
        self.hook_ve_gate = HookPoint()  # 2026-07 value-embedding layers: [batch, pos, kv_head], in (0, 3)
        self.hook_ve = HookPoint()  # ... gate · value embedding, [batch, pos, kv_head, d_head], added to v
        self.hook_rot_q = HookPoint()  # after rotary and QK-norm (and ×1.2 in 2026-07): what the scores dot
        self.hook_rot_k = HookPoint()
        self.hook_attn_scores = HookPoint()  # [batch, head, query_pos, key_pos], scaled, masked with -inf
        self.hook_pattern = HookPoint()  # [batch, head, query_pos, key_pos]
        self.hook_z = HookPoint()  # [batch, pos, head, d_head]
        self.hook_result = HookPoint()  # cfg.use_attn_result only: [batch, pos, head, d_model], z_h @ W_O[h]
        self.lens_cfg = None  # GPT's TL cfg (the opt-in hook switches), set by GPT

    # TransformerLens weight views, TL's shapes: grouped kv heads repeated per query head (as TL's
    # GroupedQueryAttention; _W_K/_W_V are the kv heads themselves), zero biases (nanochat has none).
    @property
    def W_Q(self) -> torch.Tensor:  # [head, d_model, d_head]
        return self.c_q.weight.view(self.n_head, self.head_dim, -1).transpose(1, 2)

    @property
    def _W_K(self) -> torch.Tensor:  # [kv_head, d_model, d_head]
        return self.c_k.weight.view(self.n_kv_head, self.head_dim, -1).transpose(1, 2)

    @property
    def _W_V(self) -> torch.Tensor:  # [kv_head, d_model, d_head]
        return self.c_v.weight.view(self.n_kv_head, self.head_dim, -1).transpose(1, 2)

    @property
    def W_K(self) -> torch.Tensor:  # [head, d_model, d_head]
        return self._W_K.repeat_interleave(self.n_head // self.n_kv_head, dim=0)

    @property
    def W_V(self) -> torch.Tensor:  # [head, d_model, d_head]
        return self._W_V.repeat_interleave(self.n_head // self.n_kv_head, dim=0)

    @property
    def W_O(self) -> torch.Tensor:  # [head, d_head, d_model]
        return self.c_proj.weight.T.reshape(self.n_head, self.head_dim, -1)

    @property
    def b_Q(self) -> torch.Tensor:  # [head, d_head] zeros
        return self.c_q.weight.new_zeros(self.n_head, self.head_dim)

    b_K = b_V = b_Q

    @property
    def b_O(self) -> torch.Tensor:  # [d_model] zeros
        return self.c_proj.weight.new_zeros(self.c_proj.weight.shape[0])

    @property
    def QK(self) -> FactoredMatrix:  # [head, d_model, d_model]: W_Q W_Kᵀ (before rotary and QK-norm)
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:  # [head, d_model, d_model]: W_V W_O
        return FactoredMatrix(self.W_V, self.W_O)

    def _per_head_qkv(self, q_in, k_in, v_in):
        """q, k, v [B, T, heads, d_head] from per-head normed inputs [B, T, heads, d_model] (TL's split
        qkv input: q_in has n_head copies, k_in and v_in n_kv_head)."""
        if self.ve_gate is not None:
            raise ValueError(f"blocks.{self.layer_idx}: split q/k/v inputs (use_split_qkv_input, use_attn_in) are "
                             "not supported on a value-embedding layer (its gate reads the shared block input)")
        return (torch.einsum("bthm,hmd->bthd", q_in, self.W_Q),
                torch.einsum("bthm,hmd->bthd", k_in, self._W_K),
                torch.einsum("bthm,hmd->bthd", v_in, self._W_V))

    def needs_explicit_attention(self) -> bool:
        """True when a hook reads or writes scores/pattern, which the fused kernel never materialises."""
        return _active(self.hook_attn_scores) or _active(self.hook_pattern)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, ve: torch.Tensor | None = None):
        if isinstance(x, tuple):  # per-head inputs (cfg.use_split_qkv_input / use_attn_in), see Block
            q, k, v = self._per_head_qkv(*x)
            B, T = q.shape[:2]
        else:
            B, T, _ = x.shape
            q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
            k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
            v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q, k = self.hook_q(q), self.hook_k(k)
        if self.ve_gate is not None:
            if ve is None:
                raise ValueError(f"layer {self.layer_idx} has value embeddings: attention needs ve=")
            gate = self.hook_ve_gate(3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS])))
            v = v + self.hook_ve(gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim))
        v = self.hook_v(v)
        q = norm(apply_rotary_emb(q, cos, sin), self.eps)  # one at a time: the unrotated q is freed first
        k = norm(apply_rotary_emb(k, cos, sin), self.eps)
        if self.qk_scale != 1.0:
            q, k = q * self.qk_scale, k * self.qk_scale
        q, k = self.hook_rot_q(q), self.hook_rot_k(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, T, D]
        prefix, left_pad = 0, None
        if kv_cache is not None:
            prefix, left_pad = kv_cache.get_pos(), kv_cache.left_pad
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        # Boolean mask (True = may attend), only needed when queries start after cached keys or rows
        # are left-padded; otherwise the kernels' own causal mask is used.
        mask, causal = None, Tq == Tk and Tq > 1
        windowed = self.window is not None and self.window < Tk - 1  # some key is out of the window
        if left_pad is not None or (Tq != Tk and Tq > 1) or windowed:
            mask, causal = causal_mask(prefix, Tq, Tk, q.device, left_pad, self.window), False
        if self.needs_explicit_attention():
            y = self._explicit_attention(q, k, v, mask, causal)
        else:
            if windowed and Tq == 1:  # decoding: keys before the window are never read, so skip them (as nanochat)
                start = Tk - 1 - self.window
                k, v = k[:, :, start:], v[:, :, start:]
                mask = None if left_pad is None else mask[..., start:]
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=causal,
                enable_gqa=self.n_head != self.n_kv_head,
            )
        z = self.hook_z(y.transpose(1, 2))  # [B, T, H, D]
        if self.lens_cfg is not None and self.lens_cfg.use_attn_result:
            return self.hook_result(torch.einsum("bthd,hdm->bthm", z, self.W_O)).sum(-2)
        return self.c_proj(z.reshape(B, T, -1))

    def forward_at(self, x, cos, sin, kv_cache: KVCache | None, at: torch.Tensor) -> torch.Tensor:
        """Attention output [B, 1, d_model] at one query position per row, at [B] (into x's positions): keys and
        values of every position go into kv_cache (the query attends to them), the query runs at `at` only.
        The unhooked forward's ops on those rows (Block.forward_at); 2025-10 layers only (no value embedding,
        window or q/k scale, which GPT.forward_from refuses)."""
        B, T, _ = x.shape
        rows = torch.arange(B, device=x.device)
        k = norm(apply_rotary_emb(self.c_k(x).view(B, T, self.n_kv_head, self.head_dim), cos, sin), self.eps)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        prefix, left_pad = 0, None
        if kv_cache is not None:
            prefix, left_pad = kv_cache.get_pos(), kv_cache.left_pad
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        cos, sin = cos.expand(B, -1, -1, -1)[rows, at][:, None], sin.expand(B, -1, -1, -1)[rows, at][:, None]
        q = self.c_q(x[rows, at][:, None]).view(B, 1, self.n_head, self.head_dim)
        q = norm(apply_rotary_emb(q, cos, sin), self.eps).transpose(1, 2)
        k_col = torch.arange(k.size(2), device=x.device)[None, :]
        visible = k_col <= (prefix + at)[:, None]
        if left_pad is not None:
            visible = visible & (k_col >= left_pad[:, None])
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :],
                                           enable_gqa=self.n_head != self.n_kv_head)
        return self.c_proj(y.transpose(1, 2).reshape(B, 1, -1))

    def _explicit_attention(self, q, k, v, mask, causal):
        groups = self.n_head // self.n_kv_head
        if groups > 1:  # same head → kv-head map as SDPA's enable_gqa and HF's repeat_kv
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        Tq, Tk = scores.shape[-2:]
        if causal:
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        scores = self.hook_attn_scores(scores)
        pattern = self.hook_pattern(F.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype))
        return pattern @ v


class MLP(DirectCall):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.d_mlp, bias=False)
        self.c_proj = nn.Linear(config.d_mlp, config.n_embd, bias=False)
        self.hook_pre = HookPoint()  # [batch, pos, d_mlp]
        self.hook_post = HookPoint()  # after ReLU²

    @property
    def W_in(self) -> torch.Tensor:  # [d_model, d_mlp]
        return self.c_fc.weight.T

    @property
    def W_out(self) -> torch.Tensor:  # [d_mlp, d_model]
        return self.c_proj.weight.T

    @property
    def b_in(self) -> torch.Tensor:  # [d_mlp] zeros (no biases)
        return self.c_fc.weight.new_zeros(self.c_fc.weight.shape[0])

    @property
    def b_out(self) -> torch.Tensor:  # [d_model] zeros
        return self.c_proj.weight.new_zeros(self.c_proj.weight.shape[0])

    def forward(self, x):
        # one expression: each [B, T, 4·d_model] temporary is freed as soon as the next op has read it
        return self.c_proj(self.hook_post(F.relu(self.hook_pre(self.c_fc(x))).square()))


class Block(DirectCall):
    # TL's logit lens reads this: hook_resid_post is one [batch, pos, d_model] stream (whether the stream
    # entering ln_final is the last block's is GPT.residual_decomposition_problem's question).
    hook_out_is_single_residual_stream = True

    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        # TL's direct-path patching check reads this (transformer_lens 4.3, pinned): 1.0 = a head's write
        # reaches later heads as z @ W_O. nanochat-2026-07 multiplies the stream by resid_lambdas before every
        # block, so the write arrives scaled, and TL then refuses with this text as the reason.
        self.residual_contribution_scale: float | str = (
            "resid_lambdas before every later block (nanochat-2026-07)" if config.is_2026 else 1.0)
        self.ln1 = RMSNormPre(config.norm_eps)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln2 = RMSNormPre(config.norm_eps)
        self.mlp = MLP(config)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_out = HookPoint()
        self.hook_resid_mid = HookPoint()
        self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()
        # Opt-in TL hooks, fired only when GPT.cfg switches them on (TL's set_use_* methods):
        self.hook_q_input = HookPoint()  # use_split_qkv_input: [batch, pos, head, d_model] copies of resid_pre
        self.hook_k_input = HookPoint()  # ... [batch, pos, kv_head, d_model]
        self.hook_v_input = HookPoint()  # ... [batch, pos, kv_head, d_model]
        self.hook_attn_in = HookPoint()  # use_attn_in: [batch, pos, head, d_model], feeds q, k and v
        self.hook_mlp_in = HookPoint()  # use_hook_mlp_in: [batch, pos, d_model], what ln2 reads
        self.lens_cfg = None  # GPT's TL cfg, set by GPT

    @property
    def submodules(self) -> dict[str, nn.Module]:
        """The block's mixers by TL's names (what TL's attention-write checks look up)."""
        return {"attn": self.attn, "mlp": self.mlp}

    def forward(self, x, cos, sin, kv_cache=None, ve=None):
        x = self.hook_resid_pre(x)
        cfg = self.lens_cfg
        split = cfg is not None and (cfg.use_split_qkv_input or cfg.use_attn_in)
        attn_in = self._split_attn_input(x, cfg) if split else self.ln1(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.attn(attn_in, cos, sin, kv_cache, ve)))
        mlp_in = self.hook_mlp_in(x.clone()) if cfg is not None and cfg.use_hook_mlp_in else x  # clone: as TL, a hook
        # editing it in place must not change resid_mid
        x = self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.ln2(mlp_in))))
        return x

    def forward_at(self, x, cos, sin, kv_cache, at: torch.Tensor) -> torch.Tensor:
        """The block's output [B, d_model] at one position per row, at [B], when no hook inside it but
        hook_resid_pre is active (GPT.forward_from checks): keys/values of every position, the query, attention
        output and MLP at `at` only. Same numbers as forward at those rows."""
        x = self.hook_resid_pre(x)
        rows = torch.arange(x.size(0), device=x.device)
        out = x[rows, at][:, None] + self.attn.forward_at(self.ln1(x), cos, sin, kv_cache, at)
        return (out + self.mlp(self.ln2(out)))[:, 0]

    def watched_inside(self) -> bool:
        """True when a hook other than hook_resid_pre (the block's input) is active in this block."""
        return any(_active(m) for m in self.modules() if isinstance(m, HookPoint) and m is not self.hook_resid_pre)

    def _split_attn_input(self, x, cfg):
        """TL's split inputs: each head reads its own copy of resid_pre, normed by ln1 (so a hook can
        change one head's q, k or v input alone; ln1's hooks then fire per input, [batch, pos, head, ...])."""
        H, Hkv = self.attn.n_head, self.attn.n_kv_head

        def copies(n):
            return x.unsqueeze(2).expand(-1, -1, n, -1).clone()

        if cfg.use_split_qkv_input:
            q_in, k_in, v_in = self.hook_q_input(copies(H)), self.hook_k_input(copies(Hkv)), self.hook_v_input(copies(Hkv))
        else:
            if H != Hkv:
                raise ValueError("use_attn_in needs n_kv_head == n_head; use use_split_qkv_input on a GQA model")
            q_in = k_in = v_in = self.hook_attn_in(copies(H))
        return self.ln1(q_in), self.ln1(k_in), self.ln1(v_in)


class GPT(LensMixin, HookedRootModule):
    """nanochat GPT. Parameter names (checkpoint keys): wte, blocks.{l}.attn.c_q|c_k|c_v|c_proj,
    blocks.{l}.mlp.c_fc|c_proj, lm_head; 2026-07 adds resid_lambdas, x0_lambdas, smear_gate,
    smear_lambda, backout_lambda, value_embeds.{l} and blocks.{l}.attn.ve_gate (nanochat's own names)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"GPT(config): expected a GPTConfig, got {type(config).__name__}")
        self.config = config
        padded = config.padded_vocab_size  # rows past vocab_size are never read: logits are cropped
        self.wte = nn.Embedding(padded, config.n_embd)
        self.hook_tokens = HookPoint()  # cfg.use_hook_tokens only: the [batch, pos] ids being embedded
        self.hook_embed_raw = HookPoint()  # raw token embedding W_E[ids], before the embedding RMSNorm
        self.hook_embed = HookPoint()  # its RMSNorm: what enters the residual stream (= blocks.0.hook_resid_pre)
        self.blocks = nn.ModuleList([Block(config, i) for i in range(config.n_layer)])
        self.ln_final = RMSNormPre(config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, padded, bias=False)
        if config.is_2026:
            n = config.n_layer
            # x = resid_lambdas[l]·x + x0_lambdas[l]·x0 before block l (x0: the smeared, normed embedding)
            self.resid_lambdas = nn.Parameter(torch.ones(n))
            self.x0_lambdas = nn.Parameter(torch.zeros(n))
            # smear: x[t] += smear_lambda·sigmoid(smear_gate(x[t, :24]))·x[t-1] on the normed embedding
            self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
            # backout: before ln_final, subtract backout_lambda × the residual after block n_layer // 2
            self.backout_lambda = nn.Parameter(torch.full((1,), 0.2))
            kv_dim = config.n_kv_head * config.head_dim
            self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(padded, kv_dim) for i in range(n)
                                               if config.has_value_embedding(i)})
            self.hook_smear = HookPoint()  # [batch, pos, d_model]: what smear added (0 at a row's first token)
            self.hook_x0 = HookPoint()  # [batch, pos, d_model]: x0, the embedding every block blends back in
            self.hook_backout = HookPoint()  # [batch, pos, d_model]: what backout subtracts before ln_final
        # Rotary tables for up to 10× the training length (as nanochat), not saved in checkpoints, built
        # lazily: the first sequence_len positions now, more only when a forward reaches them
        # (_ensure_rotary), so a config's sequence_len costs no memory it does not use.
        self.rotary_len = config.sequence_len * 10
        cos, sin = rotary_tables(config.sequence_len, config.head_dim, config.rope_base, dtype=self._rotary_dtype)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.cfg = TransformerLensConfig(
            d_model=config.n_embd,
            d_head=config.head_dim,
            n_layers=config.n_layer,
            n_ctx=config.sequence_len,
            n_heads=config.n_head,
            d_mlp=config.d_mlp,
            d_vocab=config.vocab_size,
            n_key_value_heads=config.n_kv_head,
            device=str(self.wte.weight.device),
            positional_embedding_type="rotary",
            normalization_type="RMSPre",
            uses_rms_norm=True,
            final_rms=True,
            eps=torch.finfo(torch.float32).eps if config.norm_eps is None else config.norm_eps,
            act_fn="relu2",
            dtype=self.wte.weight.dtype,
        )
        # TransformerLens surface (aquainterp/model/lens.py): the cfg fields TL reads, its unembed module, and
        # the soft-cap as the output transform TL's logit lens applies after W_U.
        self.cfg = lens_config(self.cfg, config, SOFTCAP)
        for block in self.blocks:
            block.lens_cfg = block.attn.lens_cfg = self.cfg
        self.unembed = Unembed(self.lm_head, config.vocab_size)
        self.embed = Embed(self.wte, config.vocab_size)  # TL's model.embed (W_E); reads wte, owns nothing
        self.adapter = SoftcapOutput(SOFTCAP)
        self.setup()

    def _apply(self, fn, *args, **kwargs):
        # Keep the TL config's device/dtype in step with .to()/.cuda()/.half() (patching reads cfg.device).
        out = super()._apply(fn, *args, **kwargs)
        self.cfg.device = str(self.wte.weight.device)
        self.cfg.dtype = self.wte.weight.dtype
        return out

    @property
    def _rotary_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.config.rotary_dtype == "bfloat16" else torch.float32

    @property
    def W_E(self) -> torch.Tensor:  # [d_vocab, d_model] (padding rows cropped)
        return self.wte.weight[: self.config.vocab_size]

    @property
    def W_U(self) -> torch.Tensor:  # [d_model, d_vocab] (padding rows cropped)
        return self.lm_head.weight[: self.config.vocab_size].T

    @torch.no_grad()
    def init_weights(self):
        """nanochat's init: N(0, 1) embedding, Linear std 1/√fan_in·min(1, √(fan_out/fan_in)),
        zeros for lm_head and every block's output projections (attn.c_proj, mlp.c_proj).
        2026-07: nanochat HEAD's init instead (see _init_weights_2026)."""
        if self.config.is_2026:
            self._init_weights_2026()
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=1.0)
        nn.init.zeros_(self.lm_head.weight)
        for block in self.blocks:
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)
        self._reset_rotary()

    def _reset_rotary(self):
        cos, sin = rotary_tables(self.cos.size(1), self.config.head_dim, self.config.rope_base,
                                 device=self.cos.device, dtype=self._rotary_dtype)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def set_rotary_dtype(self, rotary_dtype: str) -> None:
        """Store the cos/sin tables as 'float32' (exact; what HF NanoChat computes) or 'bfloat16' (what
        nanochat 2c4473d keeps, GPTConfig.rotary_dtype)."""
        GPTConfig(**{**self.config.to_dict(), "rotary_dtype": rotary_dtype})  # validates
        self.config.rotary_dtype = rotary_dtype
        self.cos, self.sin = self.cos.to(self._rotary_dtype), self.sin.to(self._rotary_dtype)
        self._reset_rotary()

    def _ensure_rotary(self, n: int) -> None:
        """Grow the cos/sin tables to cover positions 0..n-1 (at most rotary_len; doubling, so a long
        generation rebuilds them O(log) times). Values per position do not depend on the table length."""
        have = self.cos.size(1)
        if n <= have:
            return
        size = min(self.rotary_len, max(n, 2 * have))
        with torch.inference_mode(False):  # grown during generation, the tables must still serve training
            self.cos, self.sin = rotary_tables(size, self.config.head_dim, self.config.rope_base,
                                               device=self.cos.device, dtype=self.cos.dtype)

    def _init_weights_2026(self):
        """nanochat 92d63d4's init_weights: wte N(0, 0.8), lm_head N(0, 0.001); q/k/v and value embeddings
        U(±s), c_fc U(±0.4·s) with s = √3/√n_embd; c_proj zeros; resid_lambdas 1.15 → 1.05 and x0_lambdas
        0.20 → 0.05 linearly over the layers; smear_lambda 0, backout_lambda 0.2; smear and ve gates U(0, 0.02)."""
        n_layer = self.config.n_layer
        s = 3**0.5 * self.config.n_embd**-0.5
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.8)
        nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.001)
        for block in self.blocks:
            for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                nn.init.uniform_(linear.weight, -s, s)
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            nn.init.zeros_(block.mlp.c_proj.weight)
            if block.attn.ve_gate is not None:
                nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        frac = torch.arange(n_layer, dtype=torch.float32) / max(n_layer - 1, 1)
        self.resid_lambdas.copy_(1.15 - 0.10 * frac)
        self.x0_lambdas.copy_(0.20 - 0.15 * frac)
        nn.init.zeros_(self.smear_lambda)
        nn.init.constant_(self.backout_lambda, 0.2)
        nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        for embedding in self.value_embeds.values():
            nn.init.uniform_(embedding.weight, -s, s)
        self._reset_rotary()

    def forward(self, idx, targets=None, kv_cache: KVCache | None = None, loss_reduction: str = "mean",
                logits_at: torch.Tensor | None = None, *, return_type: str | None = "logits",
                loss_per_token: bool = False, prepend_bos: bool | None = None, padding_side: str | None = None,
                stop_at_layer: int | None = None):
        """Logits [B, T, vocab] (fp32, soft-capped) or, with targets, nanochat's cross-entropy
        (targets == -1 ignored; loss_reduction='none' gives a flat [B*T] tensor, as nanochat).

        logits_at: [B] one position per row; returns only those positions' logits, [B, vocab]. For
        callers that read one position (a prompt's last token, the letter decision): at a 65k vocabulary
        the unembedding of every position costs more than all the blocks of a small model.

        TransformerLens's call style works too: idx may be a string or a list of strings (tokenized by
        the attached tokenizer as to_tokens does, with prepend_bos/padding_side; left padding is masked
        and each row keeps its own positions), and return_type is "logits" | "loss" (next-token
        cross-entropy, TL's lm_cross_entropy_loss, padding excluded; [B, T-1] with loss_per_token) |
        "both" (logits, loss) | None, as HookedTransformer.forward; model(tokens, "loss") is accepted.

        stop_at_layer (TL's): run blocks[:stop_at_layer] only (negative counts from the end, as a slice) and
        return the residual stream they leave, [B, T, d_model]: what blocks.{k}.hook_resid_pre reads (k =
        n_layer: what ln_final reads); later hooks do not fire. Not with targets, logits_at or a kv_cache."""
        if isinstance(targets, str):  # TL's positional return_type
            targets, return_type = None, targets
        if stop_at_layer is not None:  # (before string input, which may make its own cache for left padding)
            stop_at_layer = self._check_stop_at_layer(stop_at_layer, targets, logits_at, kv_cache)
        pad_mask = None
        if isinstance(idx, (str, list, tuple)):
            idx, pad_mask, kv_cache = self._text_input(idx, prepend_bos, padding_side, kv_cache)
        if return_type != "logits":
            self._check_return_type(return_type, targets, logits_at)
        if not isinstance(idx, torch.Tensor) or idx.ndim != 2 or idx.dtype not in (torch.long, torch.int32):
            got = (
                f"{idx.dtype} tensor of shape {tuple(idx.shape)}"
                if isinstance(idx, torch.Tensor)
                else type(idx)
            )
            raise ValueError(f"GPT.forward: idx must be an integer tensor [batch, seq], got {got}")
        B, T = idx.shape
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        cos, sin = self._rotary(T0, T, kv_cache, "forward")
        if logits_at is not None:
            if targets is not None:
                raise ValueError("GPT.forward: logits_at returns logits; it cannot be combined with targets")
            _check_positions("GPT.forward: logits_at", logits_at, B, T)
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(
                f"GPT.forward: targets shape {tuple(targets.shape)} != idx shape {tuple(idx.shape)}"
            )
        if self.cfg.use_hook_tokens:
            idx = self.hook_tokens(idx)
        x = self.hook_embed(norm(self.hook_embed_raw(self.wte(idx)), self.config.norm_eps))
        if self.config.is_2026:
            x = self._trunk_2026(idx, x, cos, sin, kv_cache, T0, stop_at_layer)
        else:
            for block in self.blocks[:stop_at_layer]:
                x = block(x, cos, sin, kv_cache)
        if stop_at_layer is not None:
            return x
        x = self.ln_final(x)
        if return_type is None:  # TL: run for the hooks only, no unembedding
            return None
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at.to(x.device)]  # [B, d_model]
        logits = self._unembed_normed(x)
        if targets is None:
            return logits if return_type == "logits" else self._lens_output(logits, idx, return_type, loss_per_token, pad_mask)
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)),
            targets.reshape(-1).long(),
            ignore_index=-1,
            reduction=loss_reduction,
        )

    def _rotary(self, T0: int, T: int, kv_cache, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for positions T0..T0+T-1 (per row when the cache's rows are left-padded, see KVCache)."""
        if T0 + T > self.rotary_len:
            raise ValueError(
                f"GPT.{caller}: positions {T0}..{T0 + T - 1} exceed the rotary table of {self.rotary_len} "
                f"(10 × sequence_len {self.config.sequence_len})"
            )
        self._ensure_rotary(T0 + T)
        if kv_cache is not None and kv_cache.left_pad is not None:
            positions = rotary_positions(kv_cache.left_pad, T0, T)
            return self.cos[0, positions], self.sin[0, positions]
        return self.cos[:, T0 : T0 + T], self.sin[:, T0 : T0 + T]

    def _unembed_normed(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """lm_head (or `weight`'s rows) on ln_final's output, soft-capped in fp32."""
        if weight is not None:
            logits = F.linear(x, weight) if weight.ndim == 2 else torch.einsum("b...d,bkd->b...k", x, weight)
        elif self.lm_head.weight.size(0) != self.config.vocab_size:
            # A padded vocabulary unembeds with the real rows only (nanochat crops the logits: same numbers).
            logits = F.linear(x, self.lm_head.weight[: self.config.vocab_size])
        else:
            logits = self.lm_head(x)
        # Soft-cap in fp32, in place where autograd allows: each [B, T, vocab] temporary costs as much as
        # the lm_head matmul on CPU (tanh_ saves its output for backward, so the last multiply copies then).
        logits = logits.float().div_(SOFTCAP).tanh_()
        return logits * SOFTCAP if logits.requires_grad else logits.mul_(SOFTCAP)

    def logits_from_resid(self, resid: torch.Tensor, token_ids: torch.Tensor | None = None, *,
                          normed: bool = False) -> torch.Tensor:
        """Logits as forward ends (ln_final, lm_head, fp32 soft-cap) from residual vectors resid [..., d_model]
        (the stream entering ln_final, or an earlier layer's for a logit lens), for these rows only.
        token_ids None: the whole vocabulary, [..., vocab]; [k]: those tokens, [..., k]; [B, k]: per batch row
        (resid [B, ..., d_model]), [B, ..., k]. A reader of a few positions or tokens (patching, the logit
        lens) pays for those alone: at a 65k vocabulary the unembedding outweighs a small model's blocks.
        normed=True: resid is ln_final's output already (what ln_final.hook_normalized holds)."""
        weight = self.lm_head.weight
        if token_ids is not None:
            if token_ids.ndim not in (1, 2) or token_ids.ndim == 2 and token_ids.size(0) != resid.size(0):
                raise ValueError(f"GPT.logits_from_resid: token_ids must be [k] or [{resid.size(0)}, k], "
                                 f"got {tuple(token_ids.shape)}")
            weight = weight[token_ids.to(weight.device)]
        x = resid.to(weight.dtype) if normed else self.ln_final(resid.to(weight.dtype))
        return self._unembed_normed(x, None if token_ids is None else weight)

    def forward_from(self, resid: torch.Tensor, layer: int, kv_cache: KVCache | None = None, *,
                     stop_layer: int | None = None, at: torch.Tensor | None = None) -> torch.Tensor:
        """Resume the forward at block `layer`. resid [B, T, d_model] is the residual stream entering it (what
        blocks.{layer}.hook_resid_pre reads) at positions kv_cache.get_pos().. (0 without a cache); kv_cache
        holds the earlier positions' keys/values of layers layer.. (KVCache.prefill). Runs blocks
        layer..stop_layer-1 (default: to the end; hooks fire as in forward) and returns their output
        [B, T, d_model], or with `at` ([B] positions into resid) that output at those positions, [B, d_model];
        a last block with no hook inside it but its input then computes its query, attention output and MLP
        there alone. After the last block this is what ln_final reads (logits_from_resid).
        Activation patching resumes every patch here instead of re-running the unchanged prefix. A
        nanochat-2026-07 model is refused: its blocks also read x0, value embeddings and the backout residual."""
        if self.config.is_2026:
            raise ValueError(f"GPT.forward_from: a {ARCH_2026_07} block also reads x0 (resid/x0 lambdas), value "
                             "embeddings and, before ln_final, the mid-stack residual (backout), none of which a "
                             "residual stream carries; run GPT.forward from the first token")
        n = self.config.n_layer
        stop_layer = n if stop_layer is None else stop_layer
        if not 0 <= layer <= stop_layer <= n:
            raise ValueError(f"GPT.forward_from: need 0 <= layer <= stop_layer <= {n}, got {layer}, {stop_layer}")
        B, T, _ = resid.shape
        if at is not None:
            _check_positions("GPT.forward_from: at", at, B, T)
        x = resid
        if layer < stop_layer:
            cos, sin = self._rotary(0 if kv_cache is None else kv_cache.get_pos(), T, kv_cache, "forward_from")
            last = self.blocks[stop_layer - 1]
            one_position = at is not None and not last.watched_inside()
            for block in self.blocks[layer: stop_layer - 1 if one_position else stop_layer]:
                x = block(x, cos, sin, kv_cache)
            if one_position:
                return last.forward_at(x, cos, sin, kv_cache, at)
        return x if at is None else x[torch.arange(B, device=x.device), at]

    def _smear(self, x: torch.Tensor, kv_cache, T0: int) -> torch.Tensor:
        """2026-07 smear on the normed embedding x [B, T, C]: x[t] += λ·sigmoid(smear_gate(x[t, :24]))·x[t-1].

        A row's first token has no predecessor (nothing added). While decoding, the predecessor of a
        forward's first token is the previous forward's last embedding, kept as kv_cache.prev_embedding."""
        B, T, C = x.shape
        prev0 = None
        if kv_cache is not None and T0 > 0:
            prev0 = getattr(kv_cache, "prev_embedding", None)
            if prev0 is None:
                raise ValueError(f"GPT.forward: {type(kv_cache).__name__} holds {T0} positions but no "
                                 "prev_embedding, which smear needs to continue a 2026-07 sequence")
            prev0 = prev0.expand(B, 1, C).to(x.dtype)
        if kv_cache is not None:
            kv_cache.prev_embedding = x[:, -1:]
        left_pad = None if kv_cache is None else kv_cache.left_pad
        if prev0 is None and left_pad is None and not _active(self.hook_smear):  # training's case: as nanochat
            gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
            return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)
        prev = torch.cat([prev0 if prev0 is not None else x.new_zeros(B, 1, C), x[:, :-1]], dim=1)
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        if prev0 is None or left_pad is not None:  # no predecessor: column 0, and a row's left padding
            column = torch.arange(T0, T0 + T, device=x.device)
            first = torch.zeros(B, device=x.device, dtype=torch.long) if left_pad is None else left_pad
            gate = gate * (column[None, :] > first[:, None]).unsqueeze(-1).to(x.dtype)
        return x + self.hook_smear(gate * prev)

    def _check_stop_at_layer(self, stop_at_layer, targets, logits_at, kv_cache) -> int:
        """forward's stop_at_layer as a block count in [0, n_layer] (negative: from the end, as TL slices)."""
        n = self.config.n_layer
        if isinstance(stop_at_layer, bool) or not isinstance(stop_at_layer, int) or not -n <= stop_at_layer <= n:
            raise ValueError(f"GPT.forward: stop_at_layer must be an int in [-{n}, {n}] (blocks[:stop_at_layer] "
                             f"run), got {stop_at_layer!r}")
        for name, value in (("targets", targets), ("logits_at", logits_at), ("kv_cache", kv_cache)):
            if value is not None:
                raise ValueError(f"GPT.forward: stop_at_layer returns a residual stream part-way up; it cannot be "
                                 f"combined with {name}")
        return stop_at_layer % n if stop_at_layer < 0 else stop_at_layer

    def _trunk_2026(self, idx, x, cos, sin, kv_cache, T0: int, stop_at_layer: int | None = None) -> torch.Tensor:
        """Smear, then before each block x = resid_lambdas[l]·x + x0_lambdas[l]·x0 (blocks.{l}.hook_resid_pre
        is after this mix), value embeddings into the attention of their layers, and backout. stop_at_layer
        k < n_layer: the stream block k reads (after its mix, before the block)."""
        x = self.hook_x0(self._smear(x, kv_cache, T0))
        x0, x_mid = x, None
        mid = self.config.n_layer // 2
        for i, block in enumerate(self.blocks):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            if i == stop_at_layer:
                return x
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if block.attn.ve_gate is not None else None
            x = block(x, cos, sin, kv_cache, ve)
            if i == mid:
                x_mid = x
        return x - self.hook_backout(self.backout_lambda.to(x.dtype) * x_mid)

    def run_with_cache(self, *model_args, **kwargs) -> tuple[torch.Tensor, ActivationCache]:
        """HookedRootModule.run_with_cache, with the dict wrapped as an ActivationCache."""
        out, cache_dict = super().run_with_cache(*model_args, **kwargs)
        return out, GPTCache(cache_dict, self, has_batch_dim=not kwargs.get("remove_batch_dim", False))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def load_state_dict_checked(
        self, state_dict: dict[str, torch.Tensor], source: str = "state dict"
    ) -> None:
        """Strict load that names every missing/unexpected tensor and each shape mismatch (both shapes).

        A torch.compile prefix `_orig_mod.` is stripped first."""
        state_dict = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
        own = self.state_dict()
        problems = []
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing:
            problems.append(f"missing tensors {missing}")
        if unexpected:
            problems.append(f"unexpected tensors {unexpected}")
        for name in sorted(set(own) & set(state_dict)):
            if tuple(own[name].shape) != tuple(state_dict[name].shape):
                problems.append(
                    f"tensor {name!r}: {source} has shape {tuple(state_dict[name].shape)}, "
                    f"model expects {tuple(own[name].shape)}"
                )
        if problems:
            raise ValueError(f"cannot load {source} into GPT({self.config}): " + "; ".join(problems))
        self.load_state_dict(state_dict, strict=True)


def unwrap(model):
    """The plain GPT under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers: the module whose
    state-dict keys checkpoints store and whose hooks probes attach to."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
