"""Evaluation accounting on real GPTs: random weights (chance), forced answers (exact), pass@k, DDP."""

import json
import random
from collections import Counter

import pytest
import torch
from tasks_tokenizer import trained_tokenizer

from aquainterp.evaluate import evaluate, load_problems, pass_at_k
from aquainterp.model.gpt import GPT, GPTConfig
from aquainterp.tasks import LETTERS
from aquainterp.tasks.chat import letter_token_ids
from aquainterp.tasks.synthetic import SyntheticTask


def tiny_gpt(vocab_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(2, vocab_size=vocab_size, sequence_len=256))
    model.init_weights()
    # nanochat zero-inits lm_head (every logit 0); a random head gives a genuinely random policy
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)
    return model


def force_answer(model: GPT, tok, choose):
    """Hook the real GPT so that, whatever it computes, its next token after the last input token
    follows "<|assistant_start|>Answer: X<|assistant_end|>". At the letter position X = choose(s, b):
    s = sum of the prompt's ids (a fingerprint of the problem; left padding is token 0), b = the sample's
    index within its prompt while decoding (0 for whole-prompt forwards, so a categorical answer does not
    depend on batch composition). Works with and without the KV cache (the hook reads the input ids of
    each call). Decoding rows are the Engine's: prompt-major, num_samples rows per prompt; every row
    follows the same chain, so all stop together and no prompt leaves the batch early."""
    prompt_tail, letters = letter_token_ids(tok)
    start, end = tok.encode_special("<|assistant_start|>"), tok.encode_special("<|assistant_end|>")
    chain = [start, *prompt_tail]
    assert len(set(chain)) == len(chain)
    following = dict(zip(chain, chain[1:]))
    for letter in letters:
        following[letter] = end

    next_of = torch.full((tok.vocab_size,), end, dtype=torch.long)
    for token, nxt in following.items():
        next_of[token] = nxt

    prompt_sum = {}

    def hook(module, args, kwargs, logits):
        idx = args[0]
        if idx.shape[1] > 1:  # whole prompts (prefill or categorical batch), not one decode step
            prompt_sum["rows"] = idx.sum(1).tolist()
        target = next_of.to(idx.device)[idx]
        at_letter = (idx == chain[-1]).nonzero().tolist()
        for b, t in at_letter:
            if idx.shape[1] > 1:
                choice = choose(int(idx[b, : t + 1].sum()), 0)
            else:
                samples = idx.shape[0] // len(prompt_sum["rows"])
                choice = choose(prompt_sum["rows"][b // samples], b % samples)
            target[b, t] = letters[LETTERS.index(choice)]
        at = kwargs.get("logits_at")
        if at is not None:  # the model returned one position per row
            target = target[torch.arange(len(target)), at.to(target.device)]
        return torch.full_like(logits, -10.0).scatter(-1, target[..., None], 10.0)

    model.register_forward_hook(hook, with_kwargs=True)
    return model



@pytest.fixture(scope="module")
def tok():
    return trained_tokenizer()


@pytest.fixture(scope="module")
def synthetic():
    return SyntheticTask(seed=0, split="eval").problems(100)


def test_pass_at_k_known_values():
    assert pass_at_k(4, 0, 2) == 0.0
    assert pass_at_k(4, 4, 1) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)
    assert pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)
    with pytest.raises(ValueError, match="need 1 <= k <= n"):
        pass_at_k(2, 1, 3)


