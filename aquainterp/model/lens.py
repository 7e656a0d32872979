"""The TransformerLens surface of `aquainterp.model.gpt.GPT`: what TL's functions call on a model.

TransformerLens 4.x types its analysis functions (`patching`, `head_detector`, `evals`,
`utilities.test_prompt`, `ActivationCache`, `tools.analysis.logit_lens`) against the structural
`TransformerLensModel` protocol: a `cfg` with TL's field names, `run_with_cache`/`run_with_hooks`, the
tokenizer methods, and the weight views (`W_Q`…, `b_*`, `accumulated_bias`,
`tokens_to_residual_directions`, `unembed`). `LensMixin` gives GPT all of them; nothing here runs in
the model's forward unless a caller asks for it.

Residual decompositions. TL's `decompose_resid`, `get_full_resid_decomposition`, `logit_attrs` and
`accumulated_resid` assume the stream entering `ln_final` is `hook_embed + Σ attn_out + Σ mlp_out`
(our `hook_embed` is the normed embedding, which is what enters the stream). Whether that holds for a
model is decided in one place, `GPT.residual_decomposition_problem()`; `GPTCache` asks it before each of
those four and refuses with its reason instead of returning a decomposition that does not sum.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformer_lens import ActivationCache
from transformer_lens.config import TransformerLensConfig
from transformer_lens.FactoredMatrix import FactoredMatrix


@dataclasses.dataclass
class GPTLensConfig(TransformerLensConfig):
    """TL's config plus the fields TL's tools and users read on a HookedTransformer/bridge cfg."""

    model_name: str = "aquainterp-gpt"
    original_architecture: str = "NanoChatForCausalLM"
    tokenizer_name: str | None = None
    d_vocab_out: int = -1
    rotary_dim: int | None = None
    rotary_base: float = 10000.0
    rotary_adjacent_pairs: bool = False  # nanochat rotates the two halves of a head, not adjacent pairs
    use_qk_norm: bool = True
    qk_norm_after_rope: bool = True
    post_embedding_ln: bool = True  # parameter-free RMSNorm right after the embedding
    output_logits_soft_cap: float = -1.0
    attn_scores_soft_cap: float = -1.0
    use_attn_scale: bool = True
    attn_scale: float = -1.0
    use_attn_in: bool = False
    use_hook_mlp_in: bool = False
    use_hook_tokens: bool = False
    ungroup_grouped_query_attention: bool = False
    default_padding_side: str = "right"
    tokenizer_prepends_bos: bool = False  # our Tokenizer.encode adds no BOS; to_tokens does (prepend_bos)
    tie_word_embeddings: bool = False
    parallel_attn_mlp: bool = False
    attention_dir: str = "causal"
    init_mode: str = "nanochat"


def lens_config(base: TransformerLensConfig, config: Any, softcap: float) -> GPTLensConfig:
    """GPT's TL config: the base fields as built by the model, plus what a HookedTransformer cfg has."""
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(TransformerLensConfig)}
    architecture = getattr(config, "architecture", "nanochat-2025-10")
    return GPTLensConfig(
        **values,
        model_name=f"aquainterp-{architecture}-d{config.n_layer}",
        original_architecture="NanoChatForCausalLM" if architecture == "nanochat-2025-10" else architecture,
        d_vocab_out=config.vocab_size,
        rotary_dim=config.head_dim,
        rotary_base=float(getattr(config, "rope_base", None) or 10000.0),
        output_logits_soft_cap=softcap,
        attn_scale=math.sqrt(config.head_dim),
    )


