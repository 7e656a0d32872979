"""Engine: KV-cache sampling equals full recompute; seeds, top-k, stop tokens, logprobs, errors."""

import pytest
import torch
import torch.nn.functional as F

from aquainterp.model.engine import Engine, Generation
from aquainterp.model.gpt import GPT, GPTConfig
from aquainterp.model.kv_cache import KVCache

VOCAB = 48


def random_gpt(seed=0, **kw) -> GPT:
    """Random non-zero weights everywhere (std 1 embedding, 1/√fan_in matrices)."""
    torch.manual_seed(seed)
    config = GPTConfig(
        **{**dict(sequence_len=64, vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=64), **kw}
    )
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 if p is model.wte.weight else p.shape[-1] ** -0.5)
    return model.eval()


PROMPT = [3, 17, 5, 40, 22, 9]


@torch.no_grad()
def greedy_full_recompute(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@torch.no_grad()
def full_logprobs(model, prompt, completion):
    """log p(token) of each completion token from one full forward at temperature 1."""
    ids = torch.tensor([prompt + completion])
    logp = F.log_softmax(model(ids)[0, len(prompt) - 1 : -1], dim=-1)
    return logp.gather(-1, torch.tensor(completion)[:, None]).squeeze(-1)


@pytest.mark.parametrize("hooked", [False, True])
def test_cached_greedy_equals_full_recompute_token_for_token(hooked):
    model = random_gpt()
    expected = greedy_full_recompute(model, PROMPT, 30)
    hooks = [(f"blocks.{l}.attn.hook_pattern", lambda x, hook: None) for l in range(2)] if hooked else []
    with model.hooks(fwd_hooks=hooks):  # hooked: the explicit attention path decodes from the cache
        gen = Engine(model).generate(PROMPT, num_samples=3, max_new_tokens=30, temperature=0.0, logprobs=True)
    assert gen.completions == [expected] * 3
    assert gen.finished == [False] * 3 and gen.prompt == PROMPT
    torch.testing.assert_close(
        torch.tensor(gen.logprobs[0]), full_logprobs(model, PROMPT, expected), atol=1e-5, rtol=0
    )


def test_top_k_one_is_greedy():
    model = random_gpt(seed=1)
    gen = Engine(model).generate(PROMPT, num_samples=2, max_new_tokens=12, temperature=0.8, top_k=1, seed=3)
    assert gen.completions == [greedy_full_recompute(model, PROMPT, 12)] * 2


def test_seed_makes_sampling_deterministic_and_samples_differ():
    engine = Engine(random_gpt(seed=2))
    a = engine.generate(PROMPT, num_samples=4, max_new_tokens=16, temperature=1.0, seed=11)
    b = engine.generate(PROMPT, num_samples=4, max_new_tokens=16, temperature=1.0, seed=11)
    c = engine.generate(PROMPT, num_samples=4, max_new_tokens=16, temperature=1.0, seed=12)
    assert a == b and a.completions != c.completions
    assert len({tuple(x) for x in a.completions}) == 4  # each sample is its own draw from the shared prefix


def test_logprobs_are_temperature_one_and_top_k_is_respected():
    model = random_gpt(seed=3)
    gen = Engine(model).generate(PROMPT, num_samples=3, max_new_tokens=10, temperature=0.7, top_k=5, seed=0,
                                 logprobs=True)
    for completion, logprobs in zip(gen.completions, gen.logprobs):
        torch.testing.assert_close(
            torch.tensor(logprobs), full_logprobs(model, PROMPT, completion), atol=1e-5, rtol=0
        )
        with torch.no_grad():
            logits = model(torch.tensor([PROMPT + completion]))[0, len(PROMPT) - 1 : -1]
        top5 = logits.topk(5, dim=-1).indices
        assert all(tok in top5[i].tolist() for i, tok in enumerate(completion))


def test_first_token_frequencies_follow_the_softmax():
    model = random_gpt(seed=4, vocab_size=6)
    prompt = [1, 2, 3]
    gen = Engine(model).generate(prompt, num_samples=4000, max_new_tokens=1, temperature=1.0, seed=0)
    counts = torch.bincount(torch.tensor([c[0] for c in gen.completions]), minlength=6).float()
    with torch.no_grad():
        probs = F.softmax(model(torch.tensor([prompt]))[0, -1], dim=-1)
    assert (counts / 4000 - probs).abs().max() < 0.03  # ~4 standard errors at p = 0.5


def test_stop_token_ends_a_sample_and_is_included():
    model = random_gpt(seed=5)
    greedy = greedy_full_recompute(model, PROMPT, 10)
    stop = greedy[3]
    cut = greedy.index(stop) + 1
    gen = Engine(model).generate(
        PROMPT, num_samples=2, max_new_tokens=10, temperature=0.0, stop_tokens={stop}, logprobs=True
    )
    assert gen.completions == [greedy[:cut]] * 2 and gen.finished == [True, True]
    assert [len(lp) for lp in gen.logprobs] == [cut, cut]


def test_as_batch_pads_and_masks_completions():
    gen = Generation(
        prompt=[5, 6], completions=[[1, 2, 3], [4]], logprobs=[[0.0] * 3, [0.0]], finished=[True, False]
    )
    ids, mask = gen.as_batch(pad_token=0)
    assert ids.tolist() == [[5, 6, 1, 2, 3], [5, 6, 4, 0, 0]]
    assert mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0]]