@pytest.mark.parametrize("mode", ["categorical", "generative"])
def test_forced_c_scores_exactly_the_share_of_c(tok, synthetic, mode):
    model = force_answer(tiny_gpt(tok.vocab_size), tok, lambda s, b: "C")
    kwargs = {"max_new_tokens": 8} if mode == "generative" else {"batch_size": 7}
    result = evaluate(model, tok, synthetic, mode, progress=False, **kwargs)
    golds = Counter(p.correct for p in synthetic)
    assert result.problems == result.samples == result.answered == 100
    assert result.correct == golds["C"]
    assert result.accuracy == golds["C"] / 100
    # every prediction is C: the confusion table's C column is the gold histogram
    assert [row[LETTERS.index("C")] for row in result.confusion] == [golds[x] for x in LETTERS]
    assert result.per_letter_accuracy() == {x: float(x == "C") for x in LETTERS}
    if mode == "generative":
        assert result.pass_at == {1: pytest.approx(golds["C"] / 100)}
        assert result.metrics("synthetic")["eval/synthetic_acc"] == golds["C"] / 100
    else:
        assert result.metrics("synthetic") == {"eval/synthetic_categorical_acc": golds["C"] / 100}


def test_forced_c_on_aqua_dev(tok, shared_data):
    path = shared_data / "aqua_rat" / "dev.json"
    golds = [json.loads(line)["correct"] for line in path.open()][:80]
    model = force_answer(tiny_gpt(tok.vocab_size), tok, lambda s, b: "C")
    result = evaluate(model, tok, load_problems("aqua", str(path), 80), "categorical", progress=False,
                      batch_size=40)
    assert (result.correct, result.samples) == (golds.count("C"), 80)


def test_random_weights_categorical_is_chance(tok):
    problems = SyntheticTask(seed=0, split="eval").problems(400)
    accs = [evaluate(tiny_gpt(tok.vocab_size, seed), tok, problems, "categorical", progress=False,
                     batch_size=50).accuracy for seed in range(2)]
    print("random-weight categorical accuracy:", accs)
    # 400 problems: binomial sd 0.02 around 0.2
    assert all(0.13 < a < 0.27 for a in accs), accs


def test_uniform_random_answers_generative_is_chance_and_pass_at_k(tok):
    problems = SyntheticTask(seed=0, split="eval").problems(300)
    rng = random.Random(0)
    model = force_answer(tiny_gpt(tok.vocab_size), tok, lambda s, b: rng.choice(LETTERS))
    result = evaluate(model, tok, problems, "generative", num_samples=4, max_new_tokens=8, progress=False)
    print("uniform-letter generative:", result.accuracy, result.pass_at)
    assert result.samples == 1200 and result.answered == 1200
    # 1200 samples: sd of the accuracy 0.012; 300 problems: sd of pass@4 (expected 1 - 0.8**4 = 0.59) 0.028
    assert abs(result.accuracy - 0.2) < 0.05
    assert set(result.pass_at) == {1, 2, 4}
    assert result.pass_at[1] == pytest.approx(result.accuracy)
    assert abs(result.pass_at[4] - 0.59) < 0.1


def test_random_weights_generative_accounting(tok, synthetic):
    result = evaluate(tiny_gpt(tok.vocab_size), tok, synthetic[:20], "generative", max_new_tokens=16,
                      progress=False)
    print("random-weight generative:", result.accuracy, "answered", result.answered, "of", result.samples)
    assert result.samples == 20
    assert result.correct <= result.answered <= result.samples
    assert sum(map(sum, result.confusion)) == 20
    assert sum(row[-1] for row in result.confusion) == result.samples - result.answered


def test_bad_arguments(tok, synthetic):
    model = tiny_gpt(tok.vocab_size)
    with pytest.raises(ValueError, match="mode must be one of .*got 'vote'"):
        evaluate(model, tok, synthetic, "vote")
    with pytest.raises(ValueError, match="no problems"):
        evaluate(model, tok, [], "categorical")
    with pytest.raises(ValueError, match="task must be one of synthetic, aqua, gsm8k, arc, mmlu, got 'gsm'"):
        load_problems("gsm")
    with pytest.raises(ValueError, match="n must be >= 1"):
        load_problems("synthetic", n=0)
    with pytest.raises(ValueError, match="num_samples must be >= 1"):
        evaluate(model, tok, synthetic, "generative", num_samples=0)
