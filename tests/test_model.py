"""GPT: nanochat math, TransformerLens hook points, both attention paths, KV cache, loading checks."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformer_lens import ActivationCache
from transformer_lens.patching import get_act_patch_resid_pre

from aquainterp.model.gpt import GPT, GPTConfig
from aquainterp.model.kv_cache import KVCache

VOCAB = 64


def random_gpt(config: GPTConfig, seed: int = 0) -> GPT:
    """A GPT whose every weight is random and non-zero (nanochat's init zeroes the output projections)."""
    torch.manual_seed(seed)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 if p is model.wte.weight else p.shape[-1] ** -0.5)
    return model.eval()


def small_config(**kw) -> GPTConfig:
    base = dict(sequence_len=32, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    return GPTConfig(**{**base, **kw})


def tokens(batch=2, T=12, seed=1):
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


def reference_forward(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """nanochat's forward written out from the weights, independent of the module tree and its hooks:
    RMSNorm as x·rsqrt(mean x² + eps), rotary as a rotation of pairs (i, i + D/2) by angle t·10000^(-2i/D),
    attention as an explicit masked softmax with kv heads shared by consecutive query-head groups."""
    cfg = model.config
    H, Hkv, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    B, T = idx.shape
    eps = torch.finfo(torch.float32).eps

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)

    half = D // 2
    angle = (
        torch.arange(T, dtype=torch.float32)[:, None] * 10000.0 ** (-torch.arange(half) * 2.0 / D)[None, :]
    )
    c, s = angle.cos()[None, :, None, :], angle.sin()[None, :, None, :]

    def rotate(x):  # [B, T, h, D]
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * c + b * s, b * c - a * s], dim=-1)

    x = rms(model.wte.weight[idx])
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for blk in model.blocks:
        h = rms(x)
        q = (h @ blk.attn.c_q.weight.T).view(B, T, H, D)
        k = (h @ blk.attn.c_k.weight.T).view(B, T, Hkv, D)
        v = (h @ blk.attn.c_v.weight.T).view(B, T, Hkv, D)
        q, k = rms(rotate(q)), rms(rotate(k))
        heads = []
        for head in range(H):
            kv = head // (H // Hkv)
            att = torch.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kv]) / math.sqrt(D)
            att = att.masked_fill(~causal, float("-inf")).softmax(-1)
            heads.append(torch.einsum("bqk,bkd->bqd", att, v[:, :, kv]))
        x = x + torch.cat(heads, dim=-1) @ blk.attn.c_proj.weight.T
        h = rms(x)
        x = x + torch.relu(h @ blk.mlp.c_fc.weight.T) ** 2 @ blk.mlp.c_proj.weight.T
    logits = rms(x) @ model.lm_head.weight.T
    return 15.0 * torch.tanh(logits / 15.0)


# ---------------------------------------------------------------- config and size


def test_parameter_count_matches_nanochat_without_allocating():
    with torch.device("meta"):
        assert GPT(GPTConfig.from_depth(8, vocab_size=65536)).num_params() == 92_274_688
        assert GPT(GPTConfig.from_depth(20, vocab_size=65536)).num_params() == 560_988_160


def test_from_depth_follows_nanochat_sizing():
    c = GPTConfig.from_depth(20)
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim) == (20, 1280, 10, 10, 128)
    c = GPTConfig.from_depth(4, vocab_size=100, sequence_len=64, n_kv_head=1)
    assert (c.n_embd, c.n_head, c.n_kv_head, c.vocab_size, c.sequence_len) == (256, 2, 1, 100, 64)
    assert GPTConfig.from_dict(c.to_dict()) == c


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="n_head=4 is not divisible by n_kv_head=3"):
        small_config(n_kv_head=3)
    with pytest.raises(ValueError, match="GPTConfig.n_layer must be a positive int"):
        small_config(n_layer=0)
    with pytest.raises(ValueError, match=r"unknown keys \['n_heads'\]"):
        GPTConfig.from_dict({"n_heads": 4})
    with pytest.raises(ValueError, match="does not split"):
        GPTConfig.from_depth(5)  # 320 wide, 3 heads


def test_tl_config_fields():
    model = GPT(small_config())
    cfg = model.cfg
    assert (cfg.n_layers, cfg.n_heads, cfg.d_model, cfg.d_head, cfg.d_mlp, cfg.d_vocab, cfg.n_ctx) == (
        2,
        4,
        64,
        16,
        256,
        VOCAB,
        32,
    )
    assert cfg.n_key_value_heads == 2 and cfg.device == "cpu" and cfg.normalization_type == "RMSPre"
    model.to(torch.float64)
    assert cfg.dtype == torch.float64


