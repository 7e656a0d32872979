"""The HookedTransformer methods a TransformerLens user reaches for first (issue 28), each against an
independent witness: `generate` against our Engine and nanochat's own Engine output (the fixtures),
`stop_at_layer` against the hook that reads that residual and against TL's TransformerBridge, `model.tokenizer`
(transformers) against our tokenizer's ids on the AQuA dev rows no tokenizer here was trained on, and the
logit-difference decomposition against the logits before the soft-cap. tests/test_tl_demos.py runs the
tutorials' calls."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_lens import corpus, ioi_tokens_and_answers, random_model
from transformer_lens import utilities as tl_utils
from transformers import PreTrainedTokenizerFast

from aquainterp.checkpoints.huggingface import export_hf, load_transformer_bridge
from aquainterp.checkpoints.nanochat import load_nanochat
from aquainterp.model.engine import Engine
from aquainterp.model.gpt import GPT, GPTConfig
from aquainterp.model.kv_cache import KVCache
from aquainterp.tokenizer import Tokenizer

FIXTURES = Path(os.environ.get("AQUAINTERP_SHARED_FIXTURES",
                               Path(__file__).resolve().parents[2] / "shared" / "fixtures")) / "nanochat"
PROMPTS = ["When John and Mary went to the shops, John gave the bag to", "After Amy", "Many important transition"]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ran out of pairs to merge")
        return Tokenizer.train_from_iterator(corpus(), vocab_size=600)


def nanochat_fixture(name: str):
    path = FIXTURES / name
    if not path.is_dir():
        pytest.fail(f"nanochat fixture {path} not found (set AQUAINTERP_SHARED_FIXTURES)")
    model, tokenizer, _ = load_nanochat(path)
    return model.eval(), tokenizer, load_file(str(path / "reference.safetensors"))


def stops(tokenizer) -> set[int]:
    return {tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_token_id}


# ---------------------------------------------------------------- generate


def test_generate_greedy_equals_engine_token_for_token(tok):
    model = random_model(tok)
    for prompt in PROMPTS:
        ids = model.to_tokens(prompt)[0].tolist()
        engine = Engine(model).generate(ids, max_new_tokens=30, temperature=0.0, stop_tokens=stops(tok))
        out = model.generate(prompt, max_new_tokens=30, do_sample=False, return_type="tokens", verbose=False)
        assert out.shape[0] == 1 and out[0, :len(ids)].tolist() == ids
        assert out[0, len(ids):].tolist() == engine.completions[0], prompt
        # temperature 0 in TL's sampler is greedy too; without the KV cache the same tokens come out
        assert torch.equal(model.generate(prompt, max_new_tokens=30, temperature=0.0, return_type="tokens",
                                          verbose=False), out)
        assert torch.equal(model.generate(prompt, max_new_tokens=30, do_sample=False, use_past_kv_cache=False,
                                          return_type="tokens", verbose=False), out)
        # text in, text out: decoded as TL decodes (special tokens skipped, so without the <|bos|>)
        text = model.generate(prompt, max_new_tokens=30, do_sample=False, verbose=False)
        assert text == model.tokenizer.decode(out[0], skip_special_tokens=True) and text.startswith(prompt)
        # token ids in, token ids out (return_type "input")
        assert torch.equal(model.generate(out[:, :len(ids)], max_new_tokens=30, do_sample=False, verbose=False), out)
    # a stop token ends the generation, kept, as Engine keeps it
    ids = model.to_tokens(PROMPTS[0])[0].tolist()
    free = Engine(model).generate(ids, max_new_tokens=30, temperature=0.0).completions[0]
    stop = free[5]
    engine = Engine(model).generate(ids, max_new_tokens=30, temperature=0.0, stop_tokens={stop})
    out = model.generate(PROMPTS[0], max_new_tokens=30, do_sample=False, eos_token_id=stop, return_type="tokens",
                         verbose=False)
    assert out[0, len(ids):].tolist() == engine.completions[0] == free[: free.index(stop) + 1]


@pytest.mark.parametrize("name", ["nanochat-head-d4", "nanochat-2026-01-d2"])
def test_generate_equals_nanochat_engine_on_its_checkpoints(name):
    """nanochat's own Engine.generate wrote `greedy` (temperature 0, KV cache, stops at <|assistant_end|> or
    <|bos|>): generate's default stop tokens are those two."""
    model, tokenizer, ref = nanochat_fixture(name)
    prompt = ref["prompt"][None]
    out = model.generate(prompt, max_new_tokens=24, do_sample=False, verbose=False)
    assert out[0, prompt.shape[1]:].tolist() == ref["greedy"].tolist()
    assert model.tokenizer.eos_token_id == tokenizer.encode_special("<|assistant_end|>")
    # left-padded text rows (2026-07: smear and sliding windows with padding) each as if alone
    texts = [tokenizer.decode(ref["prompt"][1:].tolist()), "Question: 2 + 2?"]
    kwargs = dict(max_new_tokens=8, do_sample=False, stop_at_eos=False, return_type="tokens", verbose=False)
    batch = model.generate(texts, **kwargs)
    for row, text in zip(batch, texts):
        single = model.generate(text, **kwargs)[0]
        assert row[len(row) - len(single):].tolist() == single.tolist()