def test_kv_cache_select_rows_copies_rows():
    cache = KVCache(batch_size=2, num_layers=1, max_len=4, left_pad=torch.tensor([0, 2]))
    k = torch.randn(2, 2, 3, 8)
    cache.insert_kv(0, k, -k)
    wide = cache.select_rows(torch.tensor([1, 1, 0]))
    assert wide.get_pos() == 3 and wide.k.shape == (1, 3, 2, 4, 8) and wide.left_pad.tolist() == [2, 2, 0]
    torch.testing.assert_close(wide.k[0, :, :, :3], k[[1, 1, 0]])
    torch.testing.assert_close(wide.v[0, :, :, :3], -k[[1, 1, 0]])
    wide.k[0, 1].zero_()  # rows are independent copies
    assert wide.k[0, 0].abs().sum() > 0 and cache.k.abs().sum() > 0
    with pytest.raises(ValueError, match=r"rows must be a non-empty 1-d list of indices in \[0, 3\), got \[3\]"):
        wide.select_rows(torch.tensor([3]))
    with pytest.raises(ValueError, match="left_pad must be a long tensor of 2 non-negative counts"):
        KVCache(batch_size=2, num_layers=1, max_len=4, left_pad=torch.tensor([0, -1]))


PROMPTS = [[3, 17, 5, 40, 22, 9], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [30, 31, 32]]


@pytest.mark.parametrize("hooked", [False, True])
def test_batched_greedy_equals_each_prompt_alone(hooked):
    """Left-padded prompts of lengths 6, 1, 11, 3 decoded together give each prompt's own greedy tokens
    and log-probs (full recompute is the reference), on both attention paths."""
    model = random_gpt(seed=4)
    hooks = [(f"blocks.{l}.attn.hook_pattern", lambda x, hook: None) for l in range(2)] if hooked else []
    with model.hooks(fwd_hooks=hooks):
        gens = Engine(model).generate_batch(PROMPTS, max_new_tokens=20, temperature=0.0, logprobs=True)
    for prompt, gen in zip(PROMPTS, gens):
        expected = greedy_full_recompute(model, prompt, 20)
        assert gen.prompt == prompt and gen.completions == [expected] and gen.finished == [False]
        torch.testing.assert_close(torch.tensor(gen.logprobs[0]), full_logprobs(model, prompt, expected),
                                   atol=1e-5, rtol=0)


