"""The nanochat-2026-07 preset beyond the fixtures: config rules, hook points of the new components, the
two attention paths with sliding windows, patching on it, and that it trains.

(tests/test_nanochat_fixtures.py compares both presets with nanochat's own outputs.)
"""

from __future__ import annotations

import pytest
import torch
import transformer_lens.patching as tlp

from aquainterp.model.gpt import ARCH_2025_10, ARCH_2026_07, GPT, GPTConfig
from aquainterp.patching.pairs import PatchPair
from aquainterp.patching.patcher import Patcher

LETTER_IDS = (40, 41, 42, 43, 44)


def random_2026(seed=0, n_layer=4, sequence_len=256, vocab=50, n_head=2, n_kv_head=1):
    torch.manual_seed(seed)
    config = GPTConfig(sequence_len=sequence_len, vocab_size=vocab, n_layer=n_layer, n_head=n_head,
                       n_kv_head=n_kv_head, n_embd=64, architecture=ARCH_2026_07)
    model = GPT(config)
    model.init_weights()
    with torch.no_grad():  # away from the init, where smear (λ = 0) and the c_proj (zeros) are neutral
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p.shape[-1] ** -0.5)
            else:
                p.uniform_(0.5, 1.0)
    return model.eval()


def test_presets_and_defaults():
    old = GPTConfig.from_dict({"sequence_len": 64, "vocab_size": 50, "n_layer": 2, "n_head": 2, "n_kv_head": 2,
                               "n_embd": 64})  # a config saved before the presets existed
    assert (old.architecture, old.rope_base, old.window_pattern, old.pad_vocab_size_to) == (ARCH_2025_10, 1e4, None, 1)
    assert GPTConfig.from_dict(old.to_dict()) == old
    new = GPTConfig(vocab_size=500, architecture=ARCH_2026_07)
    assert (new.rope_base, new.window_pattern, new.padded_vocab_size) == (1e5, "SSSL", 512)
    assert GPTConfig(sequence_len=2048, n_layer=6, architecture=ARCH_2026_07).window_sizes() == \
        [512, 512, 512, 2048, 512, 2048]  # ceil(2048/4/128)·128 (nanochat's comment says 768, its code 512)
    assert [new.has_value_embedding(i) for i in range(12)] == [i % 2 == 1 for i in range(12)]  # last included
    assert [GPTConfig(n_layer=4, architecture=ARCH_2026_07).has_value_embedding(i) for i in range(4)] == \
        [False, True, False, True]


@pytest.mark.parametrize("bad, message", [
    ({"architecture": "nanochat-2024"}, "architecture must be one of"),
    ({"window_pattern": "SSSL"}, "has no sliding windows"),
    ({"architecture": ARCH_2026_07, "window_pattern": "SXL"}, "string of S and L"),
    ({"rotary_dtype": "float16"}, "rotary_dtype"),
    ({"rope_base": 0.5}, "rope_base"),
    ({"pad_vocab_size_to": 0}, "pad_vocab_size_to"),
])
def test_config_errors_are_one_line(bad, message):
    with pytest.raises(ValueError, match=message) as info:
        GPTConfig(**bad)
    assert "\n" not in str(info.value)


def test_padded_vocab_is_cropped_everywhere():
    model = random_2026(vocab=50)  # padded to 64
    assert model.wte.weight.shape[0] == model.lm_head.weight.shape[0] == 64
    ids = torch.randint(0, 50, (2, 10))
    logits = model(ids)
    assert logits.shape == (2, 10, 50)
    assert model.W_U.shape == (64, 50) and model.W_E.shape == (50, 64)
    one = model(ids, logits_at=torch.tensor([3, 9]))
    torch.testing.assert_close(one, logits[[0, 1], [3, 9]], rtol=0, atol=1e-6)


def test_new_hooks_read_what_the_forward_computes():
    """hook_smear is the smear addition (0 at the first position), blocks.{l}.hook_resid_pre is the λ-mixed
    stream, attn.hook_v = c_v(x) + attn.hook_ve, and ln_final reads resid_post(last) - hook_backout."""
    model = random_2026()
    ids = torch.randint(0, 50, (2, 20))
    logits, cache = model.run_with_cache(ids)
    torch.testing.assert_close(logits, model(ids), rtol=0, atol=1e-5)  # cached pattern: explicit path
    n = model.config.n_layer
    assert cache["hook_smear"][:, 0].abs().max() == 0 and cache["hook_smear"][:, 1:].abs().max() > 0
    x0 = cache["hook_x0"]
    prev = x0
    for layer in range(n):
        expected = model.resid_lambdas[layer] * prev + model.x0_lambdas[layer] * x0
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], expected, rtol=1e-6, atol=1e-6)
        prev = cache[f"blocks.{layer}.hook_resid_post"]
    for layer in (1, 3):  # value-embedding layers
        v_proj = model.blocks[layer].attn.c_v(cache[f"blocks.{layer}.ln1.hook_normalized"]).view(2, 20, 1, 32)
        torch.testing.assert_close(cache[f"blocks.{layer}.attn.hook_v"], v_proj + cache[f"blocks.{layer}.attn.hook_ve"])
        gate = cache[f"blocks.{layer}.attn.hook_ve_gate"]
        assert gate.shape == (2, 20, 1) and 0 < gate.min() and gate.max() < 3
    assert "blocks.0.attn.hook_ve" not in cache.cache_dict
    mid = cache[f"blocks.{n // 2}.hook_resid_post"]
    torch.testing.assert_close(cache["hook_backout"], model.backout_lambda * mid)
    final_in = cache[f"blocks.{n - 1}.hook_resid_post"] - cache["hook_backout"]
    torch.testing.assert_close(cache["ln_final.hook_normalized"], torch.nn.functional.rms_norm(final_in, (64,)))


