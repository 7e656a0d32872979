"""GPT's resume API: forward_from (a forward resumed at a block from a residual stream and a prefilled
KV cache), logits_from_resid (the end of forward on chosen rows and tokens) and KVCache.prefill, against
the plain forward; the 2026-07 preset is refused with the reason."""

import pytest
import torch
from test_arch_2026 import random_2026
from test_model import random_gpt, small_config, tokens

from aquainterp.model.kv_cache import KVCache


@pytest.fixture(scope="module")
def model():
    return random_gpt(small_config(n_layer=3, norm_eps=1e-5))


def run_cache(model, idx):
    """(logits, {hook name: activation}) of a plain forward."""
    names = [f"blocks.{l}.{n}" for l in range(model.config.n_layer)
             for n in ("hook_resid_pre", "attn.hook_rot_k", "attn.hook_v", "hook_resid_post")]
    names.append("ln_final.hook_normalized")
    logits, cache = model.run_with_cache(idx, names_filter=names)
    return logits, cache


def prefilled(model, cache, layer, start, rows):
    L, T = model.config.n_layer, cache["blocks.0.hook_resid_pre"].shape[1]
    if layer == L:  # nothing left to run: no keys/values needed
        return None
    k = torch.stack([cache[f"blocks.{l}.attn.hook_rot_k"] for l in range(layer, L)]).transpose(2, 3)
    v = torch.stack([cache[f"blocks.{l}.attn.hook_v"] for l in range(layer, L)]).transpose(2, 3)
    return KVCache(rows, L, T).prefill(k[..., :start, :], v[..., :start, :], first_layer=layer)


@pytest.mark.parametrize("layer,start", [(0, 0), (0, 5), (1, 3), (2, 11), (3, 4)])
def test_forward_from_equals_the_forward(model, layer, start):
    idx = tokens(batch=2, T=12)
    logits, cache = run_cache(model, idx)
    final = cache[f"blocks.{model.config.n_layer - 1}.hook_resid_post"]
    entering = cache[f"blocks.{layer}.hook_resid_pre"] if layer < model.config.n_layer else final
    kv = prefilled(model, cache, layer, start, 2)
    out = model.forward_from(entering[:, start:], layer, kv)
    torch.testing.assert_close(out, final[:, start:], atol=1e-5, rtol=0)
    at = torch.tensor([11 - start, 6 - start]).clamp(min=0)  # one position per row, the last block there alone
    one = model.forward_from(entering[:, start:], layer, prefilled(model, cache, layer, start, 2), at=at)
    torch.testing.assert_close(one, final[torch.arange(2), start + at], atol=1e-5, rtol=0)
    got = model.logits_from_resid(one)
    torch.testing.assert_close(got, logits[torch.arange(2), start + at], atol=1e-4, rtol=0)


def test_forward_from_stops_at_a_layer_and_fires_hooks(model):
    idx = tokens(batch=2, T=10)
    _, cache = run_cache(model, idx)
    seen = []
    with model.hooks(fwd_hooks=[("blocks.1.hook_mlp_out", lambda act, hook: seen.append(act.shape))]):
        out = model.forward_from(cache["blocks.1.hook_resid_pre"], 1, stop_layer=2)
    torch.testing.assert_close(out, cache["blocks.1.hook_resid_post"], atol=1e-5, rtol=0)
    assert seen == [torch.Size([2, 10, model.config.n_embd])]
    # a hook inside the last block: that block runs every position (the one-position path would skip it)
    seen.clear()
    at = torch.tensor([9, 4])
    with model.hooks(fwd_hooks=[("blocks.2.hook_mlp_out", lambda act, hook: seen.append(act.shape))]):
        one = model.forward_from(cache["blocks.0.hook_resid_pre"], 0, at=at)
    assert seen == [torch.Size([2, 10, model.config.n_embd])]
    torch.testing.assert_close(one, cache["blocks.2.hook_resid_post"][torch.arange(2), at], atol=1e-5, rtol=0)


def test_logits_from_resid_rows_and_tokens(model):
    idx = tokens(batch=3, T=8)
    logits, cache = run_cache(model, idx)
    final = cache["blocks.2.hook_resid_post"]
    # exact on any CPU: logits_from_resid runs forward's last ops on the same tensor and shapes
    assert torch.equal(model.logits_from_resid(final), logits)  # the same ops as the end of forward
    ids = torch.tensor([3, 7, 60])
    torch.testing.assert_close(model.logits_from_resid(final, ids), logits[..., ids], atol=1e-5, rtol=0)
    # from ln_final's output (what ln_final.hook_normalized holds): the same numbers
    # exact on any CPU: the same ops from ln_final's output, the same shapes
    assert torch.equal(model.logits_from_resid(cache["ln_final.hook_normalized"], normed=True), logits)
    torch.testing.assert_close(model.logits_from_resid(cache["ln_final.hook_normalized"], ids, normed=True),
                               logits[..., ids], atol=1e-5, rtol=0)
    per_row = torch.tensor([[1, 2], [5, 9], [0, 63]])
    got = model.logits_from_resid(final, per_row)
    assert got.shape == (3, 8, 2)
    torch.testing.assert_close(got, logits.gather(-1, per_row[:, None].expand(-1, 8, -1)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"token_ids must be \[k\] or \[3, k\]"):
        model.logits_from_resid(final, torch.zeros(2, 2, dtype=torch.long))


def test_bad_arguments_and_the_2026_preset_are_refused(model):
    x = torch.zeros(1, 4, model.config.n_embd)
    with pytest.raises(ValueError, match="layer <= stop_layer"):
        model.forward_from(x, 2, stop_layer=1)
    with pytest.raises(ValueError, match=r"at must be an integer tensor of 1 positions in \[0, 4\), got \[4\]"):
        model.forward_from(x, 0, at=torch.tensor([4]))
    with pytest.raises(ValueError, match=r"at must be an integer tensor of 1 positions in \[0, 4\), got \[1.0\]"):
        model.forward_from(x, 0, at=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="KVCache.prefill"):
        KVCache(2, 3, 8).prefill(torch.zeros(2, 2, 2, 4, 16), torch.zeros(2, 2, 2, 4, 16), first_layer=0)
    new = random_2026(n_layer=2)
    with pytest.raises(ValueError, match=r"x0 \(resid/x0 lambdas\), value embeddings.*backout"):
        new.forward_from(torch.zeros(1, 4, 64), 0)