def test_generate_batches_left_padded_rows_and_pads_finished_ones(tok):
    model = random_model(tok)
    singles = [model.generate(p, max_new_tokens=12, do_sample=False, stop_at_eos=False, return_type="tokens",
                              verbose=False)[0] for p in PROMPTS]
    batch = model.generate(PROMPTS, max_new_tokens=12, do_sample=False, stop_at_eos=False, return_type="tokens",
                           verbose=False)
    width = max(len(s) for s in singles)
    pad = model.tokenizer.pad_token_id
    for row, single in zip(batch, singles):
        assert row[width - len(single):].tolist() == single.tolist()  # left-padded, each row as if alone
        assert (row[: width - len(single)] == pad).all()
    texts = model.generate(PROMPTS, max_new_tokens=12, do_sample=False, stop_at_eos=False, verbose=False)
    assert texts == [model.tokenizer.decode(s, skip_special_tokens=True) for s in singles]
    # TL: a row that samples a stop token is finished; its later tokens are the eos (padding); the rest go on
    first_new = singles[0][len(model.to_tokens(PROMPTS[0])[0])].item()
    assert first_new not in singles[1][-12:].tolist()
    out = model.generate(PROMPTS[:2], max_new_tokens=12, do_sample=False, eos_token_id=first_new,
                         return_type="tokens", verbose=False)
    assert out[0, -12:].tolist() == [first_new] * 12
    assert out[1, -12:].tolist() == singles[1][-12:].tolist()


def test_generate_samples_as_tl_samples(tok, capsys):
    model = random_model(tok)
    greedy = model.generate(PROMPTS[0], max_new_tokens=10, do_sample=False, stop_at_eos=False, return_type="tokens",
                            verbose=False)
    for kwargs in ({"top_k": 1}, {"top_p": 1e-6}):  # one candidate left: the argmax
        torch.manual_seed(1)
        out = model.generate(PROMPTS[0], max_new_tokens=10, stop_at_eos=False, return_type="tokens", verbose=False,
                             **kwargs)
        assert torch.equal(out, greedy), kwargs
    torch.manual_seed(0)
    a = model.generate(PROMPTS[0], max_new_tokens=10, temperature=2.0, stop_at_eos=False, return_type="tokens",
                       verbose=False)
    torch.manual_seed(0)
    b = model.generate(PROMPTS[0], max_new_tokens=10, temperature=2.0, stop_at_eos=False, return_type="tokens",
                       verbose=False)
    assert torch.equal(a, b) and not torch.equal(a, greedy)  # seeded; temperature 2 leaves the argmax path
    # a frequency penalty larger than any logit gap never repeats a token of the text so far
    torch.manual_seed(0)
    out = model.generate(PROMPTS[0], max_new_tokens=10, temperature=1.0, freq_penalty=1e4, stop_at_eos=False,
                         return_type="tokens", verbose=False)[0].tolist()
    prompt_len = len(model.to_tokens(PROMPTS[0])[0])
    assert all(t not in out[:prompt_len + i] for i, t in enumerate(out[prompt_len:]))
    model.generate(PROMPTS[0], max_new_tokens=3, stop_at_eos=False, verbose=True)
    assert "generate" in capsys.readouterr().err  # the progress bar