def test_hooks_change_the_output():
    """A hook on each new component reaches the logits (they are in the computation, not copies)."""
    model = random_2026()
    ids = torch.randint(0, 50, (1, 16))
    base = model(ids)
    for name in ("hook_smear", "hook_x0", "hook_backout", "blocks.1.attn.hook_ve", "blocks.3.attn.hook_ve_gate"):
        patched = model.run_with_hooks(ids, fwd_hooks=[(name, lambda act, hook: act * 0.5)])
        assert (patched - base).abs().max() > 1e-4, name


def test_sliding_window_explicit_path_equals_fused_and_masks_the_window():
    model = random_2026(sequence_len=256)  # short window 128
    ids = torch.randint(0, 50, (1, 180))
    fused = model(ids)
    logits, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    torch.testing.assert_close(logits, fused, rtol=0, atol=2e-5)
    short, full = cache["pattern", 0][0], cache["pattern", 3][0]  # layers 0 (S) and 3 (L)
    q, k = torch.meshgrid(torch.arange(180), torch.arange(180), indexing="ij")
    assert short[:, (q - k > 128)].abs().max() == 0
    assert short[:, (q - k <= 128) & (k <= q)].min() > 0
    assert full[:, (k <= q)].min() > 0  # the long layer sees everything


def test_2026_trains():
    """A few AdamW steps on a fixed batch lower the loss from nanochat's 2026-07 init (every parameter,
    including the new scalars and gates, gets a gradient)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, n_embd=64,
                          architecture=ARCH_2026_07))
    model.init_weights()
    assert model.smear_lambda.item() == 0 and model.backout_lambda.item() == pytest.approx(0.2)
    ids = torch.randint(0, 50, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert all(p.grad is not None for p in model.parameters())
    assert model.smear_lambda.grad.abs().item() > 0
    assert losses[-1] < 0.7 * losses[0]


def _pairs(n=3, length=14, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, 40, (length,), generator=g).tolist()
        bad = list(ids)
        bad[2] = (bad[2] + 7) % 40
        bad[length // 2] = (bad[length // 2] + 3) % 40
        out.append(PatchPair(f"p{i}", tuple(ids), tuple(bad), LETTER_IDS[i % 5], LETTER_IDS[(i + 1) % 5], LETTER_IDS))
    return out


@pytest.mark.parametrize("name, tl_function", [("resid_pre", tlp.get_act_patch_resid_pre),
                                                ("z", tlp.get_act_patch_attn_head_out_all_pos)])
def test_patching_a_2026_model_equals_transformer_lens(name, tl_function):
    """Patching cannot resume mid-stream on 2026-07 (its residual needs x0, λs, value embeddings, backout):
    it runs the model's own forward per patch, and equals transformer_lens.patching."""
    model = random_2026(vocab=50, n_layer=2)
    patcher = Patcher(model, _pairs(), batch_size=8, progress=False)
    assert patcher.reuse_prefix is False
    ours = patcher.sweep(name, "denoise")
    _, clean_cache = model.run_with_cache(patcher.tokens["clean"])
    ref = tl_function(model, patcher.tokens["corrupted"], clean_cache, patcher.metric)
    assert ref.abs().max() > 0.05
    torch.testing.assert_close(ours.normalized, ref, atol=1e-5, rtol=0)


def test_optimizer_groups_follow_nanochat_2026():
    """Every parameter in exactly one group; the 2026 additions get nanochat 92d63d4's AdamW settings;
    a 2025-10 model keeps the two AdamW groups."""
    from training.optim import build_optimizers

    model = random_2026()
    muon, adam = build_optimizers(model, d_model=64)
    seen = [id(p) for opt in (muon, adam) for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())
    by_param = {id(p): g for g in adam.param_groups for p in g["params"]}
    embed = by_param[id(model.wte.weight)]
    assert by_param[id(model.value_embeds["1"].weight)]["lr"] == pytest.approx(0.5 * embed["lr"])
    assert by_param[id(model.x0_lambdas)]["betas"] == (0.96, 0.95)
    assert by_param[id(model.resid_lambdas)]["lr"] == pytest.approx(0.005)
    assert by_param[id(model.resid_lambdas)]["weight_decay"] == 0.05
    assert by_param[id(model.smear_lambda)]["lr"] == by_param[id(model.backout_lambda)]["lr"] == 0.2
    assert any(p is model.blocks[1].attn.ve_gate.weight for g in muon.param_groups for p in g["params"])
    old = GPT(GPTConfig(sequence_len=64, vocab_size=50, n_layer=2, n_head=2, n_kv_head=2, n_embd=64))
    assert len(build_optimizers(old, d_model=64)[1].param_groups) == 2