# ---------------------------------------------------------------- math


def test_forward_matches_reference_implementation():
    model = random_gpt(small_config())
    idx = tokens()
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference_forward(model, idx), atol=1e-5, rtol=1e-5)


def test_loss_is_cross_entropy_of_logits_ignoring_minus_one():
    model = random_gpt(small_config())
    idx = tokens()
    targets = tokens(seed=2)
    targets[0, :5] = -1
    logits = model(idx)
    expected = F.cross_entropy(logits[targets != -1], targets[targets != -1])
    torch.testing.assert_close(model(idx, targets), expected)
    per_token = model(idx, targets, loss_reduction="none")
    assert per_token.shape == (idx.numel(),) and (per_token.view_as(idx)[0, :5] == 0).all()


def test_logits_are_soft_capped_in_fp32():
    model = random_gpt(small_config())
    with torch.no_grad():
        model.lm_head.weight.mul_(100.0)
        logits = model(tokens())
    assert logits.dtype == torch.float32 and logits.abs().max() <= 15.0 and logits.abs().max() > 14.0


def test_nanochat_init_zeroes_outputs_and_gives_uniform_loss():
    torch.manual_seed(0)
    model = GPT(small_config())
    model.init_weights()
    assert (model.lm_head.weight == 0).all()
    for blk in model.blocks:
        assert (blk.attn.c_proj.weight == 0).all() and (blk.mlp.c_proj.weight == 0).all()
    assert abs(model.wte.weight.std().item() - 1.0) < 0.05
    fan_in = model.config.n_embd
    assert abs(model.blocks[0].attn.c_q.weight.std().item() - fan_in**-0.5) < 0.01
    # c_fc is 4× wider than tall: std = 1/√fan_in · min(1, √4) = 1/√fan_in
    assert abs(model.blocks[0].mlp.c_fc.weight.std().item() - fan_in**-0.5) < 0.01
    torch.testing.assert_close(model(tokens(), tokens(seed=3)), torch.tensor(math.log(VOCAB)))


# ---------------------------------------------------------------- hooks

BLOCK_HOOKS = {
    "hook_resid_pre": (2, 12, 64),
    "ln1.hook_scale": (2, 12, 1),
    "ln1.hook_normalized": (2, 12, 64),
    "attn.hook_q": (2, 12, 4, 16),
    "attn.hook_k": (2, 12, 2, 16),
    "attn.hook_v": (2, 12, 2, 16),
    "attn.hook_rot_q": (2, 12, 4, 16),
    "attn.hook_rot_k": (2, 12, 2, 16),
    "attn.hook_attn_scores": (2, 4, 12, 12),
    "attn.hook_pattern": (2, 4, 12, 12),
    "attn.hook_z": (2, 12, 4, 16),
    "hook_attn_out": (2, 12, 64),
    "hook_resid_mid": (2, 12, 64),
    "ln2.hook_scale": (2, 12, 1),
    "ln2.hook_normalized": (2, 12, 64),
    "mlp.hook_pre": (2, 12, 256),
    "mlp.hook_post": (2, 12, 256),
    "hook_mlp_out": (2, 12, 64),
    "hook_resid_post": (2, 12, 64),
}


def test_run_with_cache_gives_every_hook_with_tl_names_and_shapes():
    model = random_gpt(small_config())
    idx = tokens()
    logits, cache = model.run_with_cache(idx)
    assert isinstance(cache, ActivationCache)
    expected = {
        "hook_embed_raw": (2, 12, 64),
        "hook_embed": (2, 12, 64),
        "ln_final.hook_scale": (2, 12, 1),
        "ln_final.hook_normalized": (2, 12, 64),
    }
    for layer in range(2):
        expected.update({f"blocks.{layer}.{k}": v for k, v in BLOCK_HOOKS.items()})
    assert {k: tuple(v.shape) for k, v in cache.items()} == expected
    torch.testing.assert_close(logits, model(idx), atol=1e-5, rtol=1e-5)
    pattern = cache["pattern", 1]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(2, 4, 12))
    assert (pattern.triu(1) == 0).all()
    assert cache.stack_activation("resid_post").shape == (2, 2, 12, 64)
    # hook_embed is what enters the residual stream: the RMSNorm of the raw embedding (hook_embed_raw).
    torch.testing.assert_close(cache["hook_embed"], F.rms_norm(cache["hook_embed_raw"], (64,)))
    # exact by construction: resid_pre 0 is hook_embed's output, the same tensor
    assert torch.equal(cache["resid_pre", 0], cache["hook_embed"])
    # Values are the real activations: hook_q is the c_q projection of ln1's output.
    q = cache["normalized", 0, "ln1"] @ model.blocks[0].attn.c_q.weight.T
    torch.testing.assert_close(cache["q", 0], q.view(2, 12, 4, 16))