def test_batched_sampling_draws_as_each_prompt_alone_and_finished_prompts_leave():
    """Per-prompt seeds reproduce generate(prompt, seed) sample for sample; a prompt whose samples all hit
    the stop token leaves the batch while the others keep decoding."""
    model = random_gpt(seed=5)
    engine = Engine(model)
    alone = [engine.generate(p, num_samples=3, max_new_tokens=12, temperature=1.0, seed=10 + i)
             for i, p in enumerate(PROMPTS)]
    # stop tokens that end every sample of prompt 1 at its first token
    stop = sorted({c[0] for c in alone[1].completions})
    alone = [engine.generate(p, num_samples=3, max_new_tokens=12, temperature=1.0, seed=10 + i, stop_tokens=stop,
                             logprobs=True)
             for i, p in enumerate(PROMPTS)]
    rows = []  # batch size of every forward: the prefill, then one per decode step
    handle = model.register_forward_pre_hook(lambda mod, args: rows.append(args[0].shape[0]))
    together = engine.generate_batch(PROMPTS, num_samples=3, max_new_tokens=12, temperature=1.0,
                                     seeds=[10 + i for i in range(len(PROMPTS))], stop_tokens=stop, logprobs=True)
    handle.remove()
    for a, b in zip(alone, together):
        assert a.completions == b.completions and a.finished == b.finished
        torch.testing.assert_close(torch.tensor(sum(a.logprobs, [])), torch.tensor(sum(b.logprobs, [])),
                                   atol=1e-5, rtol=0)
    assert together[1].finished == [True] * 3 and max(len(c) for c in together[1].completions) == 1
    assert max(len(c) for g in together for c in g.completions) == 12
    assert rows[:2] == [4, 9] and rows[-1] >= 3  # prefill 4 prompts; prompt 1 left before the first decode


def test_left_padded_prefill_equals_unpadded_logits():
    """The model side of the contract: with KVCache.left_pad, a left-padded row's logits at its real
    positions equal the same tokens run alone (rotary positions shifted, padding keys masked)."""
    model = random_gpt(seed=6)
    short, long = PROMPTS[0], PROMPTS[2]
    ids = torch.tensor([[0] * (len(long) - len(short)) + short, long])
    cache = KVCache(2, 2, len(long), left_pad=torch.tensor([len(long) - len(short), 0]))
    with torch.no_grad():
        padded = model(ids, kv_cache=cache)
        torch.testing.assert_close(padded[0, len(long) - len(short) :], model(torch.tensor([short]))[0],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(padded[1], model(torch.tensor([long]))[0], atol=1e-5, rtol=0)
        assert torch.isfinite(padded).all()  # padding rows see themselves, never a softmax over nothing


def test_bad_arguments_are_named():
    engine = Engine(random_gpt())
    with pytest.raises(ValueError, match=r"prompt must be a non-empty list of token ids in \[0, 48\)"):
        engine.generate([])
    with pytest.raises(ValueError, match="token ids in"):
        engine.generate([1, 48])
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        engine.generate([1], temperature=-1)
    with pytest.raises(ValueError, match="top_k must be None or >= 1"):
        engine.generate([1], top_k=0)
    with pytest.raises(ValueError, match="exceeds the model's rotary length 640"):
        engine.generate([1], max_new_tokens=640)
    with pytest.raises(TypeError, match="expected an aquainterp GPT"):
        Engine(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="Engine.generate_batch: 1 seeds for 2 prompts"):
        engine.generate_batch([[1], [2]], seeds=[0])
    with pytest.raises(ValueError, match="Engine.generate_batch: expected a non-empty list of prompts"):
        engine.generate_batch([])


def test_generation_runs_in_inference_mode_and_leaves_the_model_trainable():
    """Engine decodes under torch.inference_mode (as nanochat); rotary tables it grows past their initial
    length are still ordinary tensors, so the same model trains afterwards (RL: rollouts, then the update)."""
    model = random_gpt(seed=3)
    have = model.cos.size(1)
    gen = Engine(model).generate([1, 2, 3], num_samples=2, max_new_tokens=have + 5, temperature=1.0, seed=0)
    assert model.cos.size(1) > have and not model.cos.is_inference()
    assert len(gen.completions[0]) == have + 5
    x = torch.tensor([[1, 2, 3] + gen.completions[0]])
    loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    assert model.wte.weight.grad is not None and torch.isfinite(loss)


def test_logprobs_only_when_asked_and_the_tokens_do_not_depend_on_it():
    model = random_gpt(seed=6)
    engine = Engine(model)
    plain = engine.generate(PROMPT, num_samples=3, max_new_tokens=12, temperature=1.0, seed=4)
    asked = engine.generate(PROMPT, num_samples=3, max_new_tokens=12, temperature=1.0, seed=4, logprobs=True)
    assert plain.logprobs is None and [len(lp) for lp in asked.logprobs] == [len(c) for c in asked.completions]
    assert plain.completions == asked.completions and plain.finished == asked.finished
    batch = engine.generate_batch(PROMPTS, max_new_tokens=5, temperature=0.0)
    assert all(g.logprobs is None for g in batch)
