"""The probes on a model trained here, reading its own completions: do they describe what it does?

A depth-2 GPT learns the "checked" answer format on the synthetic task (tests/test_patching_trained.py's
recipe, 300 steps: greedy accuracy ~0.6-0.7 on held-out problems, so both right and wrong answers occur).
On 64 held-out problems the suite's default decision (the answer step of the model's own greedy
completion) must agree with what the model writes: the letter counts are the letters its completions
state, the gold margin's sign says whether the stated answer is right, the hardest-questions table names
the letter each completion states, and each value equals a plain unbatched forward of that prefix.
"""

import functools

import pytest
import torch
from tasks_tokenizer import trained_tokenizer
from test_patching_trained import train_checked

from aquainterp.model.engine import Engine
from aquainterp.tasks import LETTERS, answer_step, extract_letter
from aquainterp.tasks.synthetic import SyntheticTask
from probes.probe_set import answer_marker
from probes.reference import freeze_reference
from probes.suite import ProbeSuite

FIRST_PROBLEM = 300  # a start index in the eval split that no other test reads


@functools.cache
def trained():
    tokenizer = trained_tokenizer()
    return train_checked(tokenizer, steps=300, lr=6e-3), tokenizer


def probe_problems(n=64):
    return SyntheticTask(seed=0, split="eval", difficulty=1).problems(FIRST_PROBLEM + n)[FIRST_PROBLEM:]


@pytest.mark.slow
def test_in_completion_probes_describe_what_the_trained_model_writes():
    model, tokenizer = trained()
    problems = probe_problems()
    suite = ProbeSuite(model, tokenizer, problems, reference_model=freeze_reference(model), batch_size=16,
                       max_new_tokens=64, hardest_k=8, progress=False)
    metrics = suite.run(0, table=True)
    raw = suite.last_raw

    # the model's own greedy completions, one problem at a time (no batching, no left padding)
    engine, stop = Engine(model), [tokenizer.encode_special("<|assistant_end|>")]
    marker = answer_marker(tokenizer)
    written, correct, prefixes = [], [], []
    for item in suite.items:
        completion = engine.generate(list(item.prompt), max_new_tokens=64, temperature=0.0,
                                     stop_tokens=stop).completions[0]
        letter = extract_letter(tokenizer.decode(completion))
        written.append(letter)
        correct.append(letter == item.problem.correct)
        cut = answer_step(completion, marker)
        prefixes.append(None if cut is None else list(item.prompt) + completion[:cut])
    accuracy = sum(correct) / len(correct)
    assert 0.3 < accuracy < 0.95, accuracy  # the recipe gives a model with right and wrong answers

    # letter counts are the letters the completions state
    for letter in LETTERS:
        assert abs(metrics[f"rl/letter_pred_counts/{letter}"] - written.count(letter)) <= 2, letter
    answered = raw["answered"]
    assert metrics["rl/probe_no_answer_frac"] == pytest.approx(1 - len(answered) / len(problems))
    assert len(answered) >= 0.9 * len(problems)
    # the suite decodes the probe set in one left-padded batch: the same completions as one at a time
    # (batched kernels round differently, so a near-tie may rarely go the other way)
    same = [list(ids) == prefixes[i] for ids, i in zip(raw["decision_ids"], answered)]
    assert sum(same) >= 0.95 * len(answered)

    # each value is what a plain unbatched forward of that prefix gives
    gold_margin = torch.as_tensor(raw["letter_gold_margin"])
    with torch.no_grad():
        for k, ids in enumerate(raw["decision_ids"]):
            letters = model(torch.tensor([ids]))[0, -1, list(suite.items[answered[k]].letter_ids)]
            assert torch.allclose(torch.as_tensor(raw["letter_logits"][k]), letters, atol=1e-4)

    # the gold margin's sign says whether the stated answer is right
    stated_right = [raw["written"][i] == LETTERS.index(suite.items[i].problem.correct) for i in answered]
    agree = [(float(gold_margin[k]) > 0) == stated_right[k] for k in range(len(answered))]
    assert sum(agree) >= 0.99 * len(agree), sum(agree) / len(agree)
    right = [float(gold_margin[k]) for k in range(len(answered)) if stated_right[k]]
    wrong = [float(gold_margin[k]) for k in range(len(answered)) if not stated_right[k]]
    assert sum(right) / len(right) > 1.0 and sum(wrong) / len(wrong) < -1.0
    assert metrics["rl/probe_decision_agreement"] >= 0.99

    # the hardest-questions table names the letter each completion states, most confidently wrong first
    rows = raw["hardest"]["rows"]
    assert len(rows) == 8
    completion = raw["hardest"]["columns"].index("completion")
    for row in rows:
        assert row[3] == (extract_letter(row[completion]) or "")
    margins = [row[5] for row in rows if row[5] is not None]
    assert margins == sorted(margins) and margins[0] < 0

    # the logit lens' last layer is the model's own letter read
    lens = raw["logit_lens_gold_margin"]  # [answered, layers]
    assert torch.allclose(torch.as_tensor(lens[:, -1]), gold_margin, atol=1e-4)


@pytest.mark.slow
def test_rollout_letter_metrics_read_the_sampled_completions():
    model, tokenizer = trained()
    problems = probe_problems(8)
    suite = ProbeSuite(model, tokenizer, problems, probes=("margin", "counts"), max_new_tokens=64, progress=False)
    engine, stop = Engine(model), [tokenizer.encode_special("<|assistant_end|>")]
    gens = engine.generate_batch([list(it.prompt) for it in suite.items], num_samples=4, max_new_tokens=64,
                                 temperature=1.0, stop_tokens=stop, seeds=list(range(8)))
    triples = [(list(g.prompt), c, it.problem) for g, it in zip(gens, suite.items) for c in g.completions]
    metrics = suite.run(0, rollouts=triples, table=False)
    marker = answer_marker(tokenizer)
    answered = [t for t in triples if answer_step(t[1], marker) is not None]
    assert metrics["rl/rollout_no_answer_frac"] == pytest.approx(1 - len(answered) / len(triples))
    assert metrics["rl/rollout_decision_agreement"] >= 0.95
    # mean gold margin over the samples, recomputed one sample at a time
    want = []
    with torch.no_grad():
        for prompt, completion, problem in answered:
            ids = prompt + completion[: answer_step(completion, marker)]
            letters = model(torch.tensor([ids]))[0, -1, list(suite.items[0].letter_ids)]
            gold = LETTERS.index(problem.correct)
            want.append(float(letters[gold] - torch.cat([letters[:gold], letters[gold + 1:]]).max()))
    assert metrics["rl/rollout_letter_gold_margin_mean"] == pytest.approx(sum(want) / len(want), abs=1e-4)