def test_activation_cache_layer_norm_helpers_use_our_scales():
    model = random_gpt(small_config())
    _, cache = model.run_with_cache(tokens())
    # apply_ln_to_stack divides by the cached ln1 scale: gives back ln1's normalized input.
    resid = cache["resid_pre", 1][None]
    torch.testing.assert_close(cache.apply_ln_to_stack(resid, layer=1)[0], cache["normalized", 1, "ln1"])
    # accumulated_resid(apply_ln=True) on the final layer re-normalises; its last entry is ln_final's output.
    stack = cache.accumulated_resid(apply_ln=True)
    assert stack.shape == (3, 2, 12, 64)
    torch.testing.assert_close(stack[-1], cache["ln_final.hook_normalized"])


def test_tl_weight_views_reproduce_hooked_activations():
    model = random_gpt(small_config())
    _, cache = model.run_with_cache(tokens())
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    h = cache["normalized", 0, "ln1"]
    torch.testing.assert_close(torch.einsum("bpm,hmd->bphd", h, attn.W_Q), cache["q", 0])
    torch.testing.assert_close(torch.einsum("bpm,hmd->bphd", h, attn._W_K), cache["k", 0])
    torch.testing.assert_close(torch.einsum("bpm,hmd->bphd", h, attn._W_V), cache["v", 0])
    torch.testing.assert_close(cache["normalized", 0, "ln2"] @ mlp.W_in, cache["pre", 0])
    torch.testing.assert_close(cache["post", 0] @ mlp.W_out, cache["mlp_out", 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.W_E[tokens()], cache["embed_raw"])
    logits = 15 * torch.tanh(cache["ln_final.hook_normalized"] @ model.W_U / 15)
    torch.testing.assert_close(logits, model(tokens()), atol=1e-5, rtol=1e-5)
    # Per-head results (from hook_z and W_O) sum to the attention output.
    heads = cache.stack_head_results(layer=1)  # [layer·head, batch, pos, d_model]
    assert heads.shape == (4, 2, 12, 64)
    torch.testing.assert_close(heads.sum(0), cache["attn_out", 0], atol=1e-5, rtol=1e-5)


def test_names_filter_run_takes_fused_path_with_same_numbers():
    model = random_gpt(small_config())
    idx = tokens()
    logits, cache = model.run_with_cache(idx, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert list(cache.keys()) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    # exact on any CPU: hooks on resid_post only keep the fused path, the same kernels on the same shapes
    torch.testing.assert_close(logits, model(idx), atol=0, rtol=0)


def test_writing_to_a_hook_changes_downstream():
    model = random_gpt(small_config())
    idx = tokens()
    clean = model(idx)
    same = model.run_with_hooks(idx, fwd_hooks=[("blocks.1.hook_resid_mid", lambda x, hook: x.clone())])
    # exact on any CPU: an identity hook on resid_mid changes no kernel and no shape
    torch.testing.assert_close(same, clean, atol=0, rtol=0)

    # Zeroing the last-layer MLP input at position 3 changes position 3 only, and exactly as the math says.
    def zero_pos3(x, hook):
        x = x.clone()
        x[:, 3] = 0
        return x

    patched = model.run_with_hooks(idx, fwd_hooks=[("blocks.1.mlp.hook_post", zero_pos3)])
    changed = (patched - clean).abs().amax(-1) > 1e-6
    assert changed[:, 3].all() and not changed[:, :3].any() and not changed[:, 4:].any()
    _, cache = model.run_with_cache(idx)
    expected = cache["resid_mid", 1][:, 3]
    expected = 15 * torch.tanh(F.rms_norm(expected, (64,)) @ model.lm_head.weight.T / 15)
    torch.testing.assert_close(patched[:, 3], expected, atol=1e-5, rtol=1e-5)


def test_zeroing_head_z_equals_zeroing_its_c_proj_columns():
    model = random_gpt(small_config())
    idx = tokens()

    def zero_head0(z, hook):
        z = z.clone()
        z[:, :, 0] = 0
        return z

    hooked = model.run_with_hooks(idx, fwd_hooks=[("blocks.0.attn.hook_z", zero_head0)])
    with torch.no_grad():
        model.blocks[0].attn.c_proj.weight[:, :16] = 0
        by_hand = model(idx)
    torch.testing.assert_close(hooked, by_hand, atol=1e-6, rtol=1e-6)
    assert (hooked - random_gpt(small_config())(idx)).abs().max() > 1e-3  # the ablation did something


@pytest.mark.parametrize("hook_name", ["attn_scores", "pattern"])
def test_explicit_and_fused_attention_agree_in_outputs_and_gradients(hook_name):
    model = random_gpt(small_config(n_layer=2, n_head=4, n_kv_head=1))
    idx, targets = tokens(), tokens(seed=5)

    def loss_and_grads(fwd_hooks):
        model.zero_grad()
        loss = model.run_with_hooks(idx, targets, fwd_hooks=fwd_hooks)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    seen = []
    fused_loss, fused_grads = loss_and_grads([])
    explicit_loss, explicit_grads = loss_and_grads(
        [(f"blocks.{l}.attn.hook_{hook_name}", lambda x, hook: seen.append(hook.name)) for l in range(2)]
    )
    assert seen == [f"blocks.0.attn.hook_{hook_name}", f"blocks.1.attn.hook_{hook_name}"]
    torch.testing.assert_close(explicit_loss, fused_loss, atol=1e-5, rtol=1e-5)
    for name in fused_grads:
        torch.testing.assert_close(explicit_grads[name], fused_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@settings(max_examples=8, deadline=None)
@given(
    n_kv_head=st.sampled_from([1, 2, 4]),
    T=st.integers(1, 20),
    batch=st.integers(1, 3),
    seed=st.integers(0, 1000),
)
def test_attention_paths_agree_property(n_kv_head, T, batch, seed):
    model = random_gpt(small_config(n_layer=1, n_kv_head=n_kv_head), seed=seed)
    idx = torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        fused = model(idx)
        explicit, cache = model.run_with_cache(idx, names_filter="blocks.0.attn.hook_pattern")
        torch.testing.assert_close(explicit, fused, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused, reference_forward(model, idx), atol=1e-5, rtol=1e-5)


def test_gradients_flow_through_hook_activations():
    """Probes during training read a hooked activation and put a loss on it."""
    model = random_gpt(small_config())
    grabbed = {}
    model.run_with_hooks(
        tokens(), fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: grabbed.update(x=x))]
    )
    grabbed["x"].pow(2).mean().backward()
    assert model.blocks[0].mlp.c_fc.weight.grad.abs().sum() > 0
    assert model.blocks[1].mlp.c_fc.weight.grad is None  # downstream of the probe: untouched


def test_transformer_lens_patching_runs_on_our_model():
    model = random_gpt(small_config())
    clean, corrupted = tokens(batch=1, T=6, seed=7), tokens(batch=1, T=6, seed=8)
    _, clean_cache = model.run_with_cache(clean)
    clean_logits = model(clean)

    def metric(logits):
        return (logits[0, -1] - clean_logits[0, -1]).abs().max()

    result = get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert result.shape == (2, 6)
    # Patching one position leaves the others corrupted, so the last-position logits still differ ...
    assert (result > 1e-3).all()
    # ... while patching every position of the residual stream restores the clean run exactly.
    restore = [("blocks.0.hook_resid_pre", lambda x, hook: clean_cache["resid_pre", 0])]
    torch.testing.assert_close(
        model.run_with_hooks(corrupted, fwd_hooks=restore), clean_logits, atol=1e-5, rtol=1e-5
    )


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize("explicit", [False, True])
def test_kv_cache_prefill_then_decode_equals_full_forward(explicit):
    model = random_gpt(small_config(n_kv_head=2))
    idx = tokens(batch=2, T=14)
    fwd_hooks = (
        [(f"blocks.{l}.attn.hook_pattern", lambda x, hook: None) for l in range(2)] if explicit else []
    )
    with torch.no_grad(), model.hooks(fwd_hooks=fwd_hooks):
        full = model(idx)
        cache = KVCache(batch_size=2, num_layers=2, max_len=14)
        parts = [model(idx[:, :5], kv_cache=cache)]  # prefill
        parts.append(model(idx[:, 5:9], kv_cache=cache))  # a chunk after a prefix: masked path
        parts += [model(idx[:, t : t + 1], kv_cache=cache) for t in range(9, 14)]  # one token at a time
    assert cache.get_pos() == 14
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit max_len 14"):
        model(idx[:, :1], kv_cache=cache)


# ---------------------------------------------------------------- bad input and loading


def test_logits_at_returns_the_chosen_positions_and_hooks_still_see_every_position():
    model = random_gpt(small_config())
    idx = tokens(batch=3, T=7)
    at = torch.tensor([6, 0, 3])
    full = model(idx)
    seen = []
    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", lambda x, hook: seen.append(x.shape))]):
        picked = model(idx, logits_at=at)
    torch.testing.assert_close(picked, full[torch.arange(3), at], atol=1e-6, rtol=0)
    assert picked.shape == (3, model.config.vocab_size) and seen == [(3, 7, model.config.n_embd)]
    with pytest.raises(ValueError, match=r"logits_at must be an integer tensor of 3 positions in \[0, 7\), got \[7, 0, 0\]"):
        model(idx, logits_at=torch.tensor([7, 0, 0]))
    with pytest.raises(ValueError, match="cannot be combined with targets"):
        model(idx, idx, logits_at=at)


def test_bad_input_errors():
    model = random_gpt(small_config())
    with pytest.raises(ValueError, match=r"idx must be an integer tensor \[batch, seq\], got torch.float32"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"targets shape \(2, 3\) != idx shape \(2, 4\)"):
        model(tokens(T=4), tokens(T=3))
    with pytest.raises(ValueError, match="exceed the rotary table of 320"):
        model(tokens(batch=1, T=321))
    with pytest.raises(TypeError, match="expected a GPTConfig"):
        GPT({"n_layer": 2})


def test_load_state_dict_checked_names_tensor_and_shapes():
    model = random_gpt(small_config())
    other = GPT(small_config())
    state = model.state_dict()
    other.load_state_dict_checked({f"_orig_mod.{k}": v for k, v in state.items()})
    # exact on any CPU: the same weights through the same kernels on the same shapes
    torch.testing.assert_close(other(tokens()), model(tokens()), atol=0, rtol=0)
    bad = dict(state)
    bad["blocks.1.mlp.c_fc.weight"] = torch.zeros(128, 64)
    del bad["lm_head.weight"]
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as err:
        other.load_state_dict_checked(bad, source="ckpt.safetensors")
    msg = str(err.value)
    assert (
        "tensor 'blocks.1.mlp.c_fc.weight': ckpt.safetensors has shape (128, 64), model expects (256, 64)"
        in msg
    )
    assert "missing tensors ['lm_head.weight']" in msg and "unexpected tensors ['extra.weight']" in msg


# ---------------------------------------------------------------- GPU-minded paths, checked on CPU


@pytest.mark.slow
def test_no_hook_forward_is_one_graph_for_torch_compile():
    """torch.compile(model, fullgraph=True) must not break on the hook points in the no-hook path."""
    model = random_gpt(small_config())
    idx = tokens()
    explanation = torch._dynamo.explain(model)(idx)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    # exact on any CPU: backend='eager' runs the captured graph's ATen ops, the same kernels on the same shapes
    torch.testing.assert_close(compiled(idx), model(idx), atol=0, rtol=0)


BF16_UNIT_ROUNDOFF = 2.0 ** -8  # bf16 keeps 8 significant bits: a rounding moves a value by at most 2^-8 of it


def test_bf16_autocast_forward_and_kv_cache():
    """bf16 full and KV-cached forwards, each against the fp32 forward within bf16 rounding. They are not
    compared with each other bit for bit: bf16 SDPA over 12 queries vs chunks of 7 and 5 rounds differently
    with ATen's AVX2 kernels (measured: 775 of 1,536 logits differ, max 0.0194, on an AMD EPYC and under
    ATEN_CPU_CAPABILITY=avx2 on an Intel Xeon; equal with its AVX-512 kernels)."""
    model = random_gpt(small_config())
    idx = tokens()
    with torch.no_grad():
        exact = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            full = model(idx)
            cache = KVCache(batch_size=2, num_layers=2, max_len=12)
            parts = torch.cat([model(idx[:, :7], kv_cache=cache), model(idx[:, 7:], kv_cache=cache)], dim=1)
    assert full.dtype == torch.float32 and cache.k.dtype == torch.bfloat16  # fp32 soft-capped logits
    # every matmul input is rounded to bf16 on the way through 2 blocks and the head; measured error 2.1
    # roundings of the logits' scale (0.028 on logits up to 3.4) on AVX2 and AVX-512 alike: allow 4
    tol = 4 * BF16_UNIT_ROUNDOFF * exact.abs().max().item()
    for name, got in (("full", full), ("cached", parts)):
        err = (got - exact).abs().max().item()
        assert 1e-4 < err <= tol, f"bf16 {name} forward vs fp32: max |error| {err:.4f}, bf16 bound {tol:.4f}"
