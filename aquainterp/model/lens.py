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

    def derivative(self, logits: torch.Tensor) -> torch.Tensor:
        """d capped / d logit at pre-cap logits x: sech²(x/cap) = 1 - (capped/cap)², in (0, 1]; 1 at 0."""
        return 1 - torch.tanh(logits / self.cap).square()

    def inverse(self, capped: torch.Tensor) -> torch.Tensor:
        """Pre-cap logits from capped ones, cap·atanh(capped/cap): loses precision where |capped| nears the
        cap (tanh saturates); read the pre-cap logits from the cache instead (GPTCache.logits_before_softcap)."""
        return self.cap * torch.atanh(capped / self.cap)


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


class Embed(nn.Module):
    """TL's `model.embed`: W_E [d_vocab, d_model] and embed(tokens) = W_E[tokens], the raw token embedding
    (hook_embed_raw; the residual stream starts at its parameter-free RMSNorm, hook_embed).

    It reads the model's wte without owning it (wte.weight stays the one checkpoint key)."""

    def __init__(self, wte: nn.Embedding, vocab_size: int):
        super().__init__()
        self.__dict__["_wte"] = wte  # not a registered submodule: no second state-dict entry
        self.vocab_size = vocab_size

    @property
    def W_E(self) -> torch.Tensor:  # [d_vocab, d_model]
        return self._wte.weight[: self.vocab_size]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.W_E)