def test_generate_refuses_what_it_cannot_do(tok):
    model = random_model(tok)
    cases = [
        ({"input": torch.randn(1, 3, 64)}, TypeError, "embeddings are not supported"),
        ({"input": PROMPTS[0], "return_type": "embeds"}, ValueError, "embedding input/output is not supported"),
        ({"input": PROMPTS[0], "max_new_tokens": -1}, ValueError, "max_new_tokens must be an int >= 0"),
        ({"input": PROMPTS[0], "top_p": 0.0}, ValueError, r"top_p must be None or in \(0, 1\]"),
        ({"input": PROMPTS[0], "top_k": 0}, ValueError, "top_k must be None or an int >= 1"),
        ({"input": PROMPTS[0], "temperature": -1.0}, ValueError, "temperature must be >= 0"),
        ({"input": torch.tensor([[1, 10_000]])}, ValueError, rf"token ids must be in \[0, {tok.vocab_size}\)"),
        ({"input": PROMPTS[0], "eos_token_id": [10_000]}, ValueError, "eos_token_id must be an id"),
        ({"input": [1, 2, 3]}, TypeError, "input must be a str, a non-empty list of str"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            model.generate(verbose=False, **kwargs)
    bare = GPT(GPTConfig(sequence_len=16, vocab_size=64, n_layer=1, n_head=1, n_kv_head=1, n_embd=64))
    with pytest.raises(ValueError, match="stop_at_eos needs eos_token_id when the model has no tokenizer"):
        bare.generate(torch.tensor([[1, 2]]), verbose=False)
    assert bare.generate(torch.tensor([[1, 2]]), max_new_tokens=2, stop_at_eos=False, verbose=False).shape == (1, 4)


# ---------------------------------------------------------------- stop_at_layer


def resid_cache(model, tokens):
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_resid_pre", "hook_resid_post")))
    return cache


@torch.no_grad()
@pytest.mark.parametrize("architecture", ["nanochat-2025-10", "nanochat-2026-07"])
def test_stop_at_layer_returns_the_stream_block_k_reads(tok, architecture):
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=64, vocab_size=tok.vocab_size, n_layer=3, n_head=2, n_kv_head=2, n_embd=64,
                          architecture=architecture))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.set_tokenizer(tok)
    tokens = model.to_tokens(PROMPTS)
    cache = resid_cache(model, tokens)
    n = model.cfg.n_layers
    for k in range(-n, n):
        # exact by construction: the same ops as the forward that fed the hook
        got, want = model(tokens, stop_at_layer=k), cache[f"blocks.{k % n}.hook_resid_pre"]
        assert torch.equal(got, want), (k, (got - want).abs().max())
    # all blocks: what ln_final reads (2026-07: after backout, so not the last block's output)
    everything = model(tokens, stop_at_layer=n)
    normed = model.run_with_cache(tokens, names_filter="ln_final.hook_normalized")[1]["ln_final.hook_normalized"]
    torch.testing.assert_close(torch.nn.functional.rms_norm(everything, (64,)), normed, atol=1e-6, rtol=0)
    assert torch.equal(everything, cache["resid_post", -1]) == (architecture == "nanochat-2025-10")
    # run_with_cache: TL's semantics: the residual out, only the hooks that ran in the cache, names_filter kept
    resid, small = model.run_with_cache(tokens, stop_at_layer=1)  # (pattern hooked: explicit softmax, rounding)
    torch.testing.assert_close(resid, cache["blocks.1.hook_resid_pre"], atol=1e-5, rtol=1e-6)
    assert small.keys() and all(not k.startswith(("blocks.1.", "blocks.2.", "ln_final")) for k in small.keys())
    resid, one = model.run_with_cache(tokens, stop_at_layer=-1, names_filter=["blocks.0.attn.hook_pattern"])
    assert list(one.keys()) == ["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(resid, cache["blocks.2.hook_resid_pre"], atol=1e-5, rtol=1e-6)
    # string input, as forward takes it; left-padded rows keep their own positions (each row as alone)
    assert torch.equal(model(PROMPTS, stop_at_layer=2), cache["blocks.2.hook_resid_pre"])
    left = model(PROMPTS, padding_side="left", stop_at_layer=2)
    for i, prompt in enumerate(PROMPTS):
        alone = model(prompt, stop_at_layer=2)[0]
        torch.testing.assert_close(left[i, left.shape[1] - len(alone):], alone, atol=1e-5, rtol=1e-5)
    for kwargs, message in (({"stop_at_layer": n + 1}, r"stop_at_layer must be an int in \[-3, 3\]"),
                            ({"stop_at_layer": 1.0}, "stop_at_layer must be an int"),
                            ({"stop_at_layer": 1, "kv_cache": KVCache(3, n, 64)}, "cannot be combined with kv_cache"),
                            ({"stop_at_layer": 1, "targets": tokens}, "cannot be combined with targets")):
        with pytest.raises(ValueError, match=message):
            model(tokens, **kwargs)


@pytest.fixture(scope="module")
def bridge_pair(tok, tmp_path_factory):
    """A random GQA GPT and TL's TransformerBridge over its HF export (same weights, same tokenizer)."""
    model = random_model(tok, n_kv_head=2)
    bridge = load_transformer_bridge(export_hf(model, model.native_tokenizer, tmp_path_factory.mktemp("hf") / "hf"))
    return model, bridge.eval()


@torch.no_grad()
def test_stop_at_layer_equals_transformer_lens(bridge_pair):
    """TL's TransformerBridge over the HF export of the same weights: the same residual for every k < n_layers.
    (At k = n_layers TL 4.3's bridge returns logits, where HookedTransformer returned the stream; ours returns
    the stream, as HookedTransformer did.)"""
    model, bridge = bridge_pair
    tokens = model.to_tokens(PROMPTS[0])
    assert torch.equal(tokens, bridge.to_tokens(PROMPTS[0]).cpu())
    # the export's tokenizer_config names the same special tokens as model.tokenizer, so lists pad alike
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    assert [getattr(bridge.tokenizer, i) for i in ids] == [getattr(model.tokenizer, i) for i in ids]
    assert torch.equal(model.to_tokens(PROMPTS), bridge.to_tokens(PROMPTS).cpu())
    for k in (0, 1, -1, -2):
        torch.testing.assert_close(model(tokens, stop_at_layer=k), bridge(tokens, stop_at_layer=k).cpu(),
                                   atol=1e-5, rtol=1e-5)
    ours, cache = model.run_with_cache(tokens, stop_at_layer=1, names_filter=["blocks.0.attn.hook_pattern"])
    theirs, their_cache = bridge.run_with_cache(tokens, stop_at_layer=1, names_filter=["blocks.0.attn.hook_pattern"])
    torch.testing.assert_close(ours, theirs.cpu(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cache["pattern", 0], their_cache["pattern", 0].cpu(), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- model.tokenizer


def aqua_texts(shared_data) -> list[str]:
    texts = []
    for line in (shared_data / "aqua_rat" / "dev.json").read_text().splitlines():
        row = json.loads(line)
        texts += [row["question"], *row["options"], row["rationale"]]
    return texts


def test_hf_tokenizer_gives_our_ids_on_the_aqua_dev_rows(shared_data, tok):
    """The AQuA dev split (254 rows: questions, options, rationales) was never a training text of either
    tokenizer: nanochat's own (the fixture's, trained by nanochat) and ours (trained on IOI sentences)."""
    texts = aqua_texts(shared_data)
    assert len(texts) == 254 * 7
    for model in (nanochat_fixture("nanochat-2026-01-d2")[0], random_model(tok)):
        native, hf = model.native_tokenizer, model.tokenizer
        assert isinstance(hf, PreTrainedTokenizerFast) and hf is model.tokenizer  # built once
        ours = native.encode_batch(texts)
        assert hf(texts)["input_ids"] == ours  # callable; adds no special token (TL's to_tokens adds <|bos|>)
        assert [hf.encode(t, add_special_tokens=False) for t in texts[:50]] == ours[:50]
        assert hf.batch_decode(ours) == [native.decode(ids) for ids in ours]
        assert sum(map(len, ours)) > 50_000 and len({len(ids) for ids in ours}) > 100
        assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (
            native.bos_token_id, native.encode_special("<|assistant_end|>"), native.encode_special("<|assistant_end|>"))
        assert len(hf) == native.vocab_size
        # special-token strings in user text stay ordinary text, as in our tokenizer
        text = "say <|bos|> and <|assistant_end|> literally"
        assert hf(text)["input_ids"] == native.encode(text)
        assert hf.decode([native.bos_token_id, *native.encode("x")], skip_special_tokens=True) == "x"
        # padding and the mask TL computes from it agree with to_tokens'
        batch = hf(texts[:3], padding=True, return_tensors="pt")
        assert batch["input_ids"].shape[1] == max(len(ids) for ids in ours[:3])
        tokens = model.to_tokens(texts[:3], prepend_bos=False, truncate=False)
        assert torch.equal(tokens, batch["input_ids"])
        mask = tl_utils.get_attention_mask(hf, tokens, prepend_bos=False)
        assert torch.equal(mask.bool(), batch["attention_mask"].bool())


def test_tl_code_that_tokenizes_through_model_tokenizer_runs(bridge_pair):
    """TL's IOI evaluation builds its dataset with model.tokenizer (encode, decode, bos id) and runs the model:
    the same numbers on ours as on TL's bridge of the same weights."""
    from transformer_lens import evals

    model, bridge = bridge_pair
    dataset = evals.IOIDataset(tokenizer=model.tokenizer, num_samples=24, seed=1)
    assert all(row["prompt"][0].item() == model.tokenizer.bos_token_id for row in dataset)
    ours = evals.ioi_eval(model, dataset=dataset, batch_size=8)
    theirs = evals.ioi_eval(bridge, dataset=dataset, batch_size=8)
    assert ours.keys() == theirs.keys() == {"Logit Difference", "Accuracy"}
    assert abs(ours["Logit Difference"] - theirs["Logit Difference"]) < 1e-4 and ours["Accuracy"] == theirs["Accuracy"]


def test_native_tokenizer_is_ours_and_tokenizer_follows_it(tok):
    model = random_model(tok)
    assert model.native_tokenizer is tok and model.tokenizer.name_or_path == model.cfg.tokenizer_name
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ran out of pairs to merge")
        other = Tokenizer.train_from_iterator(["a b c d e f g " * 50], vocab_size=512)
    model.tokenizer = other  # TL-style assignment of our Tokenizer: set_tokenizer
    assert model.native_tokenizer is other and model.tokenizer("a b")["input_ids"] == other.encode("a b")
    model.tokenizer = None
    assert model.tokenizer is None and model.native_tokenizer is None
    with pytest.raises(TypeError, match=r"expected an aquainterp.tokenizer.Tokenizer, got \w+ \(no .fingerprint.\)"):
        model.tokenizer = tok.hf_pretrained_tokenizer()
    with pytest.raises(ValueError, match="no tokenizer; load_model attaches"):
        model.to_tokens("x")


# ---------------------------------------------------------------- logit differences and the soft-cap


@torch.no_grad()
def test_logit_difference_decomposition_is_exact_before_the_cap(tok):
    """The Exploratory demo's check 'calculated logit diff == original logit diff' fails on a soft-capped
    model (TL's own Gemma-2 models included): the decomposition sums to the logits before the cap."""
    model = random_model(tok)
    model.lm_head.weight.mul_(20.0)  # logits well into the cap's bend, so the cap matters
    tokens, answers = ioi_tokens_and_answers(model)
    logits, cache = model.run_with_cache(tokens)
    pre = cache.logits_before_softcap(pos_slice=-1)  # [batch, d_vocab]
    torch.testing.assert_close(model.adapter.apply_output_logits_transform(pre), logits[:, -1], atol=1e-5, rtol=0)
    pre_diff = pre.gather(1, answers[:, :1])[:, 0] - pre.gather(1, answers[:, 1:])[:, 0]
    capped_diff = logits[:, -1].gather(1, answers[:, :1])[:, 0] - logits[:, -1].gather(1, answers[:, 1:])[:, 0]
    assert (pre_diff - capped_diff).abs().max() > 1.0  # the demo's mismatch, here by construction
    # every component's attribution: they sum to the pre-cap difference
    stack = cache.get_full_resid_decomposition(pos_slice=-1, expand_neurons=False)
    attrs = cache.logit_attrs(stack, tokens=answers[:, 0], incorrect_tokens=answers[:, 1], pos_slice=-1)
    torch.testing.assert_close(attrs.sum(0), pre_diff, atol=1e-3, rtol=1e-5)
    # the demo's own calculation (apply_ln_to_stack on the final stream, dotted with W_U differences)
    dirs = model.tokens_to_residual_directions(answers)
    scaled = cache.apply_ln_to_stack(cache["resid_post", -1][:, -1], layer=-1, pos_slice=-1)
    torch.testing.assert_close((scaled * (dirs[:, 0] - dirs[:, 1])).sum(-1), pre_diff, atol=1e-3, rtol=1e-5)
    # the capped difference from the pre-cap logits; the cap's derivative gives its first order
    cap = model.cfg.output_logits_soft_cap
    a, b = pre.gather(1, answers[:, :1])[:, 0], pre.gather(1, answers[:, 1:])[:, 0]
    torch.testing.assert_close(capped_diff, cap * (torch.tanh(a / cap) - torch.tanh(b / cap)), atol=1e-4, rtol=0)
    eps = 1e-3
    numeric = (model.adapter.apply_output_logits_transform(a + eps) - model.adapter.apply_output_logits_transform(a)) / eps
    torch.testing.assert_close(model.adapter.derivative(a), numeric, atol=2e-3, rtol=0)
    torch.testing.assert_close(model.adapter.inverse(logits[:, -1]), pre, atol=5e-3, rtol=1e-3)
    with pytest.raises(KeyError, match="needs 'ln_final.hook_normalized' in the cache"):
        model.run_with_cache(tokens, names_filter="blocks.0.hook_resid_pre")[1].logits_before_softcap()


# ---------------------------------------------------------------- loss_fn, embed/unembed/ln_final, compat


@torch.no_grad()
def test_loss_fn_is_tls(tok):
    model = random_model(tok)
    tokens = model.to_tokens(PROMPTS)
    logits = model(tokens)
    logp = logits.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    torch.testing.assert_close(model.loss_fn(logits, tokens, per_token=True), -logp, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.loss_fn(logits, tokens), -logp.mean(), atol=1e-6, rtol=0)
    mask = tokens != model.tokenizer.pad_token_id
    keep = mask[:, :-1] & mask[:, 1:]
    torch.testing.assert_close(model.loss_fn(logits, tokens, attention_mask=mask), -(logp * keep).sum() / keep.sum(),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(model.loss_fn(logits, tokens, mask.long()), model(PROMPTS, return_type="loss"),
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"tokens must be integer ids of shape \(3, \d+\)"):
        model.loss_fn(logits, tokens[:, :-1])
    with pytest.raises(ValueError, match=r"logits must be \[batch, pos, d_vocab\]"):
        model.loss_fn(logits[0], tokens)
    with pytest.raises(ValueError, match="attention_mask must have the tokens' shape"):
        model.loss_fn(logits, tokens, attention_mask=mask[:, 1:])


@torch.no_grad()
def test_embed_unembed_ln_final_modules_read_the_weights_they_name():
    model, _, ref = nanochat_fixture("nanochat-2026-01-d2")  # vocabulary 500, padded to 512 rows
    assert model.embed.W_E.shape == (500, model.cfg.d_model) and model.wte.weight.shape[0] == 512
    # exact by construction: views of the same storage, no copy and no second checkpoint key
    assert model.embed.W_E.data_ptr() == model.wte.weight.data_ptr() == model.W_E.data_ptr()
    assert torch.equal(model.unembed.W_U, model.W_U) and not model.unembed.b_U.any()
    assert not any(k.startswith(("embed.", "unembed.")) for k in model.state_dict())
    tokens = ref["input_ids"][:, :20]
    _, cache = model.run_with_cache(tokens)
    assert torch.equal(model.embed(tokens), cache["hook_embed_raw"])
    # (the cache hooks ln_final.hook_scale, so it normalised with the explicit scale: rounding)
    torch.testing.assert_close(model.ln_final(cache["resid_post", -1]), cache["ln_final.hook_normalized"],
                               atol=1e-6, rtol=1e-6)
    # TL's idiom: the full OV circuit from token to token
    full = model.embed.W_E @ model.OV @ model.unembed.W_U
    assert full.shape == (2, 2, 500, 500)
    torch.testing.assert_close(full[1, 0].AB, model.W_E @ model.W_V[1, 0] @ model.W_O[1, 0] @ model.W_U,
                               atol=1e-4, rtol=1e-4)
    names = dict(model.tl_named_parameters())
    assert list(names)[:3] == ["embed.W_E", "blocks.0.attn.W_Q", "blocks.0.attn.W_K"]
    assert names["unembed.W_U"].shape == (model.cfg.d_model, 500) and len(names) == 2 + 12 * 2 + 1


def test_enable_compatibility_mode_changes_no_weight(tok):
    model = random_model(tok)
    tokens = model.to_tokens(PROMPTS[0])
    with torch.no_grad():
        before = model(tokens)
    with pytest.warns(UserWarning, match="center_writing_weights and center_unembed skipped"):
        model.enable_compatibility_mode()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.enable_compatibility_mode(disable_warnings=True)
    assert model.compatibility_mode
    with torch.no_grad():
        assert torch.equal(model(tokens), before)
    with pytest.raises(ValueError, match="refactor_factored_attn_matrices is refused .* rotary"):
        model.enable_compatibility_mode(refactor_factored_attn_matrices=True)
