"""Our GPT against checkpoints and outputs written by nanochat's own code (../shared/fixtures/nanochat).

The fixtures are the reference: nothing here re-implements nanochat. nanochat-head-d4 is the 2026-07
architecture (92d63d4), nanochat-2026-01-d2 the Oct-2025 one with bf16 rotary tables (2c4473d); both
have weights randomised away from nanochat's init so every feature matters.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aquainterp.checkpoints.nanochat import load_nanochat, state_to_nanochat
from aquainterp.model.engine import Engine
from aquainterp.model.gpt import ARCH_2025_10, ARCH_2026_07
from aquainterp.model.kv_cache import KVCache
from aquainterp.model.scoring import completion_logits

FIXTURES = Path(os.environ.get("AQUAINTERP_SHARED_FIXTURES",
                               Path(__file__).resolve().parents[2] / "shared" / "fixtures")) / "nanochat"
NAMES = ["nanochat-head-d4", "nanochat-2026-01-d2"]


def fixture(name: str) -> Path:
    path = FIXTURES / name
    if not path.is_dir():
        pytest.fail(f"nanochat fixture {path} not found (set AQUAINTERP_SHARED_FIXTURES)")
    return path


@pytest.fixture(scope="module", params=NAMES)
def loaded(request):
    path = fixture(request.param)
    model, tokenizer, meta = load_nanochat(path)
    return request.param, model, tokenizer, load_file(str(path / "reference.safetensors"))


def test_architecture_read_from_the_checkpoint(loaded):
    name, model, tokenizer, _ = loaded
    c = model.config
    if name == "nanochat-head-d4":
        assert (c.architecture, c.rope_base, c.window_pattern, c.rotary_dtype) == (ARCH_2026_07, 1e5, "SSSL", "float32")
        assert c.window_sizes() == [128, 128, 128, 256]
        assert sorted(model.value_embeds) == ["1", "3"]
    else:
        assert (c.architecture, c.rope_base, c.rotary_dtype) == (ARCH_2025_10, 1e4, "bfloat16")
    assert (c.vocab_size, c.padded_vocab_size) == (500, 512)
    assert tokenizer is not None and tokenizer.vocab_size == 500


def test_logits_loss_and_every_gradient_match_nanochat(loaded):
    name, model, _, ref = loaded
    with torch.no_grad():
        logits = model(ref["input_ids"])
    assert logits.shape == ref["logits"].shape
    assert (logits - ref["logits"]).abs().max().item() <= 1e-4
    model.zero_grad()
    loss = model(ref["input_ids"], targets=ref["targets"])
    assert abs(loss.item() - ref["loss"].item()) <= 1e-5
    loss.backward()
    grads = state_to_nanochat({k: p.grad for k, p in model.named_parameters()})
    expected = {k.removeprefix("grad."): v for k, v in ref.items() if k.startswith("grad.")}
    assert set(grads) == set(expected)
    for k, g in grads.items():
        rel = ((g - expected[k]).abs().max() / expected[k].abs().max()).item()
        assert rel <= 1e-4, f"{name} grad {k}: relative error {rel:.2e}"
    model.zero_grad()


def test_engine_greedy_equals_nanochat_engine(loaded):
    """nanochat's Engine decodes with its KV cache (and, in 2026-07, smear's cached embedding), stopping at
    <|assistant_end|> or <|bos|> (the token is kept)."""
    _, model, tokenizer, ref = loaded
    stops = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id}
    out = Engine(model).generate(ref["prompt"].tolist(), max_new_tokens=24, temperature=0.0, stop_tokens=stops)
    assert out.completions[0] == ref["greedy"].tolist()
    # several samples share one prefill: the cache (smear's embedding included) is copied to every row
    out = Engine(model).generate(ref["prompt"].tolist(), num_samples=3, max_new_tokens=24, temperature=0.0,
                                 stop_tokens=stops)
    assert out.completions == [ref["greedy"].tolist()] * 3


def test_bf16_rotary_option_is_what_makes_2026_01_match():
    """Without nanochat 2c4473d's bf16 rotary tables the logits are off by more than 1e-3: the option matters."""
    path = fixture("nanochat-2026-01-d2")
    model, _, _ = load_nanochat(path)
    ref = load_file(str(path / "reference.safetensors"))
    model.set_rotary_dtype("float32")
    with torch.no_grad():
        err = (model(ref["input_ids"]) - ref["logits"]).abs().max().item()
    assert err > 1e-3


def test_decoding_past_the_short_window_equals_the_full_forward():
    """KV-cache decoding token by token (windows of 128 keys, smear's cached embedding) gives the logits
    of one full forward, beyond the short window."""
    model, _, _ = load_nanochat(fixture("nanochat-head-d4"))
    ids = load_file(str(fixture("nanochat-head-d4") / "reference.safetensors"))["input_ids"][:1]  # 200 tokens
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(1, model.config.n_layer, ids.size(1))
        steps = [model(ids[:, :100], kv_cache=cache)]
        steps += [model(ids[:, t : t + 1], kv_cache=cache) for t in range(100, ids.size(1))]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4
    # dropping smear's state changes the next token's logits: the cached embedding is really used
    with torch.no_grad():
        cache = KVCache(1, model.config.n_layer, ids.size(1))
        model(ids[:, :100], kv_cache=cache)
        cache.prev_embedding = torch.zeros_like(cache.prev_embedding)
        assert (model(ids[:, 100:101], kv_cache=cache) - full[:, 100:101]).abs().max().item() > 1e-3


def test_batched_left_padded_and_shared_prompt_paths_match_alone():
    """generate_batch (left padding: a row's first real token has nothing to smear) and SharedPrompt
    (continuations smear with the prompt's last embedding) compute what each sequence gives alone."""
    model, tokenizer, _ = load_nanochat(fixture("nanochat-head-d4"))
    prompts = [tokenizer.encode("Question: 3 + 4?", prepend="<|bos|>"),
               tokenizer.encode("Question: how many apples are on the table today?", prepend="<|bos|>")]
    engine = Engine(model)
    alone = [engine.generate(p, max_new_tokens=12, temperature=0.0).completions[0] for p in prompts]
    together = engine.generate_batch(prompts, max_new_tokens=12, temperature=0.0)
    assert [g.completions[0] for g in together] == alone
    completions = [alone[0][:5], alone[0][:9]]
    with torch.no_grad():
        logits, targets = completion_logits(model, prompts[0], completions, pad_id=0)
        for i, comp in enumerate(completions):
            full = model(torch.tensor([prompts[0] + comp]))[0, len(prompts[0]) - 1 : -1]
            assert (logits[i, : len(comp)] - full).abs().max().item() < 1e-4


def test_left_padded_decoding_past_the_window_matches_alone():
    """Rows of different lengths decoding beyond the 128-key window (the fused path then reads only the
    window's keys, masks sliced along) give what each row gives alone."""
    path = fixture("nanochat-head-d4")
    model, _, _ = load_nanochat(path)
    ids = load_file(str(path / "reference.safetensors"))["input_ids"]
    prompts = [ids[0, :120].tolist(), ids[1, :97].tolist()]
    engine = Engine(model)
    alone = [engine.generate(p, max_new_tokens=40, temperature=0.0).completions[0] for p in prompts]
    together = engine.generate_batch(prompts, max_new_tokens=40, temperature=0.0)
    assert [g.completions[0] for g in together] == alone
    with torch.no_grad():  # and alone equals a full forward's greedy continuation, token by token
        seq = torch.tensor([prompts[0] + alone[0]])
        assert model(seq)[0, len(prompts[0]) - 1 : -1].argmax(-1).tolist() == alone[0]