def _zeros_like_rows(w: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.zeros(*shape, dtype=w.dtype, device=w.device)


class LensMixin:
    """Tokenizer methods, stacked weight views and decomposition helpers with TransformerLens's names,
    signatures and meaning. Mixed into GPT (a HookedRootModule with `cfg`, `config`, `blocks`)."""

    # Two tokenizers, one vocabulary. `native_tokenizer` is ours (aquainterp.tokenizer.Tokenizer: the Rust
    # BPE, special tokens by name, chat rendering; what load_model returns and set_tokenizer attaches);
    # `tokenizer` is TransformerLens's model.tokenizer, a transformers PreTrainedTokenizerFast built from it
    # on first use (callable, batch_decode, bos/eos/pad ids), for TL code that tokenizes through it.
    native_tokenizer = None
    _hf_tokenizer = None

    @property
    def tokenizer(self):
        """TransformerLens's `model.tokenizer`: a transformers PreTrainedTokenizerFast with our ids (None
        without a tokenizer). Our own Tokenizer is `model.native_tokenizer`."""
        if self.native_tokenizer is None:
            return None
        if self._hf_tokenizer is None:
            self._hf_tokenizer = self.native_tokenizer.hf_pretrained_tokenizer(model_max_length=self.cfg.n_ctx)
            self._hf_tokenizer.padding_side = self.cfg.default_padding_side
        return self._hf_tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        if value is None:
            self.native_tokenizer = self._hf_tokenizer = None
        else:
            self.set_tokenizer(value)

    def setup(self):
        """HookedRootModule.setup, plus TL 4.x's attention-level names of the split-input hooks
        (blocks.{l}.attn.hook_q_input …, what transformer_lens.patching hooks) and TransformerBridge's
        block input/output names (blocks.{l}.hook_in = hook_resid_pre, hook_out = hook_resid_post, what
        utils.get_act_name("in", l) gives) as aliases of ours."""
        super().setup()
        self.hook_aliases = {}  # alias -> the hook's own name
        for layer, block in enumerate(self.blocks):
            for name in ("hook_q_input", "hook_k_input", "hook_v_input", "hook_attn_in"):
                self.mod_dict[f"blocks.{layer}.attn.{name}"] = getattr(block, name)
                self.hook_aliases[f"blocks.{layer}.attn.{name}"] = f"blocks.{layer}.{name}"
            for alias, own in (("hook_in", "hook_resid_pre"), ("hook_out", "hook_resid_post")):
                self.mod_dict[f"blocks.{layer}.{alias}"] = getattr(block, own)
                self.hook_aliases[f"blocks.{layer}.{alias}"] = f"blocks.{layer}.{own}"

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
        """Attach an aquainterp Tokenizer (load_model does this with the checkpoint's) as
        model.native_tokenizer; model.tokenizer is then its transformers twin."""
        for attr in ("encode", "decode", "bos_token_id", "vocab_size", "fingerprint", "hf_pretrained_tokenizer"):
            if not hasattr(tokenizer, attr):
                raise TypeError(f"set_tokenizer: expected an aquainterp.tokenizer.Tokenizer, got "
                                f"{type(tokenizer).__name__} (no {attr!r})")
        if tokenizer.vocab_size > self.cfg.d_vocab:
            raise ValueError(f"set_tokenizer: the tokenizer has {tokenizer.vocab_size} tokens but the model's "
                             f"vocabulary is {self.cfg.d_vocab}")
        if default_padding_side not in ("left", "right"):
            raise ValueError(f"set_tokenizer: default_padding_side must be 'left' or 'right', "
                             f"got {default_padding_side!r}")
        self.native_tokenizer, self._hf_tokenizer = tokenizer, None
        self.cfg.tokenizer_name = f"aquainterp-bpe-{tokenizer.fingerprint()[:12]}"
        self.cfg.default_padding_side = default_padding_side

    def _require_tokenizer(self, what: str):
        if self.native_tokenizer is None:
            raise ValueError(f"{what}: this GPT has no tokenizer; load_model attaches the checkpoint's, or "
                             "call model.set_tokenizer(Tokenizer.load(directory))")
        return self.native_tokenizer

    def _eos_token_id(self) -> int:
        """model.tokenizer.eos_token_id (<|assistant_end|>), read from our tokenizer without building the HF one."""
        from aquainterp.tokenizer import HF_SPECIAL_TOKENS

        return self._require_tokenizer("generate").encode_special(HF_SPECIAL_TOKENS["eos_token"])

    def _pad_token_id(self) -> int:
        """What to_tokens pads with: the HF tokenizer's pad token (HF_SPECIAL_TOKENS), as TL pads."""
        from aquainterp.tokenizer import HF_SPECIAL_TOKENS

        return self._require_tokenizer("to_tokens").encode_special(HF_SPECIAL_TOKENS["pad_token"])

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

        Rows are padded with model.tokenizer.pad_token_id (<|assistant_end|>, as the HF export; nanochat has
        no pad token of its own); the mask says which columns are real."""
        side = self.cfg.default_padding_side if padding_side is None else padding_side
        if side not in ("left", "right"):
            raise ValueError(f"{what}: padding_side must be 'left' or 'right', got {side!r}")
        rows = self._encode_rows(input, prepend_bos, truncate, what)
        T = max(len(r) for r in rows)
        pad = self._pad_token_id()
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

    # ------------------------------------------------------------------ HookedTransformer methods

    def loss_fn(self, logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                per_token: bool = False) -> torch.Tensor:
        """TL's loss_fn: next-token cross-entropy of logits [batch, pos, d_vocab] on tokens [batch, pos]
        (the mean, or with per_token=True the [batch, pos-1] losses); attention_mask [batch, pos] (1 = real
        token) leaves out every prediction of or from a padding column. The logits are the model's soft-capped
        ones; the loss is of what the model predicts."""
        from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss

        if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
            raise ValueError(f"loss_fn: logits must be [batch, pos, d_vocab], got "
                             f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
        tokens = torch.as_tensor(tokens)
        if tokens.shape != logits.shape[:2] or tokens.is_floating_point():
            raise ValueError(f"loss_fn: tokens must be integer ids of shape {tuple(logits.shape[:2])} (the logits' "
                             f"batch and pos), got {tokens.dtype} of shape {tuple(tokens.shape)}")
        if logits.shape[1] < 2:
            raise ValueError("loss_fn: a next-token loss needs at least 2 positions")
        if attention_mask is not None:
            attention_mask = torch.as_tensor(attention_mask).to(logits.device)
            if attention_mask.shape != tokens.shape:
                raise ValueError(f"loss_fn: attention_mask must have the tokens' shape {tuple(tokens.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            attention_mask = attention_mask.bool()
        return lm_cross_entropy_loss(logits, tokens.to(logits.device), attention_mask, per_token)

    def tl_parameters(self) -> dict[str, torch.Tensor]:
        """TransformerBridge's tl_parameters: every weight under TL's name and in TL's shape (embed.W_E,
        blocks.{l}.attn.W_Q|W_K|W_V|W_O|b_Q|b_K|b_V|b_O, blocks.{l}.mlp.W_in|W_out|b_in|b_out, unembed.W_U|b_U);
        views of our weights (grouped kv heads repeated per query head), zero biases."""
        params = {"embed.W_E": self.embed.W_E}
        for layer, block in enumerate(self.blocks):
            for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
                params[f"blocks.{layer}.attn.{name}"] = getattr(block.attn, name)
            for name in ("W_in", "W_out", "b_in", "b_out"):
                params[f"blocks.{layer}.mlp.{name}"] = getattr(block.mlp, name)
        params["unembed.W_U"], params["unembed.b_U"] = self.unembed.W_U, self.unembed.b_U
        return params

    def tl_named_parameters(self):
        """TransformerBridge's tl_named_parameters: (name, tensor) pairs of tl_parameters()."""
        return iter(self.tl_parameters().items())

    def enable_compatibility_mode(self, disable_warnings: bool = False, no_processing: bool = False,
                                  fold_ln: bool = True, center_writing_weights: bool = True,
                                  center_unembed: bool = True, fold_value_biases: bool = True,
                                  refactor_factored_attn_matrices: bool = False) -> None:
        """TransformerBridge's switch to HookedTransformer's hook names and weight processing. Our hook names
        are HookedTransformer's already, and no processing step applies, so weights are never changed:
        fold_ln has nothing to fold (RMSNorm without weights), fold_value_biases no bias; center_writing_weights
        is for LayerNorm, which subtracts the mean that centring removes (RMSNorm does not: skipped, as TL
        skips it on RMSNorm models); center_unembed adds a constant to every logit, which the logit soft-cap
        does not ignore (skipped, as TL does with soft-capped logits). refactor_factored_attn_matrices is
        refused as TL refuses it on rotary models: rotary and QK-norm act between W_Q and W_K, so the scores
        are not x W_Q W_Kᵀ xᵀ and a refactor of that product would change them."""
        import warnings

        if no_processing:
            return
        if refactor_factored_attn_matrices:
            raise ValueError("enable_compatibility_mode: refactor_factored_attn_matrices is refused on this model, "
                             "as TransformerLens refuses it with rotary embeddings: the QK circuit depends on the "
                             "query and key positions (rotary) and on QK-norm, so W_Q W_Kᵀ is not what the scores use")
        if not disable_warnings:
            skipped = [name for name, on in (("center_writing_weights", center_writing_weights),
                                             ("center_unembed", center_unembed)) if on]
            if skipped:
                warnings.warn(f"enable_compatibility_mode: {' and '.join(skipped)} skipped (RMSNorm does not remove "
                              "the mean that centring writing weights removes; the logit soft-cap is not invariant to "
                              "centring the unembedding); fold_ln and fold_value_biases have nothing to fold. "
                              "Weights unchanged.", stacklevel=2)
        self.compatibility_mode = True

    @torch.inference_mode()
    def generate(self, input="", max_new_tokens: int = 10, stop_at_eos: bool = True, eos_token_id=None,
                 do_sample: bool = True, top_k: int | None = None, top_p: float | None = None,
                 temperature: float = 1.0, freq_penalty: float = 0.0, use_past_kv_cache: bool = True,
                 prepend_bos: bool | None = None, padding_side: str | None = None, return_type: str = "input",
                 verbose: bool = True):
        """HookedTransformer.generate: sample max_new_tokens tokens after `input` with our KV cache.

        input: a string (tokenized as to_tokens, prepend_bos/padding_side as there), a list of strings (left-
        padded, each row with its own positions, padding masked) or [batch, pos] token ids (rows as given).
        Each step samples with TL's sample_logits (temperature, top_k or top_p, freq_penalty over the tokens so
        far; temperature 0 is greedy) from the soft-capped logits, or takes the argmax with do_sample=False.
        stop_at_eos: a row that samples a stop token is finished, later tokens of it are the tokenizer's eos
        (padding, as TL); generation ends when every row has finished. Stop tokens: eos_token_id (an id or a
        list of ids); by default nanochat's two, model.tokenizer.eos_token_id (<|assistant_end|>, the end of a
        chat turn) and <|bos|> (a base model starts the next document). return_type "str" (decoded with
        skip_special_tokens, one string for one row, else a list), "tokens" (input tokens followed by the
        new ones, [batch, pos + new]) or "input" (str for text input, tokens for tokens). verbose shows a
        progress bar. Embedding input and return_type "embeds" are refused: our forward starts from token ids.
        use_past_kv_cache=False recomputes the whole sequence each step (same tokens, slower)."""
        from tqdm.auto import tqdm
        from transformer_lens.utilities import sample_logits

        from aquainterp.model.kv_cache import KVCache

        if return_type not in ("input", "str", "tokens"):
            why = " (embedding input/output is not supported: our forward starts from token ids)" \
                if return_type == "embeds" else ""
            raise ValueError(f"generate: return_type must be 'input', 'str' or 'tokens', got {return_type!r}{why}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"generate: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if not temperature >= 0:
            raise ValueError(f"generate: temperature must be >= 0, got {temperature!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"generate: top_k must be None or an int >= 1, got {top_k!r}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"generate: top_p must be None or in (0, 1], got {top_p!r}")
        if not freq_penalty >= 0:
            raise ValueError(f"generate: freq_penalty must be >= 0, got {freq_penalty!r}")
        mask = None
        if isinstance(input, str) or (isinstance(input, list) and input and all(isinstance(t, str) for t in input)):
            input_type = "str"
            side = "left" if isinstance(input, list) and len(input) > 1 else padding_side  # as TL: batches left
            tokens, mask = self._tokens_and_mask(input, prepend_bos, side, what="generate")
        elif isinstance(input, torch.Tensor) and input.ndim == 2 and input.numel() and not (
                input.is_floating_point() or input.is_complex() or input.dtype == torch.bool):
            input_type, tokens = "tokens", input.long()
            if bool(((tokens < 0) | (tokens >= self.cfg.d_vocab)).any()):
                raise ValueError(f"generate: token ids must be in [0, {self.cfg.d_vocab}), got "
                                 f"{int(tokens.min())}..{int(tokens.max())}")
        else:
            got = (f"a {input.dtype} tensor of shape {tuple(input.shape)}" if isinstance(input, torch.Tensor)
                   else type(input).__name__)
            raise TypeError(f"generate: input must be a str, a non-empty list of str or a [batch, pos] tensor of "
                            f"token ids (embeddings are not supported: our forward starts from token ids), got {got}")
        stop_tokens, eos_pad = [], None
        if stop_at_eos:
            if eos_token_id is None:
                if self.native_tokenizer is None:
                    raise ValueError("generate: stop_at_eos needs eos_token_id when the model has no tokenizer "
                                     "(pass eos_token_id=... or stop_at_eos=False)")
                eos_pad = self._eos_token_id()
                stop_tokens = [eos_pad, self.native_tokenizer.bos_token_id]
            else:
                ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
                if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.cfg.d_vocab
                                      for t in ids):
                    raise ValueError(f"generate: eos_token_id must be an id or a non-empty list of ids in "
                                     f"[0, {self.cfg.d_vocab}), got {eos_token_id!r}")
                stop_tokens = ids
                eos_pad = ids[0] if isinstance(eos_token_id, int) or self.native_tokenizer is None \
                    else self._eos_token_id()
        device = self.W_U.device
        tokens = tokens.to(device)
        B, T = tokens.shape
        if T + max_new_tokens > self.rotary_len:
            raise ValueError(f"generate: {T} prompt tokens + max_new_tokens {max_new_tokens} exceed the model's "
                             f"rotary length {self.rotary_len}")
        left_pad = None if mask is None else (~mask).sum(1).to(device)
        stop = torch.tensor(stop_tokens, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        cache = KVCache(B, self.cfg.n_layers, T + max_new_tokens, left_pad) if use_past_kv_cache else None
        sampled: list[torch.Tensor] = []

        def last_logits(sequence: torch.Tensor) -> torch.Tensor:  # the whole sequence, no cache kept
            kv = None if left_pad is None else KVCache(B, self.cfg.n_layers, sequence.shape[1], left_pad)
            return self(sequence, kv_cache=kv, logits_at=torch.full((B,), sequence.shape[1] - 1, device=device))

        for step in tqdm(range(max_new_tokens), disable=not verbose, desc="generate"):
            if use_past_kv_cache:  # prefill, then one position per step
                logits = (self(tokens, kv_cache=cache, logits_at=torch.full((B,), T - 1, device=device)) if step == 0
                          else self(sampled[-1][:, None], kv_cache=cache)[:, -1])
            else:
                logits = last_logits(torch.cat([tokens, *[t[:, None] for t in sampled]], dim=1))
            if do_sample:
                so_far = torch.cat([tokens, *[t[:, None] for t in sampled]], dim=1)
                next_tokens = sample_logits(logits, top_k=top_k, top_p=top_p, temperature=temperature,
                                            freq_penalty=freq_penalty, tokens=so_far).to(device)
            else:
                next_tokens = logits.argmax(-1)
            if stop_at_eos:
                next_tokens[finished] = eos_pad
                finished |= torch.isin(next_tokens, stop)
            sampled.append(next_tokens)
            if stop_at_eos and bool(finished.all()):
                break
        out = torch.cat([tokens, *[t[:, None] for t in sampled]], dim=1)
        if return_type == "tokens" or (return_type == "input" and input_type == "tokens"):
            return out
        self._require_tokenizer("generate (return_type 'str')")
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in out.tolist()]
        return texts[0] if len(texts) == 1 else texts

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
    accumulated_resid = _checked("accumulated_resid")
    del _checked

    def logit_attrs(self, residual_stack, tokens, incorrect_tokens=None, pos_slice=None, batch_slice=None,
                    has_batch_dim: bool = True):
        """ActivationCache.logit_attrs, exact on the logits before the soft-cap.

        Each component's attribution is its ln_final-scaled residual dotted with the token's W_U column
        (apply_ln_to_stack, then W_U; no unembedding bias). For a stack that sums to the stream
        (get_full_resid_decomposition, decompose_resid) the attributions sum to the pre-cap logit x — or
        to x_a - x_b with incorrect_tokens — exactly (up to float rounding): `logits_before_softcap()` holds x.
        The model's logits are cap·tanh(x/cap), cap = cfg.output_logits_soft_cap (15), which no sum of
        components gives: d capped/dx = 1 - tanh²(x/cap) (model.adapter.derivative(x)), so a component that
        moves x by δ moves the capped logit by about δ·(1 - tanh²(x/cap)), and a capped difference is
        cap·(tanh(x_a/cap) - tanh(x_b/cap)), not the sum of attributions. Compare attributions with the
        pre-cap logits (or scale them by that derivative for a first-order account of the capped ones).
        Refused on nanochat-2026-07 (residual_decomposition_problem)."""
        self.model.check_residual_decomposition("logit_attrs")
        return super().logit_attrs(residual_stack, tokens, incorrect_tokens, pos_slice, batch_slice, has_batch_dim)

    def logits_before_softcap(self, pos_slice=None) -> torch.Tensor:
        """The model's logits before the soft-cap, [batch, pos, d_vocab] (pos_slice as TL's: an int, a
        slice, a list or a Slice), from the cached ln_final.hook_normalized: what logit_attrs decomposes.
        adapter.apply_output_logits_transform of them is the model's output."""
        from transformer_lens.utilities import Slice

        name = "ln_final.hook_normalized"
        if name not in self.cache_dict:
            raise KeyError(f"logits_before_softcap needs {name!r} in the cache; run run_with_cache without a "
                           "names_filter, or with one that keeps it")
        normed = self.cache_dict[name]
        if not isinstance(pos_slice, Slice):
            pos_slice = Slice(pos_slice)
        normed = pos_slice.apply(normed, dim=-2)
        return self.model.unembed(normed).float()