class SoftcapOutput:
    """What TL's logit lens calls `model.adapter.apply_output_logits_transform`: our logits soft-cap."""

    def __init__(self, cap: float):
        self.cap = cap

    def apply_output_logits_transform(self, logits: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(logits / self.cap)


class Unembed(nn.Module):
    """TL's `model.unembed`: x @ W_U + b_U (b_U is zero), before the soft-cap, as TL's Unembed.

    It reads the model's lm_head without owning it (lm_head.weight stays the one checkpoint key)."""

    def __init__(self, lm_head: nn.Linear, vocab_size: int):
        super().__init__()
        self.__dict__["_lm_head"] = lm_head  # not a registered submodule: no second state-dict entry
        self.vocab_size = vocab_size

    @property
    def W_U(self) -> torch.Tensor:  # [d_model, d_vocab]
        return self._lm_head.weight[: self.vocab_size].T

    @property
    def b_U(self) -> torch.Tensor:
        return self.W_U.new_zeros(self.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._lm_head.weight[: self.vocab_size])


def _zeros_like_rows(w: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=w.dtype, device=w.device)


class LensMixin:
    """Tokenizer methods, stacked weight views and decomposition helpers with TransformerLens's names,
    signatures and meaning. Mixed into GPT (a HookedRootModule with `cfg`, `config`, `blocks`)."""

    tokenizer = None

    def setup(self):
        """HookedRootModule.setup, plus TL 4.x's attention-level names of the split-input hooks
        (blocks.{l}.attn.hook_q_input …, what transformer_lens.patching hooks) as aliases of ours."""
        super().setup()
        self.hook_aliases = {}  # alias -> the hook's own name
        for layer, block in enumerate(self.blocks):
            for name in ("hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_in"):
                self.mod_dict[f"blocks.{layer}.attn.{name}"] = getattr(block, name)
                self.hook_aliases[f"blocks.{layer}.attn.{name}"] = f"blocks.{layer}.{name}"

    def get_caching_hooks(self, names_filter=None, *args, **kwargs):
        """HookedRootModule's, with the alias names (setup) accepted in names_filter as a name, a list or a
        predicate. The cache keeps each activation under the hook's own name; GPTCache answers to both."""
        aliases = self.hook_aliases
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if isinstance(names_filter, list):
            names_filter = [aliases.get(name, name) for name in names_filter]
        elif callable(names_filter):
            wanted, alias_of = names_filter, {own: alias for alias, own in aliases.items()}
            names_filter = lambda name: wanted(name) or (name in alias_of and wanted(alias_of[name]))  # noqa: E731
        return super().get_caching_hooks(names_filter, *args, **kwargs)

    # ------------------------------------------------------------------ tokenizer

    def set_tokenizer(self, tokenizer, default_padding_side: str = "right") -> None:
        """Attach an aquainterp Tokenizer (load_model does this with the checkpoint's)."""
        for attr in ("encode", "decode", "bos_token_id", "vocab_size", "fingerprint"):
            if not hasattr(tokenizer, attr):
                raise TypeError(f"set_tokenizer: expected an aquainterp.tokenizer.Tokenizer, got "
                                f"{type(tokenizer).__name__} (no {attr!r})")
        if tokenizer.vocab_size > self.cfg.d_vocab:
            raise ValueError(f"set_tokenizer: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocabulary is {self.cfg.d_vocab}")
        if default_padding_side not in ("left", "right"):
            raise ValueError(f"set_tokenizer: default_padding_side must be 'left' or 'right', "
                             f"got {default_padding_side!r}")
        self.tokenizer = tokenizer
        self.cfg.tokenizer_name = f"aquainterp-bpe-{tokenizer.fingerprint()[:12]}"
        self.cfg.default_padding_side = default_padding_side

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what}: this GPT has no tokenizer; load_model attaches the checkpoint's, or "
                             "call model.set_tokenizer(Tokenizer.load(directory))")
        return self.tokenizer

    def _encode_rows(self, input, prepend_bos, truncate: bool, what: str) -> list[list[int]]:
        tok = self._require_tokenizer(what)
        texts = [input] if isinstance(input, str) else input
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"{what}: input must be a str or a non-empty list of str, got {type(input).__name__}")
        bos = self.cfg.default_prepend_bos if prepend_bos is None else bool(prepend_bos)
        rows = [tok.encode(t, prepend=tok.bos_token_id if bos else None) for t in texts]
        if truncate:
            rows = [r[: self.cfg.n_ctx] for r in rows]
        if any(not r for r in rows):
            raise ValueError(f"{what}: an input string gives no tokens (empty string without BOS)")
        return rows

    def _tokens_and_mask(self, input, prepend_bos=None, padding_side=None, truncate: bool = True,
                         what: str = "to_tokens") -> tuple[torch.Tensor, torch.Tensor | None]:
        """([batch, pos] long tokens, [batch, pos] bool mask of real tokens or None when nothing is padded).

        Rows are padded with the BOS id (nanochat has no pad token; the mask says which columns are real)."""
        side = self.cfg.default_padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"{what}: padding_side must be 'left' or 'right', got {side!r}")
        rows = self._encode_rows(input, prepend_bos, truncate, what)
        T = max(len(r) for r in rows)
        pad = self.tokenizer.bos_token_id
        tokens = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for i, r in enumerate(rows):
            cols = slice(0, len(r)) if side == "right" else slice(T - len(r), T)
            tokens[i, cols] = torch.tensor(r, dtype=torch.long)
            mask[i, cols] = True
        return tokens, (None if bool(mask.all()) else mask)

    def _text_input(self, input, prepend_bos, padding_side, kv_cache):
        """forward's string input: (tokens on the model's device, mask of real tokens or None, kv_cache);
        left-padded rows get a KVCache with their left_pad, so padding is masked and positions shifted."""
        if kv_cache is not None:
            raise ValueError("GPT.forward: string input starts a sequence; it cannot continue a kv_cache")
        tokens, mask = self._tokens_and_mask(input, prepend_bos, padding_side, what="GPT.forward")
        device = self.W_U.device
        tokens = tokens.to(device)
        if mask is not None and not bool(mask[:, 0].all()):  # left padding
            from aquainterp.model.kv_cache import KVCache

            left_pad = (~mask).sum(1).to(device)
            kv_cache = KVCache(tokens.shape[0], self.cfg.n_layers, tokens.shape[1], left_pad=left_pad)
        return tokens, (None if mask is None else mask.to(device)), kv_cache

    @staticmethod
    def _check_return_type(return_type, targets, logits_at) -> None:
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"GPT.forward: return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        if targets is not None:
            raise ValueError(f"GPT.forward: targets give nanochat's loss; return_type={return_type!r} is "
                             "TransformerLens's next-token loss on the input itself: pass one or the other")
        if logits_at is not None and return_type is not None:
            raise ValueError(f"GPT.forward: return_type={return_type!r} needs every position's logits; "
                             "it cannot be combined with logits_at")

    @staticmethod
    def _lens_output(logits, tokens, return_type, loss_per_token: bool, mask):
        """HookedTransformer.forward's outputs for return_type 'loss' | 'both' (None returns earlier)."""
        from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss

        loss = lm_cross_entropy_loss(logits, tokens, attention_mask=mask, per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def to_tokens(self, input, prepend_bos: bool | None = None, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = True) -> torch.Tensor:
        """TL's to_tokens: [batch, pos] token ids of a string or list of strings.

        prepend_bos (default cfg.default_prepend_bos = True) puts nanochat's <|bos|> first, as nanochat
        starts every document; lists are padded on padding_side (default cfg.default_padding_side)."""
        tokens, _ = self._tokens_and_mask(input, prepend_bos, padding_side, truncate)
        return tokens.to(self.cfg.device) if move_to_device else tokens

    def to_str_tokens(self, input, prepend_bos: bool | None = None, padding_side: str | None = None):
        """TL's to_str_tokens: the string of each token (a list, or a list of lists for a list input)."""
        tok = self._require_tokenizer("to_str_tokens")
        if isinstance(input, list) and input and all(isinstance(s, str) for s in input):
            return [self.to_str_tokens(s, prepend_bos, padding_side) for s in input]
        if isinstance(input, str):
            ids = self._encode_rows(input, prepend_bos, True, "to_str_tokens")[0]
        else:
            ids = torch.as_tensor(input).squeeze()
            if ids.ndim == 0:
                ids = ids[None]
            if ids.ndim != 1:
                raise ValueError(f"to_str_tokens: tokens must be 1-d (or [1, pos]), got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        return [tok.decode([int(t)]) for t in ids]

    def to_string(self, tokens):
        """TL's to_string: text of a 1-d token sequence, or a list of texts for [batch, pos]."""
        tok = self._require_tokenizer("to_string")
        ids = torch.as_tensor(tokens)
        if ids.ndim == 2:
            return [tok.decode(row.tolist()) for row in ids]
        if ids.ndim > 2:
            raise ValueError(f"to_string: tokens must be 0-, 1- or 2-d, got shape {tuple(ids.shape)}")
        return tok.decode(ids.reshape(-1).tolist())

    def to_single_token(self, string: str) -> int:
        """TL's to_single_token: the id of a string that is exactly one token (no BOS)."""
        ids = self._encode_rows(string, False, False, "to_single_token")[0]
        if len(ids) != 1:
            raise ValueError(f"to_single_token: {string!r} is not a single token: it is {len(ids)} tokens {ids}")
        return ids[0]

    def get_token_position(self, single_token, input, mode: str = "first", prepend_bos=None,
                           padding_side=None) -> int:
        """TL's get_token_position: where a token (str or id) first/last occurs in a 1-row input."""
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        else:
            tokens = torch.as_tensor(input)
        if tokens.ndim == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"get_token_position: one row only, got batch {tokens.shape[0]}")
            tokens = tokens[0]
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        where = (tokens == token).nonzero()
        if len(where) == 0:
            raise ValueError(f"get_token_position: token {single_token!r} not in the input")
        if mode not in ("first", "last"):
            raise ValueError(f"get_token_position: mode must be 'first' or 'last', got {mode!r}")
        return int(where[0 if mode == "first" else -1, 0])

    # ------------------------------------------------------------------ weights in TL's shapes

    @property
    def b_U(self) -> torch.Tensor:  # [d_vocab] zeros: no unembedding bias
        return self.unembed.b_U

    @property
    def W_Q(self) -> torch.Tensor:  # [n_layers, n_heads, d_model, d_head]
        return torch.stack([b.attn.W_Q for b in self.blocks])

    @property
    def W_K(self) -> torch.Tensor:  # [n_layers, n_heads, d_model, d_head], kv heads repeated per group
        return torch.stack([b.attn.W_K for b in self.blocks])

    @property
    def W_V(self) -> torch.Tensor:  # [n_layers, n_heads, d_model, d_head], kv heads repeated per group
        return torch.stack([b.attn.W_V for b in self.blocks])

    @property
    def W_O(self) -> torch.Tensor:  # [n_layers, n_heads, d_head, d_model]
        return torch.stack([b.attn.W_O for b in self.blocks])

    @property
    def W_in(self) -> torch.Tensor:  # [n_layers, d_model, d_mlp]
        return torch.stack([b.mlp.W_in for b in self.blocks])

    @property
    def W_out(self) -> torch.Tensor:  # [n_layers, d_mlp, d_model]
        return torch.stack([b.mlp.W_out for b in self.blocks])

    @property
    def b_Q(self) -> torch.Tensor:  # [n_layers, n_heads, d_head] zeros
        return torch.stack([b.attn.b_Q for b in self.blocks])

    @property
    def b_K(self) -> torch.Tensor:
        return torch.stack([b.attn.b_K for b in self.blocks])

    @property
    def b_V(self) -> torch.Tensor:
        return torch.stack([b.attn.b_V for b in self.blocks])

    @property
    def b_O(self) -> torch.Tensor:  # [n_layers, d_model] zeros
        return torch.stack([b.attn.b_O for b in self.blocks])

    @property
    def b_in(self) -> torch.Tensor:  # [n_layers, d_mlp] zeros
        return torch.stack([b.mlp.b_in for b in self.blocks])

    @property
    def b_out(self) -> torch.Tensor:  # [n_layers, d_model] zeros
        return torch.stack([b.mlp.b_out for b in self.blocks])

    @property
    def QK(self) -> FactoredMatrix:  # [n_layers, n_heads, d_model, d_model] (before rotary and QK-norm)
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:  # [n_layers, n_heads, d_model, d_model]
        return FactoredMatrix(self.W_V, self.W_O)

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """TL's accumulated_bias: the biases added to the stream before `layer` — zeros: nanochat has none."""
        if not 0 <= layer <= self.cfg.n_layers:
            raise ValueError(f"accumulated_bias: layer must be in [0, {self.cfg.n_layers}], got {layer}")
        return _zeros_like_rows(self.W_U, self.cfg.d_model)

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """TL's tokens_to_residual_directions: the W_U column of each token, [..., d_model]
        ([d_model] for one token given as a str, an int or a one-element tensor)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, torch.Tensor) and tokens.numel() == 1:
            tokens = int(tokens.item())
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        return self.W_U.T[torch.as_tensor(tokens, device=self.W_U.device)]

    # ------------------------------------------------------------------ decompositions

    def residual_decomposition_problem(self) -> str | None:
        """None when the stream entering ln_final is exactly hook_embed + Σ attn_out + Σ mlp_out (what
        TL's decompose_resid, get_full_resid_decomposition, logit_attrs and accumulated_resid assume);
        otherwise why not. The one place that decides; GPTCache refuses those four with this reason."""
        config = self.config
        if getattr(config, "architecture", "nanochat-2025-10") == "nanochat-2025-10":
            return None
        return (f"{config.architecture} scales the residual stream before every block "
                "(x = resid_lambdas[l]·x + x0_lambdas[l]·x0, x0 the smeared embedding) and subtracts "
                "backout_lambda × the layer-n_layer//2 residual before ln_final, so the stream is not a plain "
                "sum of hook_embed and the attn_out/mlp_out hooks, and TransformerLens's decomposition would "
                "not sum to it")

    def check_residual_decomposition(self, operation: str) -> None:
        problem = self.residual_decomposition_problem()
        if problem is not None:
            raise ValueError(f"{operation} refused: {problem}")

    # ------------------------------------------------------------------ opt-in hooks (TL's switches)

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """blocks.{l}.attn.hook_result [batch, pos, head, d_model]: each head's z @ W_O (summed after)."""
        self.cfg.use_attn_result = bool(use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """blocks.{l}.hook_q_input|hook_k_input|hook_v_input: a per-head copy of the residual before ln1."""
        if use_split_qkv_input and self.cfg.use_attn_in:
            raise ValueError("use_split_qkv_input and use_attn_in are exclusive: turn use_attn_in off first")
        self.cfg.use_split_qkv_input = bool(use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """blocks.{l}.hook_attn_in [batch, pos, head, d_model]: one per-head copy feeding q, k and v."""
        if use_attn_in and self.cfg.use_split_qkv_input:
            raise ValueError("use_attn_in and use_split_qkv_input are exclusive: turn use_split_qkv_input off first")
        if use_attn_in and self.cfg.n_key_value_heads != self.cfg.n_heads:
            raise ValueError(f"use_attn_in needs one key/value head per query head; this model groups "
                             f"{self.cfg.n_heads} query heads over {self.cfg.n_key_value_heads} kv heads "
                             "(use use_split_qkv_input, whose k/v inputs are per kv head)")
        self.cfg.use_attn_in = bool(use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """blocks.{l}.hook_mlp_in: the residual entering ln2 (resid_mid), as a separate hook."""
        self.cfg.use_hook_mlp_in = bool(use_hook_mlp_in)

    def set_use_hook_tokens(self, use_hook_tokens: bool) -> None:
        """hook_tokens: the [batch, pos] token ids the forward embeds."""
        self.cfg.use_hook_tokens = bool(use_hook_tokens)


class GPTCache(ActivationCache):
    """TL's ActivationCache; the four decompositions first ask the model whether they can be exact, and
    an alias hook name (GPT.hook_aliases) finds the activation cached under the hook's own name."""

    def __getitem__(self, key):
        if isinstance(key, str) and key not in self.cache_dict:
            key = self.model.hook_aliases.get(key, key)
        return super().__getitem__(key)

    def _checked(name: str):
        """ActivationCache.<name>, refused first where the model's residual stream does not decompose."""
        parent = getattr(ActivationCache, name)

        @functools.wraps(parent)
        def method(self, *args, **kwargs):
            self.model.check_residual_decomposition(name)
            return parent(self, *args, **kwargs)
        return method

    decompose_resid = _checked("decompose_resid")
    get_full_resid_decomposition = _checked("get_full_resid_decomposition")
    logit_attrs = _checked("logit_attrs")
    accumulated_resid = _checked("accumulated_resid")
    del _checked
